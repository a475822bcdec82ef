//! A pure-Rust [`GpuSource`] that plays a scenario (the same format the fake NVML
//! library reads), for unit tests and the demo. Unlike NVML it loses no event.

use crate::ledger::Ledger;
use crate::reading::{
    now_ms, EccCounts, GpuEvent, GpuIdentity, GpuProcess, GpuProcesses, GpuReading, UsedMemory,
    XidOrigin,
};
use crate::scenario::{ClockMode, Field, FieldStatus, Scenario, ScenarioGpu};
use crate::{GpuError, GpuSource};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
enum Clock {
    /// Time is the tick: the first `sample()` reads step 0, each later one the next step;
    /// events are reported up to the last sampled step.
    Steps {
        step: u64,
        sampled: bool,
    },
    Wall(Instant),
    Manual(f64),
}

/// Plays a [`Scenario`].
#[derive(Debug)]
pub struct ScenarioSource {
    scenario: Scenario,
    inventory: Vec<Arc<GpuIdentity>>,
    identities: Vec<GpuIdentity>,
    clock: Clock,
    /// Events with time in `(events_until, now]` are still to be reported.
    events_until: f64,
    ledger: Ledger,
}

impl ScenarioSource {
    pub fn new(scenario: Scenario) -> ScenarioSource {
        let identities: Vec<GpuIdentity> = scenario
            .gpus
            .iter()
            .zip(0u32..)
            .map(|(gpu, index)| GpuIdentity {
                index,
                uuid: gpu.uuid(index),
                name: gpu.name.clone(),
                pci_bus_id: gpu.pci_bus_id(index),
                serial: supported(gpu, Field::Serial).then(|| gpu.serial(index)),
                driver_version: Some(scenario.driver_version.clone()),
                memory_total_bytes: Some(gpu.memory_total),
                fans: if supported(gpu, Field::Fans) {
                    gpu.fans
                } else {
                    0
                },
            })
            .collect();
        let clock = match scenario.clock {
            ClockMode::Step => Clock::Steps {
                step: 0,
                sampled: false,
            },
            ClockMode::Wall => Clock::Wall(Instant::now()),
        };
        ScenarioSource {
            inventory: identities.iter().cloned().map(Arc::new).collect(),
            ledger: Ledger::new(identities.len(), Duration::ZERO),
            identities,
            scenario,
            clock,
            events_until: -1.0,
        }
    }

    pub fn load(path: &Path) -> Result<ScenarioSource, GpuError> {
        Ok(ScenarioSource::new(Scenario::load(path)?))
    }

    /// Fixes the scenario time (seconds or steps) from now on.
    pub fn set_time(&mut self, t: f64) {
        self.clock = Clock::Manual(t);
    }

    /// The scenario time the next call reads at.
    pub fn time(&self) -> f64 {
        match self.clock {
            Clock::Steps { step, .. } => step as f64,
            Clock::Wall(start) => start.elapsed().as_secs_f64(),
            Clock::Manual(t) => t,
        }
    }

    /// Moves events due by now into the ledger, in time order.
    fn advance_events(&mut self) {
        let now = self.time();
        if now <= self.events_until {
            return;
        }
        let from = self.events_until;
        let due = |at: f64| at > from && at <= now;
        let mut due_events: Vec<(f64, u32, Option<u32>, bool)> = Vec::new();
        for (gpu, index) in self.scenario.gpus.iter().zip(0u32..) {
            due_events.extend(
                gpu.xids
                    .iter()
                    .filter(|x| due(x.at))
                    .map(|x| (x.at, index, Some(x.xid), false)),
            );
            due_events.extend(
                gpu.double_bit_ecc_at
                    .iter()
                    .filter(|at| due(**at))
                    .map(|at| (*at, index, None, false)),
            );
            if let Some(at) = gpu.lost_at.filter(|at| *at <= now) {
                due_events.push((at, index, None, true));
            }
        }
        due_events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (instant, ts) = (Instant::now(), now_ms());
        for (_, gpu, xid, lost) in due_events {
            match (xid, lost) {
                (_, true) => {
                    self.ledger.mark_lost(gpu, ts);
                }
                (Some(xid), false) => {
                    self.ledger
                        .record_xid(gpu, xid, XidOrigin::Scenario, instant, ts);
                }
                (None, false) => self.ledger.record_double_bit_ecc(gpu, ts),
            }
        }
        self.events_until = now;
    }

