//! Protocol values the store tests share.

use razar_shared::domain::ComponentState;
use razar_shared::protocol::{ComponentInfo, GpuInfo, Hello};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A protocol-1 Hello from `host` with one critical component (`model-server`, starting)
/// and `gpus`.
pub fn hello(host: &str, gpus: Vec<GpuInfo>) -> Hello {
    Hello {
        protocol_min: 1,
        protocol_max: 1,
        host_id: host.to_owned(),
        agent_version: "0.1.0".to_owned(),
        profile: "core".to_owned(),
        components: vec![ComponentInfo {
            name: "model-server".to_owned(),
            revision: "r1".to_owned(),
            state: ComponentState::Starting,
            critical: true,
        }],
        gpus,
        last_acked_seq: 0,
        agent_time_ms: now_ms(),
    }
}
