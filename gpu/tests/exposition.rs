//! Prometheus exposition (dcgm-exporter names and labels, native names) and telemetry
//! samples, from scenario readings.

use prometheus::{Encoder, Registry, TextEncoder};
use razar_gpu::exposition::{gpu_samples, host_samples, HostnameLabel, TelemetryCollector};
use razar_gpu::host::HostSampler;
use razar_gpu::{GpuSource, Scenario, ScenarioSource};
use std::collections::{BTreeMap, BTreeSet};

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
    let labels = r#"{DCGM_FI_DRIVER_VERSION="550.54.15",UUID="GPU-fa4e0000-0000-4000-8000-000000000000",device="nvidia0",gpu="0",hostname="gpu-host-1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:01:00.0"}"#;
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
            r#"razar_gpu_xid_errors_total{{class="RESTART_APP",gpu="0",uuid="{uuid}",xid="13"}} 2"#
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        r#"razar_gpu_xid_errors_total{{class="RESTART_BM",gpu="0",uuid="{uuid}",xid="79"}} 1"#
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

/// Per metric family of a Prometheus text exposition: its type and the label names of
/// each of its series.
fn families(text: &str) -> BTreeMap<String, (String, Vec<BTreeSet<String>>)> {
    let mut out: BTreeMap<String, (String, Vec<BTreeSet<String>>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("type line");
            out.entry(name.to_owned()).or_default().0 = kind.to_owned();
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let (name, rest) = line.split_once('{').expect("labelled series");
            let (labels, _value) = rest.rsplit_once("} ").expect("value");
            let names = labels
                .split("\",")
                .map(|pair| pair.split_once('=').expect("label pair").0.to_owned())
                .collect();
            out.entry(name.to_owned()).or_default().1.push(names);
        }
    }
    out
}

/// Against dcgm-exporter's own output (the released 4.x format): every family both
/// export has the same type and exactly the same label names, so its Grafana dashboards
/// and alert rules select our series unchanged; `hostname` is the default and
/// `Hostname` (what the released versions write) is one setting away.
#[test]
fn label_names_and_types_match_dcgm_exporter_output() {
    let theirs = families(include_str!("fixtures/dcgm-exporter-4.x.prom"));
    assert!(theirs.len() >= 15, "fixture parsed: {theirs:?}");
    for (label, host) in [
        (HostnameLabel::Capitalized, "Hostname"),
        (HostnameLabel::Lower, "hostname"),
    ] {
        let collector =
            TelemetryCollector::with_hostname_label("gpu-host-1", label).expect("collector");
        collector.update_gpus(&readings());
        let ours = families(&scrape(&collector));
        let mut compared = 0;
        for (name, (kind, series)) in &theirs {
            let Some((our_kind, our_series)) = ours.get(name) else {
                continue;
            };
            compared += 1;
            assert_eq!(our_kind, kind, "{name}: type");
            for names in series {
                let expected: BTreeSet<String> = names
                    .iter()
                    .map(|n| {
                        if n == "Hostname" {
                            host.to_owned()
                        } else {
                            n.clone()
                        }
                    })
                    .collect();
                for ours in our_series {
                    assert_eq!(ours, &expected, "{name}: label names with {host}");
                }
            }
        }
        // The scenario GPU supports most fields; the families it lacks are absent on
        // purpose (no series for unsupported fields).
        assert!(compared >= 10, "only {compared} families in common");
    }
    assert_eq!(
        HostnameLabel::parse("Hostname"),
        Some(HostnameLabel::Capitalized)
    );
    assert_eq!(HostnameLabel::parse("hostname"), Some(HostnameLabel::Lower));
    assert_eq!(HostnameLabel::parse("HOSTNAME"), None);
}
