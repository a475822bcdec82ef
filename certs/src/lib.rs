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

/// What [`Ca::revoke`] did: the revoked entry and the CRL published with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub entry: Entry,
    pub crl: CrlWritten,
}

/// The fleet CA, loaded from its directory.
pub struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    index: Index,
    /// Tests: stop the next CRL publication after this step.
    #[cfg(test)]
    fail_after: Option<PublishStep>,
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
            #[cfg(test)]
            fail_after: None,
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
        let mut ca = Ca {
            dir: dir.to_path_buf(),
            issuer,
            cert_pem,
            index,
            #[cfg(test)]
            fail_after: None,
        };
        // What `list` shows agrees with the published CRL even after an interrupted
        // revoke (in memory; the next change saves it).
        ca.adopt_published_revocations();
        Ok(ca)
    }

    /// Takes the directory lock and re-reads the index, so a change made by another
    /// process since [`Ca::load`] is kept, adopting revocations that a published CRL
    /// lists but the index misses (returned). Hold the guard until the index is saved.
    fn lock(&mut self) -> Result<(files::DirLock, Vec<String>), CaError> {
        let lock = files::lock_dir(&self.dir)?;
        self.index = Index::load(&self.dir)?;
        let adopted = self.adopt_published_revocations();
        Ok((lock, adopted))
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
        let (_lock, _adopted) = self.lock()?;
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

    /// Revokes the certificate with this serial (hex, optional `0x`, `:` separators and
    /// upper case accepted) and publishes a new CRL listing it, valid for `next_update`.
    ///
    /// The order makes an interruption at any point safe: the CRL (`crl.der`, then
    /// `crl.pem`, each written to a temporary file, synced and renamed) is published
    /// first, and only then does the index record the revocation. A revoke cut short
    /// between the two leaves a CRL that already lists the serial; the next command that
    /// changes the CA adopts it into the index (running `revoke` again completes it).
    pub fn revoke(&mut self, serial: &str, next_update: Duration) -> Result<Revocation, CaError> {
        let wanted = normalize_serial(serial)?;
        let times = crl_times(next_update)?;
        let (_lock, adopted) = self.lock()?;
        let mut index = self.index.clone();
        let entry = index
            .certificates
            .iter_mut()
            .find(|e| e.serial == wanted)
            .ok_or_else(|| CaError::UnknownSerial {
                serial: wanted.clone(),
            })?;
        match entry.revoked_at {
            // Revoked by an interrupted `revoke` whose CRL was published: finish it.
            Some(_) if adopted.contains(&wanted) => {}
            Some(at) => return Err(CaError::AlreadyRevoked { serial: wanted, at }),
            None => entry.revoked_at = Some(times.0),
        }
        let entry = entry.clone();
        let crl = self.publish(index, times)?;
        Ok(Revocation { entry, crl })
    }

    /// Revokes the certificate in a PEM file (its serial must be in the index) and
    /// publishes a new CRL, as [`Ca::revoke`].
    pub fn revoke_file(
        &mut self,
        cert: &Path,
        next_update: Duration,
    ) -> Result<Revocation, CaError> {
        let pem = files::read(cert)?;
        let der = razar_shared::tls::certificates(&pem, &cert.display().to_string())
            .map_err(|source| CaError::BadCertificate { source })?;
        let serial = razar_shared::tls::certificate_serial_hex(&der[0])
            .map_err(|source| CaError::BadCertificate { source })?;
        self.revoke(&serial, next_update)
    }

    /// Signs a CRL listing every revoked certificate, valid until `now + next_update`,
    /// with the next CRL number, and writes it to `DIR/crl.der` and `DIR/crl.pem`.
    /// Revocations found in an already published CRL but missing from the index (an
    /// interrupted revoke) are adopted first, so they stay listed.
    pub fn write_crl(&mut self, next_update: Duration) -> Result<CrlWritten, CaError> {
        let times = crl_times(next_update)?;
        let (_lock, _adopted) = self.lock()?;
        let index = self.index.clone();
        self.publish(index, times)
    }

    /// Publishes a CRL made from `index` (the index as it will be), then saves `index`.
    /// Call with the directory lock held.
    fn publish(
        &mut self,
        mut index: Index,
        (now, next): (OffsetDateTime, OffsetDateTime),
    ) -> Result<CrlWritten, CaError> {
        let number = index.crl_number + 1;
        let mut revoked_certs = Vec::new();
        let mut revoked = Vec::new();
        for entry in &index.certificates {
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
        // The CRL first, the index last: the index never records a revocation that a
        // published CRL does not list.
        files::write(&der_path, &der, files::PUBLIC_MODE, true)?;
        self.failpoint(PublishStep::DerWritten)?;
        files::write(&pem_path, pem.as_bytes(), files::PUBLIC_MODE, true)?;
        self.failpoint(PublishStep::PemWritten)?;
        index.crl_number = number;
        index.save(&self.dir)?;
        self.index = index;
        Ok(CrlWritten {
            der_path,
            pem_path,
            der,
            number,
            revoked,
            next_update: next.into(),
        })
    }

    /// Revocations listed in the published CRLs (`crl.der`, `crl.pem`) of certificates
    /// the index still shows as valid: what an interrupted revoke leaves. Marks them
    /// revoked in `self.index` (in memory) with the CRL's revocation time, moves the CRL
    /// number past the published one, and returns their serials.
    fn adopt_published_revocations(&mut self) -> Vec<String> {
        let mut adopted = Vec::new();
        let subject = razar_shared::tls::certificates(self.cert_pem.as_bytes(), CA_CERT_FILE)
            .ok()
            .and_then(|certs| certs.into_iter().next());
        let Some(subject) = subject else {
            return adopted;
        };
        let Ok((_, ca_cert)) = x509_parser::parse_x509_certificate(&subject) else {
            return adopted;
        };
        for file in [CRL_DER_FILE, CRL_PEM_FILE] {
            // A missing or unreadable CRL has nothing to adopt; the next one replaces it.
            let Ok(bytes) = std::fs::read(self.dir.join(file)) else {
                continue;
            };
            let Ok(der) = razar_shared::tls::crl_from_bytes(bytes, file) else {
                continue;
            };
            let Ok((_, crl)) = x509_parser::parse_x509_crl(&der) else {
                continue;
            };
            if crl.issuer().as_raw() != ca_cert.subject().as_raw() {
                continue;
            }
            if let Some(number) = crl.crl_number().and_then(|n| u64::try_from(n.clone()).ok()) {
                self.index.crl_number = self.index.crl_number.max(number);
            }
            for listed in crl.iter_revoked_certificates() {
                let serial = razar_shared::tls::serial_hex(listed.raw_serial());
                let entry = self
                    .index
                    .certificates
                    .iter_mut()
                    .find(|e| e.serial == serial && e.revoked_at.is_none());
                if let Some(entry) = entry {
                    entry.revoked_at = Some(listed.revocation_date.to_datetime());
                    adopted.push(serial);
                }
            }
        }
        adopted
    }

    #[cfg(not(test))]
    fn failpoint(&self, _step: PublishStep) -> Result<(), CaError> {
        Ok(())
    }

    /// Tests stop a publication after `step` as a crash there would.
    #[cfg(test)]
    fn failpoint(&self, step: PublishStep) -> Result<(), CaError> {
        if self.fail_after == Some(step) {
            return Err(CaError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(format!("simulated interruption after {step:?}")),
            });
        }
        Ok(())
    }
}

/// Steps of a CRL publication where a test can interrupt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublishStep {
    DerWritten,
    PemWritten,
}

/// `(this_update, next_update)` of a CRL published now and valid for `next_update`.
fn crl_times(next_update: Duration) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    if next_update.is_zero() {
        return Err(CaError::InvalidValidity {
            reason: "the CRL's next update must be in the future".into(),
        });
    }
    let too_far = || CaError::InvalidValidity {
        reason: "the CRL's next update is too far in the future".into(),
    };
    let now = whole_seconds(OffsetDateTime::now_utc());
    let span = time::Duration::try_from(next_update).map_err(|_| too_far())?;
    let next = now.checked_add(span).ok_or_else(too_far)?;
    Ok((now, next))
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
