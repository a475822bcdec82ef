//! Helpers shared by the agent benchmarks: /proc readings and small statistics.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

/// Live (non-zombie) children of every thread of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .filter(|p| alive(*p)),
            );
        }
    }
    out
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// utime + stime of `pid` itself, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 are at index 11 and 12 after the name.
    (n(11) + n(12)) as f64 / ticks
}

/// Pss of `pid` in bytes (from smaps_rollup).
pub fn pss_bytes(pid: u32) -> u64 {
    field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:") * 1024
}

/// VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    field_kib(&format!("/proc/{pid}/status"), "VmRSS:") * 1024
}

fn field_kib(path: &str, name: &str) -> u64 {
    std::fs::read_to_string(Path::new(path))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// (median, p95, max) in milliseconds.
pub fn summary(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().map_or(f64::NAN, ms)
    };
    (
        at(0.5),
        at(0.95),
        samples.last().copied().map_or(f64::NAN, ms),
    )
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Minimal blocking HTTP GET of `path` on `addr`; returns the body.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}
