//! The NVML source against the fake library, through the real nvml-wrapper: inventory
//! and readings, unsupported fields, XID events, lost GPUs, no library.

mod support;

use razar_gpu::mapping::vram_by_component;
use razar_gpu::{
    open_nvml_or_none, GpuError, GpuEvent, GpuEventKind, GpuSource, NvmlOptions, NvmlSource,
    UsedMemory,
};
use razar_shared::domain::XidClass;
use std::collections::{BTreeMap, BTreeSet};
use support::{wait_for, FakeHost};

const GIB: u64 = 1024 * 1024 * 1024;

const TWO_GPUS: &str = r#"
driver_version = "550.54.15"
kernel_log = "kmsg.log"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
serial = "1654922000001"
values = { utilization_gpu = [[0, 10], [4, 90]], utilization_memory = 33, temperature_gpu = 61, temperature_memory = 70, power_usage = 350500, power_limit = 700000, energy = 123456789, sm_clock = 1755, memory_clock = 2619, throttle_reasons = 4, performance_state = 0, pcie_replay = 7, pcie_tx = 1000, pcie_rx = 2000, ecc_volatile_corrected = 3, ecc_volatile_uncorrected = 1, ecc_aggregate_corrected = 30, ecc_aggregate_uncorrected = 2, retired_pages_single_bit = 2, retired_pages_double_bit = 1, remapped_rows_correctable = 4, remapped_rows_uncorrectable = 1, remapped_rows_pending = 1, remapped_rows_failure = 0, encoder_utilization = 5, decoder_utilization = 6 }
process = [{ pid = 101, used_memory = 4294967296 }, { pid = 102, used_memory = 1073741824 }, { pid = 103 }]

[[gpu]]
name = "NVIDIA A100-PCIE-40GB"
memory_total = 42949672960
fans = 2
values = { fan_speed = 45, memory_used = 2147483648 }
process = [{ pid = 201, used_memory = 2147483648 }]
"#;

fn open(host: &FakeHost) -> NvmlSource {
    NvmlSource::open(&host.options()).expect("open NVML source on the fake library")
}

