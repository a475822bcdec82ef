//! Capture of every component's stdout and stderr into size-rotated files, with a tail
//! and a follow API for the uplink's log-tail command.
//!
//! **Shape.** For each attached process, one tokio task per stream reads the pipe and cuts
//! it into lines (at most [`MAX_LINE_BYTES`]; a longer run is cut into several lines). A
//! line goes to two places without ever waiting: a per-component broadcast channel (for
//! [`Logs::follow`]) and a bounded queue to one writer thread shared by all components.
//! When the queue is full (a slow disk) the line is dropped from the file and counted in
//! [`Logs::dropped_lines_total`]; the reader keeps reading, so a child never blocks on a
//! full pipe because of the agent.
//!
//! **Files.** `<dir>/<component>.log` is the live file; when a line would take it past
//! `max_file_bytes` it is renamed to `<component>.log.1`, the older ones shift up
//! (`.log.1` → `.log.2` …) and the oldest beyond `max_files` (live file included) is
//! deleted. One line per captured line:
//!
//! ```text
//! <unix millis> <out|err> <text>
//! ```
//!
//! Text is the line without its `\n`, invalid UTF-8 replaced by U+FFFD. Lines of the file
//! that do not have this shape are skipped by [`Logs::tail`].
#![forbid(unsafe_code)]

use razar_shared::domain::LogStream;
use razar_shared::protocol::UnixMillis;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, oneshot};

/// Longest line kept whole; longer output is cut into lines of this many bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines queued for the writer thread before new lines are dropped from the files.
const QUEUE_LINES: usize = 2048;
/// Lines a slow follower may lag behind before it misses some.
const FOLLOW_LINES: usize = 1024;
/// Read buffer per pipe (two per component): small, lines are assembled apart.
const READ_BUFFER_BYTES: usize = 2048;

/// Where and how much of one component's output is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPolicy {
    pub dir: PathBuf,
    /// The live file is rotated before a line would take it past this size (≥ 1).
    pub max_file_bytes: u64,
    /// Files kept, the live one included (≥ 1; 1 means the live file is truncated).
    pub max_files: u32,
}

/// One captured line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub at_ms: UnixMillis,
    pub stream: LogStream,
    pub text: String,
}

/// Errors of log capture.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The component name cannot be a file name (1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.`).
    #[error("`{0}` is not a valid component name for a log file")]
    BadName(String),
    /// No policy was registered for this component.
    #[error("no logs for component `{0}`")]
    UnknownComponent(String),
    /// The log directory could not be created.
    #[error("cannot create log directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A log file could not be read.
    #[error("cannot read log file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The writer thread could not be started or has stopped.
    #[error("log writer unavailable: {0}")]
    Writer(String),
}

enum WriterMsg {
    Line {
        component: Arc<str>,
        policy: Arc<LogPolicy>,
        line: LogLine,
    },
    Flush(oneshot::Sender<()>),
    /// The component is gone: close its live file.
    Close(Arc<str>),
}

struct Channel {
    policy: Arc<LogPolicy>,
    /// Created by the first [`Logs::follow`], dropped when its last receiver is gone
    /// (a broadcast channel allocates all its slots up front).
    follow: Option<broadcast::Sender<LogLine>>,
}

struct Inner {
    queue: SyncSender<WriterMsg>,
    components: Mutex<HashMap<Arc<str>, Channel>>,
    dropped: AtomicU64,
    /// Lines a follower (`tail --follow`) lost by lagging.
    follow_dropped: AtomicU64,
    write_errors: Arc<AtomicU64>,
}

/// Log capture for all components. Cheap to clone; every clone shares one writer thread,
/// which ends when the last clone and the last attached reader are gone.
#[derive(Clone)]
pub struct Logs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logs")
            .field("dropped_lines_total", &self.dropped_lines_total())
            .finish()
    }
}

impl Logs {
    /// Starts the writer thread.
    pub fn start() -> Result<Logs, LogError> {
        let (queue, rx) = mpsc::sync_channel(QUEUE_LINES);
        let write_errors = Arc::new(AtomicU64::new(0));
        let errors = Arc::clone(&write_errors);
        std::thread::Builder::new()
            .name("razar-logs".into())
            .stack_size(256 * 1024)
            .spawn(move || writer_loop(rx, &errors))
            .map_err(|e| LogError::Writer(e.to_string()))?;
        Ok(Logs {
            inner: Arc::new(Inner {
                queue,
                components: Mutex::new(HashMap::new()),
                dropped: AtomicU64::new(0),
                follow_dropped: AtomicU64::new(0),
                write_errors,
            }),
        })
    }

