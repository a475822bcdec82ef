//! The scenario format shared by the fake NVML library and [`ScenarioSource`]: GPUs,
//! values over time, XIDs at given times, a GPU falling off the bus, unsupported fields.
//!
//! A scenario is a TOML file:
//!
//! ```toml
//! clock = "step"                 # "step": time is a number the test controls; "wall": seconds since init
//! driver_version = "550.54.15"
//! kernel_log = "kmsg.log"        # fake library only: appends `NVRM: Xid` lines as XIDs fall due
//!
//! [[gpu]]
//! name = "NVIDIA H100 80GB HBM3"
//! fans = 0
//! unsupported = ["encoder_utilization"]   # calls answer NOT_SUPPORTED (3)
//! missing = ["energy"]                    # calls answer FUNCTION_NOT_FOUND (13)
//! lost_at = 5                             # from t = 5 every call answers GPU_IS_LOST (15)
//! values = { utilization_gpu = [[0, 10], [10, 90]], temperature_gpu = 61 }
//! xid = [{ at = 2, xid = 79 }]
//! process = [{ pid = 4242, used_memory = 1073741824, from = 0, until = 8 },
//!            { pid_file = "worker.pid", used_memory = 2147483648 }]
//! ```
//!
//! A value is a constant or a list of `[t, value]` points, linear in between and flat
//! outside. Every field has a default, so `[[gpu]]` alone is a valid GPU.
//!
//! A compute process names its pid either as a number (`pid`) or as a file holding the
//! number (`pid_file`, relative to the scenario file), so a test can put a real process
//! of its own on a fake GPU. The file is read each time the process list is asked for
//! (each sampling tick, and for the default `memory_used`); while it is absent,
//! unreadable or holds no valid pid, the process is not on the GPU. The scenario source
//! and the fake NVML library both read it through [`ScenarioGpu::processes_at`], so they
//! agree.
//!
//! [`ScenarioSource`]: crate::ScenarioSource

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A scenario could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("scenario {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML for the scenario schema (the message names key and line).
    #[error("scenario {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value is out of range or inconsistent.
    #[error("scenario {origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// How time advances in a scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// Time is a step number: the fake library reads it from the step file, the
    /// scenario source counts `sample()` calls (or takes `set_time`).
    #[default]
    Step,
    /// Seconds since `nvmlInit` (fake library) or since the source was created.
    Wall,
}

/// One value a scenario can set for a GPU; also the unit of "unsupported"/"missing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// Bytes used (NVML v2: excluding reserved). Default: Σ process memory.
    MemoryUsed,
    UtilizationGpu,
    UtilizationMemory,
    EncoderUtilization,
    DecoderUtilization,
    /// Degrees C.
    TemperatureGpu,
    /// Degrees C (NVML field value 82).
    TemperatureMemory,
    /// Milliwatts.
    PowerUsage,
    /// Milliwatts.
    PowerLimit,
    /// Millijoules since driver load.
    Energy,
    /// MHz.
    SmClock,
    /// MHz.
    MemoryClock,
    /// NVML clock throttle reason bitmask.
    ThrottleReasons,
    /// 0..=15.
    PerformanceState,
    /// Percent, every fan.
    FanSpeed,
    PcieReplay,
    /// KB/s.
    PcieTx,
    /// KB/s.
    PcieRx,
    EccVolatileCorrected,
    EccVolatileUncorrected,
    EccAggregateCorrected,
    EccAggregateUncorrected,
    RetiredPagesSingleBit,
    RetiredPagesDoubleBit,
    RemappedRowsCorrectable,
    RemappedRowsUncorrectable,
    RemappedRowsPending,
    RemappedRowsFailure,
    /// Only for `unsupported`/`missing`: the serial number.
    Serial,
    /// Only for `unsupported`/`missing`: the fan count.
    Fans,
    /// Only for `unsupported`/`missing`: running compute processes.
    Processes,
    /// Only for `unsupported`/`missing`: event registration.
    Events,
}

