//! Group commit of telemetry across connections: a small fixed set of writer tasks fed
//! by one bounded channel of requests (one agent's batches each, with a reply channel).
//!
//! A writer waits for one request, then takes whatever else is already queued (up to
//! [`GroupConfig::max_samples`] samples or [`GroupConfig::max_hosts`] hosts) and stores
//! the whole group in one transaction ([`Store::ingest_group`]); each request is answered
//! with its own outcome after the commit, or every request of a failed group with the
//! group's error (nothing of it was stored: the connections retry). While every writer
//! is busy, requests pile up in the channel and the next group takes them all: the
//! busier the database, the fewer and larger the commits.
//!
//! - Validation is per request and runs in the caller's task before it is queued: an
//!   invalid request fails alone ([`GroupError::Refused`]).
//! - A group holds at most one request per host; a second request of a host already in
//!   the group waits for the next group, keeping its place in the order.
//! - A group the database refuses outright (an error answered to a statement, which
//!   could come from one request's data) is retried request by request, so one bad
//!   request cannot hold up the others. A request the database still refuses alone
//!   with a data error (SQLSTATE class 22, 23 or 54: the store boundary let something
//!   through that it refuses) is written batch by batch, and each batch it refuses so
//!   is set aside in `rejected_batches` ([`Store::reject_batch`]) and acknowledged: no
//!   batch can stall a host. Other errors (connection, serialization, locks) fail the
//!   request, and the connection retries it with backoff.
//! - Back-pressure: the channel is bounded, so callers wait when the writers are behind.
//! - At most [`GroupConfig::copy_slots`] writers run their samples' `COPY` at once; the
//!   others meanwhile lock cursors, build their rows or commit. Every `COPY` appends to
//!   the same day's heap, and past a few of them they mostly wait on its extension lock.

use crate::store::{Checked, IngestItem, IngestOutcome, IngestRules, SeriesMap, Store, StoreError};
use crate::supervise::{Beat, Tasks};
use chrono::Utc;
use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};
use razar_shared::protocol::Batch;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tokio::task::JoinHandle;

/// How the group writer runs. [`GroupConfig::default`] gives the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// Writer tasks, each with at most one transaction open (at least 1; keep it below
    /// the database pool's size).
    pub writers: usize,
    /// Most samples in one group; a single request with more is a group alone.
    pub max_samples: usize,
    /// Most hosts (requests) in one group.
    pub max_hosts: usize,
    /// Requests waiting for a writer before callers wait (the channel's bound).
    pub queue: usize,
    /// Writers whose samples' `COPY` may run at once (at least 1). Every `COPY` appends
    /// to the same day's heap: beyond a few, they queue on its extension lock with the
    /// CPU idle. The rest of each transaction (cursor locks, commit) overlaps freely.
    pub copy_slots: usize,
}

impl Default for GroupConfig {
    /// 8 writers, 3 `COPY`s at once, groups of at most 50,000 samples or 256 hosts,
    /// 1,024 requests queued.
    fn default() -> GroupConfig {
        GroupConfig {
            writers: 8,
            max_samples: 50_000,
            max_hosts: 256,
            queue: 1_024,
            copy_slots: 3,
        }
    }
}

/// Why a request was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The request itself is refused (undefined series, sequence out of range):
    /// retrying cannot help. Nothing of it was stored.
    #[error(transparent)]
    Refused(StoreError),
    /// The transaction of the request's group failed (every request of the group gets
    /// the same error); nothing of the group was stored. Retry.
    #[error("group commit failed: {0}")]
    Failed(Arc<StoreError>),
    /// The writers have stopped (the collector is shutting down) or dropped the request
    /// unanswered; nothing of it is known to be stored.
    #[error("the ingest writers have stopped")]
    Stopped,
}

/// The group writer's metrics.
#[derive(Debug, Clone)]
pub struct GroupMetrics {
    /// `razar_collector_ingest_commits_total`: transactions committed.
    pub commits: IntCounter,
    /// `razar_collector_ingest_commit_hosts`: hosts whose batches one commit stored.
    pub commit_hosts: Histogram,
    /// `razar_collector_ingest_commit_samples`: samples one commit stored.
    pub commit_samples: Histogram,
    /// `razar_collector_ingest_group_failures_total`: group transactions that failed.
    pub failures: IntCounter,
}

