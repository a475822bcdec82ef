//! Telemetry ingest: several batches of one agent in one transaction — samples by
//! binary `COPY`, events by `UNNEST`, component states from `StateChanged` events — and
//! the agent's cursor advanced in the same transaction, so a resent batch (its `seq` at
//! or below the cursor) is recognised and stored once.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use razar_shared::protocol::{Batch, Event, EventKind, Subject};

use super::copy::SampleCopy;
use super::{day_of, from_millis, SeriesId, Store, StoreError};

/// What one [`Store::ingest`] call stored.
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

impl Store {
    /// Stores `batches` of `host` in one transaction and advances its cursor to the
    /// highest stored `seq`. Batches at or below the stored cursor (or not above an
    /// earlier batch of the same call) are skipped as duplicates. `series` maps the
    /// agent's series ids to database ids ([`Store::register_series`]); an unmapped id
    /// fails the whole call with nothing stored. Returns after the commit: only then
    /// may the caller acknowledge `outcome.cursor`.
    pub async fn ingest(
        &self,
        host: &str,
        batches: &[Batch],
        series: &HashMap<u32, SeriesId>,
    ) -> Result<IngestOutcome, StoreError> {
        // Validate everything before touching the database.
        let mut days = BTreeSet::new();
        for batch in batches {
            for points in &batch.series {
                if !series.contains_key(&points.series) {
                    return Err(StoreError::UnknownSeries {
                        host: host.to_owned(),
                        seq: batch.seq,
                        series: points.series,
                    });
                }
                for &(offset, _) in &points.points {
                    let ts = batch.base_ts_ms.saturating_add(i64::from(offset));
                    if from_millis(ts).is_none() {
                        return Err(StoreError::TimestampOutOfRange {
                            host: host.to_owned(),
                            ts_ms: ts,
                        });
                    }
                    days.insert(day_of(ts));
                }
            }
            for event in &batch.events {
                if from_millis(event.ts_ms).is_none() {
                    return Err(StoreError::TimestampOutOfRange {
                        host: host.to_owned(),
                        ts_ms: event.ts_ms,
                    });
                }
            }
        }
        let days: Vec<i64> = days.into_iter().collect();
        self.ensure_days(&days).await?;

        let mut tx = self.pool.begin().await?;
        // Locks the host's cursor: two connections of one host never interleave.
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT acked_seq FROM agent_cursors WHERE host_id = $1 FOR UPDATE")
                .bind(host)
                .fetch_optional(&mut *tx)
                .await?;
        let stored = match stored {
            Some(seq) => seq as u64,
            None => {
                sqlx::query(
                    "INSERT INTO agent_cursors (host_id, acked_seq, updated_at) VALUES ($1, 0, now())
                     ON CONFLICT (host_id) DO NOTHING",
                )
                .bind(host)
                .execute(&mut *tx)
                .await?;
                let seq: i64 = sqlx::query_scalar(
                    "SELECT acked_seq FROM agent_cursors WHERE host_id = $1 FOR UPDATE",
                )
                .bind(host)
                .fetch_one(&mut *tx)
                .await?;
                seq as u64
            }
        };

        let mut outcome = IngestOutcome {
            cursor: stored,
            ..IngestOutcome::default()
        };
        let mut fresh: Vec<&Batch> = Vec::with_capacity(batches.len());
        for batch in batches {
            if batch.seq <= outcome.cursor {
                outcome.batches_duplicate += 1;
            } else {
                outcome.cursor = batch.seq;
                outcome.batches_stored += 1;
                fresh.push(batch);
            }
        }
        if fresh.is_empty() {
            tx.rollback().await?;
            return Ok(outcome);
        }

        let rows: usize = fresh.iter().map(|b| b.sample_count()).sum();
        if rows > 0 {
            let mut copy = SampleCopy::with_capacity(rows);
            for batch in &fresh {
                for points in &batch.series {
                    // Checked above: every series id is mapped.
                    let Some(&id) = series.get(&points.series) else {
                        continue;
                    };
                    for &(offset, value) in &points.points {
                        copy.push(id, batch.base_ts_ms + i64::from(offset), value);
                    }
                }
            }
            outcome.samples = copy.rows();
            let mut sink = tx
                .copy_in_raw("COPY samples (series_id, ts, value) FROM STDIN (FORMAT binary)")
                .await?;
            sink.send(copy.finish()).await?;
            sink.finish().await?;
        }

        let events: Vec<&Event> = fresh.iter().flat_map(|b| b.events.iter()).collect();
        if !events.is_empty() {
            outcome.events = events.len() as u64;
            insert_events(&mut tx, host, &events).await?;
            update_component_states(&mut tx, host, &events).await?;
        }

        sqlx::query(
            "UPDATE agent_cursors SET acked_seq = $2, samples_stored = samples_stored + $3,
                 events_stored = events_stored + $4, updated_at = now()
             WHERE host_id = $1",
        )
        .bind(host)
        .bind(outcome.cursor as i64)
        .bind(outcome.samples as i64)
        .bind(outcome.events as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    host: &str,
    events: &[&Event],
) -> Result<(), StoreError> {
    let mut ts: Vec<DateTime<Utc>> = Vec::with_capacity(events.len());
    let mut severity = Vec::with_capacity(events.len());
    let mut subject_kind = Vec::with_capacity(events.len());
    let mut subject_id: Vec<Option<String>> = Vec::with_capacity(events.len());
    let mut kind = Vec::with_capacity(events.len());
    let mut payload: Vec<serde_json::Value> = Vec::with_capacity(events.len());
    let mut message = Vec::with_capacity(events.len());
    for event in events {
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
         SELECT $1, * FROM UNNEST($2::timestamptz[], $3::text[], $4::text[], $5::text[],
                                  $6::text[], $7::jsonb[], $8::text[])",
    )
    .bind(host)
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

/// Applies the latest `StateChanged` per component to the components table (known
/// components only; an older event never overwrites a newer state).
async fn update_component_states(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    host: &str,
    events: &[&Event],
) -> Result<(), StoreError> {
    let mut latest: HashMap<&str, (i64, &'static str)> = HashMap::new();
    for event in events {
        if let (Subject::Component(name), EventKind::StateChanged { to, .. }) =
            (&event.subject, &event.kind)
        {
            let entry = latest
                .entry(name.as_str())
                .or_insert((event.ts_ms, to.as_str()));
            if event.ts_ms >= entry.0 {
                *entry = (event.ts_ms, to.as_str());
            }
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = latest.keys().copied().collect();
    let states: Vec<&str> = names.iter().map(|n| latest[n].1).collect();
    let ts: Vec<DateTime<Utc>> = names
        .iter()
        .map(|n| from_millis(latest[n].0).unwrap_or_default())
        .collect();
    sqlx::query(
        "UPDATE components c SET state = u.state, updated_at = u.ts
         FROM UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS u(name, state, ts)
         WHERE c.host_id = $1 AND c.name = u.name AND c.updated_at <= u.ts",
    )
    .bind(host)
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
