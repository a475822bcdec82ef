//! rustls configuration for the fleet's mutual TLS, and identity read from certificates.
//!
//! Both sides trust only the fleet CA. The collector's [`server_config`] requires a client
//! certificate chaining to that CA, not revoked by the supplied CRLs, with the clientAuth
//! EKU; the agent's [`client_config`] presents the agent certificate. Both speak TLS 1.3
//! only, advertise [`ALPN`](crate::protocol::ALPN), never use 0-RTT (early data can be
//! replayed, and our messages include commands) and never resume a session (every
//! connection verifies the certificate in full, against the current CRL).
//!
//! Identity comes from the certificate, never from what a peer says: an agent's host id is
//! the URI SAN `razar://host/<id>` ([`host_id_from_certificate`]), an operator's name the URI
//! SAN `razar://operator/<name>`. A `Hello` naming another host is refused with
//! [`RefusalReason::HostIdMismatch`] ([`check_claimed_host`]).
//!
//! This module builds configs only; the quinn glue lives in agent and collector
//! (`quinn::crypto::rustls::QuicServerConfig::try_from(Arc<ServerConfig>)` accepts what
//! [`server_config`] returns: TLS 1.3 with AES-128-GCM is available).
//!
//! **CRL reload:** CRLs are fixed when the verifier is built. Build a new server config and
//! hand it to `Endpoint::set_server_config`; it applies to new connections only, so close
//! open connections whose certificate is now revoked yourself ([`revoked_serials`] parses
//! a CRL once into a set of serials).
//!
//! **Refusal reasons:** [`HandshakeRefusal`] classifies a refused handshake from rustls'
//! typed errors. The collector builds its config with [`server_config_from_files_tracked`],
//! whose verifier records each certificate it refuses in a [`HandshakeRefusals`]: quinn
//! only reports the TLS alert, and an expired certificate and one not yet valid send the
//! same one.

use crate::protocol::{RefusalReason, ALPN};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// URI SAN prefix naming an agent's host: `razar://host/<id>`.
pub const HOST_URI_PREFIX: &str = "razar://host/";
/// URI SAN prefix naming an operator: `razar://operator/<name>`.
pub const OPERATOR_URI_PREFIX: &str = "razar://operator/";
/// Longest host id or operator name accepted (a DNS name's limit).
pub const MAX_NAME_LEN: usize = 253;

