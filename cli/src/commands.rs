//! Each subcommand: its request, and how its answer is shown.

use crate::args::{Cli, Command, ComponentCommand, EventsArgs, HistoryArgs, RolloutAction};
use crate::client::{Client, ClientError, SseEvent};
use crate::output::{self, col, Column, Format};
use crate::settings::Settings;
use serde_json::{json, Value};
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long `--wait` waits for a command's result.
const WAIT_FOR_RESULT: Duration = Duration::from_secs(120);
/// Width of a history sparkline.
const SPARK_WIDTH: usize = 60;

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The arguments are wrong in a way clap cannot see (exit 2).
    Usage(String),
    /// Anything else (exit 1).
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Failed(e)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Failed(e.into())
    }
}

const HOSTS: [Column; 5] = [
    col("HOST", "host|host_id|id"),
    col("STATE", "state"),
    col("LAST SEEN", "last_seen"),
    col("AGENT", "agent_version"),
    col("PROFILE", "profile"),
];
const COMPONENTS: [Column; 6] = [
    col("HOST", "host|host_id"),
    col("COMPONENT", "name|component"),
    col("STATE", "state"),
    col("REVISION", "revision"),
    col("CRITICAL", "critical"),
    col("SINCE", "updated_at|since"),
];
const GPUS: [Column; 9] = [
    col("HOST", "host|host_id"),
    col("GPU", "index|gpu_index|gpu"),
    col("MODEL", "name|model"),
    col(
        "UTIL",
        "utilization|utilization_ratio|values/utilization|live/utilization",
    ),
    col(
        "MEM USED",
        "memory_used_bytes|values/memory_used_bytes|live/memory_used_bytes",
    ),
    col("MEM TOTAL", "memory_total_bytes"),
    col(
        "TEMP",
        "temperature_celsius|values/temperature_celsius|live/temperature_celsius",
    ),
    col("POWER", "power_watts|values/power_watts|live/power_watts"),
    col(
        "HEALTH",
        "health_state|health/state|health|quarantine|state",
    ),
];
const EVENTS: [Column; 7] = [
    col("ID", "id|event_id"),
    col("TIME", "ts|time"),
    col("HOST", "host|host_id"),
    col("SEVERITY", "severity"),
    col("KIND", "kind"),
    col("SUBJECT", "subject_id|subject|component"),
    col("MESSAGE", "message"),
];
const ESCALATIONS: [Column; 7] = [
    col("ID", "id|escalation_id"),
    col("SEVERITY", "severity"),
    col("STATE", "state|status"),
    col("HOST", "host|host_id|scope"),
    col("SUBJECT", "subject|component|subject_id"),
    col("OPENED", "opened_at|created_at"),
    col("TITLE", "title|summary|message"),
];
const DEPLOYMENTS: [Column; 6] = [
    col("ID", "id|deployment_id"),
    col("COMPONENT", "component"),
    col("REVISION", "revision/version|revision|version"),
    col("STATE", "state|status"),
    col("PROGRESS", "progress|current_wave|wave"),
    col("CREATED", "created_at"),
];
const DECISIONS: [Column; 6] = [
    col("ID", "id|decision_id"),
    col("TIME", "ts|created_at|at"),
    col("RULE", "rule|rule_id"),
    col("HOST", "host|host_id|scope"),
    col("SUBJECT", "subject|component|gpu"),
    col("SUMMARY", "summary|reason|actions"),
];
const AUDIT: [Column; 7] = [
    col("TIME", "ts|at|created_at"),
    col("WHO", "who|actor|token_name|token"),
    col("ROLE", "role"),
    col("ROUTE", "route|action"),
    col("RESULT", "result|status"),
    col("REQUEST", "request_id"),
    col("ARGS", "arguments|args"),
];
const CHECKS: [Column; 3] = [
    col("CHECK", "name"),
    col("OK", "ok"),
    col("DETAIL", "detail"),
];

