//! Durable spool of telemetry batches: every batch is written here, with its sequence
//! number, before the uplink may send it, and deleted only after the collector's ack.
//!
//! Backed by redb (copy-on-write B-trees, checksummed, durable commits), so a crash
//! or a torn write leaves the last committed state. The spool also keeps the agent's
//! series dictionary, so series ids stay stable across restarts.
//!
//! **Disk budget.** When the stored batches exceed the budget, the oldest batches lose
//! their *samples* first (their events are kept); only when no samples are left do the
//! oldest batches lose their events too. A batch that lost everything stays as an empty
//! tombstone (a few bytes) until it is acknowledged, so every sequence number is still
//! sent. The batches of the append in progress never lose their events, so the budget
//! can be exceeded by at most one append's events (plus the tombstones).
//!
//! **Loss reports ride with the loss.** What a batch lost is recorded durably per
//! sequence number (table `losses`). The report is made when the batch goes on the wire:
//! [`Spool::prepare`] turns the uplink's copy (which may still be whole in memory) into
//! what the spool kept, and the last batch of a run of consecutive lossy batches carries
//! one merged report for the whole run: `EventKind::SpoolGap` for samples,
//! `EventKind::Other { code: "spool_events_dropped" }` for events. So a report is stored
//! by the collector exactly when the stripped batches it names are (acknowledgements are
//! cumulative), a batch whose whole copy reached the collector before it was stripped is
//! never reported lost, and no report can sit in a batch that is dropped later.
//!
//! **A new spool meets an old cursor.** A spool created empty (a wiped state directory
//! on a host that keeps its certificate) numbers from 1, while the collector may already
//! hold this host's batches up to a higher cursor. The first `Welcome` settles it
//! ([`Spool::welcome`]): a spool that never met a collector renumbers its batches above
//! the cursor and records a `spool_reset` event, instead of letting the cursor
//! acknowledge (delete) batches the collector never saw.
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
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Batches by sequence number, postcard-encoded `Batch`.
const BATCHES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("batches");
/// Spool bookkeeping under one key, postcard-encoded [`Meta`].
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// Series dictionary: id → postcard-encoded (metric, labels).
const SERIES: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("series");
/// What each stored (or recently acknowledged) batch lost to the budget and that is not
/// yet reported: seq → (samples, events).
const LOSSES: TableDefinition<'_, u64, (u64, u64)> = TableDefinition::new("losses");

const META_KEY: &str = "meta";
/// Whether this spool has met a collector (`true`) or was created empty and has not yet
/// (`false`), postcard-encoded `bool`. Absent in spools of older versions (which had met
/// one).
const MET_COLLECTOR_KEY: &str = "met_collector";

/// Stable code of the event reporting batches whose events had to be dropped.
pub const EVENTS_DROPPED_CODE: &str = "spool_events_dropped";
/// Stable code of the event recording that a new (wiped) spool renumbered its batches
/// above the collector's cursor.
pub const SPOOL_RESET_CODE: &str = "spool_reset";

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

/// What one batch lost to the budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loss {
    pub samples: u64,
    pub events: u64,
}

/// A new spool renumbered above the collector's cursor ([`Spool::welcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renumbered {
    /// The collector's cursor.
    pub cursor: u64,
    /// Added to every stored seq; new batches are numbered above `offset`.
    pub offset: u64,
    /// Batches renumbered.
    pub batches: u64,
}

