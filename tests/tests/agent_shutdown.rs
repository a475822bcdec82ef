//! `Daemon::shutdown` closes the collector link with the shutdown code and waits for it
//! to go, even while the task running collector commands holds the uplink: real QUIC
//! with mTLS on loopback, a bare server standing in for the collector.

use anyhow::Context;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{ConnectionError, Endpoint};
use razar_agent::config::Config;
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_agent::uplink::close_code;
use razar_tests::ca::{TestCa, COLLECTOR_NAMES};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

/// Upper bound for any one step; reached only when something is broken.
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_shutdown_closes_the_link_with_the_shutdown_code() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let agent = ca.agent("gpu-node-07")?;
    let crypto = QuicServerConfig::try_from(Arc::new(ca.server_config()?))?;
    let endpoint = Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse()?,
    )?;
    let addr = endpoint.local_addr()?;
    let dir = tempfile::tempdir()?;
    let files = ca.client_files(&agent);
    let text = format!(
        "[agent]\nprofile = \"core\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/logs\"\nlisten = \"127.0.0.1:0\"\n\n\
         [collector]\naddress = \"{addr}\"\nserver_name = \"{name}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [[component]]\nname = \"s\"\ncommand = \"sleep\"\nargs = [\"1000.47\"]\n",
        d = dir.path().display(),
        name = COLLECTOR_NAMES[0],
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, &text)?;
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The agent runs on a runtime of its own that ends right after `shutdown` returns,
    // as in the binary (the process exits): a close not sent by then never is. A
    // current-thread runtime runs nothing after that: only what `shutdown` awaited.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let daemon = Daemon::start(
                config,
                DaemonOptions {
                    listen: Some("127.0.0.1:0".parse()?),
                    ..DaemonOptions::default()
                },
            )
            .await?;
            let _ = started_tx.send(());
            let _ = stop_rx.await;
            daemon.shutdown().await;
            Ok::<_, anyhow::Error>(())
        })?;
        rt.shutdown_background();
        Ok(())
    });
    timeout(DEADLINE, started_rx)
        .await
        .context("the daemon did not start")?
        .context("the daemon failed to start")?;
    let incoming = timeout(DEADLINE, endpoint.accept())
        .await
        .context("no connection from the agent")?
        .context("endpoint closed")?;
    let conn = timeout(DEADLINE, incoming)
        .await
        .context("handshake timed out")??;

    let _ = stop_tx.send(());
    tokio::task::spawn_blocking(move || agent_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the agent thread panicked"))??;
    // Closed by the time shutdown returned; the slack is for the close frame's trip only
    // (a link left open would end by idle timeout, later and without the code).
    let closed = timeout(Duration::from_secs(10), conn.closed())
        .await
        .context("the agent's shutdown left the link open")?;
    match closed {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                u64::from(close.error_code),
                u64::from(close_code::SHUTDOWN),
                "{close:?}"
            );
            assert_eq!(&close.reason[..], b"agent shutting down");
        }
        other => panic!("closed otherwise: {other:?}"),
    }
    endpoint.close(0u32.into(), b"");
    Ok(())
}
