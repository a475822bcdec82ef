//! End-to-end tests of the `razar-certs` binary: every command run as a real process in
//! its own temporary CA directory, its files checked with `razar_shared::tls`.

use razar_shared::tls;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn razar_certs(dir: &Path, args: &[&str]) -> Run {
    let output: Output = Command::new(env!("CARGO_BIN_EXE_razar-certs"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env_remove("RAZAR_CA_DIR")
        .output()
        .expect("run razar-certs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a command that must succeed.
fn ok(dir: &Path, args: &[&str]) -> String {
    let run = razar_certs(dir, args);
    assert_eq!(
        run.code,
        Some(0),
        "razar-certs {args:?} failed\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    run.stdout
}

/// Runs a command that must fail as a user mistake: exit 2, one line on stderr.
fn user_error(dir: &Path, args: &[&str]) -> String {
    let run = razar_certs(dir, args);
    assert_eq!(
        run.code,
        Some(2),
        "razar-certs {args:?} must exit 2\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "razar-certs {args:?}: expected a one-line error, got {:?}",
        run.stderr
    );
    assert!(
        run.stderr.starts_with("razar-certs: error: "),
        "razar-certs {args:?}: {:?}",
        run.stderr
    );
    run.stderr
}

fn serial_in(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("serial"))
        .map(|rest| rest.trim().to_string())
        .expect("issue prints the serial")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn der_of(path: &Path) -> Vec<u8> {
    tls::certificates(&read(path), &path.display().to_string()).expect("certificate")[0].to_vec()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn ca_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    (tmp, dir)
}

#[test]
fn init_issue_revoke_crl_list_end_to_end() {
    let (_tmp, dir) = ca_dir();
    ok(&dir, &["init"]);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);

    let out = ok(
        &dir,
        &[
            "issue",
            "collector",
            "--dns",
            "localhost",
            "--dns",
            "collector.razar",
        ],
    );
    let collector_serial = serial_in(&out);
    let out = ok(
        &dir,
        &["issue", "agent", "--host", "gpu-01", "--days", "10"],
    );
    let agent_serial = serial_in(&out);
    let out = ok(&dir, &["issue", "operator", "--name", "alice"]);
    let operator_serial = serial_in(&out);
    ok(&dir, &["issue", "agent", "--host", "gpu-02"]);

    for key in [
        "collector.key",
        "agents/gpu-01.key",
        "agents/gpu-02.key",
        "operators/alice.key",
    ] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    let agent_der = der_of(&dir.join("agents/gpu-01.pem"));
    assert_eq!(
        tls::host_id_from_certificate(&agent_der).expect("host"),
        "gpu-01"
    );
    assert_eq!(
        tls::certificate_serial_hex(&agent_der).expect("serial"),
        agent_serial
    );
    assert_eq!(
        tls::operator_from_certificate(&der_of(&dir.join("operators/alice.pem"))).expect("name"),
        "alice"
    );
    assert_eq!(
        tls::certificate_serial_hex(&der_of(&dir.join("collector.pem"))).expect("serial"),
        collector_serial
    );
    let serials = [&collector_serial, &agent_serial, &operator_serial];
    assert_eq!(
        serials
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );

    // Revoke one by serial and one by file; each writes a new CRL.
    ok(&dir, &["revoke", &agent_serial]);
    let gpu02 = dir.join("agents/gpu-02.pem");
    let gpu02_serial = tls::certificate_serial_hex(&der_of(&gpu02)).expect("serial");
    ok(&dir, &["revoke", gpu02.to_str().expect("utf-8 path")]);
    ok(&dir, &["crl", "--next-update", "2d"]);

    let crl = read(&dir.join("crl.der"));
    assert!(tls::is_revoked(&crl, &agent_serial).expect("crl parses"));
    assert!(tls::is_revoked(&crl, &gpu02_serial).expect("crl parses"));
    assert!(!tls::is_revoked(&crl, &operator_serial).expect("crl parses"));

    // The CRL, in both encodings, is accepted by the collector's server config.
    for crl_file in ["crl.der", "crl.pem"] {
        let files = tls::ServerTlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("collector.pem"),
            key: dir.join("collector.key"),
            crls: vec![dir.join(crl_file)],
        };
        tls::server_config_from_files(&files)
            .unwrap_or_else(|e| panic!("server config with {crl_file}: {e}"));
    }
    // And the agent's files make a client config.
    tls::client_config_from_files(&tls::ClientTlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("agents/gpu-01.pem"),
        key: dir.join("agents/gpu-01.key"),
    })
    .expect("client config");

    // list shows everything; JSON carries the revocation.
    let table = ok(&dir, &["list"]);
    assert_eq!(
        table.lines().count(),
        5,
        "header + 4 certificates:\n{table}"
    );
    assert!(table.lines().next().is_some_and(|h| h.starts_with("KIND")));
    let json = ok(&dir, &["list", "-o", "json"]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
    assert_eq!(entries.len(), 4);
    let revoked: Vec<&str> = entries
        .iter()
        .filter(|e| !e["revoked_at"].is_null())
        .filter_map(|e| e["serial"].as_str())
        .collect();
    assert_eq!(revoked.len(), 2);
    assert!(revoked.contains(&agent_serial.as_str()));
}

#[test]
fn list_expiring_filters_by_not_after() {
    let (_tmp, dir) = ca_dir();
    ok(&dir, &["init"]);
    ok(&dir, &["issue", "agent", "--host", "soon", "--days", "5"]);
    ok(&dir, &["issue", "agent", "--host", "later", "--days", "90"]);
    ok(
        &dir,
        &["issue", "collector", "--dns", "c.example", "--days", "365"],
    );

    let names = |args: &[&str]| -> Vec<String> {
        let json = ok(&dir, args);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
        entries
            .iter()
            .filter_map(|e| e["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(
        names(&["list", "--expiring", "30d", "-o", "json"]),
        ["soon"]
    );
    assert_eq!(
        names(&["list", "--expiring", "100d", "-o", "json"]),
        ["soon", "later"]
    );
    assert!(names(&["list", "--expiring", "1d", "-o", "json"]).is_empty());
    let table = ok(&dir, &["list", "--expiring", "30d"]);
    assert!(
        table.contains("soon") && !table.contains("later"),
        "{table}"
    );
}

#[test]
fn refuses_to_overwrite_without_force() {
    let (_tmp, dir) = ca_dir();
    ok(&dir, &["init"]);
    let first = serial_in(&ok(&dir, &["issue", "agent", "--host", "h1"]));
    let cert_before = read(&dir.join("agents/h1.pem"));
    let key_before = read(&dir.join("agents/h1.key"));

    let message = user_error(&dir, &["issue", "agent", "--host", "h1"]);
    assert!(
        message.contains("h1.pem") && message.contains("--force"),
        "{message}"
    );
    assert_eq!(read(&dir.join("agents/h1.pem")), cert_before);
    assert_eq!(read(&dir.join("agents/h1.key")), key_before);

    let second = serial_in(&ok(&dir, &["issue", "agent", "--host", "h1", "--force"]));
    assert_ne!(first, second);
    assert_ne!(read(&dir.join("agents/h1.key")), key_before);
    assert_eq!(mode(&dir.join("agents/h1.key")), 0o600);

    let message = user_error(&dir, &["init"]);
    assert!(message.contains("ca.pem"), "{message}");
}

#[test]
fn user_mistakes_exit_2_with_one_line() {
    let (_tmp, dir) = ca_dir();
    // Before init.
    let message = user_error(&dir, &["issue", "agent", "--host", "h1"]);
    assert!(message.contains("init"), "{message}");
    user_error(&dir, &["list"]);

    ok(&dir, &["init"]);
    let message = user_error(&dir, &["issue", "agent", "--host", "../escape"]);
    assert!(message.contains("invalid name"), "{message}");
    assert!(!dir.join("escape.pem").exists());
    user_error(&dir, &["issue", "agent", "--host", "h", "--days", "0"]);
    user_error(&dir, &["issue", "collector", "--dns", "bad_name!"]);
    user_error(&dir, &["issue", "collector"]);
    user_error(&dir, &["issue", "agent"]);
    user_error(&dir, &["issue", "agent", "--host", "h", "--days", "many"]);
    user_error(&dir, &["frobnicate"]);
    let message = user_error(&dir, &["revoke", "deadbeef"]);
    assert!(message.contains("deadbeef"), "{message}");
    user_error(&dir, &["revoke", "not-hex"]);
    user_error(&dir, &["revoke", "./no/such/file.pem"]);
    let message = user_error(&dir, &["list", "--expiring", "30 days"]);
    assert!(message.contains("30 days"), "{message}");
    user_error(&dir, &["crl", "--next-update", "0d"]);
    // --dir may come before the subcommand too.
    let list = Command::new(env!("CARGO_BIN_EXE_razar-certs"))
        .arg("--dir")
        .arg(&dir)
        .arg("list")
        .env_remove("RAZAR_CA_DIR")
        .output()
        .expect("run");
    assert!(list.status.success());

    let serial = serial_in(&ok(&dir, &["issue", "agent", "--host", "h"]));
    ok(&dir, &["revoke", &serial]);
    let message = user_error(&dir, &["revoke", &serial]);
    assert!(message.contains("already revoked"), "{message}");
    // A file that is not a certificate.
    let message = user_error(
        &dir,
        &["revoke", dir.join("index.json").to_str().expect("utf-8")],
    );
    assert!(message.contains("index.json"), "{message}");
}

#[test]
fn missing_dir_is_a_user_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_razar-certs"))
        .arg("list")
        .env_remove("RAZAR_CA_DIR")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("RAZAR_CA_DIR"), "{stderr}");
}

#[test]
fn dir_can_come_from_the_environment() {
    let (_tmp, dir) = ca_dir();
    let status = Command::new(env!("CARGO_BIN_EXE_razar-certs"))
        .arg("init")
        .env("RAZAR_CA_DIR", &dir)
        .output()
        .expect("run");
    assert!(status.status.success());
    assert!(dir.join("ca.pem").exists());
}

#[test]
fn help_documents_the_file_layout() {
    let output = Command::new(env!("CARGO_BIN_EXE_razar-certs"))
        .arg("--help")
        .output()
        .expect("run");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in ["ca.pem", "agents/<host>.pem", "crl.der", "0600", "--force"] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
}
