//! GPU and profile commands on a real agent, real processes and the real redb store,
//! with a fake GPU inventory: a drained GPU's components stop and stay stopped (also
//! across an agent restart) while the others keep running; set healthy starts them
//! again; a reset runs the host's configured reset command (a real child process) and
//! succeeds iff it exits 0, killed at its timeout; an unknown GPU or profile fails with
//! a reason; a profile switch changes what runs.

mod support;

use razar_agent::commands::{Executor, ExecutorOptions};
use razar_agent::store::Store;
use razar_agent::supervisor::machine::Control;
use razar_agent::supervisor::runtime::{Agent, AgentOptions};
use razar_agent::uplink::Outbound;
use razar_shared::domain::ComponentState::*;
use razar_shared::protocol::{Command, CommandAction, CommandOutcome, CommandResult, GpuInfo};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::sync::mpsc;

fn gpus() -> Vec<GpuInfo> {
    (0..3)
        .map(|index| GpuInfo {
            index,
            uuid: format!("GPU-fake-{index}"),
            name: "Fake H100".into(),
            pci_bus_id: format!("0000:0{index}:00.0"),
            memory_total_bytes: 80 << 30,
        })
        .collect()
}

async fn agent_with(dir: &Dir, body: &str) -> (Agent, Arc<Store>) {
    let config = dir.config(body);
    let store = Arc::new(Store::open(&config.agent.data_dir).expect("store"));
    let agent = Agent::start(
        config,
        AgentOptions {
            store: Some(store.clone()),
            serve_http: false,
            listen: None,
        },
    )
    .await
    .expect("agent starts");
    (agent, store)
}

fn executor(agent: &Agent, store: &Arc<Store>) -> Executor<mpsc::UnboundedSender<Outbound>> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let options = ExecutorOptions {
        retention: Duration::from_secs(3600),
        follow_limit: Duration::from_secs(600),
        start_wait: Duration::from_secs(60),
    };
    Executor::new(agent.clone(), store.clone(), Arc::new(tx), options).with_gpus(gpus())
}

async fn run(
    exec: &Executor<mpsc::UnboundedSender<Outbound>>,
    id: u8,
    action: CommandAction,
) -> CommandResult {
    exec.execute(Command {
        id: [id; 16],
        deadline_ms: i64::MAX / 2,
        action,
    })
    .await
}