impl Field {
    /// Value used when the scenario does not set the field.
    pub fn default_value(self) -> f64 {
        match self {
            Field::TemperatureGpu => 35.0,
            Field::TemperatureMemory => 40.0,
            Field::PowerUsage => 70_000.0,
            Field::PowerLimit => 700_000.0,
            Field::Energy => 1_000_000.0,
            Field::SmClock => 1_980.0,
            Field::MemoryClock => 2_619.0,
            Field::ThrottleReasons => 1.0,
            Field::FanSpeed => 30.0,
            _ => 0.0,
        }
    }
}

/// Whether a field answers, per scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldStatus {
    Supported,
    /// NVML_ERROR_NOT_SUPPORTED.
    NotSupported,
    /// NVML_ERROR_FUNCTION_NOT_FOUND (as for a symbol the driver lacks).
    Missing,
}

/// A value over time: a constant or piecewise-linear points.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Curve {
    Constant(f64),
    Points(Vec<(f64, f64)>),
}

impl Curve {
    /// The value at time `t`: linear between points, flat before the first and after the last.
    pub fn at(&self, t: f64) -> f64 {
        match self {
            Curve::Constant(v) => *v,
            Curve::Points(points) => {
                let Some(&(t0, v0)) = points.first() else {
                    return 0.0;
                };
                if t <= t0 {
                    return v0;
                }
                for pair in points.windows(2) {
                    let ((ta, va), (tb, vb)) = (pair[0], pair[1]);
                    if t <= tb {
                        if tb <= ta {
                            return vb;
                        }
                        return va + (vb - va) * (t - ta) / (tb - ta);
                    }
                }
                points.last().map_or(v0, |p| p.1)
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            Curve::Constant(v) if !v.is_finite() || *v < 0.0 => {
                Err(format!("value {v} must be finite and >= 0"))
            }
            Curve::Constant(_) => Ok(()),
            Curve::Points(points) if points.is_empty() => Err("no points".to_owned()),
            Curve::Points(points) => {
                for (t, v) in points {
                    if !t.is_finite() || !v.is_finite() || *v < 0.0 {
                        return Err(format!("point [{t}, {v}] must be finite with value >= 0"));
                    }
                }
                if points.windows(2).any(|p| p[1].0 < p[0].0) {
                    return Err("points must be in time order".to_owned());
                }
                Ok(())
            }
        }
    }
}

/// An XID the GPU raises at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledXid {
    pub at: f64,
    pub xid: u32,
}

/// A compute process on a GPU during `[from, until)`. Exactly one of `pid` and
/// `pid_file` is set (checked when the scenario is parsed).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioProcess {
    /// The process id.
    pub pid: Option<u32>,
    /// A file holding the process id, read at each tick (see the module doc). Relative
    /// paths are relative to the scenario file.
    pub pid_file: Option<PathBuf>,
    /// Bytes; absent means NVML reports the value as unavailable.
    pub used_memory: Option<u64>,
    #[serde(default)]
    pub from: f64,
    pub until: Option<f64>,
}

/// A scenario process as it is on the GPU at one time: its pid resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningProcess {
    pub pid: u32,
    /// Bytes; `None` means NVML reports the value as unavailable.
    pub used_memory: Option<u64>,
}

/// The longest pid file read (a pid is at most 10 digits; the rest is whitespace).
const PID_FILE_MAX_BYTES: u64 = 64;

impl ScenarioProcess {
    /// Whether the process runs at time `t` (by its times alone).
    pub fn alive_at(&self, t: f64) -> bool {
        t >= self.from && self.until.is_none_or(|u| t < u)
    }

    /// The pid now: `pid`, or the number `pid_file` holds. `None` while the file is
    /// absent, unreadable or holds no valid pid (a positive number).
    pub fn current_pid(&self) -> Option<u32> {
        match (&self.pid, &self.pid_file) {
            (Some(pid), _) => Some(*pid),
            (None, Some(path)) => read_pid_file(path),
            (None, None) => None,
        }
    }
}