    fn read(&self, gpu: &ScenarioGpu, identity: &Arc<GpuIdentity>, t: f64) -> GpuReading {
        let mut r = GpuReading::empty(identity.clone());
        r.xid_errors_total = self.ledger.xid_counts(identity.index);
        r.xid_sources_total = self.ledger.xid_sources(identity.index);
        r.last_xid = self.ledger.last_xid(identity.index);
        if gpu.is_lost(t) {
            r.lost = true;
            return r;
        }
        let v = |field: Field| supported(gpu, field).then(|| gpu.value(field, t));
        let v32 = |field: Field| v(field).map(|x| x as u32);
        let v64 = |field: Field| v(field).map(|x| x as u64);
        if supported(gpu, Field::MemoryUsed) {
            let used = gpu.memory_used(t);
            r.memory_total_bytes = Some(gpu.memory_total);
            r.memory_used_bytes = Some(used);
            r.memory_reserved_bytes = Some(gpu.memory_reserved);
            r.memory_free_bytes = Some(gpu.memory_total - gpu.memory_reserved - used);
        }
        r.utilization_gpu_percent = v32(Field::UtilizationGpu);
        r.utilization_memory_percent = v32(Field::UtilizationMemory);
        r.utilization_encoder_percent = v32(Field::EncoderUtilization);
        r.utilization_decoder_percent = v32(Field::DecoderUtilization);
        r.temperature_gpu_celsius = v32(Field::TemperatureGpu);
        r.temperature_memory_celsius = v32(Field::TemperatureMemory);
        r.power_usage_milliwatts = v32(Field::PowerUsage);
        r.power_limit_milliwatts = v32(Field::PowerLimit);
        r.energy_millijoules = v64(Field::Energy);
        r.sm_clock_mhz = v32(Field::SmClock);
        r.memory_clock_mhz = v32(Field::MemoryClock);
        r.throttle_reasons = v64(Field::ThrottleReasons);
        r.performance_state = v32(Field::PerformanceState);
        r.fan_speed_percent = (supported(gpu, Field::Fans) && supported(gpu, Field::FanSpeed))
            .then(|| vec![gpu.value(Field::FanSpeed, t) as u32; gpu.fans as usize]);
        r.pcie_replay_count = v64(Field::PcieReplay);
        r.pcie_tx_bytes_per_second = v64(Field::PcieTx).map(|kb| kb * 1024);
        r.pcie_rx_bytes_per_second = v64(Field::PcieRx).map(|kb| kb * 1024);
        r.ecc = EccCounts {
            volatile_corrected: v64(Field::EccVolatileCorrected),
            volatile_uncorrected: v64(Field::EccVolatileUncorrected),
            aggregate_corrected: v64(Field::EccAggregateCorrected),
            aggregate_uncorrected: v64(Field::EccAggregateUncorrected),
        };
        r.retired_pages_single_bit = v64(Field::RetiredPagesSingleBit);
        r.retired_pages_double_bit = v64(Field::RetiredPagesDoubleBit);
        r.remapped_rows_correctable = v64(Field::RemappedRowsCorrectable);
        r.remapped_rows_uncorrectable = v64(Field::RemappedRowsUncorrectable);
        r.remapped_rows_pending = v64(Field::RemappedRowsPending);
        r.remapped_rows_failure = v64(Field::RemappedRowsFailure);
        r
    }
}

fn supported(gpu: &ScenarioGpu, field: Field) -> bool {
    gpu.status(field) == FieldStatus::Supported
}

impl GpuSource for ScenarioSource {
    fn inventory(&self) -> &[GpuIdentity] {
        &self.identities
    }

    fn sample(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        if let Clock::Steps { step, sampled } = &mut self.clock {
            if *sampled {
                *step += 1;
            }
            *sampled = true;
        }
        self.advance_events();
        let t = self.time();
        Ok(self
            .scenario
            .gpus
            .iter()
            .zip(&self.inventory)
            .map(|(gpu, identity)| self.read(gpu, identity, t))
            .collect())
    }