    /// Sets (or replaces) the policy of `component` and creates its directory.
    pub fn register(&self, component: &str, policy: LogPolicy) -> Result<(), LogError> {
        check_name(component)?;
        fs::create_dir_all(&policy.dir).map_err(|source| LogError::CreateDir {
            path: policy.dir.clone(),
            source,
        })?;
        let policy = Arc::new(LogPolicy {
            max_file_bytes: policy.max_file_bytes.max(1),
            max_files: policy.max_files.max(1),
            ..policy
        });
        let mut components = self.components();
        match components.get_mut(component) {
            Some(channel) => channel.policy = policy,
            None => {
                components.insert(
                    Arc::from(component),
                    Channel {
                        policy,
                        follow: None,
                    },
                );
            }
        }
        Ok(())
    }

    /// Forgets `component` (removed from the config): its followers see the end of the
    /// log once they have read what was sent, its live file is closed, and lines still
    /// read from its pipes are no longer kept. Registering it again starts afresh.
    pub async fn unregister(&self, component: &str) {
        let Some((name, _)) = self.components().remove_entry(component) else {
            return;
        };
        // After every line queued before (the writer may be behind).
        let queue = self.inner.queue.clone();
        let _ = tokio::task::spawn_blocking(move || queue.send(WriterMsg::Close(name))).await;
    }

    /// Captures a process's stdout and stderr until both pipes close. Must be called
    /// inside a tokio runtime; `component` must be registered.
    pub fn attach<O, E>(&self, component: &str, stdout: O, stderr: E) -> Result<(), LogError>
    where
        O: AsyncRead + Unpin + Send + 'static,
        E: AsyncRead + Unpin + Send + 'static,
    {
        let (name, _, _) = self.route(component)?;
        tokio::spawn(
            self.clone()
                .read_stream(Arc::clone(&name), LogStream::Stdout, stdout),
        );
        tokio::spawn(self.clone().read_stream(name, LogStream::Stderr, stderr));
        Ok(())
    }

    /// Records one line as if the component had written it (for example a note of the
    /// agent's own about the component). Never blocks.
    pub fn record(&self, component: &str, stream: LogStream, text: &str) -> Result<(), LogError> {
        let (name, policy, follow) = self.route(component)?;
        self.push(&name, &policy, follow.as_ref(), stream, text.as_bytes());
        Ok(())
    }

