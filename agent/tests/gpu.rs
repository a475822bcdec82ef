//! GPU telemetry through the whole agent: without the NVML library the agent (the real
//! binary) still runs its components and says why GPU telemetry is off; with the fake
//! NVML library `/metrics` carries the dcgm-exporter series and a component's VRAM;
//! a VRAM budget breach restarts the component or only reports it, by policy.
//!
//! Components are real processes. They outlive the agent by design (own process
//! groups), so every test holds a [`Reaper`] that kills what it started, even when an
//! assertion fails.

mod support;

use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_shared::domain::ComponentState;
use razar_shared::protocol::{Event, EventKind, Subject};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::*;
use tokio::sync::broadcast;

const GIB: u64 = 1 << 30;

fn sh(script: &str) -> String {
    format!("command = \"sh\"\nargs = [\"-c\", {script:?}]\n")
}

/// A `sleep` argument no other test (or test run) uses: fixed width, so one marker is
/// never a prefix of another.
fn marker(test: u8) -> String {
    format!("1000.{:07}{test}", std::process::id())
}

/// Kills, when dropped, every live process whose command line is `sleep <marker>` (the
/// components of one test), with their process groups.
struct Reaper {
    markers: Vec<String>,
}

impl Reaper {
    fn new(markers: &[&str]) -> Reaper {
        Reaper {
            markers: markers.iter().map(|m| format!("sleep {m}")).collect(),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, killpg, Signal};
        use nix::unistd::Pid;
        for needle in &self.markers {
            for pid in processes_with(needle) {
                let pid = Pid::from_raw(pid as i32);
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// The value of the series `name{labels…}` in a Prometheus text exposition (the labels
/// given must all be on the line; others may be too).
fn series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labelset, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| labelset.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// Series lines (not comments) of a family whose name starts with `prefix`.
fn lines_with_prefix<'a>(metrics: &'a str, prefix: &str) -> Vec<&'a str> {
    metrics.lines().filter(|l| l.starts_with(prefix)).collect()
}

async fn metrics(addr: SocketAddr) -> String {
    let (code, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(code, 200, "{body}");
    body
}

async fn health(addr: SocketAddr) -> serde_json::Value {
    let (code, body) = http(addr, "GET", "/health", "").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("health json")
}

/// Waits until `/metrics` satisfies `check`; returns what `check` returned.
async fn wait_metrics<T>(
    addr: SocketAddr,
    what: &str,
    mut check: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let text = metrics(addr).await;
        if let Some(v) = check(&text) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what} in /metrics:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The fake NVML library cargo built for this test run (`razar-fake-nvml` is a
/// dev-dependency, so its cdylib lands next to the test executable).
fn fake_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let library = exe.parent().expect("deps dir").join("libnvidia_ml.so");
    assert!(
        library.exists(),
        "{} missing: run `cargo build -p razar-fake-nvml`",
        library.display()
    );
    library
}

/// A fake GPU host in `dir`: a private copy of the library (its own state) with the
/// scenario beside it, where the library looks for it. Returns the library path.
fn fake_gpu_host(dir: &Path, scenario: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fake host dir");
    let library = dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_library(), &library).expect("copy fake library");
    std::fs::write(dir.join("scenario.toml"), scenario).expect("write scenario");
    library
}

async fn start_daemon(dir: &Dir, body: &str) -> Daemon {
    let config = dir.config(body);
    Daemon::start(
        config,
        DaemonOptions {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..DaemonOptions::default()
        },
    )
    .await
    .expect("daemon starts")
}

/// Reads a pid file the component wrote (waits for it).
async fn pid_from(path: &Path) -> u32 {
    wait_for(&format!("pid in {}", path.display()), || {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await
}

/// Events received so far, appended to `seen`.
fn collect(rx: &mut broadcast::Receiver<Event>, seen: &mut Vec<Event>) {
    loop {
        match rx.try_recv() {
            Ok(e) => seen.push(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                panic!("test subscription lagged by {n} events")
            }
            Err(_) => return,
        }
    }
}

fn of(events: &[Event], component: &str) -> Vec<Event> {
    events
        .iter()
        .filter(|e| e.subject == Subject::Component(component.to_owned()))
        .cloned()
        .collect()
}

fn vram_events(events: &[Event], component: &str) -> Vec<(u64, u64)> {
    of(events, component)
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::VramBudgetExceeded {
                used_bytes,
                budget_bytes,
            } => Some((used_bytes, budget_bytes)),
            _ => None,
        })
        .collect()
}

/// `nvml_library` names a file that is not there: the real `razar-agent run` starts,
/// runs its component to ready, logs and serves (in `/health`) why GPU telemetry is
/// off, and `/metrics` has host and component series but no GPU series.
#[test]
fn without_the_nvml_library_the_agent_runs_and_says_why() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = Dir::new();
    let m = marker(1);
    let _reaper = Reaper::new(&[&m]);
    let missing = dir.join("no-driver/libnvidia-ml.so.1");
    let config = dir.write_config(&format!(
        "sample_interval = \"100ms\"\n\n[gpu]\nsource = \"nvml\"\nnvml_library = \"{}\"\n\n[[component]]\nname = \"web\"\n{}",
        missing.display(),
        sh(&format!("exec sleep {m}"))
    ));
    let stderr = std::fs::File::create(dir.join("agent.stderr")).expect("stderr file");
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn razar-agent");
    let mut agent = AgentProcess { child, config };

    let (_, pid) = rt.block_on(wait_for("web ready", || {
        agent.component("web").filter(|c| c.0 == "ready")
    }));
    let pid = pid.expect("ready component has a pid") as u32;
    assert!(alive(pid));

    let health = agent.health().expect("/health");
    let gpu = health["gpu"].as_str().unwrap_or_else(|| {
        panic!("/health has no `gpu` string saying why GPU telemetry is off: {health}")
    });
    assert!(gpu.starts_with("no NVML: "), "{gpu}");
    assert_eq!(health["status"], "ok");

    let log = std::fs::read_to_string(dir.join("agent.stderr")).expect("agent stderr");
    assert!(
        log.contains("GPU telemetry off") && log.contains("no NVML"),
        "the agent logs why:\n{log}"
    );

    let addr: SocketAddr = std::fs::read_to_string(dir.join("data/agent.addr"))
        .expect("address file")
        .trim()
        .parse()
        .expect("address");
    let text = rt.block_on(wait_metrics(addr, "host and component series", |t| {
        let host = series(t, "razar_host_memory_total_bytes", &[]).filter(|v| *v > 0.0);
        let web = series(
            t,
            "razar_process_resident_memory_bytes",
            &[("kind", "component"), ("target", "web")],
        )
        .filter(|v| *v > 0.0);
        (host.is_some() && web.is_some()).then(|| t.to_owned())
    }));
    assert_eq!(
        series(
            &text,
            "razar_component_state",
            &[("component", "web"), ("state", "ready")]
        ),
        Some(1.0)
    );
    for prefix in ["razar_gpu_", "DCGM_", "razar_component_gpu_"] {
        assert!(
            lines_with_prefix(&text, prefix).is_empty(),
            "no GPU series without a GPU library, found {prefix}*:\n{text}"
        );
        assert!(!text.contains(prefix), "not even HELP for {prefix}*");
    }

    assert_eq!(agent.terminate(), Some(0), "clean stop on SIGTERM");
    assert!(!alive(pid), "the agent stops its component when it stops");
}

/// The agent loads the fake NVML library (the real nvml-wrapper path) and `/metrics`
/// shows the scenario's two GPUs in dcgm-exporter names and razar's own, plus the VRAM
/// of the component whose process the scenario puts on GPU 0 (by its pid file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_nvml_library_feeds_dcgm_series_and_component_vram() {
    let dir = Dir::new();
    let m = marker(2);
    let _reaper = Reaper::new(&[&m]);
    let host = dir.join("gpu-host");
    let library = fake_gpu_host(
        &host,
        r#"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
values = { utilization_gpu = 42, temperature_gpu = 61 }
process = [{ pid_file = "web.pid", used_memory = 3221225472 }]

[[gpu]]
name = "NVIDIA A100-PCIE-40GB"
memory_total = 42949672960
values = { utilization_gpu = 7 }
"#,
    );
    let pid_file = host.join("web.pid");
    let daemon = start_daemon(
        &dir,
        &format!(
            "sample_interval = \"100ms\"\n\n[gpu]\nsource = \"nvml\"\nnvml_library = \"{}\"\n\n[[component]]\nname = \"web\"\n{}",
            library.display(),
            sh(&format!("echo $$ > {}; exec sleep {m}", pid_file.display()))
        ),
    )
    .await;
    assert_eq!(daemon.gpu_status(), None, "the fake library loads");
    let agent = daemon.agent().clone();
    let addr = agent.local_addr().expect("local endpoint");
    let ready = wait_state(&agent, "web", ComponentState::Ready).await;
    assert_eq!(pid_from(&pid_file).await, ready.pid.expect("pid"));