    fn processes(&mut self) -> Result<Vec<GpuProcesses>, GpuError> {
        let t = self.time();
        Ok(self
            .scenario
            .gpus
            .iter()
            .zip(0u32..)
            .filter(|(gpu, _)| !gpu.is_lost(t) && supported(gpu, Field::Processes))
            .map(|(gpu, gpu_index)| GpuProcesses {
                gpu_index,
                processes: gpu
                    .processes_at(t)
                    .map(|p| GpuProcess {
                        pid: p.pid,
                        used_memory: p
                            .used_memory
                            .map_or(UsedMemory::Unavailable, UsedMemory::Bytes),
                    })
                    .collect(),
            })
            .collect())
    }

    fn poll_events(&mut self) -> Vec<GpuEvent> {
        self.advance_events();
        self.ledger.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::GpuEventKind;
    use razar_shared::domain::XidClass;

    const SCENARIO: &str = r#"
[[gpu]]
values = { utilization_gpu = [[0, 0], [4, 80]] }
unsupported = ["encoder_utilization", "temperature_memory"]
xid = [{ at = 1, xid = 13 }, { at = 1, xid = 79 }, { at = 2, xid = 9999 }]
process = [{ pid = 10, used_memory = 1000 }, { pid = 11 }]

[[gpu]]
fans = 2
lost_at = 2
"#;

    #[test]
    fn plays_values_events_and_loss_step_by_step() {
        let mut source = ScenarioSource::new(Scenario::parse(SCENARIO, "t").unwrap());
        assert_eq!(source.inventory().len(), 2);
        let r0 = source.sample().unwrap();
        assert_eq!(r0[0].utilization_gpu_percent, Some(0));
        assert_eq!(
            r0[0].utilization_encoder_percent, None,
            "unsupported is absent"
        );
        assert_eq!(r0[0].temperature_memory_celsius, None);
        assert_eq!(
            r0[0].fan_speed_percent,
            Some(vec![]),
            "no fans is not unsupported"
        );
        assert_eq!(r0[1].fan_speed_percent, Some(vec![30, 30]));
        assert!(source.poll_events().is_empty());

        let r1 = source.sample().unwrap();
        assert_eq!(r1[0].utilization_gpu_percent, Some(20));
        assert_eq!(r1[0].xid_errors_total.get(&13), Some(&1));
        let events = source.poll_events();
        let classes: Vec<_> = events
            .iter()
            .map(|e| match &e.kind {
                GpuEventKind::Xid { class, .. } => *class,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            classes,
            vec![XidClass::RestartApplication, XidClass::RebootHost]
        );

        let r2 = source.sample().unwrap();
        assert!(r2[1].lost && r2[1].utilization_gpu_percent.is_none());
        let kinds: Vec<_> = source
            .poll_events()
            .into_iter()
            .map(|e| (e.gpu_index, e.kind))
            .collect();
        assert!(kinds.contains(&(1, GpuEventKind::Lost)), "{kinds:?}");
        assert!(kinds.iter().any(|(_, k)| matches!(
            k,
            GpuEventKind::Xid {
                xid: 9999,
                class: XidClass::Unknown,
                ..
            }
        )));
        source.sample().unwrap();
        assert!(source.poll_events().is_empty(), "lost is reported once");

        let procs = source.processes().unwrap();
        assert_eq!(procs.len(), 1, "lost GPU has no processes");
        assert_eq!(procs[0].processes[1].used_memory, UsedMemory::Unavailable);
    }

    #[test]
    fn pid_file_process_follows_its_file_at_each_tick() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scenario.toml");
        std::fs::write(
            &path,
            "[[gpu]]\nprocess = [{ pid_file = \"c.pid\", used_memory = 2048 }]\n",
        )
        .unwrap();
        let mut source = ScenarioSource::load(&path).unwrap();
        let tick = |source: &mut ScenarioSource| {
            let readings = source.sample().unwrap();
            let procs = source.processes().unwrap();
            let pids: Vec<(u32, UsedMemory)> = procs[0]
                .processes
                .iter()
                .map(|p| (p.pid, p.used_memory))
                .collect();
            (readings[0].memory_used_bytes, pids)
        };
        assert_eq!(tick(&mut source), (Some(0), vec![]));
        std::fs::write(dir.path().join("c.pid"), "555\n").unwrap();
        assert_eq!(
            tick(&mut source),
            (Some(2048), vec![(555, UsedMemory::Bytes(2048))])
        );
        std::fs::write(dir.path().join("c.pid"), "556\n").unwrap();
        assert_eq!(tick(&mut source).1, vec![(556, UsedMemory::Bytes(2048))]);
    }
}
