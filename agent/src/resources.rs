//! Per-component resource figures from procfs: CPU, RSS, open files and threads of a
//! process tree, and the same for watched processes found by name or command line.
//!
//! **Cheap by design.** A tree is walked through `/proc/<pid>/task/<tid>/children`, so a
//! tick reads a handful of small files per process of the tree, never the whole of
//! `/proc` (when the kernel lacks `children` files, one scan of `/proc` per call is the
//! fallback). Watched processes are found by scanning `/proc`, but the matches are cached
//! and the scan is repeated only when a match died or every [`WATCH_RESCAN_TICKS`] samples.
//!
//! **CPU.** `cpu_seconds` is the user + system time of the tree's live processes;
//! `cpu_percent` is the CPU time used between two samples of the same key over the
//! wall time between them (100 = one core), `None` on the first sample of a key. A
//! process that joined the tree since the last sample counts with all its CPU time.
//! `rss_bytes` is the sum of resident set sizes (shared pages count once per process).
#![forbid(unsafe_code)]

use crate::config::WatchMatch;
use crate::process::{read_proc_file, read_stat, ProcStat, ProcessId};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Samples between two full `/proc` scans for a watched process whose matches all live.
pub const WATCH_RESCAN_TICKS: u32 = 10;

/// Resource figures of one process tree (or set of trees) at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Live processes counted.
    pub processes: u32,
    pub cpu_seconds: f64,
    /// Since the previous sample of the same key; `None` on the first.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
    pub open_files: u64,
    pub threads: u64,
}

struct Previous {
    at: Instant,
    ticks: HashMap<ProcessId, u64>,
}

struct Watched {
    pids: Vec<ProcessId>,
    samples_since_scan: u32,
}

/// Keeps what is needed between ticks to compute CPU percentages. One per agent.
pub struct Sampler {
    ticks_per_second: f64,
    page_size: u64,
    previous: HashMap<String, Previous>,
    watched: HashMap<String, Watched>,
    own_pid: u32,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("keys", &self.previous.len())
            .finish()
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    pub fn new() -> Sampler {
        use nix::unistd::{sysconf, SysconfVar};
        let positive = |v: SysconfVar, default: i64| match sysconf(v) {
            Ok(Some(n)) if n > 0 => n,
            _ => default,
        };
        Sampler {
            ticks_per_second: positive(SysconfVar::CLK_TCK, 100) as f64,
            page_size: positive(SysconfVar::PAGE_SIZE, 4096) as u64,
            previous: HashMap::new(),
            watched: HashMap::new(),
            own_pid: std::process::id(),
        }
    }

    /// Figures of the process tree rooted at `root` (the component's process and all its
    /// descendants), remembered under `key`. `None` if `root` is gone.
    pub fn sample_tree(&mut self, key: &str, root: u32) -> Option<Usage> {
        let stat = read_stat(root).filter(|s| s.state != 'Z')?;
        let members = tree(root, stat);
        Some(self.account(key, &members))
    }

    /// Figures of the processes matching `matcher` (and their descendants), remembered
    /// under `key`. Zero processes when nothing matches. The agent itself never matches.
    pub fn sample_watch(&mut self, key: &str, matcher: &WatchMatch) -> Usage {
        let rescan = match self.watched.get(key) {
            None => true,
            Some(w) => {
                w.pids.is_empty()
                    || w.samples_since_scan >= WATCH_RESCAN_TICKS
                    || w.pids.iter().any(|&id| !crate::process::is_alive(id))
            }
        };
        if rescan {
            let pids = find_matching(matcher, self.own_pid);
            self.watched.insert(
                key.to_owned(),
                Watched {
                    pids,
                    samples_since_scan: 0,
                },
            );
        }
        let mut members: Vec<(u32, ProcStat)> = Vec::new();
        let mut seen = HashSet::new();
        if let Some(w) = self.watched.get_mut(key) {
            w.samples_since_scan += 1;
            for id in &w.pids {
                let Some(stat) = read_stat(id.pid).filter(|s| s.start_time == id.start_time) else {
                    continue;
                };
                for (pid, stat) in tree(id.pid, stat) {
                    if seen.insert(pid) {
                        members.push((pid, stat));
                    }
                }
            }
        }
        self.account(key, &members)
    }