/// What can go wrong while loading TLS material or reading identity from a certificate.
///
/// `what` names the input: a file path for the `*_file`/`*_from_files` functions, otherwise
/// the role of the bytes ("CA certificate", "private key", ...).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// PEM text could not be parsed.
    #[error("{what}: invalid PEM: {reason}")]
    Pem { what: String, reason: String },
    /// The input held no item of the expected kind.
    #[error("{what}: no {expected} found")]
    Missing {
        what: String,
        expected: &'static str,
    },
    /// rustls refused a certificate or key.
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    /// The client certificate verifier could not be built (e.g. a CRL does not parse).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A certificate's DER could not be parsed as X.509.
    #[error("certificate does not parse as X.509: {0}")]
    Certificate(String),
    /// The certificate carries no URI SAN with the expected prefix.
    #[error("certificate has no `{prefix}<name>` URI SAN")]
    NoIdentity { prefix: &'static str },
    /// The certificate carries more than one URI SAN with the expected prefix.
    #[error("certificate has several `{prefix}<name>` URI SANs")]
    AmbiguousIdentity { prefix: &'static str },
    /// The name in the URI SAN is not a valid host id or operator name.
    #[error("certificate names an invalid identity {name:?}: {reason}")]
    InvalidIdentity { name: String, reason: &'static str },
}

/// Installs ring as the process-wide rustls crypto provider. Idempotent: a provider that is
/// already installed (by us or anyone else) is left alone.
///
/// The builders in this module name ring explicitly and do not depend on this; call it
/// once at startup anyway so any other rustls user in the process agrees.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is exactly what we want.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The collector's server config: presents `cert_chain_pem`/`key_pem`, requires a client
/// certificate issued by the fleet CA in `ca_pem` and not revoked by `crls`, TLS 1.3 only,
/// ALPN [`ALPN`], 0-RTT off.
///
/// An empty `crls` disables revocation checking; with CRLs, an unknown revocation status is
/// refused and an expired CRL is still honoured (republish before `next_update`).
pub fn server_config(
    ca_pem: &[u8],
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<ServerConfig, TlsError> {
    let roots = root_store(ca_pem, "CA certificate")?;
    let chain = certificates(cert_chain_pem, "certificate chain")?;
    let key = private_key(key_pem, "private key")?;
    build_server_config(roots, chain, key, crls, "certificate chain", None)
}

/// [`server_config`] whose client certificate verifier records each certificate it
/// refuses, typed, in `refusals` (see [`HandshakeRefusals`]).
pub fn server_config_tracked(
    ca_pem: &[u8],
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    crls: Vec<CertificateRevocationListDer<'static>>,
    refusals: &HandshakeRefusals,
) -> Result<ServerConfig, TlsError> {
    let roots = root_store(ca_pem, "CA certificate")?;
    let chain = certificates(cert_chain_pem, "certificate chain")?;
    let key = private_key(key_pem, "private key")?;
    build_server_config(roots, chain, key, crls, "certificate chain", Some(refusals))
}

/// The agent's client config: trusts only the fleet CA in `ca_pem`, presents
/// `cert_pem`/`key_pem`, TLS 1.3 only, ALPN [`ALPN`], no early data.
pub fn client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<ClientConfig, TlsError> {
    let roots = root_store(ca_pem, "CA certificate")?;
    let chain = certificates(cert_pem, "client certificate")?;
    let key = private_key(key_pem, "private key")?;
    build_client_config(roots, chain, key, "client certificate")
}

/// Paths of the collector's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// Collector certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Collector private key (PEM, PKCS#8/SEC1/PKCS#1).
    pub key: PathBuf,
    /// CRL files (DER or PEM); empty disables revocation checking.
    pub crls: Vec<PathBuf>,
}

/// Paths of an agent's (or operator's) TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
}

/// [`server_config`] from files; every error names the file at fault. Call again (and
/// `Endpoint::set_server_config`) to pick up a new certificate or CRL.
pub fn server_config_from_files(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    server_config_from_files_inner(files, None)
}

/// [`server_config_from_files`] whose client certificate verifier records each
/// certificate it refuses, typed, in `refusals` (see [`HandshakeRefusals`]).
pub fn server_config_from_files_tracked(
    files: &ServerTlsFiles,
    refusals: &HandshakeRefusals,
) -> Result<ServerConfig, TlsError> {
    server_config_from_files_inner(files, Some(refusals))
}

fn server_config_from_files_inner(
    files: &ServerTlsFiles,
    refusals: Option<&HandshakeRefusals>,
) -> Result<ServerConfig, TlsError> {
    let roots = root_store(&read_file(&files.ca)?, &display(&files.ca))?;
    let chain = certificates(&read_file(&files.cert)?, &display(&files.cert))?;
    let key = private_key(&read_file(&files.key)?, &display(&files.key))?;
    let crls = files
        .crls
        .iter()
        .map(|path| load_crl_file(path))
        .collect::<Result<Vec<_>, _>>()?;
    build_server_config(roots, chain, key, crls, &display(&files.cert), refusals)
}

/// The operator API's HTTPS config (`[api.tls]`): presents `files.cert`/`files.key`;
/// a client certificate is optional (bearer-token clients connect without one), but one
/// that is presented must chain to `files.ca` (the operators' CA), carry the clientAuth
/// usage and not be revoked by `files.crls`. TLS 1.2 and 1.3 (browsers, curl), ALPN
/// `http/1.1`, no resumption (a resumed session would skip the revocation check).
/// Every error names the file at fault.
pub fn api_server_config_from_files(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let roots = root_store(&read_file(&files.ca)?, &display(&files.ca))?;
    let chain = certificates(&read_file(&files.cert)?, &display(&files.cert))?;
    let key = private_key(&read_file(&files.key)?, &display(&files.key))?;
    let crls = files
        .crls
        .iter()
        .map(|path| load_crl_file(path))
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "TLS protocol versions".into(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: display(&files.cert),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// [`client_config`] from files; every error names the file at fault.
pub fn client_config_from_files(files: &ClientTlsFiles) -> Result<ClientConfig, TlsError> {
    let roots = root_store(&read_file(&files.ca)?, &display(&files.ca))?;
    let chain = certificates(&read_file(&files.cert)?, &display(&files.cert))?;
    let key = private_key(&read_file(&files.key)?, &display(&files.key))?;
    build_client_config(roots, chain, key, &display(&files.cert))
}

fn build_server_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    what: &str,
    refusals: Option<&HandshakeRefusals>,
) -> Result<ServerConfig, TlsError> {
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()?;
    if let Some(refusals) = refusals {
        verifier = Arc::new(TrackingVerifier {
            inner: verifier,
            refusals: refusals.clone(),
        });
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 protocol version".into(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: what.into(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT off: early data can be replayed and our messages include commands.
    config.max_early_data_size = 0;
    config.send_half_rtt_data = false;
    // No resumption: a resumed session would skip the certificate check, so a certificate
    // that expired (or was revoked) since the ticket was issued would still get in.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn build_client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    what: &str,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 protocol version".into(),
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: what.into(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Reads a whole file; the error names it.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every `CERTIFICATE` block in `pem`, in order; at least one. `what` names the input in
/// errors.
pub fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what: what.into(),
            expected: "CERTIFICATE block",
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            what: what.into(),
            expected: "PRIVATE KEY block",
        },
        other => TlsError::Pem {
            what: what.into(),
            reason: other.to_string(),
        },
    })
}

/// A root store holding every certificate in `ca_pem`.
pub fn root_store(ca_pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_pem, what)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: what.into(),
            source,
        })?;
    }
    Ok(roots)
}

