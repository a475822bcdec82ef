//! What the supervisor keeps across agent restarts: quarantines and the identity of the
//! processes it runs. A narrow trait so the runtime does not care where it lives (the
//! redb store in production, a map in unit tests).

use crate::process::ProcessId;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Durable supervisor state. Errors are strings: the runtime reports them as events and
/// carries on (supervision must not stop because a write failed).
pub trait StateStore: Send + Sync + 'static {
    /// Quarantined components and why.
    fn quarantines(&self) -> Result<BTreeMap<String, String>, String>;
    fn set_quarantine(&self, component: &str, reason: &str) -> Result<(), String>;
    fn clear_quarantine(&self, component: &str) -> Result<(), String>;
    /// The process last started for each component, with the revision it ran.
    fn processes(&self) -> Result<BTreeMap<String, (ProcessId, String)>, String>;
    fn set_process(&self, component: &str, id: ProcessId, revision: &str) -> Result<(), String>;
    fn clear_process(&self, component: &str) -> Result<(), String>;
    /// The revision a one-shot component last completed (exited 0) with, if any.
    fn completed(&self, component: &str) -> Result<Option<String>, String>;
    fn set_completed(&self, component: &str, revision: &str) -> Result<(), String>;
    fn clear_completed(&self, component: &str) -> Result<(), String>;
    /// GPUs drained on this host, by index (`DrainGpu`, `ResetGpu`, `SetGpuHealth`).
    fn drained_gpus(&self) -> Result<BTreeMap<u32, GpuDrain>, String>;
    fn set_drained_gpus(&self, drained: &BTreeMap<u32, GpuDrain>) -> Result<(), String>;
}

/// A drained GPU: its components are stopped and kept from starting until it is lifted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuDrain {
    pub uuid: String,
    /// Why (the command's note, or "reset").
    pub note: String,
    pub since_ms: i64,
}

/// The store's key/value key holding the drained GPUs (JSON).
const DRAINED_GPUS_KEY: &str = "gpu_drained";

/// An in-memory store (nothing survives the process).
#[derive(Debug, Default)]
pub struct MemoryStore {
    quarantines: Mutex<BTreeMap<String, String>>,
    processes: Mutex<BTreeMap<String, (ProcessId, String)>>,
    completed: Mutex<BTreeMap<String, String>>,
    drained: Mutex<BTreeMap<u32, GpuDrain>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StateStore for MemoryStore {
    fn quarantines(&self) -> Result<BTreeMap<String, String>, String> {
        Ok(lock(&self.quarantines).clone())
    }
    fn set_quarantine(&self, component: &str, reason: &str) -> Result<(), String> {
        lock(&self.quarantines).insert(component.into(), reason.into());
        Ok(())
    }
    fn clear_quarantine(&self, component: &str) -> Result<(), String> {
        lock(&self.quarantines).remove(component);
        Ok(())
    }
    fn processes(&self) -> Result<BTreeMap<String, (ProcessId, String)>, String> {
        Ok(lock(&self.processes).clone())
    }
    fn set_process(&self, component: &str, id: ProcessId, revision: &str) -> Result<(), String> {
        lock(&self.processes).insert(component.into(), (id, revision.into()));
        Ok(())
    }
    fn clear_process(&self, component: &str) -> Result<(), String> {
        lock(&self.processes).remove(component);
        Ok(())
    }
    fn completed(&self, component: &str) -> Result<Option<String>, String> {
        Ok(lock(&self.completed).get(component).cloned())
    }
    fn set_completed(&self, component: &str, revision: &str) -> Result<(), String> {
        lock(&self.completed).insert(component.into(), revision.into());
        Ok(())
    }
    fn clear_completed(&self, component: &str) -> Result<(), String> {
        lock(&self.completed).remove(component);
        Ok(())
    }
    fn drained_gpus(&self) -> Result<BTreeMap<u32, GpuDrain>, String> {
        Ok(lock(&self.drained).clone())
    }
    fn set_drained_gpus(&self, drained: &BTreeMap<u32, GpuDrain>) -> Result<(), String> {
        *lock(&self.drained) = drained.clone();
        Ok(())
    }
}

/// The store's key/value key under which a one-shot's completed revision is kept.
fn completed_key(component: &str) -> String {
    format!("oneshot_completed/{component}")
}

impl StateStore for crate::store::Store {
    fn quarantines(&self) -> Result<BTreeMap<String, String>, String> {
        let list = crate::store::Store::quarantines(self).map_err(|e| e.to_string())?;
        Ok(list.into_iter().map(|(name, q)| (name, q.reason)).collect())
    }
    fn set_quarantine(&self, component: &str, reason: &str) -> Result<(), String> {
        let record = crate::store::Quarantine {
            since_ms: super::component::unix_ms(),
            reason: reason.to_owned(),
            note: String::new(),
        };
        self.quarantine(component, &record)
            .map_err(|e| e.to_string())
    }
    fn clear_quarantine(&self, component: &str) -> Result<(), String> {
        self.resolve(component).map(drop).map_err(|e| e.to_string())
    }
    fn processes(&self) -> Result<BTreeMap<String, (ProcessId, String)>, String> {
        let list = crate::store::Store::processes(self).map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for (name, known) in list {
            let revision = self
                .revision(&name)
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            out.insert(name, (known.id(), revision));
        }
        Ok(out)
    }
    fn set_process(&self, component: &str, id: ProcessId, revision: &str) -> Result<(), String> {
        let known = crate::store::KnownProcess {
            pid: id.pid,
            pgid: i32::try_from(id.pid).unwrap_or(i32::MAX),
            start_time: id.start_time,
        };
        crate::store::Store::set_process(self, component, known).map_err(|e| e.to_string())?;
        self.set_revision(component, revision)
            .map_err(|e| e.to_string())
    }
    fn clear_process(&self, component: &str) -> Result<(), String> {
        crate::store::Store::clear_process(self, component).map_err(|e| e.to_string())
    }
    fn completed(&self, component: &str) -> Result<Option<String>, String> {
        match self.value(&completed_key(component)) {
            Ok(Some(bytes)) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|e| format!("stored one-shot revision of `{component}`: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
    fn set_completed(&self, component: &str, revision: &str) -> Result<(), String> {
        self.set_value(&completed_key(component), revision.as_bytes())
            .map_err(|e| e.to_string())
    }
    fn clear_completed(&self, component: &str) -> Result<(), String> {
        self.remove_value(&completed_key(component))
            .map_err(|e| e.to_string())
    }
    fn drained_gpus(&self) -> Result<BTreeMap<u32, GpuDrain>, String> {
        match self.value(DRAINED_GPUS_KEY) {
            Ok(Some(bytes)) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("stored drained GPUs: {e}"))
            }
            Ok(None) => Ok(BTreeMap::new()),
            Err(e) => Err(e.to_string()),
        }
    }
    fn set_drained_gpus(&self, drained: &BTreeMap<u32, GpuDrain>) -> Result<(), String> {
        if drained.is_empty() {
            return self
                .remove_value(DRAINED_GPUS_KEY)
                .map_err(|e| e.to_string());
        }
        let bytes = serde_json::to_vec(drained).map_err(|e| e.to_string())?;
        self.set_value(DRAINED_GPUS_KEY, &bytes)
            .map_err(|e| e.to_string())
    }
}