#[test]
fn inventory_and_readings_come_through_real_nvml() {
    let host = FakeHost::new(TWO_GPUS);
    let mut source = open(&host);

    let inventory = source.inventory().to_vec();
    assert_eq!(inventory.len(), 2);
    assert_eq!(inventory[0].name, "NVIDIA H100 80GB HBM3");
    assert_eq!(
        inventory[0].uuid,
        "GPU-fa4e0000-0000-4000-8000-000000000000"
    );
    assert_eq!(inventory[0].pci_bus_id, "00000000:01:00.0");
    assert_eq!(inventory[0].serial.as_deref(), Some("1654922000001"));
    assert_eq!(inventory[0].driver_version.as_deref(), Some("550.54.15"));
    assert_eq!(inventory[0].memory_total_bytes, Some(80 * GIB));
    assert_eq!(inventory[0].fans, 0);
    assert_eq!(inventory[1].fans, 2);
    assert_eq!(inventory[1].to_info().memory_total_bytes, 40 * GIB);

    let r = source.sample().expect("sample");
    let g0 = &r[0];
    assert!(!g0.lost);
    assert_eq!(g0.utilization_gpu_percent, Some(10));
    assert_eq!(g0.utilization_memory_percent, Some(33));
    assert_eq!(g0.utilization_encoder_percent, Some(5));
    assert_eq!(g0.utilization_decoder_percent, Some(6));
    assert_eq!(
        g0.memory_used_bytes,
        Some(5 * GIB),
        "defaults to the processes' memory"
    );
    assert_eq!(g0.memory_reserved_bytes, Some(512 << 20));
    assert_eq!(g0.memory_free_bytes, Some(80 * GIB - 5 * GIB - (512 << 20)));
    assert_eq!(g0.temperature_gpu_celsius, Some(61));
    assert_eq!(
        g0.temperature_memory_celsius,
        Some(70),
        "through nvmlDeviceGetFieldValues"
    );
    assert_eq!(g0.power_usage_milliwatts, Some(350_500));
    assert_eq!(g0.power_limit_milliwatts, Some(700_000));
    assert_eq!(g0.energy_millijoules, Some(123_456_789));
    assert_eq!(
        (g0.sm_clock_mhz, g0.memory_clock_mhz),
        (Some(1755), Some(2619))
    );
    assert_eq!(g0.throttle_reasons, Some(4));
    assert_eq!(g0.performance_state, Some(0));
    assert_eq!(g0.fan_speed_percent, Some(vec![]), "SXM board without fans");
    assert_eq!(g0.pcie_replay_count, Some(7));
    assert_eq!(g0.pcie_tx_bytes_per_second, Some(1000 * 1024));
    assert_eq!(g0.pcie_rx_bytes_per_second, Some(2000 * 1024));
    assert_eq!(g0.ecc.volatile_corrected, Some(3));
    assert_eq!(g0.ecc.volatile_uncorrected, Some(1));
    assert_eq!(g0.ecc.aggregate_corrected, Some(30));
    assert_eq!(g0.ecc.aggregate_uncorrected, Some(2));
    assert_eq!(g0.retired_pages_single_bit, Some(2));
    assert_eq!(g0.retired_pages_double_bit, Some(1));
    assert_eq!(g0.remapped_rows_correctable, Some(4));
    assert_eq!(g0.remapped_rows_uncorrectable, Some(1));
    assert_eq!(g0.remapped_rows_pending, Some(1));
    assert_eq!(g0.remapped_rows_failure, Some(0));
    assert_eq!(r[1].fan_speed_percent, Some(vec![45, 45]));
    assert_eq!(r[1].memory_used_bytes, Some(2 * GIB));

    // Values follow the scenario's timeline.
    host.step(2);
    let r = source.sample().expect("sample");
    assert_eq!(r[0].utilization_gpu_percent, Some(50));

    let processes = source.processes().expect("processes");
    assert_eq!(processes.len(), 2);
    assert_eq!(processes[0].processes.len(), 3);
    assert_eq!(processes[0].processes[0].pid, 101);
    assert_eq!(
        processes[0].processes[0].used_memory,
        UsedMemory::Bytes(4 * GIB)
    );
    assert_eq!(
        processes[0].processes[2].used_memory,
        UsedMemory::Unavailable
    );
    assert_eq!(processes[1].processes[0].pid, 201);
}

#[test]
fn component_process_trees_map_to_gpu_memory() {
    let host = FakeHost::new(TWO_GPUS);
    let mut source = open(&host);
    let processes = source.processes().expect("processes");
    // "llm" runs a parent (101) and a worker (201) on the other GPU; "vision" owns 102 and 103.
    let components: BTreeMap<String, BTreeSet<u32>> = [
        ("llm".to_owned(), BTreeSet::from([100, 101, 201])),
        ("vision".to_owned(), BTreeSet::from([102, 103])),
        ("gateway".to_owned(), BTreeSet::from([300])),
    ]
    .into();
    let usage = vram_by_component(&processes, &components);
    assert_eq!(usage["llm"].used_bytes, 6 * GIB);
    assert_eq!(
        usage["llm"].per_gpu,
        BTreeMap::from([(0, 4 * GIB), (1, 2 * GIB)])
    );
    assert_eq!(usage["vision"].used_bytes, GIB);
    assert_eq!(usage["vision"].unavailable_processes, 1);
    assert_eq!(usage["gateway"].used_bytes, 0);
}