/// Loads a CRL from a file holding either DER or PEM (`X509 CRL` block). The error names
/// the file.
pub fn load_crl_file(path: &Path) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    crl_from_bytes(bytes, &display(path))
}

/// A CRL from DER or PEM bytes (PEM is recognised by its `-----BEGIN` line).
pub fn crl_from_bytes(
    bytes: Vec<u8>,
    what: &str,
) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    let is_pem = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|start| bytes[start..].starts_with(b"-----BEGIN"));
    if is_pem {
        CertificateRevocationListDer::from_pem_slice(&bytes).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
                what: what.into(),
                expected: "X509 CRL block",
            },
            other => TlsError::Pem {
                what: what.into(),
                reason: other.to_string(),
            },
        })
    } else if bytes.is_empty() {
        Err(TlsError::Missing {
            what: what.into(),
            expected: "CRL",
        })
    } else {
        Ok(CertificateRevocationListDer::from(bytes))
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, TlsError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::Certificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsError::Certificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// The single URI SAN starting with `prefix`, with the prefix removed and validated.
fn uri_identity(der: &[u8], prefix: &'static str) -> Result<String, TlsError> {
    let cert = parse(der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut found = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(prefix) {
                if found.is_some() {
                    return Err(TlsError::AmbiguousIdentity { prefix });
                }
                found = Some(id);
            }
        }
    }
    let id = found.ok_or(TlsError::NoIdentity { prefix })?;
    validate_name(id).map_err(|reason| TlsError::InvalidIdentity {
        name: id.to_string(),
        reason,
    })?;
    Ok(id.to_string())
}

/// The host id of an agent certificate (DER): its URI SAN `razar://host/<id>`.
pub fn host_id_from_certificate(der: &[u8]) -> Result<String, TlsError> {
    uri_identity(der, HOST_URI_PREFIX)
}

