//! The `razar` CLI (target/<profile>/razar) against a live collector with a real agent
//! (`razar_tests::live`): every read command in table, JSON and YAML, component
//! commands that reach `succeeded`, log tail and follow, the event stream, history,
//! the audit log; server and token from flags, the environment and a config file;
//! readable errors with exit codes 0, 1 and 2.
//!
//! Build first: `cargo build -p razar-agent --bins -p razar-cli`.

use razar_collector::store::tokens::{self, Role};
use razar_tests::live::{binary, toml_str, wait_for, LiveFleet, PATIENCE};
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const HOST: &str = "cli-host";
const COMPONENTS: &str = "[[component]]\nname = \"talker\"\ncommand = \"sh\"\nargs = [\"-c\", \"i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.2; done\"]\nstop_grace = \"3s\"\n";

/// Runs `razar ARGS` with `env` (and no RAZAR_* or HOME config of the caller's).
async fn razar_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(binary("razar"));
    command
        .args(args)
        .env_remove("RAZAR_SERVER")
        .env_remove("RAZAR_TOKEN")
        .env_remove("RAZAR_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("HOME", "/nonexistent")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap_or_else(|_| panic!("razar {args:?} did not finish"))
        .expect("run razar")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cli<'f> {
    fleet: &'f LiveFleet,
}

impl Cli<'_> {
    /// `razar --server S --token T ARGS`, which must succeed.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(out.status.code(), Some(0), "razar {args:?}: {}", text(&out));
        stdout(&out)
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "--server",
            self.fleet.base.as_str(),
            "--token",
            self.fleet.token.as_str(),
        ];
        all.extend_from_slice(args);
        razar_env(&all, &[]).await
    }

    /// `-o json`, parsed.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let out = self.ok(&all).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("razar {args:?} -o json: {e}: {out}"))
    }

    /// `-o yaml`, parsed.
    async fn yaml(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "yaml"]);
        let out = self.ok(&all).await;
        serde_yaml::from_str(&out).unwrap_or_else(|e| panic!("razar {args:?} -o yaml: {e}: {out}"))
    }

    /// Starts `razar ARGS` in the background, reads its stdout until `done` holds, kills it.
    async fn stream_until(&self, args: &[&str], what: &str, done: impl Fn(&str) -> bool) -> String {
        let mut command = tokio::process::Command::new(binary("razar"));
        command
            .args(["--server", &self.fleet.base, "--token", &self.fleet.token])
            .args(args)
            .env_remove("RAZAR_SERVER")
            .env_remove("RAZAR_TOKEN")
            .env_remove("RAZAR_CONFIG")
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start razar");
        let mut out = child.stdout.take().expect("stdout");
        let mut seen = String::new();
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0u8; 4096];
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "razar {args:?}: no {what} in {seen}");
            match tokio::time::timeout(left, out.read(&mut buf)).await {
                Ok(Ok(0)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err).await;
                    }
                    panic!("razar {args:?} ended before {what}: {seen}\nstderr: {err}");
                }
                Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Ok(Err(e)) => panic!("reading razar {args:?}: {e}"),
                Err(_) => panic!("razar {args:?}: no {what} in {seen}"),
            }
        }
        child.kill().await.expect("kill razar");
        seen
    }
}