fn read_pid_file(path: &Path) -> Option<u32> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(PID_FILE_MAX_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse::<u32>().ok().filter(|pid| *pid > 0)
}

/// One GPU of a scenario.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioGpu {
    #[serde(default = "default_name")]
    pub name: String,
    pub uuid: Option<String>,
    pub pci_bus_id: Option<String>,
    pub serial: Option<String>,
    /// Bytes.
    #[serde(default = "default_memory_total")]
    pub memory_total: u64,
    /// Bytes reserved by the driver.
    #[serde(default = "default_memory_reserved")]
    pub memory_reserved: u64,
    #[serde(default)]
    pub fans: u32,
    #[serde(default)]
    pub values: BTreeMap<Field, Curve>,
    #[serde(default)]
    pub unsupported: Vec<Field>,
    #[serde(default)]
    pub missing: Vec<Field>,
    /// From this time on the GPU has fallen off the bus.
    pub lost_at: Option<f64>,
    #[serde(default, rename = "xid")]
    pub xids: Vec<ScheduledXid>,
    #[serde(default)]
    pub double_bit_ecc_at: Vec<f64>,
    #[serde(default, rename = "process")]
    pub processes: Vec<ScenarioProcess>,
}

fn default_name() -> String {
    "NVIDIA H100 80GB HBM3".to_owned()
}
fn default_memory_total() -> u64 {
    80 * 1024 * 1024 * 1024
}
fn default_memory_reserved() -> u64 {
    512 * 1024 * 1024
}
fn default_driver() -> String {
    "550.54.15".to_owned()
}

impl ScenarioGpu {
    /// A GPU with every default.
    pub fn with_defaults() -> ScenarioGpu {
        ScenarioGpu {
            name: default_name(),
            uuid: None,
            pci_bus_id: None,
            serial: None,
            memory_total: default_memory_total(),
            memory_reserved: default_memory_reserved(),
            fans: 0,
            values: BTreeMap::new(),
            unsupported: Vec::new(),
            missing: Vec::new(),
            lost_at: None,
            xids: Vec::new(),
            double_bit_ecc_at: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// UUID: the configured one or one derived from the index.
    pub fn uuid(&self, index: u32) -> String {
        self.uuid
            .clone()
            .unwrap_or_else(|| format!("GPU-fa4e{index:04x}-0000-4000-8000-00000000{index:04x}"))
    }

    /// NVML-style PCI bus id (`00000000:BB:00.0`).
    pub fn pci_bus_id(&self, index: u32) -> String {
        self.pci_bus_id
            .clone()
            .unwrap_or_else(|| format!("00000000:{:02X}:00.0", index + 1))
    }

    pub fn serial(&self, index: u32) -> String {
        self.serial
            .clone()
            .unwrap_or_else(|| format!("{}", 1_650_000_000_000_u64 + u64::from(index)))
    }

    pub fn status(&self, field: Field) -> FieldStatus {
        if self.missing.contains(&field) {
            FieldStatus::Missing
        } else if self.unsupported.contains(&field) {
            FieldStatus::NotSupported
        } else {
            FieldStatus::Supported
        }
    }

    /// The field's value at `t` (its curve or its default). `MemoryUsed` defaults to
    /// the memory of the processes alive at `t`.
    pub fn value(&self, field: Field, t: f64) -> f64 {
        match self.values.get(&field) {
            Some(curve) => curve.at(t),
            None if field == Field::MemoryUsed => self
                .processes_at(t)
                .filter_map(|p| p.used_memory)
                .map(|b| b as f64)
                .sum(),
            None => field.default_value(),
        }
    }

    /// Used memory at `t`, clamped so that used + reserved fits in total.
    pub fn memory_used(&self, t: f64) -> u64 {
        let room = self.memory_total.saturating_sub(self.memory_reserved);
        (self.value(Field::MemoryUsed, t) as u64).min(room)
    }

    pub fn is_lost(&self, t: f64) -> bool {
        self.lost_at.is_some_and(|at| t >= at)
    }

    /// The compute processes on the GPU at `t`, pids resolved (pid files read now); a
    /// process without a valid pid now is left out.
    pub fn processes_at(&self, t: f64) -> impl Iterator<Item = RunningProcess> + '_ {
        self.processes
            .iter()
            .filter(move |p| p.alive_at(t))
            .filter_map(|p| {
                Some(RunningProcess {
                    pid: p.current_pid()?,
                    used_memory: p.used_memory,
                })
            })
    }
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub clock: ClockMode,
    #[serde(default = "default_driver")]
    pub driver_version: String,
    /// NVML return code `nvmlInit` fails with (e.g. 9 driver not loaded).
    pub init_error: Option<u32>,
    /// Fake library: file to append `NVRM: Xid` kernel log lines to as XIDs fall due.
    /// Relative paths are relative to the scenario file.
    pub kernel_log: Option<PathBuf>,
    /// Fake library, step clock: file holding the current step. Default `step` next to
    /// the scenario file; a missing file reads as step 0.
    pub step_file: Option<PathBuf>,
    #[serde(default, rename = "gpu")]
    pub gpus: Vec<ScenarioGpu>,
}

impl Scenario {
    /// Parses and validates a scenario; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        scenario.validate(origin)?;
        Ok(scenario)
    }

