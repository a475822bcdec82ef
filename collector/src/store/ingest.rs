//! Telemetry ingest with group commit: batches of one or several agents in one
//! transaction — samples of every agent in one binary `COPY`, events of every agent in
//! one `UNNEST` insert, component states from `StateChanged` events — and every agent's
//! cursor advanced in the same transaction, so a resent batch (its `seq` at or below the
//! cursor) is recognised and stored once.
//!
//! Cursors are locked with one `SELECT .. ORDER BY host_id FOR UPDATE`: concurrent
//! groups over overlapping hosts take their locks in the same order and never deadlock.
//! Validation (undefined series, sequence numbers out of range) is per item
//! ([`IngestItem::check`]): a caller grouping independent requests checks each first, so
//! an invalid one fails alone. Values the store will not keep (samples outside the
//! [`Window`], samples of refused series) are refused by rule, counted and recorded as a
//! `values_refused` event on the host; the rest of the batch is stored. Text is cleaned
//! ([`super::boundary`]). A batch the database still refuses alone with a data error is
//! set aside in `rejected_batches` ([`Store::reject_batch`]) and acknowledged.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use razar_shared::protocol::{Batch, Event, EventKind, GpuFaultKind, Subject};

use super::boundary::{
    clean, clean_kind, Reason, Refusals, Window, MAX_LIST_ENTRIES, MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
};
use super::copy::SampleCopy;
use super::{day_of, from_millis, SeriesMap, Store, StoreError, REFUSED_SERIES};

/// What one agent's part of an ingest stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The agent's cursor after the commit: every batch with `seq <= cursor` is stored
    /// (or set aside in `rejected_batches`). Acknowledge this value.
    pub cursor: u64,
    /// Batches stored by this call.
    pub batches_stored: u32,
    /// Batches skipped because they were already stored (a resend).
    pub batches_duplicate: u32,
    /// Batches the database refused with a data error, set aside and acknowledged.
    pub batches_rejected: u32,
    pub samples: u64,
    pub events: u64,
    /// Values refused by rule (not stored) and text cleaned.
    pub refusals: Refusals,
}

impl IngestOutcome {
    /// Adds the outcome of a later write of the same agent.
    pub(crate) fn then(&mut self, later: &IngestOutcome) {
        self.cursor = self.cursor.max(later.cursor);
        self.batches_stored += later.batches_stored;
        self.batches_duplicate += later.batches_duplicate;
        self.batches_rejected += later.batches_rejected;
        self.samples += later.samples;
        self.events += later.events;
        self.refusals.merge(&later.refusals);
    }
}

/// One agent's batches, as a part of a group commit ([`Store::ingest_group`]).
#[derive(Debug, Clone, Copy)]
pub struct IngestItem<'a> {
    /// The agent's host id (from its certificate).
    pub host: &'a str,
    /// Its batches in sequence order.
    pub batches: &'a [Batch],
    /// Its series ids mapped to database ids ([`Store::register_series`]).
    pub series: &'a SeriesMap,
}

/// What [`IngestItem::check`] found: the window its samples are judged by and the days
/// (since the Unix epoch) of the samples inside it, sorted, for their partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub window: Window,
    pub days: Vec<i64>,
    /// Per batch of the item, in order: whether every one of its samples is inside the
    /// window (the commit then skips the check per sample).
    pub inside: Vec<bool>,
}

/// What a group commit did, for the caller's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupCommit {
    /// One outcome per item, in the items' order.
    pub outcomes: Vec<IngestOutcome>,
    /// Whether a transaction was committed (false when every batch was a duplicate).
    pub committed: bool,
}

impl IngestItem<'_> {
    /// Checks the item without touching the database: every series id is mapped and
    /// every sequence number fits the cursor. Returns the days (since the Unix epoch) its
    /// samples inside `window` fall on, sorted, for their partitions: a sample outside
    /// the window is refused at the commit and creates no partition.
    pub fn check(&self, window: Window) -> Result<Checked, StoreError> {
        let mut days = BTreeSet::new();
        let mut inside = Vec::with_capacity(self.batches.len());
        let mut last_day = None;
        for batch in self.batches {
            if i64::try_from(batch.seq).is_err() {
                return Err(StoreError::SeqOutOfRange {
                    host: self.host.to_owned(),
                    seq: batch.seq,
                });
            }
            // The batch's earliest and latest point stand for all of its points when
            // they fall on one day: no date arithmetic per sample or per series (this
            // runs for every sample stored).
            let mut range: Option<(u32, u32)> = None;
            for points in &batch.series {
                if !self.series.contains_key(&points.series) {
                    return Err(StoreError::UnknownSeries {
                        host: self.host.to_owned(),
                        seq: batch.seq,
                        series: points.series,
                    });
                }
                if let Some((lo, hi)) = offset_range(&points.points) {
                    range = Some(match range {
                        Some((a, b)) => (a.min(lo), b.max(hi)),
                        None => (lo, hi),
                    });
                }
            }
            inside.push(range.is_none_or(|(first, last)| {
                let at = |offset: u32| batch.base_ts_ms.saturating_add(i64::from(offset));
                window.refuses(at(first)).is_none() && window.refuses(at(last)).is_none()
            }));
            if let Some((first, last)) = range {
                let first = batch
                    .base_ts_ms
                    .saturating_add(i64::from(first))
                    .max(window.lo_ms);
                let last = batch
                    .base_ts_ms
                    .saturating_add(i64::from(last))
                    .min(window.hi_ms);
                if first > last {
                    // Wholly outside the window: no partition for it.
                } else if day_of(first) == day_of(last) {
                    // Nearly always: the batch is on one day. Skip the set.
                    let day = day_of(first);
                    if last_day != Some(day) {
                        days.insert(day);
                        last_day = Some(day);
                    }
                } else {
                    // Across midnight, or a batch spread over days (its offsets reach
                    // 50 days): only the days of points inside the window.
                    for points in &batch.series {
                        for &(offset, _) in &points.points {
                            let ts = batch.base_ts_ms.saturating_add(i64::from(offset));
                            if window.refuses(ts).is_none() {
                                days.insert(day_of(ts));
                            }
                        }
                    }
                    last_day = None;
                }
            }
        }
        Ok(Checked {
            window,
            days: days.into_iter().collect(),
            inside,
        })
    }

    /// Samples carried by the item's batches.
    pub fn sample_count(&self) -> usize {
        self.batches.iter().map(Batch::sample_count).sum()
    }
}