pub fn run(cli: &Cli, settings: &Settings) -> Result<(), Failure> {
    let format = cli.output;
    if let Command::Config = cli.command {
        let value = json!({
            "server": settings.server,
            "server_from": settings.server_from.as_str(),
            "token": if settings.token.is_some() { "set" } else { "not set" },
            "token_from": settings.token_from.as_str(),
            "cert": settings.tls.identity.as_ref().map(|(c, _)| c.display().to_string()),
            "ca": settings.tls.ca.as_ref().map(|c| c.display().to_string()),
        });
        print(&output::one(&value, format));
        return Ok(());
    }
    let client = Client::with_tls(&settings.server, settings.token.clone(), &settings.tls)?;
    match &cli.command {
        Command::Config => {}
        Command::Health => {
            let health = client.get(&["health"], &[])?;
            match format {
                Format::Table => {
                    print(&format!(
                        "status: {}\n",
                        output::cell(output::field(&health, "status"))
                    ));
                    let checks = health.get("checks").cloned().unwrap_or(Value::Null);
                    print(&output::table(&checks, &CHECKS));
                }
                _ => print(&output::one(&health, format)),
            }
        }
        Command::Hosts => print(&output::list(&client.get(&["hosts"], &[])?, format, &HOSTS)),
        Command::Host { host } => print(&output::one(&client.get(&["hosts", host], &[])?, format)),
        Command::Components { host } => {
            let rows = per_host(&client, host.as_deref(), "components")?;
            print(&output::list(&rows, format, &COMPONENTS));
        }
        Command::Gpus { host } => {
            let rows = per_host(&client, host.as_deref(), "gpus")?;
            print(&output::list(&rows, format, &GPUS));
        }
        Command::Events(args) if args.follow => follow_events(&client, args, format)?,
        Command::Events(args) => {
            let page = client.get(&["events"], &event_query(args))?;
            print(&output::list(&page, format, &EVENTS));
            if format == Format::Table {
                if let Some(next) = output::field(&page, "next_cursor|cursor") {
                    eprintln!("more: --cursor {}", output::cell(Some(next)));
                }
            }
        }
        Command::Escalations { state } => {
            let query: Vec<(&str, String)> = state.iter().map(|s| ("state", s.clone())).collect();
            let list = client.get(&["escalations"], &query)?;
            print(&output::list(&list, format, &ESCALATIONS));
        }
        Command::Ack(a) => {
            let answer = client.post(&["escalations", &a.id, "ack"], &json!({"note": a.note}))?;
            print(&output::one(&answer, format));
        }
        Command::Resolve(a) => {
            let answer =
                client.post(&["escalations", &a.id, "resolve"], &json!({"note": a.note}))?;
            print(&output::one(&answer, format));
        }
        Command::Restart(c) => command(&client, c, format, "restart", json!({}))?,
        Command::Stop(c) => command(&client, c, format, "stop", json!({}))?,
        Command::Start(c) => command(&client, c, format, "start", json!({}))?,
        Command::Pulse { target, budget } => {
            let budget_ms = u64::try_from(budget.as_millis())
                .map_err(|_| Failure::Usage(format!("--budget {budget:?} is too long")))?;
            command(
                &client,
                target,
                format,
                "pulse",
                json!({ "budget_ms": budget_ms }),
            )?
        }
        Command::Inspect { id } => {
            print(&output::one(&client.get(&["commands", id], &[])?, format))
        }
        Command::Logs {
            target,
            follow,
            tail,
        } => logs(&client, target, *follow, *tail, format)?,
        Command::History(args) => history(&client, args, format)?,
        Command::Deploy { file } => {
            let spec = read_spec(file)?;
            print(&output::one(&client.post(&["deployments"], &spec)?, format));
        }
        Command::Rollout { action } => match action {
            RolloutAction::Status { deployment: None } => {
                let list = client.get(&["deployments"], &[])?;
                print(&output::list(&list, format, &DEPLOYMENTS));
            }
            RolloutAction::Status {
                deployment: Some(id),
            } => print(&output::one(
                &client.get(&["deployments", id], &[])?,
                format,
            )),
            RolloutAction::Pause { deployment } => {
                deployment_action(&client, deployment, "pause", format)?
            }
            RolloutAction::Resume { deployment } => {
                deployment_action(&client, deployment, "resume", format)?
            }
            RolloutAction::Promote { deployment } => {
                deployment_action(&client, deployment, "promote", format)?
            }
        },
        Command::Rollback { deployment } => {
            deployment_action(&client, deployment, "rollback", format)?
        }
        Command::Decisions { limit } => {
            let query: Vec<(&str, String)> =
                limit.iter().map(|l| ("limit", l.to_string())).collect();
            let list = client.get(&["decisions"], &query)?;
            print(&output::list(&list, format, &DECISIONS));
        }
        Command::Why { decision } => print(&output::one(
            &client.get(&["decisions", decision], &[])?,
            format,
        )),
        Command::Audit { limit } => {
            let query: Vec<(&str, String)> =
                limit.iter().map(|l| ("limit", l.to_string())).collect();
            print(&output::list(
                &client.get(&["audit"], &query)?,
                format,
                &AUDIT,
            ));
        }
    }
    Ok(())
}

