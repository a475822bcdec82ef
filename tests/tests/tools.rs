//! The command-line tools as an operator runs them, as real processes:
//!
//! - `razar-agent check` and `razar-collector check` report every problem of a config at
//!   once, each as `file:line:column: key.path: reason`, including the files the config
//!   names (read and parsed as `run` uses them) and values `run` would mishandle;
//! - a reader that closes standard output early (`| head -c 10`) ends a tool with exit
//!   0 and no panic.
//!
//! Build the binaries first: `cargo build -p razar-agent -p razar-collector -p razar-certs`.

use razar_tests::ca::TestCa;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Generous: the machine running the tests may be busy.
const DEADLINE: Duration = Duration::from_secs(60);

/// A binary built by this workspace, next to the test executable.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/tools-XXXX → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with \
         `cargo build -p razar-agent -p razar-collector -p razar-certs`",
        path.display()
    );
    path
}

/// One expected error: line, key path, a fragment of the reason.
type Expected = (usize, &'static str, &'static str);

/// A bad config and every error `check` must report for it.
struct Case {
    name: &'static str,
    /// Config text; `{dir}` is a scratch directory, `{ca}`, `{cert}`, `{key}`, `{crl}`
    /// real TLS files, `{other_key}` a key of another certificate, `{junk}` a file that
    /// is neither PEM nor a scenario, `{empty}` an empty file.
    text: &'static str,
    errors: &'static [Expected],
}

/// Real files the cases refer to.
struct Files {
    _ca: TestCa,
    scratch: tempfile::TempDir,
    vars: Vec<(&'static str, String)>,
}

impl Files {
    /// For the agent `{cert}`/`{key}` are an agent's, for the collector the collector's.
    fn new(for_agent: bool) -> Files {
        let mut ca = TestCa::new().expect("test CA");
        let agent = ca.agent("gpu-01").expect("agent certificate");
        let other = ca.agent("gpu-02").expect("second agent certificate");
        let (cert, key) = if for_agent {
            (agent.cert_path.clone(), agent.key_path.clone())
        } else {
            let collector = ca.collector();
            (collector.cert_path.clone(), collector.key_path.clone())
        };
        let scratch = tempfile::tempdir().expect("scratch dir");
        let junk = scratch.path().join("junk.txt");
        std::fs::write(&junk, "neither PEM nor TOML = = =\n").expect("write junk");
        let empty = scratch.path().join("empty");
        std::fs::write(&empty, "").expect("write empty");
        let show = |p: &Path| p.display().to_string();
        let vars = vec![
            ("{dir}", show(scratch.path())),
            ("{ca}", show(&ca.ca_path())),
            ("{cert}", show(&cert)),
            ("{key}", show(&key)),
            ("{crl}", show(&ca.crl_path())),
            ("{other_key}", show(&other.key_path)),
            ("{junk}", show(&junk)),
            ("{empty}", show(&empty)),
        ];
        Files {
            _ca: ca,
            scratch,
            vars,
        }
    }