/// The smallest and largest offset of `points`; `None` when there are none.
fn offset_range(points: &[(u32, f64)]) -> Option<(u32, u32)> {
    let (&(head, _), rest) = points.split_first()?;
    Some(rest.iter().fold((head, head), |(lo, hi), &(offset, _)| {
        (lo.min(offset), hi.max(offset))
    }))
}

impl Store {
    /// Stores `batches` of `host` in one transaction and advances its cursor to the
    /// highest stored `seq`: [`Store::ingest_group`] with one item. Batches at or below
    /// the stored cursor (or not above an earlier batch of the same call) are skipped as
    /// duplicates. `series` maps the agent's series ids to database ids
    /// ([`Store::register_series`]); an unmapped id fails the whole call with nothing
    /// stored. Returns after the commit: only then may the caller acknowledge
    /// `outcome.cursor`.
    pub async fn ingest(
        &self,
        host: &str,
        batches: &[Batch],
        series: &SeriesMap,
    ) -> Result<IngestOutcome, StoreError> {
        let item = IngestItem {
            host,
            batches,
            series,
        };
        let checked = item.check(self.window_now())?;
        let commit = self.ingest_checked(&[item], &[checked], None).await?;
        Ok(commit.outcomes.into_iter().next().unwrap_or_default())
    }

    /// Stores the batches of several agents in ONE transaction (group commit) and
    /// advances each agent's cursor in it; returns one outcome per item, in order, after
    /// the commit. Per agent, duplicates are skipped exactly as [`Store::ingest`] does;
    /// items of the same host are applied in order, the later seeing the cursor the
    /// earlier left.
    ///
    /// Every item is checked first ([`IngestItem::check`]) and an invalid one fails the
    /// whole call with nothing stored: a caller grouping independent requests checks
    /// each one before it groups them, so that an invalid request fails alone (the group
    /// writer does). A database error fails every item: nothing of the group is stored.
    pub async fn ingest_group(
        &self,
        items: &[IngestItem<'_>],
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let window = self.window_now();
        let checked = items
            .iter()
            .map(|item| item.check(window))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.ingest_checked(items, &checked, None).await?.outcomes)
    }

    /// The window of sample timestamps accepted now ([`super::IngestRules`]).
    pub fn window_now(&self) -> Window {
        self.rules.window(Utc::now().timestamp_millis())
    }

    /// [`Store::ingest_group`] for items already checked: `checked[i]` is what
    /// [`IngestItem::check`] returned for `items[i]`. With `copy_slots`, the samples'
    /// `COPY` runs only while holding one of its permits.
    pub(crate) async fn ingest_checked(
        &self,
        items: &[IngestItem<'_>],
        checked: &[Checked],
        copy_slots: Option<&tokio::sync::Semaphore>,
    ) -> Result<GroupCommit, StoreError> {
        if items.is_empty() {
            return Ok(GroupCommit::default());
        }
        if checked.len() != items.len() {
            // A caller's mistake, not the data's: nothing is stored.
            return Err(StoreError::Db(sqlx::Error::Protocol(
                "ingest: one check per item expected".into(),
            )));
        }
        let mut days: Vec<i64> = checked
            .iter()
            .flat_map(|c| c.days.iter().copied())
            .collect();
        days.sort_unstable();
        days.dedup();
        self.ensure_days(&days).await?;

        // One entry per host, sorted: new cursor rows are inserted in this order, and
        // locked in the database's order of host_id, the same in every group.
        let mut hosts: Vec<&str> = items.iter().map(|i| i.host).collect();
        hosts.sort_unstable();
        hosts.dedup();

        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO agent_cursors (host_id, acked_seq, updated_at)
             SELECT h, 0, now() FROM UNNEST($1::text[]) AS h
             ON CONFLICT (host_id) DO NOTHING",
        )
        .bind(&hosts)
        .execute(&mut *tx)
        .await?;
        // Locks the hosts' cursors: groups sharing a host never interleave.
        let locked: Vec<(String, i64)> = sqlx::query_as(
            "SELECT host_id, acked_seq FROM agent_cursors WHERE host_id = ANY($1)
             ORDER BY host_id FOR UPDATE",
        )
        .bind(&hosts)
        .fetch_all(&mut *tx)
        .await?;
        let mut cursors: HashMap<&str, HostTotals> = HashMap::with_capacity(hosts.len());
        for (host, seq) in &locked {
            if let Ok(at) = hosts.binary_search(&host.as_str()) {
                cursors.insert(hosts[at], HostTotals::at(u64::try_from(*seq).unwrap_or(0)));
            }
        }
        if cursors.len() != hosts.len() {
            // Inserted just above in this transaction: only a concurrent delete of a
            // cursor row (nothing does that) could get here.
            return Err(StoreError::Db(sqlx::Error::RowNotFound));
        }

        // Duplicates per host, in item order (a later item of the same host sees the
        // cursor the earlier one left).
        let mut outcomes = Vec::with_capacity(items.len());
        // (item, batch position in the item, batch)
        let mut fresh: Vec<(usize, usize, &Batch)> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let Some(totals) = cursors.get_mut(item.host) else {
                return Err(StoreError::Db(sqlx::Error::RowNotFound));
            };
            let mut outcome = IngestOutcome {
                cursor: totals.cursor,
                ..IngestOutcome::default()
            };
            for (position, batch) in item.batches.iter().enumerate() {
                if batch.seq <= outcome.cursor {
                    outcome.batches_duplicate += 1;
                } else {
                    outcome.cursor = batch.seq;
                    outcome.batches_stored += 1;
                    fresh.push((index, position, batch));
                }
            }
            totals.cursor = outcome.cursor;
            outcomes.push(outcome);
        }
        if fresh.is_empty() {
            tx.rollback().await?;
            return Ok(GroupCommit {
                outcomes,
                committed: false,
            });
        }