/// A contiguous range of sequence numbers whose data was lost, not yet reported
/// (spools of older versions; new losses are in the `losses` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Samples (or events, for an event gap) lost in the range.
    pub count: u64,
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
    /// Samples dropped but not yet reported, one entry per exact range (written by
    /// older versions only; reported with the next append).
    sample_gaps: Vec<Gap>,
    /// Events dropped but not yet reported (older versions only, as above).
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
    /// Mirror of the `losses` table.
    losses: BTreeMap<u64, Loss>,
    /// Batches that carried a loss report on the current connection: carrier seq →
    /// first seq of the range it reported. Consumed by acks, cleared by a `Welcome`.
    carried: BTreeMap<u64, u64>,
    /// What each batch sent on the current connection (and not yet acknowledged) had
    /// lost when it went out (`Loss::default()`: whole). If the budget takes more from
    /// it later, the collector still gets the copy that went out: this is its loss.
    sent: BTreeMap<u64, Loss>,
    /// Every stored batch with `seq <= emptied_upto` has no events left or belongs to
    /// an append in progress (scan start of the events phase; not persisted).
    emptied_upto: u64,
    met_collector: bool,
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
        let (meta, len, series, losses, met_collector) = {
            let mut meta_table = txn.open_table(META)?;
            let batches = txn.open_table(BATCHES)?;
            let series_table = txn.open_table(SERIES)?;
            let losses_table = txn.open_table(LOSSES)?;
            let (meta, fresh) = match meta_table.get(META_KEY)? {
                Some(v) => (decode::<Meta>(v.value(), || "meta".into())?, false),
                None => (
                    Meta {
                        next_seq: 1,
                        next_series_id: 1,
                        ..Meta::default()
                    },
                    true,
                ),
            };
            let met = meta_table
                .get(MET_COLLECTOR_KEY)?
                .map(|v| decode::<bool>(v.value(), || MET_COLLECTOR_KEY.into()))
                .transpose()?;
            let met_collector = match met {
                Some(met) => met,
                None => {
                    // Older spools had met a collector; a new one has not.
                    meta_table.insert(MET_COLLECTOR_KEY, encode(&!fresh)?.as_slice())?;
                    !fresh
                }
            };
            let mut losses = BTreeMap::new();
            for entry in losses_table.iter()? {
                let (seq, value) = entry?;
                let (samples, events) = value.value();
                losses.insert(seq.value(), Loss { samples, events });
            }
            let len = redb::ReadableTableMetadata::len(&batches)?;
            let mut series = Vec::new();
            for entry in series_table.iter()? {
                let (id, value) = entry?;
                let id = id.value();
                let (metric, labels): (String, Vec<(String, String)>) =
                    decode(value.value(), || format!("series {id}"))?;
                series.push(SeriesDef { id, metric, labels });
            }
            (meta, len, series, losses, met_collector)
        };
        txn.commit()?;
        let emptied_upto = meta.acked;
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
                losses,
                carried: BTreeMap::new(),
                sent: BTreeMap::new(),
                emptied_upto,
                met_collector,
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
    /// all). Each gets the next sequence number, in order. Returns the batches as
    /// stored.
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
        let mut new_losses = BTreeMap::new();
        let mut emptied_upto = inner.emptied_upto;
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
                let mut enforcement = Enforcement {
                    meta: &mut meta,
                    losses: &mut new_losses,
                    known: &inner.losses,
                    emptied_upto: &mut emptied_upto,
                };
                self.enforce_budget(&mut table, &mut enforcement, first_new)?;
                for batch in out.iter_mut() {
                    if let Some(loss) = new_losses.get(&batch.seq) {
                        if loss.samples > 0 {
                            batch.series.clear();
                        }
                    }
                }
            }
            if !new_losses.is_empty() {
                let mut losses = txn.open_table(LOSSES)?;
                for (seq, loss) in &new_losses {
                    losses.insert(*seq, (loss.samples, loss.events))?;
                }
            }
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(META_KEY, encode(&meta)?.as_slice())?;
        }
        txn.commit()?;
        inner.meta = meta;
        inner.len = len;
        inner.emptied_upto = emptied_upto;
        inner.losses.extend(new_losses);
        Ok(out)
    }

    /// Moves loss reports pending from older versions into `events`.
    fn attach_reports(&self, meta: &mut Meta, ts_ms: UnixMillis, events: &mut Vec<Event>) {
        for gap in std::mem::take(&mut meta.sample_gaps) {
            events.push(sample_gap_event(ts_ms, gap));
        }
        for gap in std::mem::take(&mut meta.event_gaps) {
            events.push(event_gap_event(ts_ms, gap));
        }
    }

    /// Drops samples, then events, oldest first, until within budget. Every loss goes to
    /// `e.losses` (merged with what the batch lost before).
    fn enforce_budget(
        &self,
        table: &mut redb::Table<'_, u64, &[u8]>,
        e: &mut Enforcement<'_>,
        first_new: u64,
    ) -> Result<(), SpoolError> {
        // Phase 1: strip samples, oldest first.
        let mut cursor = e.meta.stripped_upto.saturating_add(1);
        while e.meta.stored_bytes > self.budget_bytes {
            let Some((seq, old)) = next_from(table, cursor)? else {
                break;
            };
            cursor = seq + 1;
            e.meta.stripped_upto = seq;
            let mut batch: Batch = decode(&old, batch_what(seq))?;
            let samples = batch.sample_count() as u64;
            if samples == 0 {
                continue;
            }
            batch.series.clear();
            replace(table, e.meta, seq, old.len(), &batch)?;
            e.meta.dropped_samples_total += samples;
            e.loss(seq).samples += samples;
        }
        // Phase 2: no samples left anywhere; the oldest batches lose their events and
        // stay as tombstones. The batches being appended keep theirs even over budget.
        let mut cursor = (*e.emptied_upto).max(e.meta.acked).saturating_add(1);
        while e.meta.stored_bytes > self.budget_bytes && cursor < first_new {
            let Some((seq, old)) = next_from(table, cursor)? else {
                break;
            };
            if seq >= first_new {
                break;
            }
            cursor = seq + 1;
            *e.emptied_upto = seq;
            let mut batch: Batch = decode(&old, batch_what(seq))?;
            let events = batch.events.len() as u64;
            let samples = batch.sample_count() as u64;
            if events == 0 && samples == 0 {
                continue;
            }
            batch.events.clear();
            batch.series.clear();
            replace(table, e.meta, seq, old.len(), &batch)?;
            e.meta.dropped_events_total += events;
            e.meta.dropped_samples_total += samples;
            let loss = e.loss(seq);
            loss.events += events;
            loss.samples += samples;
        }
        Ok(())
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

    /// Turns the uplink's copy of a batch into what goes on the wire: what the budget
    /// took from it since it was read is taken from the copy too, and the last batch of
    /// a run of lossy batches carries one report for the run (see the module docs).
    /// Call it for every batch written to a connection, in seq order; no I/O.
    pub fn prepare(&self, batch: &mut Batch, ts_ms: UnixMillis) {
        let mut inner = self.lock();
        let seq = batch.seq;
        let Some(own) = inner.losses.get(&seq).copied() else {
            inner.sent.insert(seq, Loss::default());
            return;
        };
        inner.sent.insert(seq, own);
        if own.samples > 0 {
            batch.series.clear();
        }
        if own.events > 0 {
            batch.events.clear();
        }
        if inner.losses.contains_key(&(seq + 1)) {
            // Not the end of its run: the last batch reports for all.
            return;
        }
        // The run: lossy batches before this one, back to one whose whole copy went
        // out on this connection (not lost if it arrives) or one that already carried
        // a report for the part before it.
        let mut first = seq;
        while first > 1
            && inner.effective_loss(first - 1).is_some()
            && !inner.carried.contains_key(&(first - 1))
        {
            first -= 1;
        }
        // Samples: one range, from the first to the last batch that lost samples (they
        // go oldest first; a batch in between without a sample loss had none). Events:
        // one range per stretch of batches that lost events (a batch in flight while
        // older ones lost theirs may have kept its own).
        let mut samples: Option<Gap> = None;
        let mut events: Vec<Gap> = Vec::new();
        let extend = |gap: &mut Gap, s: u64, count: u64| {
            gap.last_seq = s;
            gap.count += count;
        };
        for s in first..=seq {
            let Some(loss) = inner.effective_loss(s) else {
                continue;
            };
            if loss.samples > 0 {
                let g = samples.get_or_insert(Gap {
                    first_seq: s,
                    last_seq: s,
                    count: 0,
                });
                extend(g, s, loss.samples);
            }
            if loss.events > 0 {
                match events.last_mut() {
                    Some(g) if g.last_seq + 1 == s => extend(g, s, loss.events),
                    _ => events.push(Gap {
                        first_seq: s,
                        last_seq: s,
                        count: loss.events,
                    }),
                }
            }
        }
        inner.carried.insert(seq, first);
        if let Some(gap) = samples {
            batch.events.push(sample_gap_event(ts_ms, gap));
        }
        for gap in events {
            batch.events.push(event_gap_event(ts_ms, gap));
        }
    }

    /// The collector welcomed the agent with its cursor. A spool that never met a
    /// collector and finds a cursor above zero belongs to a host whose state was wiped:
    /// its batches are renumbered above the cursor (and above every seq it used, so a
    /// batch handed out under an old number is never mistaken for a new one) and a
    /// `spool_reset` event is appended. Then the cursor acknowledges as [`ack`] does,
    /// and reports made on the previous connection that the cursor does not cover are
    /// forgotten (they will be made again).
    ///
    /// [`ack`]: Self::ack
    pub fn welcome(
        &self,
        cursor: u64,
        ts_ms: UnixMillis,
    ) -> Result<Option<Renumbered>, SpoolError> {
        let renumbered = {
            let mut inner = self.lock();
            if inner.met_collector {
                None
            } else {
                let renumbered = if cursor > 0 {
                    Some(self.renumber(&mut inner, cursor)?)
                } else {
                    let txn = self.db.begin_write()?;
                    txn.open_table(META)?
                        .insert(MET_COLLECTOR_KEY, encode(&true)?.as_slice())?;
                    txn.commit()?;
                    None
                };
                inner.met_collector = true;
                renumbered
            }
        };
        if let Some(r) = renumbered {
            self.append(
                ts_ms,
                Vec::new(),
                vec![Event {
                    ts_ms,
                    severity: Severity::Warning,
                    subject: Subject::Host,
                    kind: EventKind::Other {
                        code: SPOOL_RESET_CODE.into(),
                    },
                    message: format!(
                        "agent state was new but the collector holds this host's batches up to {}: \
                         {} unsent batches renumbered above {}",
                        r.cursor, r.batches, r.offset
                    ),
                }],
            )?;
        } else {
            self.ack(cursor)?;
        }
        let mut inner = self.lock();
        inner.carried.clear();
        inner.sent.clear();
        Ok(renumbered)
    }

    /// Renumbers every stored batch (and its loss record) by `max(cursor, last seq)`.
    fn renumber(&self, inner: &mut Inner, cursor: u64) -> Result<Renumbered, SpoolError> {
        let mut meta = inner.meta.clone();
        let offset = cursor.max(meta.next_seq.saturating_sub(1));
        let mut batches = 0;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(BATCHES)?;
            let mut stored = Vec::new();
            for entry in table.extract_from_if(0u64.., |_, _| true)? {
                let (k, v) = entry?;
                stored.push((k.value(), v.value().to_vec()));
            }
            meta.stored_bytes = 0;
            for (seq, bytes) in stored {
                let mut batch: Batch = decode(&bytes, batch_what(seq))?;
                batch.seq = seq + offset;
                let bytes = encode(&batch)?;
                meta.stored_bytes += bytes.len() as u64;
                table.insert(batch.seq, bytes.as_slice())?;
                batches += 1;
            }
            let mut losses = txn.open_table(LOSSES)?;
            losses.extract_from_if(0u64.., |_, _| true)?.for_each(drop);
            for (seq, loss) in &inner.losses {
                losses.insert(seq + offset, (loss.samples, loss.events))?;
            }
            meta.next_seq += offset;
            meta.acked = cursor;
            if meta.stripped_upto > 0 {
                meta.stripped_upto += offset;
            }
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(META_KEY, encode(&meta)?.as_slice())?;
            meta_table.insert(MET_COLLECTOR_KEY, encode(&true)?.as_slice())?;
        }
        txn.commit()?;
        inner.losses = std::mem::take(&mut inner.losses)
            .into_iter()
            .map(|(seq, loss)| (seq + offset, loss))
            .collect();
        inner.emptied_upto = cursor;
        inner.meta = meta;
        Ok(Renumbered {
            cursor,
            offset,
            batches,
        })
    }

    /// Cumulative acknowledgement: every batch with `seq <= upto` is stored by the
    /// collector and leaves the spool. An ack beyond the last assigned sequence number
    /// moves the next one past it, so numbers are never reused. Loss records of acked
    /// batches go too, except a run that goes on past `upto` and is not yet reported.
    pub fn ack(&self, upto: u64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let (settled, corrected) = settle_losses(&inner, upto);
        if upto <= inner.meta.acked
            && upto < inner.meta.next_seq
            && settled.is_empty()
            && corrected.is_empty()
        {
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
            if !settled.is_empty() || !corrected.is_empty() {
                let mut losses = txn.open_table(LOSSES)?;
                for seq in &settled {
                    losses.remove(*seq)?;
                }
                for (seq, loss) in &corrected {
                    losses.insert(*seq, (loss.samples, loss.events))?;
                }
            }
            meta.acked = meta.acked.max(upto);
            meta.next_seq = meta.next_seq.max(upto.saturating_add(1));
            let mut meta_table = txn.open_table(META)?;
            meta_table.insert(META_KEY, encode(&meta)?.as_slice())?;
        }
        txn.commit()?;
        inner.meta = meta;
        inner.len = len;
        for seq in &settled {
            inner.losses.remove(seq);
        }
        inner.losses.extend(corrected);
        inner.carried = inner.carried.split_off(&upto.saturating_add(1));
        inner.sent = inner.sent.split_off(&upto.saturating_add(1));
        inner.emptied_upto = inner.emptied_upto.max(upto);
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

    /// Loss records not yet reported and acknowledged, by seq.
    pub fn losses(&self) -> BTreeMap<u64, Loss> {
        self.lock().losses.clone()
    }

    /// False until this spool (created empty) has met a collector's `Welcome`.
    pub fn met_collector(&self) -> bool {
        self.lock().met_collector
    }

    /// Sample losses of older versions not yet reported (reported in the next appended
    /// batch).
    pub fn pending_sample_gaps(&self) -> Vec<Gap> {
        self.lock().meta.sample_gaps.clone()
    }

    /// Event losses of older versions not yet reported (as above).
    pub fn pending_event_gaps(&self) -> Vec<Gap> {
        self.lock().meta.event_gaps.clone()
    }
}

