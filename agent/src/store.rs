//! The agent's durable local state in one redb file, `<data_dir>/agent.redb`:
//! quarantines, component revisions, last known pids, executed command ids (so a
//! redelivered command runs at most once) and a small key/value table for the rest.
//!
//! Every write is its own redb transaction committed with the default durability
//! (fsync'd), so what a method returned `Ok` for survives a crash or a SIGKILL. Methods
//! block on disk I/O: call them from `spawn_blocking` (or accept a short block) in async
//! code. Rows are encoded with postcard; a row that does not decode is reported as
//! [`StoreError::Corrupt`] naming the table and key, never a panic.
//!
//! **Last known pids are the exception**: they sit in small files
//! `<data_dir>/pids/<component>`, written to a temporary file and renamed into place,
//! without fsync. They are on the restart path (cleared when a process exits, written
//! when its successor starts), where two fsyncs would cost milliseconds, and they need
//! only survive the *agent's* death: data handed to the kernel survives a SIGKILL of the
//! writer, and after an OS crash or power loss the processes they name are gone anyway
//! (a torn or stale file is refused or fails the start-time check of [`crate::process::adopt`]).
//! [`Store::set_revision`] skips the commit when the revision is unchanged, for the same reason.
#![forbid(unsafe_code)]

use crate::process::ProcessId;
use razar_shared::protocol::{CommandId, CommandOutcome, UnixMillis};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the store inside the data directory.
pub const FILE_NAME: &str = "agent.redb";
/// Directory of the last-known-pid files inside the data directory.
pub const PIDS_DIR: &str = "pids";

const QUARANTINES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("quarantines");
const REVISIONS: TableDefinition<'_, &str, &str> = TableDefinition::new("revisions");
const COMMANDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("commands");
const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const REVISION_HISTORY: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("revision_history");

/// How many distinct revisions of each component are kept for rollbacks.
pub const REVISIONS_KEPT: usize = 5;

/// A revision a component ran, with its full spec, for rollbacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRevision {
    /// The revision label (`revision` key, or the spec hash when unset).
    pub revision: String,
    /// sha256 of `spec`.
    pub spec_hash: String,
    /// The component's `[[component]]` table as TOML.
    pub spec: String,
    /// When the agent first ran it.
    pub first_ms: UnixMillis,
}

/// A component held out of service until an operator resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub since_ms: UnixMillis,
    /// Why it was quarantined (e.g. `5 failures within 60s`).
    pub reason: String,
    /// Free text from whoever quarantined it (empty when the give-up rule did).
    pub note: String,
}

/// The process the agent last started for a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownProcess {
    pub pid: u32,
    pub pgid: i32,
    /// `/proc/<pid>/stat` field 22, so a recycled pid is not mistaken for it.
    pub start_time: u64,
}

impl KnownProcess {
    pub fn id(&self) -> ProcessId {
        ProcessId {
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

/// What an executed command ended with, kept to answer its redelivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub outcome: CommandOutcome,
    pub finished_ms: UnixMillis,
    pub message: String,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file could not be opened or created (also: already open in this process).
    #[error("cannot open agent store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// A storage operation failed (I/O error, corrupted file).
    #[error("agent store: {0}")]
    Storage(#[from] redb::Error),
    /// A stored row could not be decoded.
    #[error("agent store: row `{key}` of table `{table}` is corrupt: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    /// A row could not be encoded.
    #[error("agent store: cannot encode a row: {0}")]
    Encode(postcard::Error),
    /// The component name cannot be a file name (1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.`).
    #[error("agent store: `{0}` is not a valid component name")]
    BadName(String),
    /// A pid file could not be read, written or removed.
    #[error("agent store: pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(redb::Error::from(e))
            }
        }
    )*};
}
storage_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The agent's durable local state. Share it behind an `Arc`; every method takes `&self`.
pub struct Store {
    db: Database,
    path: PathBuf,
    pids: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(StoreError::Encode)
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn check_name(component: &str) -> Result<(), StoreError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if component.is_empty()
        || component.len() > 64
        || component.starts_with('.')
        || !component.chars().all(ok_char)
    {
        return Err(StoreError::BadName(component.to_owned()));
    }
    Ok(())
}

