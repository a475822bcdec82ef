//! Decision path benchmark (issue 12): commands and the decision engine with many agents
//! connected, then a fault-injection run of mixed scenarios.
//!
//! Run: `cargo run --release -p razar-tests --example decision_bench -- [AGENTS]
//! [FAULTS] [FAULT_RATE] [ENGINE_TICK_MS] [SCENARIOS]` (defaults 1000, 200, 5, 1000 and
//! 300; AGENTS 0 runs only the scenarios).
//!
//! End to end (real): AGENTS in-process agents, each the real uplink (QUIC, mTLS, its
//! own certificate, its own redb spool) announcing one GPU and the component `web`, and
//! answering every command at once with `succeeded`; the collector is the whole
//! [`Service`] on a private PostgreSQL (fsync off, as in the tests) with its engine
//! woken by committed events (at most every 20 ms; ENGINE_TICK_MS is its fallback
//! tick) and
//! the circuit breaker's limits out of the way (this part measures the path; the
//! breaker is exercised by the scenarios). Printed:
//! - command round trip, `Dispatch::submit` called → result stored, with 1, 10 and 100
//!   commands in flight (each sender's next command after its previous result); anchor:
//!   a bare PostgreSQL INSERT + SELECT round trip on the same pool at the same
//!   concurrency;
//! - FAULTS hardware XIDs (79, one per host, FAULT_RATE a second) spooled by the agent
//!   (an attributed `GpuFault` event, the agent's fault fast path) → the engine's
//!   decision on it visible in PostgreSQL; → the corrective command (the GPU drain)
//!   received by the agent; → its result stored. Not included: the agent's own wait
//!   from the GPU raising the fault to spooling it (`fault_bench` measures that).
//!   Pollers read every 2-5 ms, so figures carry that granularity.
//!
//! Scenarios (simulated): SCENARIOS mixed scenarios, each on a fresh fleet of 8 hosts
//! with 2 GPUs each, driven through the pure `razar-engine` crate (`decide`) on a
//! simulated clock with the default rules: revision faults (a new revision failing on
//! every host it reached), hardware XIDs (48, 74, 79, during a healthy rollout or not),
//! XID 13 repeating on one GPU across revisions, host losses, a component flapping on
//! the old revision during a rollout, and mass failures (most hosts lost, or hardware
//! XIDs on most hosts at once). Each is judged against its expected action class;
//! false rollbacks and false GPU quarantines are counted over every scenario. The real
//! end-to-end slice of the fault path is the XID 79 run above.

use anyhow::Context as _;
use razar_agent::spool::Spool;
use razar_agent::uplink::{Backoff, Outbound, Uplink, UplinkConfig};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::dispatch::{CommandRequest, Dispatch};
use razar_collector::service::Service;
use razar_shared::domain::{ComponentState, Severity, XidClass};
use razar_shared::protocol::{
    CommandAction, CommandId, CommandOutcome, CommandResult, ComponentInfo, ComponentRevision,
    Event, EventKind, GpuFault, GpuFaultKind, GpuInfo, GpuRef, Subject,
};
use razar_tests::ca::TestCa;
use razar_tests::fixtures::now_ms;
use razar_tests::pg::TestPg;
use sqlx::PgPool;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Waiting = Arc<Mutex<HashMap<CommandId, (Instant, oneshot::Sender<Duration>)>>>;
/// host → when its corrective command reached the agent.
type Received = Arc<Mutex<HashMap<String, Instant>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut next = |default: u64| -> anyhow::Result<u64> {
        Ok(args
            .next()
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let agents = usize::try_from(next(1000)?)?;
    let faults = usize::try_from(next(200)?)?;
    let rate = next(5)?.max(1);
    let tick_ms = next(1000)?.max(1);
    let scenarios = usize::try_from(next(300)?)?;
    if agents > 0 {
        end_to_end(agents, faults.min(agents), rate, tick_ms).await?;
    }
    if scenarios > 0 {
        scenario::run(scenarios);
    }
    Ok(())
}

fn summary(all: &mut [Duration]) -> String {
    if all.is_empty() {
        return "n=0".into();
    }
    all.sort();
    let pick = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        all.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3,
    )
}

