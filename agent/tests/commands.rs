//! The command executor, on a real agent, real processes and the real redb store: a
//! command delivered twice (also after the agent restarts) runs once and answers with
//! its first outcome; an interrupted command answers as interrupted, never "unknown";
//! records are pruned; a rollback returns a component to its previous revision and holds
//! across reloads until the file changes that component; a log follow ends on cancel.

mod support;

use razar_agent::commands::{Executor, ExecutorOptions};
use razar_agent::store::{CommandRecord, Store};
use razar_agent::supervisor::runtime::{Agent, AgentOptions};
use razar_agent::uplink::Outbound;
use razar_shared::domain::ComponentState::*;
use razar_shared::protocol::{Command, CommandAction, CommandOutcome, RevisionSpec};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::sync::mpsc;

fn far() -> i64 {
    i64::MAX / 2
}

fn command(id: u8, action: CommandAction) -> Command {
    Command {
        id: [id; 16],
        deadline_ms: far(),
        action,
    }
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

fn executor(
    agent: &Agent,
    store: &Arc<Store>,
) -> (
    Executor<mpsc::UnboundedSender<Outbound>>,
    mpsc::UnboundedReceiver<Outbound>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = ExecutorOptions {
        retention: Duration::from_secs(3600),
        follow_limit: Duration::from_secs(600),
        start_wait: Duration::from_secs(60),
    };
    (
        Executor::new(agent.clone(), store.clone(), Arc::new(tx), options),
        rx,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_runs_once_and_answers_its_first_outcome() {
    let dir = Dir::new();
    let body = "[[component]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"1000.61\"]\n";
    let (agent, store) = agent_with(&dir, body).await;
    let first_pid = wait_state(&agent, "web", Ready).await.pid;
    let (exec, _rx) = executor(&agent, &store);

    let restart = command(
        1,
        CommandAction::Restart {
            component: "web".into(),
        },
    );
    let first = exec.execute(restart.clone()).await;
    assert_eq!(first.outcome, CommandOutcome::Succeeded, "{first:?}");
    let second_pid = wait_for("web restarted", || {
        status(&agent, "web").filter(|s| s.state == Ready && s.pid != first_pid)
    })
    .await
    .pid;

    let again = exec.execute(restart.clone()).await;
    assert_eq!(again.outcome, CommandOutcome::Duplicate);
    assert_eq!(
        again.finished_ms, first.finished_ms,
        "the original finish time"
    );
    assert_eq!(again.message, format!("succeeded: {}", first.message));
    assert_eq!(
        status(&agent, "web").and_then(|s| s.pid),
        second_pid,
        "not run twice"
    );

    // A command to a component that is not configured: refused with a reason, recorded.
    let ghost = exec
        .execute(command(
            2,
            CommandAction::Stop {
                component: "ghost".into(),
            },
        ))
        .await;
    assert_eq!(ghost.outcome, CommandOutcome::Failed);
    assert!(ghost.message.contains("ghost"), "{}", ghost.message);

    // The agent restarts (the store is reopened): the redelivery still answers the
    // first outcome. A command the previous agent died in the middle of answers as
    // interrupted, not "started, unknown".
    agent.shutdown().await;
    drop(exec);
    drop(agent);
    let data_dir = dir.join("data");
    wait_for("store released", || {
        Arc::strong_count(&store).eq(&1).then_some(())
    })
    .await;
    drop(store);
    store_claim(&data_dir, 3);
    let (agent, store) = agent_with(&dir, body).await;
    let pid = wait_state(&agent, "web", Ready).await.pid;
    let (exec, _rx) = executor(&agent, &store);
    let redelivered = exec.execute(restart).await;
    assert_eq!(redelivered.outcome, CommandOutcome::Duplicate);
    assert_eq!(redelivered.message, format!("succeeded: {}", first.message));
    let interrupted = exec
        .execute(command(
            3,
            CommandAction::Restart {
                component: "web".into(),
            },
        ))
        .await;
    assert_eq!(interrupted.outcome, CommandOutcome::Duplicate);
    assert!(
        interrupted.message.starts_with("failed: interrupted"),
        "{}",
        interrupted.message
    );
    assert_eq!(
        status(&agent, "web").and_then(|s| s.pid),
        pid,
        "nothing re-ran"
    );

    // Pruning forgets records older than the retention.
    assert_eq!(store.prune_commands(i64::MAX).expect("prune"), 3);
    assert!(store.command(&[1; 16]).expect("read").is_none());
    agent.shutdown().await;
}

/// What a crash in the middle of a command leaves: the claim, never the final record.
fn store_claim(data_dir: &std::path::Path, id: u8) {
    let store = Store::open(data_dir).expect("store");
    let claim = CommandRecord {
        outcome: CommandOutcome::Failed,
        finished_ms: 1,
        message: "interrupted: the agent stopped before the command finished".into(),
    };
    assert!(store
        .record_command(&[id; 16], &claim)
        .expect("claim")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_returns_to_the_previous_revision_until_the_file_changes() {
    let dir = Dir::new();
    let spec = |rev: &str, arg: &str| {
        format!("[[component]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"{arg}\"]\nrevision = \"{rev}\"\n")
    };
    let (agent, store) = agent_with(&dir, &spec("v1", "1000.71")).await;
    wait_state(&agent, "web", Ready).await;
    let (exec, _rx) = executor(&agent, &store);
    let (commands, rx) = mpsc::channel(8);
    let results = tokio::spawn(exec.run(rx));
    // The executor records what runs when it starts.
    wait_for("v1 recorded", || {
        let history = store.revision_history("web").ok()?;
        (history.len() == 1).then_some(())
    })
    .await;

    // v2 is deployed through the file; the executor records it on the reload.
    dir.write_config(&spec("v2", "1000.72"));
    agent.reload().await.expect("reload");
    wait_for("v2 running", || {
        let pids = processes_with("sleep 1000.72");
        (pids.len() == 1).then_some(())
    })
    .await;
    wait_for("v2 recorded", || {
        let history = store.revision_history("web").ok()?;
        (history.len() == 2).then_some(())
    })
    .await;

    let (exec2, mut out) = executor(&agent, &store);
    let result = exec2
        .execute(command(
            9,
            CommandAction::Rollback {
                component: "web".into(),
                revision: "previous".into(),
            },
        ))
        .await;
    assert_eq!(result.outcome, CommandOutcome::Succeeded, "{result:?}");
    assert!(result.message.contains("v2 → v1"), "{}", result.message);
    wait_for("v1 running again", || {
        (processes_with("sleep 1000.71").len() == 1 && processes_with("sleep 1000.72").is_empty())
            .then_some(())
    })
    .await;
    assert_eq!(
        agent
            .view()
            .config()
            .component("web")
            .map(|c| c.revision.clone()),
        Some("v1".into())
    );
    assert!(
        dir.join("data/pins/web.toml").exists(),
        "the pin is a visible file"
    );

    // A reload of the unchanged file keeps the rollback.
    agent.reload().await.expect("reload");
    assert_eq!(
        agent
            .view()
            .config()
            .component("web")
            .map(|c| c.revision.clone()),
        Some("v1".into())
    );
    assert_eq!(processes_with("sleep 1000.71").len(), 1);

    // An unknown revision is refused with the known ones.
    let bad = exec2
        .execute(command(
            10,
            CommandAction::Rollback {
                component: "web".into(),
                revision: "v9".into(),
            },
        ))
        .await;
    assert_eq!(bad.outcome, CommandOutcome::Failed);
    assert!(
        bad.message.contains("v1") && bad.message.contains("v2"),
        "{}",
        bad.message
    );

    // The operator changes the file: their new spec wins, the pin goes.
    dir.write_config(&spec("v3", "1000.73"));
    agent.reload().await.expect("reload");
    wait_for("v3 running", || {
        (processes_with("sleep 1000.73").len() == 1).then_some(())
    })
    .await;
    assert!(!dir.join("data/pins/web.toml").exists());

    // A follow ends on cancel, with a last chunk marked `end`.
    let tail = exec2
        .execute(command(
            11,
            CommandAction::TailLogs {
                component: "web".into(),
                lines: 10,
                follow: true,
            },
        ))
        .await;
    assert_eq!(tail.outcome, CommandOutcome::Succeeded, "{tail:?}");
    let cancel = exec2
        .execute(command(12, CommandAction::CancelTail { command: [11; 16] }))
        .await;
    assert_eq!(cancel.outcome, CommandOutcome::Succeeded, "{cancel:?}");
    let ended = tokio::time::timeout(DEADLINE, async {
        while let Some(message) = out.recv().await {
            if let Outbound::LogChunk(chunk) = message {
                if chunk.command == [11; 16] && chunk.end {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(ended, Ok(true), "the follow ended with an end chunk");

    drop(commands);
    let _ = results.await;
    agent.shutdown().await;
}

fn deploy_action(component: &str, version: &str, arg: &str) -> CommandAction {
    CommandAction::DeployRevision {
        component: component.into(),
        revision: RevisionSpec {
            version: version.into(),
            command: "sh".into(),
            args: vec!["-c".into(), format!("exec sleep {arg}")],
            env: vec![("RAZAR_DEPLOYED".into(), version.into())],
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_revision_runs_survives_a_restart_and_rolls_back_to_the_previous() {
    let dir = Dir::new();
    let spec = |rev: &str, arg: &str| {
        format!(
            "[[component]]\nname = \"api\"\ncommand = \"sleep\"\nargs = [\"{arg}\"]\nrevision = \"{rev}\"\n\
             [component.readiness]\nkind = \"exec\"\ncommand = [\"true\"]\ninterval = \"100ms\"\n\n\
             [[component]]\nname = \"side\"\ncommand = \"sleep\"\nargs = [\"1000.69\"]\n"
        )
    };
    let (agent, store) = agent_with(&dir, &spec("v1", "1000.81")).await;
    wait_state(&agent, "api", Ready).await;
    let (exec, _out) = executor(&agent, &store);

    // v2 is pushed: the component restarts on it, with the pushed env and the file's probe.
    let result = exec
        .execute(command(20, deploy_action("api", "v2", "1000.82")))
        .await;
    assert_eq!(result.outcome, CommandOutcome::Succeeded, "{result:?}");
    assert!(result.message.contains("v1 → v2"), "{}", result.message);
    wait_for("v2 running alone", || {
        (processes_with("sleep 1000.82").len() == 1 && processes_with("sleep 1000.81").is_empty())
            .then_some(())
    })
    .await;
    let config = agent.view().config();
    let api = config.component("api").expect("api configured");
    assert_eq!(api.revision, "v2");
    assert!(api.readiness.is_some(), "the file's probe stays");
    assert!(dir.join("data/pins/api.toml").exists(), "held as a pin");
    let history = store.revision_history("api").expect("history");
    let labels: Vec<&str> = history.iter().map(|r| r.revision.as_str()).collect();
    assert_eq!(labels, ["v1", "v2"], "both revisions are in the history");

    // Delivered again: not run again, the first outcome answers.
    let again = exec
        .execute(command(20, deploy_action("api", "v2", "1000.82")))
        .await;
    assert_eq!(again.outcome, CommandOutcome::Duplicate, "{again:?}");
    assert!(again.message.starts_with("succeeded"), "{}", again.message);
    assert_eq!(processes_with("sleep 1000.82").len(), 1);

    // What an agent restart runs: the file with its pins.
    let (effective, notes) =
        razar_agent::revisions::load_effective(&config.path).expect("effective config");
    assert_eq!(
        effective.component("api").map(|c| c.revision.as_str()),
        Some("v2"),
        "{notes:?}"
    );

    // Unknown component, and a spec that does not validate: refused with the reason,
    // nothing changes.
    let unknown = exec
        .execute(command(21, deploy_action("nope", "v2", "1")))
        .await;
    assert_eq!(unknown.outcome, CommandOutcome::Failed);
    assert!(unknown.message.contains("nope"), "{}", unknown.message);
    let mut empty = deploy_action("api", "v3", "1");
    if let CommandAction::DeployRevision { revision, .. } = &mut empty {
        revision.command.clear();
    }
    let bad = exec.execute(command(22, empty)).await;
    assert_eq!(bad.outcome, CommandOutcome::Failed, "{bad:?}");
    assert_eq!(
        agent
            .view()
            .config()
            .component("api")
            .map(|c| c.revision.clone()),
        Some("v2".into())
    );

    // Rollback to the previous revision: v1 again.
    let back = exec
        .execute(command(
            23,
            CommandAction::Rollback {
                component: "api".into(),
                revision: "previous".into(),
            },
        ))
        .await;
    assert_eq!(back.outcome, CommandOutcome::Succeeded, "{back:?}");
    assert!(back.message.contains("v2 → v1"), "{}", back.message);
    wait_for("v1 running again", || {
        (processes_with("sleep 1000.81").len() == 1 && processes_with("sleep 1000.82").is_empty())
            .then_some(())
    })
    .await;
    // The other component was never restarted.
    assert_eq!(processes_with("sleep 1000.69").len(), 1);
    assert_eq!(agent.statuses().get("side").map(|s| s.restarts), Some(0));
    agent.shutdown().await;
}
