//! The TLS files a config names, checked the way `run` will use them: read and parsed
//! (a certificate as PEM certificates, a key as a private key, a CRL as a CRL). The
//! agent's config adds its own kinds (a GPU scenario) on top.

use crate::tls;
use std::path::Path;

/// What a named TLS file must hold.
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
}

/// Why `path` cannot be used as a `kind`, if it cannot.
pub fn check_file(path: &Path, kind: FileKind) -> Result<(), String> {
    let what = path.display().to_string();
    let read = || tls::read_file(path).map_err(|e| e.to_string());
    match kind {
        FileKind::CaCertificates => tls::root_store(&read()?, &what)
            .map(drop)
            .map_err(|e| e.to_string()),
        FileKind::Certificates => tls::certificates(&read()?, &what)
            .map(drop)
            .map_err(|e| e.to_string()),
        FileKind::PrivateKey => tls::private_key(&read()?, &what)
            .map(drop)
            .map_err(|e| e.to_string()),
        FileKind::Crl => tls::load_crl_file(path)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}