        let rows: usize = fresh.iter().map(|(_, _, b)| b.sample_count()).sum();
        if rows > 0 {
            let mut copy = SampleCopy::with_capacity(rows);
            for &(index, position, batch) in &fresh {
                let item = &items[index];
                let window = checked[index].window;
                let inside = checked[index].inside.get(position) == Some(&true);
                let refusals = &mut outcomes[index].refusals;
                let before = copy.rows();
                for points in &batch.series {
                    // Checked: every series id is mapped.
                    let Some(&id) = item.series.get(&points.series) else {
                        continue;
                    };
                    if id == REFUSED_SERIES {
                        refusals.add(Reason::SampleOfRefusedSeries, points.points.len() as u64);
                        continue;
                    }
                    if inside {
                        // The whole batch is inside the window (the usual case).
                        for &(offset, value) in &points.points {
                            copy.push(id, batch.base_ts_ms + i64::from(offset), value);
                        }
                        continue;
                    }
                    for &(offset, value) in &points.points {
                        let ts = batch.base_ts_ms.saturating_add(i64::from(offset));
                        match window.refuses(ts) {
                            None => copy.push(id, ts, value),
                            Some(reason) => refusals.add(reason, 1),
                        }
                    }
                }
                outcomes[index].samples += copy.rows() - before;
            }
            // With the rows ready, wait for a COPY slot (if limited): each running COPY
            // extends the same heap, and past a few of them they mostly wait on the
            // relation extension lock while the CPU idles (BENCHMARKS.md). The cursor
            // statements and the commit run outside the slot.
            let _slot = match copy_slots {
                Some(slots) => Some(
                    slots
                        .acquire()
                        .await
                        .map_err(|_| StoreError::Db(sqlx::Error::PoolClosed))?,
                ),
                None => None,
            };
            let mut sink = tx
                .copy_in_raw("COPY samples (series_id, ts, value) FROM STDIN (FORMAT binary)")
                .await?;
            sink.send(copy.finish()).await?;
            sink.finish().await?;
        }

        let mut events: Vec<EventRow<'_>> = Vec::new();
        for &(index, _, batch) in &fresh {
            let host = items[index].host;
            let window = checked[index].window;
            let outcome = &mut outcomes[index];
            outcome.events += batch.events.len() as u64;
            events.extend(
                batch
                    .events
                    .iter()
                    .map(|e| EventRow::from_agent(host, e, window, &mut outcome.refusals)),
            );
        }
        // What each item refused, as one event on its host.
        for (index, outcome) in outcomes.iter().enumerate() {
            if outcome.refusals.any() {
                events.push(EventRow::refusals(
                    items[index].host,
                    checked[index].window,
                    &outcome.refusals,
                ));
            }
        }
        if !events.is_empty() {
            insert_events(&mut tx, &events).await?;
            update_component_states(&mut tx, &events).await?;
        }

        // One row per host that stored something: its new cursor and what it added.
        for (item, outcome) in items.iter().zip(&outcomes) {
            if let Some(totals) = cursors.get_mut(item.host) {
                totals.stored |= outcome.batches_stored > 0;
                totals.samples += outcome.samples;
                totals.events += outcome.events;
            }
        }
        let mut advanced: Vec<&str> = Vec::new();
        let mut seqs: Vec<i64> = Vec::new();
        let mut samples: Vec<i64> = Vec::new();
        let mut event_counts: Vec<i64> = Vec::new();
        for host in &hosts {
            if let Some(totals) = cursors.get(host).filter(|t| t.stored) {
                advanced.push(host);
                // Checked: every seq fits an i64.
                seqs.push(i64::try_from(totals.cursor).unwrap_or(i64::MAX));
                samples.push(i64::try_from(totals.samples).unwrap_or(i64::MAX));
                event_counts.push(i64::try_from(totals.events).unwrap_or(i64::MAX));
            }
        }
        sqlx::query(
            "UPDATE agent_cursors c SET acked_seq = u.seq,
                 samples_stored = c.samples_stored + u.samples,
                 events_stored = c.events_stored + u.events, updated_at = now()
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[])
                 AS u(host_id, seq, samples, events)
             WHERE c.host_id = u.host_id",
        )
        .bind(&advanced)
        .bind(&seqs)
        .bind(&samples)
        .bind(&event_counts)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        for outcome in &outcomes {
            self.metrics.count(&outcome.refusals);
        }
        Ok(GroupCommit {
            outcomes,
            committed: true,
        })
    }
}

