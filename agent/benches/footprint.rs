//! Footprint: the real `razar-agent` binary supervising 50 components (`sleep`) with 1 s
//! resource sampling, its /metrics scraped once per second, for 60 s. Reported: the
//! agent's Pss and RSS at the end and its CPU seconds over the window (the agent process
//! only, not its children). Anchor in the same run and window:
//! `prometheus-node-exporter` on loopback, scraped once per second.
//!
//! `cargo bench -p razar-agent --bench footprint`  (env RAZAR_BENCH_SECS, default 60)

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const COMPONENTS: usize = 50;

fn main() {
    let secs = env_usize("RAZAR_BENCH_SECS", 60) as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut text = format!(
        "[agent]\ndata_dir = \"{0}/data\"\nlog_dir = \"{0}/logs\"\nlisten = \"127.0.0.1:0\"\nsample_interval = \"1s\"\n",
        d.display()
    );
    for i in 0..COMPONENTS {
        text.push_str(&format!(
            "[[component]]\nname = \"c{i}\"\ncommand = \"sleep\"\nargs = [\"100{i}\"]\n"
        ));
    }
    let config = d.join("agent.toml");
    std::fs::write(&config, text).expect("config");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_razar-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("razar-agent");
    let addr_file = d.join("data/agent.addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    while children(agent.id()).len() < COMPONENTS {
        assert!(Instant::now() < deadline, "components did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent_addr = std::fs::read_to_string(&addr_file)
        .expect("agent address")
        .trim()
        .to_owned();

    let ne_addr = "127.0.0.1:19100";
    let node_exporter = Command::new("prometheus-node-exporter")
        .arg(format!("--web.listen-address={ne_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut node_exporter = match node_exporter {
        Ok(c) => Some(c),
        Err(e) => {
            println!("prometheus-node-exporter not available ({e}); no anchor");
            None
        }
    };
    // Let both settle, then measure one window.
    std::thread::sleep(Duration::from_secs(2));
    let ne_pid = node_exporter.as_ref().map(|c| c.id());
    let agent_cpu0 = cpu_seconds(agent.id());
    let ne_cpu0 = ne_pid.map(cpu_seconds);
    let start = Instant::now();
    let mut scrapes = 0u32;
    while start.elapsed() < Duration::from_secs(secs) {
        let tick = Instant::now();
        if http_get(&agent_addr, "/metrics").is_some() {
            scrapes += 1;
        }
        if ne_pid.is_some() {
            let _ = http_get(ne_addr, "/metrics");
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    let window = start.elapsed().as_secs_f64();
    let agent_cpu = cpu_seconds(agent.id()) - agent_cpu0;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("footprint over {window:.0} s, {COMPONENTS} components, 1 s sampling, /metrics scraped every second ({scrapes} scrapes)");
    println!(
        "{:<30} Pss {:6.1} MiB  RSS {:6.1} MiB  CPU {:6.2} s = {:5.2} % of one core",
        "razar-agent",
        mib(pss_bytes(agent.id())),
        mib(rss_bytes(agent.id())),
        agent_cpu,
        100.0 * agent_cpu / window
    );
    if let (Some(pid), Some(cpu0)) = (ne_pid, ne_cpu0) {
        let cpu = cpu_seconds(pid) - cpu0;
        println!(
            "{:<30} Pss {:6.1} MiB  RSS {:6.1} MiB  CPU {:6.2} s = {:5.2} % of one core",
            "node_exporter (anchor)",
            mib(pss_bytes(pid)),
            mib(rss_bytes(pid)),
            cpu,
            100.0 * cpu / window
        );
    }
    if let Some(c) = node_exporter.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
}
