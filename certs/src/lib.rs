//! Razar's private fleet CA: initialise it, issue collector, agent and operator
//! certificates, revoke them, publish a signed CRL and report what expires.
//!
//! The CA lives in one directory:
//!
//! ```text
//! DIR/ca.pem, DIR/ca.key                  fleet CA certificate and key (key mode 0600)
//! DIR/collector.pem, DIR/collector.key    collector certificate (serverAuth, DNS/IP SANs)
//! DIR/agents/<host>.pem, .key             agent certificates (clientAuth, URI razar://host/<host>)
//! DIR/operators/<name>.pem, .key          operator certificates (clientAuth, URI razar://operator/<name>)
//! DIR/crl.der, DIR/crl.pem                latest signed CRL
//! DIR/index.json                          every issued certificate: serial, kind, name, validity, revocation
//! DIR/.lock                               flock(2) held while the index changes
//! ```
//!
//! Serials are 16 random bytes (never derived from the key, so a renewal with the same key
//! never shares a serial), stored in the index, and printed as lower-case hex. Keys are
//! created with mode 0600 from the start; nothing is overwritten without `force`.
//!
//! [`Ca`] is the library API used by the `razar-certs` binary, by tests and by the
//! collector's development mode.
#![forbid(unsafe_code)]

mod error;
mod files;
mod index;
mod span;

pub use error::CaError;
pub use index::{Entry, Kind};
pub use span::parse_span;
/// Re-exported so callers can name [`Entry`]'s timestamps.
pub use time;

use index::Index;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// CA certificate file name inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Index file name inside the CA directory.
pub const INDEX_FILE: &str = "index.json";
/// CRL (DER) file name inside the CA directory.
pub const CRL_DER_FILE: &str = "crl.der";
/// CRL (PEM) file name inside the CA directory.
pub const CRL_PEM_FILE: &str = "crl.pem";

/// How far back a certificate's `notBefore` is set, to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Options for [`Ca::init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// The CA certificate's common name.
    pub common_name: String,
    /// CA certificate lifetime in days.
    pub days: u32,
    /// Replace an existing CA in the directory (its certificates stop being trusted).
    pub force: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            common_name: "Razar fleet CA".into(),
            days: 3650,
            force: false,
        }
    }
}

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from a few minutes ago (clock skew) for `days` days from now.
    pub fn days(days: u32) -> Result<Validity, CaError> {
        if days == 0 {
            return Err(CaError::InvalidValidity {
                reason: "--days must be at least 1".into(),
            });
        }
        let now = SystemTime::now();
        let not_after = now
            .checked_add(Duration::from_secs(u64::from(days) * 86_400))
            .ok_or_else(|| CaError::InvalidValidity {
                reason: format!("{days} days is too far in the future"),
            })?;
        Ok(Validity {
            not_before: now.checked_sub(BACKDATE).unwrap_or(now),
            not_after,
        })
    }

    /// An explicit period, e.g. an already expired one for tests.
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Validity {
        Validity {
            not_before,
            not_after,
        }
    }
}

/// Options for issuing one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueOptions {
    pub validity: Validity,
    /// Overwrite existing certificate and key files.
    pub force: bool,
}

impl IssueOptions {
    /// Valid for `days` days from now, refusing to overwrite.
    pub fn days(days: u32) -> Result<IssueOptions, CaError> {
        Ok(IssueOptions {
            validity: Validity::days(days)?,
            force: false,
        })
    }
}

/// What [`Ca::issue_agent`] and friends wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub kind: Kind,
    /// Host id, operator name, or "collector".
    pub name: String,
    /// Serial as lower-case hex (as `razar_shared::tls::certificate_serial_hex` prints it).
    pub serial: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// What [`Ca::write_crl`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlWritten {
    pub der_path: PathBuf,
    pub pem_path: PathBuf,
    pub der: Vec<u8>,
    /// The CRL number (increases by one with every CRL).
    pub number: u64,
    /// Serials listed as revoked.
    pub revoked: Vec<String>,
    pub next_update: SystemTime,
}

