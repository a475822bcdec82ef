//! The files a config names, checked the way `run` will use them: read and parsed (a
//! certificate as PEM certificates, a key as a private key, a scenario as a scenario).
//! This is the only I/O of config validation; the rest is pure. The TLS kinds are
//! razar-shared's (`config_support::files`), shared with the collector's config.

use super::error::Collector;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What a named file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// PEM certificates to trust (a CA).
    CaCertificates,
    /// A PEM certificate chain.
    Certificates,
    /// A PEM private key.
    PrivateKey,
    /// A CRL, DER or PEM.
    Crl,
    /// A fake-GPU scenario (TOML).
    GpuScenario,
}

/// A file named by a config, with where it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// Key path, e.g. `collector.cert`.
    pub key: String,
    /// Where the value is written; None for a default that is not in the file.
    pub span: Option<Range<usize>>,
    pub path: PathBuf,
    pub kind: FileKind,
}

impl FileRef {
    pub fn new(
        key: impl Into<String>,
        span: Option<Range<usize>>,
        path: impl Into<PathBuf>,
        kind: FileKind,
    ) -> FileRef {
        FileRef {
            key: key.into(),
            span,
            path: path.into(),
            kind,
        }
    }
}

/// Why `path` cannot be used as a `kind`, if it cannot.
pub fn check_file(path: &Path, kind: FileKind) -> Result<(), String> {
    use razar_shared::config_support::files::{check_file as check_tls, FileKind as Tls};
    match kind {
        FileKind::CaCertificates => check_tls(path, Tls::CaCertificates),
        FileKind::Certificates => check_tls(path, Tls::Certificates),
        FileKind::PrivateKey => check_tls(path, Tls::PrivateKey),
        FileKind::Crl => check_tls(path, Tls::Crl),
        FileKind::GpuScenario => razar_gpu::Scenario::load(path)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

/// Checks every file in `files`, recording each problem in `c`; returns whether all
/// of them can be used.
pub fn check_files(files: &[FileRef], c: &mut Collector<'_>) -> bool {
    let mut ok = true;
    for file in files {
        if let Err(reason) = check_file(&file.path, file.kind) {
            c.push(file.span.clone(), file.key.clone(), reason);
            ok = false;
        }
    }
    ok
}
