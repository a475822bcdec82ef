//! Spool tests: behaviour checks, a proptest model check against an in-memory model,
//! and a crash test that SIGKILLs a child process in the middle of appends.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn samples(series: u32, n: usize) -> Vec<SeriesPoints> {
    if n == 0 {
        return Vec::new();
    }
    vec![SeriesPoints {
        series,
        points: (0..n).map(|i| (i as u32 * 1000, i as f64 + 0.5)).collect(),
    }]
}

fn events(n: usize, tag: u64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            ts_ms: 1_700_000_000_000 + i as i64,
            severity: Severity::Info,
            subject: Subject::Component(format!("c{tag}")),
            kind: EventKind::Other {
                code: format!("e{tag}-{i}"),
            },
            message: "m".into(),
        })
        .collect()
}

fn spool_in(dir: &tempfile::TempDir, budget: u64) -> Spool {
    match Spool::open(dir.path().join("spool.redb"), budget) {
        Ok(s) => s,
        Err(e) => panic!("open spool: {e}"),
    }
}

#[test]
fn appends_number_batches_and_acks_remove_them() -> Result<(), SpoolError> {
    let dir = tempfile::tempdir().map_err(|e| SpoolError::Corrupt {
        what: "tempdir".into(),
        reason: e.to_string(),
    })?;
    let spool = spool_in(&dir, u64::MAX);
    for expected in 1..=5 {
        let b = spool.append(1000, samples(1, 3), events(1, expected))?;
        assert_eq!(b.seq, expected);
    }
    assert_eq!(spool.len(), 5);
    let pending = spool.pending_after(2, 2)?;
    assert_eq!(
        pending.iter().map(|b| b.seq).collect::<Vec<_>>(),
        vec![3, 4]
    );
    spool.ack(3)?;
    assert_eq!(spool.len(), 2);
    assert_eq!(spool.acked(), 3);
    let rest = spool.pending_after(0, 100)?;
    assert_eq!(rest.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(rest[0].events, events(1, 4));
    assert_eq!(rest[0].series, samples(1, 3));
    // Acks are idempotent and cumulative.
    spool.ack(2)?;
    assert_eq!(spool.len(), 2);
    spool.ack(5)?;
    assert!(spool.is_empty());
    assert_eq!(spool.bytes(), 0);
    Ok(())
}

#[test]
fn reopen_keeps_batches_series_and_never_reuses_seqs() -> Result<(), SpoolError> {
    let dir = tempfile::tempdir().map_err(|e| SpoolError::Corrupt {
        what: "tempdir".into(),
        reason: e.to_string(),
    })?;
    {
        let spool = spool_in(&dir, u64::MAX);
        let gpu = spool.series_id("gpu_util", &[("gpu".into(), "0".into())])?;
        let cpu = spool.series_id("cpu", &[])?;
        assert_ne!(gpu, cpu);
        assert_eq!(
            spool.series_id("gpu_util", &[("gpu".into(), "0".into())])?,
            gpu
        );
        for _ in 0..3 {
            spool.append(5, samples(gpu, 2), Vec::new())?;
        }
        spool.ack(3)?;
    }
    let spool = spool_in(&dir, u64::MAX);
    assert_eq!(spool.series().len(), 2);
    assert_eq!(spool.series_id("cpu", &[])?, 2);
    assert_eq!(spool.series_id("mem", &[])?, 3);
    assert_eq!(spool.append(5, Vec::new(), Vec::new())?.seq, 4);
    // A collector that remembers more than this disk pushes numbering past its cursor.
    spool.ack(100)?;
    assert_eq!(spool.append(5, Vec::new(), Vec::new())?.seq, 101);
    drop(spool);
    let spool = spool_in(&dir, u64::MAX);
    assert_eq!(spool.append(5, Vec::new(), Vec::new())?.seq, 102);
    Ok(())
}

/// The loss reports a delivered batch carries: (first, last, count, is_sample_report).
fn reports_in(batch: &Batch) -> Vec<(u64, u64, u64, bool)> {
    batch
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::SpoolGap {
                first_seq,
                last_seq,
                samples_lost,
            } => Some((*first_seq, *last_seq, *samples_lost, true)),
            EventKind::Other { code } if code == EVENTS_DROPPED_CODE => {
                let range = e.message.rsplit(' ').next().unwrap_or_default();
                let (a, b) = range.split_once("..=").unwrap_or(("", ""));
                let count = e
                    .message
                    .split("dropped ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(u64::MAX);
                Some((a.parse().unwrap_or(0), b.parse().unwrap_or(0), count, false))
            }
            _ => None,
        })
        .collect()
}