fn parse_pid_file(text: &str) -> Option<KnownProcess> {
    let mut fields = text.split_ascii_whitespace();
    let process = KnownProcess {
        pid: fields.next()?.parse().ok()?,
        pgid: fields.next()?.parse().ok()?,
        start_time: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(process)
}

impl Store {
    /// Opens (or creates) `<data_dir>/agent.redb`, creating `data_dir` if needed.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = data_dir.as_ref().join(FILE_NAME);
        std::fs::create_dir_all(data_dir.as_ref()).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: redb::DatabaseError::Storage(redb::StorageError::Io(e)),
        })?;
        let db = Database::create(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        // Create every table once so readers never meet a missing one.
        let txn = db.begin_write()?;
        txn.open_table(QUARANTINES)?;
        txn.open_table(REVISIONS)?;
        txn.open_table(COMMANDS)?;
        txn.open_table(KV)?;
        txn.open_table(REVISION_HISTORY)?;
        txn.commit()?;
        let pids = data_dir.as_ref().join(PIDS_DIR);
        std::fs::create_dir_all(&pids).map_err(|source| StoreError::PidFile {
            path: pids.clone(),
            source,
        })?;
        Ok(Store { db, path, pids })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // ----- quarantines -----

    /// Quarantines `component` (replacing an earlier record).
    pub fn quarantine(&self, component: &str, record: &Quarantine) -> Result<(), StoreError> {
        self.put(QUARANTINES, component, &encode(record)?)
    }

    /// Lifts the quarantine of `component`; returns the record it had, if any.
    pub fn resolve(&self, component: &str) -> Result<Option<Quarantine>, StoreError> {
        let old = self.remove(QUARANTINES, component)?;
        old.map(|bytes| decode("quarantines", component, &bytes))
            .transpose()
    }

    pub fn quarantine_of(&self, component: &str) -> Result<Option<Quarantine>, StoreError> {
        self.get(QUARANTINES, component)?
            .map(|bytes| decode("quarantines", component, &bytes))
            .transpose()
    }

    /// Every quarantined component, by name.
    pub fn quarantines(&self) -> Result<Vec<(String, Quarantine)>, StoreError> {
        self.all(QUARANTINES)?
            .into_iter()
            .map(|(k, v)| decode("quarantines", &k, &v).map(|q| (k, q)))
            .collect()
    }

    // ----- revisions -----

    /// Records the revision (spec hash or label) `component` runs.
    pub fn set_revision(&self, component: &str, revision: &str) -> Result<(), StoreError> {
        if self.revision(component)?.as_deref() == Some(revision) {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        txn.open_table(REVISIONS)?.insert(component, revision)?;
        txn.commit()?;
        Ok(())
    }

    pub fn revision(&self, component: &str) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVISIONS)?;
        Ok(table.get(component)?.map(|v| v.value().to_owned()))
    }

    /// Every recorded revision, by component name.
    pub fn revisions(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVISIONS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }

    pub fn remove_revision(&self, component: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(REVISIONS)?.remove(component)?;
        txn.commit()?;
        Ok(())
    }

    // ----- last known pids (files, see the module doc) -----

    /// Records the process just started for `component`.
    pub fn set_process(&self, component: &str, process: KnownProcess) -> Result<(), StoreError> {
        let path = self.pid_path(component)?;
        let tmp = self.pids.join(format!(".{component}.tmp"));
        let text = format!("{} {} {}\n", process.pid, process.pgid, process.start_time);
        let io = |source| StoreError::PidFile {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Forgets the process of `component` (it exited or was stopped).
    pub fn clear_process(&self, component: &str) -> Result<(), StoreError> {
        let path = self.pid_path(component)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::PidFile { path, source: e })
            }
            _ => Ok(()),
        }
    }

    pub fn process(&self, component: &str) -> Result<Option<KnownProcess>, StoreError> {
        let path = self.pid_path(component)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::PidFile { path, source }),
        };
        parse_pid_file(&text)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                table: "pids",
                key: component.to_owned(),
                reason: format!("expected `pid pgid start_time`, found {:?}", text.trim()),
            })
    }

    /// Every recorded process, by component name (read at start-up to adopt or stop
    /// them). Unreadable records are reported as errors, not skipped.
    pub fn processes(&self) -> Result<Vec<(String, KnownProcess)>, StoreError> {
        let entries = std::fs::read_dir(&self.pids).map_err(|source| StoreError::PidFile {
            path: self.pids.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::PidFile {
                path: self.pids.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| check_name(n).is_ok()) else {
                continue; // temporary files and strays
            };
            if let Some(process) = self.process(name)? {
                out.push((name.to_owned(), process));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn pid_path(&self, component: &str) -> Result<PathBuf, StoreError> {
        check_name(component)?;
        Ok(self.pids.join(component))
    }

    // ----- revision history (rollbacks) -----

    /// Appends `revision` to `component`'s history unless it is already the newest entry
    /// (an older entry with the same spec moves to the front); keeps the newest
    /// [`REVISIONS_KEPT`]. Returns whether anything changed.
    pub fn push_revision(
        &self,
        component: &str,
        revision: StoredRevision,
    ) -> Result<bool, StoreError> {
        let mut history = self.revision_history(component)?;
        if history
            .last()
            .is_some_and(|newest| newest.spec_hash == revision.spec_hash)
        {
            return Ok(false);
        }
        history.retain(|r| r.spec_hash != revision.spec_hash);
        history.push(revision);
        let excess = history.len().saturating_sub(REVISIONS_KEPT);
        history.drain(..excess);
        let txn = self.db.begin_write()?;
        txn.open_table(REVISION_HISTORY)?
            .insert(component, encode(&history)?.as_slice())?;
        txn.commit()?;
        Ok(true)
    }

    /// `component`'s revisions, oldest first (the last is the one it runs now).
    pub fn revision_history(&self, component: &str) -> Result<Vec<StoredRevision>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVISION_HISTORY)?;
        let row = table.get(component)?;
        match row {
            Some(v) => decode("revision_history", component, v.value()),
            None => Ok(Vec::new()),
        }
    }

    // ----- executed commands -----

    /// Replaces the record of command `id` with its final outcome (after it ran).
    pub fn finish_command(&self, id: &CommandId, record: &CommandRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(COMMANDS)?
            .insert(id.as_slice(), encode(record)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Records that command `id` ran, unless it is already recorded. Returns the record
    /// that stands: `None` if this call recorded it, `Some(earlier)` for a redelivery.
    pub fn record_command(
        &self,
        id: &CommandId,
        record: &CommandRecord,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let earlier = {
            let mut table = txn.open_table(COMMANDS)?;
            let earlier = table.get(id.as_slice())?.map(|v| v.value().to_vec());
            match earlier {
                Some(bytes) => Some(decode("commands", &hex::encode(id), &bytes)?),
                None => {
                    table.insert(id.as_slice(), encode(record)?.as_slice())?;
                    None
                }
            }
        };
        txn.commit()?;
        Ok(earlier)
    }

    /// The outcome of command `id` if it was executed.
    pub fn command(&self, id: &CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(COMMANDS)?;
        let row = table.get(id.as_slice())?;
        row.map(|v| decode("commands", &hex::encode(id), v.value()))
            .transpose()
    }

    /// Forgets executed commands that finished before `before_ms`; returns how many.
    pub fn prune_commands(&self, before_ms: UnixMillis) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut table = txn.open_table(COMMANDS)?;
            let mut old = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let record: CommandRecord = decode("commands", &hex::encode(k.value()), v.value())?;
                if record.finished_ms < before_ms {
                    old.push(k.value().to_vec());
                }
            }
            for key in &old {
                table.remove(key.as_slice())?;
            }
            old.len()
        };
        txn.commit()?;
        Ok(removed)
    }

    // ----- generic key/value -----

    pub fn set_value(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put(KV, key, value)
    }

    pub fn value(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(KV, key)
    }

    pub fn remove_value(&self, key: &str) -> Result<(), StoreError> {
        self.remove(KV, key).map(drop)
    }

    // ----- helpers over &str → bytes tables -----

    fn put(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(table)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    fn get(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let row = table.get(key)?;
        Ok(row.map(|v| v.value().to_vec()))
    }

    fn remove(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_write()?;
        let old = {
            let mut table = txn.open_table(table)?;
            let old = table.remove(key)?.map(|v| v.value().to_vec());
            old
        };
        txn.commit()?;
        Ok(old)
    }

    fn all(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn quarantine(reason: &str) -> Quarantine {
        Quarantine {
            since_ms: 1_700_000_000_000,
            reason: reason.into(),
            note: String::new(),
        }
    }

    #[test]
    fn reopen_preserves_everything() -> TestResult {
        let dir = tempfile::tempdir()?;
        let id = [7u8; 16];
        let done = CommandRecord {
            outcome: CommandOutcome::Succeeded,
            finished_ms: 42,
            message: "restarted".into(),
        };
        let proc_a = KnownProcess {
            pid: 4321,
            pgid: 4321,
            start_time: 99_999,
        };
        {
            let store = Store::open(dir.path())?;
            store.quarantine("vllm", &quarantine("5 failures within 60s"))?;
            store.quarantine("gone", &quarantine("x"))?;
            assert!(store.resolve("gone")?.is_some());
            store.set_revision("vllm", "abc123")?;
            store.set_revision("old", "zzz")?;
            store.remove_revision("old")?;
            store.set_process("vllm", proc_a)?;
            store.set_process(
                "exited",
                KnownProcess {
                    pid: 1,
                    pgid: 1,
                    start_time: 1,
                },
            )?;
            store.clear_process("exited")?;
            assert_eq!(store.record_command(&id, &done)?, None);
            store.set_value("acked_seq", &17u64.to_le_bytes())?;
        }
        let store = Store::open(dir.path())?;
        assert_eq!(store.path(), dir.path().join("agent.redb"));
        assert_eq!(
            store.quarantines()?,
            vec![("vllm".to_owned(), quarantine("5 failures within 60s"))]
        );
        assert_eq!(store.quarantine_of("gone")?, None);
        assert_eq!(
            store.revisions()?,
            vec![("vllm".to_owned(), "abc123".to_owned())]
        );
        assert_eq!(store.revision("vllm")?.as_deref(), Some("abc123"));
        assert_eq!(store.processes()?, vec![("vllm".to_owned(), proc_a)]);
        assert_eq!(store.process("exited")?, None);
        assert_eq!(store.command(&id)?, Some(done.clone()));
        assert_eq!(
            store.value("acked_seq")?,
            Some(17u64.to_le_bytes().to_vec())
        );
        assert_eq!(store.value("missing")?, None);
        Ok(())
    }

    #[test]
    fn a_command_runs_at_most_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let id = [1u8; 16];
        let first = CommandRecord {
            outcome: CommandOutcome::Failed,
            finished_ms: 10,
            message: "no such component".into(),
        };
        let second = CommandRecord {
            outcome: CommandOutcome::Succeeded,
            finished_ms: 20,
            message: String::new(),
        };
        assert_eq!(store.record_command(&id, &first)?, None);
        assert_eq!(store.record_command(&id, &second)?, Some(first.clone()));
        assert_eq!(store.command(&id)?, Some(first));
        let other = [2u8; 16];
        assert_eq!(store.record_command(&other, &second)?, None);
        assert_eq!(store.prune_commands(15)?, 1);
        assert_eq!(store.command(&id)?, None);
        assert!(store.command(&other)?.is_some());
        Ok(())
    }

    #[test]
    fn resolve_returns_the_record_and_clears_it() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        assert_eq!(store.resolve("none")?, None);
        store.quarantine("a", &quarantine("r"))?;
        assert_eq!(store.resolve("a")?, Some(quarantine("r")));
        assert!(store.quarantines()?.is_empty());
        Ok(())
    }

    #[test]
    fn a_corrupt_row_is_an_error_naming_table_and_key() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.put(QUARANTINES, "bad", &[0xff])?;
        match store.quarantine_of("bad") {
            Err(StoreError::Corrupt { table, key, .. }) => {
                assert_eq!((table, key.as_str()), ("quarantines", "bad"));
            }
            other => return Err(format!("expected Corrupt, got {other:?}").into()),
        }
        assert!(store.quarantines().is_err());
        // A torn pid file.
        std::fs::write(dir.path().join("pids").join("bad"), "123 12")?;
        match store.process("bad") {
            Err(StoreError::Corrupt { table, key, .. }) => {
                assert_eq!((table, key.as_str()), ("pids", "bad"));
            }
            other => return Err(format!("expected Corrupt, got {other:?}").into()),
        }
        assert!(store.processes().is_err());
        Ok(())
    }

    #[test]
    fn pid_records_refuse_bad_names_and_ignore_strays() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let known = KnownProcess {
            pid: 5,
            pgid: 5,
            start_time: 9,
        };
        assert!(matches!(
            store.set_process("../x", known),
            Err(StoreError::BadName(_))
        ));
        assert!(matches!(store.process(""), Err(StoreError::BadName(_))));
        std::fs::write(dir.path().join("pids").join(".web.tmp"), "junk")?;
        store.set_process("web", known)?;
        store.set_process("web", KnownProcess { pid: 6, ..known })?;
        assert_eq!(
            store.processes()?,
            vec![("web".to_owned(), KnownProcess { pid: 6, ..known })]
        );
        store.clear_process("web")?;
        store.clear_process("web")?;
        assert!(store.processes()?.is_empty());
        Ok(())
    }

    #[test]
    fn a_second_open_in_one_process_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let _store = Store::open(dir.path())?;
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Open { .. })
        ));
        Ok(())
    }
}