    let vram = (3 * GIB) as f64;
    let text = wait_metrics(addr, "web's VRAM", |t| {
        (series(
            t,
            "razar_component_gpu_memory_used_bytes",
            &[("component", "web")],
        ) == Some(vram))
        .then(|| t.to_owned())
    })
    .await;
    let h100 = [("gpu", "0"), ("modelName", "NVIDIA H100 80GB HBM3")];
    let a100 = [("gpu", "1"), ("modelName", "NVIDIA A100-PCIE-40GB")];
    assert_eq!(series(&text, "DCGM_FI_DEV_GPU_UTIL", &h100), Some(42.0));
    assert_eq!(series(&text, "DCGM_FI_DEV_GPU_UTIL", &a100), Some(7.0));
    assert_eq!(series(&text, "DCGM_FI_DEV_GPU_TEMP", &h100), Some(61.0));
    assert_eq!(
        series(&text, "DCGM_FI_DEV_FB_USED", &h100),
        Some(3072.0),
        "MiB: the GPU's used memory defaults to its processes'"
    );
    assert_eq!(series(&text, "DCGM_FI_DEV_FB_USED", &a100), Some(0.0));
    assert_eq!(
        series(&text, "razar_gpu_memory_used_bytes", &[("gpu", "0")]),
        Some(vram)
    );
    assert_eq!(
        series(&text, "razar_gpu_memory_total_bytes", &[("gpu", "1")]),
        Some(40.0 * GIB as f64)
    );
    assert!(series(&text, "razar_host_memory_total_bytes", &[]).is_some());
    let health = health(addr).await;
    assert!(
        health["gpu"].is_null(),
        "nothing to say while GPU telemetry works: {health}"
    );