fn tempdir() -> Result<tempfile::TempDir, SpoolError> {
    tempfile::tempdir().map_err(|e| SpoolError::Corrupt {
        what: "tempdir".into(),
        reason: e.to_string(),
    })
}

#[test]
fn over_budget_drops_oldest_samples_and_one_report_names_the_run() -> Result<(), SpoolError> {
    let dir = tempdir()?;
    // Measure one batch, then allow about ten of them.
    let probe = encode(&Batch {
        seq: 1,
        base_ts_ms: 7,
        series: samples(1, 50),
        events: events(1, 1),
    })?
    .len() as u64;
    // Tags of two digits make later batches a few bytes longer: leave slack.
    let spool = spool_in(&dir, probe * 10 + 40);
    let mut held = Vec::new();
    for i in 1..=13u64 {
        let b = spool.append(7, samples(1, 50), events(1, i))?;
        assert_eq!(b.events, events(1, i), "nothing attached at append");
        held.push(b);
    }
    let dropped = spool.dropped_samples_total();
    assert!(
        dropped > 0 && dropped.is_multiple_of(50),
        "dropped {dropped}"
    );
    let lost = dropped / 50;
    let stored = spool.pending_after(0, 100)?;
    assert_eq!(stored.len(), 13, "events keep every batch");
    for b in &stored {
        assert!(
            b.events.starts_with(&events(1, b.seq)),
            "events of {}",
            b.seq
        );
        assert_eq!(b.series.is_empty(), b.seq <= lost, "samples of {}", b.seq);
    }
    // The uplink's copies were read before the budget struck (whole, in memory): on
    // the wire they become what the spool kept, and only the run's last batch
    // carries the report, for the whole run.
    let mut reports = Vec::new();
    for mut b in held.iter().cloned() {
        spool.prepare(&mut b, 9);
        assert_eq!(b.series.is_empty(), b.seq <= lost, "wire copy of {}", b.seq);
        for r in reports_in(&b) {
            reports.push((b.seq, r));
        }
    }
    assert_eq!(reports, vec![(lost, (1, lost, lost * 50, true))]);
    spool.ack(13)?;
    assert!(spool.losses().is_empty(), "reported and acked");
    Ok(())
}

#[test]
fn a_whole_copy_acknowledged_before_the_strip_is_not_reported_lost() -> Result<(), SpoolError> {
    let dir = tempdir()?;
    let probe = encode(&Batch {
        seq: 1,
        base_ts_ms: 7,
        series: samples(1, 50),
        events: events(1, 1),
    })?
    .len() as u64;
    let spool = spool_in(&dir, probe * 10 + 40);
    spool.welcome(0, 1)?;
    let mut held = Vec::new();
    for i in 1..=10u64 {
        held.push(spool.append(7, samples(1, 50), events(1, i))?);
    }
    // Batches 1..=4 go out whole; the link is cut before their ack.
    for b in held.iter_mut().take(4) {
        spool.prepare(b, 9);
        assert_eq!(b.series, samples(1, 50));
    }
    // More appends over budget strip the oldest, 1..=4 among them.
    for i in 11..=16u64 {
        held.push(spool.append(7, samples(1, 50), events(1, i))?);
    }
    let lost = spool.dropped_samples_total() / 50;
    assert!(lost > 4, "stripped {lost}");
    // They had arrived: the next Welcome's cursor acknowledges them. Everything else
    // goes out again from the held copies.
    spool.welcome(4, 10)?;
    let mut reports = Vec::new();
    for mut b in held.iter().skip(4).cloned() {
        spool.prepare(&mut b, 11);
        reports.extend(reports_in(&b));
    }
    assert_eq!(reports, vec![(5, lost, (lost - 4) * 50, true)]);
    Ok(())
}

