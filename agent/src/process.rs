//! Spawning component processes and ending their whole process trees.
//!
//! Every component runs in its own process group (`pgid == pid`), so a signal to the
//! group reaches the grandchildren too. A process is identified by its pid *and* its
//! start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot), so a recycled pid
//! is never mistaken for the process the agent started.
//!
//! **After an agent restart.** If the agent is killed, its children are reparented to
//! init (the agent does not make itself a child subreaper: that would not survive its own
//! restart anyway). A new agent finds them through the pids it stored and [`adopt`]s them:
//! a process that is not our child cannot be waited on with `waitpid`, and `pidfd_open`
//! needs `unsafe` (this crate forbids it), so an [`AdoptedProcess`] is watched by reading
//! `/proc/<pid>/stat` every 100 ms. Its exit status cannot be known.
//!
//! **Output across an agent restart.** With [`spawn_with_fifos`], a component's stdout and
//! stderr are named pipes (`<dir>/<component>.out`, `<dir>/<component>.err`, mode 0600,
//! made afresh for each spawn) rather than anonymous pipes. The child gets them opened
//! read-write: it then holds a read end itself, so its writes never fail with
//! `EPIPE`/`SIGPIPE` while no agent reads (an anonymous pipe's read end dies with the
//! agent, and so would the component at its next write); they only block once the pipe
//! buffer is full (raised to 1 MiB where the kernel allows). The agent reads through its
//! own read-only, non-blocking end, opened before the spawn, and sees end-of-file once the
//! child and every process that inherited the pipe are gone. After a restart the new agent
//! reopens the same paths with [`resume_capture`] and reads on from what the pipe holds:
//! output is lost only if it was already read by the dead agent and not yet written, or
//! if the component ended while no agent ran.
//!
//! **Signalling a group by pgid** after its leader was reaped is safe while any member is
//! left (Linux does not reuse a pid that names a live group); once the group is empty its
//! pgid could in principle be reused, so the runtime should signal a group only right
//! after learning its leader's fate, as [`ComponentProcess::stop`] does.
#![forbid(unsafe_code)]

use crate::logs::{LogError, Logs};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{killpg, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{Pid, User};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::time::Instant;

/// How often group emptiness is checked while waiting out a grace period.
const GROUP_POLL: Duration = Duration::from_millis(10);
/// How often an adopted process is checked for life.
const ADOPTED_POLL: Duration = Duration::from_millis(100);
/// How long to wait for a group to vanish after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Directory of the components' named pipes inside the agent's data directory.
pub const STDIO_DIR: &str = "stdio";
/// Pipe buffer asked for a component's named pipes: what a component may write while no
/// agent reads before its writes block. Best effort (`/proc/sys/fs/pipe-max-size`, and the
/// per-user pipe page limits for an agent that does not run as root).
const FIFO_PIPE_BYTES: i32 = 1 << 20;

/// What to start: a program and its argument vector, never a shell string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpawnSpec {
    /// Component name, used for log capture.
    pub component: String,
    /// Program path, or a name looked up in `PATH`.
    pub program: String,
    pub args: Vec<String>,
    /// Added to (or overriding) the agent's environment.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// Run as this user (uid and primary gid from the user database; supplementary
    /// groups are dropped). Needs the agent to run as root.
    pub user: Option<String>,
}

impl SpawnSpec {
    /// The spawn part of a component's spec.
    pub fn from_component(spec: &crate::config::ComponentSpec) -> SpawnSpec {
        SpawnSpec {
            component: spec.name.as_str().to_owned(),
            program: spec.command.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            cwd: spec.working_dir.clone(),
            user: spec.user.clone(),
        }
    }
}

/// A process's identity: its pid and its start time, together never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: u32,
    /// Clock ticks since boot at which the process started (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
    /// It was not our child (adopted): it is gone, how is unknown.
    Unknown,
}

impl Exit {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    fn from_status(status: std::process::ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Unknown,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(n) => match Signal::try_from(*n) {
                Ok(signal) => write!(f, "killed by {signal}"),
                Err(_) => write!(f, "killed by signal {n}"),
            },
            Exit::Unknown => f.write_str("ended (status unknown)"),
        }
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// No process of the group was left when the stop began.
    AlreadyGone,
    /// The group emptied within the grace period after the stop signal.
    Graceful,
    /// The grace period ran out and the group was killed with SIGKILL.
    Killed,
    /// Even SIGKILL did not empty the group within 5 s (processes in uninterruptible sleep).
    Stuck,
}