    daemon.shutdown().await;
    assert!(!alive(ready.pid.expect("pid")));
}

/// Two components whose processes the scenario puts on the GPU with 2 GiB each, over
/// their 1 GiB budgets. `vram_policy = "restart"`: the agent emits the breach, stops
/// the process, and starts a new one, and the events say why. The new process stays
/// off the GPU (its script writes the pid file only the first time), so there is
/// exactly one restart. `vram_policy = "event"`: one breach event, the process keeps
/// running untouched. Both components' VRAM is in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vram_budget_breach_restarts_or_only_reports_by_policy() {
    let dir = Dir::new();
    let (m_greedy, m_tolerated) = (marker(3), marker(4));
    let _reaper = Reaper::new(&[&m_greedy, &m_tolerated]);
    let greedy_pid = dir.join("greedy.pid");
    let tolerated_pid = dir.join("tolerated.pid");
    // Step clock: scenario time is the tick count. The processes come on the GPU from
    // tick 10 (after the test has subscribed to events); `pcie_replay` equals the tick,
    // so the test can wait for ticks through `/metrics`.
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        r#"
[[gpu]]
values = { pcie_replay = [[0, 0], [1000000, 1000000]] }
process = [
  { pid_file = "greedy.pid", used_memory = 2147483648, from = 10 },
  { pid_file = "tolerated.pid", used_memory = 2147483648, from = 10 },
]
"#,
    )
    .expect("write scenario");
    let first = dir.join("greedy.first");
    let body = format!(
        "sample_interval = \"100ms\"\n\n[gpu]\nsource = \"scenario\"\nscenario = \"{scenario}\"\n\n\
         [[component]]\nname = \"greedy\"\n{greedy}vram_budget = \"1GiB\"\nvram_policy = \"restart\"\n\
         [component.restart]\ninitial_backoff = \"10ms\"\n\n\
         [[component]]\nname = \"tolerated\"\n{tolerated}vram_budget = \"1GiB\"\nvram_policy = \"event\"\n",
        scenario = scenario.display(),
        greedy = sh(&format!(
            "if [ ! -e {first} ]; then touch {first}; echo $$ > {pid}; fi; exec sleep {m_greedy}",
            first = first.display(),
            pid = greedy_pid.display()
        )),
        tolerated = sh(&format!(
            "echo $$ > {}; exec sleep {m_tolerated}",
            tolerated_pid.display()
        )),
    );
    let daemon = start_daemon(&dir, &body).await;
    let agent = daemon.agent().clone();
    let mut rx = agent.subscribe();
    let addr = agent.local_addr().expect("local endpoint");
    let g1 = pid_from(&greedy_pid).await;
    let t1 = pid_from(&tolerated_pid).await;

    let mut events = Vec::new();
    // restart policy: a new process, ready, the first one gone.
    let greedy = wait_for("greedy restarted and ready", || {
        collect(&mut rx, &mut events);
        status(&agent, "greedy")
            .filter(|s| s.state == ComponentState::Ready && s.pid.is_some_and(|p| p != g1))
    })
    .await;
    assert!(!alive(g1), "the over-budget process was stopped");
    assert_eq!(greedy.restarts, 1);
    assert_eq!(vram_events(&events, "greedy"), [(2 * GIB, GIB)]);
    let greedy_events = of(&events, "greedy");
    let why: Vec<&Event> = greedy_events
        .iter()
        .filter(|e| e.message.contains("VRAM budget exceeded"))
        .collect();
    assert!(
        why.iter().any(|e| matches!(
            e.kind,
            EventKind::StateChanged {
                to: ComponentState::Stopping,
                ..
            }
        )),
        "the stop says it is the VRAM budget: {greedy_events:#?}"
    );
    assert!(
        why.iter().any(|e| matches!(
            e.kind,
            EventKind::StateChanged {
                to: ComponentState::Backoff,
                ..
            }
        )),
        "the failure that leads to the restart says why: {greedy_events:#?}"
    );

    // event policy: a breach event, and five ticks later still the first process.
    wait_for("tolerated's breach event", || {
        collect(&mut rx, &mut events);
        (!vram_events(&events, "tolerated").is_empty()).then_some(())
    })
    .await;
    let tick = |t: &str| series(t, "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", &[("gpu", "0")]);
    let now = tick(&metrics(addr).await).expect("tick series");
    let text = wait_metrics(addr, "five more ticks", |t| {
        tick(t).filter(|n| *n >= now + 5.0).map(|_| t.to_owned())
    })
    .await;
    collect(&mut rx, &mut events);
    assert_eq!(
        vram_events(&events, "tolerated"),
        [(2 * GIB, GIB)],
        "one event per crossing"
    );
    let tolerated = status(&agent, "tolerated").expect("tolerated status");
    assert_eq!(
        (tolerated.state, tolerated.pid, tolerated.restarts),
        (ComponentState::Ready, Some(t1), 0)
    );
    assert!(alive(t1));
    assert!(
        !of(&events, "tolerated").iter().any(|e| matches!(
            e.kind,
            EventKind::StateChanged {
                to: ComponentState::Stopping,
                ..
            }
        )),
        "the event policy stops nothing: {events:#?}"
    );
    assert_eq!(vram_events(&events, "greedy").len(), 1, "restarted once");

    // Both components' VRAM in /metrics; the restarted greedy is off the GPU.
    assert_eq!(
        series(
            &text,
            "razar_component_gpu_memory_used_bytes",
            &[("component", "tolerated")]
        ),
        Some(2.0 * GIB as f64)
    );
    assert_eq!(
        series(
            &text,
            "razar_component_gpu_memory_used_bytes",
            &[("component", "greedy")]
        ),
        Some(0.0)
    );
    assert_eq!(
        series(
            &text,
            "razar_events_total",
            &[("kind", "vram_budget_exceeded")]
        ),
        Some(2.0)
    );
    assert_eq!(
        series(
            &text,
            "razar_component_restarts_total",
            &[("component", "greedy")]
        ),
        Some(1.0)
    );

    daemon.shutdown().await;
    for pid in [greedy.pid.expect("pid"), t1] {
        assert!(!alive(pid), "stopped with the agent");
    }
}

