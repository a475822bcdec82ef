//! The CA's error type, split into user mistakes (exit code 2) and everything else.

use std::path::PathBuf;
use time::OffsetDateTime;

/// What can go wrong while running the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The directory holds no CA (`razar-certs init` not run).
    #[error("no CA in {dir} (run `razar-certs init --dir {dir}` first)")]
    NotInitialized { dir: PathBuf },
    /// `init` found an existing CA and `--force` was not given.
    #[error(
        "{path} already exists; a CA is already initialised there (use --force to replace it)"
    )]
    AlreadyInitialized { path: PathBuf },
    /// A certificate or key file exists and `--force` was not given.
    #[error("{path} already exists (use --force to overwrite)")]
    Exists { path: PathBuf },
    /// A host id, operator name or CA name is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A collector certificate needs at least one DNS name.
    #[error("a collector certificate needs at least one --dns NAME")]
    NoDnsNames,
    /// A collector DNS name is not acceptable.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName { name: String, reason: &'static str },
    /// A validity period or CRL lifetime is not acceptable.
    #[error("invalid validity: {reason}")]
    InvalidValidity { reason: String },
    /// A serial is not hex.
    #[error("invalid serial {input:?}: expected hex digits such as 3f9a01...")]
    InvalidSerial { input: String },
    /// No certificate with this serial was issued by this CA.
    #[error("no certificate with serial {serial} in this CA's index")]
    UnknownSerial { serial: String },
    /// The certificate is already revoked.
    #[error("certificate {serial} was already revoked at {at}")]
    AlreadyRevoked { serial: String, at: OffsetDateTime },
    /// A certificate file given by the user does not parse.
    #[error("{source}")]
    BadCertificate { source: razar_shared::tls::TlsError },
    /// A time span such as `30d` does not parse.
    #[error("invalid time span {input:?}: {reason}")]
    InvalidSpan { input: String, reason: &'static str },
    /// A file could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A CA file (key, certificate, index) is corrupt.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// Key generation or signing failed.
    #[error("{what}: {source}")]
    Crypto {
        what: &'static str,
        source: rcgen::Error,
    },
}

impl CaError {
    /// Whether the user can fix this by changing the command line (exit code 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            CaError::NotInitialized { .. }
            | CaError::AlreadyInitialized { .. }
            | CaError::Exists { .. }
            | CaError::InvalidName { .. }
            | CaError::NoDnsNames
            | CaError::InvalidDnsName { .. }
            | CaError::InvalidValidity { .. }
            | CaError::InvalidSerial { .. }
            | CaError::UnknownSerial { .. }
            | CaError::AlreadyRevoked { .. }
            | CaError::BadCertificate { .. }
            | CaError::InvalidSpan { .. } => true,
            // A file the user named that does not exist is their mistake too.
            CaError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            CaError::BadFile { .. } | CaError::Crypto { .. } => false,
        }
    }
}