impl Store {
    /// Sets `batch` of `host` aside for an operator after the database refused it alone
    /// with `error` (a data error: retrying cannot help): in one transaction the batch
    /// goes to `rejected_batches` (error and raw payload), a `batch_rejected` event is
    /// recorded on the host and its cursor moves to the batch, so the agent's stream
    /// goes on once it is acknowledged. A batch at or below the cursor is a duplicate.
    pub async fn reject_batch(
        &self,
        host: &str,
        batch: &Batch,
        error: &StoreError,
    ) -> Result<IngestOutcome, StoreError> {
        let seq = i64::try_from(batch.seq).map_err(|_| StoreError::SeqOutOfRange {
            host: host.to_owned(),
            seq: batch.seq,
        })?;
        let mut payload = Vec::new();
        if let Err(e) = razar_shared::protocol::codec::encode_into(batch, &mut payload) {
            // It arrived as one frame, so it fits one; keep the reason if not.
            tracing::warn!(host, seq, error = %e, "cannot encode a rejected batch");
        }
        let sqlstate = match error {
            StoreError::Db(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
            _ => None,
        };
        let text = error.to_string();
        let text = clean(&text, MAX_MESSAGE_BYTES, &mut 0);
        let samples = i64::try_from(batch.sample_count()).unwrap_or(i64::MAX);
        let events = i64::try_from(batch.events.len()).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO agent_cursors (host_id, acked_seq, updated_at) VALUES ($1, 0, now())
             ON CONFLICT (host_id) DO NOTHING",
        )
        .bind(host)
        .execute(&mut *tx)
        .await?;
        let cursor: i64 =
            sqlx::query_scalar("SELECT acked_seq FROM agent_cursors WHERE host_id = $1 FOR UPDATE")
                .bind(host)
                .fetch_one(&mut *tx)
                .await?;
        if seq <= cursor {
            tx.rollback().await?;
            return Ok(IngestOutcome {
                cursor: u64::try_from(cursor).unwrap_or(0),
                batches_duplicate: 1,
                ..IngestOutcome::default()
            });
        }
        sqlx::query(
            "INSERT INTO rejected_batches
                 (host_id, seq, rejected_at, sqlstate, error, samples, events, payload)
             VALUES ($1, $2, now(), $3, $4, $5, $6, $7)
             ON CONFLICT (host_id, seq) DO NOTHING",
        )
        .bind(host)
        .bind(seq)
        .bind(sqlstate.as_deref())
        .bind(text.as_ref())
        .bind(samples)
        .bind(events)
        .bind(&payload)
        .execute(&mut *tx)
        .await?;
        // The event under a savepoint: should the database refuse it too (the same
        // rule that refused the batch, say), the batch is still set aside.
        let mut event = sqlx::Acquire::begin(&mut *tx).await?;
        let recorded = sqlx::query(
            "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
             VALUES ($1, now(), 'error', 'host', NULL, 'batch_rejected', $2, $3)",
        )
        .bind(host)
        .bind(serde_json::json!({
            "seq": seq,
            "sqlstate": sqlstate,
            "samples": samples,
            "events": events,
        }))
        .bind(format!(
            "batch {seq} set aside in rejected_batches ({samples} samples, {events} events): {text}"
        ))
        .execute(&mut *event)
        .await;
        match recorded {
            Ok(_) => event.commit().await?,
            Err(e) => {
                tracing::warn!(host, seq, error = %e, "cannot record the batch_rejected event");
                event.rollback().await?;
            }
        }
        sqlx::query(
            "UPDATE agent_cursors SET acked_seq = $2, updated_at = now() WHERE host_id = $1",
        )
        .bind(host)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.metrics.batches_rejected.inc();
        tracing::warn!(host, seq, sqlstate = ?sqlstate, error = %text, "batch refused by the database set aside");
        Ok(IngestOutcome {
            cursor: batch.seq,
            batches_rejected: 1,
            ..IngestOutcome::default()
        })
    }
}

/// A host's cursor while a group is applied, and what the group added for it.
#[derive(Debug, Clone, Copy)]
struct HostTotals {
    cursor: u64,
    stored: bool,
    samples: u64,
    events: u64,
}

impl HostTotals {
    fn at(cursor: u64) -> HostTotals {
        HostTotals {
            cursor,
            stored: false,
            samples: 0,
            events: 0,
        }
    }
}