    /// The live processes counted in the latest sample of `key`.
    pub fn members(&self, key: &str) -> impl Iterator<Item = u32> + '_ {
        self.previous
            .get(key)
            .into_iter()
            .flat_map(|p| p.ticks.keys().map(|id| id.pid))
    }

    /// Drops what is remembered under `key` (a removed component or watch).
    pub fn forget(&mut self, key: &str) {
        self.previous.remove(key);
        self.watched.remove(key);
    }

    fn account(&mut self, key: &str, members: &[(u32, ProcStat)]) -> Usage {
        let now = Instant::now();
        let mut usage = Usage::default();
        let mut ticks = HashMap::with_capacity(members.len());
        let mut total_ticks = 0u64;
        for &(pid, stat) in members {
            if stat.state == 'Z' {
                continue;
            }
            usage.processes += 1;
            usage.threads += stat.threads;
            usage.rss_bytes += stat.rss_pages * self.page_size;
            usage.open_files += open_files(pid);
            total_ticks += stat.cpu_ticks;
            ticks.insert(
                ProcessId {
                    pid,
                    start_time: stat.start_time,
                },
                stat.cpu_ticks,
            );
        }
        usage.cpu_seconds = total_ticks as f64 / self.ticks_per_second;
        if let Some(previous) = self.previous.get(key) {
            let used: u64 = ticks
                .iter()
                .map(|(id, &t)| t.saturating_sub(previous.ticks.get(id).copied().unwrap_or(0)))
                .sum();
            let elapsed = now.duration_since(previous.at).as_secs_f64();
            if elapsed > 0.0 {
                usage.cpu_percent = Some(100.0 * used as f64 / self.ticks_per_second / elapsed);
            }
        }
        self.previous
            .insert(key.to_owned(), Previous { at: now, ticks });
        usage
    }
}

/// Pids of `root` and its live descendants (for mapping GPU processes to components);
/// empty when `root` is gone.
pub fn tree_pids(root: u32) -> Vec<u32> {
    match read_stat(root).filter(|s| s.state != 'Z') {
        Some(stat) => tree(root, stat)
            .into_iter()
            .filter(|(_, s)| s.state != 'Z')
            .map(|(pid, _)| pid)
            .collect(),
        None => Vec::new(),
    }
}

/// `root` and its live descendants with their stats.
fn tree(root: u32, root_stat: ProcStat) -> Vec<(u32, ProcStat)> {
    let mut members = vec![(root, root_stat)];
    let mut next = 0;
    let mut children_file_works = true;
    while next < members.len() {
        let (pid, stat) = members[next];
        next += 1;
        match children_of(pid, stat.threads) {
            Some(children) => {
                for child in children {
                    if let Some(stat) = read_stat(child) {
                        members.push((child, stat));
                    }
                }
            }
            None => {
                children_file_works = false;
                break;
            }
        }
    }
    if children_file_works {
        return members;
    }
    // Fallback: one scan of /proc, then a walk of the parent links.
    let all: Vec<(u32, ProcStat)> = all_pids()
        .filter_map(|pid| read_stat(pid).map(|s| (pid, s)))
        .collect();
    let mut members = vec![(root, root_stat)];
    let mut in_tree: HashSet<u32> = HashSet::from([root]);
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, stat) in &all {
            if !in_tree.contains(&pid) && in_tree.contains(&stat.ppid) {
                in_tree.insert(pid);
                members.push((pid, stat));
                grew = true;
            }
        }
    }
    members
}

