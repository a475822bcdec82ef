//! A throwaway fleet CA per test: a real `razar_certs::Ca` in a temporary directory with a
//! collector certificate, plus agent certificates that are valid, expired, revoked or
//! from another CA, ready for `razar_shared::tls`.

use anyhow::Context;
use razar_certs::{Ca, InitOptions, IssueOptions, Issued, Validity};
use razar_shared::tls::{self, ClientTlsFiles, ServerTlsFiles};
use rustls::pki_types::CertificateRevocationListDer;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tempfile::TempDir;

/// DNS names on the test collector certificate.
pub const COLLECTOR_NAMES: [&str; 2] = ["localhost", "collector.razar"];
/// Validity of test certificates.
const DAYS: u32 = 2;
/// Lifetime of test CRLs.
const CRL_LIFETIME: Duration = Duration::from_secs(3600);

/// A fleet CA in a temporary directory (removed on drop), its collector certificate and an
/// initial, empty CRL, so revocation checking is on from the start as in production.
#[derive(Debug)]
pub struct TestCa {
    dir: TempDir,
    ca: Ca,
    collector: Issued,
    other: Option<Ca>,
    impostor: Option<Ca>,
}

impl TestCa {
    /// A new CA with a collector certificate for [`COLLECTOR_NAMES`] and an empty CRL.
    pub fn new() -> anyhow::Result<TestCa> {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().context("creating the CA's temporary directory")?;
        let mut ca = Ca::init(&dir.path().join("ca"), &InitOptions::default())?;
        let names: Vec<String> = COLLECTOR_NAMES.iter().map(|n| n.to_string()).collect();
        let collector = ca.issue_collector(&names, &IssueOptions::days(DAYS)?)?;
        ca.write_crl(CRL_LIFETIME)?;
        Ok(TestCa {
            dir,
            ca,
            collector,
            other: None,
            impostor: None,
        })
    }

    /// The CA directory (`ca.pem`, `agents/`, `crl.der`, ...).
    pub fn dir(&self) -> &Path {
        self.ca.dir()
    }

    /// The CA itself, for anything the helpers here do not cover.
    pub fn ca(&mut self) -> &mut Ca {
        &mut self.ca
    }

    /// The fleet CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Path of the fleet CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.ca.cert_path()
    }

    /// Path of the current CRL (DER).
    pub fn crl_path(&self) -> PathBuf {
        self.ca.crl_path()
    }

    /// The collector's certificate and key.
    pub fn collector(&self) -> &Issued {
        &self.collector
    }

    /// A valid agent certificate for `host` (URI SAN `razar://host/<host>`).
    pub fn agent(&mut self, host: &str) -> anyhow::Result<Issued> {
        Ok(self.ca.issue_agent(host, &IssueOptions::days(DAYS)?)?)
    }

    /// A valid operator certificate for `name`.
    pub fn operator(&mut self, name: &str) -> anyhow::Result<Issued> {
        Ok(self.ca.issue_operator(name, &IssueOptions::days(DAYS)?)?)
    }

    /// An agent certificate for `host` that expired a day ago (valid ten days ago).
    pub fn expired_agent(&mut self, host: &str) -> anyhow::Result<Issued> {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let validity = Validity::between(now - 10 * day, now - day);
        Ok(self.ca.issue_agent(
            host,
            &IssueOptions {
                validity,
                force: false,
            },
        )?)
    }

    /// An agent certificate for `host` from a different CA ("Other CA"): well formed,
    /// but not trusted by the fleet.
    pub fn other_ca_agent(&mut self, host: &str) -> anyhow::Result<Issued> {
        if self.other.is_none() {
            let options = InitOptions {
                common_name: "Other CA".into(),
                ..InitOptions::default()
            };
            self.other = Some(Ca::init(&self.dir.path().join("other-ca"), &options)?);
        }
        let other = self
            .other
            .as_mut()
            .context("the other CA was created just above")?;
        Ok(other.issue_agent(host, &IssueOptions::days(DAYS)?)?)
    }

    /// An agent certificate for `host` from an impostor CA that carries the fleet CA's
    /// name but another key: the issuer name matches, the signature does not.
    pub fn impostor_ca_agent(&mut self, host: &str) -> anyhow::Result<Issued> {
        if self.impostor.is_none() {
            let impostor = Ca::init(
                &self.dir.path().join("impostor-ca"),
                &InitOptions::default(),
            )?;
            self.impostor = Some(impostor);
        }
        let impostor = self
            .impostor
            .as_mut()
            .context("the impostor CA was created just above")?;
        Ok(impostor.issue_agent(host, &IssueOptions::days(DAYS)?)?)
    }

    /// Revokes a certificate of this CA and writes the new CRL; returns the CRL (DER).
    pub fn revoke(&mut self, issued: &Issued) -> anyhow::Result<Vec<u8>> {
        Ok(self.ca.revoke(&issued.serial, CRL_LIFETIME)?.crl.der)
    }

    /// The current CRL, as the server config takes it.
    pub fn crls(&self) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
        Ok(vec![tls::load_crl_file(&self.ca.crl_path())?])
    }

    /// The collector's TLS files, including the current CRL.
    pub fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            ca: self.ca.cert_path(),
            cert: self.collector.cert_path.clone(),
            key: self.collector.key_path.clone(),
            crls: vec![self.ca.crl_path()],
        }
    }

    /// An agent's TLS files (trusting this fleet CA).
    pub fn client_files(&self, agent: &Issued) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca.cert_path(),
            cert: agent.cert_path.clone(),
            key: agent.key_path.clone(),
        }
    }

    /// The collector's rustls config with the current CRL.
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        Ok(tls::server_config_from_files(&self.server_files())?)
    }

    /// An agent's rustls config presenting `agent` and trusting this fleet CA.
    pub fn client_config(&self, agent: &Issued) -> anyhow::Result<rustls::ClientConfig> {
        Ok(tls::client_config_from_files(&self.client_files(agent))?)
    }
}