const COMPONENTS: &str = "[[component]]\nname = \"train0\"\ncommand = \"sleep\"\nargs = [\"1000.71\"]\ngpus = [0]\nstop_grace = \"2s\"\n\n\
[[component]]\nname = \"train1\"\ncommand = \"sleep\"\nargs = [\"1000.72\"]\ngpus = [1]\nstop_grace = \"2s\"\n\n\
[[component]]\nname = \"both\"\ncommand = \"sleep\"\nargs = [\"1000.73\"]\ngpus = [0, 1]\nstop_grace = \"2s\"\n\n\
[[component]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"1000.74\"]\nstop_grace = \"2s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gpu_keeps_its_components_stopped_across_restarts_until_set_healthy() {
    let dir = Dir::new();
    let (agent, store) = agent_with(&dir, COMPONENTS).await;
    for name in ["train0", "train1", "both", "web"] {
        wait_state(&agent, name, Ready).await;
    }
    let train1 = status(&agent, "train1").and_then(|s| s.pid);
    let web = status(&agent, "web").and_then(|s| s.pid);
    let exec = executor(&agent, &store);

    // Unknown GPUs fail with a reason naming the known ones; nothing is touched.
    for (id, gpu) in [(1, "7"), (2, "GPU-nope"), (3, "")] {
        let r = run(
            &exec,
            id,
            CommandAction::DrainGpu {
                gpu: gpu.into(),
                note: "x".into(),
            },
        )
        .await;
        assert_eq!(r.outcome, CommandOutcome::Failed, "{r:?}");
        assert!(r.message.contains("GPU-fake-0"), "{}", r.message);
    }
    assert!(agent.view().drained_gpus().is_empty());

    let r = run(
        &exec,
        4,
        CommandAction::DrainGpu {
            gpu: "0".into(),
            note: "xid 79".into(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Succeeded, "{r:?}");
    // Answered once they are down.
    assert_eq!(status(&agent, "train0").map(|s| s.state), Some(Stopped));
    assert_eq!(status(&agent, "both").map(|s| s.state), Some(Stopped));
    assert_eq!(status(&agent, "train1").and_then(|s| s.pid), train1);
    assert_eq!(status(&agent, "web").and_then(|s| s.pid), web);
    assert_eq!(status(&agent, "train1").map(|s| s.state), Some(Ready));
    // A start of a held component is refused with why.
    let refused = agent.command("train0", Control::Start).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("GPU 0 is drained")),
        "{refused:?}"
    );
    let health = razar_agent::local_api::health_of(&agent);
    assert_eq!(health.status, "degraded");
    assert_eq!(health.drained_gpus.len(), 1);
    assert_eq!(health.drained_gpus[0].uuid, "GPU-fake-0");
    assert_eq!(health.drained_gpus[0].note, "xid 79");
    assert!(
        health.problems.iter().any(|p| p.contains("GPU 0 drained")),
        "{:?}",
        health.problems
    );

    // The agent restarts: the drain is durable, its components never start.
    agent.shutdown().await;
    drop(exec);
    drop(agent);
    wait_for("store released", || {
        Arc::strong_count(&store).eq(&1).then_some(())
    })
    .await;
    drop(store);
    let (agent, store) = agent_with(&dir, COMPONENTS).await;
    wait_state(&agent, "train1", Ready).await;
    wait_state(&agent, "web", Ready).await;
    wait_state(&agent, "train0", Stopped).await;
    wait_state(&agent, "both", Stopped).await;
    assert_eq!(
        status(&agent, "train0").and_then(|s| s.pid),
        None,
        "a held component is never started"
    );
    assert!(agent.view().drained_gpus().contains_key(&0));
    let exec = executor(&agent, &store);

    // Draining GPU 1 too; lifting GPU 0 (by UUID) starts train0 only: `both` is still
    // held by GPU 1.
    let r = run(
        &exec,
        5,
        CommandAction::SetGpuHealth {
            gpu: "1".into(),
            healthy: false,
            note: "operator".into(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Succeeded, "{r:?}");
    assert_eq!(status(&agent, "train1").map(|s| s.state), Some(Stopped));
    let r = run(
        &exec,
        6,
        CommandAction::SetGpuHealth {
            gpu: "gpu-FAKE-0".into(),
            healthy: true,
            note: String::new(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Succeeded, "{r:?}");
    wait_state(&agent, "train0", Ready).await;
    assert_eq!(status(&agent, "both").map(|s| s.state), Some(Stopped));
    let r = run(
        &exec,
        7,
        CommandAction::SetGpuHealth {
            gpu: "1".into(),
            healthy: true,
            note: String::new(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Succeeded, "{r:?}");
    wait_state(&agent, "both", Ready).await;
    wait_state(&agent, "train1", Ready).await;
    assert!(agent.view().drained_gpus().is_empty());
    assert_eq!(razar_agent::local_api::health_of(&agent).status, "ok");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_drains_then_runs_the_configured_command_which_decides_the_outcome() {
    let dir = Dir::new();
    // The reset action: a real child process, given the GPU by argv placeholders. GPU 0
    // resets fine, GPU 1 fails, GPU 2 hangs past the timeout.
    let script = dir.join("reset.sh");
    std::fs::write(
        &script,
        format!(
            "case \"$1\" in 0) touch \"{d}/reset-$1-$2\" ;; 1) echo 'reset refused' >&2; exit 3 ;; *) sleep 60.77 ;; esac\n",
            d = dir.path().display()
        ),
    )
    .expect("script");
    let body = format!(
        "[gpu]\nreset_command = [\"sh\", \"{}\", \"{{index}}\", \"{{uuid}}\"]\nreset_timeout = \"2s\"\n\n{COMPONENTS}",
        script.display()
    );
    let (agent, store) = agent_with(&dir, &body).await;
    for name in ["train0", "train1", "web"] {
        wait_state(&agent, name, Ready).await;
    }
    let exec = executor(&agent, &store);

    let r = run(&exec, 1, CommandAction::ResetGpu { gpu: "0".into() }).await;
    assert_eq!(r.outcome, CommandOutcome::Succeeded, "{r:?}");
    assert!(
        dir.join("reset-0-GPU-fake-0").exists(),
        "ran with the GPU's index and uuid"
    );
    assert_eq!(status(&agent, "train0").map(|s| s.state), Some(Stopped));
    assert!(
        agent.view().drained_gpus().contains_key(&0),
        "the GPU stays drained after a reset"
    );
    assert_eq!(status(&agent, "web").map(|s| s.state), Some(Ready));

    let r = run(
        &exec,
        2,
        CommandAction::ResetGpu {
            gpu: "GPU-fake-1".into(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Failed, "{r:?}");
    assert!(r.message.contains("reset refused"), "{}", r.message);
    assert!(agent.view().drained_gpus().contains_key(&1));

    let r = run(&exec, 3, CommandAction::ResetGpu { gpu: "2".into() }).await;
    assert_eq!(r.outcome, CommandOutcome::Failed, "{r:?}");
    assert!(r.message.contains("timed out"), "{}", r.message);
    wait_for("the hung reset command killed", || {
        processes_with("sleep 60.77").is_empty().then_some(())
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_without_a_configured_command_fails_and_a_profile_switch_changes_what_runs() {
    let dir = Dir::new();
    let body = "[[component]]\nname = \"core-svc\"\ncommand = \"sleep\"\nargs = [\"1000.75\"]\nprofiles = [\"core\"]\n\n\
[[component]]\nname = \"vision-svc\"\ncommand = \"sleep\"\nargs = [\"1000.76\"]\nprofiles = [\"vision\"]\n";
    let (agent, store) = agent_with(&dir, body).await;
    wait_state(&agent, "core-svc", Ready).await;
    let exec = executor(&agent, &store);

    let r = run(&exec, 1, CommandAction::ResetGpu { gpu: "0".into() }).await;
    assert_eq!(r.outcome, CommandOutcome::Failed, "{r:?}");
    assert!(r.message.contains("gpu.reset_command"), "{}", r.message);

    let r = run(
        &exec,
        2,
        CommandAction::SwitchProfile {
            profile: "gaming".into(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Failed, "{r:?}");
    assert!(
        r.message.contains("unknown profile `gaming`"),
        "{}",
        r.message
    );

    let r = run(
        &exec,
        3,
        CommandAction::SwitchProfile {
            profile: "vision".into(),
        },
    )
    .await;
    assert_eq!(r.outcome, CommandOutcome::Succeeded, "{r:?}");
    wait_state(&agent, "vision-svc", Ready).await;
    wait_for("core-svc removed", || {
        status(&agent, "core-svc").is_none().then_some(())
    })
    .await;
    assert_eq!(agent.view().config().agent.profile, "vision");
    // Durable: the effective config at the next start runs the switched profile.
    let (effective, _) =
        razar_agent::profile::load_effective(&dir.join("agent.toml")).expect("config");
    assert_eq!(effective.agent.profile, "vision");
    agent.shutdown().await;
}