#[test]
fn unsupported_and_missing_fields_are_absent_not_zero() {
    let host = FakeHost::new(
        r#"
[[gpu]]
unsupported = ["encoder_utilization", "temperature_memory", "fan_speed", "ecc_aggregate_corrected", "retired_pages_single_bit", "remapped_rows_correctable", "remapped_rows_uncorrectable", "remapped_rows_pending", "remapped_rows_failure", "serial"]
missing = ["energy", "pcie_replay", "performance_state"]
fans = 1
"#,
    );
    let mut source = open(&host);
    assert_eq!(source.inventory()[0].serial, None);
    for _ in 0..2 {
        // Twice: the second tick skips what the first found unsupported.
        let r = &source.sample().expect("sample")[0];
        assert_eq!(r.utilization_encoder_percent, None);
        assert_eq!(r.temperature_memory_celsius, None);
        assert_eq!(
            r.fan_speed_percent, None,
            "fans exist but their speed is unsupported"
        );
        assert_eq!(r.ecc.aggregate_corrected, None);
        assert_eq!(r.retired_pages_single_bit, None);
        assert_eq!(r.remapped_rows_correctable, None);
        assert_eq!(r.remapped_rows_failure, None);
        assert_eq!(r.energy_millijoules, None);
        assert_eq!(r.pcie_replay_count, None);
        assert_eq!(r.performance_state, None);
        // Supported neighbours still read.
        assert_eq!(r.utilization_decoder_percent, Some(0));
        assert_eq!(r.ecc.aggregate_uncorrected, Some(0));
        assert_eq!(r.retired_pages_double_bit, Some(0));
        assert_eq!(r.temperature_gpu_celsius, Some(35));
        assert_eq!(r.power_usage_milliwatts, Some(70_000));
    }
}

fn xids(events: &[GpuEvent]) -> Vec<(u32, u32, XidClass)> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            GpuEventKind::Xid { xid, class, .. } => Some((e.gpu_index, xid, class)),
            _ => None,
        })
        .collect()
}

