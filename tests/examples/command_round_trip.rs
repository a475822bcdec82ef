//! Command round trip: from `Dispatch::submit` returning (persisted, handed to the
//! connection) to the agent's result stored in PostgreSQL, with N agents connected.
//!
//! Run: `cargo run -p razar-tests --example command_round_trip -- [AGENTS] [COMMANDS_PER_AGENT]`
//! (defaults 20 and 50). Each agent is the real uplink (QUIC, mTLS, its own certificate)
//! answering every command at once with `succeeded`; the collector is the whole
//! [`Service`] on a private PostgreSQL (fsync off, as in the tests). Every agent sends its
//! commands one after another; all agents at once. One poller reads which commands are
//! settled every 2 ms, so figures carry up to ~2 ms of polling granularity. The machine's
//! other load shows in the figures: compare runs on the same machine only.

use anyhow::Context as _;
use razar_agent::spool::Spool;
use razar_agent::uplink::{Backoff, Outbound, Uplink, UplinkConfig};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::dispatch::{CommandRequest, Dispatch};
use razar_collector::service::Service;
use razar_shared::domain::ComponentState;
use razar_shared::protocol::{
    CommandAction, CommandId, CommandOutcome, CommandResult, ComponentInfo,
};
use razar_tests::ca::TestCa;
use razar_tests::pg::TestPg;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Waiting = Arc<Mutex<HashMap<CommandId, (Instant, oneshot::Sender<Duration>)>>>;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let per_agent: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let dir = tempfile::tempdir()?;
    let mut ca = TestCa::new()?;
    let pg = TestPg::start().await?;
    pg.store().await?.close().await;
    let pool = pg.pool().await?;
    let quic_port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut c = CollectorConfig::defaults(&dir.path().join("collector"));
    c.quic_listen = ([127, 0, 0, 1], quic_port).into();
    c.http_listen = ([127, 0, 0, 1], 0).into();
    c.tls = TlsPaths {
        ca: ca.ca_path(),
        cert: ca.collector().cert_path.clone(),
        key: ca.collector().key_path.clone(),
        crl: Some(ca.crl_path()),
    };
    c.database = Database::Url(pg.url());
    c.pool_size = NonZeroU32::new(8).context("pool size")?;
    let service = Service::start(c).await?;

    let mut links = Vec::new();
    for i in 0..agents {
        let host = format!("bench-{i:04}");
        let issued = ca.agent(&host)?;
        let spool = Arc::new(Spool::open(
            dir.path().join(format!("{host}.redb")),
            u64::MAX,
        )?);
        let tls = ca.client_config(&issued)?;
        let mut config = UplinkConfig::new(
            format!("127.0.0.1:{quic_port}"),
            "localhost",
            Arc::new(tls),
            host.clone(),
        );
        config.backoff =
            Backoff::try_new(Duration::from_millis(50), Duration::from_millis(400), 0.5)?;
        config.hello.components = vec![ComponentInfo {
            name: "web".into(),
            revision: "1".into(),
            state: ComponentState::Ready,
            critical: false,
        }];
        let (uplink, mut commands) = Uplink::spawn(config, spool)?;
        links.push(tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                uplink.send(Outbound::CommandResult(CommandResult {
                    id: command.id,
                    finished_ms: razar_tests::fixtures::now_ms(),
                    outcome: CommandOutcome::Succeeded,
                    message: "done".into(),
                }));
            }
        }));
    }
    let started = Instant::now();
    while service.collector().agents_connected() < agents {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let waiting: Waiting = Arc::default();
    let poller = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            loop {
                let ids: Vec<Vec<u8>> = {
                    let w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                    w.keys().map(|id| id.to_vec()).collect()
                };
                if !ids.is_empty() {
                    let done: Vec<Vec<u8>> = sqlx::query_scalar(
                        "SELECT command_id FROM commands
                         WHERE command_id = ANY($1) AND state NOT IN ('queued', 'sent')",
                    )
                    .bind(&ids)
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_default();
                    let now = Instant::now();
                    let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                    for id in done {
                        let Ok(id) = CommandId::try_from(id.as_slice()) else {
                            continue;
                        };
                        if let Some((t0, tx)) = w.remove(&id) {
                            let _ = tx.send(now.saturating_duration_since(t0));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let dispatch = service.collector().dispatch();
    let run_started = Instant::now();
    let mut senders = Vec::new();
    for i in 0..agents {
        let (dispatch, waiting) = (dispatch.clone(), waiting.clone());
        senders.push(tokio::spawn(async move {
            round_trips(dispatch, waiting, format!("bench-{i:04}"), per_agent).await
        }));
    }
    let mut all = Vec::new();
    for s in senders {
        all.extend(s.await??);
    }
    let elapsed = run_started.elapsed();
    poller.abort();
    all.sort();
    let pick = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "command round trip (submit -> result stored), {agents} agents x {per_agent} commands: \
         n={} p50={:.1} ms p99={:.1} ms max={:.1} ms; {:.0} commands/s",
        all.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3,
        all.len() as f64 / elapsed.as_secs_f64(),
    );
    for link in links {
        link.abort();
    }
    service.shutdown().await;
    Ok(())
}

/// One agent's commands, one after another: each from `submit` to its result stored.
async fn round_trips(
    dispatch: Dispatch,
    waiting: Waiting,
    host: String,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let record = dispatch
            .submit(CommandRequest {
                host: host.clone(),
                action: CommandAction::Restart {
                    component: "web".into(),
                },
                deadline: chrono::Utc::now() + chrono::Duration::seconds(60),
                caller: "bench".into(),
                idempotency_key: None,
                request_id: None,
            })
            .await?;
        let (tx, rx) = oneshot::channel();
        waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id, (t0, tx));
        times.push(
            tokio::time::timeout(Duration::from_secs(60), rx)
                .await
                .context("no result within 60 s")??,
        );
    }
    Ok(times)
}