impl GroupMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<GroupMetrics, prometheus::Error> {
        let m = GroupMetrics {
            commits: IntCounter::new(
                "razar_collector_ingest_commits_total",
                "Ingest transactions committed (each stores the batches of one or more hosts).",
            )?,
            commit_hosts: Histogram::with_opts(
                HistogramOpts::new(
                    "razar_collector_ingest_commit_hosts",
                    "Hosts whose batches one ingest commit stored.",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                ]),
            )?,
            commit_samples: Histogram::with_opts(
                HistogramOpts::new(
                    "razar_collector_ingest_commit_samples",
                    "Samples one ingest commit stored.",
                )
                .buckets(vec![
                    100.0, 1_000.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0, 100_000.0, 250_000.0,
                ]),
            )?,
            failures: IntCounter::new(
                "razar_collector_ingest_group_failures_total",
                "Ingest group transactions that failed (their requests are retried).",
            )?,
        };
        registry.register(Box::new(m.commits.clone()))?;
        registry.register(Box::new(m.commit_hosts.clone()))?;
        registry.register(Box::new(m.commit_samples.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        Ok(m)
    }
}

/// One agent's batches waiting for a writer.
struct Request {
    host: String,
    batches: Arc<Vec<Batch>>,
    series: Arc<SeriesMap>,
    /// Its window and the days of its samples (from the check).
    checked: Checked,
    samples: usize,
    reply: oneshot::Sender<Result<IngestOutcome, GroupError>>,
}

/// The handle connections queue their batches on; cheap to clone. The writers stop
/// once every handle is dropped and the queue is empty.
#[derive(Debug, Clone)]
pub struct GroupWriter {
    requests: mpsc::Sender<Request>,
    /// The store's rules, for each request's window of sample times.
    rules: IngestRules,
}

impl GroupWriter {
    /// Starts `config.writers` writer tasks on `store`; returns the handle and the tasks.
    pub fn start(
        store: Store,
        config: GroupConfig,
        metrics: GroupMetrics,
    ) -> (GroupWriter, Vec<JoinHandle<()>>) {
        Self::spawn(store, config, metrics, None)
    }

    /// [`GroupWriter::start`] with each writer supervised by `tasks` as
    /// `ingest_writer_<n>`: a writer that panics is counted, shown in health and
    /// restarted (the requests of its group are answered [`GroupError::Stopped`], and
    /// their connections retry); each group written is a completed run.
    pub fn start_supervised(
        store: Store,
        config: GroupConfig,
        metrics: GroupMetrics,
        tasks: &Arc<Tasks>,
    ) -> (GroupWriter, Vec<JoinHandle<()>>) {
        Self::spawn(store, config, metrics, Some(tasks))
    }

    fn spawn(
        store: Store,
        config: GroupConfig,
        metrics: GroupMetrics,
        tasks: Option<&Arc<Tasks>>,
    ) -> (GroupWriter, Vec<JoinHandle<()>>) {
        let limits = Limits {
            max_samples: config.max_samples.max(1),
            max_hosts: config.max_hosts.max(1),
            writers: config.writers.max(1),
        };
        let (requests, rx) = mpsc::channel(config.queue.max(1));
        let queue = Arc::new(Mutex::new(Queue {
            rx,
            deferred: VecDeque::new(),
        }));
        let rules = store.rules();
        let writer = Writer {
            store,
            metrics,
            copy_slots: Arc::new(Semaphore::new(config.copy_slots.max(1))),
        };
        let tasks = (0..config.writers.max(1))
            .map(|n| match tasks {
                Some(tasks) => {
                    let (writer, queue) = (writer.clone(), queue.clone());
                    tasks.spawn(&format!("ingest_writer_{n}"), None, None, move |beat| {
                        let run = run_writer(writer.clone(), queue.clone(), limits, Some(beat));
                        async move {
                            run.await;
                            Ok::<(), std::convert::Infallible>(())
                        }
                    })
                }
                None => tokio::spawn(run_writer(writer.clone(), queue.clone(), limits, None)),
            })
            .collect();
        (GroupWriter { requests, rules }, tasks)
    }