#[test]
fn xid_79_from_the_event_set_is_classified_reboot_host() {
    let host = FakeHost::new("[[gpu]]\n[[gpu]]\nxid = [{ at = 1, xid = 79 }]\n");
    let options = NvmlOptions {
        kernel_log: None,
        ..host.options()
    };
    let mut source = NvmlSource::open(&options).expect("open");
    assert!(source.poll_events().is_empty());
    host.step(1);
    let mut seen = Vec::new();
    let found = wait_for("XID 79 event", || {
        seen.extend(source.poll_events());
        (!seen.is_empty()).then(|| seen.clone())
    });
    assert_eq!(xids(&found), vec![(1, 79, XidClass::RebootHost)]);
    match &found[0].kind {
        GpuEventKind::Xid { action, .. } => assert!(action.contains("reboot"), "{action}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(found[0].ts_ms > 0);
    let wire = found[0].to_event();
    assert_eq!(
        wire.kind,
        razar_shared::protocol::EventKind::Xid {
            xid: 79,
            class: XidClass::RebootHost
        }
    );
    let r = source.sample().expect("sample");
    assert_eq!(r[1].xid_errors_total, BTreeMap::from([(79, 1)]));
    assert_eq!(r[1].last_xid, Some(79));
    assert!(r[0].xid_errors_total.is_empty());
}

#[test]
fn two_xids_between_samples_are_both_counted_once() {
    let host = FakeHost::new(
        "kernel_log = \"kmsg.log\"\n[[gpu]]\nxid = [{ at = 1, xid = 13 }, { at = 1, xid = 31 }, { at = 3, xid = 31 }]\n",
    );
    let mut source = open(&host);
    source.sample().expect("sample");
    host.step(1);
    // The event set reports only XID 31 (the last); the kernel log has both lines.
    let counts =
        |source: &mut NvmlSource| source.sample().expect("sample")[0].xid_errors_total.clone();
    wait_for("both XIDs counted and the NVML twin matched", || {
        (counts(&mut source) == BTreeMap::from([(13, 1), (31, 1)]) && source.xid_twins() == 1)
            .then_some(())
    });
    host.step(3);
    wait_for("the second XID 31 counted and matched", || {
        (counts(&mut source) == BTreeMap::from([(13, 1), (31, 2)]) && source.xid_twins() == 2)
            .then_some(())
    });
    let events = source.poll_events();
    // Not drained in between: the second XID 31 is folded into the first one's event.
    let mut seen: Vec<(u32, u64)> = events
        .iter()
        .filter_map(|e| match e.kind {
            GpuEventKind::Xid { xid, count, .. } => Some((xid, count)),
            _ => None,
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        vec![(13, 1), (31, 2)],
        "every XID in an event's count, twins suppressed"
    );
    assert_eq!(
        counts(&mut source),
        BTreeMap::from([(13, 1), (31, 2)]),
        "no double count"
    );
}

#[test]
fn event_set_alone_loses_all_but_the_last_xid() {
    // Why the kernel log is read: without it, XID 13 is never seen.
    let host = FakeHost::new("[[gpu]]\nxid = [{ at = 1, xid = 13 }, { at = 1, xid = 31 }]\n");
    let options = NvmlOptions {
        kernel_log: None,
        ..host.options()
    };
    let mut source = NvmlSource::open(&options).expect("open");
    host.step(1);
    let counts = wait_for("XID 31", || {
        let counts = source.sample().expect("sample")[0].xid_errors_total.clone();
        (!counts.is_empty()).then_some(counts)
    });
    assert_eq!(counts, BTreeMap::from([(31, 1)]));
}

#[test]
fn gpu_lost_mid_run_is_reported_once_and_others_keep_working() {
    let host = FakeHost::new(
        "[[gpu]]\nxid = [{ at = 3, xid = 13 }]\n[[gpu]]\nlost_at = 2\nxid = [{ at = 2, xid = 79 }]\n",
    );
    let options = NvmlOptions {
        kernel_log: None,
        ..host.options()
    };
    let mut source = NvmlSource::open(&options).expect("open");
    let r = source.sample().expect("sample");
    assert!(!r[1].lost && r[1].temperature_gpu_celsius.is_some());
    assert_eq!(
        source.event_sets_built(),
        1,
        "open returns with events watched"
    );

    host.step(2);
    let r = source.sample().expect("sample");
    assert!(r[1].lost, "GPU 1 answers GPU_IS_LOST");
    assert_eq!(r[1].temperature_gpu_celsius, None);
    assert!(!r[0].lost && r[0].temperature_gpu_celsius.is_some());
    let processes = source.processes().expect("processes");
    assert_eq!(
        processes.iter().map(|p| p.gpu_index).collect::<Vec<_>>(),
        vec![0]
    );

    // The event set is rebuilt without the lost GPU: GPU 0's XID still arrives.
    wait_for("an event set without GPU 1", || {
        (source.event_sets_built() == 2).then_some(())
    });
    host.step(3);
    let mut events = Vec::new();
    wait_for("XID 13 on GPU 0 after GPU 1 was lost", || {
        events.extend(source.poll_events());
        xids(&events)
            .contains(&(0, 13, XidClass::RestartApplication))
            .then_some(())
    });
    source.sample().expect("sample");
    events.extend(source.poll_events());
    let lost: Vec<u32> = events
        .iter()
        .filter(|e| e.kind == GpuEventKind::Lost)
        .map(|e| e.gpu_index)
        .collect();
    assert_eq!(lost, vec![1], "lost is reported once: {events:?}");
}

#[test]
fn no_library_means_no_nvml_and_no_panic() {
    let options = NvmlOptions {
        library_path: Some("/nonexistent/libnvidia-ml.so.1".into()),
        kernel_log: None,
        ..NvmlOptions::default()
    };
    let error = NvmlSource::open(&options).expect_err("no library");
    assert!(matches!(error, GpuError::NoNvml { .. }));
    assert!(error.to_string().starts_with("no NVML: "), "{error}");

    let (mut source, status) = open_nvml_or_none(&options);
    assert!(status.is_some_and(|s| s.starts_with("no NVML: ")));
    assert!(source.inventory().is_empty());
    assert!(source.sample().expect("sample").is_empty());
    assert!(source.poll_events().is_empty());
}

#[test]
fn init_failure_of_the_driver_means_no_nvml() {
    let host = FakeHost::new("init_error = 9\n[[gpu]]\n");
    let error = NvmlSource::open(&host.options()).expect_err("driver not loaded");
    let text = error.to_string();
    assert!(
        text.starts_with("no NVML: ") && text.to_lowercase().contains("driver"),
        "{text}"
    );
}