/// Errors of spawning and signalling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The configured user does not exist.
    #[error("user `{0}` does not exist")]
    UnknownUser(String),
    /// The user database could not be read.
    #[error("cannot look up user `{user}`: {source}")]
    UserLookup {
        user: String,
        #[source]
        source: Errno,
    },
    /// The program could not be started (not found, not executable, bad cwd, …).
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// The started process vanished before its identity could be read.
    #[error("process {0} vanished before its start time could be read")]
    Vanished(u32),
    /// Waiting for the process failed.
    #[error("cannot wait for process {pid}: {source}")]
    Wait {
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// A signal could not be sent.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        pgid: i32,
        #[source]
        source: Errno,
    },
    /// Log capture could not be attached.
    #[error(transparent)]
    Logs(#[from] LogError),
    /// A component's named pipe could not be made or opened.
    #[error("output pipe {path}: {source}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A component process the agent started.
#[derive(Debug)]
pub struct ComponentProcess {
    child: tokio::process::Child,
    id: ProcessId,
    exit: Option<Exit>,
}

/// Starts `spec` in a new process group with stdin from /dev/null. With `logs`, stdout
/// and stderr are captured for `spec.component` (which must be registered there) through
/// anonymous pipes, which do not outlive the agent (see [`spawn_with_fifos`]); without,
/// they go to /dev/null. Must be called inside a tokio runtime.
pub fn spawn(spec: &SpawnSpec, logs: Option<&Logs>) -> Result<ComponentProcess, ProcessError> {
    match logs {
        Some(logs) => spawn_inner(spec, Output::Pipes(logs)),
        None => spawn_inner(spec, Output::Null),
    }
}

/// Like [`spawn`] with `logs`, but stdout and stderr are the component's named pipes in
/// `dir` (created, mode 0700, if absent), so a later agent can take the capture over with
/// [`resume_capture`]. If the pipes cannot be made, falls back to anonymous pipes (and
/// says so in the agent's log). Must be called inside a tokio runtime.
pub fn spawn_with_fifos(
    spec: &SpawnSpec,
    logs: &Logs,
    dir: &Path,
) -> Result<ComponentProcess, ProcessError> {
    match Fifos::create(dir, &spec.component) {
        Ok(fifos) => spawn_inner(spec, Output::Fifos(logs, fifos)),
        Err(error) => {
            tracing::warn!(
                component = %spec.component,
                %error,
                "no named pipes for output: capturing through anonymous pipes, which end with the agent"
            );
            spawn_inner(spec, Output::Pipes(logs))
        }
    }
}

/// Where a spawned component's output goes.
enum Output<'a> {
    Null,
    Pipes(&'a Logs),
    Fifos(&'a Logs, Fifos),
}

/// Both named pipes of a component, opened for a spawn: the agent's read ends and the
/// child's read-write ends.
struct Fifos {
    out: pipe::Receiver,
    err: pipe::Receiver,
    child_out: File,
    child_err: File,
}

impl Fifos {
    /// Makes both pipes afresh (so nothing a previous process of the component still
    /// holds can write into the new one's capture) and opens them.
    fn create(dir: &Path, component: &str) -> Result<Fifos, ProcessError> {
        let [out_path, err_path] = fifo_paths(dir, component)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ProcessError::Fifo {
                path: dir.to_owned(),
                source,
            })?;
        let (out, child_out) = make_fifo(&out_path)?;
        let (err, child_err) = make_fifo(&err_path)?;
        Ok(Fifos {
            out,
            err,
            child_out,
            child_err,
        })
    }
}

/// The named pipes of `component` in `dir`: stdout's, then stderr's.
pub fn fifo_paths(dir: &Path, component: &str) -> Result<[PathBuf; 2], ProcessError> {
    // A suffix is appended, so `.` and `..` cannot name a directory; a `/` could.
    if component.is_empty() || component.contains(['/', '\0']) {
        return Err(ProcessError::Fifo {
            path: dir.join(component),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a component name"),
        });
    }
    Ok([
        dir.join(format!("{component}.out")),
        dir.join(format!("{component}.err")),
    ])
}

/// Replaces whatever is at `path` with a new FIFO and opens it: the agent's end first
/// (read-only, non-blocking: never waits for a writer), then the child's (read-write).
fn make_fifo(path: &Path) -> Result<(pipe::Receiver, File), ProcessError> {
    let fail = |source: io::Error| ProcessError::Fifo {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail(e)),
        _ => {}
    }
    nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| fail(e.into()))?;
    let reader = open_reader(path)?;
    let child = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(fail)?;
    if let Err(error) = fcntl(&reader, FcntlArg::F_SETPIPE_SZ(FIFO_PIPE_BYTES)) {
        tracing::debug!(path = %path.display(), %error, "pipe buffer left at its default size");
    }
    Ok((reader, child))
}