/// With `vram_policy = "restart"` every new process over budget is a new breach: a
/// component whose every process goes straight to 2 GiB (its script always writes the
/// pid file) is restarted again and again, not once. (Before the fix the breach was
/// remembered per component, so the second process ran over budget untouched.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vram_restart_policy_applies_to_each_new_process_over_budget() {
    let dir = Dir::new();
    let m = marker(5);
    let _reaper = Reaper::new(&[&m]);
    let pid_file = dir.join("hog.pid");
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        "[[gpu]]\nprocess = [{ pid_file = \"hog.pid\", used_memory = 2147483648, from = 10 }]\n",
    )
    .expect("write scenario");
    let body = format!(
        "sample_interval = \"100ms\"\n\n[gpu]\nsource = \"scenario\"\nscenario = \"{}\"\n\n\
         [[component]]\nname = \"hog\"\n{}vram_budget = \"1GiB\"\nvram_policy = \"restart\"\n\
         [component.restart]\ninitial_backoff = \"10ms\"\n[component.give_up]\nmax_failures = 100\n",
        scenario.display(),
        sh(&format!("echo $$ > {}; exec sleep {m}", pid_file.display()))
    );
    let daemon = start_daemon(&dir, &body).await;
    let agent = daemon.agent().clone();
    let mut rx = agent.subscribe();
    let mut events = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    wait_for("three processes of hog, each stopped over budget", || {
        collect(&mut rx, &mut events);
        pids.extend(status(&agent, "hog").and_then(|s| s.pid));
        (vram_events(&events, "hog").len() >= 3 && pids.len() >= 3).then_some(())
    })
    .await;
    let hog = status(&agent, "hog").expect("hog status");
    assert!(hog.restarts >= 2, "{hog:?}");
    assert!(
        vram_events(&events, "hog")
            .iter()
            .all(|e| *e == (2 * GIB, GIB)),
        "{events:#?}"
    );
    daemon.shutdown().await;
    for pid in pids {
        assert!(!alive(pid), "no hog process is left running");
    }
}