/// An event row as stored: an agent's event with its text cleaned, or one the
/// collector records (what the store refused).
struct EventRow<'a> {
    host: &'a str,
    ts: DateTime<Utc>,
    severity: &'static str,
    subject_kind: &'static str,
    subject_id: Option<String>,
    kind: &'static str,
    payload: serde_json::Value,
    message: Cow<'a, str>,
    /// The state a `StateChanged` event moved its component to.
    state_to: Option<&'static str>,
    /// A GPU event's typed columns and attribution.
    fault: Option<FaultRow>,
    /// An attributed component event: (revision, spec hash, GPU UUIDs as a JSON array).
    component: Option<(String, String, serde_json::Value)>,
}

/// A GPU event's queryable columns (migration 0003) and, for an attributed one
/// (`EventKind::GpuFault`), its processes and components.
#[derive(Debug, Default)]
struct FaultRow {
    gpu_uuid: Option<String>,
    gpu_index: Option<i32>,
    pci_bus_id: Option<String>,
    xid: Option<i32>,
    count: Option<i64>,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    historical: bool,
    /// (component, revision, spec hash, pid), one per component.
    components: Vec<(String, String, String, Option<i64>)>,
    /// (pid, name, used memory), one per pid.
    processes: Vec<(i64, String, Option<i64>)>,
}

impl FaultRow {
    /// The typed columns of a GPU event; `None` for any other event. Text cleaned and
    /// lists capped and de-duplicated (a repeated component or pid is kept once).
    fn from_kind(
        kind: &EventKind,
        subject: &Subject,
        ts: DateTime<Utc>,
        window: Window,
        cleaned: &mut u64,
    ) -> Option<FaultRow> {
        let subject_gpu = match subject {
            Subject::Gpu(index) => i32::try_from(*index).ok(),
            _ => None,
        };
        let time = |ms: i64| {
            if window.keeps_event_time(ms) {
                from_millis(ms).unwrap_or(ts)
            } else {
                ts
            }
        };
        match kind {
            EventKind::Xid { xid, .. } => Some(FaultRow {
                gpu_index: subject_gpu,
                xid: i32::try_from(*xid).ok(),
                count: Some(1),
                first: Some(ts),
                last: Some(ts),
                ..FaultRow::default()
            }),
            EventKind::EccDoubleBit | EventKind::GpuLost => Some(FaultRow {
                gpu_index: subject_gpu,
                ..FaultRow::default()
            }),
            EventKind::GpuFault(fault) => {
                let mut row = FaultRow {
                    gpu_uuid: Some(clean(&fault.gpu.uuid, MAX_NAME_BYTES, cleaned).into_owned()),
                    gpu_index: i32::try_from(fault.gpu.index).ok(),
                    pci_bus_id: Some(
                        clean(&fault.gpu.pci_bus_id, MAX_NAME_BYTES, cleaned).into_owned(),
                    ),
                    historical: fault.historical,
                    ..FaultRow::default()
                };
                if let GpuFaultKind::Xid {
                    xid,
                    count,
                    first_ms,
                    last_ms,
                    ..
                } = &fault.fault
                {
                    row.xid = i32::try_from(*xid).ok();
                    row.count = Some(i64::try_from(*count).unwrap_or(i64::MAX));
                    row.first = Some(time(*first_ms));
                    row.last = Some(time(*last_ms));
                }
                let mut seen = BTreeSet::new();
                for c in fault.components.iter().take(MAX_LIST_ENTRIES) {
                    let name = clean(&c.component, MAX_NAME_BYTES, cleaned).into_owned();
                    if seen.insert(name.clone()) {
                        row.components.push((
                            name,
                            clean(&c.version, MAX_NAME_BYTES, cleaned).into_owned(),
                            clean(&c.spec_hash, MAX_NAME_BYTES, cleaned).into_owned(),
                            c.pid.map(i64::from),
                        ));
                    }
                }
                let mut pids = BTreeSet::new();
                for p in fault.processes.iter().take(MAX_LIST_ENTRIES) {
                    if pids.insert(p.pid) {
                        row.processes.push((
                            i64::from(p.pid),
                            clean(&p.name, MAX_NAME_BYTES, cleaned).into_owned(),
                            p.used_memory_bytes.and_then(|b| i64::try_from(b).ok()),
                        ));
                    }
                }
                Some(row)
            }
            _ => None,
        }
    }

    /// Whether rows in other tables refer to the event (it needs its id up front).
    fn has_lists(&self) -> bool {
        !self.components.is_empty() || !self.processes.is_empty()
    }
}