/// Writes to stdout; a closed pipe (`razar hosts | head`) ends quietly.
fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// `HOST/COMPONENT`.
pub fn split_target(target: &str) -> Result<(&str, &str), Failure> {
    match target.split_once('/') {
        Some((host, component)) if !host.is_empty() && !component.is_empty() => {
            Ok((host, component))
        }
        _ => Err(Failure::Usage(format!(
            "{target:?}: expected HOST/COMPONENT, e.g. gpu-17/trainer"
        ))),
    }
}

/// One host's `what` (`components`, `gpus`), or every host's, each row with its host.
fn per_host(client: &Client, host: Option<&str>, what: &str) -> Result<Value, Failure> {
    let hosts: Vec<String> = match host {
        Some(h) => vec![h.to_owned()],
        None => {
            let list = client.get(&["hosts"], &[])?;
            output::rows(&list)
                .into_iter()
                .filter_map(|h| output::field(h, "host|host_id|id"))
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect()
        }
    };
    let mut all = Vec::new();
    for host in &hosts {
        let answer = client.get(&["hosts", host, what], &[])?;
        for row in output::rows(&answer) {
            let mut row = row.clone();
            if let Value::Object(o) = &mut row {
                o.entry("host")
                    .or_insert_with(|| Value::String(host.clone()));
            }
            all.push(row);
        }
    }
    Ok(Value::Array(all))
}

fn event_query(args: &EventsArgs) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(h) = &args.host {
        q.push(("host", h.clone()));
    }
    if let Some(k) = &args.kind {
        q.push(("kind", k.clone()));
    }
    if let Some(s) = &args.severity {
        q.push(("severity", s.clone()));
    }
    if let Some(since) = args.since {
        q.push(("since", ago(since)));
    }
    if let Some(l) = args.limit {
        q.push(("limit", l.to_string()));
    }
    if let Some(c) = &args.cursor {
        q.push(("cursor", c.clone()));
    }
    q
}

/// `now - d` in RFC 3339 (UTC); the epoch for a duration beyond it.
fn ago(d: Duration) -> String {
    let now = chrono::Utc::now();
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::UNIX_EPOCH)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One streamed item: a line in a table, a JSON line, or a YAML document.
fn print_streamed(event: &SseEvent, format: Format, columns: &[Column]) {
    let value: Value =
        serde_json::from_str(&event.data).unwrap_or_else(|_| Value::String(event.data.clone()));
    let text = match format {
        Format::Json => format!("{value}\n"),
        Format::Yaml => format!("---\n{}", serde_yaml::to_string(&value).unwrap_or_default()),
        Format::Table if value.is_object() => {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| output::cell(output::field(&value, c.path)))
                .collect();
            format!("{}\n", cells.join("  "))
        }
        Format::Table => format!("{}\n", event.data),
    };
    print(&text);
}