/// The operator name of an operator certificate (DER): its URI SAN
/// `razar://operator/<name>`.
pub fn operator_from_certificate(der: &[u8]) -> Result<String, TlsError> {
    uri_identity(der, OPERATOR_URI_PREFIX)
}

/// The certificate's serial number as lower-case hex without separators or leading zero
/// bytes (the form `razar-certs` prints and stores).
pub fn certificate_serial_hex(der: &[u8]) -> Result<String, TlsError> {
    let cert = parse(der)?;
    Ok(serial_hex(cert.raw_serial()))
}

/// Lower-case hex of a serial's big-endian bytes, leading zero bytes removed ("00" for 0).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let significant = &bytes[start..];
    if significant.is_empty() {
        return "00".into();
    }
    significant.iter().map(|b| format!("{b:02x}")).collect()
}

/// The certificate's `notAfter` (for days-to-expiry metrics and renewal).
pub fn certificate_not_after(der: &[u8]) -> Result<SystemTime, TlsError> {
    let cert = parse(der)?;
    let secs = cert.validity().not_after.timestamp();
    let since_epoch = Duration::from_secs(secs.unsigned_abs());
    Ok(if secs >= 0 {
        UNIX_EPOCH + since_epoch
    } else {
        UNIX_EPOCH - since_epoch
    })
}

/// Whether the CRL (DER) lists `serial_hex` (as [`certificate_serial_hex`] prints it). Use
/// it after a CRL reload to close connections whose certificate is now revoked. The CRL's
/// signature is not checked here: pass only CRLs the verifier has accepted.
pub fn is_revoked(crl_der: &[u8], serial_hex_value: &str) -> Result<bool, TlsError> {
    Ok(revoked_serials(crl_der)?.contains(serial_hex_value))
}

/// Every serial the CRL (DER) lists, as [`certificate_serial_hex`] prints them: parse a
/// CRL once, then look up each open connection's serial. Like [`is_revoked`], the CRL's
/// signature is not checked here.
pub fn revoked_serials(crl_der: &[u8]) -> Result<HashSet<String>, TlsError> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der)
        .map_err(|e| TlsError::Certificate(format!("CRL does not parse: {e}")))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|revoked| serial_hex(revoked.raw_serial()))
        .collect())
}

/// Why a TLS handshake was refused, from rustls' typed errors (or, where only the alert
/// reached the caller, from the TLS alert code), never from message text: rustls rewords
/// its messages between releases. [`code`](Self::code) is the stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum HandshakeRefusal {
    /// The client presented no certificate.
    NoClientCertificate,
    /// The client certificate's `notAfter` has passed.
    CertificateExpired,
    /// The client certificate's `notBefore` is still ahead (or the peer's clock is).
    CertificateNotYetValid,
    /// The client certificate is listed in a CRL.
    CertificateRevoked,
    /// The client certificate does not chain to the fleet CA (unknown issuer, or a
    /// signature that the fleet CA did not make).
    UnknownIssuer,
    /// The revocation status could not be decided (no CRL covers the issuer, or the CRL
    /// expired where expiry is enforced).
    RevocationUnknown,
    /// The certificate is not for client authentication (EKU).
    WrongPurpose,
    /// Any other certificate problem (bad encoding, unhandled critical extension, ...).
    BadCertificate,
    /// No protocol in common (ALPN).
    AlpnMismatch,
    /// The peer offered nothing this side accepts (TLS version, cipher suites, ...).
    Incompatible,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// Anything else.
    HandshakeFailed,
}