/// Opens the agent's end of an existing FIFO: read-only, non-blocking, not following a
/// symbolic link, refused if `path` is not a FIFO.
fn open_reader(path: &Path) -> Result<pipe::Receiver, ProcessError> {
    let fail = |source: io::Error| ProcessError::Fifo {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(fail)?;
    if !file.metadata().map_err(fail)?.file_type().is_fifo() {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a named pipe",
        )));
    }
    pipe::Receiver::from_file_unchecked(file).map_err(fail)
}

/// Captures again, into `logs` (where `component` must be registered), the output of a
/// component started by an earlier agent with [`spawn_with_fifos`]: reopens its named
/// pipes in `dir` and reads on from what they hold, until every process holding them is
/// gone. Must be called inside a tokio runtime.
pub fn resume_capture(component: &str, logs: &Logs, dir: &Path) -> Result<(), ProcessError> {
    let [out_path, err_path] = fifo_paths(dir, component)?;
    let out = open_reader(&out_path)?;
    let err = open_reader(&err_path)?;
    for path in [&out_path, &err_path] {
        // A reader opened non-blocking while a FIFO has no writer is not told of the
        // hang-up until a writer has come and gone (Linux `fifo_open`), so it would wait
        // forever if the component had already closed its output. Open and close a writer
        // of our own: a writer has then been seen, and end-of-file is reported as soon as
        // no writer is left. Cannot block: non-blocking, and we hold a reader.
        let seen = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| ProcessError::Fifo {
                path: path.clone(),
                source,
            })?;
        drop(seen);
    }
    logs.attach(component, out, err)?;
    Ok(())
}

/// Removes the named pipes of `component` in `dir`, if any (for a component that is gone
/// for good: a process still holding them could no longer be captured after a restart).
pub fn remove_fifos(dir: &Path, component: &str) -> Result<(), ProcessError> {
    for path in fifo_paths(dir, component)? {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(ProcessError::Fifo { path, source: e })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes the named pipes in `dir` of every component not in `keep` (components removed
/// from the config while the agent was down). Only FIFOs named `<component>.out` or
/// `.err` are touched; returns the components swept.
pub fn sweep_fifos(
    dir: &Path,
    keep: &std::collections::BTreeSet<String>,
) -> Result<Vec<String>, ProcessError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ProcessError::Fifo {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut swept = std::collections::BTreeSet::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(component) = name
            .strip_suffix(".out")
            .or_else(|| name.strip_suffix(".err"))
        else {
            continue;
        };
        let is_fifo = entry.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt as _;
            t.is_fifo()
        });
        if is_fifo && !keep.contains(component) {
            swept.insert(component.to_owned());
        }
    }
    for component in &swept {
        remove_fifos(dir, component)?;
    }
    Ok(swept.into_iter().collect())
}

fn spawn_inner(spec: &SpawnSpec, output: Output<'_>) -> Result<ComponentProcess, ProcessError> {
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    if let Some(name) = &spec.user {
        let user = User::from_name(name)
            .map_err(|source| ProcessError::UserLookup {
                user: name.clone(),
                source,
            })?
            .ok_or_else(|| ProcessError::UnknownUser(name.clone()))?;
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let pipes_to = match output {
        Output::Null => {
            command.stdout(Stdio::null()).stderr(Stdio::null());
            None
        }
        Output::Pipes(logs) => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            Some(logs)
        }
        Output::Fifos(logs, fifos) => {
            // Reading starts before the spawn: a refused capture spawns nothing, and a
            // failed spawn ends the readers (the child ends close with `command`).
            logs.attach(&spec.component, fifos.out, fifos.err)?;
            command
                .stdout(Stdio::from(fifos.child_out))
                .stderr(Stdio::from(fifos.child_err));
            None
        }
    };
    let spawned = command.spawn();
    // The command holds the agent's copies of the child's ends of the named pipes: while
    // they are open, the readers never see end-of-file. (They are close-on-exec, so no
    // other child inherits them meanwhile.)
    drop(command);
    let mut child = spawned.map_err(|source| ProcessError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    // The child cannot have been reaped yet (nothing polled it), so its /proc entry exists
    // even if it already exited (as a zombie).
    let pid = child.id().ok_or(ProcessError::Vanished(0))?;
    let start_time = match read_stat(pid) {
        Some(stat) => stat.start_time,
        None => {
            let _ = child.start_kill();
            return Err(ProcessError::Vanished(pid));
        }
    };
    if let Some(logs) = pipes_to {
        if let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) {
            if let Err(error) = logs.attach(&spec.component, out, err) {
                let _ = kill_tree(pid as i32);
                return Err(error.into());
            }
        }
    }
    Ok(ComponentProcess {
        child,
        id: ProcessId { pid, start_time },
        exit: None,
    })
}

impl ComponentProcess {
    pub fn pid(&self) -> u32 {
        self.id.pid
    }

    /// The process group; equal to the pid.
    pub fn pgid(&self) -> i32 {
        self.id.pid as i32
    }