#[test]
fn a_report_on_a_lost_connection_is_made_again_and_only_once() -> Result<(), SpoolError> {
    let dir = tempdir()?;
    let spool = spool_in(&dir, 1);
    spool.welcome(0, 1)?;
    // Budget of one byte: every batch loses its samples at once, and events of all
    // but the newest append.
    let mut held = Vec::new();
    for i in 1..=6u64 {
        held.push(spool.append(7, samples(1, 5), events(1, i))?);
    }
    // First connection: everything sent, the report rides on 6 (whose events the
    // budget left), then the link dies before any ack.
    let mut first = Vec::new();
    for mut b in held.iter().cloned() {
        spool.prepare(&mut b, 9);
        first.extend(reports_in(&b).into_iter().map(|r| (b.seq, r)));
    }
    assert_eq!(
        first,
        vec![(6, (1, 6, 30, true)), (6, (1, 5, 5, false))],
        "one report per kind for the run"
    );
    // Second connection: the collector had 1..=3 (stripped, no report with them).
    spool.welcome(3, 10)?;
    let mut second = Vec::new();
    for mut b in held.iter().skip(3).cloned() {
        spool.prepare(&mut b, 11);
        second.extend(reports_in(&b).into_iter().map(|r| (b.seq, r)));
    }
    // The whole run is reported once, by the batch that will be stored with it.
    assert_eq!(second, vec![(6, (1, 6, 30, true)), (6, (1, 5, 5, false))]);
    spool.ack(6)?;
    assert!(spool.losses().is_empty());
    Ok(())
}

#[test]
fn a_new_spool_renumbers_above_the_collectors_cursor() -> Result<(), SpoolError> {
    let dir = tempdir()?;
    {
        let spool = spool_in(&dir, u64::MAX);
        assert!(!spool.met_collector());
        for i in 1..=3u64 {
            spool.append(7, samples(1, 2), events(1, i))?;
        }
        // Reopened before it met a collector: still new.
    }
    let spool = spool_in(&dir, u64::MAX);
    assert!(!spool.met_collector());
    let renumbered = spool.welcome(500, 42)?;
    assert_eq!(
        renumbered,
        Some(Renumbered {
            cursor: 500,
            offset: 500,
            batches: 3
        })
    );
    let stored = spool.pending_after(0, 100)?;
    let seqs: Vec<u64> = stored.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, vec![501, 502, 503, 504]);
    for (i, b) in stored.iter().take(3).enumerate() {
        assert_eq!(b.events, events(1, i as u64 + 1), "content of {}", b.seq);
        assert_eq!(b.series, samples(1, 2));
    }
    let reset = &stored[3];
    assert!(
        matches!(&reset.events[..], [e] if e.kind == EventKind::Other { code: SPOOL_RESET_CODE.into() })
    );
    // The collector's Ack of its own cursor deletes nothing.
    spool.ack(500)?;
    assert_eq!(spool.len(), 4);
    assert_eq!(spool.append(7, Vec::new(), Vec::new())?.seq, 505);
    // Met now, durably: a later Welcome never renumbers.
    drop(spool);
    let spool = spool_in(&dir, u64::MAX);
    assert!(spool.met_collector());
    assert_eq!(spool.welcome(503, 43)?, None);
    assert_eq!(spool.len(), 2);
    Ok(())
}

#[test]
fn a_new_spool_meeting_a_new_host_keeps_its_numbers() -> Result<(), SpoolError> {
    let dir = tempdir()?;
    let spool = spool_in(&dir, u64::MAX);
    spool.append(7, samples(1, 2), Vec::new())?;
    assert_eq!(spool.welcome(0, 1)?, None);
    assert!(spool.met_collector());
    assert_eq!(spool.pending_after(0, 10)?.len(), 1);
    Ok(())
}