/// `gpu.kernel_log` names a file that cannot be read: NVML's event set alone loses XIDs
/// that arrive together, so the agent says so: `/health` is degraded with the reason,
/// `/metrics` has `razar_agent_gpu_events_degraded 1`, and an event is raised. Once the file
/// can be read, all of it turns back (health ok, gauge 0, a `kernel_log_readable` event).
///
/// Before the fix this was one INFO log line; `/health` stayed `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_kernel_log_degrades_health_with_an_event_and_a_metric() {
    let dir = Dir::new();
    let host = dir.join("gpu-host");
    let library = fake_gpu_host(&host, "driver_version = \"550.54.15\"\n\n[[gpu]]\n");
    let kernel_log = dir.join("no-such-dir/kmsg");
    let daemon = start_daemon(
        &dir,
        &format!(
            "sample_interval = \"100ms\"\n\n[gpu]\nsource = \"nvml\"\nnvml_library = \"{}\"\nkernel_log = \"{}\"\n",
            library.display(),
            kernel_log.display()
        ),
    )
    .await;
    assert_eq!(daemon.gpu_status(), None, "the fake library loads");
    let agent = daemon.agent().clone();
    let mut rx = agent.subscribe();
    let addr = agent.local_addr().expect("local endpoint");

    let degraded = "razar_agent_gpu_events_degraded";
    let text = wait_metrics(addr, "GPU events degraded", |t| {
        (series(t, degraded, &[]) == Some(1.0)).then(|| t.to_owned())
    })
    .await;
    let raised = series(&text, "razar_events_total", &[("kind", "other")]).unwrap_or(0.0);
    assert!(raised >= 1.0, "the degraded event was raised:\n{text}");
    let h = health(addr).await;
    assert_eq!(h["status"], "degraded", "{h}");
    let reason = h["gpu_events"].as_str().unwrap_or_default();
    assert!(
        reason.contains("kernel log") && reason.contains("no-such-dir/kmsg"),
        "{h}"
    );

    std::fs::create_dir_all(dir.join("no-such-dir")).expect("mkdir");
    std::fs::write(&kernel_log, "").expect("create the kernel log");
    wait_metrics(addr, "GPU events complete again", |t| {
        (series(t, degraded, &[]) == Some(0.0)).then_some(())
    })
    .await;
    let h = health(addr).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert!(h["gpu_events"].is_null(), "{h}");
    let mut events = Vec::new();
    wait_for("the kernel_log_readable event", || {
        collect(&mut rx, &mut events);
        events
            .iter()
            .any(|e| {
                e.kind
                    == EventKind::Other {
                        code: razar_agent::telemetry::GPU_EVENTS_RESTORED_CODE.into(),
                    }
            })
            .then_some(())
    })
    .await;
    daemon.shutdown().await;
}

/// Seconds since boot now (`/proc/uptime`), in microseconds.
fn uptime_us() -> u64 {
    razar_gpu::kernel_log::uptime_us().expect("/proc/uptime")
}

/// Appends a `/dev/kmsg`-form XID 13 line for the fake GPU 0 (PCI 0000:01:00).
fn append_kmsg_xid(path: &Path, seq: u64, usec: u64) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open kernel log");
    writeln!(file, "4,{seq},{usec},-;random: crng init done").expect("write");
    writeln!(
        file,
        "3,{seq},{usec},-;NVRM: Xid (PCI:0000:01:00): 13, pid=77, name=trainer, Graphics Exception"
    )
    .expect("write");
}