    /// Pid and start time, to store and check later with [`is_alive`] / [`adopt`].
    pub fn id(&self) -> ProcessId {
        self.id
    }

    /// Waits for the process itself to exit (other members of its group may remain;
    /// end them with [`kill_tree`]). Cancel-safe; returns the same status when called again.
    pub async fn wait(&mut self) -> Result<Exit, ProcessError> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let status = self
            .child
            .wait()
            .await
            .map_err(|source| ProcessError::Wait {
                pid: self.id.pid,
                source,
            })?;
        let exit = Exit::from_status(status);
        self.exit = Some(exit);
        Ok(exit)
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<Exit>, ProcessError> {
        if self.exit.is_none() {
            let status = self.child.try_wait().map_err(|source| ProcessError::Wait {
                pid: self.id.pid,
                source,
            })?;
            self.exit = status.map(Exit::from_status);
        }
        Ok(self.exit)
    }

    /// Sends `signal` to the whole group, waits up to `grace` for the process to exit and
    /// the group to empty, then kills the group with SIGKILL. Returns how the stop ended
    /// and the process's exit status.
    pub async fn stop(
        &mut self,
        signal: Signal,
        grace: Duration,
    ) -> Result<(StopOutcome, Exit), ProcessError> {
        let outcome = stop_tree(self.pgid(), signal, grace).await?;
        let exit = match tokio::time::timeout(KILL_WAIT, self.wait()).await {
            Ok(exit) => exit?,
            Err(_) => return Ok((StopOutcome::Stuck, Exit::Unknown)),
        };
        Ok((outcome, exit))
    }
}

/// Sends `signal` to every process of group `pgid`, waits up to `grace` for the group to
/// be empty (zombies do not count), then sends SIGKILL and waits up to 5 s more.
pub async fn stop_tree(
    pgid: i32,
    signal: Signal,
    grace: Duration,
) -> Result<StopOutcome, ProcessError> {
    if group_is_empty(pgid) {
        return Ok(StopOutcome::AlreadyGone);
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => {}
        Err(Errno::ESRCH) => return Ok(StopOutcome::AlreadyGone),
        Err(source) => return Err(ProcessError::Signal { pgid, source }),
    }
    if wait_group_empty(pgid, grace).await {
        return Ok(StopOutcome::Graceful);
    }
    kill_tree(pgid)?;
    if wait_group_empty(pgid, KILL_WAIT).await {
        Ok(StopOutcome::Killed)
    } else {
        Ok(StopOutcome::Stuck)
    }
}

/// Sends SIGKILL to every process of group `pgid`. A group that is already gone is fine.
pub fn kill_tree(pgid: i32) -> Result<(), ProcessError> {
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(ProcessError::Signal { pgid, source }),
    }
}

/// Whether the process `id` still runs (same pid *and* start time, and not a zombie).
pub fn is_alive(id: ProcessId) -> bool {
    read_stat(id.pid).is_some_and(|s| s.start_time == id.start_time && s.state != 'Z')
}

/// Whether any live (non-zombie) process is left in group `pgid`.
pub fn group_is_empty(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => true,
        // Members exist; they may all be zombies waiting for a reaper.
        _ => !group_has_live_member(pgid),
    }
}

fn group_has_live_member(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter_map(read_stat)
        .any(|s| s.pgid == pgid && s.state != 'Z')
}