    /// Stores `batches` of `host` in the next group commit and returns its outcome after
    /// the commit (only then may the caller acknowledge `outcome.cursor`). The request is
    /// checked here first: an invalid one is refused without being queued. Waits while
    /// the queue is full. The writers drop their reference to `batches` before they
    /// answer, so the caller gets sole ownership back (for a retry) once this returns.
    pub async fn ingest(
        &self,
        host: String,
        batches: Arc<Vec<Batch>>,
        series: Arc<SeriesMap>,
    ) -> Result<IngestOutcome, GroupError> {
        let item = IngestItem {
            host: &host,
            batches: &batches,
            series: &series,
        };
        let window = self.rules.window(Utc::now().timestamp_millis());
        let checked = item.check(window).map_err(GroupError::Refused)?;
        let samples = item.sample_count();
        let (reply, answer) = oneshot::channel();
        let request = Request {
            host,
            batches,
            series,
            checked,
            samples,
            reply,
        };
        if self.requests.send(request).await.is_err() {
            return Err(GroupError::Stopped);
        }
        answer.await.unwrap_or(Err(GroupError::Stopped))
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_samples: usize,
    max_hosts: usize,
    /// A group takes at most its writer's share of what is waiting (see `next_group`).
    writers: usize,
}

/// The channel and the requests put back for a later group, shared by the writers: the
/// writer holding it collects the next group.
struct Queue {
    rx: mpsc::Receiver<Request>,
    /// Requests left out of a group (their host was in it, or it was full), in order.
    deferred: VecDeque<Request>,
}

/// A group being collected.
#[derive(Default)]
struct Group {
    requests: Vec<Request>,
    hosts: HashSet<String>,
    samples: usize,
}

enum Fit {
    Yes,
    /// Its host is in the group already.
    SameHost,
    /// The group is full.
    Full,
}

impl Group {
    fn fit(&self, request: &Request, limits: Limits) -> Fit {
        if self.requests.is_empty() {
            Fit::Yes
        } else if self.requests.len() >= limits.max_hosts
            || self.samples.saturating_add(request.samples) > limits.max_samples
        {
            Fit::Full
        } else if self.hosts.contains(&request.host) {
            Fit::SameHost
        } else {
            Fit::Yes
        }
    }

