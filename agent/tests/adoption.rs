//! A component keeps running, and its output keeps being captured, across a SIGKILL and
//! restart of the real `razar-agent` binary: its stdout and stderr are named pipes that
//! outlive the agent. Every wait has a deadline; every process started is ended on failure.

mod support;

use std::path::Path;
use support::*;

/// Kills a component's process group when the test ends, however it ends (a SIGKILLed
/// agent leaves its components behind).
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

/// The tick numbers in a component's live log file (`<ms> out tick <n>` lines), in order.
fn ticks(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split(' ');
            let (_, stream, word, n) = (words.next()?, words.next()?, words.next()?, words.next()?);
            (stream == "out" && word == "tick")
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect()
}

/// The last tick the component says it has written (its counter file, replaced by rename).
fn count(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn ticker_config(dir: &Dir, counter: &Path) -> std::path::PathBuf {
    // Writes "tick <i>" to stdout, then records i: once the counter says i, tick i is
    // in the pipe.
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo \"tick $i\"; echo $i > {c}.tmp; mv {c}.tmp {c}; sleep 0.1; done",
        c = counter.display()
    );
    dir.write_config(&format!(
        "[[component]]\nname = \"ticker\"\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\n"
    ))
}

#[test]
fn adopted_component_survives_agent_sigkill_and_its_output_is_captured_again() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = Dir::new();
    let counter = dir.join("count");
    let log = dir.join("logs/ticker.log");
    let config = ticker_config(&dir, &counter);

    let mut agent = AgentProcess::spawn(&config);
    let (_, pid) = rt.block_on(wait_for("ticker ready", || {
        agent.component("ticker").filter(|c| c.0 == "ready")
    }));
    let pid = pid.expect("ticker pid") as u32;
    let _group = GroupGuard(pid);
    for stream in ["out", "err"] {
        let fifo = dir.join(&format!("data/stdio/ticker.{stream}"));
        let meta = std::fs::symlink_metadata(&fifo).expect("named pipe exists");
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        assert!(meta.file_type().is_fifo(), "{} is a FIFO", fifo.display());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    rt.block_on(wait_for("ticks captured by the first agent", || {
        (ticks(&log).len() >= 3).then_some(())
    }));

    agent.kill9();
    // Read after the agent is dead: every tick after the next one is written with no
    // agent reading (the next one may have been written just before the kill).
    let at_kill = rt.block_on(wait_for("counter", || count(&counter)));
    rt.block_on(wait_for("five ticks written with no agent", || {
        (count(&counter)? >= at_kill + 5 || !alive(pid)).then_some(())
    }));
    assert!(
        alive(pid),
        "the component died writing with no agent (SIGPIPE?)"
    );

    let mut agent = AgentProcess::spawn(&config);
    let (_, again) = rt.block_on(wait_for("ticker ready again", || {
        agent.component("ticker").filter(|c| c.0 == "ready")
    }));
    assert_eq!(again, Some(u64::from(pid)), "the live process was adopted");
    let at_restart = rt.block_on(wait_for("counter", || count(&counter)));
    let last = at_restart + 10;
    let seen = rt.block_on(wait_for(
        "ticks written after the restart in the log",
        || {
            let seen = ticks(&log);
            seen.contains(&last).then_some(seen)
        },
    ));
    // What was written while no agent ran (held in the pipe) and after the restart is
    // all there, once each, in order.
    let from = at_kill + 2;
    let got: Vec<u64> = seen
        .iter()
        .copied()
        .filter(|t| (from..=last).contains(t))
        .collect();
    assert_eq!(got, (from..=last).collect::<Vec<_>>());
    assert!(alive(pid), "the adopted component still runs");
    assert_eq!(
        agent.component("ticker").and_then(|c| c.1),
        Some(u64::from(pid)),
        "and was not restarted"
    );

    // Still supervised: a SIGTERM to the agent stops it.
    assert_eq!(agent.terminate(), Some(0));
    rt.block_on(wait_for("adopted ticker stopped", || {
        (!alive(pid)).then_some(())
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_pipes_are_removed_with_their_component() {
    let dir = Dir::new();
    let body = |with_b: bool| {
        let mut text =
            "[[component]]\nname = \"a\"\ncommand = \"sleep\"\nargs = [\"1000.6\"]\n".to_owned();
        if with_b {
            text.push_str(
                "[[component]]\nname = \"b\"\ncommand = \"sleep\"\nargs = [\"1000.7\"]\n",
            );
        }
        text
    };
    let agent = start(dir.config(&body(true))).await;
    wait_state(&agent, "a", razar_shared::domain::ComponentState::Ready).await;
    let b = wait_state(&agent, "b", razar_shared::domain::ComponentState::Ready).await;
    let fifo = |name: &str| dir.join(&format!("data/stdio/{name}.out"));
    assert!(fifo("a").exists() && fifo("b").exists());
    dir.write_config(&body(false));
    assert_eq!(agent.reload().await.expect("reload"), ["b"]);
    wait_for("b's pipes removed", || {
        (!fifo("b").exists() && !dir.join("data/stdio/b.err").exists()).then_some(())
    })
    .await;
    assert!(!alive(b.pid.expect("b pid")));
    assert!(fifo("a").exists(), "a's pipes stay");
    agent.shutdown().await;
}