fn rows(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .values()
            .find_map(|x| x.as_array().cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// `line-N` numbers in `text`, in order.
fn numbers(text: &str) -> Vec<u64> {
    text.split("line-")
        .skip(1)
        .filter_map(|s| {
            s.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_and_steers_a_live_fleet() {
    let fleet = LiveFleet::start(HOST, COMPONENTS).await;
    let cli = Cli { fleet: &fleet };
    let pool = fleet.pool.clone();
    wait_for("talker ready and both GPUs known", || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM components WHERE host_id = $1 AND name = 'talker' AND state = 'ready'",
        )
        .bind(HOST)
        .fetch_one(&pool)
        .await
        .ok()?;
        let gpus: i64 = sqlx::query_scalar("SELECT count(*) FROM gpus WHERE host_id = $1")
            .bind(HOST)
            .fetch_one(&pool)
            .await
            .ok()?;
        (running == 1 && gpus == 2).then_some(())
    })
    .await;

    // Hosts: table, JSON, YAML.
    let table = cli.ok(&["hosts"]).await;
    assert!(table.contains("HOST") && table.contains(HOST), "{table}");
    let hosts = cli.json(&["hosts"]).await;
    assert!(
        rows(&hosts).iter().any(|h| h.to_string().contains(HOST)),
        "{hosts}"
    );
    assert_eq!(cli.yaml(&["hosts"]).await, hosts);
    let host = cli.json(&["host", HOST]).await;
    assert!(host.to_string().contains(HOST), "{host}");
    assert!(cli.ok(&["host", HOST]).await.contains(HOST));

    // Components and GPUs, of one host and of all.
    let components = cli.json(&["components", HOST]).await;
    assert!(components.to_string().contains("talker"), "{components}");
    let all = cli.ok(&["components"]).await;
    assert!(all.contains("talker") && all.contains(HOST), "{all}");
    let gpus = cli.json(&["gpus", HOST]).await;
    assert_eq!(rows(&gpus).len(), 2, "{gpus}");
    let table = cli.ok(&["gpus"]).await;
    assert!(table.contains("H100"), "{table}");

    // Component commands reach `succeeded` (--wait exits 0 only then).
    for action in ["restart", "stop", "start"] {
        let out = cli
            .json(&[action, &format!("{HOST}/talker"), "--wait"])
            .await;
        assert_eq!(out["state"], "succeeded", "{action}: {out}");
    }
    let out = cli
        .json(&[
            "pulse",
            &format!("{HOST}/talker"),
            "--wait",
            "--budget",
            "60s",
        ])
        .await;
    assert_eq!(out["state"], "succeeded", "pulse: {out}");
    // Without --wait: the created command, in a table.
    let table = cli.ok(&["restart", &format!("{HOST}/talker")]).await;
    assert!(table.contains("restart"), "{table}");

    // Events: the commands left some; -f streams new ones (a restart makes them).
    let events = wait_for("events", || async {
        let v = cli.json(&["events", "--host", HOST]).await;
        (!rows(&v).is_empty()).then_some(v)
    })
    .await;
    assert!(events.to_string().contains(HOST), "{events}");
    assert!(cli.ok(&["events", "--limit", "5"]).await.contains("KIND"));
    // Restarts make events; the first may come before the stream is open, so restart
    // (every 2 s, at most 30 times) until the follow has shown two.
    let restarter = async {
        for _ in 0..30 {
            cli.ok(&["restart", &format!("{HOST}/talker")]).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    let follow = cli.stream_until(
        &["events", "-f", "-o", "json", "--host", HOST],
        "two events",
        |s| s.lines().filter(|l| l.starts_with('{')).count() >= 2,
    );
    let seen = tokio::select! {
        seen = follow => seen,
        () = restarter => panic!("events -f showed no two events over 30 restarts"),
    };
    for line in seen.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.to_string().contains(HOST), "{v}");
    }

    // Logs: a tail of N lines, then a follow.
    wait_for("talker ready again", || async {
        let c = cli.json(&["components", HOST]).await;
        rows(&c)
            .iter()
            .any(|r| r["name"] == "talker" && r["state"] == "ready")
            .then_some(())
    })
    .await;
    // The restarted talker writes a line every 0.2 s: wait until it has written three.
    let tail = wait_for("three lines of the restarted talker", || async {
        let tail = cli
            .ok(&["logs", &format!("{HOST}/talker"), "--tail", "3"])
            .await;
        (tail.lines().count() == 3).then_some(tail)
    })
    .await;
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 3, "{tail}");
    assert!(lines.iter().all(|l| l.starts_with("line-")), "{tail}");
    let followed = cli
        .stream_until(
            &["logs", &format!("{HOST}/talker"), "-f", "--tail", "1"],
            "five lines",
            |s| numbers(s).len() >= 5,
        )
        .await;
    let n = numbers(&followed);
    assert!(n.windows(2).all(|w| w[1] > w[0]), "{followed}");
    assert!(
        followed.lines().all(|l| l.starts_with("line-")),
        "{followed}"
    );
    let json = cli
        .stream_until(
            &["logs", &format!("{HOST}/talker"), "-f", "-o", "json"],
            "a JSON line",
            |s| s.lines().count() >= 2,
        )
        .await;
    for line in json.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["lines"].is_array(), "{v}");
    }

    // History: a sparkline, or points.
    let history = wait_for("GPU history", || async {
        let v = cli
            .json(&[
                "history",
                "razar_gpu_utilization_ratio",
                "--host",
                HOST,
                "--since",
                "1h",
            ])
            .await;
        v.to_string().contains("value").then_some(v)
    })
    .await;
    assert!(history.to_string().contains(HOST), "{history}");
    let spark = cli
        .ok(&[
            "history",
            "razar_gpu_utilization_ratio",
            "--host",
            HOST,
            "--since",
            "1h",
        ])
        .await;
    assert!(
        spark
            .chars()
            .any(|c| ('\u{2581}'..='\u{2588}').contains(&c)),
        "{spark}"
    );

    // Audit (admin only): the commands are there, with who did them.
    let out = cli.run(&["audit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        text(&out)
    );
    let (_, admin) = tokens::create(&fleet.pool, "live-admin", Role::Admin, None, None)
        .await
        .expect("admin token");
    let admin_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--server", &fleet.base, "--token", &admin]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let args = admin_args(&["audit", "-o", "json"]);
    let out = razar_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let audit: Value = serde_json::from_slice(&out.stdout).expect("audit JSON");
    assert!(audit.to_string().contains("live-ops"), "{audit}");
    assert!(audit.to_string().contains("commands"), "{audit}");
    let args = admin_args(&["audit", "--limit", "3"]);
    let out = razar_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("ROUTE"), "{}", text(&out));

    // Server and token from the environment, then from a config file.
    let env = [
        ("RAZAR_SERVER", fleet.base.as_str()),
        ("RAZAR_TOKEN", fleet.token.as_str()),
    ];
    let out = razar_env(&["hosts"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains(HOST));
    let file = fleet.path("cli.toml");
    std::fs::write(
        &file,
        format!(
            "server = {}\ntoken = {}\n",
            toml_str(&fleet.base),
            toml_str(&fleet.token)
        ),
    )
    .expect("cli.toml");
    let file_arg = file.to_string_lossy().into_owned();
    let out = razar_env(&["--config", &file_arg, "hosts"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains(HOST));
    let out = razar_env(&["hosts"], &[("RAZAR_CONFIG", &file_arg)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A flag beats the environment, which beats the file.
    let out = razar_env(
        &["--config", &file_arg, "--token", "not-a-token", "hosts"],
        &env,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // Errors: a bad token is a failure (1) with a readable message, no token too.
    let out = razar_env(
        &["--server", &fleet.base, "--token", "razar_bogus", "hosts"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("razar: ") && err.contains("401"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = razar_env(&["--server", &fleet.base, "hosts"], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Unknown host and unknown component: failures.
    let out = cli.run(&["host", "no-such-host"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        text(&out)
    );
    let out = cli
        .run(&["logs", &format!("{HOST}/no-such-component"), "--tail", "1"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Unreachable server: a failure naming it.
    let out = razar_env(
        &["--server", "http://127.0.0.1:9", "--token", "t", "hosts"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9"),
        "{}",
        text(&out)
    );
    // Usage: exit 2.
    for args in [
        &["frobnicate"][..],
        &["restart", "no-slash"],
        &["logs"],
        &["hosts", "-o", "xml"],
        &["history", "m", "--since", "soon"],
    ] {
        let out = cli.run(args).await;
        assert_eq!(out.status.code(), Some(2), "razar {args:?}: {}", text(&out));
        assert!(!out.stderr.is_empty(), "razar {args:?}: {}", text(&out));
    }
    let out = razar_env(&["--config", "/nonexistent/cli.toml", "hosts"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let bad = fleet.path("bad.toml");
    std::fs::write(&bad, "sever = \"x\"\n").expect("bad.toml");
    let out = razar_env(&["--config", &bad.to_string_lossy(), "hosts"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sever"),
        "{}",
        text(&out)
    );
    // --help and --version succeed.
    assert_eq!(razar_env(&["--help"], &[]).await.status.code(), Some(0));
    assert_eq!(razar_env(&["--version"], &[]).await.status.code(), Some(0));

    fleet.shutdown().await;
}
