//! Shared helpers for the agent's end-to-end tests: temp dirs, config files, waiting on
//! conditions with deadlines, and running the real `razar-agent` binary.

#![allow(dead_code)]

use razar_agent::config::Config;
use razar_agent::supervisor::component::ComponentStatus;
use razar_agent::supervisor::runtime::{Agent, AgentOptions};
use razar_shared::domain::ComponentState;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: the suite must pass on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    /// `[agent]` header pointing at this dir, then `body`.
    pub fn config_text(&self, body: &str) -> String {
        format!(
            "[agent]\nprofile = \"core\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/logs\"\nlisten = \"127.0.0.1:0\"\n\n{body}",
            d = self.path().display()
        )
    }
    pub fn write_config(&self, body: &str) -> PathBuf {
        let path = self.join("agent.toml");
        std::fs::write(&path, self.config_text(body)).expect("write config");
        path
    }
    pub fn config(&self, body: &str) -> Config {
        let path = self.write_config(body);
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Polls `check` until it returns `Some` or the deadline passes (then panics with `what`).
pub async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn status(agent: &Agent, name: &str) -> Option<ComponentStatus> {
    agent.statuses().get(name).cloned()
}

pub async fn wait_state(agent: &Agent, name: &str, state: ComponentState) -> ComponentStatus {
    wait_for(&format!("{name} to be {state}"), || {
        status(agent, name).filter(|s| s.state == state)
    })
    .await
}

pub async fn start(config: Config) -> Agent {
    Agent::start(
        config,
        AgentOptions {
            store: None,
            serve_http: false,
            listen: None,
        },
    )
    .await
    .expect("agent starts")
}

/// Whether `pid` names a live (non-zombie) process. Read as bytes: a process name cut
/// at 15 bytes may end inside a UTF-8 character.
pub fn alive(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .iter()
            .rposition(|&b| b == b')')
            .and_then(|close| stat.get(close + 2))
            .is_some_and(|state| *state != b'Z'),
        Err(_) => false,
    }
}

/// Live processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// The real binary, running `run --config`.
pub struct AgentProcess {
    pub child: Child,
    pub config: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_razar-agent")
}

impl AgentProcess {
    pub fn spawn(config: &Path) -> AgentProcess {
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn razar-agent");
        AgentProcess {
            child,
            config: config.to_path_buf(),
        }
    }

    /// Runs a CLI subcommand against this agent; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run razar-agent cli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `/health` as JSON, if the agent answers.
    pub fn health(&self) -> Option<serde_json::Value> {
        let (code, out, _) = self.cli(&["status", "--json"]);
        if code != 0 {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// (state, pid) of `name` from `/health`.
    pub fn component(&self, name: &str) -> Option<(String, Option<u64>)> {
        let health = self.health()?;
        let c = health["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)?
            .clone();
        Some((c["state"].as_str()?.to_lowercase(), c["pid"].as_u64()))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// One HTTP/1.1 request; returns (status, body). Test-only client (no chunked bodies).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    exchange(s, method, path, body).await
}

/// The same over the agent's unix control socket.
pub async fn http_unix(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    exchange(s, method, path, body).await
}

async fn exchange(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_owned())
}