/// The fleet CA, loaded from its directory.
pub struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    index: Index,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("certificates", &self.index.certificates.len())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA in `dir` (created with mode 0700 if missing): a self-signed
    /// certificate with KeyCertSign and CrlSign, its key (mode 0600) and an empty index.
    pub fn init(dir: &Path, options: &InitOptions) -> Result<Ca, CaError> {
        validate_common_name(&options.common_name)?;
        let validity = Validity::days(options.days)?;
        files::create_dir(dir)?;
        let _lock = files::lock_dir(dir)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !options.force {
            for path in [&cert_path, &key_path] {
                if path.exists() {
                    return Err(CaError::AlreadyInitialized { path: path.clone() });
                }
            }
        }

        let key = KeyPair::generate().map_err(|source| CaError::Crypto {
            what: "generating the CA key",
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, options.common_name.as_str());
        name.push(DnType::OrganizationName, "Razar");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.not_before = whole_seconds(validity.not_before.into());
        params.not_after = whole_seconds(validity.not_after.into());
        let cert = params.self_signed(&key).map_err(|source| CaError::Crypto {
            what: "signing the CA certificate",
            source,
        })?;

        let cert_pem = cert.pem();
        files::write(
            &key_path,
            key.serialize_pem().as_bytes(),
            files::KEY_MODE,
            options.force,
        )?;
        files::write(
            &cert_path,
            cert_pem.as_bytes(),
            files::PUBLIC_MODE,
            options.force,
        )?;
        let index = Index::default();
        index.save(dir)?;
        for stale in [CRL_DER_FILE, CRL_PEM_FILE] {
            files::remove_if_exists(&dir.join(stale))?;
        }
        Ok(Ca {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            cert_pem,
            index,
        })
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() {
            return Err(CaError::NotInitialized {
                dir: dir.to_path_buf(),
            });
        }
        let cert_pem = files::read_string(&cert_path)?;
        let key_pem = files::read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::BadFile {
            path: key_path.clone(),
            reason: format!("not a private key: {source}"),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| CaError::BadFile {
                path: cert_path.clone(),
                reason: format!("not a CA certificate: {source}"),
            })?;
        let index = Index::load(dir)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            issuer,
            cert_pem,
            index,
        })
    }

    /// Takes the directory lock and re-reads the index, so a change made by another
    /// process since [`Ca::load`] is kept. Hold the guard until the index is saved.
    fn lock(&mut self) -> Result<files::DirLock, CaError> {
        let lock = files::lock_dir(&self.dir)?;
        self.index = Index::load(&self.dir)?;
        Ok(lock)
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate (PEM).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA certificate (PEM), the trust anchor for agents and collector.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Path of the latest CRL (DER), whether or not one has been written yet.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_DER_FILE)
    }

    /// Every certificate issued, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.index.certificates
    }

    /// The absolute path of an entry's file (the index stores paths relative to the CA).
    pub fn path_of(&self, relative: &Path) -> PathBuf {
        self.dir.join(relative)
    }

    /// Unrevoked certificates whose `notAfter` is before `now + within` (expired ones
    /// included), soonest first.
    pub fn expiring(&self, within: Duration, now: SystemTime) -> Vec<&Entry> {
        // A span too long to represent covers every certificate.
        let limit = time::Duration::try_from(within)
            .ok()
            .and_then(|span| OffsetDateTime::from(now).checked_add(span));
        let mut list: Vec<&Entry> = self
            .index
            .certificates
            .iter()
            .filter(|e| e.revoked_at.is_none() && limit.is_none_or(|limit| e.not_after <= limit))
            .collect();
        list.sort_by_key(|e| e.not_after);
        list
    }

    /// Issues the collector's server certificate for `dns` (DNS names or IP addresses) to
    /// `DIR/collector.pem` and `DIR/collector.key`.
    pub fn issue_collector(
        &mut self,
        dns: &[String],
        options: &IssueOptions,
    ) -> Result<Issued, CaError> {
        if dns.is_empty() {
            return Err(CaError::NoDnsNames);
        }
        let mut sans = Vec::with_capacity(dns.len());
        for name in dns {
            sans.push(collector_san(name)?);
        }
        self.issue(Subject {
            kind: Kind::Collector,
            name: "collector".into(),
            common_name: dns[0].clone(),
            dns: dns.to_vec(),
            sans,
            eku: ExtendedKeyUsagePurpose::ServerAuth,
            cert_rel: PathBuf::from("collector.pem"),
            key_rel: PathBuf::from("collector.key"),
            options: *options,
        })
    }

    /// Issues an agent certificate for `host` (URI SAN `razar://host/<host>`, clientAuth) to
    /// `DIR/agents/<host>.pem` and `.key`.
    pub fn issue_agent(&mut self, host: &str, options: &IssueOptions) -> Result<Issued, CaError> {
        validate_name(host)?;
        let uri = format!("{}{host}", razar_shared::tls::HOST_URI_PREFIX);
        self.issue(Subject {
            kind: Kind::Agent,
            name: host.into(),
            common_name: host.into(),
            dns: Vec::new(),
            sans: vec![uri_san(&uri)?],
            eku: ExtendedKeyUsagePurpose::ClientAuth,
            cert_rel: Path::new("agents").join(format!("{host}.pem")),
            key_rel: Path::new("agents").join(format!("{host}.key")),
            options: *options,
        })
    }

    /// Issues an operator certificate for `name` (URI SAN `razar://operator/<name>`,
    /// clientAuth) to `DIR/operators/<name>.pem` and `.key`.
    pub fn issue_operator(
        &mut self,
        name: &str,
        options: &IssueOptions,
    ) -> Result<Issued, CaError> {
        validate_name(name)?;
        let uri = format!("{}{name}", razar_shared::tls::OPERATOR_URI_PREFIX);
        self.issue(Subject {
            kind: Kind::Operator,
            name: name.into(),
            common_name: name.into(),
            dns: Vec::new(),
            sans: vec![uri_san(&uri)?],
            eku: ExtendedKeyUsagePurpose::ClientAuth,
            cert_rel: Path::new("operators").join(format!("{name}.pem")),
            key_rel: Path::new("operators").join(format!("{name}.key")),
            options: *options,
        })
    }

    fn issue(&mut self, subject: Subject) -> Result<Issued, CaError> {
        let not_before = whole_seconds(subject.options.validity.not_before.into());
        let not_after = whole_seconds(subject.options.validity.not_after.into());
        if not_after <= not_before {
            return Err(CaError::InvalidValidity {
                reason: "notAfter must be later than notBefore".into(),
            });
        }
        let _lock = self.lock()?;
        let cert_path = self.dir.join(&subject.cert_rel);
        let key_path = self.dir.join(&subject.key_rel);
        if !subject.options.force {
            for path in [&cert_path, &key_path] {
                if path.exists() {
                    return Err(CaError::Exists { path: path.clone() });
                }
            }
        }

        let serial = self.unused_serial();
        let key = KeyPair::generate().map_err(|source| CaError::Crypto {
            what: "generating a key",
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name.as_str());
        dn.push(DnType::OrganizationName, "Razar");
        params.distinguished_name = dn;
        params.subject_alt_names = subject.sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![subject.eku];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Crypto {
                what: "signing the certificate",
                source,
            })?;

        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        for path in [&cert_path, &key_path] {
            if let Some(parent) = path.parent() {
                files::create_dir(parent)?;
            }
        }
        files::write(
            &key_path,
            key_pem.as_bytes(),
            files::KEY_MODE,
            subject.options.force,
        )?;
        files::write(
            &cert_path,
            cert_pem.as_bytes(),
            files::PUBLIC_MODE,
            subject.options.force,
        )?;

        let serial_hex = razar_shared::tls::serial_hex(&serial);
        self.index.certificates.push(Entry {
            serial: serial_hex.clone(),
            kind: subject.kind,
            name: subject.name.clone(),
            dns: subject.dns,
            not_before,
            not_after,
            revoked_at: None,
            cert_path: subject.cert_rel,
            key_path: subject.key_rel,
        });
        self.index.save(&self.dir)?;
        Ok(Issued {
            kind: subject.kind,
            name: subject.name,
            serial: serial_hex,
            cert_path,
            key_path,
            cert_pem,
            key_pem,
            not_after: not_after.into(),
        })
    }

    fn unused_serial(&self) -> [u8; 16] {
        loop {
            let serial = random_serial();
            let hex = razar_shared::tls::serial_hex(&serial);
            if self.index.certificates.iter().all(|e| e.serial != hex) {
                return serial;
            }
        }
    }

    /// Marks the certificate with this serial (hex, optional `0x`, `:` separators and
    /// upper case accepted) revoked. Write a CRL afterwards ([`Ca::write_crl`]).
    pub fn revoke(&mut self, serial: &str) -> Result<Entry, CaError> {
        let wanted = normalize_serial(serial)?;
        let _lock = self.lock()?;
        let now = whole_seconds(OffsetDateTime::now_utc());
        let entry = self
            .index
            .certificates
            .iter_mut()
            .find(|e| e.serial == wanted)
            .ok_or_else(|| CaError::UnknownSerial {
                serial: wanted.clone(),
            })?;
        if let Some(at) = entry.revoked_at {
            return Err(CaError::AlreadyRevoked { serial: wanted, at });
        }
        entry.revoked_at = Some(now);
        let revoked = entry.clone();
        self.index.save(&self.dir)?;
        Ok(revoked)
    }

    /// Revokes the certificate in a PEM file (its serial must be in the index).
    pub fn revoke_file(&mut self, cert: &Path) -> Result<Entry, CaError> {
        let pem = files::read(cert)?;
        let der = razar_shared::tls::certificates(&pem, &cert.display().to_string())
            .map_err(|source| CaError::BadCertificate { source })?;
        let serial = razar_shared::tls::certificate_serial_hex(&der[0])
            .map_err(|source| CaError::BadCertificate { source })?;
        self.revoke(&serial)
    }

    /// Signs a CRL listing every revoked certificate, valid until `now + next_update`,
    /// with the next CRL number, and writes it to `DIR/crl.der` and `DIR/crl.pem`.
    pub fn write_crl(&mut self, next_update: Duration) -> Result<CrlWritten, CaError> {
        if next_update.is_zero() {
            return Err(CaError::InvalidValidity {
                reason: "the CRL's next update must be in the future".into(),
            });
        }
        let now = whole_seconds(OffsetDateTime::now_utc());
        let next = now
            .checked_add(time::Duration::try_from(next_update).map_err(|_| {
                CaError::InvalidValidity {
                    reason: "the CRL's next update is too far in the future".into(),
                }
            })?)
            .ok_or_else(|| CaError::InvalidValidity {
                reason: "the CRL's next update is too far in the future".into(),
            })?;
        let _lock = self.lock()?;
        let number = self.index.crl_number + 1;
        let mut revoked_certs = Vec::new();
        let mut revoked = Vec::new();
        for entry in &self.index.certificates {
            if let Some(at) = entry.revoked_at {
                let bytes = hex::decode(&entry.serial).map_err(|_| CaError::BadFile {
                    path: self.dir.join(INDEX_FILE),
                    reason: format!("serial {:?} is not hex", entry.serial),
                })?;
                revoked_certs.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: at,
                    reason_code: None,
                    invalidity_date: None,
                });
                revoked.push(entry.serial.clone());
            }
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: next,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|source| CaError::Crypto {
                what: "signing the CRL",
                source,
            })?;
        let pem = crl.pem().map_err(|source| CaError::Crypto {
            what: "encoding the CRL as PEM",
            source,
        })?;
        let der = crl.der().to_vec();
        let der_path = self.dir.join(CRL_DER_FILE);
        let pem_path = self.dir.join(CRL_PEM_FILE);
        files::write(&der_path, &der, files::PUBLIC_MODE, true)?;
        files::write(&pem_path, pem.as_bytes(), files::PUBLIC_MODE, true)?;
        self.index.crl_number = number;
        self.index.save(&self.dir)?;
        Ok(CrlWritten {
            der_path,
            pem_path,
            der,
            number,
            revoked,
            next_update: next.into(),
        })
    }
}

