//! `razar-dev` (what `razar-collector dev` runs) end to end: the real binary as a
//! subprocess with the embedded PostgreSQL, an in-process agent, demo components and
//! fake GPUs. Health must report the agent connected and samples stored; SIGINT,
//! SIGHUP (a closed terminal) and SIGTERM must each leave nothing running; later runs
//! reuse the data dir. The first run shows, with nobody doing anything, the scenario's
//! GPU quarantine, its escalations and decisions with evidence. Each run prints the dashboard URL, an operator token that the API
//! accepts (the same on the second run, kept in a 0600 file of the data dir) and
//! ready-to-paste `razar` CLI lines.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every live pid whose command line contains `needle`.
fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if cmdline.contains(needle) && !zombie {
            found.push(pid);
        }
    }
    found
}

/// Descendants of `root` (children files of every thread), recursively.
fn descendants(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                for child in text.split_whitespace().filter_map(|c| c.parse().ok()) {
                    out.push(child);
                    todo.push(child);
                }
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_get(url: &str) -> Option<serde_json::Value> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    client.get(url).send().ok()?.json().ok()
}

/// What a dev run printed.
struct Banner {
    collector: String,
    agent: String,
    token: String,
    dashboard: String,
    cli_lines: Vec<String>,
}

fn run_dev(data_dir: &Path) -> (std::process::Child, Banner) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_razar-dev"))
        .args(["--data-dir"])
        .arg(data_dir)
        .args([
            "--http-port",
            "0",
            "--quic-port",
            "0",
            "--agent-port",
            "0",
            "--demo-port",
            "0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn razar-dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("dev: {line}");
            let trimmed = line.trim_start();
            if let Some(rest) = trimmed.strip_prefix("token:") {
                if let Some(token) = rest.split_whitespace().next() {
                    let _ = tx.send(("token", token.to_string()));
                }
            }
            if let Some(rest) = trimmed.strip_prefix("dashboard:") {
                let _ = tx.send(("dashboard", rest.trim().to_string()));
            }
            if trimmed.starts_with("RAZAR_SERVER=") {
                let _ = tx.send(("cli", trimmed.to_string()));
            }
            for url in line
                .split_whitespace()
                .filter(|w| w.starts_with("http://") && w.ends_with("/health"))
            {
                let _ = tx.send(("health", url.to_string()));
            }
        }
    });
    let mut urls = Vec::new();
    let (mut token, mut dashboard, mut cli_lines) = (String::new(), String::new(), Vec::new());
    while urls.len() < 2 {
        let (kind, value) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("dev mode printed its health URLs");
        match kind {
            "token" => token = value,
            "dashboard" => dashboard = value,
            "cli" => cli_lines.push(value),
            _ => urls.push(value),
        }
    }
    // The CLI lines follow the health URLs.
    while let Ok((kind, value)) = rx.recv_timeout(Duration::from_secs(5)) {
        if kind == "cli" {
            cli_lines.push(value);
        }
    }
    let collector = urls
        .iter()
        .find(|u| u.ends_with("/api/v1/health"))
        .expect("collector health URL")
        .clone();
    let agent = urls
        .iter()
        .find(|u| !u.ends_with("/api/v1/health"))
        .expect("agent health URL")
        .clone();
    (
        child,
        Banner {
            collector,
            agent,
            token,
            dashboard,
            cli_lines,
        },
    )
}

fn http_get_with_token(url: &str, token: &str) -> Option<serde_json::Value> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let response = client.get(url).bearer_auth(token).send().ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().ok()
}

