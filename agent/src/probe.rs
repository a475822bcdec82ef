//! One-shot readiness and liveness probes: HTTP GET expecting 2xx, TCP connect, and a
//! command expected to exit 0, each bounded by a timeout.
//!
//! The HTTP probe is a minimal HTTP/1.1 client over a tokio `TcpStream`: it sends one
//! `GET` with `Connection: close` and reads only the status line (at most 1 KiB). Only
//! `http://` URLs are supported; components are probed on the host itself.
//!
//! The exec probe runs its program in a process group of its own with stdin, stdout and
//! stderr on /dev/null; on timeout the whole group is killed and reaped.
#![forbid(unsafe_code)]

use crate::config::{Argv, ProbeCheck};
use crate::process::{self, Exit, SpawnSpec};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest status line read from an HTTP response.
const MAX_STATUS_LINE: usize = 1024;

/// What one probe run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    /// Failed, with a short reason for the event (e.g. `HTTP 503`, `timed out after 1s`).
    Failure(String),
}

impl ProbeOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, ProbeOutcome::Success)
    }
}

/// Runs `check` once; a check not finished within `timeout` fails.
pub async fn run_probe(check: &ProbeCheck, timeout: Duration) -> ProbeOutcome {
    let outcome = match check {
        ProbeCheck::Http { url } => tokio::time::timeout(timeout, http_get(url)).await,
        ProbeCheck::Tcp { address } => tokio::time::timeout(timeout, tcp_connect(address)).await,
        ProbeCheck::Exec { argv } => return exec(argv, timeout).await,
    };
    match outcome {
        Ok(Ok(())) => ProbeOutcome::Success,
        Ok(Err(reason)) => ProbeOutcome::Failure(reason),
        Err(_) => ProbeOutcome::Failure(format!("timed out after {timeout:?}")),
    }
}

async fn tcp_connect(address: &str) -> Result<(), String> {
    TcpStream::connect(address)
        .await
        .map(drop)
        .map_err(|e| format!("connect to {address}: {e}"))
}

/// The parts of an `http://host[:port][/path]` URL.
#[derive(Debug, PartialEq, Eq)]
struct HttpTarget<'a> {
    /// As written, for the `Host` header (with brackets for IPv6).
    authority: &'a str,
    /// Without brackets, for connecting.
    host: &'a str,
    port: u16,
    path: &'a str,
}

fn parse_http_url(url: &str) -> Result<HttpTarget<'_>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(format!(
            "`{url}`: the path holds spaces or control characters"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed `[` in host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("`{url}`: bad port `{p}`"))?,
        None => 80,
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(HttpTarget {
        authority,
        host,
        port,
        path,
    })
}

async fn http_get(url: &str) -> Result<(), String> {
    let target = parse_http_url(url)?;
    let mut stream = TcpStream::connect((target.host, target.port))
        .await
        .map_err(|e| format!("connect to {}: {e}", target.authority))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: razar-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    let line_end = loop {
        if let Some(i) = head.windows(2).position(|w| w == b"\r\n") {
            break i;
        }
        if head.len() >= MAX_STATUS_LINE {
            return Err("status line longer than 1 KiB".into());
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let status = parse_status_line(&head[..line_end])?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("not an HTTP/1.x status line: {:.80}", text));
    }
    code.parse::<u16>()
        .map_err(|_| format!("bad status code `{code}`"))
}