/// The XID events among `events`: (historical, time).
fn xid_events(events: &[Event]) -> Vec<(bool, i64)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::GpuFault(f) => Some((f.historical, e.ts_ms)),
            _ => None,
        })
        .collect()
}

/// Kernel log lines are reported once across agent restarts: the agent keeps the kmsg
/// sequence number it reported up to (with the boot id) in its store. Lines written
/// before the agent started are reported once, marked historical, at their own time
/// (kmsg time since boot + boot time); lines written while it runs are new faults. After
/// a restart nothing already reported comes again, and a line written while the agent
/// was down is reported (historical), not lost.
///
/// Before the fix the kernel log was read from its end: what came before the start (or
/// while the agent was down) was lost, and `/dev/kmsg` replayed nothing only by luck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_log_lines_are_reported_once_across_restarts() {
    let dir = Dir::new();
    let host = dir.join("gpu-host");
    let library = fake_gpu_host(&host, "driver_version = \"550.54.15\"\n\n[[gpu]]\n");
    let kernel_log = dir.join("kmsg");
    let body = format!(
        "sample_interval = \"100ms\"\n\n[gpu]\nsource = \"nvml\"\nnvml_library = \"{}\"\nkernel_log = \"{}\"\n",
        library.display(),
        kernel_log.display()
    );
    let xids = |text: &str| series(text, "razar_events_total", &[("kind", "xid")]).unwrap_or(0.0);

    // Run 1: the log appears after the start holding two lines from before it (an
    // hour ago, or half the machine's uptime on a machine up for less than two hours:
    // kernel time cannot go back past the boot), then a new line is written.
    let daemon = start_daemon(&dir, &body).await;
    let agent = daemon.agent().clone();
    let addr = agent.local_addr().expect("local endpoint");
    let mut rx = agent.subscribe();
    let back_us = (uptime_us() / 2).min(3_600_000_000);
    assert!(
        back_us >= 10_000_000,
        "the machine has been up for less than 20 s: {back_us} us"
    );
    let back_ms = i64::try_from(back_us / 1_000).expect("fits");
    let before = uptime_us() - back_us;
    append_kmsg_xid(&kernel_log, 1, before);
    append_kmsg_xid(&kernel_log, 2, before + 1_000);
    wait_metrics(addr, "two historical XIDs", |t| {
        (xids(t) == 2.0).then_some(())
    })
    .await;
    append_kmsg_xid(&kernel_log, 3, uptime_us());
    wait_metrics(addr, "the live XID", |t| (xids(t) == 3.0).then_some(())).await;
    let mut events = Vec::new();
    wait_for("three XID events", || {
        collect(&mut rx, &mut events);
        (xid_events(&events).len() == 3).then_some(())
    })
    .await;
    let seen = xid_events(&events);
    let now = razar_gpu::reading::now_ms();
    assert_eq!(
        seen.iter().map(|x| x.0).collect::<Vec<_>>(),
        [true, true, false],
        "{seen:?}"
    );
    for (_, ts) in &seen[..2] {
        let age = now - ts;
        assert!(
            (back_ms - 10_000..back_ms + 100_000).contains(&age),
            "a historical XID has its own time ({back_ms} ms ago), not the agent's: {age} ms"
        );
    }
    assert!((now - seen[2].1).abs() < 60_000);
    daemon.shutdown().await;

    // While the agent is down: one more line.
    append_kmsg_xid(&kernel_log, 4, uptime_us().saturating_sub(1_000_000));

    // Run 2: nothing reported again; the line from the down time once, then a live one.
    let daemon = start_daemon(&dir, &body).await;
    let agent = daemon.agent().clone();
    let addr = agent.local_addr().expect("local endpoint");
    let mut rx = agent.subscribe();
    wait_metrics(addr, "the XID of the down time", |t| {
        (xids(t) >= 1.0).then_some(())
    })
    .await;
    append_kmsg_xid(&kernel_log, 5, uptime_us());
    let mut events = Vec::new();
    wait_for("the live XID after the restart", || {
        collect(&mut rx, &mut events);
        xid_events(&events).iter().any(|x| !x.0).then_some(())
    })
    .await;
    let text = metrics(addr).await;
    assert_eq!(
        xids(&text),
        2.0,
        "after the restart: the down time's XID and the new one, nothing replayed:\n{text}"
    );
    daemon.shutdown().await;
}