impl<'a> EventRow<'a> {
    /// An agent's event, made storable: text cleaned and capped, a time outside
    /// `window` replaced by the collector's (the agent's noted in the message).
    fn from_agent(
        host: &'a str,
        event: &'a Event,
        window: Window,
        refusals: &mut Refusals,
    ) -> EventRow<'a> {
        let cleaned = &mut refusals.texts_cleaned;
        let mut message = clean(&event.message, MAX_MESSAGE_BYTES, cleaned);
        let ts_ms = if window.keeps_event_time(event.ts_ms) {
            event.ts_ms
        } else {
            refusals.add(Reason::EventTime, 1);
            message = Cow::Owned(format!("{message} (agent clock: {} ms)", event.ts_ms));
            window.now_ms
        };
        let (subject_kind, subject_id) = match &event.subject {
            Subject::Host => ("host", None),
            Subject::Component(name) => (
                "component",
                Some(clean(name, MAX_NAME_BYTES, &mut refusals.texts_cleaned).into_owned()),
            ),
            Subject::Gpu(index) => ("gpu", Some(index.to_string())),
        };
        let ts = from_millis(ts_ms).unwrap_or_default();
        let fault = FaultRow::from_kind(
            &event.kind,
            &event.subject,
            ts,
            window,
            &mut refusals.texts_cleaned,
        );
        // An attributed fault keeps its version 1 kind and payload; the attribution goes
        // to its own columns and tables.
        let legacy = match &event.kind {
            EventKind::GpuFault(fault) => Some(fault.legacy_kind()),
            EventKind::ComponentEvent(c) => Some(c.legacy_kind()),
            _ => None,
        };
        let component = match &event.kind {
            EventKind::ComponentEvent(c) => {
                let cleaned = &mut refusals.texts_cleaned;
                let mut uuids = BTreeSet::new();
                for gpu in c.gpus.iter().take(MAX_LIST_ENTRIES) {
                    uuids.insert(clean(&gpu.uuid, MAX_NAME_BYTES, cleaned).into_owned());
                }
                Some((
                    clean(&c.revision.version, MAX_NAME_BYTES, cleaned).into_owned(),
                    clean(&c.revision.spec_hash, MAX_NAME_BYTES, cleaned).into_owned(),
                    serde_json::Value::from(uuids.into_iter().collect::<Vec<_>>()),
                ))
            }
            _ => None,
        };
        let kind = clean_kind(
            legacy.as_ref().unwrap_or(&event.kind),
            &mut refusals.texts_cleaned,
        );
        let state_to = match kind.as_ref() {
            EventKind::StateChanged { to, .. } => Some(to.as_str()),
            _ => None,
        };
        EventRow {
            host,
            ts,
            severity: event.severity.as_str(),
            subject_kind,
            subject_id,
            kind: kind_code(&event.kind),
            payload: serde_json::to_value(kind.as_ref())
                .unwrap_or_else(|e| serde_json::json!({ "unencodable": e.to_string() })),
            message,
            state_to,
            fault,
            component,
        }
    }

    /// The collector's record of what it refused of a host's values.
    fn refusals(host: &'a str, window: Window, refusals: &Refusals) -> EventRow<'a> {
        let mut payload = refusals.to_json();
        if let Some(map) = payload.as_object_mut() {
            map.insert("during".to_owned(), "ingest".into());
        }
        EventRow {
            host,
            ts: from_millis(window.now_ms).unwrap_or_default(),
            severity: "warning",
            subject_kind: "host",
            subject_id: None,
            kind: "values_refused",
            payload,
            message: Cow::Owned(format!(
                "values refused at the store (ingest): {}",
                refusals.summary()
            )),
            state_to: None,
            fault: None,
            component: None,
        }
    }
}

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[EventRow<'_>],
) -> Result<(), StoreError> {
    let host: Vec<&str> = events.iter().map(|e| e.host).collect();
    let ts: Vec<DateTime<Utc>> = events.iter().map(|e| e.ts).collect();
    let severity: Vec<&str> = events.iter().map(|e| e.severity).collect();
    let subject_kind: Vec<&str> = events.iter().map(|e| e.subject_kind).collect();
    let subject_id: Vec<Option<&str>> = events.iter().map(|e| e.subject_id.as_deref()).collect();
    let kind: Vec<&str> = events.iter().map(|e| e.kind).collect();
    let payload: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let message: Vec<&str> = events.iter().map(|e| e.message.as_ref()).collect();
    // Events that rows of other tables refer to get their id up front.
    let wanted = events
        .iter()
        .filter(|e| e.fault.as_ref().is_some_and(FaultRow::has_lists))
        .count();
    let mut ids: Vec<Option<i64>> = vec![None; events.len()];
    if wanted > 0 {
        let allocated: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('events', 'event_id'))
             FROM generate_series(1, $1)",
        )
        .bind(i64::try_from(wanted).unwrap_or(i64::MAX))
        .fetch_all(&mut **tx)
        .await?;
        let mut allocated = allocated.into_iter();
        for (slot, event) in ids.iter_mut().zip(events) {
            if event.fault.as_ref().is_some_and(FaultRow::has_lists) {
                *slot = allocated.next();
            }
        }
    }
    fn f<'r>(e: &'r EventRow<'_>) -> Option<&'r FaultRow> {
        e.fault.as_ref()
    }
    let gpu_uuid: Vec<Option<&str>> = events
        .iter()
        .map(|e| f(e).and_then(|x| x.gpu_uuid.as_deref()))
        .collect();
    let gpu_index: Vec<Option<i32>> = events
        .iter()
        .map(|e| f(e).and_then(|x| x.gpu_index))
        .collect();
    let pci: Vec<Option<&str>> = events
        .iter()
        .map(|e| f(e).and_then(|x| x.pci_bus_id.as_deref()))
        .collect();
    let xid: Vec<Option<i32>> = events.iter().map(|e| f(e).and_then(|x| x.xid)).collect();
    let count: Vec<Option<i64>> = events.iter().map(|e| f(e).and_then(|x| x.count)).collect();
    let first: Vec<Option<DateTime<Utc>>> =
        events.iter().map(|e| f(e).and_then(|x| x.first)).collect();
    let last: Vec<Option<DateTime<Utc>>> =
        events.iter().map(|e| f(e).and_then(|x| x.last)).collect();
    let historical: Vec<bool> = events
        .iter()
        .map(|e| f(e).is_some_and(|x| x.historical))
        .collect();
    let revision: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.component.as_ref().map(|c| c.0.as_str()))
        .collect();
    let spec_hash: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.component.as_ref().map(|c| c.1.as_str()))
        .collect();
    let gpu_uuids: Vec<Option<&serde_json::Value>> = events
        .iter()
        .map(|e| e.component.as_ref().map(|c| &c.2))
        .collect();
    sqlx::query(
        "INSERT INTO events (event_id, host_id, ts, severity, subject_kind, subject_id, kind, payload,
                             message, gpu_uuid, gpu_index, pci_bus_id, xid, fault_count, first_ts,
                             last_ts, historical, component_revision, component_spec_hash,
                             gpu_uuids)
         SELECT coalesce(u.id, nextval(pg_get_serial_sequence('events', 'event_id'))),
                u.host_id, u.ts, u.severity, u.subject_kind, u.subject_id, u.kind, u.payload,
                u.message, u.gpu_uuid, u.gpu_index, u.pci_bus_id, u.xid, u.fault_count,
                u.first_ts, u.last_ts, u.historical, u.revision, u.spec_hash,
                CASE WHEN u.gpus IS NULL THEN NULL
                     ELSE ARRAY(SELECT jsonb_array_elements_text(u.gpus)) END
         FROM UNNEST($1::int8[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::jsonb[], $9::text[], $10::text[], $11::int4[], $12::text[],
                     $13::int4[], $14::int8[], $15::timestamptz[], $16::timestamptz[], $17::bool[],
                     $18::text[], $19::text[], $20::jsonb[])
              AS u(id, host_id, ts, severity, subject_kind, subject_id, kind, payload, message,
                   gpu_uuid, gpu_index, pci_bus_id, xid, fault_count, first_ts, last_ts,
                   historical, revision, spec_hash, gpus)",
    )
    .bind(&ids)
    .bind(&host)
    .bind(&ts)
    .bind(&severity)
    .bind(&subject_kind)
    .bind(&subject_id)
    .bind(&kind)
    .bind(&payload)
    .bind(&message)
    .bind(&gpu_uuid)
    .bind(&gpu_index)
    .bind(&pci)
    .bind(&xid)
    .bind(&count)
    .bind(&first)
    .bind(&last)
    .bind(&historical)
    .bind(&revision)
    .bind(&spec_hash)
    .bind(&gpu_uuids)
    .execute(&mut **tx)
    .await?;
    if wanted > 0 {
        insert_attribution(tx, events, &ids).await?;
    }
    Ok(())
}

