//! Unit tests of the CA library: issue, identity, file modes, overwrite, revoke, CRL.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn new_ca() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), &InitOptions::default()).expect("init");
    (dir, ca)
}

fn der(pem: &str) -> Vec<u8> {
    let certs = razar_shared::tls::certificates(pem.as_bytes(), "test").expect("pem");
    certs[0].to_vec()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn agent_certificate_carries_host_id_and_stored_serial() {
    let (_tmp, mut ca) = new_ca();
    let issued = ca
        .issue_agent("gpu-01", &IssueOptions::days(30).expect("days"))
        .expect("issue");
    let cert = der(&issued.cert_pem);
    assert_eq!(
        razar_shared::tls::host_id_from_certificate(&cert).expect("host id"),
        "gpu-01"
    );
    assert!(razar_shared::tls::operator_from_certificate(&cert).is_err());
    assert_eq!(
        razar_shared::tls::certificate_serial_hex(&cert).expect("serial"),
        issued.serial
    );
    assert_eq!(issued.serial.len(), 32, "16 random bytes");
    assert_eq!(ca.entries().len(), 1);
    assert_eq!(ca.entries()[0].serial, issued.serial);
    assert_eq!(issued.cert_path, ca.dir().join("agents/gpu-01.pem"));
    assert_eq!(mode(&issued.key_path), 0o600);
    assert_eq!(mode(&ca.dir().join(CA_KEY_FILE)), 0o600);
}

#[test]
fn operator_and_collector_identities() {
    let (_tmp, mut ca) = new_ca();
    let options = IssueOptions::days(1).expect("days");
    let op = ca.issue_operator("alice", &options).expect("operator");
    assert_eq!(
        razar_shared::tls::operator_from_certificate(&der(&op.cert_pem)).expect("name"),
        "alice"
    );
    let collector = ca
        .issue_collector(&["collector.razar".into(), "127.0.0.1".into()], &options)
        .expect("collector");
    assert!(razar_shared::tls::host_id_from_certificate(&der(&collector.cert_pem)).is_err());
    assert_eq!(collector.cert_path, ca.dir().join("collector.pem"));
}

#[test]
fn serials_are_random_even_for_the_same_subject() {
    let (_tmp, mut ca) = new_ca();
    let mut options = IssueOptions::days(1).expect("days");
    let first = ca.issue_agent("h", &options).expect("first");
    options.force = true;
    let second = ca.issue_agent("h", &options).expect("second");
    assert_ne!(first.serial, second.serial);
    assert_eq!(ca.entries().len(), 2);
}

#[test]
fn refuses_to_overwrite_without_force() {
    let (_tmp, mut ca) = new_ca();
    let options = IssueOptions::days(1).expect("days");
    let first = ca.issue_agent("h", &options).expect("first");
    let err = ca
        .issue_agent("h", &options)
        .expect_err("second must be refused");
    assert!(matches!(err, CaError::Exists { .. }), "{err}");
    assert!(err.is_user_error());
    // Nothing changed on disk or in the index.
    assert_eq!(
        std::fs::read_to_string(&first.cert_path).expect("read"),
        first.cert_pem
    );
    assert_eq!(ca.entries().len(), 1);
    let err = Ca::init(ca.dir(), &InitOptions::default()).expect_err("second init");
    assert!(matches!(err, CaError::AlreadyInitialized { .. }), "{err}");
}

#[test]
fn force_replaces_key_keeping_mode_0600() {
    let (_tmp, mut ca) = new_ca();
    let mut options = IssueOptions::days(1).expect("days");
    let first = ca.issue_agent("h", &options).expect("first");
    options.force = true;
    let second = ca.issue_agent("h", &options).expect("second");
    assert_ne!(first.key_pem, second.key_pem);
    assert_eq!(
        std::fs::read_to_string(&second.key_path).expect("read"),
        second.key_pem
    );
    assert_eq!(mode(&second.key_path), 0o600);
}

#[test]
fn load_sees_what_init_and_issue_wrote() {
    let (_tmp, mut ca) = new_ca();
    let issued = ca
        .issue_agent("h", &IssueOptions::days(1).expect("days"))
        .expect("issue");
    let mut loaded = Ca::load(ca.dir()).expect("load");
    assert_eq!(loaded.entries(), ca.entries());
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    // The loaded CA signs, and the new certificate chains to the same CA name.
    let again = loaded
        .issue_agent("h2", &IssueOptions::days(1).expect("days"))
        .expect("issue after load");
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn load_of_an_empty_directory_is_a_user_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Ca::load(dir.path()).expect_err("no CA");
    assert!(matches!(err, CaError::NotInitialized { .. }), "{err}");
    assert!(err.is_user_error());
}

#[test]
fn revoke_and_crl() {
    let (_tmp, mut ca) = new_ca();
    let options = IssueOptions::days(1).expect("days");
    let hour = Duration::from_secs(3600);
    let a = ca.issue_agent("a", &options).expect("a");
    let b = ca.issue_agent("b", &options).expect("b");
    let first = ca.write_crl(hour).expect("crl");
    assert_eq!(first.number, 1);
    assert!(first.revoked.is_empty());

    // Upper case and colons are accepted; the revocation publishes its CRL.
    let spaced: Vec<String> = a
        .serial
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    let revocation = ca.revoke(&spaced.join(":"), hour).expect("revoke");
    assert_eq!(revocation.entry.serial, a.serial);
    let second = revocation.crl;
    assert_eq!(second.number, 2);
    assert_eq!(second.revoked, vec![a.serial.clone()]);
    assert!(razar_shared::tls::is_revoked(&second.der, &a.serial).expect("parse"));
    assert!(!razar_shared::tls::is_revoked(&second.der, &b.serial).expect("parse"));
    assert_eq!(std::fs::read(&second.der_path).expect("read"), second.der);
    let err = ca.revoke(&a.serial, hour).expect_err("twice");
    assert!(matches!(err, CaError::AlreadyRevoked { .. }), "{err}");
    let err = ca.revoke("0123", hour).expect_err("unknown");
    assert!(matches!(err, CaError::UnknownSerial { .. }), "{err}");
    let err = ca.revoke("xyz", hour).expect_err("not hex");
    assert!(matches!(err, CaError::InvalidSerial { .. }), "{err}");
    let err = ca
        .revoke(&b.serial, Duration::ZERO)
        .expect_err("no lifetime");
    assert!(matches!(err, CaError::InvalidValidity { .. }), "{err}");
    assert!(
        ca.entries()[1].revoked_at.is_none(),
        "a refused revoke changes nothing"
    );

    // Revoke by file, and the CRL number survives a reload.
    let by_file = ca.revoke_file(&b.cert_path, hour).expect("revoke file");
    assert_eq!(by_file.crl.number, 3);
    let mut loaded = Ca::load(ca.dir()).expect("load");
    let fourth = loaded.write_crl(Duration::from_secs(60)).expect("crl");
    assert_eq!(fourth.number, 4);
    assert_eq!(fourth.revoked.len(), 2);
}

/// Serials the index shows as revoked.
fn revoked_in_index(dir: &Path) -> Vec<String> {
    let index = Index::load(dir).expect("index");
    index
        .certificates
        .iter()
        .filter(|e| e.revoked_at.is_some())
        .map(|e| e.serial.clone())
        .collect()
}

/// Every serial revoked in the index is listed by both published CRL files.
fn assert_published_covers_index(dir: &Path, step: &str) {
    for file in [CRL_DER_FILE, CRL_PEM_FILE] {
        let bytes = std::fs::read(dir.join(file)).expect("read CRL");
        let der = razar_shared::tls::crl_from_bytes(bytes, file).expect("CRL");
        for serial in revoked_in_index(dir) {
            assert!(
                razar_shared::tls::is_revoked(&der, &serial).expect("parse"),
                "after {step}: {serial} is revoked in the index but missing from {file}"
            );
        }
    }
}

#[test]
fn an_interrupted_revoke_never_leaves_the_crl_behind_the_index() {
    let hour = Duration::from_secs(3600);
    for step in [PublishStep::DerWritten, PublishStep::PemWritten] {
        let (_tmp, mut ca) = new_ca();
        let options = IssueOptions::days(1).expect("days");
        let kept = ca.issue_agent("kept", &options).expect("kept");
        let gone = ca.issue_agent("gone", &options).expect("gone");
        ca.write_crl(hour).expect("first CRL");
        let dir = ca.dir().to_path_buf();

        ca.fail_after = Some(step);
        ca.revoke(&gone.serial, hour)
            .expect_err("interrupted revoke");
        assert_published_covers_index(&dir, &format!("{step:?}"));
        assert!(
            razar_shared::tls::is_revoked(
                &std::fs::read(dir.join(CRL_DER_FILE)).expect("der"),
                &gone.serial
            )
            .expect("parse"),
            "{step:?}: crl.der, written first, already lists the serial"
        );

        // A new process: `crl` adopts the published revocation and keeps it listed with a
        // CRL number past the published one.
        let mut again = Ca::load(&dir).expect("load");
        let listed = again.entries().iter().find(|e| e.serial == gone.serial);
        assert!(
            listed.is_some_and(|e| e.revoked_at.is_some()),
            "{step:?}: what `list` shows agrees with the published CRL"
        );
        let crl = again.write_crl(hour).expect("crl");
        assert_eq!(crl.revoked, vec![gone.serial.clone()], "{step:?}");
        assert_eq!(crl.number, 3, "{step:?}: number 2 was published already");
        assert_eq!(revoked_in_index(&dir), vec![gone.serial.clone()]);
        assert_published_covers_index(&dir, "crl after the interruption");

        // Running the revoke again completes it rather than refusing it.
        let (_tmp2, mut ca2) = new_ca();
        let other = ca2.issue_agent("x", &options).expect("x");
        ca2.write_crl(hour).expect("first CRL");
        ca2.fail_after = Some(step);
        ca2.revoke(&other.serial, hour).expect_err("interrupted");
        let mut rerun = Ca::load(ca2.dir()).expect("load");
        let done = rerun.revoke(&other.serial, hour).expect("rerun completes");
        assert_eq!(done.crl.revoked, vec![other.serial.clone()]);
        assert_published_covers_index(ca2.dir(), "the rerun");
        let err = rerun.revoke(&other.serial, hour).expect_err("now revoked");
        assert!(matches!(err, CaError::AlreadyRevoked { .. }), "{err}");
        assert!(!revoked_in_index(&dir).contains(&kept.serial));
    }
}

#[test]
fn expiring_lists_soonest_first_and_skips_revoked() {
    let (_tmp, mut ca) = new_ca();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let expired = ca
        .issue_agent(
            "old",
            &IssueOptions {
                validity: Validity::between(now - 10 * day, now - day),
                force: false,
            },
        )
        .expect("expired");
    let soon = ca
        .issue_agent("soon", &IssueOptions::days(10).expect("days"))
        .expect("soon");
    ca.issue_agent("later", &IssueOptions::days(90).expect("days"))
        .expect("later");
    let revoked = ca
        .issue_agent("gone", &IssueOptions::days(5).expect("days"))
        .expect("gone");
    ca.revoke(&revoked.serial, Duration::from_secs(60))
        .expect("revoke");

    let names = |list: Vec<&Entry>| list.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(ca.expiring(30 * day, now)), ["old", "soon"]);
    assert_eq!(names(ca.expiring(Duration::ZERO, now)), ["old"]);
    assert_eq!(ca.expiring(Duration::MAX, now).len(), 3);
    assert_eq!(expired.name, "old");
    assert_eq!(soon.name, "soon");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let (_tmp, mut ca) = new_ca();
    let options = IssueOptions::days(1).expect("days");
    for bad in ["", "../etc", "a/b", "-x", "with space"] {
        let err = ca.issue_agent(bad, &options).expect_err(bad);
        assert!(matches!(err, CaError::InvalidName { .. }), "{bad}: {err}");
        assert!(err.is_user_error());
    }
    for bad in ["", "a..b", "-a.com", "a_b.com", "é.com"] {
        let err = ca
            .issue_collector(&[bad.to_string()], &options)
            .expect_err(bad);
        assert!(
            matches!(err, CaError::InvalidDnsName { .. }),
            "{bad}: {err}"
        );
    }
    assert!(matches!(
        ca.issue_collector(&[], &options),
        Err(CaError::NoDnsNames)
    ));
    assert!(matches!(
        IssueOptions::days(0),
        Err(CaError::InvalidValidity { .. })
    ));
    let now = SystemTime::now();
    let backwards = IssueOptions {
        validity: Validity::between(now, now - Duration::from_secs(1)),
        force: false,
    };
    assert!(matches!(
        ca.issue_agent("h", &backwards),
        Err(CaError::InvalidValidity { .. })
    ));
    assert!(ca.entries().is_empty());
}

#[test]
fn concurrent_issuers_lose_no_index_entries() {
    let (_tmp, ca) = new_ca();
    let dir = ca.dir().to_path_buf();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Each thread has its own `Ca`, as separate processes would.
                let mut ca = Ca::load(&dir).expect("load");
                for i in 0..5 {
                    ca.issue_agent(&format!("h{t}-{i}"), &IssueOptions::days(1).expect("days"))
                        .expect("issue");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("issuer thread");
    }
    let loaded = Ca::load(&dir).expect("load");
    assert_eq!(loaded.entries().len(), 20);
}