impl HandshakeRefusal {
    /// Stable code, used as the metric label.
    pub fn code(self) -> &'static str {
        match self {
            HandshakeRefusal::NoClientCertificate => "no_client_certificate",
            HandshakeRefusal::CertificateExpired => "certificate_expired",
            HandshakeRefusal::CertificateNotYetValid => "certificate_not_yet_valid",
            HandshakeRefusal::CertificateRevoked => "certificate_revoked",
            HandshakeRefusal::UnknownIssuer => "unknown_issuer",
            HandshakeRefusal::RevocationUnknown => "revocation_status_unknown",
            HandshakeRefusal::WrongPurpose => "certificate_wrong_purpose",
            HandshakeRefusal::BadCertificate => "bad_certificate",
            HandshakeRefusal::AlpnMismatch => "alpn_mismatch",
            HandshakeRefusal::Incompatible => "tls_incompatible",
            HandshakeRefusal::HandshakeTimeout => "handshake_timeout",
            HandshakeRefusal::HandshakeFailed => "handshake_failed",
        }
    }

    /// The refusal a rustls error stands for.
    pub fn from_error(error: &rustls::Error) -> HandshakeRefusal {
        match error {
            rustls::Error::InvalidCertificate(e) => Self::from_certificate_error(e),
            rustls::Error::NoCertificatesPresented => HandshakeRefusal::NoClientCertificate,
            rustls::Error::NoApplicationProtocol => HandshakeRefusal::AlpnMismatch,
            rustls::Error::PeerIncompatible(_) => HandshakeRefusal::Incompatible,
            _ => HandshakeRefusal::HandshakeFailed,
        }
    }

    /// The refusal a certificate error stands for.
    pub fn from_certificate_error(error: &CertificateError) -> HandshakeRefusal {
        #[allow(deprecated)] // BadSignature is still what webpki reports.
        match error {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                HandshakeRefusal::CertificateExpired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeRefusal::CertificateNotYetValid
            }
            CertificateError::Revoked => HandshakeRefusal::CertificateRevoked,
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithm
            | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                HandshakeRefusal::UnknownIssuer
            }
            CertificateError::UnknownRevocationStatus
            | CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => {
                HandshakeRefusal::RevocationUnknown
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                HandshakeRefusal::WrongPurpose
            }
            _ => HandshakeRefusal::BadCertificate,
        }
    }

    /// The refusal a TLS alert code (RFC 8446 §6; a QUIC close carries `0x100 + alert`)
    /// stands for, where the typed error is out of reach. `certificate_expired` covers
    /// "not yet valid" too there: only the typed error tells them apart.
    pub fn from_alert(alert: u8) -> HandshakeRefusal {
        match AlertDescription::from(alert) {
            AlertDescription::CertificateRequired => HandshakeRefusal::NoClientCertificate,
            AlertDescription::CertificateExpired => HandshakeRefusal::CertificateExpired,
            AlertDescription::CertificateRevoked => HandshakeRefusal::CertificateRevoked,
            AlertDescription::UnknownCA | AlertDescription::DecryptError => {
                HandshakeRefusal::UnknownIssuer
            }
            AlertDescription::UnsupportedCertificate => HandshakeRefusal::WrongPurpose,
            AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                HandshakeRefusal::BadCertificate
            }
            AlertDescription::NoApplicationProtocol => HandshakeRefusal::AlpnMismatch,
            AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity => {
                HandshakeRefusal::Incompatible
            }
            _ => HandshakeRefusal::HandshakeFailed,
        }
    }
}

/// Most refusals a [`HandshakeRefusals`] holds before it forgets the oldest.
const MAX_TRACKED_REFUSALS: usize = 256;

/// Typed refusals recorded by the client certificate verifier of a server config built
/// with [`server_config_tracked`] or [`server_config_from_files_tracked`], each with the
/// TLS alert it caused, so the accept loop, which only sees the alert in quinn's
/// connection error, can tell an expired certificate from one not yet valid (both
/// `certificate_expired` on the wire). Bounded: past [`MAX_TRACKED_REFUSALS`] the oldest
/// is forgotten (the caller then falls back to [`HandshakeRefusal::from_alert`]).
#[derive(Debug, Clone, Default)]
pub struct HandshakeRefusals {
    recent: Arc<Mutex<VecDeque<(u8, HandshakeRefusal)>>>,
}

