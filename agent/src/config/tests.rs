//! Config tests: the committed example parses to what the code expects, and every kind
//! of mistake is reported, all at once, with its line and key.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("test.toml"), text.as_bytes())
}

/// (line, key, fragment of the reason) for every error.
fn check_errors(text: &str, expected: &[(usize, &str, &str)]) {
    let errors = match parse(text) {
        Ok(_) => panic!("expected errors, config was accepted"),
        Err(e) => e.0,
    };
    let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), expected.len(), "errors: {got:#?}");
    for (line, key, reason) in expected {
        assert!(
            errors
                .iter()
                .any(|e| e.line == *line && e.key == *key && e.reason.contains(reason)),
            "missing error line {line} key {key} reason ~{reason}; got {got:#?}"
        );
    }
}

#[test]
fn example_config_parses_and_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.profile, "core");
    assert_eq!(config.hash.len(), 64);
    let names: Vec<_> = config
        .active_components()
        .map(|c| c.name.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "redis",
            "model-server",
            "db-migrate",
            "gateway",
            "batch-reindex"
        ]
    );
    assert_eq!(
        config.component("db-migrate").unwrap().kind,
        ComponentKind::Oneshot
    );
    let model = config.component("model-server").unwrap();
    assert_eq!(model.depends_on[0].as_str(), "redis");
    assert_eq!(model.vram_policy, VramPolicy::Restart);
    assert_eq!(model.restart_policy, RestartPolicy::OnFailure);
    assert_eq!(model.give_up.max_failures.get(), 3);
    assert!(model.recovery_action.is_some() && model.give_up_hook.is_some());
    assert!(matches!(
        model.readiness.as_ref().unwrap().check,
        ProbeCheck::Http { .. }
    ));
    assert_eq!(model.logs.max_files.get(), 10);
    let gateway = config.component("gateway").unwrap();
    assert_eq!(gateway.logs.dir, PathBuf::from("/var/log/razar"));
    assert!(!config.component("batch-reindex").unwrap().autostart);
    assert_eq!(config.watches.len(), 2);
    assert!(matches!(config.gpu, GpuSettings::Nvml { .. }));
    assert!(config.collector.is_some());
}

#[test]
fn minimal_config_gets_defaults() {
    let config = parse("[[component]]\nname = \"a\"\ncommand = \"sleep\"\n").unwrap();
    let a = &config.components[0];
    assert_eq!(a.stop_signal, Signal::SIGTERM);
    assert_eq!(a.backoff.initial(), Duration::from_millis(100));
    assert!(a.autostart);
    assert_eq!(config.agent.listen.to_string(), "127.0.0.1:9464");
    assert_eq!(config.gpu, GpuSettings::None);
}

#[test]
fn initial_backoff_zero_is_allowed() {
    let config = parse(
        "[[component]]\nname = \"a\"\ncommand = \"sleep\"\n[component.restart]\ninitial_backoff = \"0s\"\nmax_backoff = \"0s\"\njitter = 0.0\n",
    )
    .unwrap();
    assert_eq!(config.components[0].backoff.delay(5, 0.5), Duration::ZERO);
}

#[test]
fn every_error_is_reported_at_once_with_its_line() {
    let text = r#"[agent]
profile = "core"
colour = "blue"
listen = "0.0.0.0:80"

[[component]]
name = "a"
command = "sleep"
depends_on = ["ghost"]
priority = "high"
stop_signal = "SIGNOPE"

[component.restart]
initial_backoff = "10s"
max_backoff = "1s"

[[component]]
name = "a"
command = "sleep"
restrat = {}

[[component]]
name = "b"
command = "x"
depends_on = ["c"]
[component.readiness]
kind = "smoke"
interval = "5 fortnights"

[[component]]
name = "c"
command = "x"
depends_on = ["b"]
"#;
    check_errors(
        text,
        &[
            (3, "agent.colour", "unknown field"),
            (4, "agent.listen", "loopback"),
            (9, "component[a].depends_on", "unknown dependency `ghost`"),
            (10, "component[a].priority", "invalid type"),
            (11, "component[a].stop_signal", "unknown signal"),
            (
                15,
                "component[a].restart.max_backoff",
                "below initial_backoff",
            ),
            (
                18,
                "component[a].name",
                "duplicate component name (first defined on line 7)",
            ),
            (20, "component[a].restrat", "unknown field"),
            (
                23,
                "component[b].depends_on",
                "dependency cycle: b -> c -> b",
            ),
            (27, "component[b].readiness.kind", "unknown probe kind"),
            (
                28,
                "component[b].readiness.interval",
                "unknown duration unit",
            ),
        ],
    );
}

