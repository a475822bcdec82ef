//! Prometheus exposition (dcgm-exporter names and labels, native names) and telemetry
//! samples, from scenario readings.

use prometheus::{Encoder, Registry, TextEncoder};
use razar_gpu::exposition::{gpu_samples, host_samples, TelemetryCollector};
use razar_gpu::host::HostSampler;
use razar_gpu::{GpuSource, Scenario, ScenarioSource};

const SCENARIO: &str = r#"
[[gpu]]
name = "NVIDIA H100 80GB HBM3"
values = { utilization_gpu = 87, memory_used = 1073741824, power_usage = 350500 }
unsupported = ["temperature_memory", "encoder_utilization"]
xid = [{ at = 1, xid = 13 }, { at = 1, xid = 13 }, { at = 1, xid = 79 }]
"#;

fn readings() -> Vec<razar_gpu::GpuReading> {
    let mut source = ScenarioSource::new(Scenario::parse(SCENARIO, "t").expect("scenario"));
    source.set_time(1.0);
    source.sample().expect("sample")
}

fn scrape(collector: &TelemetryCollector) -> String {
    let registry = Registry::new();
    registry
        .register(Box::new(collector.clone()))
        .expect("register");
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encode");
    String::from_utf8(out).expect("utf-8")
}

fn line<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    text.lines().find(|l| l.starts_with(prefix))
}

#[test]
fn dcgm_compatible_series_with_dcgm_labels() {
    let collector = TelemetryCollector::new("gpu-host-1").expect("collector");
    collector.update_gpus(&readings());
    let text = scrape(&collector);
    let labels = r#"{UUID="GPU-fa4e0000-0000-4000-8000-000000000000",device="nvidia0",gpu="0",hostname="gpu-host-1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:01:00.0"}"#;
    assert_eq!(
        line(&text, "DCGM_FI_DEV_GPU_UTIL{"),
        Some(format!("DCGM_FI_DEV_GPU_UTIL{labels} 87").as_str())
    );
    assert_eq!(
        line(&text, "DCGM_FI_DEV_FB_USED{"),
        Some(format!("DCGM_FI_DEV_FB_USED{labels} 1024").as_str()),
        "MiB"
    );
    assert_eq!(
        line(&text, "DCGM_FI_DEV_POWER_USAGE{"),
        Some(format!("DCGM_FI_DEV_POWER_USAGE{labels} 350.5").as_str()),
        "W"
    );
    assert_eq!(
        line(&text, "DCGM_FI_DEV_XID_ERRORS{"),
        Some(format!("DCGM_FI_DEV_XID_ERRORS{labels} 79").as_str())
    );
    assert!(text.contains("# TYPE DCGM_FI_DEV_PCIE_REPLAY_COUNTER counter"));
    assert!(line(&text, "DCGM_FI_DEV_SM_CLOCK{").is_some());
    // Unsupported fields have no series at all (no zero, no sentinel).
    assert_eq!(line(&text, "DCGM_FI_DEV_MEMORY_TEMP"), None);
    assert_eq!(line(&text, "DCGM_FI_DEV_ENC_UTIL"), None);
    assert_eq!(line(&text, "DCGM_FI_DEV_FAN_SPEED"), None, "no fans");
    assert!(!text.contains("9223372036854775794"));
}

#[test]
fn native_series_count_every_xid() {
    let collector = TelemetryCollector::new("h").expect("collector");
    collector.update_gpus(&readings());
    let text = scrape(&collector);
    assert!(text.contains("# TYPE razar_gpu_xid_errors_total counter"));
    let uuid = "GPU-fa4e0000-0000-4000-8000-000000000000";
    assert!(
        text.contains(&format!(
            r#"razar_gpu_xid_errors_total{{gpu="0",uuid="{uuid}",xid="13"}} 2"#
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        r#"razar_gpu_xid_errors_total{{gpu="0",uuid="{uuid}",xid="79"}} 1"#
    )));
    assert!(text.contains(&format!(
        r#"razar_gpu_utilization_ratio{{engine="gpu",gpu="0",uuid="{uuid}"}} 0.87"#
    )));
    assert!(text.contains(&format!(
        r#"razar_gpu_power_watts{{gpu="0",uuid="{uuid}"}} 350.5"#
    )));
    assert!(!text.contains(r#"engine="encoder""#));
    assert!(!text.contains(r#"sensor="memory""#));
}

#[test]
fn telemetry_samples_match_native_names_and_skip_absent_fields() {
    let mut samples = Vec::new();
    gpu_samples(&readings(), &mut samples);
    assert!(samples.iter().all(|s| s.metric.starts_with("razar_gpu_")));
    assert!(
        samples
            .iter()
            .all(|s| s.labels.windows(2).all(|w| w[0].0 < w[1].0)),
        "labels sorted by key"
    );
    let find = |metric: &str, extra: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && extra.is_none_or(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
    };
    assert_eq!(
        find("razar_gpu_xid_errors_total", Some(("xid", "13"))),
        Some(2.0)
    );
    assert_eq!(
        find("razar_gpu_memory_used_bytes", None),
        Some(1073741824.0)
    );
    assert_eq!(
        find("razar_gpu_utilization_ratio", Some(("engine", "encoder"))),
        None
    );
    assert_eq!(find("razar_gpu_lost", None), Some(0.0));

    let mut host = Vec::new();
    let mut sampler = HostSampler::new(false);
    host_samples(&sampler.sample(), &mut host);
    assert!(host
        .iter()
        .any(|s| s.metric == "razar_host_memory_total_bytes" && s.value > 0.0));
    assert!(host
        .iter()
        .any(|s| s.metric == "razar_host_network_receive_bytes_total"));
}

#[test]
fn host_series_scrape() {
    let collector = TelemetryCollector::new("h").expect("collector");
    collector.update_host(&HostSampler::new(true).sample());
    let text = scrape(&collector);
    assert!(text.contains("# TYPE razar_host_network_transmit_bytes_total counter"));
    assert!(line(&text, "razar_host_load1 ").is_some(), "{text}");
    assert!(line(&text, "razar_host_cpu_core_usage_ratio{core=\"0\"}").is_some());
}