async fn end_to_end(agents: usize, faults: usize, rate: u64, tick_ms: u64) -> anyhow::Result<()> {
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
    c.pool_size = NonZeroU32::new(16).context("pool size")?;
    c.engine.tick = Duration::from_millis(tick_ms);
    c.engine.rules.breaker.max_hosts = 1_000_000;
    c.engine.rules.breaker.max_gpus = 1_000_000;
    c.engine.rules.breaker.max_share_percent = 100;
    let service = Service::start(c).await?;

    let received: Received = Arc::default();
    let mut links = Vec::new();
    let mut uplinks = Vec::new();
    let setup = Instant::now();
    for i in 0..agents {
        let host = format!("dec-{i:04}");
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
        config.backoff = Backoff::try_new(Duration::from_millis(200), Duration::from_secs(2), 0.5)?;
        config.hello.components = vec![ComponentInfo {
            name: "web".into(),
            revision: "1".into(),
            state: ComponentState::Ready,
            critical: false,
        }];
        config.hello.gpus = vec![GpuInfo {
            index: 0,
            uuid: gpu_uuid(&host),
            name: "NVIDIA H100 80GB HBM3".into(),
            pci_bus_id: "00000000:01:00.0".into(),
            memory_total_bytes: 80 << 30,
        }];
        let (uplink, mut commands) = Uplink::spawn(config, spool)?;
        let uplink = Arc::new(uplink);
        uplinks.push((host.clone(), uplink.clone()));
        let received = received.clone();
        links.push(tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                if !matches!(command.action, CommandAction::Restart { .. }) {
                    lock(&received)
                        .entry(host.clone())
                        .or_insert_with(Instant::now);
                }
                uplink.send(Outbound::CommandResult(CommandResult {
                    id: command.id,
                    finished_ms: now_ms(),
                    outcome: CommandOutcome::Succeeded,
                    message: "done".into(),
                }));
            }
        }));
    }
    while service.collector().agents_connected() < agents {
        anyhow::ensure!(
            setup.elapsed() < Duration::from_secs(600),
            "agents did not connect ({} of {agents})",
            service.collector().agents_connected()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{agents} agents connected over QUIC + mTLS in {:.1} s (engine tick {tick_ms} ms)",
        setup.elapsed().as_secs_f64()
    );
    // The engine knows every host's GPU before faults arrive.
    let t = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_health")
            .fetch_one(&pool)
            .await?;
        if usize::try_from(n)? >= agents || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Command round trips, beside a bare INSERT + SELECT on the same pool, at 1, 10
    // and 100 commands in flight (each sender sends its next command when the result
    // of the previous one is stored).
    for senders_n in [1, 10, 100] {
        let senders_n = senders_n.min(agents);
        let per = (1000 / senders_n).clamp(10, 200);
        let anchor = pg_anchor(&pool, senders_n, per).await?;
        let mut rt = command_round_trips(&service, &pool, senders_n, per).await?;
        println!(
            "command round trip (submit -> result stored), {senders_n} in flight x {per} \
             commands, {agents} agents connected: {}",
            summary(&mut rt)
        );
        println!(
            "  anchor, same run: bare PostgreSQL INSERT + SELECT round trip, {senders_n} at once x {per}: {}",
            summary(&mut anchor.clone())
        );
    }

    // Faults.
    let (mut decided, mut got, mut stored, missing) =
        fault_path(&pool, &uplinks, &received, faults, rate).await?;
    println!(
        "{faults} hardware XIDs (79, one per host, {rate}/s), each from its spooling at the agent:"
    );
    println!("  -> decision stored: {}", summary(&mut decided));
    println!(
        "  -> corrective command (drain GPU) received by the agent: {}",
        summary(&mut got)
    );
    println!(
        "  -> corrective command's result stored: {}",
        summary(&mut stored)
    );
    if missing > 0 {
        println!(
            "  NOT complete: {missing} fault(s) without a stored decision and result within 60 s"
        );
    }
    println!(
        "  for scale, same run: the engine's fallback tick = {tick_ms} ms (it is woken by committed events)"
    );

    for link in links {
        link.abort();
    }
    drop(uplinks);
    service.shutdown().await;
    Ok(())
}

