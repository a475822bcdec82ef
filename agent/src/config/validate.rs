//! From raw to typed: parse the document (keeping going past unknown keys and wrong
//! types so every one is reported), then check values, names, dependencies and cycles.

use super::document::parse_document;
use super::error::Collector;
use super::files::{check_files, FileKind, FileRef};
use super::raw::{RawComponent, RawConfig, RawLogs, RawProbe, S};
use super::units::{parse_bytes, parse_duration};
use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use toml::Spanned;

const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/razar-agent";

pub(super) fn validate(
    path: &Path,
    text: &str,
    hash: String,
    check: Files,
) -> Result<Config, ConfigErrors> {
    let mut c = Collector::new(path, text);
    let mut files = Vec::new();
    let raw = parse_document::<RawConfig>(text, &mut c);
    let config = raw.and_then(|raw| build(raw, text, hash, path, &mut c, &mut files));
    if check == Files::Check {
        check_named_files(config.as_ref(), &files, &mut c);
    }
    c.finish(config)
}

/// Opens and parses every file the config names, then builds the collector link's TLS
/// configuration from them as the uplink will (a key that does not match its
/// certificate shows only then).
fn check_named_files(config: Option<&Config>, files: &[FileRef], c: &mut Collector<'_>) {
    let all_usable = check_files(files, c);
    let link = config.and_then(|config| config.collector.as_ref());
    if let (true, Some(link)) = (all_usable, link) {
        let tls = razar_shared::tls::ClientTlsFiles {
            ca: link.ca.clone(),
            cert: link.cert.clone(),
            key: link.key.clone(),
        };
        if let Err(e) = razar_shared::tls::client_config_from_files(&tls) {
            let span = files
                .iter()
                .find(|f| f.key == "collector.key")
                .and_then(|f| f.span.clone());
            c.push(span, "collector.key", e.to_string());
        }
    }
}

/// A `host:port` the uplink can resolve: a host and a port from 1 to 65535.
fn check_address(address: &str) -> Result<(), String> {
    let valid = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if address.is_empty() || valid {
        Ok(())
    } else {
        Err(format!(
            "`{address}` is not host:port (e.g. collector.example.net:7443)"
        ))
    }
}

/// Key paths are `component[NAME].field`.
fn at(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

struct Ctx<'c, 'a> {
    c: &'c mut Collector<'a>,
}

impl Ctx<'_, '_> {
    fn err(&mut self, span: Range<usize>, key: String, reason: impl Into<String>) {
        self.c.push(Some(span), key, reason);
    }

    fn duration(&mut self, v: &S<String>, key: String, default: Duration) -> Duration {
        match v {
            None => default,
            Some(v) => match parse_duration(v.get_ref()) {
                Ok(d) => d,
                Err(reason) => {
                    self.err(v.span(), key, reason);
                    default
                }
            },
        }
    }

    fn bytes(&mut self, v: &S<String>, key: String) -> Option<NonZeroU64> {
        let v = v.as_ref()?;
        match parse_bytes(v.get_ref()).map(NonZeroU64::new) {
            Ok(Some(n)) => Some(n),
            Ok(None) => {
                self.err(v.span(), key, "must be greater than zero");
                None
            }
            Err(reason) => {
                self.err(v.span(), key, reason);
                None
            }
        }
    }

    fn count(&mut self, v: &S<i64>, key: String, default: u32) -> NonZeroU32 {
        let fallback = NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN);
        let Some(v) = v else { return fallback };
        match u32::try_from(*v.get_ref()).ok().and_then(NonZeroU32::new) {
            Some(n) => n,
            None => {
                self.err(
                    v.span(),
                    key,
                    format!("must be a whole number from 1 to {}", u32::MAX),
                );
                fallback
            }
        }
    }

    fn argv(&mut self, v: &Option<Spanned<Vec<String>>>, key: String) -> Option<Argv> {
        let v = v.as_ref()?;
        match v.get_ref().split_first() {
            Some((program, args)) if !program.is_empty() => Some(Argv {
                program: program.clone(),
                args: args.to_vec(),
            }),
            _ => {
                self.err(
                    v.span(),
                    key,
                    "must be a non-empty list: [program, args...]",
                );
                None
            }
        }
    }
}