#[test]
fn missing_and_misplaced_values() {
    check_errors(
        "[[component]]\nname = \"bad name!\"\n\n[[component]]\ncommand = \"x\"\n[component.liveness]\nkind = \"http\"\n\n[collector]\naddress = \"c:1\"\n",
        &[
            (1, "component[bad name!].command", "is required"),
            (2, "component[bad name!].name", "not a valid component name"),
            (4, "component[#2].name", "is required"),
            (6, "component[#2].liveness.url", "is required"),
            (9, "collector.server_name", "is required"),
            (9, "collector.ca", "is required"),
            (9, "collector.cert", "is required"),
            (9, "collector.key", "is required"),
        ],
    );
}

#[test]
fn syntax_errors_name_the_line() {
    check_errors("[agent]\nprofile = \"core\n", &[(2, "", "TOML syntax")]);
}

#[test]
fn dependency_outside_the_profile_is_an_error() {
    check_errors(
        "[agent]\nprofile = \"core\"\n[[component]]\nname = \"v\"\ncommand = \"x\"\nprofiles = [\"vision\"]\n[[component]]\nname = \"a\"\ncommand = \"x\"\ndepends_on = [\"v\"]\n",
        &[(8, "component[a].depends_on", "not in profile `core`")],
    );
}

#[test]
fn garbage_never_panics() {
    for text in [
        "\u{0}",
        "[[component]]\n[[component]]",
        "component = 5",
        "[agent]\nagent = [1,2]",
        "a.b.c = 1",
    ] {
        assert!(parse(text).is_err(), "{text:?}");
    }
    assert!(Config::parse(Path::new("x"), &[0xff, 0xfe]).is_err());
}

#[test]
fn dcgm_hostname_label_is_a_checked_choice() {
    use razar_gpu::exposition::HostnameLabel;
    let config = parse("[gpu]\nsource = \"none\"\n").unwrap();
    assert_eq!(config.dcgm_hostname_label, HostnameLabel::Lower);
    let config = parse("[gpu]\ndcgm_hostname_label = \"Hostname\"\n").unwrap();
    assert_eq!(config.dcgm_hostname_label, HostnameLabel::Capitalized);
    check_errors(
        "[gpu]\ndcgm_hostname_label = \"host\"\n",
        &[(2, "gpu.dcgm_hostname_label", "must be \"hostname\"")],
    );
}

#[test]
fn command_records_and_follows_have_checked_bounds() {
    let config =
        parse("[agent]\ncommand_retention = \"2d\"\nlog_follow_limit = \"10m\"\n").unwrap();
    assert_eq!(
        config.agent.command_retention,
        Duration::from_secs(2 * 86400)
    );
    assert_eq!(config.agent.log_follow_limit, Duration::from_secs(600));
    let config = parse("[agent]\n").unwrap();
    assert_eq!(
        config.agent.command_retention,
        crate::commands::DEFAULT_RETENTION
    );
    check_errors(
        "[agent]\ncommand_retention = \"1s\"\nlog_follow_limit = \"0s\"\n",
        &[
            (2, "agent.command_retention", "at least 60s"),
            (3, "agent.log_follow_limit", "at least 1s"),
        ],
    );
}