/// `events -f`: the live stream, resumed from the last id after a broken connection
/// (the API resumes with no gap and no duplicate).
fn follow_events(client: &Client, args: &EventsArgs, format: Format) -> Result<(), Failure> {
    let query = event_query(args);
    let mut last: Option<String> = None;
    let mut delay = Duration::from_millis(500);
    loop {
        let mut each = |event: SseEvent| {
            print_streamed(&event, format, &EVENTS);
            ControlFlow::Continue(())
        };
        match client.stream(&["events", "stream"], &query, last.as_deref(), &mut each) {
            Ok(seen) => {
                last = seen;
                delay = Duration::from_millis(500);
            }
            // The API refused: retrying will not help.
            Err(e @ ClientError::Api { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("razar: {e}; reconnecting in {delay:?}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn logs(
    client: &Client,
    target: &str,
    follow: bool,
    tail: u32,
    format: Format,
) -> Result<(), Failure> {
    let (host, component) = split_target(target)?;
    let query = [("lines", tail.to_string()), ("follow", follow.to_string())];
    let mut end: Option<String> = None;
    let mut each = |event: SseEvent| {
        if event.event.as_deref() == Some("end") {
            end = Some(event.data);
            return ControlFlow::Break(());
        }
        match format {
            Format::Table => {
                for line in log_lines(&event.data) {
                    print(&format!("{line}\n"));
                }
            }
            _ => print_streamed(&event, format, &[]),
        }
        ControlFlow::Continue(())
    };
    client.stream(
        &["hosts", host, "components", component, "logs"],
        &query,
        None,
        &mut each,
    )?;
    match end.as_deref().and_then(tail_failure) {
        Some(why) => Err(anyhow::anyhow!("log tail of {target} {why}").into()),
        None => Ok(()),
    }
}

/// The text lines of one `log` event (`{stream, lines}`); other data as sent.
fn log_lines(data: &str) -> Vec<String> {
    match serde_json::from_str::<Value>(data) {
        Ok(v) => match v.get("lines").and_then(Value::as_array) {
            Some(lines) => lines
                .iter()
                .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_owned))
                .collect(),
            None => vec![data.to_owned()],
        },
        Err(_) => vec![data.to_owned()],
    }
}

/// Why a tail failed, from its `end` event (`failed: ...`, `expired: ...`); `None` when it
/// ended normally.
fn tail_failure(end: &str) -> Option<&str> {
    (end.starts_with("failed") || end.starts_with("expired")).then_some(end)
}

fn history(client: &Client, args: &HistoryArgs, format: Format) -> Result<(), Failure> {
    let mut query = vec![
        ("metric", args.metric.clone()),
        ("from", ago(args.since)),
        ("to", ago(Duration::ZERO)),
        ("points", args.points.to_string()),
    ];
    if let Some(h) = &args.host {
        query.push(("host", h.clone()));
    }
    let answer = client.get(&["history"], &query)?;
    let text = output::serialized(&answer, format)
        .unwrap_or_else(|| output::history_table(&answer, SPARK_WIDTH));
    print(&text);
    Ok(())
}

/// Submits a component command; with `--wait`, polls it until it is settled.
fn command(
    client: &Client,
    c: &ComponentCommand,
    format: Format,
    kind: &str,
    fields: Value,
) -> Result<(), Failure> {
    let (host, component) = split_target(&c.target)?;
    let mut body = json!({"host": host, "action": action_body(kind, component, fields)});
    if let (Some(key), Value::Object(o)) = (&c.idempotency_key, &mut body) {
        o.insert("idempotency_key".into(), Value::String(key.clone()));
    }
    let created = client.post(&["commands"], &body)?;
    if !c.wait {
        print(&output::one(&created, format));
        return Ok(());
    }
    let id = output::field(&created, "id|command_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("the API did not return the command's id"))?;
    let deadline = Instant::now() + WAIT_FOR_RESULT;
    let settled = loop {
        let now = client.get(&["commands", &id], &[])?;
        let state = output::field(&now, "state|status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if matches!(state.as_str(), "succeeded" | "failed" | "expired") {
            break (now, state);
        }
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "command {id} not settled after {WAIT_FOR_RESULT:?} (state {state:?})"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    print(&output::one(&settled.0, format));
    if settled.1 == "succeeded" {
        Ok(())
    } else {
        let message = output::cell(output::field(&settled.0, "message"));
        Err(anyhow::anyhow!("command {id} {}: {message}", settled.1).into())
    }
}

/// The API's action object: `{"kind": KIND, "component": C, ...fields}`.
fn action_body(kind: &str, component: &str, fields: Value) -> Value {
    let mut action = json!({ "kind": kind, "component": component });
    if let (Value::Object(a), Value::Object(f)) = (&mut action, fields) {
        a.extend(f);
    }
    action
}

fn deployment_action(
    client: &Client,
    id: &str,
    action: &str,
    format: Format,
) -> Result<(), Failure> {
    let answer = client.post(&["deployments", id, action], &json!({}))?;
    print(&output::one(&answer, format));
    Ok(())
}

/// A deployment spec from JSON, YAML or TOML (by extension; JSON otherwise).
fn read_spec(path: &Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let parsed = match ext.as_str() {
        "yaml" | "yml" => serde_yaml::from_str::<Value>(&text).map_err(|e| e.to_string()),
        "toml" => toml::from_str::<Value>(&text).map_err(|e| e.to_string()),
        _ => serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_tagged_by_kind_as_the_api_takes_them() {
        assert_eq!(
            action_body("pulse", "trainer", json!({"budget_ms": 5000})),
            json!({"kind": "pulse", "component": "trainer", "budget_ms": 5000})
        );
        assert_eq!(
            action_body("restart", "trainer", json!({})),
            json!({"kind": "restart", "component": "trainer"})
        );
    }

    #[test]
    fn log_events_show_their_lines_and_failed_ends_are_failures() {
        assert_eq!(
            log_lines(r#"{"stream":"stdout","lines":["a","b c"]}"#),
            ["a", "b c"]
        );
        assert_eq!(log_lines("not json"), ["not json"]);
        assert_eq!(tail_failure("tail ended"), None);
        assert!(tail_failure("failed: no logs for component `x`").is_some());
        assert!(tail_failure("expired: ").is_some());
    }

    #[test]
    fn targets_are_host_slash_component() {
        assert!(matches!(
            split_target("gpu-1/trainer"),
            Ok(("gpu-1", "trainer"))
        ));
        assert!(matches!(split_target("gpu-1/a/b"), Ok(("gpu-1", "a/b"))));
        for bad in ["gpu-1", "/trainer", "gpu-1/", ""] {
            assert!(matches!(split_target(bad), Err(Failure::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn specs_read_in_three_formats() {
        let dir = tempfile::tempdir().expect("dir");
        let expected = json!({"component": "trainer", "waves": [1, 5]});
        for (name, text) in [
            ("d.json", r#"{"component":"trainer","waves":[1,5]}"#),
            ("d.yaml", "component: trainer\nwaves: [1, 5]\n"),
            ("d.toml", "component = \"trainer\"\nwaves = [1, 5]\n"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            assert_eq!(read_spec(&path).ok(), Some(expected.clone()), "{name}");
        }
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").expect("write");
        assert!(matches!(read_spec(&bad), Err(Failure::Usage(_))));
    }
}