/// Children of every thread of `pid`; `None` when the kernel has no `children` files.
/// A single-threaded process has one task, named like the process: its `children` file
/// is read directly, without listing the task directory.
fn children_of(pid: u32, threads: u64) -> Option<Vec<u32>> {
    if threads == 1 {
        match read_proc_file(&format!("/proc/{pid}/task/{pid}/children")) {
            Ok(text) => return Some(parse_pids(&text).collect()),
            // Gone meanwhile, or grew threads since its stat was read: list the tasks.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return Some(Vec::new()),
        }
    }
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks,
        // The process ended meanwhile: it has no children to count.
        Err(_) => return Some(Vec::new()),
    };
    let mut children = Vec::new();
    for task in tasks.filter_map(|t| t.ok()) {
        let path = task.path().join("children");
        match path
            .to_str()
            .map_or_else(|| std::fs::read_to_string(&path), read_proc_file)
        {
            Ok(text) => children.extend(parse_pids(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None
            }
            Err(_) => {}
        }
    }
    Some(children)
}

fn parse_pids(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_ascii_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
}

/// Open file descriptors of `pid`. Since Linux 6.2 the size `stat` reports for
/// `/proc/<pid>/fd` is that count, one system call instead of listing the directory;
/// older kernels report 0 there, and the directory is listed.
fn open_files(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/fd");
    match std::fs::metadata(&path) {
        Ok(meta) if meta.len() > 0 => meta.len(),
        Ok(_) => std::fs::read_dir(&path)
            .map(|rd| rd.count() as u64)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
}

/// Processes matching `matcher` now, except `own_pid` and kernel threads.
pub fn find_matching(matcher: &WatchMatch, own_pid: u32) -> Vec<ProcessId> {
    let mut found = Vec::new();
    for pid in all_pids() {
        if pid == own_pid {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // Kernel threads have an empty command line.
        if cmdline.is_empty() {
            continue;
        }
        let matches = match matcher {
            WatchMatch::Name(name) => {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
                let base = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
                comm.trim_end_matches('\n') == name || base == name.as_bytes()
            }
            WatchMatch::Cmdline(fragment) => {
                let joined: Vec<u8> = cmdline
                    .strip_suffix(&[0])
                    .unwrap_or(&cmdline)
                    .iter()
                    .map(|&b| if b == 0 { b' ' } else { b })
                    .collect();
                String::from_utf8_lossy(&joined).contains(fragment.as_str())
            }
        };
        if matches {
            if let Some(stat) = read_stat(pid).filter(|s| s.state != 'Z') {
                found.push(ProcessId {
                    pid,
                    start_time: stat.start_time,
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{kill_tree, spawn, SpawnSpec};
    use std::time::Duration;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec {
            component: "t".into(),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            ..SpawnSpec::default()
        }
    }

    async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = check() {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn sums_a_tree_with_its_grandchildren() -> TestResult {
        // The shell opens 3 extra fds (inherited by all); a child sleeps; a subshell spins
        // with a sleeping child of its own.
        let script = "exec 7</dev/null 8</dev/null 9</dev/null; sleep 100 & (sleep 100 & while :; do :; done) & wait";
        let mut child = spawn(&sh(script), None)?;
        let mut sampler = Sampler::new();
        let first = until("4 processes in the tree", || {
            sampler
                .sample_tree("c", child.pid())
                .filter(|u| u.processes == 4)
        })
        .await?;
        assert!(first.rss_bytes > 0);
        assert!(first.threads >= 4);
        // sh, its sleep, the subshell and its sleep: stdin/out/err and fds 7-9 each.
        assert!(first.open_files >= 4 * 6, "{first:?}");
        // The spinning subshell burns CPU: wait until a sample shows it.
        let busy = until("CPU use", || {
            std::thread::sleep(Duration::from_millis(50));
            sampler
                .sample_tree("c", child.pid())
                .filter(|u| u.cpu_percent.is_some_and(|p| p > 5.0))
        })
        .await?;
        assert!(busy.cpu_percent.is_some_and(|p| p < 400.0), "{busy:?}");
        assert!(busy.cpu_seconds >= first.cpu_seconds);
        let pids = tree_pids(child.pid());
        assert_eq!(pids.len(), 4, "{pids:?}");
        assert_eq!(pids[0], child.pid());
        kill_tree(child.pgid())?;
        child.wait().await?;
        assert_eq!(sampler.sample_tree("c", child.pid()), None);
        assert!(tree_pids(child.pid()).is_empty());
        Ok(())
    }

    #[test]
    fn finds_children_of_any_thread_and_counts_open_files() -> TestResult {
        // A child forked by a second thread is listed in that thread's `children` file,
        // not the main thread's: the walk must look at every task of a threaded process.
        let mut child = std::thread::spawn(|| {
            std::process::Command::new("sleep")
                .arg("100")
                .stdin(std::process::Stdio::null())
                .spawn()
        })
        .join()
        .map_err(|_| "spawning thread panicked")??;
        let pids = tree_pids(std::process::id());
        let listed = std::fs::read_dir(format!("/proc/{}/fd", child.id()))?.count() as u64;
        let counted = open_files(child.id());
        child.kill()?;
        child.wait()?;
        assert!(pids.contains(&child.id()), "{pids:?}");
        assert_eq!(counted, listed);
        assert!(counted >= 3, "{counted}");
        Ok(())
    }

    #[tokio::test]
    async fn first_sample_has_no_percent_and_idle_is_near_zero() -> TestResult {
        let mut child = spawn(&sh("sleep 100"), None)?;
        let mut sampler = Sampler::new();
        let first = sampler.sample_tree("idle", child.pid()).ok_or("alive")?;
        assert_eq!(first.cpu_percent, None);
        assert!(first.processes >= 1);
        std::thread::sleep(Duration::from_millis(100));
        let second = sampler.sample_tree("idle", child.pid()).ok_or("alive")?;
        assert!(second.cpu_percent.is_some_and(|p| p < 50.0), "{second:?}");
        sampler.forget("idle");
        assert_eq!(
            sampler
                .sample_tree("idle", child.pid())
                .map(|u| u.cpu_percent),
            Some(None)
        );
        kill_tree(child.pgid())?;
        child.wait().await?;
        Ok(())
    }

    #[tokio::test]
    async fn watched_processes_by_name_and_cmdline() -> TestResult {
        // A unique argument so only this test's process matches the fragment.
        let marker = format!("razar-watch-{}", std::process::id());
        let mut child = spawn(
            &SpawnSpec {
                component: "w".into(),
                program: "sh".into(),
                args: vec!["-c".into(), "sleep 100; : \"$0\"".into(), marker.clone()],
                ..SpawnSpec::default()
            },
            None,
        )?;
        let mut sampler = Sampler::new();
        let by_cmdline = WatchMatch::Cmdline(marker.clone());
        // The sh and its sleep child.
        let usage = until("the watched tree", || {
            Some(sampler.sample_watch("frag", &by_cmdline)).filter(|u| u.processes == 2)
        })
        .await?;
        assert!(usage.rss_bytes > 0);
        // Only the shell: its child matches too, but only until it has exec'd `sleep`.
        until("only the shell matches", || {
            let found = find_matching(&by_cmdline, std::process::id());
            (found.iter().map(|p| p.pid).collect::<Vec<_>>() == [child.pid()]).then_some(())
        })
        .await?;
        // By name: our sleep is among the `sleep` processes found.
        let sleeps = until("sleep by name", || {
            let found = find_matching(&WatchMatch::Name("sleep".into()), std::process::id());
            (!found.is_empty()).then_some(found)
        })
        .await?;
        assert!(sleeps.iter().all(|p| read_stat(p.pid).is_some()));
        assert!(find_matching(&WatchMatch::Name("razar-no-such-process".into()), 0).is_empty());
        kill_tree(child.pgid())?;
        child.wait().await?;
        // The match died: the next sample rescans and finds nothing.
        let gone = until("watched process gone", || {
            Some(sampler.sample_watch("frag", &by_cmdline)).filter(|u| u.processes == 0)
        })
        .await?;
        assert_eq!(gone.rss_bytes, 0);
        Ok(())
    }
}
