//! Supervision of the collector's background tasks (maintenance, lost-host detection,
//! group writers): a task never dies silently. [`Tasks::spawn`] runs a named task; when
//! it panics, returns an error or ends unexpectedly, the failure is logged, counted in
//! `razar_collector_task_failures_total{task}`, shown in health, and the task restarts
//! after a growing backoff. Each task reports its completed runs through its [`Beat`];
//! [`Tasks::checks`] (pure over the recorded state) says which tasks are restarting,
//! whose last run failed and which have not completed a run within their deadline.

use prometheus::{IntCounterVec, Opts, Registry};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Restart delays of a failed task: `first`, doubling up to `max`; back to `first`
/// once a restarted task completes a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for RestartBackoff {
    /// 1 s doubling up to 60 s.
    fn default() -> RestartBackoff {
        RestartBackoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// What is recorded of one task.
#[derive(Debug, Clone)]
struct TaskState {
    /// A run must complete at least this often (`None`: the task runs on demand).
    deadline: Option<Duration>,
    /// When the current incarnation started.
    started: Instant,
    last_ok: Option<Instant>,
    last_failure: Option<(Instant, String)>,
    failures: u64,
    /// False while it waits to restart after a failure.
    running: bool,
}

/// One health check: a name, whether it passes, and what was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The supervised tasks of one collector; shared by the tasks and the health API.
#[derive(Debug)]
pub struct Tasks {
    states: Mutex<BTreeMap<String, TaskState>>,
    failures: IntCounterVec,
    backoff: RestartBackoff,
}

/// A task's handle to report a completed run.
#[derive(Debug, Clone)]
pub struct Beat {
    tasks: Arc<Tasks>,
    name: Arc<str>,
}

impl Beat {
    /// The task completed a run (or, for a task without a deadline, did a unit of work).
    pub fn ok(&self) {
        if let Some(s) = self.tasks.lock().get_mut(&*self.name) {
            s.last_ok = Some(Instant::now());
        }
    }
}

/// Aborts the supervised incarnation when the supervisor itself is aborted or dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Tasks {
    /// A new set of tasks; `razar_collector_task_failures_total` is registered in
    /// `registry`.
    pub fn new(
        registry: &Registry,
        backoff: RestartBackoff,
    ) -> Result<Arc<Tasks>, prometheus::Error> {
        let failures = IntCounterVec::new(
            Opts::new(
                "razar_collector_task_failures_total",
                "Background task failures (panic, error or unexpected end), by task; each \
                 failed task is restarted.",
            ),
            &["task"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        Ok(Arc::new(Tasks {
            states: Mutex::new(BTreeMap::new()),
            failures,
            backoff,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, TaskState>> {
        // Plain values; a panic elsewhere cannot leave them half-updated.
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `make(beat)` as the task `name`, again after a backoff whenever it panics,
    /// returns an error, or ends while `stop` is not set. It ends for good when it
    /// returns `Ok(())` once `stop` is set (or `stop` is `None`: a task that ends on
    /// its own, like a writer whose queue closed). Aborting the returned handle aborts
    /// the task too. `deadline`: a run must complete ([`Beat::ok`]) at least this often.
    pub fn spawn<F, Fut, E>(
        self: &Arc<Self>,
        name: &str,
        deadline: Option<Duration>,
        mut stop: Option<watch::Receiver<bool>>,
        mut make: F,
    ) -> JoinHandle<()>
    where
        F: FnMut(Beat) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let tasks = self.clone();
        let name: Arc<str> = name.into();
        tasks.lock().insert(
            name.to_string(),
            TaskState {
                deadline,
                started: Instant::now(),
                last_ok: None,
                last_failure: None,
                failures: 0,
                running: true,
            },
        );
        let beat = Beat {
            tasks: tasks.clone(),
            name: name.clone(),
        };
        tokio::spawn(async move {
            let mut delay = tasks.backoff.first;
            loop {
                let incarnation = Instant::now();
                if let Some(s) = tasks.lock().get_mut(&*name) {
                    s.running = true;
                    s.started = incarnation;
                }
                let run = make(beat.clone());
                let (tx, rx) = tokio::sync::oneshot::channel();
                let mut handle = AbortOnDrop(tokio::spawn(async move {
                    let _ = tx.send(run.await.map_err(|e| e.to_string()));
                }));
                let joined = join(&mut handle.0, rx).await;
                let stopping = stop.as_ref().is_none_or(|s| *s.borrow());
                let reason = match joined {
                    Joined::Returned(Ok(())) if stopping => {
                        tasks.lock().remove(&*name);
                        return;
                    }
                    Joined::Returned(Ok(())) => "ended unexpectedly".to_owned(),
                    Joined::Returned(Err(error)) => error,
                    Joined::Panicked(message) => format!("panicked: {message}"),
                };
                let ran_ok = tasks
                    .lock()
                    .get(&*name)
                    .and_then(|s| s.last_ok)
                    .is_some_and(|t| t >= incarnation);
                if ran_ok {
                    delay = tasks.backoff.first;
                }
                tasks.failures.with_label_values(&[&name]).inc();
                if let Some(s) = tasks.lock().get_mut(&*name) {
                    s.failures += 1;
                    s.last_failure = Some((Instant::now(), reason.clone()));
                    s.running = false;
                }
                tracing::error!(task = %name, error = %reason, restart_in_ms = delay.as_millis() as u64, "background task failed; restarting");
                let stopped = match stop.as_mut() {
                    Some(stop) => tokio::select! {
                        _ = tokio::time::sleep(delay) => false,
                        _ = stop.wait_for(|s| *s) => true,
                    },
                    None => {
                        tokio::time::sleep(delay).await;
                        false
                    }
                };
                if stopped {
                    tasks.lock().remove(&*name);
                    return;
                }
                delay = (delay * 2).min(tasks.backoff.max);
            }
        })
    }

    /// One check per task, by name: failing while it waits to restart, when its last
    /// run failed (until a run completes), or when no run completed within its
    /// deadline.
    pub fn checks(&self, now: Instant) -> Vec<Check> {
        self.lock()
            .iter()
            .map(|(name, s)| check(name, s, now))
            .collect()
    }

    /// Failures of task `name` so far (0 when unknown).
    pub fn failures(&self, name: &str) -> u64 {
        self.lock().get(name).map_or(0, |s| s.failures)
    }
}

/// How an incarnation ended.
enum Joined {
    Returned(Result<(), String>),
    Panicked(String),
}

/// The task's result, or its panic message.
async fn join(
    handle: &mut JoinHandle<()>,
    result: tokio::sync::oneshot::Receiver<Result<(), String>>,
) -> Joined {
    match handle.await {
        Ok(()) => Joined::Returned(result.await.unwrap_or(Ok(()))),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            Joined::Panicked(message)
        }
        Err(_) => Joined::Panicked("cancelled".to_owned()),
    }
}

fn check(name: &str, s: &TaskState, now: Instant) -> Check {
    let secs = |d: Duration| format!("{:.1}s", d.as_secs_f64());
    let failed_last = match (&s.last_failure, s.last_ok) {
        (Some((at, _)), Some(ok)) => *at > ok,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let (ok, detail) = if !s.running {
        let error = s.last_failure.as_ref().map_or("", |(_, e)| e.as_str());
        (
            false,
            format!("restarting after failure #{}: {error}", s.failures),
        )
    } else if failed_last {
        let error = s.last_failure.as_ref().map_or("", |(_, e)| e.as_str());
        (
            false,
            format!(
                "restarted; no run completed since failure #{}: {error}",
                s.failures
            ),
        )
    } else {
        let since = s.last_ok.unwrap_or(s.started);
        match s.deadline {
            Some(deadline) if now.saturating_duration_since(since) > deadline => (
                false,
                format!(
                    "no run completed for {} (deadline {})",
                    secs(now.saturating_duration_since(since)),
                    secs(deadline)
                ),
            ),
            _ => (
                true,
                match s.last_ok {
                    Some(t) => format!("last run {} ago", secs(now.saturating_duration_since(t))),
                    None => "running".to_owned(),
                },
            ),
        }
    };
    Check {
        name: format!("task:{name}"),
        ok,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const FAST: RestartBackoff = RestartBackoff {
        first: Duration::from_millis(10),
        max: Duration::from_millis(40),
    };

    fn state(deadline: Option<Duration>, started: Instant) -> TaskState {
        TaskState {
            deadline,
            started,
            last_ok: None,
            last_failure: None,
            failures: 0,
            running: true,
        }
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn a_task_fails_its_check_past_its_deadline_without_a_completed_run() {
        let t0 = Instant::now();
        let mut s = state(Some(Duration::from_secs(10)), t0);
        assert!(check("m", &s, t0 + Duration::from_secs(10)).ok);
        let late = check("m", &s, t0 + Duration::from_secs(11));
        assert!(!late.ok);
        assert!(late.detail.contains("no run completed"), "{}", late.detail);
        s.last_ok = Some(t0 + Duration::from_secs(5));
        assert!(check("m", &s, t0 + Duration::from_secs(15)).ok);
        assert!(!check("m", &s, t0 + Duration::from_secs(16)).ok);
        // Without a deadline, silence is fine.
        let idle = state(None, t0);
        assert!(check("w", &idle, t0 + Duration::from_secs(3_600)).ok);
    }

    #[test]
    fn a_failed_run_fails_the_check_until_a_run_completes() {
        let t0 = Instant::now();
        let mut s = state(None, t0);
        s.last_ok = Some(t0);
        s.failures = 1;
        s.last_failure = Some((t0 + Duration::from_secs(1), "boom".into()));
        s.running = false;
        let c = check("w", &s, t0 + Duration::from_secs(2));
        assert_eq!((c.name.as_str(), c.ok), ("task:w", false));
        assert!(c.detail.contains("boom"), "{}", c.detail);
        s.running = true;
        assert!(!check("w", &s, t0 + Duration::from_secs(2)).ok);
        s.last_ok = Some(t0 + Duration::from_secs(2));
        assert!(check("w", &s, t0 + Duration::from_secs(2)).ok);
    }

    #[tokio::test]
    async fn a_panicking_task_is_counted_shown_and_restarted() {
        let registry = Registry::new();
        let tasks = Tasks::new(&registry, FAST).unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let (go_on_tx, go_on) = watch::channel(false);
        let handle = tasks.spawn("flaky", None, None, {
            let runs = runs.clone();
            move |beat: Beat| {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                let mut go_on = go_on.clone();
                async move {
                    if n == 0 {
                        panic!("first run dies");
                    }
                    if n == 1 {
                        return Err("second run fails");
                    }
                    // Third incarnation: fine once allowed to complete a run.
                    let _ = go_on.wait_for(|g| *g).await;
                    beat.ok();
                    std::future::pending::<()>().await;
                    Ok(())
                }
            }
        });
        wait_for("two restarts", || runs.load(Ordering::SeqCst) >= 3).await;
        assert_eq!(tasks.failures("flaky"), 2);
        let counted = tasks.failures.with_label_values(&["flaky"]).get();
        assert_eq!(counted, 2);
        let c = &tasks.checks(Instant::now())[0];
        assert!(!c.ok, "{c:?}");
        assert!(c.detail.contains("second run fails"), "{c:?}");
        go_on_tx.send_replace(true);
        wait_for("a completed run", || tasks.checks(Instant::now())[0].ok).await;
        handle.abort();
    }

    #[tokio::test]
    async fn a_task_ending_at_stop_is_not_a_failure_and_aborting_stops_it() {
        let registry = Registry::new();
        let tasks = Tasks::new(&registry, FAST).unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let handle = tasks.spawn("loop", None, Some(stop.clone()), move |_beat| {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
                Ok::<(), String>(())
            }
        });
        stop_tx.send_replace(true);
        handle.await.unwrap();
        assert_eq!(tasks.failures("loop"), 0);
        assert!(tasks.checks(Instant::now()).is_empty());

        // Aborting the supervisor aborts the running incarnation.
        let alive = Arc::new(());
        let held = alive.clone();
        let handle = tasks.spawn("held", None, None, move |_beat| {
            let held = held.clone();
            async move {
                let _held = held;
                std::future::pending::<Result<(), String>>().await
            }
        });
        wait_for("the task started", || Arc::strong_count(&alive) == 3).await;
        handle.abort();
        wait_for("the task aborted", || Arc::strong_count(&alive) == 1).await;
    }
}
