//! End-to-end supervisor tests with real child processes (sh, sleep, python3) and the
//! real `razar-agent` binary for agent restarts. Every wait has a deadline.

mod support;

use razar_agent::supervisor::machine::Control;
use razar_agent::supervisor::runtime::{Agent, AgentError, AgentOptions};
use razar_shared::domain::ComponentState::{self, *};
use razar_shared::protocol::{Event, EventKind, Subject};
use std::time::{Duration, Instant};
use support::*;

fn sh(script: &str) -> String {
    format!("command = \"sh\"\nargs = [\"-c\", {script:?}]\n")
}

fn drain(rx: &mut tokio::sync::broadcast::Receiver<Event>, into: &mut Vec<Event>) {
    while let Ok(e) = rx.try_recv() {
        into.push(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_order_waits_for_readiness_and_independents_start_in_parallel() {
    let dir = Dir::new();
    let flag = dir.join("db.ready");
    let config = dir.config(&format!(
        "[[component]]\nname = \"db\"\n{}\n[component.readiness]\nkind = \"exec\"\ncommand = [\"test\", \"-f\", \"{}\"]\ninterval = \"50ms\"\n\n\
         [[component]]\nname = \"api\"\ndepends_on = [\"db\"]\n{}\n\n\
         [[component]]\nname = \"cache\"\n{}\n",
        sh("exec sleep 1000"),
        flag.display(),
        sh("exec sleep 1000"),
        sh("exec sleep 1000"),
    ));
    let agent = start(config).await;
    // Independent components start together; the dependent waits while db is not ready.
    wait_state(&agent, "cache", Ready).await;
    let db = wait_state(&agent, "db", Starting).await;
    assert!(db.pid.is_some());
    let api = status(&agent, "api").unwrap();
    assert_eq!(
        (api.state, api.pid),
        (Pending, None),
        "api must wait for db"
    );
    std::fs::write(&flag, "").unwrap();
    wait_state(&agent, "db", Ready).await;
    let api = wait_state(&agent, "api", Ready).await;
    assert!(api.pid.is_some());
    agent.shutdown().await;
    assert!(agent
        .statuses()
        .values()
        .all(|s| s.pid.is_none() || !alive(s.pid.unwrap())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failure_restarts_the_component() {
    let dir = Dir::new();
    let flag = dir.join("healthy");
    std::fs::write(&flag, "").unwrap();
    let config = dir.config(&format!(
        "[[component]]\nname = \"svc\"\n{}\n[component.liveness]\nkind = \"exec\"\ncommand = [\"test\", \"-f\", \"{}\"]\ninterval = \"50ms\"\nfailure_threshold = 2\n[component.restart]\ninitial_backoff = \"0s\"\n[component.give_up]\nmax_failures = 1000\n",
        sh("exec sleep 1000"),
        flag.display()
    ));
    let agent = start(config).await;
    let mut rx = agent.subscribe();
    let first = wait_state(&agent, "svc", Ready).await.pid.unwrap();
    std::fs::remove_file(&flag).unwrap();
    // Transient states can be too short to poll: wait for the kill's exit event.
    let mut events = Vec::new();
    let exit = wait_for("svc stopped for failing liveness", || {
        drain(&mut rx, &mut events);
        events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ProcessExited { pid, .. } if pid == first))
            .cloned()
    })
    .await;
    assert!(
        matches!(
            exit.kind,
            EventKind::ProcessExited {
                signal: Some(15),
                ..
            }
        ),
        "stopped with SIGTERM: {exit:?}"
    );
    assert!(events
        .iter()
        .any(|e| e.message.starts_with("liveness probe failed 2 times")));
    std::fs::write(&flag, "").unwrap();
    let again = wait_for("svc ready with a new pid", || {
        status(&agent, "svc").filter(|s| s.state == Ready && s.pid.is_some_and(|p| p != first))
    })
    .await;
    assert!(again.restarts >= 1);
    assert!(!alive(first), "old process is gone");
    agent.shutdown().await;
}

/// The delays announced by Backoff transitions, in ms.
fn backoff_delays(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::StateChanged { to: Backoff, .. }))
        .filter_map(|e| {
            e.message
                .split("restart in ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_grows_and_is_capped() {
    let dir = Dir::new();
    let config = dir.config(&format!(
        "[[component]]\nname = \"crashy\"\n{}\n[component.restart]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\nmultiplier = 2.0\njitter = 0.0\n[component.give_up]\nmax_failures = 100\n",
        sh("exit 3")
    ));
    let agent = start(config).await;
    let mut rx = agent.subscribe();
    let mut events = Vec::new();
    let started = Instant::now();
    wait_for("six backoffs", || {
        drain(&mut rx, &mut events);
        (backoff_delays(&events).len() >= 6).then_some(())
    })
    .await;
    let delays = backoff_delays(&events);
    // Events are subscribed a little after start: the first seen may be any of the sequence.
    let expected = [50, 100, 200, 200, 200, 200, 200, 200];
    let offset = expected
        .iter()
        .position(|d| *d == delays[0])
        .expect("a known delay");
    assert_eq!(
        &delays[..6],
        &expected[offset..offset + 6],
        "delays {delays:?}"
    );
    // Real time agrees: restarts never come sooner than announced (event timestamps).
    let backoffs: Vec<i64> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::StateChanged { to: Backoff, .. }))
        .map(|e| e.ts_ms)
        .collect();
    let announced: u64 = delays[..5].iter().sum();
    let took = (backoffs[5] - backoffs[0]) as u64;
    assert!(
        took + 5 >= announced,
        "5 restarts took {took} ms, announced {announced} ms"
    );
    assert!(started.elapsed() >= Duration::from_millis(announced));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grandchildren_die_with_the_component() {
    let dir = Dir::new();
    let gc = dir.join("grandchild.pid");
    let config = dir.config(&format!(
        "[[component]]\nname = \"tree\"\n{}\nstop_grace = \"5s\"\n",
        sh(&format!("sleep 1000 & echo $! > {}; wait", gc.display()))
    ));
    let agent = start(config).await;
    wait_state(&agent, "tree", Ready).await;
    let grandchild: u32 = wait_for("grandchild pid file", || {
        std::fs::read_to_string(&gc).ok()?.trim().parse().ok()
    })
    .await;
    assert!(alive(grandchild));
    agent.command("tree", Control::Stop).await.unwrap();
    wait_state(&agent, "tree", Stopped).await;
    wait_for("grandchild to die", || (!alive(grandchild)).then_some(())).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_restarts_only_the_changed_component_and_refuses_invalid_config() {
    let dir = Dir::new();
    let body = |b_arg: &str| {
        format!(
            "[[component]]\nname = \"a\"\n{}\n[[component]]\nname = \"b\"\ndepends_on = [\"a\"]\ncommand = \"sleep\"\nargs = [\"{b_arg}\"]\n[[component]]\nname = \"c\"\n{}\n",
            sh("exec sleep 1000"),
            sh("exec sleep 1001")
        )
    };
    let config = dir.config(&body("1000"));
    let path = config.path.clone();
    let hash = config.hash.clone();
    let agent = start(config).await;
    let pid = |n: &str| status(&agent, n).and_then(|s| s.pid);
    for n in ["a", "b", "c"] {
        wait_state(&agent, n, Ready).await;
    }
    let before = (pid("a"), pid("b"), pid("c"));

    // Invalid: refused, everything keeps running, config kept.
    std::fs::write(
        &path,
        dir.config_text("[[component]]\nname = \"a\"\nbogus = 1\n"),
    )
    .unwrap();
    match agent.reload().await {
        Err(AgentError::Config(errors)) => assert!(
            errors
                .0
                .iter()
                .any(|e| e.key.contains("bogus") && e.line == 9),
            "{errors}"
        ),
        other => panic!("expected a refused reload, got {other:?}"),
    }
    assert_eq!(agent.view().config().hash, hash);
    assert_eq!((pid("a"), pid("b"), pid("c")), before);

    // Valid, with only b changed.
    dir.write_config(&body("1002"));
    let changed = agent.reload().await.unwrap();
    assert_eq!(changed, ["b"]);
    let b = wait_for("b ready with a new pid", || {
        status(&agent, "b").filter(|s| s.state == Ready && s.pid != before.1)
    })
    .await;
    assert!(processes_with("sleep 1002").contains(&b.pid.unwrap()));
    assert_eq!(
        (pid("a"), pid("c")),
        (before.0, before.2),
        "a and c untouched"
    );
    assert!(!alive(before.1.unwrap()));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_pulse_reports_recovery_time() {
    let dir = Dir::new();
    let config = dir.config(&format!(
        "[[component]]\nname = \"p\"\n{}\n[component.restart]\ninitial_backoff = \"0s\"\n",
        sh("exec sleep 1000")
    ));
    let agent = start(config).await;
    let first = wait_state(&agent, "p", Ready).await.pid;
    let mut rx = agent.subscribe();
    agent
        .command(
            "p",
            Control::Pulse {
                budget: Duration::from_secs(20),
            },
        )
        .await
        .unwrap();
    let mut events = Vec::new();
    let result = wait_for("pulse result", || {
        drain(&mut rx, &mut events);
        events.iter().find_map(|e| match e.kind {
            EventKind::PulseResult {
                recovered_ms,
                passed,
                ..
            } => Some((recovered_ms, passed)),
            _ => None,
        })
    })
    .await;
    assert!(result.1 && result.0.is_some(), "{result:?}");
    assert_ne!(status(&agent, "p").unwrap().pid, first);
    // A component that is not ready refuses a pulse.
    agent.command("p", Control::Stop).await.unwrap();
    wait_state(&agent, "p", Stopped).await;
    assert!(matches!(
        agent
            .command(
                "p",
                Control::Pulse {
                    budget: Duration::from_secs(1)
                }
            )
            .await,
        Err(AgentError::Refused(_))
    ));
    agent.shutdown().await;
}

fn crash_config(dir: &Dir, flag: &std::path::Path, marker: &str) -> std::path::PathBuf {
    dir.write_config(&format!(
        "[[component]]\nname = \"flaky\"\n{}\n[component.restart]\ninitial_backoff = \"10ms\"\nmax_backoff = \"20ms\"\n[component.give_up]\nmax_failures = 3\nwindow = \"1m\"\n\n\
         [[component]]\nname = \"steady\"\ncommand = \"sleep\"\nargs = [\"{marker}\"]\n",
        sh(&format!("test -f {} && exit 1; exec sleep 1000", flag.display()))
    ))
}

#[test]
fn quarantine_survives_agent_restart_until_resolved() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = Dir::new();
    let flag = dir.join("broken");
    std::fs::write(&flag, "").unwrap();
    let config = crash_config(&dir, &flag, "1000.5");
    let mut agent = AgentProcess::spawn(&config);
    rt.block_on(wait_for("flaky quarantined", || {
        agent.component("flaky").filter(|c| c.0 == "quarantined")
    }));
    assert_eq!(agent.terminate(), Some(0));

    // Restarted agent: still quarantined, nothing started for it.
    let agent = AgentProcess::spawn(&config);
    let (state, pid) = rt.block_on(wait_for("agent back", || agent.component("flaky")));
    assert_eq!((state.as_str(), pid), ("quarantined", None));
    let (code, _, err) = agent.cli(&["start", "flaky"]);
    assert_eq!(
        code, 2,
        "start of a quarantined component is refused: {err}"
    );

    // Fix the cause, resolve with a note: it runs again.
    std::fs::remove_file(&flag).unwrap();
    let (code, out, err) = agent.cli(&["resolve", "flaky", "--note", "disk replaced"]);
    assert_eq!(code, 0, "{out}{err}");
    rt.block_on(wait_for("flaky ready after resolve", || {
        agent.component("flaky").filter(|c| c.0 == "ready")
    }));
    let (code, _, _) = agent.cli(&["resolve", "flaky", "--note", "again"]);
    assert_eq!(
        code, 2,
        "resolving a component that is not quarantined is refused"
    );
}

#[test]
fn agent_sigkill_and_restart_adopts_instead_of_double_starting() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = Dir::new();
    let marker = "1000.25";
    let config = dir.write_config(&format!(
        "[[component]]\nname = \"solo\"\ncommand = \"sleep\"\nargs = [\"{marker}\"]\n"
    ));
    let mut agent = AgentProcess::spawn(&config);
    let (_, pid) = rt.block_on(wait_for("solo ready", || {
        agent.component("solo").filter(|c| c.0 == "ready")
    }));
    let pid = pid.unwrap() as u32;
    agent.kill9();
    assert!(alive(pid), "the component outlives a SIGKILLed agent");

    let mut agent = AgentProcess::spawn(&config);
    let (_, again) = rt.block_on(wait_for("solo ready again", || {
        agent.component("solo").filter(|c| c.0 == "ready")
    }));
    assert_eq!(again, Some(u64::from(pid)), "the live process was adopted");
    assert_eq!(
        processes_with(&format!("sleep {marker}")),
        [pid],
        "exactly one process runs"
    );
    // The adopted process is supervised: a SIGTERM to the agent stops it.
    assert_eq!(agent.terminate(), Some(0));
    rt.block_on(wait_for("adopted process stopped", || {
        (!alive(pid)).then_some(())
    }));
}

#[test]
fn check_reports_every_config_error_with_its_line() {
    let dir = Dir::new();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[agent]\nprofile = \"core\"\nlisten = \"10.0.0.1:80\"\n\n[[component]]\nname = \"a\"\ncommand = \"x\"\ndepends_on = [\"nope\"]\nstop_grace = \"soon\"\nfavourite = true\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = path.display().to_string();
    for (line, key) in [
        (3, "agent.listen"),
        (8, "component[a].depends_on"),
        (9, "component[a].stop_grace"),
        (10, "component[a].favourite"),
    ] {
        let needle = format!("{file}:{line}:");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&needle) && l.contains(key)),
            "missing {needle} {key} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("4 error(s)"), "{stderr}");

    let good =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    // The example names the collector's CA, certificate and key under /etc/razar, which
    // `check` opens as `run` would: on this machine those are its only errors.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(": collector."))
        .collect();
    assert_eq!(errors.len(), 3, "{stderr}");
    assert!(
        errors.iter().all(|l| l.contains("cannot read /etc/razar/")),
        "{stderr}"
    );
    assert!(stderr.contains("3 error(s)"), "{stderr}");
    // A refused config never half-starts the agent.
    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[allow(dead_code)]
fn is_component(e: &Event, name: &str, to: ComponentState) -> bool {
    e.subject == Subject::Component(name.into())
        && matches!(e.kind, EventKind::StateChanged { to: t, .. } if t == to)
}

/// Kills a process group when the test ends, however it ends (a SIGKILLed agent leaves
/// its components behind).
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independents_start_in_priority_order_lowest_number_first() {
    let dir = Dir::new();
    let mut body = String::new();
    for (name, priority) in [("a", 50), ("b", 40), ("c", 30), ("d", 20), ("e", 10)] {
        body.push_str(&format!(
            "[[component]]\nname = \"{name}\"\npriority = {priority}\ncommand = \"sleep\"\nargs = [\"1000.3{priority}\"]\n\n"
        ));
    }
    let agent = start(dir.config(&body)).await;
    let mut rx = agent.subscribe_from_start();
    let mut events = Vec::new();
    let starts = wait_for("all five started", || {
        drain(&mut rx, &mut events);
        let starts: Vec<(String, u32)> = events
            .iter()
            .filter_map(|e| match (&e.subject, &e.kind) {
                (Subject::Component(name), EventKind::StateChanged { to: Ready, .. }) => {
                    let pid = e
                        .message
                        .split("pid ")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .parse()
                        .ok()?;
                    Some((name.clone(), pid))
                }
                _ => None,
            })
            .collect();
        (starts.len() == 5).then_some(starts)
    })
    .await;
    let order: Vec<&str> = starts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(order, ["e", "d", "c", "b", "a"], "events: {events:#?}");
    // The processes were forked in that order too.
    let pids: Vec<u32> = starts.iter().map(|(_, p)| *p).collect();
    let mut sorted = pids.clone();
    sorted.sort_unstable();
    assert_eq!(pids, sorted, "spawn order by pid");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_that_never_passes_fails_the_start_and_dependents_say_why_they_wait() {
    let dir = Dir::new();
    let config = dir.config(&format!(
        "[[component]]\nname = \"db\"\n{}\n[component.readiness]\nkind = \"exec\"\ncommand = [\"false\"]\ninterval = \"50ms\"\nfailure_threshold = 3\nstart_period = \"200ms\"\n[component.restart]\ninitial_backoff = \"100ms\"\njitter = 0.0\n[component.give_up]\nmax_failures = 2\nwindow = \"1m\"\n\n\
         [[component]]\nname = \"api\"\ndepends_on = [\"db\"]\n{}\n",
        sh("exec sleep 1000.41"),
        sh("exec sleep 1000.42"),
    ));
    let agent = Agent::start(
        config,
        AgentOptions {
            store: None,
            serve_http: true,
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
    )
    .await
    .expect("agent starts");
    let addr = agent.local_addr().expect("listening");
    let mut rx = agent.subscribe_from_start();
    let mut events = Vec::new();
    // The dependent says what it waits for, in status and /health.
    let api = wait_for("api to say it waits for db", || {
        status(&agent, "api").filter(|s| s.reason.contains("waiting for db"))
    })
    .await;
    assert_eq!((api.state, api.pid), (Pending, None), "{api:?}");
    let (code, health) = http(addr, "GET", "/health", "").await;
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    let reason = health["components"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "api"))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("waiting for db"), "/health: {health}");
    // A failed start: an event with the probe's reason, a restart, then the give-up rule.
    let failed = wait_for("db's start failed by its readiness probe", || {
        drain(&mut rx, &mut events);
        events
            .iter()
            .find(|e| {
                e.subject == Subject::Component("db".into())
                    && matches!(e.kind, EventKind::StateChanged { to: Backoff, .. })
            })
            .cloned()
    })
    .await;
    assert!(
        failed
            .message
            .starts_with("readiness probe failed 3 times after the 200 ms start period:"),
        "{failed:?}"
    );
    let db = wait_state(&agent, "db", Quarantined).await;
    assert!(db.reason.contains("gave up after 2 failures"), "{db:?}");
    let api = wait_for("api to say db is quarantined", || {
        status(&agent, "api").filter(|s| s.reason.contains("db (quarantined"))
    })
    .await;
    assert_eq!(api.state, Pending);
    let (_, health) = http(addr, "GET", "/health", "").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    agent.shutdown().await;
}

#[test]
fn oneshot_migration_gates_the_app_and_is_not_run_again_after_an_agent_sigkill() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = Dir::new();
    let go = dir.join("go");
    let runs = dir.join("runs");
    let config = dir.write_config(&format!(
        "[[component]]\nname = \"migrate\"\nkind = \"oneshot\"\n{}\n\n\
         [[component]]\nname = \"app\"\ndepends_on = [\"migrate\"]\ncommand = \"sleep\"\nargs = [\"1000.43\"]\n",
        sh(&format!(
            "while [ ! -f {go} ]; do sleep 0.05; done; echo run >> {runs}",
            go = go.display(),
            runs = runs.display()
        )),
    ));
    let lines = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut agent = AgentProcess::spawn(&config);
    rt.block_on(wait_for("migrate running", || {
        agent
            .component("migrate")
            .filter(|c| c.0 == "starting" && c.1.is_some())
    }));
    // Running is not ready for a one-shot: the app waits.
    let (state, pid) = agent.component("app").expect("app");
    assert_eq!((state.as_str(), pid), ("pending", None));
    std::fs::write(&go, "").unwrap();
    let (_, app) = rt.block_on(wait_for("app ready", || {
        agent.component("app").filter(|c| c.0 == "ready")
    }));
    let app = app.expect("app pid") as u32;
    let _group = GroupGuard(app);
    assert_eq!(agent.component("migrate"), Some(("ready".into(), None)));
    assert_eq!(lines(), 1);

    agent.kill9();
    let mut agent = AgentProcess::spawn(&config);
    let (_, again) = rt.block_on(wait_for("app ready again", || {
        agent.component("app").filter(|c| c.0 == "ready")
    }));
    assert_eq!(again, Some(u64::from(app)), "the app was adopted");
    assert_eq!(agent.component("migrate"), Some(("ready".into(), None)));
    assert_eq!(lines(), 1, "the completed migration did not run again");

    // An operator asks: it runs again.
    let (code, out, err) = agent.cli(&["restart", "migrate"]);
    assert_eq!(code, 0, "{out}{err}");
    rt.block_on(wait_for("migrate run a second time", || {
        (lines() == 2).then_some(())
    }));
    rt.block_on(wait_for("migrate ready again", || {
        agent.component("migrate").filter(|c| c.0 == "ready")
    }));
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn a_cyrillic_15_byte_process_name_is_adopted_after_an_agent_restart() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = Dir::new();
    // The kernel keeps 15 bytes of the name: "миграция" is 16, so the name it shows
    // ends inside the last character.
    let program = dir.join("миграция");
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("sleep binary");
    std::fs::copy(sleep, &program).unwrap();
    let marker = "1000.44";
    let config = dir.write_config(&format!(
        "[[component]]\nname = \"cyr\"\ncommand = \"{}\"\nargs = [\"{marker}\"]\n",
        program.display()
    ));
    let mut agent = AgentProcess::spawn(&config);
    let (_, pid) = rt.block_on(wait_for("cyr ready", || {
        agent.component("cyr").filter(|c| c.0 == "ready")
    }));
    let pid = pid.expect("pid") as u32;
    let _group = GroupGuard(pid);
    let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
    assert!(
        std::str::from_utf8(&stat).is_err(),
        "the name is cut inside a character"
    );
    agent.kill9();
    assert!(alive(pid));

    let mut agent = AgentProcess::spawn(&config);
    let (_, again) = rt.block_on(wait_for("cyr ready again", || {
        agent.component("cyr").filter(|c| c.0 == "ready")
    }));
    assert_eq!(again, Some(u64::from(pid)), "the live process was adopted");
    assert_eq!(
        processes_with(&format!("миграция {marker}")),
        [pid],
        "no second copy"
    );
    assert_eq!(agent.terminate(), Some(0));
    rt.block_on(wait_for("adopted process stopped", || {
        (!alive(pid)).then_some(())
    }));
}

#[test]
fn pulse_cli_waits_and_prints_the_recovery_time() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = Dir::new();
    let config = dir.write_config(
        "[[component]]\nname = \"svc\"\ncommand = \"sleep\"\nargs = [\"1000.45\"]\n[component.restart]\ninitial_backoff = \"0s\"\n",
    );
    let agent = AgentProcess::spawn(&config);
    rt.block_on(wait_for("svc ready", || {
        agent.component("svc").filter(|c| c.0 == "ready")
    }));
    let (code, out, err) = agent.cli(&["pulse", "svc", "--budget-ms", "20000"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("ok: pulse svc: ready again after ") && out.contains("(budget 20000 ms)"),
        "{out}"
    );
    // A refused pulse says why and exits 2.
    let (code, _, err) = agent.cli(&["pulse", "nope", "--budget-ms", "1000"]);
    assert_eq!(code, 2, "{err}");
}
