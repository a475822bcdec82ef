//! The `razar-collector` program as an operator meets it: `check` on a good and a bad
//! file. (Also makes `cargo test --workspace` build the binary, which the end-to-end
//! tests in `tests/` start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_razar-collector");

#[test]
fn check_names_the_file_the_line_the_key_and_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, "[engine]\nlock_key = 8242003352007737345\n").expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run razar-collector");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:2:", path.display());
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("engine.lock_key"), "{err}");
    assert!(err.contains("advisory lock key of compaction"), "{err}");
}

#[test]
fn an_unknown_subcommand_is_a_usage_error() {
    let out = Command::new(BIN)
        .arg("frobnicate")
        .output()
        .expect("run razar-collector");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!out.stderr.is_empty());
}