#[test]
fn events_are_dropped_only_after_every_sample() -> Result<(), SpoolError> {
    let dir = tempdir()?;
    let spool = spool_in(&dir, 400);
    for i in 1..=40u64 {
        spool.append(7, samples(1, 5), events(1, i))?;
        let stored = spool.pending_after(0, 1000)?;
        let first_with_samples = stored.iter().find(|b| !b.series.is_empty()).map(|b| b.seq);
        if spool.dropped_events_total() > 0 {
            // Once events go, no stored batch but possibly the newest holds samples.
            assert!(first_with_samples.is_none_or(|s| s == i), "batch {i}");
        }
    }
    assert!(spool.dropped_events_total() > 0);
    assert!(spool.losses().values().any(|l| l.events > 0));
    Ok(())
}

// ---- model check ----

#[derive(Debug, Clone)]
enum Op {
    Append {
        samples: usize,
        events: usize,
    },
    /// Several batches in one commit.
    AppendMany(Vec<(usize, usize)>),
    /// Send everything up to `back` batches short of the newest and ack it.
    Deliver {
        back: u64,
    },
    /// Send everything, the link dies, and the next Welcome says the collector stored
    /// up to `back` batches short of the newest.
    Cut {
        back: u64,
    },
    /// The collector got whole copies sent before the budget struck: send the first
    /// `n` held batches, let the budget act, then a Welcome acknowledges them.
    WholeThenStripped {
        n: u64,
        appends: usize,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..12, 0usize..3).prop_map(|(samples, events)| Op::Append { samples, events }),
        2 => proptest::collection::vec((0usize..12, 0usize..3), 1..5).prop_map(Op::AppendMany),
        2 => (0u64..6).prop_map(|back| Op::Deliver { back }),
        2 => (0u64..6).prop_map(|back| Op::Cut { back }),
        1 => (1u64..4, 1usize..4).prop_map(|(n, appends)| Op::WholeThenStripped { n, appends }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    last_seq: u64,
    acked: u64,
    /// Every appended batch as the caller handed it in (the uplink's held copy).
    held: BTreeMap<u64, Batch>,
    /// What the collector stored, per seq.
    stored: BTreeMap<u64, Batch>,
    /// Seqs of the most recent append.
    last_group: BTreeSet<u64>,
}

impl Model {
    /// Sends every held batch above the cursor up to `upto` as the uplink would.
    fn send(&self, spool: &Spool, upto: u64) -> Vec<Batch> {
        if upto <= self.acked {
            return Vec::new();
        }
        self.held
            .range(self.acked + 1..=upto)
            .map(|(_, b)| {
                let mut b = b.clone();
                spool.prepare(&mut b, 1);
                b
            })
            .collect()
    }