    /// Waits until every line captured before this call is written to its file.
    pub async fn flush(&self) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        let queue = self.inner.queue.clone();
        tokio::task::spawn_blocking(move || queue.send(WriterMsg::Flush(tx)))
            .await
            .map_err(|e| LogError::Writer(e.to_string()))?
            .map_err(|_| LogError::Writer("writer thread stopped".into()))?;
        rx.await
            .map_err(|_| LogError::Writer("writer thread stopped".into()))
    }

    /// The last `n` lines of `component`, oldest first, across rotated files. Flushes
    /// first, so every line captured before the call is included (unless it was dropped).
    pub async fn tail(&self, component: &str, n: usize) -> Result<Vec<LogLine>, LogError> {
        let (name, policy, _) = self.route(component)?;
        self.flush().await?;
        tokio::task::spawn_blocking(move || tail_files(&policy, &name, n))
            .await
            .map_err(|e| LogError::Writer(e.to_string()))?
    }

    /// New lines of `component` from now on. A receiver that lags more than
    /// 1024 lines gets `RecvError::Lagged` and continues with newer lines.
    pub fn follow(&self, component: &str) -> Result<broadcast::Receiver<LogLine>, LogError> {
        check_name(component)?;
        let mut components = self.components();
        let channel = components
            .get_mut(component)
            .ok_or_else(|| LogError::UnknownComponent(component.to_owned()))?;
        match &channel.follow {
            Some(sender) => Ok(sender.subscribe()),
            None => {
                let (sender, receiver) = broadcast::channel(FOLLOW_LINES);
                channel.follow = Some(sender);
                Ok(receiver)
            }
        }
    }

    /// Live followers over all components (receivers of [`follow`](Self::follow)).
    pub fn followers(&self) -> u64 {
        self.components()
            .values()
            .filter_map(|c| c.follow.as_ref())
            .map(|f| u64::try_from(f.receiver_count()).unwrap_or(u64::MAX))
            .sum()
    }

    /// Lines dropped from the files because the writer fell behind.
    pub fn dropped_lines_total(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Counts `n` lines a follower lost by lagging behind [`follow`](Self::follow).
    pub fn follow_lagged(&self, n: u64) {
        self.inner.follow_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Lines followers lost by lagging.
    pub fn dropped_follow_lines_total(&self) -> u64 {
        self.inner.follow_dropped.load(Ordering::Relaxed)
    }

    /// Lines lost to file errors (disk full, permissions); each is also logged once per file.
    pub fn write_errors_total(&self) -> u64 {
        self.inner.write_errors.load(Ordering::Relaxed)
    }

    fn components(&self) -> MutexGuard<'_, HashMap<Arc<str>, Channel>> {
        // The map is only ever replaced entry by entry; a panic elsewhere cannot leave it torn.
        self.inner
            .components
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Where a line of `component` goes: its name, its policy and its followers, if any
    /// (a follow channel whose receivers are all gone is dropped here).
    #[allow(clippy::type_complexity)]
    fn route(
        &self,
        component: &str,
    ) -> Result<(Arc<str>, Arc<LogPolicy>, Option<broadcast::Sender<LogLine>>), LogError> {
        check_name(component)?;
        let mut components = self.components();
        let name = components
            .get_key_value(component)
            .map(|(name, _)| Arc::clone(name))
            .ok_or_else(|| LogError::UnknownComponent(component.to_owned()))?;
        let channel = components
            .get_mut(component)
            .ok_or_else(|| LogError::UnknownComponent(component.to_owned()))?;
        if channel
            .follow
            .as_ref()
            .is_some_and(|f| f.receiver_count() == 0)
        {
            channel.follow = None;
        }
        Ok((name, Arc::clone(&channel.policy), channel.follow.clone()))
    }

    async fn read_stream<R: AsyncRead + Unpin>(
        self,
        component: Arc<str>,
        stream: LogStream,
        pipe: R,
    ) {
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, pipe);
        let mut line: Vec<u8> = Vec::new();
        loop {
            let chunk = match reader.fill_buf().await {
                Ok(chunk) => chunk,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(component = %component, ?stream, %error, "log pipe read failed");
                    break;
                }
            };
            if chunk.is_empty() {
                break;
            }
            let room = MAX_LINE_BYTES - line.len();
            let (used, complete) = match chunk.iter().take(room).position(|&b| b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&chunk[..i]);
                    (i + 1, true)
                }
                None => {
                    let take = chunk.len().min(room);
                    line.extend_from_slice(&chunk[..take]);
                    (take, line.len() >= MAX_LINE_BYTES)
                }
            };
            reader.consume(used);
            if complete {
                self.emit(&component, stream, &line);
                line.clear();
            }
        }
        if !line.is_empty() {
            self.emit(&component, stream, &line);
        }
    }

    fn emit(&self, component: &Arc<str>, stream: LogStream, bytes: &[u8]) {
        // Look the policy up per line so a re-registered policy applies at once.
        if let Ok((_, policy, follow)) = self.route(component) {
            self.push(component, &policy, follow.as_ref(), stream, bytes);
        }
    }

    fn push(
        &self,
        component: &Arc<str>,
        policy: &Arc<LogPolicy>,
        follow: Option<&broadcast::Sender<LogLine>>,
        stream: LogStream,
        bytes: &[u8],
    ) {
        let line = LogLine {
            at_ms: now_ms(),
            stream,
            text: String::from_utf8_lossy(bytes).into_owned(),
        };
        if let Some(follow) = follow {
            // An error only means every follower left meanwhile.
            let _ = follow.send(line.clone());
        }
        let msg = WriterMsg::Line {
            component: Arc::clone(component),
            policy: Arc::clone(policy),
            line,
        };
        match self.inner.queue.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn check_name(component: &str) -> Result<(), LogError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if component.is_empty()
        || component.len() > 64
        || component.starts_with('.')
        || !component.chars().all(ok_char)
    {
        return Err(LogError::BadName(component.to_owned()));
    }
    Ok(())
}

fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn stream_tag(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "out",
        LogStream::Stderr => "err",
    }
}