/// The components and processes of attributed faults (`ids`: each event's id, allocated
/// for those that have them).
async fn insert_attribution(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[EventRow<'_>],
    ids: &[Option<i64>],
) -> Result<(), StoreError> {
    let mut c_event = Vec::new();
    let mut c_host = Vec::new();
    let mut c_gpu = Vec::new();
    let mut c_name = Vec::new();
    let mut c_revision = Vec::new();
    let mut c_hash = Vec::new();
    let mut c_pid = Vec::new();
    let mut p_event = Vec::new();
    let mut p_pid = Vec::new();
    let mut p_name = Vec::new();
    let mut p_memory = Vec::new();
    for (event, id) in events.iter().zip(ids) {
        let (Some(fault), Some(id)) = (&event.fault, id) else {
            continue;
        };
        for (name, revision, hash, pid) in &fault.components {
            c_event.push(*id);
            c_host.push(event.host);
            c_gpu.push(fault.gpu_uuid.as_deref().unwrap_or_default());
            c_name.push(name.as_str());
            c_revision.push(revision.as_str());
            c_hash.push(hash.as_str());
            c_pid.push(*pid);
        }
        for (pid, name, memory) in &fault.processes {
            p_event.push(*id);
            p_pid.push(*pid);
            p_name.push(name.as_str());
            p_memory.push(*memory);
        }
    }
    if !c_event.is_empty() {
        sqlx::query(
            "INSERT INTO fault_components (event_id, host_id, gpu_uuid, component, revision,
                                           spec_hash, pid)
             SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::text[], $7::int8[])",
        )
        .bind(&c_event)
        .bind(&c_host)
        .bind(&c_gpu)
        .bind(&c_name)
        .bind(&c_revision)
        .bind(&c_hash)
        .bind(&c_pid)
        .execute(&mut **tx)
        .await?;
    }
    if !p_event.is_empty() {
        sqlx::query(
            "INSERT INTO fault_processes (event_id, pid, name, used_memory_bytes)
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::int8[])",
        )
        .bind(&p_event)
        .bind(&p_pid)
        .bind(&p_name)
        .bind(&p_memory)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Applies the latest `StateChanged` per component of each host to the components table