impl HandshakeRefusals {
    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<(u8, HandshakeRefusal)>> {
        // A plain queue: a panic elsewhere cannot leave it half-updated.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a refusal and the alert it sends.
    pub fn record(&self, alert: u8, refusal: HandshakeRefusal) {
        let mut recent = self.recent();
        if recent.len() >= MAX_TRACKED_REFUSALS {
            recent.pop_front();
        }
        recent.push_back((alert, refusal));
    }

    /// Takes the oldest refusal recorded with `alert`, if any.
    pub fn take(&self, alert: u8) -> Option<HandshakeRefusal> {
        let mut recent = self.recent();
        let at = recent.iter().position(|(a, _)| *a == alert)?;
        recent.remove(at).map(|(_, refusal)| refusal)
    }

    /// The refusal behind a handshake that failed with `alert`: the typed one the
    /// verifier recorded, else the alert's meaning.
    pub fn classify(&self, alert: u8) -> HandshakeRefusal {
        self.take(alert)
            .unwrap_or_else(|| HandshakeRefusal::from_alert(alert))
    }
}

/// The fleet's client certificate verifier, recording what it refuses.
#[derive(Debug)]
struct TrackingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    refusals: HandshakeRefusals,
}

impl TrackingVerifier {
    fn observe<T>(&self, result: Result<T, rustls::Error>) -> Result<T, rustls::Error> {
        if let Err(rustls::Error::InvalidCertificate(e)) = &result {
            // The alert rustls sends for this error (`send_cert_verify_error_alert`).
            let alert = u8::from(AlertDescription::from(e.clone()));
            self.refusals
                .record(alert, HandshakeRefusal::from_certificate_error(e));
        }
        result
    }
}