fn build(
    raw: RawConfig,
    text: &str,
    hash: String,
    path: &Path,
    c: &mut Collector<'_>,
    files: &mut Vec<FileRef>,
) -> Option<Config> {
    let mut x = Ctx { c };
    let whole = 0..0;

    let agent_raw = raw.agent.map(|a| a.into_inner()).unwrap_or_default();
    let profile = match &agent_raw.profile {
        Some(p) if p.get_ref().trim().is_empty() => {
            x.err(p.span(), "agent.profile".into(), "must not be empty");
            "default".to_owned()
        }
        Some(p) => p.get_ref().clone(),
        None => "default".to_owned(),
    };
    let listen = match &agent_raw.listen {
        None => DEFAULT_LISTEN.parse().ok(),
        Some(v) => match v.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                x.err(
                    v.span(),
                    "agent.listen".into(),
                    "must be a loopback address (local endpoints only)",
                );
                None
            }
            Err(e) => {
                x.err(
                    v.span(),
                    "agent.listen".into(),
                    format!("not an ip:port address: {e}"),
                );
                None
            }
        },
    };
    let data_dir = PathBuf::from(
        agent_raw
            .data_dir
            .as_ref()
            .map_or(DEFAULT_DATA_DIR, |d| d.get_ref().as_str()),
    );
    let control_socket = agent_raw.control_socket.as_ref().map_or_else(
        || data_dir.join(super::CONTROL_SOCKET),
        |p| PathBuf::from(p.get_ref()),
    );
    // sockaddr_un holds 108 bytes, the terminating NUL included.
    if control_socket.as_os_str().len() > 107 {
        let (span, key) = match &agent_raw.control_socket {
            Some(v) => (Some(v.span()), "agent.control_socket"),
            None => (
                agent_raw.data_dir.as_ref().map(|d| d.span()),
                "agent.data_dir",
            ),
        };
        x.c.push(
            span,
            key.to_owned(),
            format!(
                "the control socket path {} is longer than the 107 bytes a unix socket allows",
                control_socket.display()
            ),
        );
    }
    let control_group = agent_raw.control_group.as_ref().and_then(|g| {
        match nix::unistd::Group::from_name(g.get_ref()) {
            Ok(Some(group)) => Some((g.get_ref().clone(), group.gid.as_raw())),
            Ok(None) => {
                x.err(
                    g.span(),
                    "agent.control_group".into(),
                    format!("no group named `{}` on this host", g.get_ref()),
                );
                None
            }
            Err(e) => {
                x.err(
                    g.span(),
                    "agent.control_group".into(),
                    format!("cannot look the group up: {e}"),
                );
                None
            }
        }
    });
    let command_retention = x.duration(
        &agent_raw.command_retention,
        "agent.command_retention".into(),
        crate::commands::DEFAULT_RETENTION,
    );
    let log_follow_limit = x.duration(
        &agent_raw.log_follow_limit,
        "agent.log_follow_limit".into(),
        crate::commands::DEFAULT_FOLLOW_LIMIT,
    );
    let at_least = |x: &mut Ctx<'_, '_>, value: &S<String>, got: Duration, key: &str, secs: u64| {
        if let Some(v) = value {
            if got < Duration::from_secs(secs) {
                x.err(
                    v.span(),
                    key.to_owned(),
                    format!("must be at least {secs}s"),
                );
            }
        }
    };
    at_least(
        &mut x,
        &agent_raw.command_retention,
        command_retention,
        "agent.command_retention",
        60,
    );
    at_least(
        &mut x,
        &agent_raw.log_follow_limit,
        log_follow_limit,
        "agent.log_follow_limit",
        1,
    );
    let sample_interval = x.duration(
        &agent_raw.sample_interval,
        "agent.sample_interval".into(),
        Duration::from_secs(1),
    );
    if sample_interval < MIN_SAMPLE_INTERVAL {
        if let Some(v) = &agent_raw.sample_interval {
            x.err(
                v.span(),
                "agent.sample_interval".into(),
                format!(
                    "must be at least {} ms (every tick samples the GPUs, the host and every \
                     component)",
                    MIN_SAMPLE_INTERVAL.as_millis()
                ),
            );
        }
    }
    let log_defaults = RawLogs {
        dir: agent_raw.log_dir.clone(),
        max_size: agent_raw.log_max_size.clone(),
        max_files: agent_raw.log_max_files.clone(),
    };
    let default_log_dir = match &log_defaults.dir {
        Some(d) => PathBuf::from(d.get_ref()),
        None => data_dir.join("logs"),
    };
    let default_log_size = x.bytes(&log_defaults.max_size, "agent.log_max_size".into());
    let spool_budget_bytes = x
        .bytes(&agent_raw.spool_budget, "agent.spool_budget".into())
        .map_or(DEFAULT_SPOOL_BUDGET_BYTES, NonZeroU64::get);
    let default_log_files = x.count(&log_defaults.max_files, "agent.log_max_files".into(), 5);

    let collector = raw.collector.map(|col| {
        let span = col.span();
        let col = col.into_inner();
        let mut need = |v: &S<String>, key: &str| -> String {
            match v {
                Some(v) if !v.get_ref().is_empty() => v.get_ref().clone(),
                Some(v) => {
                    x.c.push(
                        Some(v.span()),
                        format!("collector.{key}"),
                        "must not be empty",
                    );
                    String::new()
                }
                None => {
                    x.c.push(
                        Some(span.clone()),
                        format!("collector.{key}"),
                        "is required",
                    );
                    String::new()
                }
            }
        };
        let settings = CollectorSettings {
            address: need(&col.address, "address"),
            server_name: need(&col.server_name, "server_name"),
            ca: PathBuf::from(need(&col.ca, "ca")),
            cert: PathBuf::from(need(&col.cert, "cert")),
            key: PathBuf::from(need(&col.key, "key")),
        };
        if let Some(v) = &col.address {
            if let Err(reason) = check_address(v.get_ref()) {
                x.err(v.span(), "collector.address".into(), reason);
            }
        }
        if let Some(v) = &col.server_name {
            if !v.get_ref().is_empty()
                && rustls::pki_types::ServerName::try_from(v.get_ref().as_str()).is_err()
            {
                x.err(
                    v.span(),
                    "collector.server_name".into(),
                    "not a DNS name or IP address",
                );
            }
        }
        for (v, key, kind) in [
            (&col.ca, "collector.ca", FileKind::CaCertificates),
            (&col.cert, "collector.cert", FileKind::Certificates),
            (&col.key, "collector.key", FileKind::PrivateKey),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.get_ref().is_empty()) {
                files.push(FileRef::new(key, Some(v.span()), v.get_ref(), kind));
            }
        }
        settings
    });

    let mut dcgm_hostname_label = razar_gpu::exposition::HostnameLabel::default();
    if let Some(label) = raw
        .gpu
        .as_ref()
        .and_then(|g| g.get_ref().dcgm_hostname_label.as_ref())
    {
        match razar_gpu::exposition::HostnameLabel::parse(label.get_ref()) {
            Some(l) => dcgm_hostname_label = l,
            None => x.err(
                label.span(),
                "gpu.dcgm_hostname_label".into(),
                "must be \"hostname\" (dcgm-exporter's main branch) or \"Hostname\" (its releases up to 4.5.3-4.8.2)",
            ),
        }
    }
    let mut gpu_commands = GpuCommandSettings::default();
    if let Some(g) = raw.gpu.as_ref() {
        let g = g.get_ref();
        gpu_commands.reset_command = x.argv(&g.reset_command, "gpu.reset_command".into());
        gpu_commands.reset_timeout = x.duration(
            &g.reset_timeout,
            "gpu.reset_timeout".into(),
            DEFAULT_GPU_RESET_TIMEOUT,
        );
    }
    let gpu = match raw.gpu {
        None => GpuSettings::None,
        Some(g) => {
            let span = g.span();
            let g = g.into_inner();
            let source = g.source.as_ref().map(|s| (s.get_ref().as_str(), s.span()));
            match source {
                None | Some(("none", _)) => GpuSettings::None,
                Some(("nvml", _)) => {
                    // No file check: a host without the library (or the driver) runs
                    // without GPU telemetry and says why, as `run` does.
                    GpuSettings::Nvml {
                        library: g.nvml_library.map(|p| PathBuf::from(p.into_inner())),
                        kernel_log: g.kernel_log.map_or_else(
                            || PathBuf::from(DEFAULT_KERNEL_LOG),
                            |p| PathBuf::from(p.into_inner()),
                        ),
                    }
                }
                Some(("scenario", s)) => match g.scenario {
                    Some(p) => {
                        files.push(FileRef::new(
                            "gpu.scenario",
                            Some(p.span()),
                            p.get_ref(),
                            FileKind::GpuScenario,
                        ));
                        GpuSettings::Scenario {
                            path: PathBuf::from(p.into_inner()),
                        }
                    }
                    None => {
                        x.err(
                            s,
                            "gpu.scenario".into(),
                            "is required when source = \"scenario\"",
                        );
                        GpuSettings::None
                    }
                },
                Some((other, s)) => {
                    let _ = &span;
                    x.err(
                        s,
                        "gpu.source".into(),
                        format!("unknown source `{other}` (use nvml, scenario or none)"),
                    );
                    GpuSettings::None
                }
            }
        }
    };

    // Components.
    let mut components = Vec::new();
    let mut spans: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut dep_spans: Vec<(String, Spanned<String>)> = Vec::new();
    for (i, comp) in raw.component.into_iter().enumerate() {
        let span = comp.span();
        let revision_default = String::new();
        let comp = comp.into_inner();
        let label = match &comp.name {
            Some(n) => format!("component[{}]", n.get_ref()),
            None => format!("component[#{}]", i + 1),
        };
        let name = match &comp.name {
            None => {
                x.err(span.clone(), at(&label, "name"), "is required");
                None
            }
            Some(n) => match ComponentName::parse(n.get_ref()) {
                Ok(name) => {
                    if let Some(first) = spans.get(name.as_str()) {
                        let (line, _) = super::error::line_column(text, first.start);
                        x.err(
                            n.span(),
                            at(&label, "name"),
                            format!("duplicate component name (first defined on line {line})"),
                        );
                        None
                    } else {
                        spans.insert(name.as_str().to_owned(), n.span());
                        Some(name)
                    }
                }
                Err(reason) => {
                    x.err(n.span(), at(&label, "name"), reason);
                    None
                }
            },
        };
        for dep in comp.depends_on.iter().flatten() {
            dep_spans.push((label.clone(), dep.clone()));
        }
        let spec = component(
            &mut x,
            comp,
            &label,
            span,
            revision_default,
            &default_log_dir,
            default_log_size,
            default_log_files,
        );
        if let (Some(name), Some(mut spec)) = (name, spec) {
            if spec.logs.dir.as_os_str().is_empty() {
                spec.logs.dir = default_log_dir.clone();
            }
            spec.name = name;
            if spec.revision.is_empty() {
                // Default revision: a digest of the spec itself, so any change shows.
                let digest = hex::encode(Sha256::digest(revision_text(&spec).as_bytes()));
                spec.revision = digest.get(..12).unwrap_or("").to_owned();
            }
            components.push(spec);
        }
    }

    // Dependencies: known, not self, same profile, no cycles.
    for (label, dep) in &dep_spans {
        let key = at(label, "depends_on");
        match ComponentName::parse(dep.get_ref()) {
            Err(reason) => x.err(dep.span(), key, reason),
            Ok(d) if !spans.contains_key(d.as_str()) => {
                x.err(dep.span(), key, format!("unknown dependency `{d}`"));
            }
            Ok(_) => {}
        }
    }
    for spec in &components {
        let label = format!("component[{}]", spec.name);
        let span = spans
            .get(spec.name.as_str())
            .cloned()
            .unwrap_or(whole.clone());
        for dep in &spec.depends_on {
            if dep == &spec.name {
                x.err(
                    span.clone(),
                    at(&label, "depends_on"),
                    "a component cannot depend on itself",
                );
            } else if spec.runs_in(&profile) {
                if let Some(target) = components.iter().find(|c| &c.name == dep) {
                    if !target.runs_in(&profile) {
                        x.err(
                            span.clone(),
                            at(&label, "depends_on"),
                            format!("depends on `{dep}`, which is not in profile `{profile}`"),
                        );
                    }
                }
            }
        }
    }
    if let Some(cycle) = find_cycle(&components) {
        let first = cycle.first().cloned().unwrap_or_default();
        let span = spans.get(&first).cloned().unwrap_or(whole.clone());
        x.err(
            span,
            format!("component[{first}].depends_on"),
            format!("dependency cycle: {}", cycle.join(" -> ")),
        );
    }

    // Watched processes.
    let mut watches = Vec::new();
    let mut watch_names = BTreeSet::new();
    for (i, w) in raw.watch.into_iter().enumerate() {
        let span = w.span();
        let w = w.into_inner();
        let label = format!("watch[#{}]", i + 1);
        let name = match &w.name {
            Some(n) if !n.get_ref().is_empty() => {
                if !watch_names.insert(n.get_ref().clone()) {
                    x.err(n.span(), at(&label, "name"), "duplicate watch name");
                }
                Some(n.get_ref().clone())
            }
            _ => {
                x.err(span.clone(), at(&label, "name"), "is required");
                None
            }
        };
        let matcher = match (&w.match_name, &w.match_cmdline) {
            (Some(n), None) if !n.get_ref().is_empty() => {
                Some(WatchMatch::Name(n.get_ref().clone()))
            }
            (None, Some(m)) if !m.get_ref().is_empty() => {
                Some(WatchMatch::Cmdline(m.get_ref().clone()))
            }
            _ => {
                x.err(
                    span,
                    label.clone(),
                    "needs exactly one non-empty `match_name` or `match_cmdline`",
                );
                None
            }
        };
        if let (Some(name), Some(matcher)) = (name, matcher) {
            watches.push(WatchSpec { name, matcher });
        }
    }

    let listen = listen?;
    Some(Config {
        path: path.to_path_buf(),
        hash,
        agent: AgentSettings {
            host_id: agent_raw.host_id.map(|h| h.into_inner()),
            profile,
            data_dir,
            listen,
            sample_interval,
            control_socket,
            control_group,
            command_retention,
            log_follow_limit,
            spool_budget_bytes,
        },
        collector,
        gpu,
        dcgm_hostname_label,
        gpu_commands,
        components,
        watches,
        component_sources: BTreeMap::new(),
    })
}

