//! Demo components for `razar-dev`: small, dependency-free programs the local agent
//! supervises so the dev fleet has something real to watch. They are the `razar-dev`
//! binary itself run with `demo <kind>`, so the demo needs nothing installed.

use std::net::SocketAddr;
use std::time::Duration;

/// Which demo program to run.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DemoKind {
    /// An HTTP server answering `GET /` and `GET /health` with 200 (a stand-in model server).
    Http {
        #[arg(long, default_value = "127.0.0.1:7090")]
        listen: SocketAddr,
    },
    /// A worker that polls an upstream HTTP URL every second and logs what it saw.
    Worker {
        #[arg(long, default_value = "127.0.0.1:7090")]
        upstream: SocketAddr,
    },
    /// A component that works for a while, then crashes with exit code 1.
    Flaky {
        /// Seconds before the crash (a random value in [min, max), max 2*min by default).
        #[arg(long, default_value_t = 20)]
        min_seconds: u64,
        /// Upper bound of the crash time (equal to min: exactly min).
        #[arg(long)]
        max_seconds: Option<u64>,
    },
}

/// Runs a demo program until it ends (or forever).
pub async fn run(kind: DemoKind) -> anyhow::Result<()> {
    match kind {
        DemoKind::Http { listen } => {
            let app = axum::Router::new()
                .route(
                    "/",
                    axum::routing::get(|| async { "razar demo model server\n" }),
                )
                .route("/health", axum::routing::get(|| async { "ok\n" }));
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("demo http server listening on {listen}");
            axum::serve(listener, app).await?;
            Ok(())
        }
        DemoKind::Worker { upstream } => {
            let started = std::time::Instant::now();
            loop {
                match tokio::net::TcpStream::connect(upstream).await {
                    Ok(_) => println!("worker: upstream {upstream} reachable"),
                    Err(e) => eprintln!("worker: upstream {upstream} unreachable: {e}"),
                }
                // Some work each second, so the dashboard's component CPU chart has a
                // curve to draw: 2-12 % of a core, on a 5-minute wave.
                work(Duration::from_millis(busy_ms(started.elapsed())));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        DemoKind::Flaky {
            min_seconds,
            max_seconds,
        } => {
            let min = min_seconds.max(1);
            let max = max_seconds.unwrap_or(2 * min).max(min);
            let secs = if max > min {
                rand::random_range(min..max)
            } else {
                min
            };
            println!("flaky: working for {secs}s");
            tokio::time::sleep(Duration::from_secs(secs)).await;
            eprintln!("flaky: simulated crash");
            std::process::exit(1);
        }
    }
}

/// Milliseconds of work in the second that starts `elapsed` into the worker's life:
/// 20 to 120, following a 5-minute sine wave (pure).
fn busy_ms(elapsed: Duration) -> u64 {
    let phase = elapsed.as_secs_f64() / 300.0 * std::f64::consts::TAU;
    (70.0 + 50.0 * phase.sin()).round().clamp(20.0, 120.0) as u64
}

/// Keeps the CPU busy for `d` (hashing, so it is not optimised away).
fn work(d: Duration) {
    let until = std::time::Instant::now() + d;
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    while std::time::Instant::now() < until {
        for _ in 0..1_000 {
            x = std::hint::black_box(x.rotate_left(5) ^ x.wrapping_mul(0x100_0000_01b3));
        }
    }
    std::hint::black_box(x);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_load_waves_between_2_and_12_percent() {
        let at = |s: u64| busy_ms(Duration::from_secs(s));
        assert_eq!(at(0), 70);
        assert_eq!(at(75), 120, "a quarter wave: the top");
        assert_eq!(at(225), 20, "three quarters: the bottom");
        assert!((0..600).map(at).all(|ms| (20..=120).contains(&ms)));
    }
}