    /// Writes `text` with its placeholders filled in; returns the file's path.
    fn config(&self, name: &str, text: &str) -> PathBuf {
        let mut text = text.to_owned();
        for (var, value) in &self.vars {
            text = text.replace(var, value);
        }
        let path = self.scratch.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// Runs `program check --config path`; returns (exit code, stdout, stderr).
fn check(program: &str, path: &Path) -> (Option<i32>, String, String) {
    let output = Command::new(binary(program))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `file:line:column: key: reason` → (file, line, key, reason).
fn parse_error_line(line: &str) -> Option<(String, usize, String, String)> {
    let (file, rest) = line.split_once(".toml:")?;
    let (line_no, rest) = rest.split_once(':')?;
    let (_column, rest) = rest.split_once(": ")?;
    let (key, reason) = rest.split_once(": ")?;
    Some((
        format!("{file}.toml"),
        line_no.parse().ok()?,
        key.to_owned(),
        reason.to_owned(),
    ))
}

fn run_cases(program: &str, files: &Files, cases: &[Case]) {
    for case in cases {
        let path = files.config(case.name, case.text);
        let (code, _stdout, stderr) = check(program, &path);
        assert_eq!(
            code,
            Some(2),
            "{program} check, case {}: must exit 2\nstderr: {stderr}",
            case.name
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        let reported: Vec<(String, usize, String, String)> =
            stderr.lines().filter_map(parse_error_line).collect();
        assert_eq!(
            reported.len(),
            case.errors.len(),
            "{program} check, case {}: every error, each once\nstderr: {stderr}",
            case.name
        );
        assert!(
            stderr.contains(&format!("{} error(s)", case.errors.len())),
            "{stderr}"
        );
        for (line, key, reason) in case.errors {
            assert!(
                reported.iter().any(|(f, l, k, r)| {
                    Path::new(f) == path && l == line && k == key && r.contains(reason)
                }),
                "{program} check, case {}: missing {}:{line}: {key}: ~{reason}\nstderr: {stderr}",
                case.name,
                path.display()
            );
        }
    }
}

#[test]
fn agent_check_reports_every_problem_with_file_line_and_key_path() {
    let files = Files::new(true);
    let good = files.config(
        "good",
        "[agent]\nsample_interval = \"100ms\"\n[collector]\naddress = \"localhost:7443\"\n\
         server_name = \"localhost\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
    );
    let (code, stdout, stderr) = check("razar-agent", &good);
    assert_eq!(code, Some(0), "a good config passes\n{stderr}");
    assert!(stdout.starts_with("ok:"), "{stdout}");

    run_cases(
        "razar-agent",
        &files,
        &[
            Case {
                name: "values-and-files",
                text: "[agent]\nsample_interval = \"10ms\"\n[collector]\n\
                       address = \"localhost\"\nserver_name = \"localhost\"\n\
                       ca = \"{dir}/no-such-ca.pem\"\ncert = \"{junk}\"\nkey = \"{key}\"\n\
                       [gpu]\nsource = \"scenario\"\nscenario = \"{dir}/no-such-scenario.toml\"\n",
                errors: &[
                    (2, "agent.sample_interval", "at least 100 ms"),
                    (4, "collector.address", "not host:port"),
                    (6, "collector.ca", "No such file"),
                    (7, "collector.cert", "no CERTIFICATE block"),
                    (11, "gpu.scenario", "no-such-scenario.toml"),
                ],
            },
            Case {
                name: "key-of-another-certificate",
                text: "[collector]\naddress = \"localhost:7443\"\nserver_name = \"localhost\"\n\
                       ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{other_key}\"\n",
                errors: &[(6, "collector.key", "KeyMismatch")],
            },
            Case {
                name: "shape",
                text: "[agent]\nsampel_interval = \"1s\"\nlisten = 9464\n[gpu]\n\
                       source = \"scenario\"\nscenario = \"{junk}\"\n",
                errors: &[
                    (2, "agent.sampel_interval", "unknown field"),
                    (3, "agent.listen", "invalid type"),
                    (6, "gpu.scenario", "junk.txt"),
                ],
            },
        ],
    );
}

#[test]
fn collector_check_reports_every_problem_with_file_line_and_key_path() {
    let files = Files::new(false);
    let good = files.config(
        "good",
        "[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\ncrl = \"{crl}\"\n\
         [heartbeat]\ninterval = \"100ms\"\n[retention]\ncompact_after = \"36500days\"\n",
    );
    let (code, stdout, stderr) = check("razar-collector", &good);
    assert_eq!(code, Some(0), "a good config passes\n{stderr}");
    assert!(stdout.ends_with(": ok\n"), "{stdout}");

    run_cases(
        "razar-collector",
        &files,
        &[
            Case {
                name: "values-and-files",
                text: "[listen]\nquic = \"0.0.0.0:7443\"\n[tls]\nca = \"{ca}\"\n\
                       cert = \"{dir}/no-such-cert.pem\"\nkey = \"{junk}\"\ncrl = \"{empty}\"\n\
                       [heartbeat]\ninterval = \"10ms\"\nlost_after_missed = 0\n\
                       [retention]\ncompact_after = \"300000years\"\n",
                errors: &[
                    (5, "tls.cert", "No such file"),
                    (6, "tls.key", "no PRIVATE KEY block"),
                    (7, "tls.crl", "no CRL"),
                    (9, "heartbeat.interval", "at least 100ms"),
                    (10, "heartbeat.lost_after_missed", "at least 1"),
                    (12, "retention.compact_after", "at most"),
                ],
            },
            Case {
                name: "heartbeat-beyond-u32-ms",
                text: "[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                       [heartbeat]\ninterval = \"60days\"\n",
                errors: &[(6, "heartbeat.interval", "32-bit")],
            },
            Case {
                name: "key-of-another-certificate",
                text: "[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{other_key}\"\n",
                errors: &[(4, "tls.key", "KeyMismatch")],
            },
            Case {
                name: "crl-the-verifier-refuses",
                text:
                    "[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\ncrl = \"{junk}\"\n",
                errors: &[(5, "tls.crl", "CRL could not be parsed")],
            },
            Case {
                name: "shape",
                text: "[listen]\nquick = \"x\"\n[heartbeat]\ninterval = 5\n[tls]\nca = \"{ca}\"\n\
                       cert = \"{cert}\"\n",
                errors: &[
                    (2, "listen.quick", "unknown field"),
                    (4, "heartbeat.interval", "invalid type"),
                    (5, "tls.key", "is required"),
                ],
            },
            Case {
                name: "default-tls-files-missing",
                text: "data_dir = \"{dir}/no-such-data-dir\"\n",
                errors: &[
                    (1, "tls.ca", "the default"),
                    (1, "tls.cert", "the default"),
                    (1, "tls.key", "the default"),
                    (1, "tls.crl", "the default"),
                ],
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// A standard output closed early
// ---------------------------------------------------------------------------------------

/// Kills and reaps the child on drop unless it already ended.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Waits for `child` to end, at most [`DEADLINE`].
fn wait(child: &mut Reaped, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "{what} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` with standard output a one-page pipe that is closed once `keep` bytes
/// were read: the tool's output must be longer, so it then writes into a closed pipe
/// (what `| head -c` does). Returns what was read, the exit status and stderr.
fn with_stdout_closed_after(mut command: Command, keep: usize) -> (Vec<u8>, ExitStatus, String) {
    // Close-on-exec: the child must hold no read end, or the pipe never closes for it.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    nix::fcntl::fcntl(&write_end, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096))
        .expect("shrink the pipe to one page");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped());
    let mut child = Reaped(command.spawn().expect("spawn"));
    // The write end now lives only in the child.
    drop(command);
    let mut stderr = child.0.stderr.take().expect("stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut reader = std::fs::File::from(read_end);
    let mut got = vec![0; keep];
    let mut filled = 0;
    while filled < keep {
        match reader.read(&mut got[filled..]).expect("read stdout") {
            0 => break,
            n => filled += n,
        }
    }
    got.truncate(filled);
    drop(reader);
    let status = wait(&mut child, "the tool writing into a closed pipe");
    let stderr = stderr_reader.join().expect("stderr reader");
    (got, status, stderr)
}

fn assert_clean_exit(what: &str, got: &[u8], status: ExitStatus, stderr: &str, keep: usize) {
    assert_eq!(got.len(), keep, "{what}: printed what fit before the close");
    assert_eq!(
        status.code(),
        Some(0),
        "{what}: exit 0 on a closed pipe, got {status}\nstderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{what}: no panic or error on a closed pipe\nstderr: {stderr}"
    );
}

#[test]
fn certs_list_into_a_closed_pipe_exits_zero() {
    let mut ca = TestCa::new().expect("test CA");
    // Far more than one page of table (about 100 bytes a row) and of JSON.
    for i in 0..60 {
        ca.agent(&format!("gpu-{i:03}")).expect("agent certificate");
    }
    for output in ["table", "json"] {
        let mut command = Command::new(binary("razar-certs"));
        command
            .args(["list", "-o", output, "--dir"])
            .arg(ca.dir())
            .env_remove("RAZAR_CA_DIR");
        let (got, status, stderr) = with_stdout_closed_after(command, 10);
        assert_clean_exit(
            &format!("razar-certs list -o {output}"),
            &got,
            status,
            &stderr,
            10,
        );
    }
}

#[test]
fn agent_status_into_a_closed_pipe_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Enough components (none started) for a status far longer than one page.
    let mut text = format!(
        "[agent]\ndata_dir = \"{0}/data\"\nlog_dir = \"{0}/logs\"\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display()
    );
    for i in 0..400 {
        text.push_str(&format!(
            "\n[[component]]\nname = \"idle-component-{i:03}\"\ncommand = \"true\"\nautostart = false\n"
        ));
    }
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).expect("write config");
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("agent log");
    let agent = Command::new(binary("razar-agent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn razar-agent run");
    let mut agent = Reaped(agent);

    // Ready once a plain `status` lists every component (each appears once its task
    // has reported, in no particular order).
    let status_command = || {
        let mut command = Command::new(binary("razar-agent"));
        command.arg("status").arg("--config").arg(&config);
        command
    };
    let start = Instant::now();
    loop {
        let output = status_command().output().expect("run status");
        let text = String::from_utf8_lossy(&output.stdout);
        let listed = text
            .lines()
            .filter(|l| l.starts_with("idle-component-"))
            .count();
        if output.status.success() && listed == 400 {
            assert!(
                text.len() > 8192,
                "status must not fit in the pipe: {} bytes:\n{text}",
                text.len()
            );
            break;
        }
        assert!(
            matches!(agent.0.try_wait(), Ok(None)),
            "the agent exited: {}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        assert!(
            start.elapsed() < DEADLINE,
            "the agent never answered status"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let (got, status, stderr) = with_stdout_closed_after(status_command(), 10);
    assert_clean_exit("razar-agent status", &got, status, &stderr, 10);
    let mut json = status_command();
    json.arg("--json");
    let (got, status, stderr) = with_stdout_closed_after(json, 10);
    assert_clean_exit("razar-agent status --json", &got, status, &stderr, 10);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the agent");
    wait(&mut agent, "the agent after SIGTERM");
}