/// What a budget enforcement works on.
struct Enforcement<'a> {
    meta: &'a mut Meta,
    /// Losses of this enforcement, merged with earlier ones of the same batches.
    losses: &'a mut BTreeMap<u64, Loss>,
    /// Losses recorded before.
    known: &'a BTreeMap<u64, Loss>,
    emptied_upto: &'a mut u64,
}

impl Enforcement<'_> {
    fn loss(&mut self, seq: u64) -> &mut Loss {
        let known = self.known.get(&seq).copied().unwrap_or_default();
        self.losses.entry(seq).or_insert(known)
    }
}

/// The first stored batch with `seq >= from`.
fn next_from(
    table: &redb::Table<'_, u64, &[u8]>,
    from: u64,
) -> Result<Option<(u64, Vec<u8>)>, SpoolError> {
    Ok(table
        .range(from..)?
        .next()
        .transpose()?
        .map(|(k, v)| (k.value(), v.value().to_vec())))
}

/// Stores `batch` in place of the `old_len` bytes stored under `seq`.
fn replace(
    table: &mut redb::Table<'_, u64, &[u8]>,
    meta: &mut Meta,
    seq: u64,
    old_len: usize,
    batch: &Batch,
) -> Result<(), SpoolError> {
    let new = encode(batch)?;
    meta.stored_bytes = meta.stored_bytes - old_len as u64 + new.len() as u64;
    table.insert(seq, new.as_slice())?;
    Ok(())
}

