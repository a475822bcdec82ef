//! Restart latency: a component (`sleep`) is killed with SIGKILL again and again; we time
//! kill → new pid (a new live child of the supervisor, read from /proc) and, for the agent,
//! kill → ready (exec readiness probe). Anchors from the same run and the same command:
//! runit's `runsv` on a service dir and supervisord (autorestart, startsecs=0).
//!
//! `cargo bench -p razar-agent --bench restart_latency`
//! Env: RAZAR_BENCH_KILLS (default 100), RAZAR_BENCH_SUPERVISORD_KILLS (default 10:
//! supervisord waits out about a second per restart), RAZAR_BENCH_SPACING_MS (default
//! 1100: each victim lives this long before the kill, since runsv delays the restart of a
//! process that lived under a second). About four minutes with the defaults.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DEADLINE: Duration = Duration::from_secs(20);

/// Kills the supervisor's child `kills` times; returns kill → new pid durations and the
/// wall-clock kill times (ms) for the agent's ready figure.
fn measure(
    supervisor: u32,
    kills: usize,
    after: &mut dyn FnMut(i64, u32),
) -> (Vec<Duration>, Vec<(i64, u32)>) {
    let mut took = Vec::with_capacity(kills);
    let mut kill_times = Vec::with_capacity(kills);
    let spacing = Duration::from_millis(env_usize("RAZAR_BENCH_SPACING_MS", 1100) as u64);
    let mut current = wait_child(supervisor, None);
    let mut born = Instant::now();
    for _ in 0..kills {
        // runsv waits a second before restarting a process that lived less than one:
        // every victim lives `spacing` before it is killed, for every supervisor alike.
        std::thread::sleep(spacing.saturating_sub(born.elapsed()));
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let start = Instant::now();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(current as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let next = wait_child(supervisor, Some(current));
        took.push(start.elapsed());
        born = Instant::now();
        kill_times.push((wall, next));
        after(wall, next);
        current = next;
    }
    (took, kill_times)
}

/// Spins until `supervisor` has a live child other than `old`.
fn wait_child(supervisor: u32, old: Option<u32>) -> u32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(p) = children(supervisor).into_iter().find(|p| Some(*p) != old) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "supervisor {supervisor} started no new child"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

fn report(name: &str, samples: &mut [Duration]) {
    let (median, p95, max) = summary(samples);
    println!("{name:<28} n={:<4} kill→new pid  median {median:7.2} ms  p95 {p95:7.2} ms  max {max:7.2} ms", samples.len());
}

fn main() {
    let kills = env_usize("RAZAR_BENCH_KILLS", 100);
    let sd_kills = env_usize("RAZAR_BENCH_SUPERVISORD_KILLS", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    println!("restart latency: `sleep 1000` killed with SIGKILL, same machine, same run");

    // razar-agent (the real binary), backoff starting at zero, exec readiness probe.
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndata_dir = \"{0}/data\"\nlog_dir = \"{0}/logs\"\nlisten = \"127.0.0.1:0\"\n\
             [[component]]\nname = \"victim\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n\
             [component.readiness]\nkind = \"exec\"\ncommand = [\"true\"]\ninterval = \"10ms\"\n\
             [component.restart]\ninitial_backoff = \"0s\"\nmax_backoff = \"0s\"\njitter = 0.0\n\
             [component.give_up]\nmax_failures = 1000000\nwindow = \"1s\"\n",
            d.display()
        ),
    )
    .expect("config");
    let agent = Command::new(env!("CARGO_BIN_EXE_razar-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("razar-agent");
    let addr_file = d.join("data/agent.addr");
    let mut ready: Vec<Duration> = Vec::new();
    // Kill → ready from the agent's own record of entering `ready` (ms resolution),
    // read from /health after each new pid.
    let mut ready_after = |wall: i64, pid: u32| {
        let addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Some(v) = http_get(addr.trim(), "/health")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            {
                let c = &v["components"][0];
                if c["state"] == "ready" && c["pid"].as_u64() == Some(u64::from(pid)) {
                    let since = c["since_ms"].as_i64().unwrap_or(wall);
                    ready.push(Duration::from_millis((since - wall).max(0) as u64));
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let (mut agent_took, _) = measure(agent.id(), kills, &mut ready_after);
    stop(agent);

    // runsv on a service directory.
    let service = d.join("sv");
    std::fs::create_dir_all(&service).expect("sv dir");
    std::fs::write(service.join("run"), "#!/bin/sh\nexec sleep 1000\n").expect("run script");
    std::fs::set_permissions(
        service.join("run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let runsv = Command::new("runsv")
        .arg(&service)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut runsv_took = match runsv {
        Ok(child) => {
            let (took, _) = measure(child.id(), kills, &mut |_, _| {});
            for p in children(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            stop(child);
            took
        }
        Err(e) => {
            println!("runsv not available ({e}); install Debian package `runit`");
            Vec::new()
        }
    };

    // supervisord, autorestart, startsecs=0.
    let conf = d.join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "[supervisord]\nnodaemon=true\nlogfile={0}/supervisord.log\npidfile={0}/supervisord.pid\nuser=root\n\
             [program:victim]\ncommand=sleep 1000\nautorestart=true\nstartsecs=0\nstartretries=1000000\n",
            d.display()
        ),
    )
    .expect("supervisord.conf");
    let supervisord = Command::new("supervisord")
        .args(["-n", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut sd_took = match supervisord {
        Ok(child) => {
            let (took, _) = measure(child.id(), sd_kills, &mut |_, _| {});
            stop(child);
            took
        }
        Err(e) => {
            println!("supervisord not available ({e}); install Debian package `supervisor`");
            Vec::new()
        }
    };

    report("razar-agent", &mut agent_took);
    if !ready.is_empty() {
        let (median, p95, max) = summary(&mut ready);
        println!("{:<28} n={:<4} kill→ready    median {median:7.2} ms  p95 {p95:7.2} ms  max {max:7.2} ms (exec probe; ms resolution)", "razar-agent", ready.len());
    }
    if !runsv_took.is_empty() {
        report("runsv (anchor)", &mut runsv_took);
    }
    if !sd_took.is_empty() {
        report("supervisord (anchor)", &mut sd_took);
    }
}