/// Stops a dev process left running by a failed assertion, before its data dir goes.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let start = Instant::now();
        while matches!(self.0.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stop(child: &mut std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
        .expect("signal dev mode");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "dev mode exited with {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "dev mode did not stop within 60 s of {signal}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dev_mode_runs_everything_and_stops_cleanly_on_int_hup_and_term() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("razar-data");
    use nix::sys::signal::Signal;
    let mut first_token: Option<String> = None;
    for (round, signal) in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGTERM]
        .into_iter()
        .enumerate()
    {
        let (child, banner) = run_dev(&data_dir);
        let mut child = Guard(child);
        let (url, agent_url) = (banner.collector.clone(), banner.agent.clone());
        let base = url
            .strip_suffix("/api/v1/health")
            .expect("collector health URL")
            .to_owned();
        // The operator token: printed, kept (0600) in the data dir, the same each run,
        // in the dashboard link and the CLI lines.
        let token = banner.token.clone();
        assert!(token.starts_with("rzr_"), "round {round}: token {token:?}");
        if let Some(first) = &first_token {
            assert_eq!(
                &token, first,
                "round {round}: the second run keeps the token"
            );
        }
        first_token = Some(token.clone());
        let file = data_dir.join("operator.token");
        let kept = std::fs::read_to_string(&file).expect("the token file");
        assert_eq!(
            kept.trim(),
            token,
            "round {round}: the file keeps the printed token"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file)
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "round {round}: token file mode {mode:o}"
        );
        assert_eq!(
            banner.dashboard,
            format!("{base}/#token={token}"),
            "round {round}"
        );
        let hosts_line = banner
            .cli_lines
            .iter()
            .find(|l| l.ends_with(" razar hosts"))
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: no `razar hosts` line in {:?}",
                    banner.cli_lines
                )
            });
        assert_eq!(
            hosts_line,
            &format!("RAZAR_SERVER={base} RAZAR_TOKEN={token} razar hosts"),
            "round {round}"
        );
        let mut last = serde_json::Value::Null;
        // Samples stored by *this* run: the second round starts with the first's.
        let mut baseline: Option<u64> = None;
        wait_until(
            "agent connected and samples stored",
            Duration::from_secs(90),
            || {
                if let Some(h) = http_get(&url) {
                    last = h;
                }
                let stored = last["samples_stored"].as_u64();
                if baseline.is_none() && last["database"]["ok"] == true {
                    baseline = stored;
                }
                last["status"] == "ok"
                    && last["agents_connected"].as_i64() == Some(1)
                    && stored.unwrap_or(0) > baseline.unwrap_or(u64::MAX)
            },
        );
        assert_eq!(last["database"]["ok"], true, "round {round}: {last}");
        // The token works against the API: the dev host is listed.
        let mut hosts = serde_json::Value::Null;
        wait_until(
            "the dev host listed with the token",
            Duration::from_secs(30),
            || {
                if let Some(h) = http_get_with_token(&format!("{base}/api/v1/hosts"), &token) {
                    hosts = h;
                }
                hosts
                    .as_array()
                    .is_some_and(|l| l.iter().any(|h| h["host_id"] == "dev-host"))
            },
        );
        // The agent's own health shows the link to the collector.
        let mut agent_health = serde_json::Value::Null;
        wait_until(
            "the agent reporting its collector link",
            Duration::from_secs(30),
            || {
                if let Some(h) = http_get(&agent_url) {
                    agent_health = h;
                }
                agent_health["collector"] == "connected"
            },
        );
        // The three demo components run as our descendants (the agent starts them in
        // dependency order, so wait for the last one).
        let demo = |children: &[u32]| {
            children
                .iter()
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline"))
                        .map(|raw| raw.split(|b| *b == 0).any(|arg| arg == b"demo"))
                        .unwrap_or(false)
                })
                .count()
        };
        let mut children = Vec::new();
        wait_until(
            "the three demo components running",
            Duration::from_secs(60),
            || {
                children = descendants(child.0.id());
                demo(&children) >= 3
            },
        );
        if round == 0 {
            // Without anyone doing anything, the scenario's XID 79 on GPU 1 (at 45 s)
            // and the crash-looping component (given up after 5 quick failures) show a
            // quarantine, escalations and decisions with their evidence. About 100 s on
            // a quiet machine; the patience allows for a loaded one.
            let get = |path: &str| http_get_with_token(&format!("{base}{path}"), &token);
            wait_until(
                "the scenario's quarantine, escalations and decisions",
                Duration::from_secs(240),
                || {
                    let (Some(decisions), Some(escalations), Some(gpus)) = (
                        get("/api/v1/decisions"),
                        get("/api/v1/escalations"),
                        get("/api/v1/hosts/dev-host/gpus"),
                    ) else {
                        return false;
                    };
                    let decided = |rule: &str| {
                        decisions["decisions"].as_array().is_some_and(|l| {
                            l.iter().any(|d| {
                                d["rule"].as_str().is_some_and(|r| r.starts_with(rule))
                                    && d["evidence"]["events"]
                                        .as_array()
                                        .is_some_and(|e| !e.is_empty())
                            })
                        })
                    };
                    let open = |kind: &str| {
                        escalations["escalations"]
                            .as_array()
                            .is_some_and(|l| l.iter().any(|e| e["kind"] == kind))
                    };
                    let quarantined = gpus.as_array().is_some_and(|l| {
                        l.iter()
                            .any(|g| g["index"] == 1 && g["health_state"] == "quarantined")
                    });
                    decided("xid.")
                        && decided("component.failed")
                        && open("GpuFault")
                        && open("ComponentQuarantined")
                        && quarantined
                },
            );
        }
        let pg_dir = data_dir.join("postgres").display().to_string();
        assert!(
            !pids_with_cmdline(&pg_dir).is_empty(),
            "round {round}: the embedded PostgreSQL should run under {pg_dir}"
        );
        stop(&mut child.0, signal);
        wait_until(
            &format!("every component and PostgreSQL gone after {signal}"),
            Duration::from_secs(30),
            || children.iter().all(|p| !alive(*p)) && pids_with_cmdline(&pg_dir).is_empty(),
        );
    }
    // Later rounds reused the data dir: one CA, one cluster.
    assert!(data_dir.join("ca").join("ca.pem").exists());
    assert!(data_dir
        .join("postgres")
        .join("data")
        .join("PG_VERSION")
        .exists());
}
