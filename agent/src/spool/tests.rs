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

fn gaps_in(batch: &Batch) -> Vec<(u64, u64, u64)> {
    batch
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::SpoolGap {
                first_seq,
                last_seq,
                samples_lost,
            } => Some((first_seq, last_seq, samples_lost)),
            _ => None,
        })
        .collect()
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

#[test]
fn over_budget_drops_oldest_samples_and_reports_one_exact_gap() -> Result<(), SpoolError> {
    let dir = tempfile::tempdir().map_err(|e| SpoolError::Corrupt {
        what: "tempdir".into(),
        reason: e.to_string(),
    })?;
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
    for i in 1..=10u64 {
        spool.append(7, samples(1, 50), events(1, i))?;
    }
    assert_eq!(spool.dropped_samples_total(), 0);
    // Three more: the oldest batches lose their samples, their events stay. Each loss
    // is reported in the batch appended after it.
    let mut reported = Vec::new();
    for i in 11..=13u64 {
        let b = spool.append(7, samples(1, 50), events(1, i))?;
        assert!(b.events.starts_with(&events(1, i)));
        reported.extend(gaps_in(&b));
    }
    let dropped = spool.dropped_samples_total();
    assert!(
        dropped > 0 && dropped.is_multiple_of(50),
        "dropped {dropped}"
    );
    let lost = dropped / 50;
    let all = spool.pending_after(0, 100)?;
    assert_eq!(all.len(), 13, "events keep every batch");
    for b in &all {
        assert!(
            b.events.starts_with(&events(1, b.seq)),
            "events of {} kept",
            b.seq
        );
        assert_eq!(b.series.is_empty(), b.seq <= lost, "samples of {}", b.seq);
    }
    // The next batch reports what is still pending; then nothing more.
    let next = spool.append(7, Vec::new(), Vec::new())?;
    reported.extend(gaps_in(&next));
    assert!(spool.pending_sample_gaps().is_empty());
    let after = spool.append(7, Vec::new(), Vec::new())?;
    assert!(gaps_in(&after).is_empty());
    // Together the reports cover exactly 1..=lost, each seq once, with every sample.
    reported.sort();
    let mut expect_next = 1;
    for (first, last, n) in &reported {
        assert_eq!(*first, expect_next, "reports {reported:?}");
        assert_eq!(*n, (last - first + 1) * 50);
        expect_next = last + 1;
    }
    assert_eq!(expect_next, lost + 1, "reports {reported:?}");
    Ok(())
}