fn gpu_uuid(host: &str) -> String {
    format!("GPU-{host}-0")
}

/// `concurrency` tasks, `per` round trips each: INSERT a row, SELECT it back.
async fn pg_anchor(pool: &PgPool, concurrency: usize, per: usize) -> anyhow::Result<Vec<Duration>> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_anchor (id bigserial PRIMARY KEY, body text NOT NULL)",
    )
    .execute(pool)
    .await?;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                let t0 = Instant::now();
                let id: i64 =
                    sqlx::query_scalar("INSERT INTO bench_anchor (body) VALUES ($1) RETURNING id")
                        .bind("restart web")
                        .fetch_one(&pool)
                        .await?;
                let _: String = sqlx::query_scalar("SELECT body FROM bench_anchor WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await?;
                out.push(t0.elapsed());
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

async fn command_round_trips(
    service: &Service,
    pool: &PgPool,
    senders_n: usize,
    per: usize,
) -> anyhow::Result<Vec<Duration>> {
    let waiting: Waiting = Arc::default();
    let poller = {
        let (waiting, pool) = (waiting.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                let ids: Vec<Vec<u8>> = lock(&waiting).keys().map(|id| id.to_vec()).collect();
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
                    let mut w = lock(&waiting);
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
    let mut senders = Vec::new();
    for i in 0..senders_n {
        let (dispatch, waiting) = (dispatch.clone(), waiting.clone());
        senders.push(tokio::spawn(round_trips(
            dispatch,
            waiting,
            format!("dec-{i:04}"),
            per,
        )));
    }
    let mut all = Vec::new();
    for s in senders {
        all.extend(s.await??);
    }
    poller.abort();
    Ok(all)
}

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
        lock(&waiting).insert(record.id, (t0, tx));
        times.push(
            tokio::time::timeout(Duration::from_secs(60), rx)
                .await
                .context("no result within 60 s")??,
        );
    }
    Ok(times)
}

/// Per fault: (decision visible, command received, command result visible) latencies,
/// and how many did not complete.
async fn fault_path(
    pool: &PgPool,
    uplinks: &[(String, Arc<Uplink>)],
    received: &Received,
    faults: usize,
    rate: u64,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>, usize)> {
    // host → when its fault was spooled.
    let raised: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let decided: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let settled: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let last_decision: i64 =
        sqlx::query_scalar("SELECT coalesce(max(decision_id), 0) FROM decisions")
            .fetch_one(pool)
            .await?;
    let poller = {
        let (pool, raised, decided, settled) = (
            pool.clone(),
            raised.clone(),
            decided.clone(),
            settled.clone(),
        );
        tokio::spawn(async move {
            let mut after = last_decision;
            loop {
                let rows: Vec<(i64, String)> = sqlx::query_as(
                    "SELECT d.decision_id, e.host_id FROM decisions d
                     CROSS JOIN LATERAL jsonb_array_elements_text(d.evidence -> 'events') ev(id)
                     JOIN events e ON e.event_id = ev.id::bigint
                     WHERE d.decision_id > $1 AND e.kind = 'xid'",
                )
                .bind(after)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                let now = Instant::now();
                for (id, host) in rows {
                    after = after.max(id);
                    lock(&decided).entry(host).or_insert(now);
                }
                let open: Vec<String> = {
                    let s = lock(&settled);
                    lock(&raised)
                        .keys()
                        .filter(|h| !s.contains_key(*h))
                        .cloned()
                        .collect()
                };
                if !open.is_empty() {
                    let done: Vec<String> = sqlx::query_scalar(
                        "SELECT DISTINCT host_id FROM commands
                         WHERE caller = 'engine' AND host_id = ANY($1)
                           AND state IN ('succeeded', 'failed')",
                    )
                    .bind(&open)
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_default();
                    let now = Instant::now();
                    let mut s = lock(&settled);
                    for h in done {
                        s.entry(h).or_insert(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let gap = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    for (k, (host, uplink)) in uplinks.iter().take(faults).enumerate() {
        tokio::time::sleep_until(start + gap.mul_f64(k as f64)).await;
        let t0 = Instant::now();
        uplink
            .publish(now_ms(), Vec::new(), vec![xid_79(host)])
            .await?;
        lock(&raised).insert(host.clone(), t0);
    }
    let wait = Instant::now();
    loop {
        let complete = {
            let d = lock(&decided);
            let s = lock(&settled);
            let r = lock(&raised);
            r.keys().all(|h| d.contains_key(h) && s.contains_key(h))
        };
        if complete || wait.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    poller.abort();
    let raised = lock(&raised).clone();
    let (d, r, s) = (lock(&decided), lock(received), lock(&settled));
    let mut out = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (host, t0) in &raised {
        let mut complete = true;
        for (map, list) in [(&*d, &mut out.0), (&*r, &mut out.1), (&*s, &mut out.2)] {
            match map.get(host) {
                Some(t) => list.push(t.saturating_duration_since(*t0)),
                None => complete = false,
            }
        }
        if !complete {
            out.3 += 1;
        }
    }
    Ok(out)
}

/// An attributed XID 79 (GPU fallen off the bus) on the host's GPU 0.
fn xid_79(host: &str) -> Event {
    let ts = now_ms();
    Event {
        ts_ms: ts,
        severity: Severity::Critical,
        subject: Subject::Gpu(0),
        kind: EventKind::GpuFault(Box::new(GpuFault {
            fault: GpuFaultKind::Xid {
                xid: 79,
                class: XidClass::RebootHost,
                count: 1,
                first_ms: ts,
                last_ms: ts,
            },
            gpu: GpuRef {
                index: 0,
                uuid: gpu_uuid(host),
                pci_bus_id: "00000000:01:00.0".into(),
            },
            processes: Vec::new(),
            components: vec![ComponentRevision {
                component: "web".into(),
                version: "1".into(),
                spec_hash: "ab".repeat(32),
                pid: None,
            }],
            historical: false,
        })),
        message: "XID 79 (reboot_host): GPU has fallen off the bus".into(),
    }
}

/// The fault-injection run on the pure engine (simulated clock).
mod scenario {
    use razar_engine::{
        decide, Action, EngineConfig, EscalationKind, FailureKind, FleetView, Input,
    };
    use std::collections::{BTreeMap, BTreeSet};

    const HOSTS: usize = 8;
    const MIN: i64 = 60_000;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Kind {
        RevisionFault,
        HardwareXid,
        Xid13AcrossRevisions,
        HostLoss,
        FlappingOldRevision,
        MassHostLoss,
        MassHardwareXids,
    }

    const KINDS: [Kind; 7] = [
        Kind::RevisionFault,
        Kind::HardwareXid,
        Kind::Xid13AcrossRevisions,
        Kind::HostLoss,
        Kind::FlappingOldRevision,
        Kind::MassHostLoss,
        Kind::MassHardwareXids,
    ];

    /// What a scenario must produce.
    struct Expect {
        /// Hosts that must be rolled back (and no others).
        rollback: BTreeSet<String>,
        /// GPUs that may be quarantined; `must_quarantine` of them at least.
        quarantine: BTreeSet<String>,
        must_quarantine: usize,
        /// An escalation of this kind must be raised.
        escalation: Option<EscalationKind>,
        /// The breaker must open: at most this many hosts touched by disruptive actions.
        breaker: Option<usize>,
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// `base` hosts and up to `extra - 1` more, at random.
        fn some_hosts(&mut self, base: usize, extra: usize) -> Vec<usize> {
            let n = base + self.below(extra);
            self.hosts(n)
        }
        fn hosts(&mut self, n: usize) -> Vec<usize> {
            let mut all: Vec<usize> = (0..HOSTS).collect();
            for i in (1..all.len()).rev() {
                all.swap(i, self.below(i + 1));
            }
            all.truncate(n);
            all
        }
    }

    fn h(i: usize) -> String {
        format!("h{i}")
    }
    fn g(i: usize, gpu: usize) -> String {
        format!("h{i}-g{gpu}")
    }

    /// 8 hosts with two H100s each: `llm` on g0, `embed` on g1, both v1.
    fn fleet() -> FleetView {
        let mut v = match FleetView::new(EngineConfig::default()) {
            Ok(v) => v,
            Err(e) => panic!("default engine config: {e}"),
        };
        for i in 0..HOSTS {
            let (g0, g1) = (g(i, 0), g(i, 1));
            v.add_gpu(&h(i), &g0, 0, "H100");
            v.add_gpu(&h(i), &g1, 1, "H100");
            v.add_component(&h(i), "llm", "v1", None, 0, &[&g0]);
            v.add_component(&h(i), "embed", "v1", None, 0, &[&g1]);
        }
        v
    }

    fn started(i: usize, event: i64) -> Input {
        Input::RevisionStarted {
            host: h(i),
            component: "llm".into(),
            revision: "v2".into(),
            gpus: vec![g(i, 0)],
            event,
        }
    }

    fn xid(i: usize, gpu: usize, code: u32, revision: &str, event: i64) -> Input {
        let component = if gpu == 0 { "llm" } else { "embed" };
        Input::XidObserved {
            host: h(i),
            gpu: g(i, gpu),
            xid: code,
            revisions: vec![(component.into(), revision.into())],
            message: None,
            event,
        }
    }

    fn failed(i: usize, revision: &str, kind: FailureKind, event: i64) -> Input {
        Input::ComponentFailed {
            host: h(i),
            component: "llm".into(),
            revision: revision.into(),
            kind,
            event,
        }
    }

    fn none() -> Expect {
        Expect {
            rollback: BTreeSet::new(),
            quarantine: BTreeSet::new(),
            must_quarantine: 0,
            escalation: None,
            breaker: None,
        }
    }

    /// The inputs (at simulated times) and what they must produce.
    fn build(kind: Kind, rng: &mut Rng) -> (Vec<(i64, Input)>, Expect) {
        let mut steps = Vec::new();
        let mut ev = 0i64;
        let mut id = || {
            ev += 1;
            ev
        };
        let mut expect = none();
        match kind {
            Kind::RevisionFault => {
                // A rollout reaches 2-4 hosts; the new revision fails the same way on
                // each of them (crash loop, liveness or an application XID, one kind per
                // scenario); the others stay on v1.
                let hosts = rng.some_hosts(2, 3);
                for (k, &i) in hosts.iter().enumerate() {
                    steps.push((MIN + k as i64 * 1000, started(i, id())));
                }
                let how = rng.below(4);
                for (k, &i) in hosts.iter().enumerate() {
                    let at = 5 * MIN + k as i64 * 2000;
                    let input = match how {
                        0 => failed(i, "v2", FailureKind::CrashLoop, id()),
                        1 => failed(i, "v2", FailureKind::Liveness, id()),
                        2 => xid(i, 0, 13, "v2", id()),
                        _ => xid(i, 0, 31, "v2", id()),
                    };
                    steps.push((at, input));
                }
                expect.rollback = hosts.iter().map(|&i| h(i)).collect();
            }
            Kind::HardwareXid => {
                // Maybe a healthy rollout meanwhile; a hardware XID on one GPU.
                let rollout = rng.some_hosts(0, 4);
                for (k, &i) in rollout.iter().enumerate() {
                    steps.push((MIN + k as i64 * 1000, started(i, id())));
                }
                let i = rng.below(HOSTS);
                let gpu = rng.below(2);
                let code = [48, 74, 79][rng.below(3)];
                let rev = if gpu == 0 && rollout.contains(&i) {
                    "v2"
                } else {
                    "v1"
                };
                steps.push((5 * MIN, xid(i, gpu, code, rev, id())));
                expect.quarantine.insert(g(i, gpu));
                expect.must_quarantine = 1;
            }
            Kind::Xid13AcrossRevisions => {
                // XID 13 on one GPU under v1, the rollout reaches that host (and maybe
                // one more), XID 13 again on the same GPU under v2: hardware, not v2.
                let hosts = rng.some_hosts(1, 2);
                let i = hosts[0];
                steps.push((MIN, xid(i, 0, 13, "v1", id())));
                for (k, &j) in hosts.iter().enumerate() {
                    steps.push((2 * MIN + k as i64 * 1000, started(j, id())));
                }
                steps.push((3 * MIN, xid(i, 0, 13, "v2", id())));
                expect.quarantine.insert(g(i, 0));
                expect.must_quarantine = 1;
            }
            Kind::HostLoss => {
                // 1-3 hosts lost (under the breaker's limit), some come back.
                let hosts = rng.some_hosts(1, 3);
                for (k, &i) in hosts.iter().enumerate() {
                    steps.push((
                        MIN + k as i64 * 5000,
                        Input::HostLost {
                            host: h(i),
                            event: id(),
                        },
                    ));
                }
                for (k, &i) in hosts.iter().enumerate() {
                    if rng.below(2) == 0 {
                        steps.push((
                            10 * MIN + k as i64 * 1000,
                            Input::HostBack {
                                host: h(i),
                                event: id(),
                            },
                        ));
                    }
                }
                expect.escalation = Some(EscalationKind::HostLost);
            }
            Kind::FlappingOldRevision => {
                // A rollout to 2-3 hosts; a host still on v1 crash-loops until the agent
                // gives up: the old revision's trouble, not the new one's.
                let hosts = rng.hosts(4);
                let (rollout, flapper) = (&hosts[..2 + rng.below(2)], hosts[3]);
                for (k, &i) in rollout.iter().enumerate() {
                    steps.push((MIN + k as i64 * 1000, started(i, id())));
                }
                let flaps = 2 + rng.below(5);
                for k in 0..flaps {
                    steps.push((
                        2 * MIN + k as i64 * 10_000,
                        failed(flapper, "v1", FailureKind::CrashLoop, id()),
                    ));
                }
                steps.push((
                    2 * MIN + flaps as i64 * 10_000,
                    failed(flapper, "v1", FailureKind::GaveUp, id()),
                ));
                expect.escalation = Some(EscalationKind::ComponentQuarantined);
            }
            Kind::MassHostLoss => {
                // 6-8 of 8 hosts lost within seconds.
                let hosts = rng.some_hosts(6, 3);
                for (k, &i) in hosts.iter().enumerate() {
                    steps.push((
                        MIN + k as i64 * 500,
                        Input::HostLost {
                            host: h(i),
                            event: id(),
                        },
                    ));
                }
                expect.escalation = Some(EscalationKind::BreakerOpen);
                expect.breaker = Some(0);
            }
            Kind::MassHardwareXids => {
                // Hardware XIDs on 6-8 hosts within a minute: at most the breaker's
                // limit (5 hosts) acted on, the rest held.
                let hosts = rng.some_hosts(6, 3);
                for (k, &i) in hosts.iter().enumerate() {
                    let code = [48, 74, 79][rng.below(3)];
                    steps.push((MIN + k as i64 * 5000, xid(i, 0, code, "v1", id())));
                    expect.quarantine.insert(g(i, 0));
                }
                expect.must_quarantine = 1;
                expect.escalation = Some(EscalationKind::BreakerOpen);
                expect.breaker = Some(EngineConfig::default().breaker.max_hosts as usize);
            }
        }
        // Time passes afterwards (cool-downs are 15 min: still within them).
        let end = steps.iter().map(|(t, _)| *t).max().unwrap_or(0);
        steps.push((end + MIN, Input::Tick));
        (steps, expect)
    }

    #[derive(Default)]
    struct Tally {
        runs: usize,
        correct: usize,
    }

    pub fn run(n: usize) {
        let started = std::time::Instant::now();
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut by_kind: BTreeMap<Kind, Tally> = BTreeMap::new();
        let (mut false_rollbacks, mut false_quarantines, mut inputs) = (0usize, 0usize, 0usize);
        let mut wrong = Vec::new();
        for k in 0..n {
            let kind = KINDS[k % KINDS.len()];
            let (steps, expect) = build(kind, &mut rng);
            let mut view = fleet();
            let mut actions = Vec::new();
            for (now, input) in &steps {
                actions.extend(decide(&mut view, input, *now));
                inputs += 1;
            }
            let rolled: BTreeSet<String> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::RollBack { host, .. } => Some(host.clone()),
                    _ => None,
                })
                .collect();
            let quarantined: BTreeSet<String> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::QuarantineGpu { gpu, .. } => Some(gpu.clone()),
                    _ => None,
                })
                .collect();
            let touched: BTreeSet<&str> = actions
                .iter()
                .filter(|a| a.is_disruptive())
                .filter_map(Action::host)
                .collect();
            let escalated = |kind: EscalationKind| {
                actions
                    .iter()
                    .any(|a| matches!(a, Action::Escalate { key, .. } if key.kind == kind))
            };
            let fr = rolled.difference(&expect.rollback).count();
            let fq = quarantined.difference(&expect.quarantine).count();
            false_rollbacks += fr;
            false_quarantines += fq;
            let mut ok = fr == 0 && fq == 0 && rolled == expect.rollback;
            ok &= quarantined.len() >= expect.must_quarantine;
            if let Some(kind) = expect.escalation {
                ok &= escalated(kind);
            }
            if let Some(limit) = expect.breaker {
                ok &= touched.len() <= limit;
            } else if expect.rollback.is_empty() && expect.quarantine.is_empty() {
                // Nothing disruptive expected: nothing disruptive done.
                ok &= touched.is_empty();
            }
            let t = by_kind.entry(kind).or_default();
            t.runs += 1;
            if ok {
                t.correct += 1;
            } else if wrong.len() < 5 {
                wrong.push(format!(
                    "  scenario {k} {kind:?}: rolled back {rolled:?}, quarantined {quarantined:?}, \
                     hosts touched {touched:?}; actions {:?}",
                    actions.iter().map(Action::describe).collect::<Vec<_>>()
                ));
            }
        }
        let correct: usize = by_kind.values().map(|t| t.correct).sum();
        println!(
            "fault injection: {n} mixed scenarios ({inputs} inputs) on the pure razar-engine, \
             simulated clock, default rules, fleets of {HOSTS} hosts x 2 GPUs (not end to end; \
             the end-to-end slice is the XID 79 run above), {:.0} ms:",
            started.elapsed().as_secs_f64() * 1e3
        );
        println!(
            "  correct action class: {correct}/{n} ({:.1} %); false rollbacks: {false_rollbacks}; \
             false GPU quarantines: {false_quarantines}",
            100.0 * correct as f64 / n.max(1) as f64
        );
        for (kind, t) in &by_kind {
            println!("  {kind:?}: {}/{} correct", t.correct, t.runs);
        }
        for w in wrong {
            println!("{w}");
        }
    }
}