#[test]
fn component_kind_is_service_or_oneshot_and_a_oneshot_takes_no_probe() {
    let config = parse(
        "[[component]]\nname = \"migrate\"\nkind = \"oneshot\"\ncommand = \"x\"\n[[component]]\nname = \"app\"\ncommand = \"x\"\n",
    )
    .unwrap();
    assert_eq!(config.components[0].kind, ComponentKind::Oneshot);
    assert_eq!(config.components[1].kind, ComponentKind::Service);
    check_errors(
        "[[component]]\nname = \"m\"\nkind = \"oneshot\"\ncommand = \"x\"\n[component.readiness]\nkind = \"exec\"\ncommand = [\"true\"]\n[[component]]\nname = \"n\"\nkind = \"daemon\"\ncommand = \"x\"\n",
        &[
            (5, "component[m].readiness", "takes no probe"),
            (10, "component[n].kind", "unknown component kind `daemon`"),
        ],
    );
}

#[test]
fn values_run_would_mishandle_are_refused() {
    check_errors(
        "[agent]\nsample_interval = \"1ns\"\n[collector]\naddress = \"collector-without-port\"\nserver_name = \"bad name\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
        &[
            (2, "agent.sample_interval", "unknown duration unit"),
            (4, "collector.address", "not host:port"),
            (5, "collector.server_name", "not a DNS name"),
        ],
    );
    check_errors(
        "[agent]\nsample_interval = \"99ms\"\n",
        &[(2, "agent.sample_interval", "at least 100 ms")],
    );
    let config = parse("[agent]\nsample_interval = \"100ms\"\n").unwrap();
    assert_eq!(config.agent.sample_interval, MIN_SAMPLE_INTERVAL);
}

#[test]
fn load_checked_opens_every_named_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not PEM at all").unwrap();
    let path = dir.path().join("agent.toml");
    let text = format!(
        "[collector]\naddress = \"c:7443\"\nserver_name = \"c\"\nca = \"{0}/missing-ca.pem\"\ncert = \"{1}\"\nkey = \"{1}\"\n[gpu]\nsource = \"scenario\"\nscenario = \"{0}/missing.toml\"\n",
        dir.path().display(),
        junk.display()
    );
    std::fs::write(&path, &text).unwrap();
    // The values alone are fine: `load` does not open the files.
    Config::load(&path).unwrap();
    let errors = Config::load_checked(&path).unwrap_err().0;
    let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        [
            (4, "collector.ca"),
            (5, "collector.cert"),
            (6, "collector.key"),
            (9, "gpu.scenario"),
        ],
        "{errors:#?}"
    );
    assert!(errors[0].reason.contains("No such file"), "{errors:#?}");
    assert!(
        errors[1].reason.contains("no CERTIFICATE block"),
        "{errors:#?}"
    );
    assert!(
        errors[2].reason.contains("no PRIVATE KEY block"),
        "{errors:#?}"
    );
}

#[test]
fn probe_keys_of_another_probe_kind_are_errors_not_ignored() {
    check_errors(
        "[[component]]\nname = \"a\"\ncommand = \"x\"\n[component.readiness]\nkind = \"exec\"\ncommand = [\"false\"]\nurl = \"http://x/\"\n[component.liveness]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\naddress = \"127.0.0.1:1\"\ncommand = [\"true\"]\n",
        &[
            (7, "component[a].readiness.url", "not used by a exec probe"),
            (11, "component[a].liveness.address", "not used by a http probe"),
            (12, "component[a].liveness.command", "not used by a http probe"),
        ],
    );
}

#[test]
fn a_service_revision_digests_the_spec_as_before_the_kind_key() {
    use sha2::Digest as _;
    let config = parse("[[component]]\nname = \"a\"\ncommand = \"sleep\"\n").unwrap();
    let a = &config.components[0];
    let mut unlabelled = a.clone();
    unlabelled.revision = String::new();
    let text = format!("{unlabelled:?}");
    assert!(text.ends_with(", kind: Service }"), "{text}");
    // The spec's text as it was before `kind` existed: existing revisions hold, and
    // an agent upgrade does not restart every component for a changed revision.
    let before = text.replace(", kind: Service }", " }");
    let digest = hex::encode(sha2::Sha256::digest(before.as_bytes()));
    assert_eq!(a.revision, digest[..12]);
    let oneshot =
        parse("[[component]]\nname = \"a\"\nkind = \"oneshot\"\ncommand = \"sleep\"\n").unwrap();
    assert_ne!(oneshot.components[0].revision, a.revision);
}