async fn wait_group_empty(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if group_is_empty(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// A process started by an earlier agent, found alive again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdoptedProcess {
    id: ProcessId,
    pgid: i32,
}

/// Takes over a process from an earlier run of the agent if `id` still names a live
/// process (same pid and start time). `None` if it is gone or the pid was reused.
pub fn adopt(id: ProcessId) -> Option<AdoptedProcess> {
    let stat = read_stat(id.pid)?;
    (stat.start_time == id.start_time && stat.state != 'Z').then_some(AdoptedProcess {
        id,
        pgid: stat.pgid,
    })
}

impl AdoptedProcess {
    pub fn pid(&self) -> u32 {
        self.id.pid
    }

    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    pub fn id(&self) -> ProcessId {
        self.id
    }

    /// Waits until the process is gone (checked every 100 ms). Cancel-safe.
    pub async fn wait(&self) -> Exit {
        while is_alive(self.id) {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
        Exit::Unknown
    }

    /// Like [`ComponentProcess::stop`], for the adopted process's group.
    pub async fn stop(&self, signal: Signal, grace: Duration) -> Result<StopOutcome, ProcessError> {
        if !is_alive(self.id) && group_is_empty(self.pgid) {
            return Ok(StopOutcome::AlreadyGone);
        }
        stop_tree(self.pgid, signal, grace).await
    }
}

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: R, S, D, Z, T, …
    pub state: char,
    /// Field 4.
    pub ppid: u32,
    /// Field 5.
    pub pgid: i32,
    /// Fields 14 + 15: user and system CPU time, clock ticks.
    pub cpu_ticks: u64,
    /// Field 20.
    pub threads: u64,
    /// Field 22: clock ticks after boot.
    pub start_time: u64,
    /// Field 24: resident pages.
    pub rss_pages: u64,
}

/// Reads `/proc/<pid>/stat`; `None` if the process is gone or the file is malformed.
pub(crate) fn read_stat(pid: u32) -> Option<ProcStat> {
    let bytes = read_proc_bytes(&format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&bytes)
}

/// Reads a small procfs file with as few system calls as it takes: no `stat` for a size
/// hint (procfs reports 0) and no read past a short one, since procfs fills a read with
/// everything that fits and a short read means the end. Used on every sampling tick.
pub(crate) fn read_proc_file(path: &str) -> std::io::Result<String> {
    let bytes = read_proc_bytes(path)?;
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// [`read_proc_file`] as bytes: for files holding a process name, which the kernel
/// cuts at 15 bytes, possibly inside a multi-byte character (not valid UTF-8).
pub(crate) fn read_proc_bytes(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut buf = [0u8; 4096];
    let mut text = Vec::new();
    loop {
        let n = file.read(&mut buf)?;
        text.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            break;
        }
    }
    Ok(text)
}

/// Parses a `/proc/<pid>/stat` file, as bytes. The command name (field 2) is in
/// parentheses and may itself hold spaces, parentheses and any bytes but NUL (the
/// kernel cuts it at 15 bytes, even inside a UTF-8 character), so fields are counted
/// from the last `)` and only the ASCII fields after it are decoded.
pub(crate) fn parse_stat(bytes: &[u8]) -> Option<ProcStat> {
    let close = bytes.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(bytes.get(close + 1..)?).ok()?;
    // After the name, field N is at index N - 3.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<&str> { fields.get(n - 3).copied() };
    let number = |n: usize| -> Option<u64> { field(n)?.parse().ok() };
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgid: field(5)?.parse().ok()?,
        cpu_ticks: number(14)?.checked_add(number(15)?)?,
        threads: number(20)?,
        start_time: number(22)?,
        rss_pages: number(24)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogPolicy;
    use razar_shared::domain::LogStream;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn sh(component: &str, script: &str) -> SpawnSpec {
        SpawnSpec {
            component: component.into(),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            ..SpawnSpec::default()
        }
    }

    /// Waits until `check` holds, up to 20 s.
    async fn until(what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn children_in_group(pgid: i32) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                    .filter(|&pid| read_stat(pid).is_some_and(|s| s.pgid == pgid && s.state != 'Z'))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn reports_exit_codes_and_signals() -> TestResult {
        let mut ok = spawn(&sh("a", "exit 0"), None)?;
        assert_eq!(ok.wait().await?, Exit::Code(0));
        assert!(
            ok.wait().await?.success(),
            "wait again gives the same status"
        );
        let mut failed = spawn(&sh("a", "exit 7"), None)?;
        assert_eq!(failed.wait().await?, Exit::Code(7));
        let mut killed = spawn(&sh("a", "kill -9 $$"), None)?;
        let exit = killed.wait().await?;
        assert_eq!(exit, Exit::Signal(9));
        assert_eq!(exit.to_string(), "killed by SIGKILL");
        Ok(())
    }

    #[tokio::test]
    async fn refuses_missing_program_and_user() {
        let missing = SpawnSpec {
            program: "/nonexistent/razar-test-program".into(),
            ..SpawnSpec::default()
        };
        assert!(matches!(
            spawn(&missing, None),
            Err(ProcessError::Spawn { .. })
        ));
        let mut bad_user = sh("a", "exit 0");
        bad_user.user = Some("razar-no-such-user".into());
        assert!(matches!(
            spawn(&bad_user, None),
            Err(ProcessError::UnknownUser(_))
        ));
    }

    #[tokio::test]
    async fn runs_with_env_cwd_and_user() -> TestResult {
        env_cwd_and_user(false).await
    }

    #[tokio::test]
    async fn runs_with_env_cwd_and_user_through_named_pipes() -> TestResult {
        env_cwd_and_user(true).await
    }

    async fn env_cwd_and_user(fifos: bool) -> TestResult {
        let dir = tempfile::tempdir()?;
        let logs = Logs::start()?;
        logs.register(
            "env",
            LogPolicy {
                dir: dir.path().to_owned(),
                max_file_bytes: 1 << 20,
                max_files: 2,
            },
        )?;
        let mut spec = sh("env", "echo \"$RAZAR_X $(pwd) $(id -u)\"; echo warn >&2");
        spec.env.insert("RAZAR_X".into(), "hello".into());
        spec.cwd = Some(dir.path().to_owned());
        // Running as another user needs root; the test suite runs as root here, but stay
        // correct elsewhere by only asking for `nobody` when we can switch to it.
        let as_root = nix::unistd::geteuid().is_root();
        if as_root {
            spec.user = Some("nobody".into());
        }
        let mut child = if fifos {
            spawn_with_fifos(&spec, &logs, &dir.path().join("stdio"))?
        } else {
            spawn(&spec, Some(&logs))?
        };
        assert_eq!(child.wait().await?, Exit::Code(0));
        let expected_uid = match User::from_name("nobody")? {
            Some(nobody) if as_root => nobody.uid.as_raw(),
            _ => nix::unistd::geteuid().as_raw(),
        };
        let want = format!("hello {} {expected_uid}", dir.path().display());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = logs.tail("env", 10).await?;
            let has_out = lines
                .iter()
                .any(|l| l.stream == LogStream::Stdout && l.text == want);
            let has_err = lines
                .iter()
                .any(|l| l.stream == LogStream::Stderr && l.text == "warn");
            if has_out && has_err {
                break;
            }
            assert!(Instant::now() < deadline, "log lines missing: {lines:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    #[tokio::test]
    async fn group_kill_takes_grandchildren() -> TestResult {
        let mut child = spawn(&sh("g", "sleep 100 & sleep 100 & wait"), None)?;
        let pgid = child.pgid();
        assert_eq!(pgid as u32, child.pid());
        until("two grandchildren", || children_in_group(pgid).len() == 3).await?;
        let members: Vec<ProcessId> = children_in_group(pgid)
            .into_iter()
            .filter_map(|pid| {
                read_stat(pid).map(|s| ProcessId {
                    pid,
                    start_time: s.start_time,
                })
            })
            .collect();
        assert_eq!(members.len(), 3);
        let (outcome, exit) = child.stop(Signal::SIGTERM, Duration::from_secs(10)).await?;
        assert_eq!(outcome, StopOutcome::Graceful);
        assert_eq!(exit, Exit::Signal(Signal::SIGTERM as i32));
        // Grandchildren were reparented, and are reaped by whoever is init here.
        until("grandchildren gone", || {
            members.iter().all(|&m| !is_alive(m))
        })
        .await?;
        assert!(group_is_empty(pgid));
        Ok(())
    }

    #[tokio::test]
    async fn grace_then_sigkill_for_a_child_that_ignores_sigterm() -> TestResult {
        let logs = Logs::start()?;
        let dir = tempfile::tempdir()?;
        logs.register(
            "stubborn",
            LogPolicy {
                dir: dir.path().to_owned(),
                max_file_bytes: 1 << 20,
                max_files: 2,
            },
        )?;
        let mut follow = logs.follow("stubborn")?;
        let spec = sh(
            "stubborn",
            "trap 'echo got-term' TERM; echo armed; while :; do sleep 0.05; done",
        );
        let mut child = spawn(&spec, Some(&logs))?;
        // Signal only once the trap is set.
        let armed = tokio::time::timeout(Duration::from_secs(20), follow.recv()).await??;
        assert_eq!(armed.text, "armed");
        let started = Instant::now();
        let grace = Duration::from_millis(300);
        let (outcome, exit) = child.stop(Signal::SIGTERM, grace).await?;
        assert_eq!(outcome, StopOutcome::Killed);
        assert_eq!(exit, Exit::Signal(9));
        assert!(
            started.elapsed() >= grace,
            "SIGKILL came before the grace period ended"
        );
        assert!(group_is_empty(child.pgid()));
        Ok(())
    }

    #[tokio::test]
    async fn stop_of_an_exited_group_is_already_gone() -> TestResult {
        let mut child = spawn(&sh("x", "exit 3"), None)?;
        assert_eq!(child.wait().await?, Exit::Code(3));
        let (outcome, exit) = child.stop(Signal::SIGTERM, Duration::from_secs(1)).await?;
        assert_eq!((outcome, exit), (StopOutcome::AlreadyGone, Exit::Code(3)));
        Ok(())
    }

    #[tokio::test]
    async fn recycled_pid_is_not_alive_and_not_adopted() -> TestResult {
        let mut child = spawn(&sh("r", "sleep 100"), None)?;
        let id = child.id();
        assert!(is_alive(id));
        let adopted = adopt(id).ok_or("live process must be adoptable")?;
        assert_eq!(adopted.pgid(), child.pgid());
        // Same pid, another start time: what a recycled pid looks like.
        let recycled = ProcessId {
            pid: id.pid,
            start_time: id.start_time + 1,
        };
        assert!(!is_alive(recycled));
        assert!(adopt(recycled).is_none());
        // A live process with another start time is also refused (our own pid).
        let me = std::process::id();
        let mine = read_stat(me).ok_or("own stat")?;
        assert!(adopt(ProcessId {
            pid: me,
            start_time: mine.start_time.wrapping_add(7)
        })
        .is_none());
        kill_tree(child.pgid())?;
        assert_eq!(child.wait().await?, Exit::Signal(9));
        assert!(!is_alive(id), "a reaped process is not alive");
        assert!(adopt(id).is_none());
        Ok(())
    }

    #[tokio::test]
    async fn adopted_process_can_be_waited_and_stopped() -> TestResult {
        let mut child = spawn(&sh("ad", "sleep 100"), None)?;
        let adopted = adopt(child.id()).ok_or("adopt")?;
        let waiter = tokio::spawn(async move { adopted.wait().await });
        let outcome = adopted
            .stop(Signal::SIGTERM, Duration::from_secs(10))
            .await?;
        // The zombie leader does not count as a live member.
        assert_eq!(outcome, StopOutcome::Graceful);
        assert_eq!(child.wait().await?, Exit::Signal(15));
        let exit = tokio::time::timeout(Duration::from_secs(20), waiter).await??;
        assert_eq!(exit, Exit::Unknown);
        assert_eq!(
            adopted.stop(Signal::SIGTERM, Duration::ZERO).await?,
            StopOutcome::AlreadyGone
        );
        Ok(())
    }

    /// How many of this process's file descriptors are open on `path`.
    fn fds_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits (blocking) until `check` holds, up to 20 s.
    fn until_blocking(what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !check() {
            if std::time::Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    #[test]
    fn sweep_removes_only_the_pipes_of_components_not_kept() -> TestResult {
        let dir = tempfile::tempdir()?;
        let fifo =
            |name: &str| nix::unistd::mkfifo(&dir.path().join(name), nix::sys::stat::Mode::S_IRWXU);
        for name in ["kept.out", "kept.err", "gone.out", "gone.err", "half.err"] {
            fifo(name)?;
        }
        // Not a FIFO, and a FIFO of another naming: both left alone.
        std::fs::write(dir.path().join("notes.out"), b"x")?;
        fifo("other.pipe")?;
        let keep = std::collections::BTreeSet::from(["kept".to_owned()]);
        let swept = sweep_fifos(dir.path(), &keep)?;
        assert_eq!(swept, vec!["gone".to_owned(), "half".to_owned()]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        left.sort();
        assert_eq!(left, ["kept.err", "kept.out", "notes.out", "other.pipe"]);
        assert!(sweep_fifos(&dir.path().join("absent"), &keep)?.is_empty());
        Ok(())
    }

    /// The agent dies (its runtime, and with it the readers, are dropped); the component
    /// keeps writing into its named pipes, and a new agent reads on from there.
    #[test]
    fn fifo_output_outlives_its_reader_and_is_read_on() -> TestResult {
        let dir = tempfile::tempdir()?;
        let stdio = dir.path().join("stdio");
        let [out_path, err_path] = fifo_paths(&stdio, "keep")?;
        let policy = LogPolicy {
            dir: dir.path().join("logs"),
            max_file_bytes: 1 << 20,
            max_files: 2,
        };
        let (gate1, wrote, gate2) = (
            dir.path().join("gate1"),
            dir.path().join("wrote"),
            dir.path().join("gate2"),
        );
        let script = format!(
            "echo first; while [ ! -e {g1} ]; do sleep 0.01; done; \
             i=2; while [ $i -le 50 ]; do echo line-$i; echo err-$i >&2; i=$((i+1)); done; \
             touch {wrote}; while [ ! -e {g2} ]; do sleep 0.01; done; printf last-partial",
            g1 = gate1.display(),
            wrote = wrote.display(),
            g2 = gate2.display(),
        );

        let old = tokio::runtime::Runtime::new()?;
        let id = old.block_on(async {
            let logs = Logs::start()?;
            logs.register("keep", policy.clone())?;
            let mut follow = logs.follow("keep")?;
            let child = spawn_with_fifos(&sh("keep", &script), &logs, &stdio)?;
            let first = tokio::time::timeout(Duration::from_secs(20), follow.recv()).await??;
            assert_eq!(first.text, "first");
            // The agent holds only its read ends; the child has the pipes as stdout/stderr.
            assert_eq!((fds_on(&out_path), fds_on(&err_path)), (1, 1));
            for (fd, path) in [(1, &out_path), (2, &err_path)] {
                assert_eq!(
                    &std::fs::read_link(format!("/proc/{}/fd/{fd}", child.pid()))?,
                    path
                );
            }
            Ok::<_, Box<dyn std::error::Error>>(child.id())
        })?;
        // The old agent's readers end with its runtime.
        drop(old);
        until_blocking("old readers closed", || {
            fds_on(&out_path) + fds_on(&err_path) == 0
        })?;

        // 49 lines on each stream with nobody reading: no SIGPIPE, nothing blocks.
        std::fs::write(&gate1, "")?;
        until_blocking("lines written with no reader", || {
            wrote.exists() || !is_alive(id)
        })?;
        assert!(is_alive(id), "the component died writing with no reader");

        let new = tokio::runtime::Runtime::new()?;
        new.block_on(async {
            let logs = Logs::start()?;
            logs.register("keep", policy)?;
            let mut follow = logs.follow("keep")?;
            let adopted = adopt(id).ok_or("adopt")?;
            resume_capture("keep", &logs, &stdio)?;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while out.len() < 49 || err.len() < 49 {
                let line = tokio::time::timeout(Duration::from_secs(20), follow.recv()).await??;
                match line.stream {
                    LogStream::Stdout => out.push(line.text),
                    LogStream::Stderr => err.push(line.text),
                }
            }
            let want = |prefix: &str| -> Vec<String> {
                (2..=50).map(|i| format!("{prefix}-{i}")).collect()
            };
            assert_eq!(out, want("line"));
            assert_eq!(err, want("err"));
            // A last partial line is only emitted at end-of-file, once the process is gone.
            std::fs::write(&gate2, "")?;
            let last = tokio::time::timeout(Duration::from_secs(20), follow.recv()).await??;
            assert_eq!(last.text, "last-partial");
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(20), adopted.wait()).await?,
                Exit::Unknown
            );
            until("new readers closed", || {
                fds_on(&out_path) + fds_on(&err_path) == 0
            })
            .await?;
            // One file across both agents: the old one's line, then the new one's.
            let tail = logs.tail("keep", 200).await?;
            assert_eq!(tail.len(), 1 + 2 * 49 + 1);
            assert_eq!(tail[0].text, "first");
            Ok::<_, Box<dyn std::error::Error>>(())
        })?;
        Ok(())
    }

    /// Pipes that nobody holds any more (their process is gone): the capture taken over
    /// ends at once instead of waiting forever for a writer.
    #[tokio::test]
    async fn resume_capture_of_abandoned_pipes_ends_at_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        let stdio = dir.path().join("stdio");
        let logs = Logs::start()?;
        logs.register(
            "gone",
            LogPolicy {
                dir: dir.path().join("logs"),
                max_file_bytes: 1 << 20,
                max_files: 2,
            },
        )?;
        let mut child = spawn_with_fifos(&sh("gone", "echo bye"), &logs, &stdio)?;
        assert_eq!(child.wait().await?, Exit::Code(0));
        let [out_path, err_path] = fifo_paths(&stdio, "gone")?;
        until("first readers closed", || {
            fds_on(&out_path) + fds_on(&err_path) == 0
        })
        .await?;
        resume_capture("gone", &logs, &stdio)?;
        until("taken-over readers closed", || {
            fds_on(&out_path) + fds_on(&err_path) == 0
        })
        .await?;
        // Nothing else is there to read.
        assert_eq!(logs.tail("gone", 10).await?.len(), 1);
        // Not a FIFO, or no FIFO: refused.
        remove_fifos(&stdio, "gone")?;
        assert!(!out_path.exists() && !err_path.exists());
        assert!(matches!(
            resume_capture("gone", &logs, &stdio),
            Err(ProcessError::Fifo { .. })
        ));
        std::fs::write(&out_path, "")?;
        std::fs::write(&err_path, "")?;
        assert!(matches!(
            resume_capture("gone", &logs, &stdio),
            Err(ProcessError::Fifo { .. })
        ));
        assert!(fifo_paths(&stdio, "a/b").is_err());
        Ok(())
    }

    #[test]
    fn parses_stat_with_odd_names() {
        let text = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 4 0 98765 1000000 250 18446744073709551615";
        let stat = parse_stat(text.as_bytes());
        assert_eq!(
            stat,
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                pgid: 1234,
                cpu_ticks: 10,
                threads: 4,
                start_time: 98765,
                rss_pages: 250,
            })
        );
        assert_eq!(parse_stat(b"garbage"), None);
        assert_eq!(parse_stat(b"1 (x) S 1 2"), None);
        assert_eq!(parse_stat(b""), None);
        // A 15-byte name cut inside a two-byte character: the fields still parse.
        let mut cut = b"77 (".to_vec();
        cut.extend_from_slice(&"миграция".as_bytes()[..15]);
        cut.extend_from_slice(b") S 1 77 77 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 4242 0 9 0");
        assert!(std::str::from_utf8(&cut).is_err());
        assert_eq!(parse_stat(&cut).map(|s| s.start_time), Some(4242));
    }
}