impl ClientCertVerifier for TrackingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.observe(
            self.inner
                .verify_client_cert(end_entity, intermediates, now),
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.observe(self.inner.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.observe(self.inner.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// Checks a `Hello`'s claimed host id against the id in the client certificate; a mismatch
/// is refused with [`RefusalReason::HostIdMismatch`].
pub fn check_claimed_host(certificate_host: &str, claimed: &str) -> Result<(), RefusalReason> {
    if certificate_host == claimed {
        Ok(())
    } else {
        Err(RefusalReason::HostIdMismatch {
            certificate: certificate_host.to_string(),
            claimed: claimed.to_string(),
        })
    }
}

/// Checks a host id or operator name: 1 to [`MAX_NAME_LEN`] characters from `A-Z a-z 0-9 .
/// - _`, starting with a letter or digit. Returns the reason when invalid.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only letters, digits, '.', '-' and '_' are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0x7f, 0x01]), "7f01");
        assert_eq!(serial_hex(&[0, 0]), "00");
        assert_eq!(serial_hex(&[]), "00");
        assert_eq!(serial_hex(&[0xab]), "ab");
    }

    #[test]
    fn names() {
        assert!(validate_name("gpu-node-01.dc1").is_ok());
        assert!(validate_name("a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn claimed_host() {
        assert_eq!(check_claimed_host("h1", "h1"), Ok(()));
        assert_eq!(
            check_claimed_host("h1", "h2"),
            Err(RefusalReason::HostIdMismatch {
                certificate: "h1".into(),
                claimed: "h2".into()
            })
        );
    }

    /// A throwaway self-signed certificate and key, enough to build configs.
    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn configs_are_tls13_only_without_early_data_or_resumption() {
        let (cert, key) = self_signed();
        let server = server_config(cert.as_bytes(), cert.as_bytes(), key.as_bytes(), Vec::new())
            .expect("server config");
        assert_eq!(server.alpn_protocols, vec![ALPN.to_vec()]);
        assert_eq!(server.max_early_data_size, 0);
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.session_storage.can_cache());
        assert!(server
            .crypto_provider()
            .cipher_suites
            .iter()
            .any(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));

        let client =
            client_config(cert.as_bytes(), cert.as_bytes(), key.as_bytes()).expect("client");
        assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
        assert!(!client.enable_early_data);
        assert!(client.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn handshake_refusals_are_classified_by_type() {
        use HandshakeRefusal as R;
        let cases: Vec<(rustls::Error, HandshakeRefusal)> = vec![
            (CertificateError::Expired.into(), R::CertificateExpired),
            (
                CertificateError::ExpiredContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(2)),
                    not_after: UnixTime::since_unix_epoch(Duration::from_secs(1)),
                }
                .into(),
                R::CertificateExpired,
            ),
            (
                CertificateError::NotValidYet.into(),
                R::CertificateNotYetValid,
            ),
            (
                CertificateError::NotValidYetContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(1)),
                    not_before: UnixTime::since_unix_epoch(Duration::from_secs(2)),
                }
                .into(),
                R::CertificateNotYetValid,
            ),
            (CertificateError::Revoked.into(), R::CertificateRevoked),
            (CertificateError::UnknownIssuer.into(), R::UnknownIssuer),
            #[allow(deprecated)]
            (CertificateError::BadSignature.into(), R::UnknownIssuer),
            (
                CertificateError::UnknownRevocationStatus.into(),
                R::RevocationUnknown,
            ),
            (CertificateError::InvalidPurpose.into(), R::WrongPurpose),
            (CertificateError::BadEncoding.into(), R::BadCertificate),
            (
                rustls::Error::NoCertificatesPresented,
                R::NoClientCertificate,
            ),
            (rustls::Error::NoApplicationProtocol, R::AlpnMismatch),
            (
                rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic),
                R::Incompatible,
            ),
            (rustls::Error::DecryptError, R::HandshakeFailed),
        ];
        for (error, expected) in cases {
            assert_eq!(HandshakeRefusal::from_error(&error), expected, "{error:?}");
        }
        // Where only the alert is known.
        assert_eq!(HandshakeRefusal::from_alert(45), R::CertificateExpired);
        assert_eq!(HandshakeRefusal::from_alert(44), R::CertificateRevoked);
        assert_eq!(HandshakeRefusal::from_alert(48), R::UnknownIssuer);
        assert_eq!(HandshakeRefusal::from_alert(116), R::NoClientCertificate);
        assert_eq!(HandshakeRefusal::from_alert(120), R::AlpnMismatch);
        assert_eq!(HandshakeRefusal::from_alert(40), R::HandshakeFailed);
    }

    #[test]
    fn tracked_refusals_refine_the_alert_oldest_first_and_stay_bounded() {
        let refusals = HandshakeRefusals::default();
        refusals.record(45, HandshakeRefusal::CertificateNotYetValid);
        refusals.record(44, HandshakeRefusal::CertificateRevoked);
        refusals.record(45, HandshakeRefusal::CertificateExpired);
        assert_eq!(
            refusals.classify(45),
            HandshakeRefusal::CertificateNotYetValid
        );
        assert_eq!(refusals.classify(45), HandshakeRefusal::CertificateExpired);
        // Nothing recorded any more: the alert alone.
        assert_eq!(refusals.classify(45), HandshakeRefusal::CertificateExpired);
        assert_eq!(refusals.classify(44), HandshakeRefusal::CertificateRevoked);
        for _ in 0..10 * MAX_TRACKED_REFUSALS {
            refusals.record(48, HandshakeRefusal::UnknownIssuer);
        }
        assert_eq!(refusals.recent().len(), MAX_TRACKED_REFUSALS);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(host_id_from_certificate(b"").is_err());
        assert!(host_id_from_certificate(&[0x30, 0x82, 0xff, 0xff]).is_err());
        assert!(certificate_serial_hex(b"not a cert").is_err());
        assert!(is_revoked(b"\x30\x00", "01").is_err());
        assert!(matches!(
            certificates(b"", "x"),
            Err(TlsError::Missing { .. })
        ));
        assert!(matches!(
            private_key(
                b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
                "k"
            ),
            Err(TlsError::Missing { .. }) | Err(TlsError::Pem { .. })
        ));
        assert!(crl_from_bytes(Vec::new(), "crl").is_err());
    }
}
