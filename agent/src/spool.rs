//! Durable spool of telemetry batches: every batch is written here, with its sequence
//! number, before the uplink may send it, and deleted only after the collector's ack.
//!
//! Backed by redb (copy-on-write B-trees, checksummed, durable commits), so a crash
//! or a torn write leaves the last committed state. The spool also keeps the agent's
//! series dictionary, so series ids stay stable across restarts.
//!
//! **Disk budget.** When the stored batches exceed the budget, the oldest batches lose
//! their *samples* first (their events are kept); only when no samples are left are
//! whole batches (their events) dropped. Every loss is counted and reported exactly once
//! as an event attached to the next appended batch: `EventKind::SpoolGap` for samples,
//! `EventKind::Other { code: "spool_events_dropped" }` for events. Never silently.
//! The batches of the append in progress are never dropped whole (they carry the
//! reports), so the budget can be exceeded by at most one append's events.
//!
//! **Sequence numbers** start at 1 and are never reused: the next one is committed with
//! each batch, and an ack beyond it (a collector that remembers more than this disk does)
//! moves it forward.

use razar_shared::domain::Severity;
use razar_shared::protocol::{
    Batch, Event, EventKind, SeriesDef, SeriesPoints, Subject, UnixMillis,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Batches by sequence number, postcard-encoded `Batch`.
const BATCHES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("batches");
/// Spool bookkeeping under one key, postcard-encoded [`Meta`].
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// Series dictionary: id → postcard-encoded (metric, labels).
const SERIES: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("series");

const META_KEY: &str = "meta";

/// Stable code of the event reporting batches whose events had to be dropped.
pub const EVENTS_DROPPED_CODE: &str = "spool_events_dropped";

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The spool file could not be opened or created.
    #[error("cannot open spool {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// A storage operation failed (I/O error, corrupted file).
    #[error("spool storage: {0}")]
    Storage(#[from] redb::Error),
    /// A stored record could not be decoded.
    #[error("spool record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    /// A batch could not be encoded.
    #[error("cannot encode batch: {0}")]
    Encode(postcard::Error),
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for SpoolError {
            fn from(e: $t) -> Self {
                SpoolError::Storage(redb::Error::from(e))
            }
        }
    )*};
}
storage_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// A contiguous range of sequence numbers whose data was lost, not yet reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Samples (or events, for an event gap) lost in the range.
    pub count: u64,
}

impl Gap {
    /// Records the loss of `count` items of batch `seq` in `gaps`. The last range grows
    /// only while it stays exact: no batch between its end and `seq` may have been
    /// acknowledged (delivered intact) — the losses run oldest first, so every
    /// unacknowledged batch in between was itself dropped or carried nothing to lose.
    fn record(gaps: &mut Vec<Gap>, seq: u64, count: u64, acked: u64) {
        if let Some(last) = gaps.last_mut() {
            if seq > last.last_seq && acked <= last.last_seq {
                last.last_seq = seq;
                last.count += count;
                return;
            }
        }
        gaps.push(Gap {
            first_seq: seq,
            last_seq: seq,
            count,
        });
    }
}

/// Bookkeeping committed with every change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    /// Sequence number the next appended batch gets.
    next_seq: u64,
    /// Highest sequence number acknowledged by the collector.
    acked: u64,
    /// Sum of the encoded sizes of the stored batches.
    stored_bytes: u64,
    /// Every stored batch with `seq <= stripped_upto` has no samples left.
    stripped_upto: u64,
    dropped_samples_total: u64,
    dropped_events_total: u64,
    /// Samples dropped but not yet reported, one entry per exact range.
    sample_gaps: Vec<Gap>,
    /// Events dropped but not yet reported, one entry per exact range.
    event_gaps: Vec<Gap>,
    /// Next series id to assign.
    next_series_id: u32,
}

struct Inner {
    meta: Meta,
    /// Number of stored batches.
    len: u64,
    series_by_key: HashMap<(String, Vec<(String, String)>), u32>,
    series: Vec<SeriesDef>,
}

