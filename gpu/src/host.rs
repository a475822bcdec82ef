//! Host sampling: CPU, memory, swap, load and disks through sysinfo, network counters
//! from `/proc/net/dev`. One [`HostSampler`] lives for the agent's lifetime and
//! refreshes only what it reports.

use serde::Serialize;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// Ticks between re-reading the list of mounts and interfaces.
const RELIST_EVERY: u32 = 60;

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskReading {
    pub mount: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// One network interface; counters since boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkReading {
    pub interface: String,
    pub received_bytes_total: u64,
    pub transmitted_bytes_total: u64,
}

/// The host at one tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostReading {
    /// 0–1 over all cores since the previous sample (0 at the first).
    pub cpu_usage_ratio: f64,
    /// 0–1 per core; empty unless asked for.
    pub cpu_per_core_ratio: Vec<f64>,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub disks: Vec<DiskReading>,
    pub networks: Vec<NetworkReading>,
}

/// Samples the host, reusing sysinfo state between ticks.
pub struct HostSampler {
    system: System,
    disks: Disks,
    per_core: bool,
    ticks: u32,
}

impl std::fmt::Debug for HostSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSampler")
            .field("per_core", &self.per_core)
            .finish()
    }
}

/// Disk refresh: space only, not I/O counters.
fn storage() -> DiskRefreshKind {
    DiskRefreshKind::nothing().with_storage()
}

impl HostSampler {
    /// `per_core`: also report each core's usage.
    pub fn new(per_core: bool) -> HostSampler {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::everything()),
        );
        HostSampler {
            system,
            disks: Disks::new_with_refreshed_list_specifics(storage()),
            per_core,
            ticks: 0,
        }
    }

    pub fn sample(&mut self) -> HostReading {
        self.ticks += 1;
        let relist = self.ticks >= RELIST_EVERY;
        if relist {
            self.ticks = 0;
        }
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        if relist {
            self.disks = Disks::new_with_refreshed_list_specifics(storage());
        } else {
            self.disks.refresh_specifics(false, storage());
        }
        let load = System::load_average();
        let mut disks: Vec<DiskReading> = self
            .disks
            .list()
            .iter()
            .map(|d| DiskReading {
                mount: d.mount_point().to_string_lossy().into_owned(),
                total_bytes: d.total_space(),
                available_bytes: d.available_space(),
            })
            .collect();
        disks.sort_by(|a, b| a.mount.cmp(&b.mount));
        disks.dedup_by(|a, b| a.mount == b.mount);
        // One read of /proc/net/dev: sysinfo reads several sysfs files per interface
        // and asks netlink for addresses, which this reading does not report.
        let mut networks = std::fs::read_to_string("/proc/net/dev")
            .map(|text| parse_net_dev(&text))
            .unwrap_or_default();
        networks.sort_by(|a, b| a.interface.cmp(&b.interface));
        HostReading {
            cpu_usage_ratio: f64::from(self.system.global_cpu_usage()) / 100.0,
            cpu_per_core_ratio: if self.per_core {
                self.system
                    .cpus()
                    .iter()
                    .map(|c| f64::from(c.cpu_usage()) / 100.0)
                    .collect()
            } else {
                Vec::new()
            },
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            memory_available_bytes: self.system.available_memory(),
            swap_total_bytes: self.system.total_swap(),
            swap_used_bytes: self.system.used_swap(),
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            disks,
            networks,
        }
    }
}

/// Interfaces and their byte counters from the text of `/proc/net/dev`: two header
/// lines, then `name: rx_bytes rx_packets … (8 receive fields) tx_bytes …`. Lines that do
/// not parse are skipped.
pub fn parse_net_dev(text: &str) -> Vec<NetworkReading> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let fields: Vec<u64> = counters
                .split_ascii_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some(NetworkReading {
                interface: name.trim().to_owned(),
                received_bytes_total: *fields.first()?,
                transmitted_bytes_total: *fields.get(8)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1234567    1000    0    0    0     0          0         0  1234567    1000    0    0    0     0       0          0
  eth0:98765 20 0 0 0 0 0 3 4321 10 0 0 0 0 0 0
 broken: 1 2 x
";
        let parsed = parse_net_dev(text);
        assert_eq!(
            parsed,
            vec![
                NetworkReading {
                    interface: "lo".into(),
                    received_bytes_total: 1_234_567,
                    transmitted_bytes_total: 1_234_567,
                },
                NetworkReading {
                    interface: "eth0".into(),
                    received_bytes_total: 98_765,
                    transmitted_bytes_total: 4_321,
                },
            ]
        );
    }

    #[test]
    fn samples_this_host() {
        let mut sampler = HostSampler::new(true);
        let first = sampler.sample();
        let second = sampler.sample();
        assert!(second.memory_total_bytes > 0);
        assert!(second.memory_used_bytes <= second.memory_total_bytes);
        assert!(
            (0.0..=1.0).contains(&second.cpu_usage_ratio),
            "{}",
            second.cpu_usage_ratio
        );
        assert_eq!(
            second.cpu_per_core_ratio.len(),
            first.cpu_per_core_ratio.len()
        );
        assert!(!second.cpu_per_core_ratio.is_empty());
        assert!(second.load1 >= 0.0);
        assert!(second
            .disks
            .iter()
            .all(|d| d.available_bytes <= d.total_bytes));
        assert!(
            second.networks.iter().any(|n| n.interface == "lo"),
            "{:?}",
            second.networks
        );
    }
}