    /// The collector commits `sent` up to `upto`.
    fn commit(&mut self, sent: Vec<Batch>, upto: u64) {
        for b in sent.into_iter().filter(|b| b.seq <= upto) {
            self.stored.insert(b.seq, b);
        }
        self.acked = self.acked.max(upto);
    }
}

fn check(spool: &Spool, model: &Model) -> Result<(), TestCaseError> {
    let stored: BTreeMap<u64, Batch> = spool
        .pending_after(0, usize::MAX)
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .into_iter()
        .map(|b| (b.seq, b))
        .collect();
    prop_assert_eq!(spool.len(), stored.len() as u64);
    // Every unacknowledged batch is still there (a tombstone at worst), as kept or
    // emptied: never altered otherwise.
    let unacked: Vec<u64> = model
        .held
        .range(model.acked + 1..)
        .map(|(s, _)| *s)
        .collect();
    prop_assert_eq!(stored.keys().copied().collect::<Vec<_>>(), unacked);
    for (seq, b) in &stored {
        let original = &model.held[seq];
        prop_assert!(
            b.series == original.series || b.series.is_empty(),
            "seq {} altered",
            seq
        );
        prop_assert!(
            b.events == original.events || b.events.is_empty(),
            "seq {} altered",
            seq
        );
        if b.events.is_empty() && !original.events.is_empty() {
            prop_assert!(
                b.series.is_empty(),
                "events of {} dropped before its samples",
                seq
            );
        }
    }
    if spool.bytes() > spool.budget_bytes() {
        // Over budget: no samples anywhere, and only the last append keeps events.
        for (seq, b) in &stored {
            prop_assert!(b.series.is_empty(), "samples of {} kept over budget", seq);
            prop_assert!(
                b.events.is_empty() || model.last_group.contains(seq),
                "events of old batch {} kept over budget",
                seq
            );
        }
    }
    Ok(())
}

/// Once everything is delivered: the reports the collector stored name exactly what it
/// does not have, each seq once, with exact counts.
fn check_reports(model: &Model) -> Result<(), TestCaseError> {
    let mut sample_cov = BTreeMap::new();
    let mut event_cov = BTreeMap::new();
    let mut sample_total = 0;
    let mut event_total = 0;
    for b in model.stored.values() {
        for (first, last, count, samples) in reports_in(b) {
            prop_assert!(
                first <= last && last <= b.seq,
                "report {}..={} in {}",
                first,
                last,
                b.seq
            );
            let cov = if samples {
                &mut sample_cov
            } else {
                &mut event_cov
            };
            for s in first..=last {
                prop_assert!(cov.insert(s, b.seq).is_none(), "seq {} reported twice", s);
            }
            if samples {
                sample_total += count;
            } else {
                event_total += count;
            }
        }
    }
    let mut missing_samples = 0;
    let mut missing_events = 0;
    for (seq, original) in &model.held {
        let Some(got) = model.stored.get(seq) else {
            continue;
        };
        let own_events = got
            .events
            .iter()
            .filter(|e| match &e.kind {
                EventKind::SpoolGap { .. } => false,
                EventKind::Other { code } => code != EVENTS_DROPPED_CODE,
                _ => true,
            })
            .count();
        let samples_lost = got.series.is_empty() && original.sample_count() > 0;
        let events_lost = own_events == 0 && !original.events.is_empty();
        prop_assert_eq!(
            samples_lost,
            sample_cov.contains_key(seq) && original.sample_count() > 0,
            "samples of {}",
            seq
        );
        prop_assert_eq!(
            events_lost,
            event_cov.contains_key(seq) && !original.events.is_empty(),
            "events of {}",
            seq
        );
        if samples_lost {
            missing_samples += original.sample_count() as u64;
        }
        if events_lost {
            missing_events += original.events.len() as u64;
        }
    }
    prop_assert_eq!(sample_total, missing_samples);
    prop_assert_eq!(event_total, missing_events);
    Ok(())
}

fn run_model(budget: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join("spool.redb");
    let open = || Spool::open(&path, budget).map_err(|e| TestCaseError::fail(e.to_string()));
    let fail = |e: SpoolError| TestCaseError::fail(e.to_string());
    let mut spool = open()?;
    spool.welcome(0, 0).map_err(fail)?;
    let mut model = Model::default();
    let mut tag = 0u64;
    let mut append =
        |spool: &Spool, model: &mut Model, specs: &[(usize, usize)]| -> Result<(), TestCaseError> {
            let mut input = Vec::new();
            for (s, e) in specs {
                tag += 1;
                input.push((tag as i64, samples(3, *s), events(*e, tag)));
            }
            let out = spool.append_many(input.clone()).map_err(fail)?;
            model.last_group.clear();
            prop_assert_eq!(out.len(), input.len());
            for (b, (ts, series, events)) in out.into_iter().zip(input) {
                prop_assert_eq!(b.seq, model.last_seq + 1, "seq reused or skipped");
                prop_assert_eq!(&b.events, &events, "nothing attached at append");
                model.last_seq = b.seq;
                model.last_group.insert(b.seq);
                model.held.insert(
                    b.seq,
                    Batch {
                        seq: b.seq,
                        base_ts_ms: ts,
                        series,
                        events,
                    },
                );
            }
            Ok(())
        };
    for op in ops {
        match op {
            Op::Append {
                samples: s,
                events: e,
            } => append(&spool, &mut model, &[(s, e)])?,
            Op::AppendMany(specs) => append(&spool, &mut model, &specs)?,
            Op::Deliver { back } => {
                let upto = model.last_seq.saturating_sub(back).max(model.acked);
                let sent = model.send(&spool, upto);
                model.commit(sent, upto);
                spool.ack(upto).map_err(fail)?;
            }
            Op::Cut { back } => {
                let sent = model.send(&spool, model.last_seq);
                let upto = model.last_seq.saturating_sub(back).max(model.acked);
                model.commit(sent, upto);
                spool.welcome(upto, 0).map_err(fail)?;
            }
            Op::WholeThenStripped { n, appends } => {
                let upto = (model.acked + n).min(model.last_seq);
                let sent = model.send(&spool, upto);
                for _ in 0..appends {
                    append(&spool, &mut model, &[(8, 1)])?;
                }
                model.commit(sent, upto);
                spool.welcome(upto, 0).map_err(fail)?;
            }
            Op::Reopen => {
                drop(spool);
                spool = open()?;
            }
        }
        check(&spool, &model)?;
    }
    // Deliver the rest: then every loss is reported exactly.
    let sent = model.send(&spool, model.last_seq);
    let upto = model.last_seq;
    model.commit(sent, upto);
    spool.ack(upto).map_err(fail)?;
    check_reports(&model)?;
    prop_assert!(
        spool.losses().is_empty(),
        "loss records left: {:?}",
        spool.losses()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn spool_matches_model(budget in 150u64..1500, ops in proptest::collection::vec(op(), 1..60)) {
        run_model(budget, ops)?;
    }

    #[test]
    fn spool_without_pressure_loses_nothing(ops in proptest::collection::vec(op(), 1..60)) {
        run_model(u64::MAX, ops)?;
    }
}

// ---- crash ----

const CRASH_CHILD_ENV: &str = "RAZAR_SPOOL_CRASH_CHILD";

/// In the child (env set): appends forever, printing each seq after its commit, until
/// killed. In the parent: a plain run of appends whose seqs must all be there.
#[test]
fn crash_child_appends_until_killed() -> Result<(), SpoolError> {
    use std::io::Write;
    let child_path = std::env::var_os(CRASH_CHILD_ENV);
    let dir = tempfile::tempdir().map_err(|e| SpoolError::Corrupt {
        what: "tempdir".into(),
        reason: e.to_string(),
    })?;
    let path = child_path
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("spool.redb"));
    let spool = Spool::open(&path, u64::MAX)?;
    let limit = if child_path.is_some() { u64::MAX } else { 200 };
    let mut out = std::io::stdout().lock();
    let mut n = 0;
    while n < limit {
        let b = spool.append(1, samples(1, 20), events(1, n))?;
        // Ignore stdout errors: the parent may have stopped reading already.
        let _ = writeln!(out, "committed {}", b.seq);
        let _ = out.flush();
        n += 1;
    }
    drop(out);
    if child_path.is_none() {
        assert_eq!(spool.pending_after(0, usize::MAX)?.len(), 200);
    }
    Ok(())
}

#[test]
fn sigkill_during_appends_loses_no_committed_batch() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("spool.redb");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("current_exe: {e}"),
    };
    let mut last_committed = 0u64;
    for round in 0..3 {
        let mut child = match Command::new(&exe)
            .args([
                "--exact",
                "spool::tests::crash_child_appends_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("spawn child: {e}"),
        };
        let Some(stdout) = child.stdout.take() else {
            panic!("no stdout")
        };
        let mut lines = BufReader::new(stdout).lines();
        // Kill after a varying number of commits, mid-stream.
        let target = 50 + round * 37;
        let mut seen = 0;
        let mut first = None;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(seq) = line
                .strip_prefix("committed ")
                .and_then(|s| s.parse::<u64>().ok())
            {
                first.get_or_insert(seq);
                last_committed = seq;
                seen += 1;
                if seen >= target {
                    break;
                }
            }
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        assert_eq!(seen, target, "child stopped early");
        // Seqs continue where the previous run left off: none reused.
        assert!(first.is_some_and(|f| f > 0));
        let spool = match Spool::open(&path, u64::MAX) {
            Ok(s) => s,
            Err(e) => panic!("reopen after SIGKILL: {e}"),
        };
        let stored = match spool.pending_after(0, usize::MAX) {
            Ok(s) => s,
            Err(e) => panic!("read after SIGKILL: {e}"),
        };
        // Every committed batch is there, intact, in order, with no hole.
        assert!(
            stored.len() as u64 >= last_committed,
            "round {round}: lost committed batches"
        );
        for (i, b) in stored.iter().enumerate() {
            assert_eq!(b.seq, i as u64 + 1);
            assert_eq!(b.series, samples(1, 20));
        }
    }
}
