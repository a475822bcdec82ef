//! The control API is on a unix socket (mode 0660, root and `agent.control_group`), not on
//! the loopback port any local user can reach; the CLI finds the socket even when the
//! config file on disk no longer validates, and `reload` then reports the file's errors.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use support::*;

/// Runs the real CLI as `uid:gid` (root's own when `None`): (exit code, stdout, stderr).
fn cli_as(ids: Option<(u32, u32)>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid).env_clear();
    }
    let out = cmd.output().expect("run razar-agent cli");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_refuses_other_users_and_survives_a_broken_config() {
    let dir = Dir::new();
    // Other users may enter the directories: the socket's own mode must be what refuses.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let body = "[[component]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n";
    let config = dir.write_config(body);
    let mut agent = AgentProcess::spawn(&config);
    let socket = dir.join("data/control.sock");
    let pid = wait_for("web running", || {
        agent
            .component("web")
            .filter(|(state, _)| state == "ready")
            .and_then(|(_, pid)| pid)
    })
    .await;
    std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let meta = std::fs::metadata(&socket).expect("socket exists");
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());

    // The loopback port answers read-only routes only.
    let addr: std::net::SocketAddr = std::fs::read_to_string(dir.join("data/agent.addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (code, _) = http(addr, "POST", "/v1/components/web/stop", "").await;
    assert_eq!(code, 404);
    let (code, _) = http(addr, "GET", "/health", "").await;
    assert_eq!(code, 200);

    let socket_arg = socket.to_str().unwrap();
    if nix::unistd::getuid().is_root() {
        // An unprivileged user (nobody) cannot use the socket: refused, and says why.
        let (code, _, err) = cli_as(
            Some((65534, 65534)),
            &["stop", "web", "--socket", socket_arg],
        );
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("permission denied"), "{err}");
        let (code, _, err) = cli_as(Some((65534, 65534)), &["status", "--socket", socket_arg]);
        assert_eq!(code, 1, "{err}");
        assert_eq!(
            agent.component("web").and_then(|c| c.1),
            Some(pid),
            "web untouched"
        );
    }

    // Break the file on disk (a typo): the CLI still reaches the running agent.
    let broken = std::fs::read_to_string(&config)
        .unwrap()
        .replace("command = \"sleep\"", "comand = \"sleep\"");
    std::fs::write(&config, broken).unwrap();
    let (code, out, err) = agent.cli(&["status"]);
    assert_eq!(code, 0, "status with a broken config: {out}{err}");
    assert!(out.contains("web"), "{out}");
    // Root's CLI works: restart gives web a new pid.
    let (code, _, err) = agent.cli(&["restart", "web"]);
    assert_eq!(code, 0, "{err}");
    wait_for("web restarted", || {
        agent
            .component("web")
            .filter(|(state, p)| state == "ready" && *p != Some(pid))
    })
    .await;
    // Reload reports the file's errors from the agent's answer, exit 2.
    let (code, _, err) = agent.cli(&["reload"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("comand"), "the error names the bad key: {err}");
    // Even a file that is not TOML at all: the data_dir line is enough.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[[[ not toml")).unwrap();
    let (code, out, err) = agent.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(agent.terminate(), Some(0));
    assert!(!socket.exists(), "socket removed at exit");
}
