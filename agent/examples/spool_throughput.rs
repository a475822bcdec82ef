//! Spool append throughput: durable appends of realistic batches (200 samples, one
//! event), next to an anchor measured in the same run on the same disk: appending the
//! same encoded bytes to a plain file with `fdatasync` after each. Group commits
//! (`append_many`) share one fsync between several batches.
//!
//! `cargo run --release -p razar-agent --example spool_throughput [N]`

use razar_agent::spool::Spool;
use razar_shared::domain::Severity;
use razar_shared::protocol::{Event, EventKind, SeriesPoints, Subject};
use std::io::Write;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000);
    let dir = tempfile::tempdir()?;
    let series: Vec<SeriesPoints> = (0..20)
        .map(|s| SeriesPoints {
            series: s,
            points: (0..10).map(|i| (i * 100, 40.0 + f64::from(i))).collect(),
        })
        .collect();
    let event = Event {
        ts_ms: 1_700_000_000_000,
        severity: Severity::Info,
        subject: Subject::Component("model-server".into()),
        kind: EventKind::Other {
            code: "demo".into(),
        },
        message: "a realistic event message".into(),
    };
    let spool = Spool::open(dir.path().join("spool.redb"), u64::MAX)?;
    let encoded = postcard::to_allocvec(&series)?;

    // Anchor: the same bytes, appended and fdatasync'ed one by one.
    let mut file = std::fs::File::create(dir.path().join("anchor.bin"))?;
    let start = Instant::now();
    for _ in 0..n {
        file.write_all(&encoded)?;
        file.sync_data()?;
    }
    let anchor = n as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    for i in 0..n {
        spool.append(i as i64, series.clone(), vec![event.clone()])?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();

    let mut grouped = Vec::new();
    for group in [8usize, 64] {
        let start = Instant::now();
        let mut done = 0;
        while done < n {
            let items = (0..group)
                .map(|i| ((done + i) as i64, series.clone(), vec![event.clone()]))
                .collect();
            spool.append_many(items)?;
            done += group;
        }
        grouped.push((group, done as f64 / start.elapsed().as_secs_f64()));
    }

    let start = Instant::now();
    let mut acked = 0;
    let total = spool.last_seq();
    while acked < total {
        acked += 64;
        spool.ack(acked)?;
    }
    let ack_rate = total as f64 / start.elapsed().as_secs_f64();

    println!(
        "batch: 200 samples + 1 event, {} bytes encoded",
        encoded.len()
    );
    println!("anchor  write+fdatasync : {anchor:>10.0} appends/s");
    println!(
        "spool   durable append  : {rate:>10.0} batches/s ({:.2} x anchor)",
        rate / anchor
    );
    for (group, r) in grouped {
        println!(
            "spool   append_many({group:>2})  : {r:>10.0} batches/s ({:.2} x anchor)",
            r / anchor
        );
    }
    println!("spool   ack (64 per ack): {ack_rate:>10.0} batches/s");
    Ok(())
}