async fn exec(argv: &Argv, timeout: Duration) -> ProbeOutcome {
    let spec = SpawnSpec {
        component: String::new(),
        program: argv.program.clone(),
        args: argv.args.clone(),
        ..SpawnSpec::default()
    };
    let mut child = match process::spawn(&spec, None) {
        Ok(child) => child,
        Err(e) => return ProbeOutcome::Failure(e.to_string()),
    };
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(Exit::Code(0))) => ProbeOutcome::Success,
        Ok(Ok(exit)) => ProbeOutcome::Failure(exit.to_string()),
        Ok(Err(e)) => ProbeOutcome::Failure(e.to_string()),
        Err(_) => ProbeOutcome::Failure(format!("timed out after {timeout:?}")),
    };
    // Leave nothing behind: the probe's own children, or the probe itself after a timeout.
    let _ = process::kill_tree(child.pgid());
    let _ = child.wait().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Serves one fixed response per connection, after reading the request head.
    async fn http_server(response: &'static str) -> Result<String, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 512];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        Ok(address)
    }

    fn http(url: String) -> ProbeCheck {
        ProbeCheck::Http { url }
    }

    fn exec_check(program: &str, args: &[&str]) -> ProbeCheck {
        ProbeCheck::Exec {
            argv: Argv {
                program: program.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
            },
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn http_2xx_passes_and_others_fail() -> TestResult {
        let ok = http_server("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await?;
        assert_eq!(
            run_probe(&http(format!("http://{ok}/health")), T).await,
            ProbeOutcome::Success
        );
        assert_eq!(
            run_probe(&http(format!("http://{ok}")), T).await,
            ProbeOutcome::Success
        );
        let down = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await?;
        assert_eq!(
            run_probe(&http(format!("http://{down}/health")), T).await,
            ProbeOutcome::Failure("HTTP 503".into())
        );
        let junk = http_server("SSH-2.0-OpenSSH\r\n").await?;
        assert!(!run_probe(&http(format!("http://{junk}/")), T)
            .await
            .is_success());
        Ok(())
    }

    #[tokio::test]
    async fn http_times_out_on_a_silent_server() -> TestResult {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        // Accepts (via the backlog) but never answers.
        let outcome = run_probe(
            &http(format!("http://{address}/")),
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(
            outcome,
            ProbeOutcome::Failure("timed out after 200ms".into())
        );
        drop(listener);
        Ok(())
    }

    #[tokio::test]
    async fn tcp_connect_passes_on_a_listener_and_fails_without() -> TestResult {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let check = ProbeCheck::Tcp {
            address: address.clone(),
        };
        assert_eq!(run_probe(&check, T).await, ProbeOutcome::Success);
        drop(listener);
        let outcome = run_probe(&check, T).await;
        assert!(
            matches!(&outcome, ProbeOutcome::Failure(r) if r.contains("refused")),
            "{outcome:?}"
        );
        // A refused HTTP connection fails too.
        assert!(!run_probe(&http(format!("http://{address}/")), T)
            .await
            .is_success());
        Ok(())
    }

    #[tokio::test]
    async fn exec_passes_on_zero_and_fails_otherwise() {
        assert_eq!(
            run_probe(&exec_check("true", &[]), T).await,
            ProbeOutcome::Success
        );
        assert_eq!(
            run_probe(&exec_check("sh", &["-c", "exit 2"]), T).await,
            ProbeOutcome::Failure("exit code 2".into())
        );
        let missing = run_probe(&exec_check("/nonexistent/razar-probe", &[]), T).await;
        assert!(matches!(missing, ProbeOutcome::Failure(r) if r.contains("cannot start")));
    }

    #[tokio::test]
    async fn exec_timeout_kills_the_probe_tree() -> TestResult {
        let dir = tempfile::tempdir()?;
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
        let outcome = run_probe(
            &exec_check("sh", &["-c", &script]),
            Duration::from_millis(500),
        )
        .await;
        assert_eq!(
            outcome,
            ProbeOutcome::Failure("timed out after 500ms".into())
        );
        let pid: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while process::read_stat(pid).is_some_and(|s| s.state != 'Z') {
            assert!(
                tokio::time::Instant::now() < deadline,
                "probe grandchild {pid} survived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    #[test]
    fn parses_urls() {
        let t = parse_http_url("http://127.0.0.1:8080/ready?x=1");
        assert_eq!(
            t,
            Ok(HttpTarget {
                authority: "127.0.0.1:8080",
                host: "127.0.0.1",
                port: 8080,
                path: "/ready?x=1"
            })
        );
        let t = parse_http_url("http://[::1]:9/");
        assert_eq!(t.map(|t| (t.host, t.port)), Ok(("::1", 9)));
        assert_eq!(
            parse_http_url("http://localhost").map(|t| (t.port, t.path)),
            Ok((80, "/"))
        );
        assert!(parse_http_url("https://x/").is_err());
        assert!(parse_http_url("http://x:99999/").is_err());
        assert!(parse_http_url("http://:80/").is_err());
        assert!(parse_http_url("http://x/a b").is_err());
        assert!(parse_http_url("http://x/a\r\nHost: y").is_err());
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 404"), Ok(404));
        assert!(parse_status_line(b"HTTP/2 200").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 x").is_err());
        assert!(parse_status_line(b"\xff\xfe").is_err());
    }
}