/// What an ack of `upto` does to the loss records: the records it settles (reported,
/// or no loss because the collector got the copy that went out whole), and the records
/// kept with what the collector really lacks: the acked part of a run that goes on
/// past `upto` (its report rides on the run's last batch, not yet acknowledged), each
/// with the loss of the copy that went out.
fn settle_losses(inner: &Inner, upto: u64) -> (Vec<u64>, Vec<(u64, Loss)>) {
    let mut keep_from = upto.saturating_add(1);
    if inner.losses.contains_key(&keep_from) {
        while keep_from > 1
            && inner.effective_loss(keep_from - 1).is_some()
            && !inner.carried.contains_key(&(keep_from - 1))
        {
            keep_from -= 1;
        }
    }
    let mut settled = Vec::new();
    let mut corrected = Vec::new();
    for (seq, loss) in inner.losses.range(..=upto) {
        match inner.effective_loss(*seq) {
            Some(lacks) if *seq >= keep_from => {
                if lacks != *loss {
                    corrected.push((*seq, lacks));
                }
            }
            _ => settled.push(*seq),
        }
    }
    (settled, corrected)
}

impl Inner {
    /// What batch `seq` lacks where it is going: the copy sent on this connection if
    /// one was, else the spool's copy. `None`: nothing.
    fn effective_loss(&self, seq: u64) -> Option<Loss> {
        match self.sent.get(&seq) {
            Some(sent) if *sent == Loss::default() => None,
            Some(sent) => Some(*sent),
            None => self.losses.get(&seq).copied(),
        }
    }
}

fn sample_gap_event(ts_ms: UnixMillis, gap: Gap) -> Event {
    Event {
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
    }
}

fn event_gap_event(ts_ms: UnixMillis, gap: Gap) -> Event {
    Event {
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
    }
}

#[cfg(test)]
mod tests;