#[test]
fn events_are_dropped_only_after_every_sample() -> Result<(), SpoolError> {
    let dir = tempfile::tempdir().map_err(|e| SpoolError::Corrupt {
        what: "tempdir".into(),
        reason: e.to_string(),
    })?;
    let spool = spool_in(&dir, 400);
    for i in 1..=40u64 {
        spool.append(7, samples(1, 5), events(1, i))?;
        let stored = spool.pending_after(0, 1000)?;
        let first_with_samples = stored.iter().find(|b| !b.series.is_empty()).map(|b| b.seq);
        if spool.dropped_events_total() > 0 {
            // Once events go, no stored batch but possibly the newest holds samples.
            assert!(first_with_samples.is_none_or(|s| s == i), "batch {i}");
        }
        assert!(spool.bytes() <= 400 || spool.len() == 1);
    }
    assert!(spool.dropped_events_total() > 0);
    assert!(!spool.pending_event_gaps().is_empty());
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
    /// Ack `back` batches short of the newest.
    Ack {
        back: u64,
    },
    /// Ack beyond the newest (a collector whose cursor is ahead).
    AckBeyond {
        ahead: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..12, 0usize..3).prop_map(|(samples, events)| Op::Append { samples, events }),
        2 => proptest::collection::vec((0usize..12, 0usize..3), 1..5).prop_map(Op::AppendMany),
        2 => (0u64..6).prop_map(|back| Op::Ack { back }),
        1 => (1u64..3).prop_map(|ahead| Op::AckBeyond { ahead }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    last_seq: u64,
    acked: u64,
    /// Every appended batch as returned by the spool (original samples, all events).
    batches: BTreeMap<u64, Batch>,
    /// Seqs whose samples were seen dropped while unacknowledged.
    samples_lost: BTreeSet<u64>,
    /// Seqs whose events were seen dropped while unacknowledged.
    events_lost: BTreeSet<u64>,
    /// Seqs of the most recent append.
    last_group: BTreeSet<u64>,
    /// Reported sample gaps and event gaps.
    sample_reports: Vec<Gap>,
    event_reports: Vec<Gap>,
}

fn covered(gaps: &[Gap]) -> Result<BTreeSet<u64>, TestCaseError> {
    let mut set = BTreeSet::new();
    for g in gaps {
        prop_assert!(g.first_seq <= g.last_seq);
        for s in g.first_seq..=g.last_seq {
            prop_assert!(set.insert(s), "seq {} reported twice", s);
        }
    }
    Ok(set)
}

fn check(spool: &Spool, model: &mut Model) -> Result<(), TestCaseError> {
    let stored: BTreeMap<u64, Batch> = spool
        .pending_after(0, usize::MAX)
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .into_iter()
        .map(|b| (b.seq, b))
        .collect();
    prop_assert_eq!(spool.len(), stored.len() as u64);
    prop_assert!(stored
        .keys()
        .all(|s| *s > model.acked && *s <= model.last_seq));
    for (seq, original) in model.batches.range(model.acked + 1..) {
        match stored.get(seq) {
            Some(b) => {
                if b.series != original.series {
                    prop_assert!(b.series.is_empty(), "seq {} altered", seq);
                    model.samples_lost.insert(*seq);
                }
                prop_assert_eq!(&b.events, &original.events);
            }
            None => {
                if original.sample_count() > 0 {
                    model.samples_lost.insert(*seq);
                }
                if !original.events.is_empty() {
                    model.events_lost.insert(*seq);
                }
            }
        }
    }
    let mut sample_gaps = model.sample_reports.clone();
    sample_gaps.extend(spool.pending_sample_gaps());
    let mut event_gaps = model.event_reports.clone();
    event_gaps.extend(spool.pending_event_gaps());
    let sample_cov = covered(&sample_gaps)?;
    let event_cov = covered(&event_gaps)?;
    // Exact: a covered seq either lost its samples or had none; every loss is covered.
    for s in &sample_cov {
        let had = model.batches.get(s).map_or(0, Batch::sample_count);
        prop_assert!(
            had == 0 || model.samples_lost.contains(s),
            "seq {} reported but intact",
            s
        );
    }
    for s in &model.samples_lost {
        prop_assert!(sample_cov.contains(s), "samples of {} lost silently", s);
    }
    for s in &event_cov {
        let had = model.batches.get(s).map_or(0, |b| b.events.len());
        prop_assert!(
            had == 0 || model.events_lost.contains(s),
            "seq {} reported but intact",
            s
        );
    }
    for s in &model.events_lost {
        prop_assert!(event_cov.contains(s), "events of {} lost silently", s);
    }
    let reported: u64 = sample_gaps.iter().map(|g| g.count).sum();
    let expected: u64 = sample_cov
        .iter()
        .map(|s| model.batches.get(s).map_or(0, Batch::sample_count) as u64)
        .sum();
    prop_assert_eq!(reported, expected);
    prop_assert_eq!(spool.dropped_samples_total(), expected);
    let reported: u64 = event_gaps.iter().map(|g| g.count).sum();
    let expected: u64 = event_cov
        .iter()
        .map(|s| model.batches.get(s).map_or(0, |b| b.events.len()) as u64)
        .sum();
    prop_assert_eq!(reported, expected);
    prop_assert_eq!(spool.dropped_events_total(), expected);
    if spool.bytes() > spool.budget_bytes() {
        // Only the last append's batches may keep the spool over budget, and only with
        // their events: every sample is gone by then.
        for (seq, b) in &stored {
            prop_assert!(
                model.last_group.contains(seq),
                "old batch {} kept over budget",
                seq
            );
            prop_assert!(b.series.is_empty(), "samples of {} kept over budget", seq);
        }
    }
    Ok(())
}

/// Checks one batch returned by an append and records it in the model.
fn observe(
    model: &mut Model,
    batch: Batch,
    sent: Vec<SeriesPoints>,
    own: Vec<Event>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(batch.seq, model.last_seq + 1, "seq reused or skipped");
    model.last_seq = batch.seq;
    model.last_group.insert(batch.seq);
    // What the caller handed in, plus the loss reports the spool attached.
    prop_assert!(batch.events.starts_with(&own));
    prop_assert!(batch.series == sent || batch.series.is_empty());
    for ev in &batch.events[own.len()..] {
        match &ev.kind {
            EventKind::SpoolGap {
                first_seq,
                last_seq,
                samples_lost,
            } => model.sample_reports.push(Gap {
                first_seq: *first_seq,
                last_seq: *last_seq,
                count: *samples_lost,
            }),
            EventKind::Other { code } if code == EVENTS_DROPPED_CODE => {
                let range = ev.message.rsplit(' ').next().unwrap_or_default();
                let (a, b) = range.split_once("..=").unwrap_or(("", ""));
                let count = ev
                    .message
                    .split("dropped ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(u64::MAX);
                model.event_reports.push(Gap {
                    first_seq: a.parse().unwrap_or(0),
                    last_seq: b.parse().unwrap_or(0),
                    count,
                });
            }
            other => prop_assert!(false, "unexpected attached event {:?}", other),
        }
    }
    let mut original = batch;
    original.series = sent;
    model.batches.insert(original.seq, original);
    Ok(())
}

fn run_model(budget: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join("spool.redb");
    let open = || Spool::open(&path, budget).map_err(|e| TestCaseError::fail(e.to_string()));
    let mut spool = open()?;
    let mut model = Model::default();
    let fail = |e: SpoolError| TestCaseError::fail(e.to_string());
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Append {
                samples: s,
                events: e,
            } => {
                let tag = n as u64 * 10;
                let sent = samples(3, s);
                let batch = spool
                    .append(tag as i64, sent.clone(), events(e, tag))
                    .map_err(fail)?;
                model.last_group.clear();
                observe(&mut model, batch, sent, events(e, tag))?;
            }
            Op::AppendMany(specs) => {
                let mut input = Vec::new();
                let mut expected = Vec::new();
                for (i, (s, e)) in specs.iter().enumerate() {
                    let tag = n as u64 * 10 + i as u64;
                    input.push((tag as i64, samples(3, *s), events(*e, tag)));
                    expected.push((samples(3, *s), events(*e, tag)));
                }
                let batches = spool.append_many(input).map_err(fail)?;
                model.last_group.clear();
                prop_assert_eq!(batches.len(), expected.len());
                for (batch, (sent, own)) in batches.into_iter().zip(expected) {
                    observe(&mut model, batch, sent, own)?;
                }
            }
            Op::Ack { back } => {
                let upto = model.last_seq.saturating_sub(back);
                spool.ack(upto).map_err(fail)?;
                model.acked = model.acked.max(upto);
            }
            Op::AckBeyond { ahead } => {
                let upto = model.last_seq + ahead;
                spool.ack(upto).map_err(fail)?;
                model.acked = upto;
                model.last_seq = upto;
            }
            Op::Reopen => {
                drop(spool);
                spool = open()?;
            }
        }
        check(&spool, &mut model)?;
    }
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