struct Subject {
    kind: Kind,
    name: String,
    common_name: String,
    dns: Vec<String>,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    cert_rel: PathBuf,
    key_rel: PathBuf,
    options: IssueOptions,
}

/// Certificates and CRLs carry whole seconds; so does the index.
fn whole_seconds(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(0).unwrap_or(at)
}

/// 16 random bytes, positive and without a leading zero byte, so the DER encoding is
/// exactly these bytes and the hex form is the same everywhere.
fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f).max(1);
    serial
}

fn validate_name(name: &str) -> Result<(), CaError> {
    razar_shared::tls::validate_name(name).map_err(|reason| CaError::InvalidName {
        name: name.into(),
        reason,
    })
}

fn validate_common_name(name: &str) -> Result<(), CaError> {
    if name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(CaError::InvalidName {
            name: name.into(),
            reason: "a CA name must be 1 to 64 printable characters",
        });
    }
    Ok(())
}

fn uri_san(uri: &str) -> Result<SanType, CaError> {
    let value = uri.try_into().map_err(|_| CaError::InvalidName {
        name: uri.into(),
        reason: "not an ASCII URI",
    })?;
    Ok(SanType::URI(value))
}

fn collector_san(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = |reason| CaError::InvalidDnsName {
        name: name.into(),
        reason,
    };
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.is_empty() || name.len() > 253 {
        return Err(invalid("must be 1 to 253 characters"));
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid("each label must be 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(invalid(
                "only letters, digits and '-' are allowed in a label",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a label cannot start or end with '-'"));
        }
    }
    let value = name.try_into().map_err(|_| invalid("not ASCII"))?;
    Ok(SanType::DnsName(value))
}

/// Lower-case hex without separators or leading zero bytes, from what a user typed.
fn normalize_serial(input: &str) -> Result<String, CaError> {
    let trimmed = input.trim();
    let trimmed = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    let digits: String = trimmed.chars().filter(|c| *c != ':').collect();
    let invalid = || CaError::InvalidSerial {
        input: input.into(),
    };
    if digits.is_empty() || digits.len() > 42 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = hex::decode(padded).map_err(|_| invalid())?;
    Ok(razar_shared::tls::serial_hex(&bytes))
}

#[cfg(test)]
mod tests;