#[allow(clippy::too_many_arguments)]
fn component(
    x: &mut Ctx<'_, '_>,
    comp: RawComponent,
    label: &str,
    span: Range<usize>,
    revision_default: String,
    default_log_dir: &Path,
    default_log_size: Option<NonZeroU64>,
    default_log_files: NonZeroU32,
) -> Option<ComponentSpec> {
    let _ = default_log_dir;
    let command = match &comp.command {
        Some(cmd) if !cmd.get_ref().is_empty() => Some(cmd.get_ref().clone()),
        Some(cmd) => {
            x.err(cmd.span(), at(label, "command"), "must not be empty");
            None
        }
        None => {
            x.err(span.clone(), at(label, "command"), "is required");
            None
        }
    };
    let priority = match &comp.priority {
        None => 0,
        Some(p) => match i32::try_from(*p.get_ref()) {
            Ok(p) => p,
            Err(_) => {
                x.err(
                    p.span(),
                    at(label, "priority"),
                    "out of range for a 32-bit integer",
                );
                0
            }
        },
    };
    let stop_signal = match &comp.stop_signal {
        None => Signal::SIGTERM,
        Some(s) => {
            let text = s.get_ref();
            let full = if text.starts_with("SIG") {
                text.clone()
            } else {
                format!("SIG{text}")
            };
            match full.parse::<Signal>() {
                Ok(sig) => sig,
                Err(_) => {
                    x.err(
                        s.span(),
                        at(label, "stop_signal"),
                        format!("unknown signal `{text}`"),
                    );
                    Signal::SIGTERM
                }
            }
        }
    };
    let stop_grace = x.duration(
        &comp.stop_grace,
        at(label, "stop_grace"),
        Duration::from_secs(10),
    );
    let memory_budget_bytes = x.bytes(&comp.memory_budget, at(label, "memory_budget"));
    let vram_budget_bytes = x.bytes(&comp.vram_budget, at(label, "vram_budget"));
    let vram_policy = match comp
        .vram_policy
        .as_ref()
        .map(|p| (p.get_ref().as_str(), p.span()))
    {
        None | Some(("event", _)) => VramPolicy::Event,
        Some(("restart", _)) => VramPolicy::Restart,
        Some((other, s)) => {
            x.err(
                s,
                at(label, "vram_policy"),
                format!("unknown policy `{other}` (use event or restart)"),
            );
            VramPolicy::Event
        }
    };
    if let (Some(p), None) = (&comp.vram_policy, &comp.vram_budget) {
        x.err(p.span(), at(label, "vram_policy"), "needs a `vram_budget`");
    }
    let recovery_action = x.argv(&comp.recovery_action, at(label, "recovery_action"));
    let give_up_hook = x.argv(&comp.give_up_hook, at(label, "give_up_hook"));
    let readiness = comp
        .readiness
        .as_ref()
        .and_then(|p| probe(x, p, &at(label, "readiness")));
    let liveness = comp
        .liveness
        .as_ref()
        .and_then(|p| probe(x, p, &at(label, "liveness")));

    let kind = match comp.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
        None | Some(("service", _)) => ComponentKind::Service,
        Some(("oneshot", _)) => ComponentKind::Oneshot,
        Some((other, s)) => {
            x.err(
                s,
                at(label, "kind"),
                format!("unknown component kind `{other}` (use service or oneshot)"),
            );
            ComponentKind::Service
        }
    };
    if kind == ComponentKind::Oneshot {
        // A one-shot is ready when it exits 0 and then has no process: a probe would
        // never run, and a budget never be checked. Refused rather than ignored.
        for (key, present) in [
            ("readiness", comp.readiness.as_ref().map(|p| p.span())),
            ("liveness", comp.liveness.as_ref().map(|p| p.span())),
        ] {
            if let Some(s) = present {
                x.err(
                    s,
                    at(label, key),
                    "a oneshot component is ready once it exits 0: it takes no probe",
                );
            }
        }
    }

    let restart = comp.restart.map(|r| r.into_inner()).unwrap_or_default();
    let rl = at(label, "restart");
    let restart_policy = match restart
        .policy
        .as_ref()
        .map(|p| (p.get_ref().as_str(), p.span()))
    {
        None | Some(("always", _)) => RestartPolicy::Always,
        Some(("on-failure", _)) => RestartPolicy::OnFailure,
        Some(("never", _)) => RestartPolicy::Never,
        Some((other, s)) => {
            x.err(
                s,
                at(&rl, "policy"),
                format!("unknown policy `{other}` (use always, on-failure or never)"),
            );
            RestartPolicy::Always
        }
    };
    let initial = x.duration(
        &restart.initial_backoff,
        at(&rl, "initial_backoff"),
        Duration::from_millis(100),
    );
    let max = x.duration(
        &restart.max_backoff,
        at(&rl, "max_backoff"),
        Duration::from_secs(30).max(initial),
    );
    let multiplier = restart.multiplier.as_ref().map_or(2.0, |m| *m.get_ref());
    let jitter = restart.jitter.as_ref().map_or(0.1, |j| *j.get_ref());
    let reset_after = x.duration(
        &restart.reset_after,
        at(&rl, "reset_after"),
        Duration::from_secs(60),
    );
    let backoff = match ExponentialBackoff::try_new(initial, max, multiplier, jitter, reset_after) {
        Ok(b) => Some(b),
        Err(e) => {
            use crate::supervisor::backoff::BackoffError as E;
            let (v, field) = match e {
                E::MaxBelowInitial { .. } => (
                    restart.max_backoff.as_ref().map(|v| v.span()),
                    "max_backoff",
                ),
                E::Multiplier(_) => (restart.multiplier.as_ref().map(|v| v.span()), "multiplier"),
                E::Jitter(_) => (restart.jitter.as_ref().map(|v| v.span()), "jitter"),
            };
            x.err(v.unwrap_or(span.clone()), at(&rl, field), e.to_string());
            None
        }
    };

    let give_up_raw = comp.give_up.map(|g| g.into_inner()).unwrap_or_default();
    let give_up = GiveUpRule {
        max_failures: x.count(
            &give_up_raw.max_failures,
            at(label, "give_up.max_failures"),
            5,
        ),
        window: x.duration(
            &give_up_raw.window,
            at(label, "give_up.window"),
            Duration::from_secs(300),
        ),
    };

    let logs_raw = comp.logs.map(|l| l.into_inner()).unwrap_or_default();
    let logs = LogSettings {
        // Empty: filled in by the caller with the agent-wide log dir.
        dir: logs_raw
            .dir
            .map(|d| PathBuf::from(d.into_inner()))
            .unwrap_or_default(),
        max_size_bytes: x
            .bytes(&logs_raw.max_size, at(label, "logs.max_size"))
            .or(default_log_size)
            .unwrap_or(NonZeroU64::new(10 << 20).unwrap_or(NonZeroU64::MIN)),
        max_files: match &logs_raw.max_files {
            Some(_) => x.count(&logs_raw.max_files, at(label, "logs.max_files"), 5),
            None => default_log_files,
        },
    };

    let mut profiles = Vec::new();
    for p in comp.profiles.iter().flatten() {
        if p.get_ref().trim().is_empty() {
            x.err(
                p.span(),
                at(label, "profiles"),
                "a profile name must not be empty",
            );
        } else {
            profiles.push(p.get_ref().clone());
        }
    }
    let mut gpus = Vec::new();
    for g in comp.gpus.iter().flatten() {
        match u32::try_from(*g.get_ref()) {
            Ok(index) if !gpus.contains(&index) => gpus.push(index),
            Ok(_) => x.err(g.span(), at(label, "gpus"), "listed twice"),
            Err(_) => x.err(
                g.span(),
                at(label, "gpus"),
                "a GPU index is a whole number from 0",
            ),
        }
    }
    let depends_on = comp
        .depends_on
        .iter()
        .flatten()
        .filter_map(|d| ComponentName::parse(d.get_ref()).ok())
        .collect();

    Some(ComponentSpec {
        name: ComponentName(String::new()),
        command: command?,
        args: comp.args.unwrap_or_default(),
        env: comp.env.unwrap_or_default(),
        working_dir: comp.working_dir.map(|d| PathBuf::from(d.into_inner())),
        user: comp.user.map(|u| u.into_inner()),
        depends_on,
        priority,
        profiles,
        gpus,
        autostart: comp.autostart.unwrap_or(true),
        critical: comp.critical.unwrap_or(false),
        revision: comp
            .revision
            .map(|r| r.into_inner())
            .unwrap_or(revision_default),
        stop_signal,
        stop_grace,
        memory_budget_bytes,
        vram_budget_bytes,
        vram_policy,
        recovery_action,
        give_up_hook,
        readiness,
        liveness,
        restart_policy,
        backoff: backoff?,
        give_up,
        logs,
        kind,
    })
}

