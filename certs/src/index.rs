//! The CA's index (`index.json`): every issued certificate and the last CRL number.

use crate::{files, CaError, INDEX_FILE};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// Index format version written by this build.
const INDEX_VERSION: u32 = 1;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The collector's server certificate (serverAuth).
    Collector,
    /// An agent's client certificate (clientAuth, `razar://host/<id>`).
    Agent,
    /// An operator's client certificate (clientAuth, `razar://operator/<name>`).
    Operator,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Collector => "collector",
            Kind::Agent => "agent",
            Kind::Operator => "operator",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Lower-case hex, no separators.
    pub serial: String,
    pub kind: Kind,
    /// Host id, operator name, or "collector".
    pub name: String,
    /// The collector's DNS names / IP addresses (empty for other kinds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Relative to the CA directory.
    pub cert_path: PathBuf,
    /// Relative to the CA directory.
    pub key_path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Index {
    pub(crate) version: u32,
    /// Number of the last CRL written (0 = none yet).
    pub(crate) crl_number: u64,
    pub(crate) certificates: Vec<Entry>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            version: INDEX_VERSION,
            crl_number: 0,
            certificates: Vec::new(),
        }
    }
}

impl Index {
    pub(crate) fn load(dir: &Path) -> Result<Index, CaError> {
        let path = dir.join(INDEX_FILE);
        let text = files::read_string(&path)?;
        let index: Index = serde_json::from_str(&text).map_err(|e| CaError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if index.version != INDEX_VERSION {
            return Err(CaError::BadFile {
                path,
                reason: format!(
                    "index version {} is not supported (expected {INDEX_VERSION})",
                    index.version
                ),
            });
        }
        Ok(index)
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<(), CaError> {
        let path = dir.join(INDEX_FILE);
        let mut text = serde_json::to_string_pretty(self).map_err(|e| CaError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        text.push('\n');
        files::write(&path, text.as_bytes(), files::PUBLIC_MODE, true)
    }
}
