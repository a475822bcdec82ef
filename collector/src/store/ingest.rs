//! Telemetry ingest with group commit: batches of one or several agents in one
//! transaction — samples of every agent in one binary `COPY`, events of every agent in
//! one `UNNEST` insert, component states from `StateChanged` events — and every agent's
//! cursor advanced in the same transaction, so a resent batch (its `seq` at or below the
//! cursor) is recognised and stored once.
//!
//! Cursors are locked with one `SELECT .. ORDER BY host_id FOR UPDATE`: concurrent
//! groups over overlapping hosts take their locks in the same order and never deadlock.
//! Validation (undefined series, timestamps out of range) is per item
//! ([`IngestItem::check`]): a caller grouping independent requests checks each first, so
//! an invalid one fails alone.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use razar_shared::protocol::{Batch, Event, EventKind, Subject};

use super::copy::SampleCopy;
use super::{day_of, from_millis, SeriesMap, Store, StoreError};

/// What one agent's part of an ingest stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The agent's cursor after the commit: every batch with `seq <= cursor` is stored.
    /// Acknowledge this value.
    pub cursor: u64,
    /// Batches stored by this call.
    pub batches_stored: u32,
    /// Batches skipped because they were already stored (a resend).
    pub batches_duplicate: u32,
    pub samples: u64,
    pub events: u64,
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
    /// every timestamp is representable. Returns the days (since the Unix epoch) its
    /// samples fall on, sorted, for their partitions.
    pub fn check(&self) -> Result<Vec<i64>, StoreError> {
        let mut days = BTreeSet::new();
        let mut last_day = None;
        for batch in self.batches {
            // Representable timestamps form one range, so the batch's earliest and latest
            // point stand for all of its points: no date arithmetic per sample or per
            // series (this runs for every sample stored).
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
            if let Some((first, last)) = range {
                let first = batch.base_ts_ms.saturating_add(i64::from(first));
                let last = batch.base_ts_ms.saturating_add(i64::from(last));
                for ts in [first, last] {
                    if from_millis(ts).is_none() {
                        return Err(StoreError::TimestampOutOfRange {
                            host: self.host.to_owned(),
                            ts_ms: ts,
                        });
                    }
                }
                // Offsets are u32 milliseconds: at most 50 days between first and last.
                for day in day_of(first)..=day_of(last) {
                    // Samples of a batch are nearly always on one day: skip the set.
                    if last_day != Some(day) {
                        days.insert(day);
                        last_day = Some(day);
                    }
                }
            }
            for event in &batch.events {
                if from_millis(event.ts_ms).is_none() {
                    return Err(StoreError::TimestampOutOfRange {
                        host: self.host.to_owned(),
                        ts_ms: event.ts_ms,
                    });
                }
            }
        }
        Ok(days.into_iter().collect())
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
        let days = item.check()?;
        let commit = self.ingest_checked(&[item], &days, None).await?;
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
        let mut days = Vec::new();
        for item in items {
            days.extend(item.check()?);
        }
        days.sort_unstable();
        days.dedup();
        Ok(self.ingest_checked(items, &days, None).await?.outcomes)
    }

    /// [`Store::ingest_group`] for items already checked; `days` are the days their
    /// samples fall on. With `copy_slots`, the samples' `COPY` runs only while holding
    /// one of its permits.
    pub(crate) async fn ingest_checked(
        &self,
        items: &[IngestItem<'_>],
        days: &[i64],
        copy_slots: Option<&tokio::sync::Semaphore>,
    ) -> Result<GroupCommit, StoreError> {
        if items.is_empty() {
            return Ok(GroupCommit::default());
        }
        self.ensure_days(days).await?;

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
                cursors.insert(hosts[at], HostTotals::at(*seq as u64));
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
        let mut fresh: Vec<(usize, &Batch)> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let Some(totals) = cursors.get_mut(item.host) else {
                return Err(StoreError::Db(sqlx::Error::RowNotFound));
            };
            let mut outcome = IngestOutcome {
                cursor: totals.cursor,
                ..IngestOutcome::default()
            };
            for batch in item.batches {
                if batch.seq <= outcome.cursor {
                    outcome.batches_duplicate += 1;
                } else {
                    outcome.cursor = batch.seq;
                    outcome.batches_stored += 1;
                    fresh.push((index, batch));
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

        let rows: usize = fresh.iter().map(|(_, b)| b.sample_count()).sum();
        if rows > 0 {
            let mut copy = SampleCopy::with_capacity(rows);
            for &(index, batch) in &fresh {
                let item = &items[index];
                let before = copy.rows();
                for points in &batch.series {
                    // Checked: every series id is mapped.
                    let Some(&id) = item.series.get(&points.series) else {
                        continue;
                    };
                    for &(offset, value) in &points.points {
                        copy.push(id, batch.base_ts_ms + i64::from(offset), value);
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

        let mut events: Vec<(&str, &Event)> = Vec::new();
        for &(index, batch) in &fresh {
            let host = items[index].host;
            outcomes[index].events += batch.events.len() as u64;
            events.extend(batch.events.iter().map(|e| (host, e)));
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
                seqs.push(totals.cursor as i64);
                samples.push(totals.samples as i64);
                event_counts.push(totals.events as i64);
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
        Ok(GroupCommit {
            outcomes,
            committed: true,
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

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[(&str, &Event)],
) -> Result<(), StoreError> {
    let mut host = Vec::with_capacity(events.len());
    let mut ts: Vec<DateTime<Utc>> = Vec::with_capacity(events.len());
    let mut severity = Vec::with_capacity(events.len());
    let mut subject_kind = Vec::with_capacity(events.len());
    let mut subject_id: Vec<Option<String>> = Vec::with_capacity(events.len());
    let mut kind = Vec::with_capacity(events.len());
    let mut payload: Vec<serde_json::Value> = Vec::with_capacity(events.len());
    let mut message = Vec::with_capacity(events.len());
    for &(h, event) in events {
        host.push(h);
        ts.push(from_millis(event.ts_ms).unwrap_or_default());
        severity.push(event.severity.as_str());
        let (sk, sid) = subject_columns(&event.subject);
        subject_kind.push(sk);
        subject_id.push(sid);
        kind.push(kind_code(&event.kind));
        payload.push(
            serde_json::to_value(&event.kind)
                .unwrap_or_else(|e| serde_json::json!({ "unencodable": e.to_string() })),
        );
        message.push(event.message.as_str());
    }
    sqlx::query(
        "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::jsonb[], $8::text[])",
    )
    .bind(&host)
    .bind(&ts)
    .bind(&severity)
    .bind(&subject_kind)
    .bind(&subject_id)
    .bind(&kind)
    .bind(&payload)
    .bind(&message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Applies the latest `StateChanged` per component of each host to the components table
/// (known components only; an older event never overwrites a newer state).
async fn update_component_states(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[(&str, &Event)],
) -> Result<(), StoreError> {
    // (host, component) → (time, state) of its latest change.
    let mut latest: HashMap<(&str, &str), (i64, &'static str)> = HashMap::new();
    for &(host, event) in events {
        if let (Subject::Component(name), EventKind::StateChanged { to, .. }) =
            (&event.subject, &event.kind)
        {
            let entry = latest
                .entry((host, name.as_str()))
                .or_insert((event.ts_ms, to.as_str()));
            if event.ts_ms >= entry.0 {
                *entry = (event.ts_ms, to.as_str());
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
    let ts: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| from_millis(r.1 .0).unwrap_or_default())
        .collect();
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

fn subject_columns(subject: &Subject) -> (&'static str, Option<String>) {
    match subject {
        Subject::Host => ("host", None),
        Subject::Component(name) => ("component", Some(name.clone())),
        Subject::Gpu(index) => ("gpu", Some(index.to_string())),
    }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use razar_shared::protocol::SeriesPoints;

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

    fn check(batches: &[Batch]) -> Result<Vec<i64>, StoreError> {
        let series = SeriesMap::from_iter([(1, 10)]);
        IngestItem {
            host: "h",
            batches,
            series: &series,
        }
        .check()
    }

    #[test]
    fn check_finds_every_day_a_series_spans_whatever_the_point_order() {
        const DAY: i64 = 86_400_000;
        // Points out of order; the latest is in the middle and falls on the next day.
        let days = check(&[batch(20_000 * DAY - 1_000, &[500, 2_000, 0])]);
        assert_eq!(days.ok(), Some(vec![19_999, 20_000]));
        assert_eq!(check(&[batch(5 * DAY, &[])]).ok(), Some(vec![]));
    }

    #[test]
    fn check_refuses_a_timestamp_out_of_range_anywhere_in_a_series() {
        // chrono's range ends in the year 262143; the middle point crosses it.
        let edge = 8_210_266_876_799_999;
        assert!(from_millis(edge).is_some() && from_millis(edge + 1).is_none());
        match check(&[batch(edge - 10, &[0, 11, 5])]) {
            Err(StoreError::TimestampOutOfRange { ts_ms, .. }) => assert_eq!(ts_ms, edge + 1),
            other => panic!("{other:?}"),
        }
    }
}