/// (known components only; an older event never overwrites a newer state).
async fn update_component_states(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[EventRow<'_>],
) -> Result<(), StoreError> {
    // (host, component) → (time, state) of its latest change.
    let mut latest: HashMap<(&str, &str), (DateTime<Utc>, &'static str)> = HashMap::new();
    for event in events {
        if let (Some(name), Some(to)) = (event.subject_id.as_deref(), event.state_to) {
            if event.subject_kind != "component" {
                continue;
            }
            let entry = latest.entry((event.host, name)).or_insert((event.ts, to));
            if event.ts >= entry.0 {
                *entry = (event.ts, to);
            }
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    // Sorted, so concurrent statements touch the rows in one order.
    let mut rows: Vec<_> = latest.into_iter().collect();
    rows.sort_unstable_by_key(|r| r.0);
    let hosts: Vec<&str> = rows.iter().map(|r| r.0 .0).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.0 .1).collect();
    let states: Vec<&str> = rows.iter().map(|r| r.1 .1).collect();
    let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.1 .0).collect();
    sqlx::query(
        "UPDATE components c SET state = u.state, updated_at = u.ts
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[])
             AS u(host_id, name, state, ts)
         WHERE c.host_id = u.host_id AND c.name = u.name AND c.updated_at <= u.ts",
    )
    .bind(&hosts)
    .bind(&names)
    .bind(&states)
    .bind(&ts)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stable snake_case code of an event kind (the `kind` column).
pub fn kind_code(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::StateChanged { .. } => "state_changed",
        EventKind::ProcessAdopted { .. } => "process_adopted",
        EventKind::ProcessExited { .. } => "process_exited",
        EventKind::PulseResult { .. } => "pulse_result",
        EventKind::ConfigReloaded { .. } => "config_reloaded",
        EventKind::QuarantineResolved { .. } => "quarantine_resolved",
        EventKind::Xid { .. } => "xid",
        EventKind::EccDoubleBit => "ecc_double_bit",
        EventKind::GpuLost => "gpu_lost",
        EventKind::VramBudgetExceeded { .. } => "vram_budget_exceeded",
        EventKind::GhostMemory { .. } => "ghost_memory",
        EventKind::SpoolGap { .. } => "spool_gap",
        EventKind::MemoryBudgetExceeded { .. } => "memory_budget_exceeded",
        EventKind::Other { .. } => "other",
        EventKind::GpuFault(fault) => kind_code(&fault.legacy_kind()),
        EventKind::ComponentEvent(event) => kind_code(&event.legacy_kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IngestRules;
    use razar_shared::protocol::SeriesPoints;

    const DAY: i64 = 86_400_000;

    fn batch(base_ts_ms: i64, offsets: &[u32]) -> Batch {
        Batch {
            seq: 1,
            base_ts_ms,
            series: vec![SeriesPoints {
                series: 1,
                points: offsets.iter().map(|&o| (o, 0.0)).collect(),
            }],
            events: Vec::new(),
        }
    }

    /// A window of 10 days before `now_ms` and 5 minutes after.
    fn window(now_ms: i64) -> Window {
        IngestRules {
            retention: std::time::Duration::from_secs(10 * 86_400),
            ..IngestRules::default()
        }
        .window(now_ms)
    }

    fn check(batches: &[Batch], now_ms: i64) -> Result<Vec<i64>, StoreError> {
        let series = SeriesMap::from_iter([(1, 10)]);
        IngestItem {
            host: "h",
            batches,
            series: &series,
        }
        .check(window(now_ms))
        .map(|c| c.days)
    }

    #[test]
    fn check_finds_every_day_a_series_spans_whatever_the_point_order() {
        // Points out of order; the latest is in the middle and falls on the next day.
        let now = 20_000 * DAY + 10_000;
        let days = check(&[batch(20_000 * DAY - 1_000, &[500, 2_000, 0])], now);
        assert_eq!(days.ok(), Some(vec![19_999, 20_000]));
        assert_eq!(check(&[batch(5 * DAY, &[])], now).ok(), Some(vec![]));
    }

    #[test]
    fn check_gives_no_day_outside_the_window() {
        let now = 20_000 * DAY + DAY / 2;
        let cases: [(i64, &[u32], &[i64]); 5] = [
            // Wholly too old, wholly in the future, past chrono's range: no partition.
            (now - 11 * DAY, &[0, 1_000], &[]),
            (now + 3_600_000, &[0], &[]),
            (i64::MAX - 10, &[0, 11], &[]),
            // Straddling the lower edge, spread over days: only the days of points inside.
            (
                now - 10 * DAY - 1_000,
                &[0, 2_000, 3 * DAY as u32],
                &[19_990, 19_993],
            ),
            // Up to the upper edge.
            (now, &[0, 300_000, 300_001], &[20_000]),
        ];
        for (base, offsets, days) in cases {
            assert_eq!(
                check(&[batch(base, offsets)], now).ok(),
                Some(days.to_vec()),
                "{base}"
            );
        }
    }

    #[test]
    fn check_marks_the_batches_wholly_inside_the_window() {
        let now = 20_000 * DAY;
        let series = SeriesMap::from_iter([(1, 10)]);
        let batches = [
            batch(now - 1_000, &[0, 1_000]),
            batch(now - 1_000, &[0, 400_000]),
            batch(now - 11 * DAY, &[0, 2 * DAY as u32]),
            batch(now, &[]),
        ];
        let checked = IngestItem {
            host: "h",
            batches: &batches,
            series: &series,
        }
        .check(window(now))
        .map(|c| c.inside);
        assert_eq!(checked.ok(), Some(vec![true, false, false, true]));
    }

    #[test]
    fn check_refuses_a_seq_the_cursor_cannot_hold() {
        let mut b = batch(DAY, &[0]);
        b.seq = u64::MAX;
        match check(&[b], DAY) {
            Err(StoreError::SeqOutOfRange { seq, .. }) => assert_eq!(seq, u64::MAX),
            other => panic!("{other:?}"),
        }
    }
}
