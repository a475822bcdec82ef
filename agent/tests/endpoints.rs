//! The local endpoints and the configurable runbook steps, end to end: `/health`,
//! `/metrics` (checked by `promtool` when installed), control routes, the give-up hook,
//! the recovery action, on-demand components, watched processes, memory budgets, SIGHUP.

mod support;

use razar_agent::supervisor::machine::Control;
use razar_agent::supervisor::runtime::{Agent, AgentOptions};
use razar_shared::domain::ComponentState::*;
use razar_shared::protocol::EventKind;
use std::time::Duration;
use support::*;

fn sh(script: &str) -> String {
    format!("command = \"sh\"\nargs = [\"-c\", {script:?}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_control_routes() {
    let dir = Dir::new();
    let config = dir.config(&format!(
        "[[component]]\nname = \"web\"\n{}\n[[watch]]\nname = \"me\"\nmatch_cmdline = \"no-such-process-razar-test\"\n",
        sh("exec sleep 1000")
    ));
    let config = razar_agent::config::Config {
        agent: razar_agent::config::AgentSettings {
            sample_interval: Duration::from_millis(100),
            ..config.agent.clone()
        },
        ..config
    };
    let hash = config.hash.clone();
    let agent = Agent::start(
        config,
        AgentOptions {
            store: None,
            serve_http: true,
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
    )
    .await
    .unwrap();
    let addr = agent.local_addr().unwrap();
    assert!(addr.ip().is_loopback());
    wait_state(&agent, "web", Ready).await;

    let (code, body) = http(addr, "GET", "/health", "").await;
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["config_hash"], hash.as_str());
    assert_eq!(health["collector"], "disconnected");
    assert_eq!(health["components_by_state"]["ready"], 1);
    assert_eq!(health["components"][0]["state"], "ready");

    // Wait for a resource sample, then check the exposition.
    wait_for("a resource sample", || {
        agent
            .usage()
            .get("web")
            .filter(|u| u.rss_bytes > 0)
            .copied()
    })
    .await;
    let (code, metrics) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    for name in [
        "razar_component_state{component=\"web\",state=\"ready\"} 1",
        "razar_process_resident_memory_bytes{kind=\"component\",target=\"web\"}",
        "razar_process_processes{kind=\"watch\",target=\"me\"} 0",
        "razar_events_total{kind=\"state_changed\"}",
        "razar_agent_build_info{version=",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    check_exposition(&metrics);

    // The loopback port is read-only: no control route answers there.
    let (code, _) = http(addr, "POST", "/v1/components/web/restart", "").await;
    assert_eq!(code, 404, "control routes are not on the TCP port");
    let (code, _) = http(addr, "POST", "/v1/reload", "").await;
    assert_eq!(code, 404, "reload is not on the TCP port");
    let (code, _) = http(addr, "GET", "/v1/components", "").await;
    assert_eq!(code, 200);
    let socket = agent
        .control_socket()
        .expect("control socket")
        .to_path_buf();
    let (code, _) = http_unix(&socket, "POST", "/v1/components/web/restart", "").await;
    assert_eq!(code, 200);
    let (code, body) = http_unix(&socket, "POST", "/v1/components/nope/restart", "").await;
    assert_eq!((code, body.contains("unknown_component")), (404, true));
    let (code, body) = http_unix(
        &socket,
        "POST",
        "/v1/components/web/resolve",
        "{\"note\":\"\"}",
    )
    .await;
    assert_eq!((code, body.contains("note_required")), (400, true));
    let (code, body) = http_unix(
        &socket,
        "POST",
        "/v1/components/web/resolve",
        "{\"note\":\"x\"}",
    )
    .await;
    assert_eq!((code, body.contains("refused")), (409, true), "{body}");
    let (code, _) = http_unix(&socket, "POST", "/v1/components/web/resolve", "not json").await;
    assert_eq!(code, 400);
    agent.shutdown().await;
    // The endpoint closes with the agent.
    wait_for("endpoint closed", || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    })
    .await;
}

/// `promtool check metrics` when installed (Debian package `prometheus`); otherwise a
/// line-shape check of the text format.
fn check_exposition(text: &str) {
    use std::io::Write;
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .expect("promtool stdin")
                .write_all(text.as_bytes())
                .expect("write to promtool");
            let out = child.wait_with_output().expect("promtool output");
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => {
            for line in text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
            {
                let (series, value) = line.rsplit_once(' ').expect("series value");
                assert!(series.starts_with("razar_"), "{line}");
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_up_hook_gets_context_on_stdin_and_recovery_runs_before_restarts() {
    let dir = Dir::new();
    let ctx = dir.join("context.json");
    let rec = dir.join("recovery.log");
    let config = dir.config(&format!(
        "[[component]]\nname = \"h\"\n{}\ngive_up_hook = [\"sh\", \"-c\", \"cat > {}\"]\nrecovery_action = [\"sh\", \"-c\", \"echo flushed >> {}\"]\n[component.restart]\ninitial_backoff = \"10ms\"\n[component.give_up]\nmax_failures = 3\n",
        sh("exit 7"),
        ctx.display(),
        rec.display()
    ));
    let agent = start(config).await;
    wait_state(&agent, "h", Quarantined).await;
    // The hook ran before the quarantine, so its file is complete now.
    let context: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ctx).unwrap()).unwrap();
    assert_eq!(context["component"], "h");
    assert_eq!(context["failures"], 3);
    assert_eq!(context["last_exit_code"], 7);
    // Two restarts before giving up, each preceded by the recovery action.
    assert_eq!(std::fs::read_to_string(&rec).unwrap().lines().count(), 2);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_component_starts_only_on_command() {
    let dir = Dir::new();
    let config = dir.config(&format!(
        "[[component]]\nname = \"job\"\nautostart = false\n{}\n",
        sh("exec sleep 1000")
    ));
    let agent = start(config).await;
    let s = wait_state(&agent, "job", Stopped).await;
    assert_eq!(s.pid, None);
    agent.command("job", Control::Start).await.unwrap();
    let s = wait_state(&agent, "job", Ready).await;
    assert!(alive(s.pid.unwrap()));
    agent.shutdown().await;
    assert!(!alive(s.pid.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_processes_are_sampled_and_memory_budget_is_an_event() {
    let dir = Dir::new();
    let mut outsider = std::process::Command::new("sleep")
        .arg("999.77")
        .spawn()
        .unwrap();
    let config = dir.config(&format!(
        "[[component]]\nname = \"fat\"\n{}\nmemory_budget = \"4KiB\"\n[[watch]]\nname = \"outsider\"\nmatch_cmdline = \"sleep 999.77\"\n",
        sh("exec sleep 1000")
    ));
    let config = razar_agent::config::Config {
        agent: razar_agent::config::AgentSettings {
            sample_interval: Duration::from_millis(100),
            ..config.agent.clone()
        },
        ..config
    };
    let agent = start(config).await;
    let mut rx = agent.subscribe();
    let watched = wait_for("outsider sampled", || {
        agent
            .usage()
            .get("watch:outsider")
            .filter(|u| u.processes == 1)
            .copied()
    })
    .await;
    assert!(watched.rss_bytes > 0);
    let event = wait_for("memory budget event", || loop {
        match rx.try_recv() {
            Ok(e) if matches!(e.kind, EventKind::MemoryBudgetExceeded { .. }) => return Some(e),
            Ok(_) => continue,
            Err(_) => return None,
        }
    })
    .await;
    assert!(matches!(
        event.kind,
        EventKind::MemoryBudgetExceeded {
            budget_bytes: 4096,
            ..
        }
    ));
    agent.shutdown().await;
    let _ = outsider.kill();
    let _ = outsider.wait();
}

#[test]
fn sighup_reloads_the_running_binary() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = Dir::new();
    let body = |arg: &str| {
        format!("[[component]]\nname = \"x\"\ncommand = \"sleep\"\nargs = [\"{arg}\"]\n[[component]]\nname = \"y\"\ncommand = \"sleep\"\nargs = [\"1000.31\"]\n")
    };
    let config = dir.write_config(&body("1000.3"));
    let agent = AgentProcess::spawn(&config);
    let (_, x1) = rt.block_on(wait_for("x ready", || {
        agent.component("x").filter(|c| c.0 == "ready")
    }));
    let (_, y1) = rt.block_on(wait_for("y ready", || {
        agent.component("y").filter(|c| c.0 == "ready")
    }));
    dir.write_config(&body("1000.4"));
    let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let (_, x2) = rt.block_on(wait_for("x restarted", || {
        agent.component("x").filter(|c| c.0 == "ready" && c.1 != x1)
    }));
    assert_eq!(processes_with("sleep 1000.4"), [x2.unwrap() as u32]);
    assert_eq!(agent.component("y").unwrap().1, y1, "y untouched");
}