/// Path of file `index` of a component: 0 is the live file.
fn file_path(policy: &LogPolicy, component: &str, index: u32) -> PathBuf {
    if index == 0 {
        policy.dir.join(format!("{component}.log"))
    } else {
        policy.dir.join(format!("{component}.log.{index}"))
    }
}

/// The live file of one component, as the writer thread holds it.
struct LiveFile {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
}

fn open_live(path: &Path) -> io::Result<LiveFile> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok(LiveFile {
        path: path.to_owned(),
        out: BufWriter::with_capacity(16 * 1024, file),
        size,
    })
}

/// Shifts `.log.k` → `.log.k+1`, deletes what falls beyond `max_files`, and renames the
/// live file to `.log.1` (or removes it when only one file is kept).
fn rotate(policy: &LogPolicy, component: &str) -> io::Result<()> {
    let live = file_path(policy, component, 0);
    if policy.max_files <= 1 {
        return remove_if_exists(&live);
    }
    let oldest = policy.max_files - 1;
    remove_if_exists(&file_path(policy, component, oldest))?;
    for index in (1..oldest).rev() {
        let from = file_path(policy, component, index);
        if from.exists() {
            fs::rename(&from, file_path(policy, component, index + 1))?;
        }
    }
    fs::rename(&live, file_path(policy, component, 1))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn writer_loop(rx: Receiver<WriterMsg>, write_errors: &AtomicU64) {
    let mut files: HashMap<Arc<str>, LiveFile> = HashMap::new();
    let mut failing: HashMap<PathBuf, ()> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                WriterMsg::Line {
                    component,
                    policy,
                    line,
                } => {
                    if let Err(error) = write_line(&mut files, &component, &policy, &line) {
                        write_errors.fetch_add(1, Ordering::Relaxed);
                        let path = file_path(&policy, &component, 0);
                        if failing.insert(path.clone(), ()).is_none() {
                            tracing::warn!(path = %path.display(), %error, "cannot write component log");
                        }
                        // Reopen on the next line: the file may have been removed or rotated away.
                        files.remove(&component);
                    }
                }
                WriterMsg::Flush(done) => {
                    flush_all(&mut files, write_errors);
                    let _ = done.send(());
                }
                WriterMsg::Close(component) => {
                    if let Some(mut live) = files.remove(&component) {
                        if let Err(error) = live.out.flush() {
                            write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(path = %live.path.display(), %error, "cannot flush component log");
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        // The queue is empty: hand what is buffered to the kernel.
        flush_all(&mut files, write_errors);
    }
    flush_all(&mut files, write_errors);
}

fn flush_all(files: &mut HashMap<Arc<str>, LiveFile>, write_errors: &AtomicU64) {
    files.retain(|_, live| match live.out.flush() {
        Ok(()) => true,
        Err(error) => {
            write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %live.path.display(), %error, "cannot flush component log");
            false
        }
    });
}

fn write_line(
    files: &mut HashMap<Arc<str>, LiveFile>,
    component: &Arc<str>,
    policy: &LogPolicy,
    line: &LogLine,
) -> io::Result<()> {
    let text = format!("{} {} {}\n", line.at_ms, stream_tag(line.stream), line.text);
    let len = text.len() as u64;
    let live_path = file_path(policy, component, 0);
    // A re-registered policy may have moved the directory.
    if files.get(component).is_some_and(|f| f.path != live_path) {
        files.remove(component);
    }
    let live = match files.entry(Arc::clone(component)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(open_live(&live_path)?),
    };
    if live.size > 0 && live.size + len > policy.max_file_bytes {
        live.out.flush()?;
        rotate(policy, component)?;
        *live = open_live(&live_path)?;
    }
    live.out.write_all(text.as_bytes())?;
    live.size += len;
    Ok(())
}

fn parse_line(text: &str) -> Option<LogLine> {
    let (at, rest) = text.split_once(' ')?;
    let (tag, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let stream = match tag {
        "out" => LogStream::Stdout,
        "err" => LogStream::Stderr,
        _ => return None,
    };
    Some(LogLine {
        at_ms: at.parse().ok()?,
        stream,
        text: body.to_owned(),
    })
}

fn tail_files(policy: &LogPolicy, component: &str, n: usize) -> Result<Vec<LogLine>, LogError> {
    // Newest file first; collect newest lines first, then reverse.
    let mut newest_first: Vec<LogLine> = Vec::new();
    for index in 0..policy.max_files {
        if newest_first.len() >= n {
            break;
        }
        let path = file_path(policy, component, index);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LogError::Read { path, source }),
        };
        let text = String::from_utf8_lossy(&bytes);
        for raw in text.lines().rev() {
            if newest_first.len() >= n {
                break;
            }
            if let Some(line) = parse_line(raw) {
                newest_first.push(line);
            }
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn policy(dir: &Path, max_file_bytes: u64, max_files: u32) -> LogPolicy {
        LogPolicy {
            dir: dir.to_owned(),
            max_file_bytes,
            max_files,
        }
    }

    fn files_of(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn rotates_at_size_and_keeps_count() -> Result<(), LogError> {
        let dir = tempfile::tempdir().map_err(|e| LogError::Writer(e.to_string()))?;
        let logs = Logs::start()?;
        // Each line: 13-digit millis + " out " + 10 chars + "\n" = 29 bytes; 3 per file.
        logs.register("web", policy(dir.path(), 90, 3))?;
        for i in 0..20 {
            logs.record("web", LogStream::Stdout, &format!("line-{i:05}"))?;
        }
        logs.flush().await?;
        assert_eq!(files_of(dir.path()), ["web.log", "web.log.1", "web.log.2"]);
        for name in files_of(dir.path()) {
            let len = fs::metadata(dir.path().join(&name))
                .map(|m| m.len())
                .unwrap_or(0);
            assert!(len <= 90, "{name} is {len} bytes");
            assert!(len > 0, "{name} is empty");
        }
        // 20 lines, 3 per file: the live file holds 2 (18, 19), .1 holds 15..17, .2 holds 12..14.
        let all = logs.tail("web", 100).await?;
        let texts: Vec<&str> = all.iter().map(|l| l.text.as_str()).collect();
        let expected: Vec<String> = (12..20).map(|i| format!("line-{i:05}")).collect();
        assert_eq!(texts, expected);
        Ok(())
    }

    #[tokio::test]
    async fn tail_spans_rotated_files() -> Result<(), LogError> {
        let dir = tempfile::tempdir().map_err(|e| LogError::Writer(e.to_string()))?;
        let logs = Logs::start()?;
        logs.register("db", policy(dir.path(), 64, 10))?;
        for i in 0..10 {
            let stream = if i % 2 == 0 {
                LogStream::Stdout
            } else {
                LogStream::Stderr
            };
            logs.record("db", stream, &format!("n{i}"))?;
        }
        let last = logs.tail("db", 4).await?;
        let texts: Vec<&str> = last.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["n6", "n7", "n8", "n9"]);
        assert_eq!(last[1].stream, LogStream::Stderr);
        assert!(
            files_of(dir.path()).len() > 2,
            "the 4 lines must span files"
        );
        assert!(logs.tail("db", 0).await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn single_file_policy_truncates() -> Result<(), LogError> {
        let dir = tempfile::tempdir().map_err(|e| LogError::Writer(e.to_string()))?;
        let logs = Logs::start()?;
        logs.register("one", policy(dir.path(), 40, 1))?;
        for i in 0..5 {
            logs.record("one", LogStream::Stdout, &format!("x{i}"))?;
        }
        logs.flush().await?;
        assert_eq!(files_of(dir.path()), ["one.log"]);
        let last = logs.tail("one", 10).await?;
        assert_eq!(last.last().map(|l| l.text.as_str()), Some("x4"));
        Ok(())
    }

    #[tokio::test]
    async fn captures_pipes_and_follow_sees_new_lines() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let logs = Logs::start()?;
        logs.register("svc", policy(dir.path(), 1 << 20, 2))?;
        let mut follow = logs.follow("svc")?;
        let (mut out_w, out_r) = tokio::io::duplex(64);
        let (mut err_w, err_r) = tokio::io::duplex(64);
        logs.attach("svc", out_r, err_r)?;
        out_w.write_all(b"hello\nwor").await?;
        err_w.write_all(b"oops\n").await?;
        out_w.write_all(b"ld\n").await?;
        let deadline = Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let line = tokio::time::timeout(deadline, follow.recv()).await??;
            seen.push((line.stream, line.text));
        }
        seen.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            seen,
            [
                (LogStream::Stdout, "hello".to_owned()),
                (LogStream::Stderr, "oops".to_owned()),
                (LogStream::Stdout, "world".to_owned()),
            ]
        );
        // A partial last line is kept when the pipe closes.
        out_w.write_all(b"tail-without-newline").await?;
        drop(out_w);
        let line = tokio::time::timeout(deadline, follow.recv()).await??;
        assert_eq!(line.text, "tail-without-newline");
        let tail = logs.tail("svc", 10).await?;
        assert_eq!(tail.len(), 4);
        Ok(())
    }

    #[tokio::test]
    async fn a_new_follower_after_the_last_left_sees_lines(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let logs = Logs::start()?;
        logs.register("f", policy(dir.path(), 1 << 20, 2))?;
        let first = logs.follow("f")?;
        drop(first);
        // Nobody follows: this line only goes to the file, and the channel is dropped.
        logs.record("f", LogStream::Stdout, "unseen")?;
        let mut second = logs.follow("f")?;
        logs.record("f", LogStream::Stdout, "seen")?;
        let line = tokio::time::timeout(Duration::from_secs(10), second.recv()).await??;
        assert_eq!(line.text, "seen");
        assert_eq!(logs.tail("f", 5).await?.len(), 2);
        Ok(())
    }

    /// Descriptors of this process open on files under `dir`.
    fn open_under(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir("/proc/self/fd")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| fs::read_link(e.path()).ok())
                    .filter(|target| target.starts_with(dir))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn unregister_ends_followers_and_closes_the_live_file(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let dir = dir.path().canonicalize()?;
        let logs = Logs::start()?;
        logs.register("gone", policy(&dir, 1 << 20, 2))?;
        let mut rx = logs.follow("gone")?;
        logs.record("gone", LogStream::Stdout, "last words")?;
        logs.flush().await?;
        assert_eq!(open_under(&dir).len(), 1, "the live file is open");
        logs.unregister("gone").await;
        // What was sent before still arrives, then the end.
        assert_eq!(rx.recv().await?.text, "last words");
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        logs.flush().await?;
        assert_eq!(open_under(&dir), Vec::<PathBuf>::new());
        assert!(matches!(
            logs.record("gone", LogStream::Stdout, "late"),
            Err(LogError::UnknownComponent(_))
        ));
        // Registered again, it starts afresh.
        logs.register("gone", policy(&dir, 1 << 20, 2))?;
        logs.record("gone", LogStream::Stdout, "again")?;
        assert_eq!(logs.tail("gone", 1).await?[0].text, "again");
        Ok(())
    }

    #[tokio::test]
    async fn long_lines_are_cut() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let logs = Logs::start()?;
        logs.register("big", policy(dir.path(), 1 << 20, 2))?;
        let mut follow = logs.follow("big")?;
        let (mut w, r) = tokio::io::duplex(4096);
        let (_err_w, err_r) = tokio::io::duplex(64);
        logs.attach("big", r, err_r)?;
        let payload = vec![b'a'; MAX_LINE_BYTES * 2 + 10];
        w.write_all(&payload).await?;
        w.write_all(b"\n").await?;
        let mut lens = Vec::new();
        while lens.len() < 3 {
            let line = tokio::time::timeout(Duration::from_secs(10), follow.recv()).await??;
            lens.push(line.text.len());
        }
        assert_eq!(lens, [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]);
        Ok(())
    }

    #[tokio::test]
    async fn refuses_bad_and_unknown_names() -> Result<(), LogError> {
        let logs = Logs::start()?;
        assert!(matches!(
            logs.tail("../etc", 1).await,
            Err(LogError::BadName(_))
        ));
        assert!(matches!(
            logs.tail(".hidden", 1).await,
            Err(LogError::BadName(_))
        ));
        assert!(matches!(
            logs.follow("nobody"),
            Err(LogError::UnknownComponent(_))
        ));
        Ok(())
    }

    #[test]
    fn parses_what_it_writes_and_skips_junk() {
        assert_eq!(
            parse_line("1700000000000 err a b  c"),
            Some(LogLine {
                at_ms: 1_700_000_000_000,
                stream: LogStream::Stderr,
                text: "a b  c".into()
            })
        );
        assert_eq!(parse_line("17 out").map(|l| l.text), Some(String::new()));
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line("12 xyz text"), None);
        assert_eq!(parse_line("x out text"), None);
    }
}
