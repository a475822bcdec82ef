//! GPU and host telemetry for the Razar agent: the [`GpuSource`] trait with an NVML
//! implementation (loaded at run time) and a scenario-driven one, XID classification,
//! GPU ↔ component mapping (VRAM budgets, ghost memory), host sampling, and exposition
//! as dcgm-exporter-compatible Prometheus metrics and telemetry samples.

#![forbid(unsafe_code)]

pub mod exposition;
pub mod host;
pub mod kernel_log;
pub mod ledger;
pub mod mapping;
pub mod nvml;
pub mod reading;
pub mod scenario;
pub mod scenario_source;
pub mod xid;
/// NVIDIA's XID catalog (it lives in `razar-shared`, so the pure decision engine uses it too).
pub use razar_shared::xid_catalog;

pub use ledger::EventWaker;
pub use nvml::{NvmlOptions, NvmlSource};
pub use reading::{
    EccCounts, GpuAttribution, GpuEvent, GpuEventKind, GpuIdentity, GpuProcess, GpuProcesses,
    GpuReading, UsedMemory, XidOrigin,
};
pub use scenario::Scenario;
pub use scenario_source::ScenarioSource;

/// A GPU source failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// NVML could not be loaded or initialised; the agent runs on without GPUs.
    #[error("no NVML: {reason}")]
    NoNvml { reason: String },
    /// An NVML call failed for the whole source (not one field of one GPU).
    #[error("NVML {call}: {source}")]
    Nvml {
        call: &'static str,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// A scenario could not be loaded.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// A watcher thread could not be started.
    #[error("starting thread {name}: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where GPU readings come from. Sync: the agent calls it from a blocking task each tick.
pub trait GpuSource: Send {
    /// The GPUs, read once when the source opened.
    fn inventory(&self) -> &[GpuIdentity];

    /// One reading per GPU in inventory order; a lost GPU has `lost` set and no values.
    fn sample(&mut self) -> Result<Vec<GpuReading>, GpuError>;

    /// Compute processes per GPU (lost GPUs are left out).
    fn processes(&mut self) -> Result<Vec<GpuProcesses>, GpuError>;

    /// Takes the events seen since the last call (XIDs, double-bit ECC, lost GPUs).
    fn poll_events(&mut self) -> Vec<GpuEvent>;

    /// Why events can be lost now (the kernel log cannot be read, so XIDs that arrive
    /// together are lost: NVML's event set keeps only the latest); `None` when none.
    fn degraded(&self) -> Option<String> {
        None
    }

    /// The kernel log record (kmsg sequence number) up to which every XID was handed out
    /// by [`poll_events`](Self::poll_events): once those events are durable, the agent
    /// keeps it so a restart does not report them again. `None` when there is none.
    fn kernel_log_reported(&self) -> Option<u64> {
        None
    }

    /// Asks the source to call `waker` as soon as it has an event for
    /// [`poll_events`](Self::poll_events) (a source with watcher threads: NVML). A
    /// source that cannot (the default) is only polled.
    fn set_event_waker(&mut self, waker: ledger::EventWaker) {
        let _ = waker;
    }
}

/// A source with no GPUs: what the agent uses when NVML is not there.
#[derive(Debug, Default)]
pub struct NoGpus;

impl GpuSource for NoGpus {
    fn inventory(&self) -> &[GpuIdentity] {
        &[]
    }
    fn sample(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        Ok(Vec::new())
    }
    fn processes(&mut self) -> Result<Vec<GpuProcesses>, GpuError> {
        Ok(Vec::new())
    }
    fn poll_events(&mut self) -> Vec<GpuEvent> {
        Vec::new()
    }
}

/// Opens NVML, or, when it cannot be loaded, logs one line and returns [`NoGpus`]
/// with the status line ("no NVML: <reason>") for `/health`.
pub fn open_nvml_or_none(options: &NvmlOptions) -> (Box<dyn GpuSource>, Option<String>) {
    match NvmlSource::open(options) {
        Ok(source) => (Box::new(source), None),
        Err(error) => {
            let status = error.to_string();
            tracing::warn!(error = %status, "GPU telemetry disabled");
            (Box::new(NoGpus), Some(status))
        }
    }
}