    /// Reads a scenario file; relative `kernel_log`, `step_file` and process `pid_file`
    /// paths are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut scenario = Scenario::parse(&text, &path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new("."));
        scenario.kernel_log = scenario.kernel_log.map(|p| dir.join(p));
        for process in scenario
            .gpus
            .iter_mut()
            .flat_map(|g| g.processes.iter_mut())
        {
            process.pid_file = process.pid_file.take().map(|p| dir.join(p));
        }
        scenario.step_file = Some(dir.join(scenario.step_file.unwrap_or_else(|| "step".into())));
        Ok(scenario)
    }

    fn validate(&self, origin: &str) -> Result<(), ScenarioError> {
        let invalid = |key: String, reason: String| ScenarioError::Invalid {
            origin: origin.to_owned(),
            key,
            reason,
        };
        for (i, gpu) in self.gpus.iter().enumerate() {
            for (field, curve) in &gpu.values {
                curve.check().map_err(|reason| {
                    invalid(format!("gpu[{i}].values.{}", FieldName(*field)), reason)
                })?;
            }
            if gpu.memory_reserved > gpu.memory_total {
                return Err(invalid(
                    format!("gpu[{i}].memory_reserved"),
                    "larger than memory_total".to_owned(),
                ));
            }
            if gpu.fans > 64 {
                return Err(invalid(format!("gpu[{i}].fans"), "at most 64".to_owned()));
            }
            for (j, process) in gpu.processes.iter().enumerate() {
                let reason = match (&process.pid, &process.pid_file) {
                    (Some(_), Some(_)) => "has both `pid` and `pid_file`; set one",
                    (None, None) => "needs `pid` or `pid_file`",
                    (Some(_), None) | (None, Some(_)) => continue,
                };
                return Err(invalid(format!("gpu[{i}].process[{j}]"), reason.to_owned()));
            }
            let times = gpu
                .xids
                .iter()
                .map(|x| x.at)
                .chain(gpu.double_bit_ecc_at.iter().copied())
                .chain(gpu.lost_at)
                .chain(
                    gpu.processes
                        .iter()
                        .flat_map(|p| [Some(p.from), p.until])
                        .flatten(),
                );
            for t in times {
                if !t.is_finite() || t < 0.0 {
                    return Err(invalid(
                        format!("gpu[{i}]"),
                        format!("time {t} must be finite and >= 0"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Displays a field as its scenario key (`utilization_gpu`).
pub struct FieldName(pub Field);

impl fmt::Display for FieldName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in format!("{:?}", self.0).chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                f.write_str("_")?;
            }
            write!(f, "{}", c.to_ascii_lowercase())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_is_linear_between_points_and_flat_outside() {
        let c = Curve::Points(vec![(0.0, 10.0), (10.0, 90.0)]);
        assert_eq!(c.at(-1.0), 10.0);
        assert_eq!(c.at(5.0), 50.0);
        assert_eq!(c.at(11.0), 90.0);
        assert_eq!(Curve::Constant(3.0).at(100.0), 3.0);
    }

    #[test]
    fn minimal_gpu_is_valid_and_defaults_apply() {
        let s = Scenario::parse("[[gpu]]\n[[gpu]]\nfans = 2\n", "t").unwrap();
        assert_eq!(s.gpus.len(), 2);
        assert_eq!(s.clock, ClockMode::Step);
        assert_eq!(s.gpus[1].fans, 2);
        assert_eq!(s.gpus[0].value(Field::TemperatureGpu, 0.0), 35.0);
        assert_eq!(s.gpus[1].pci_bus_id(1), "00000000:02:00.0");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Scenario::parse("[[gpu]]\nfanz = 1\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.toml") && e.contains("fanz"), "{e}");
        let e = Scenario::parse(
            "[[gpu]]\nvalues = { utilization_gpu = [[5, 1], [1, 2]] }\n",
            "b",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("values.utilization_gpu") && e.contains("time order"),
            "{e}"
        );
        let e = Scenario::parse("[[gpu]]\nvalues = { not_a_field = 1 }\n", "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not_a_field"), "{e}");
    }

    #[test]
    fn memory_used_defaults_to_live_processes() {
        let s = Scenario::parse(
            "[[gpu]]\nprocess = [{ pid = 1, used_memory = 100, until = 5 }, { pid = 2, used_memory = 50 }]\n",
            "t",
        )
        .unwrap();
        assert_eq!(s.gpus[0].memory_used(0.0), 150);
        assert_eq!(s.gpus[0].memory_used(5.0), 50);
    }

    #[test]
    fn pid_file_is_read_each_time_and_absent_until_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scenario.toml");
        std::fs::write(
            &path,
            "[[gpu]]\nprocess = [{ pid = 7, used_memory = 1 }, { pid_file = \"w.pid\", used_memory = 100 }]\n",
        )
        .unwrap();
        let s = Scenario::load(&path).unwrap();
        assert_eq!(
            s.gpus[0].processes[1].pid_file.as_deref(),
            Some(dir.path().join("w.pid").as_path()),
            "relative to the scenario file"
        );
        let pids =
            |s: &Scenario| -> Vec<u32> { s.gpus[0].processes_at(0.0).map(|p| p.pid).collect() };
        assert_eq!(pids(&s), [7], "no file: not on the GPU");
        assert_eq!(s.gpus[0].memory_used(0.0), 1);
        let pid_file = dir.path().join("w.pid");
        std::fs::write(&pid_file, "not a pid").unwrap();
        assert_eq!(pids(&s), [7]);
        std::fs::write(&pid_file, "0\n").unwrap();
        assert_eq!(pids(&s), [7], "0 is no process");
        std::fs::write(&pid_file, "4321\n").unwrap();
        assert_eq!(pids(&s), [7, 4321]);
        assert_eq!(s.gpus[0].memory_used(0.0), 101);
        std::fs::write(&pid_file, "4322").unwrap();
        assert_eq!(pids(&s), [7, 4322], "re-read each time");
        std::fs::remove_file(&pid_file).unwrap();
        assert_eq!(pids(&s), [7]);
    }

    #[test]
    fn a_process_needs_exactly_one_of_pid_and_pid_file() {
        let e = Scenario::parse("[[gpu]]\nprocess = [{ used_memory = 1 }]\n", "a")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpu[0].process[0]") && e.contains("pid_file"),
            "{e}"
        );
        let e = Scenario::parse(
            "[[gpu]]\nprocess = [{ pid = 1 }, { pid = 2, pid_file = \"p\" }]\n",
            "b",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gpu[0].process[1]") && e.contains("both"), "{e}");
    }
}