    fn push(&mut self, request: Request) {
        self.samples = self.samples.saturating_add(request.samples);
        self.hosts.insert(request.host.clone());
        self.requests.push(request);
    }
}

impl Queue {
    /// The next group: deferred requests first, then one awaited request, then whatever
    /// is already queued, within the limits. `None` once every sender is gone and
    /// nothing is left.
    async fn next_group(&mut self, limits: Limits) -> Option<Vec<Request>> {
        let mut group = Group::default();
        let mut kept = VecDeque::new();
        while let Some(request) = self.deferred.pop_front() {
            match group.fit(&request, limits) {
                Fit::Yes => group.push(request),
                Fit::SameHost => kept.push_back(request),
                Fit::Full => {
                    kept.push_back(request);
                    break;
                }
            }
        }
        kept.append(&mut self.deferred);
        self.deferred = kept;
        if group.requests.is_empty() {
            group.push(self.rx.recv().await?);
        }
        // A writer takes its share of the waiting requests, not all of them: a connection
        // sends its next request only after its last one committed, so one group holding
        // every host's request would leave the other writers (and the database's other
        // cores) idle until it commits.
        let waiting = group.requests.len() + self.deferred.len() + self.rx.len();
        let share = waiting.div_ceil(limits.writers).min(limits.max_hosts);
        loop {
            if group.requests.len() >= share || group.samples >= limits.max_samples {
                break;
            }
            let Ok(request) = self.rx.try_recv() else {
                break;
            };
            match group.fit(&request, limits) {
                Fit::Yes => group.push(request),
                Fit::SameHost => self.deferred.push_back(request),
                Fit::Full => {
                    self.deferred.push_back(request);
                    break;
                }
            }
        }
        Some(group.requests)
    }
}

/// What every writer task shares.
#[derive(Clone)]
struct Writer {
    store: Store,
    metrics: GroupMetrics,
    copy_slots: Arc<Semaphore>,
}

/// One writer: ends once every sender is gone and the queue is empty. `beat` marks each
/// group written (its liveness for health).
async fn run_writer(writer: Writer, queue: Arc<Mutex<Queue>>, limits: Limits, beat: Option<Beat>) {
    loop {
        let group = {
            let mut queue = queue.lock().await;
            queue.next_group(limits).await
        };
        let Some(group) = group else {
            return;
        };
        write_group(&writer, group).await;
        if let Some(beat) = &beat {
            beat.ok();
        }
    }
}

/// Stores one group and answers each of its requests.
async fn write_group(writer: &Writer, group: Vec<Request>) {
    match commit(writer, &group).await {
        Ok(outcomes) => {
            for (request, outcome) in group.into_iter().zip(outcomes) {
                answer(request, Ok(outcome));
            }
        }
        Err(e) if group.len() > 1 && matches!(e, StoreError::Db(sqlx::Error::Database(_))) => {
            // The server refused a statement of the group: possibly one request's data
            // (text it cannot store, say). Each request alone, so only that one fails.
            tracing::warn!(error = %e, requests = group.len(), "group commit refused; writing its requests one by one");
            for request in group {
                let result = write_alone(writer, &request, None).await;
                answer(request, result.map_err(|e| GroupError::Failed(Arc::new(e))));
            }
        }
        Err(e) if e.is_data_error() => {
            // One request, refused for its data: set aside what the database refuses.
            if let Some(request) = group.into_iter().next() {
                let result = write_alone(writer, &request, Some(e)).await;
                answer(request, result.map_err(|e| GroupError::Failed(Arc::new(e))));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, requests = group.len(), "group commit failed");
            let e = Arc::new(e);
            for request in group {
                answer(request, Err(GroupError::Failed(e.clone())));
            }
        }
    }
}

/// Stores one request in a transaction of its own (unless `refused` already says how
/// that went); if the database refuses it for its data, its batches are written one by
/// one and each one refused so is set aside ([`set_aside`]).
async fn write_alone(
    writer: &Writer,
    request: &Request,
    refused: Option<StoreError>,
) -> Result<IngestOutcome, StoreError> {
    let error = match refused {
        Some(e) => e,
        None => match commit(writer, std::slice::from_ref(request)).await {
            Ok(mut outcomes) => {
                return outcomes
                    .pop()
                    .ok_or(StoreError::Db(sqlx::Error::RowNotFound))
            }
            Err(e) => e,
        },
    };
    if !error.is_data_error() {
        return Err(error);
    }
    set_aside(writer, request, error).await
}

/// Writes a request the database refused for its data batch by batch, in order; each
/// batch it refuses alone with a data error goes to `rejected_batches` and the cursor
/// moves past it. Returns the combined outcome, or the first other error (what was
/// committed before it stays committed: a retry finds those batches duplicates).
async fn set_aside(
    writer: &Writer,
    request: &Request,
    error: StoreError,
) -> Result<IngestOutcome, StoreError> {
    tracing::warn!(host = %request.host, error = %error, batches = request.batches.len(), "the database refused a request's data; writing its batches one by one");
    let store = &writer.store;
    let mut total = IngestOutcome::default();
    for batch in request.batches.iter() {
        let item = IngestItem {
            host: &request.host,
            batches: std::slice::from_ref(batch),
            series: &request.series,
        };
        // Checked again alone (it passed with the request): its own days and window.
        let written = match item.check(request.checked.window) {
            Ok(checked) => {
                store
                    .ingest_checked(&[item], &[checked], Some(&writer.copy_slots))
                    .await
            }
            Err(e) => Err(e),
        };
        let outcome = match written {
            Ok(commit) => commit.outcomes.into_iter().next().unwrap_or_default(),
            Err(e) if e.is_data_error() => store.reject_batch(&request.host, batch, &e).await?,
            Err(e) => return Err(e),
        };
        total.then(&outcome);
    }
    Ok(total)
}

/// One transaction for `group`; counts it.
async fn commit(writer: &Writer, group: &[Request]) -> Result<Vec<IngestOutcome>, StoreError> {
    let metrics = &writer.metrics;
    let items: Vec<IngestItem<'_>> = group
        .iter()
        .map(|r| IngestItem {
            host: &r.host,
            batches: &r.batches,
            series: &r.series,
        })
        .collect();
    let checked: Vec<Checked> = group.iter().map(|r| r.checked.clone()).collect();
    match writer
        .store
        .ingest_checked(&items, &checked, Some(&writer.copy_slots))
        .await
    {
        Ok(commit) => {
            if commit.committed {
                let stored = commit.outcomes.iter().filter(|o| o.batches_stored > 0);
                let (hosts, samples) =
                    stored.fold((0u64, 0u64), |(h, s), o| (h + 1, s + o.samples));
                metrics.commits.inc();
                metrics.commit_hosts.observe(hosts as f64);
                metrics.commit_samples.observe(samples as f64);
            }
            Ok(commit.outcomes)
        }
        Err(e) => {
            metrics.failures.inc();
            Err(e)
        }
    }
}

/// Answers a request; its batches are released first, so the caller owns them alone
/// when it reads the answer.
fn answer(request: Request, result: Result<IngestOutcome, GroupError>) {
    let Request { batches, reply, .. } = request;
    drop(batches);
    // The caller may be gone (its connection closed): nothing to do then.
    let _ = reply.send(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: &str, samples: usize) -> Request {
        let (reply, _answer) = oneshot::channel();
        Request {
            host: host.to_owned(),
            batches: Arc::new(Vec::new()),
            series: Arc::new(SeriesMap::default()),
            checked: Checked {
                window: IngestRules::default().window(0),
                days: Vec::new(),
                inside: Vec::new(),
            },
            samples,
            reply,
        }
    }

    /// Queues `requests`, then collects groups until the queue is empty; returns each
    /// group as (host, samples) pairs.
    async fn check(limits: Limits, requests: &[(&str, usize)], expected: &[&[(&str, usize)]]) {
        let (tx, rx) = mpsc::channel(64);
        let mut queue = Queue {
            rx,
            deferred: VecDeque::new(),
        };
        for &(host, samples) in requests {
            tx.send(request(host, samples)).await.unwrap();
        }
        drop(tx);
        let mut groups = Vec::new();
        while let Some(group) = queue.next_group(limits).await {
            groups.push(
                group
                    .iter()
                    .map(|r| (r.host.clone(), r.samples))
                    .collect::<Vec<_>>(),
            );
        }
        let expected: Vec<Vec<(String, usize)>> = expected
            .iter()
            .map(|g| g.iter().map(|&(h, s)| (h.to_owned(), s)).collect())
            .collect();
        assert_eq!(groups, expected);
    }

    const WIDE: Limits = Limits {
        max_samples: 1_000,
        max_hosts: 10,
        writers: 1,
    };

    #[tokio::test]
    async fn queued_requests_form_one_group() {
        check(
            WIDE,
            &[("a", 10), ("b", 10), ("c", 10)],
            &[&[("a", 10), ("b", 10), ("c", 10)]],
        )
        .await;
    }

    // With 4 writers a group takes a quarter of what waits (rounded up), leaving the
    // rest to the other writers.
    #[tokio::test]
    async fn a_group_takes_its_writers_share_of_the_queue() {
        let limits = Limits { writers: 4, ..WIDE };
        check(
            limits,
            &[
                ("a", 1),
                ("b", 1),
                ("c", 1),
                ("d", 1),
                ("e", 1),
                ("f", 1),
                ("g", 1),
                ("h", 1),
            ],
            &[
                &[("a", 1), ("b", 1)],
                &[("c", 1), ("d", 1)],
                &[("e", 1)],
                &[("f", 1)],
                &[("g", 1)],
                &[("h", 1)],
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn a_second_request_of_a_host_goes_to_the_next_group_in_order() {
        check(
            WIDE,
            &[("a", 1), ("a", 2), ("b", 3), ("a", 4), ("c", 5)],
            &[&[("a", 1), ("b", 3), ("c", 5)], &[("a", 2)], &[("a", 4)]],
        )
        .await;
    }

    #[tokio::test]
    async fn groups_stop_at_the_sample_and_host_limits() {
        let limits = Limits {
            max_samples: 100,
            max_hosts: 2,
            writers: 1,
        };
        // A request above the sample limit still goes, alone.
        check(
            limits,
            &[
                ("a", 60),
                ("b", 50),
                ("c", 250),
                ("d", 10),
                ("e", 10),
                ("f", 10),
            ],
            &[
                &[("a", 60)],
                &[("b", 50)],
                &[("c", 250)],
                &[("d", 10), ("e", 10)],
                &[("f", 10)],
            ],
        )
        .await;
    }

    // The second and third request of `a` wait behind it; `c` does not fit beside `a`
    // and `b`, so it waits too, and joins the next group (one per host: order per host
    // is kept, not across hosts).
    #[tokio::test]
    async fn deferred_requests_keep_their_order_behind_a_full_group() {
        let limits = Limits {
            max_samples: 100,
            max_hosts: 3,
            writers: 1,
        };
        check(
            limits,
            &[("a", 10), ("a", 20), ("a", 30), ("b", 90), ("c", 10)],
            &[
                &[("a", 10), ("b", 90)],
                &[("a", 20), ("c", 10)],
                &[("a", 30)],
            ],
        )
        .await;
    }
}
