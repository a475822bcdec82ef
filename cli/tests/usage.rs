//! The `razar` program's exit codes without a collector: 2 for usage mistakes, 1 for a
//! server it cannot reach, each with a readable message. (Also makes `cargo test
//! --workspace` build the binary, which `tests/tests/operator.rs` runs against a live
//! collector.)

use std::net::TcpListener;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_razar");

fn razar(args: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().expect("tempdir");
    Command::new(BIN)
        .args(args)
        .env_remove("RAZAR_SERVER")
        .env_remove("RAZAR_TOKEN")
        .env_remove("RAZAR_CONFIG")
        .env("HOME", home.path())
        .output()
        .expect("run razar")
}

#[test]
fn a_usage_mistake_exits_2() {
    for args in [
        &["frobnicate"][..],
        &["hosts", "--output", "xml"],
        &["restart", "no-slash"],
    ] {
        let out = razar(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn an_unreachable_server_exits_1_and_says_so() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let out = razar(&["--server", &server, "--token", "x", "hosts"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("razar: "), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