fn probe(x: &mut Ctx<'_, '_>, p: &Spanned<RawProbe>, label: &str) -> Option<ProbeSpec> {
    let span = p.span();
    let p = p.get_ref();
    let check = match p.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
        None => {
            x.err(
                span.clone(),
                at(label, "kind"),
                "is required (http, tcp or exec)",
            );
            None
        }
        Some(("http", _)) => match &p.url {
            Some(u) if u.get_ref().starts_with("http://") => Some(ProbeCheck::Http {
                url: u.get_ref().clone(),
            }),
            Some(u) => {
                x.err(u.span(), at(label, "url"), "must start with http://");
                None
            }
            None => {
                x.err(
                    span.clone(),
                    at(label, "url"),
                    "is required for an http probe",
                );
                None
            }
        },
        Some(("tcp", _)) => match &p.address {
            Some(a)
                if a.get_ref()
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok()) =>
            {
                Some(ProbeCheck::Tcp {
                    address: a.get_ref().clone(),
                })
            }
            Some(a) => {
                x.err(a.span(), at(label, "address"), "must be host:port");
                None
            }
            None => {
                x.err(
                    span.clone(),
                    at(label, "address"),
                    "is required for a tcp probe",
                );
                None
            }
        },
        Some(("exec", _)) => match &p.command {
            Some(_) => x
                .argv(&p.command, at(label, "command"))
                .map(|argv| ProbeCheck::Exec { argv }),
            None => {
                x.err(
                    span.clone(),
                    at(label, "command"),
                    "is required for an exec probe",
                );
                None
            }
        },
        Some((other, s)) => {
            x.err(
                s,
                at(label, "kind"),
                format!("unknown probe kind `{other}` (use http, tcp or exec)"),
            );
            None
        }
    };
    // Keys of another probe kind would be silently ignored: refuse them.
    let kind_name = p.kind.as_ref().map(|k| k.get_ref().as_str());
    for (key, span, owner) in [
        ("url", p.url.as_ref().map(|v| v.span()), "http"),
        ("address", p.address.as_ref().map(|v| v.span()), "tcp"),
        ("command", p.command.as_ref().map(|v| v.span()), "exec"),
    ] {
        if let (Some(s), Some(k)) = (span, kind_name) {
            if k != owner && matches!(k, "http" | "tcp" | "exec") {
                x.err(
                    s,
                    at(label, key),
                    format!("is not used by a {k} probe (only by {owner})"),
                );
            }
        }
    }
    let interval = x.duration(&p.interval, at(label, "interval"), Duration::from_secs(1));
    if interval.is_zero() {
        if let Some(v) = &p.interval {
            x.err(v.span(), at(label, "interval"), "must be greater than zero");
        }
    }
    let timeout = x.duration(&p.timeout, at(label, "timeout"), Duration::from_secs(1));
    if timeout.is_zero() {
        if let Some(v) = &p.timeout {
            x.err(v.span(), at(label, "timeout"), "must be greater than zero");
        }
    }
    Some(ProbeSpec {
        check: check?,
        interval,
        timeout,
        failure_threshold: x.count(&p.failure_threshold, at(label, "failure_threshold"), 3),
        success_threshold: x.count(&p.success_threshold, at(label, "success_threshold"), 1),
        start_period: x.duration(&p.start_period, at(label, "start_period"), Duration::ZERO),
    })
}

/// The text the default revision digests: the spec's `Debug` form, without the
/// `kind` field for a service, so that revisions did not change when the key came in.
fn revision_text(spec: &ComponentSpec) -> String {
    let text = format!("{spec:?}");
    if spec.kind != ComponentKind::Service {
        return text;
    }
    match text.strip_suffix(", kind: Service }") {
        Some(head) => format!("{head} }}"),
        None => text,
    }
}

/// A dependency cycle among `components`, as names ending where it started.
fn find_cycle(components: &[ComponentSpec]) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, Vec<&str>> = components
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.depends_on.iter().map(|d| d.as_str()).collect(),
            )
        })
        .collect();
    // 0 = unvisited, 1 = on stack, 2 = done.
    let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        mark: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut cycle: Vec<String> = stack
                    .get(start..)
                    .unwrap_or(&[])
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(n, 1);
        stack.push(n);
        for d in deps.get(n).into_iter().flatten() {
            if *d != n && deps.contains_key(d) {
                if let Some(c) = visit(d, deps, mark, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        mark.insert(n, 2);
        None
    }
    for n in deps.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(n, &deps, &mut mark, &mut stack) {
            return Some(c);
        }
    }
    None
}