/// The durable spool. Cheap to share behind an `Arc`; every method takes `&self`.
/// Methods block on disk I/O (appends fsync): call them from `spawn_blocking` in async code.
pub struct Spool {
    db: Database,
    path: PathBuf,
    budget_bytes: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("budget_bytes", &self.budget_bytes)
            .finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, SpoolError> {
    postcard::to_allocvec(value).map_err(SpoolError::Encode)
}

fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: impl FnOnce() -> String,
) -> Result<T, SpoolError> {
    match postcard::take_from_bytes(bytes) {
        Ok((v, [])) => Ok(v),
        Ok(_) => Err(SpoolError::Corrupt {
            what: what(),
            reason: "trailing bytes".into(),
        }),
        Err(e) => Err(SpoolError::Corrupt {
            what: what(),
            reason: e.to_string(),
        }),
    }
}

fn batch_what(seq: u64) -> impl FnOnce() -> String {
    move || format!("batch {seq}")
}

impl Spool {
    /// Opens (or creates) the spool at `path`, keeping stored batches within
    /// `budget_bytes` (encoded size).
    pub fn open(path: impl AsRef<Path>, budget_bytes: u64) -> Result<Spool, SpoolError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|source| SpoolError::Open {
            path: path.clone(),
            source,
        })?;
        let txn = db.begin_write()?;
        let (meta, len, series) = {
            let meta_table = txn.open_table(META)?;
            let batches = txn.open_table(BATCHES)?;
            let series_table = txn.open_table(SERIES)?;
            let meta = match meta_table.get(META_KEY)? {
                Some(v) => decode::<Meta>(v.value(), || "meta".into())?,
                None => Meta {
                    next_seq: 1,
                    next_series_id: 1,
                    ..Meta::default()
                },
            };
            let len = redb::ReadableTableMetadata::len(&batches)?;
            let mut series = Vec::new();
            for entry in series_table.iter()? {
                let (id, value) = entry?;
                let id = id.value();
                let (metric, labels): (String, Vec<(String, String)>) =
                    decode(value.value(), || format!("series {id}"))?;
                series.push(SeriesDef { id, metric, labels });
            }
            (meta, len, series)
        };
        txn.commit()?;
        let series_by_key = series
            .iter()
            .map(|d| ((d.metric.clone(), d.labels.clone()), d.id))
            .collect();
        Ok(Spool {
            db,
            path,
            budget_bytes,
            inner: Mutex::new(Inner {
                meta,
                len,
                series_by_key,
                series,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the on-disk state inconsistent
        // (the transaction is dropped uncommitted), so a poisoned lock is still usable
        // once the cached meta is re-read; we keep the cached copy, which only changes
        // after a successful commit.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file backing this spool.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a batch, assigning its sequence number, and commits it durably. Loss
    /// reports pending from earlier budget overruns are attached to its events. Returns
    /// the batch as stored (what the uplink must send).
    pub fn append(
        &self,
        base_ts_ms: UnixMillis,
        series: Vec<SeriesPoints>,
        events: Vec<Event>,
    ) -> Result<Batch, SpoolError> {
        let mut out = self.append_many(vec![(base_ts_ms, series, events)])?;
        out.pop().ok_or_else(|| SpoolError::Corrupt {
            what: "append".into(),
            reason: "no batch returned".into(),
        })
    }

    /// Appends several batches in one durable commit (group commit: one fsync for
    /// all). Each gets the next sequence number, in order; pending loss reports go with
    /// the first. Returns the batches as stored.
    pub fn append_many(
        &self,
        batches: Vec<(UnixMillis, Vec<SeriesPoints>, Vec<Event>)>,
    ) -> Result<Vec<Batch>, SpoolError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let mut meta = inner.meta.clone();
        let mut len = inner.len;
        let mut out = Vec::with_capacity(batches.len());
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(BATCHES)?;
            for (base_ts_ms, series, mut events) in batches {
                let seq = meta.next_seq;
                meta.next_seq += 1;
                self.attach_reports(&mut meta, base_ts_ms, &mut events);
                let batch = Batch {
                    seq,
                    base_ts_ms,
                    series,
                    events,
                };
                let bytes = encode(&batch)?;
                table.insert(seq, bytes.as_slice())?;
                len += 1;
                meta.stored_bytes += bytes.len() as u64;
                out.push(batch);
            }
            if meta.stored_bytes > self.budget_bytes {
                let first_new = out.first().map_or(meta.next_seq, |b| b.seq);
                let outcome = self.enforce_budget(&mut table, &mut meta, &mut len, first_new)?;
                if let Some(stripped) = outcome.stripped_upto {
                    for batch in out.iter_mut().filter(|b| b.seq <= stripped) {
                        batch.series.clear();
                    }
                }
            }
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(META_KEY, encode(&meta)?.as_slice())?;
        }
        txn.commit()?;
        inner.meta = meta;
        inner.len = len;
        Ok(out)
    }

    /// Moves the pending loss reports into `events` (as events of this batch).
    fn attach_reports(&self, meta: &mut Meta, ts_ms: UnixMillis, events: &mut Vec<Event>) {
        for gap in std::mem::take(&mut meta.sample_gaps) {
            events.push(Event {
                ts_ms,
                severity: Severity::Warning,
                subject: Subject::Host,
                kind: EventKind::SpoolGap {
                    first_seq: gap.first_seq,
                    last_seq: gap.last_seq,
                    samples_lost: gap.count,
                },
                message: format!(
                    "spool over budget: {} samples of batches {}..={} dropped",
                    gap.count, gap.first_seq, gap.last_seq
                ),
            });
        }
        for gap in std::mem::take(&mut meta.event_gaps) {
            events.push(Event {
                ts_ms,
                severity: Severity::Warning,
                subject: Subject::Host,
                kind: EventKind::Other {
                    code: EVENTS_DROPPED_CODE.into(),
                },
                message: format!(
                    "spool over budget: dropped {} events of batches {}..={}",
                    gap.count, gap.first_seq, gap.last_seq
                ),
            });
        }
    }

    /// Drops samples, then whole batches, oldest first, until within budget.
    fn enforce_budget(
        &self,
        table: &mut redb::Table<'_, u64, &[u8]>,
        meta: &mut Meta,
        len: &mut u64,
        first_new: u64,
    ) -> Result<Enforcement, SpoolError> {
        let mut out = Enforcement::default();
        // Phase 1: strip samples, oldest first.
        let mut cursor = meta.stripped_upto.saturating_add(1);
        while meta.stored_bytes > self.budget_bytes {
            let next = table
                .range(cursor..)?
                .next()
                .transpose()?
                .map(|(k, v)| (k.value(), v.value().to_vec()));
            let Some((seq, old)) = next else { break };
            cursor = seq + 1;
            meta.stripped_upto = seq;
            let mut batch: Batch = decode(&old, batch_what(seq))?;
            let samples = batch.sample_count() as u64;
            if samples == 0 {
                continue;
            }
            batch.series.clear();
            meta.stored_bytes -= old.len() as u64;
            if batch.events.is_empty() {
                table.remove(seq)?;
                *len -= 1;
            } else {
                let new = encode(&batch)?;
                meta.stored_bytes += new.len() as u64;
                table.insert(seq, new.as_slice())?;
            }
            meta.dropped_samples_total += samples;
            Gap::record(&mut meta.sample_gaps, seq, samples, meta.acked);
            out.stripped_upto = Some(seq);
        }
        // Phase 2: no samples left anywhere; drop whole batches (their events). The
        // batches being appended stay even over budget: they carry the loss reports.
        while meta.stored_bytes > self.budget_bytes {
            let first = table.first()?.map(|(k, v)| (k.value(), v.value().to_vec()));
            let Some((seq, old)) = first else { break };
            if seq >= first_new {
                break;
            }
            let batch: Batch = decode(&old, batch_what(seq))?;
            table.remove(seq)?;
            *len -= 1;
            meta.stored_bytes -= old.len() as u64;
            let events = batch.events.len() as u64;
            meta.dropped_events_total += events;
            Gap::record(&mut meta.event_gaps, seq, events, meta.acked);
        }
        Ok(out)
    }

    /// Stored batches with `seq > after`, oldest first, at most `limit`.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<Batch>, SpoolError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BATCHES)?;
        let mut out = Vec::new();
        for entry in table.range(after.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            out.push(decode(v.value(), batch_what(k.value()))?);
        }
        Ok(out)
    }

    /// Cumulative acknowledgement: every batch with `seq <= upto` is stored by the
    /// collector and leaves the spool. An ack beyond the last assigned sequence number
    /// moves the next one past it, so numbers are never reused.
    pub fn ack(&self, upto: u64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        if upto <= inner.meta.acked && upto < inner.meta.next_seq {
            return Ok(());
        }
        let mut meta = inner.meta.clone();
        let mut len = inner.len;
        let mut txn = self.db.begin_write()?;
        // Losing an ack in a crash only means a resend that the collector recognises,
        // so acks need not wait for fsync; the next append's durable commit covers them.
        txn.set_durability(Durability::None)?;
        {
            let mut table = txn.open_table(BATCHES)?;
            let removed = table.extract_from_if(..=upto, |_, _| true)?;
            for entry in removed {
                let (_, v) = entry?;
                meta.stored_bytes -= v.value().len() as u64;
                len -= 1;
            }
            meta.acked = meta.acked.max(upto);
            meta.next_seq = meta.next_seq.max(upto.saturating_add(1));
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(META_KEY, encode(&meta)?.as_slice())?;
        }
        txn.commit()?;
        inner.meta = meta;
        inner.len = len;
        Ok(())
    }

    /// Id of the series `metric{labels}`, assigned and stored durably on first use.
    /// Labels are sorted by key here.
    pub fn series_id(&self, metric: &str, labels: &[(String, String)]) -> Result<u32, SpoolError> {
        let mut labels = labels.to_vec();
        labels.sort();
        let key = (metric.to_string(), labels);
        let mut inner = self.lock();
        if let Some(id) = inner.series_by_key.get(&key) {
            return Ok(*id);
        }
        let mut meta = inner.meta.clone();
        let id = meta.next_series_id;
        meta.next_series_id += 1;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SERIES)?;
            table.insert(id, encode(&key)?.as_slice())?;
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(META_KEY, encode(&meta)?.as_slice())?;
        }
        txn.commit()?;
        inner.meta = meta;
        inner.series.push(SeriesDef {
            id,
            metric: key.0.clone(),
            labels: key.1.clone(),
        });
        inner.series_by_key.insert(key, id);
        Ok(id)
    }

    /// Every series defined so far, in id order.
    pub fn series(&self) -> Vec<SeriesDef> {
        self.lock().series.clone()
    }

    /// Number of series defined so far.
    pub fn series_count(&self) -> usize {
        self.lock().series.len()
    }

    /// Number of stored (unacknowledged) batches.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// True when no batch awaits an ack.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encoded size of the stored batches.
    pub fn bytes(&self) -> u64 {
        self.lock().meta.stored_bytes
    }

    /// The disk budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Highest acknowledged sequence number (0 = none).
    pub fn acked(&self) -> u64 {
        self.lock().meta.acked
    }

    /// Highest assigned sequence number (0 = none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().meta.next_seq - 1
    }

    /// Samples dropped over the budget since the spool was created.
    pub fn dropped_samples_total(&self) -> u64 {
        self.lock().meta.dropped_samples_total
    }

    /// Events dropped over the budget since the spool was created.
    pub fn dropped_events_total(&self) -> u64 {
        self.lock().meta.dropped_events_total
    }

    /// Sample losses not yet reported (reported in the next appended batch).
    pub fn pending_sample_gaps(&self) -> Vec<Gap> {
        self.lock().meta.sample_gaps.clone()
    }

    /// Event losses not yet reported (reported in the next appended batch).
    pub fn pending_event_gaps(&self) -> Vec<Gap> {
        self.lock().meta.event_gaps.clone()
    }
}

#[derive(Default)]
struct Enforcement {
    stripped_upto: Option<u64>,
}

#[cfg(test)]
mod tests;
