//! Kernel log `NVRM: Xid` lines: parsing, PCI address matching, and a non-blocking
//! tail over `/dev/kmsg` or a plain file (tests feed a file).

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A PCI address (domain, bus, device), the part kernel lines and NVML agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u32,
    pub device: u32,
}

impl PciAddress {
    /// Parses `0000:3b:00`, `00000000:3B:00.0` and the like.
    pub fn parse(text: &str) -> Option<PciAddress> {
        let mut parts = text.trim().split(':');
        let (domain, bus, rest) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let device = rest.split('.').next()?;
        Some(PciAddress {
            domain: u32::from_str_radix(domain, 16).ok()?,
            bus: u32::from_str_radix(bus, 16).ok()?,
            device: u32::from_str_radix(device, 16).ok()?,
        })
    }
}

/// An XID from a kernel log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelXid {
    pub pci: PciAddress,
    pub xid: u32,
}

/// Parses a line such as `NVRM: Xid (PCI:0000:3b:00): 79, pid=..., GPU has fallen off the bus.`
/// in dmesg or `/dev/kmsg` form (`6,1234,5678,-;NVRM: Xid ...`). Other lines give `None`.
pub fn parse_xid_line(line: &str) -> Option<KernelXid> {
    let rest = &line[line.find("NVRM: Xid (")? + "NVRM: Xid (".len()..];
    let (address, rest) = rest.split_once("):")?;
    let address = address.strip_prefix("PCI:").unwrap_or(address);
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some(KernelXid {
        pci: PciAddress::parse(address)?,
        xid: digits.parse().ok()?,
    })
}

/// A `/dev/kmsg` record's header: `<prio>,<seq>,<usec since boot>,<flags>[,...];<text>`.
/// `None` for a line without one (dmesg form, a continuation line).
pub fn parse_kmsg_header(line: &str) -> Option<(u64, u64)> {
    let (header, _) = line.split_once(';')?;
    let mut fields = header.split(',');
    let _priority: u32 = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let usec = fields.next()?.parse().ok()?;
    Some((seq, usec))
}

/// How far the kernel log was reported: the boot it belongs to (`/proc/sys/kernel/random/boot_id`)
/// and the last kmsg sequence number whose XIDs were handed out (the agent persists it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLogCursor {
    pub boot_id: String,
    pub seq: u64,
}

impl KernelLogCursor {
    /// The stored form: `<boot id> <seq>`.
    pub fn encode(&self) -> String {
        format!("{} {}", self.boot_id, self.seq)
    }

    /// Parses [`encode`](Self::encode)'s form; `None` when damaged.
    pub fn decode(text: &str) -> Option<KernelLogCursor> {
        let (boot_id, seq) = text.trim().rsplit_once(' ')?;
        Some(KernelLogCursor {
            boot_id: boot_id.to_owned(),
            seq: seq.parse().ok()?,
        })
    }

    /// The sequence number to resume after: `stored`'s while it is of boot `boot_id`;
    /// `None` (every record the log holds is new to us) after a reboot or without one.
    pub fn resume_after(stored: Option<&KernelLogCursor>, boot_id: &str) -> Option<u64> {
        stored.filter(|c| c.boot_id == boot_id).map(|c| c.seq)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), `None` when it cannot be read.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Time since boot in microseconds (`/proc/uptime`), `None` when it cannot be read.
pub fn uptime_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    // A float to integer `as` saturates; the value is checked finite and non-negative.
    (seconds.is_finite() && seconds >= 0.0).then_some((seconds * 1e6) as u64)
}

/// What to do with one kernel log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineClass {
    /// Already reported by an earlier run, or old text that cannot be told apart: skip.
    Skip,
    /// Written while the agent runs: a new fault.
    Live,
    /// Written before the agent started and never reported: stored once, marked
    /// historical, at its own wall-clock time.
    Historical { ts_ms: i64 },
}

/// Sorts kernel log lines into new, historical and already reported (pure: the clock
/// values are given). kmsg records carry a sequence number and their time since boot;
/// lines without a header are new only once the tail caught up with what the log held.
#[derive(Debug, Clone)]
pub struct KmsgFilter {
    /// Records with a sequence number up to this one were reported by an earlier run.
    after: Option<u64>,
    /// The agent's start, in microseconds since boot.
    start_us: u64,
    /// Wall-clock milliseconds at boot.
    boot_ms: i64,
    /// The highest sequence number seen.
    last_seq: Option<u64>,
}

impl KmsgFilter {
    /// `after`: the sequence number reported up to (from the stored cursor of this
    /// boot); `start_us`: now in microseconds since boot; `now_ms`: now on the wall clock.
    pub fn new(after: Option<u64>, start_us: u64, now_ms: i64) -> KmsgFilter {
        let start_ms = i64::try_from(start_us / 1000).unwrap_or(i64::MAX);
        KmsgFilter {
            after,
            start_us,
            boot_ms: now_ms.saturating_sub(start_ms),
            last_seq: None,
        }
    }

    /// Classifies `line`; `catching_up`: it was in the log when the tail opened it.
    pub fn classify(&mut self, line: &str, catching_up: bool) -> LineClass {
        let Some((seq, usec)) = parse_kmsg_header(line) else {
            return if catching_up {
                LineClass::Skip
            } else {
                LineClass::Live
            };
        };
        self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
        if self.after.is_some_and(|after| seq <= after) {
            return LineClass::Skip;
        }
        if usec < self.start_us {
            let ms = i64::try_from(usec / 1000).unwrap_or(i64::MAX);
            return LineClass::Historical {
                ts_ms: self.boot_ms.saturating_add(ms),
            };
        }
        LineClass::Live
    }

    /// The highest sequence number seen so far.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }
}

/// Largest partial line kept while waiting for its end.
const MAX_LINE: usize = 64 * 1024;

/// Follows a kernel log source without blocking: `/dev/kmsg` (one record per read) or
/// a file that grows (and may be truncated). Opens lazily: a file missing at start is
/// read from its beginning once it appears; one present at start from its end.
#[derive(Debug)]
pub struct KernelLogTail {
    path: PathBuf,
    file: Option<File>,
    position: u64,
    partial: Vec<u8>,
    buf: Vec<u8>,
    open_error_logged: bool,
    /// Why the log cannot be read now (`None` while it can).
    problem: Option<String>,
    /// Still reading what the log held when it was opened (no read came up empty yet).
    catching_up: bool,
}

impl KernelLogTail {
    /// Starts following `path`, skipping what it already holds.
    pub fn new(path: &Path) -> KernelLogTail {
        let mut tail = KernelLogTail::unopened(path);
        tail.open(true);
        tail
    }

    /// Starts following `path` from what it already holds (`/dev/kmsg`: the oldest record
    /// of its ring buffer); [`poll`](Self::poll) says which lines were there at the start.
    pub fn from_start(path: &Path) -> KernelLogTail {
        let mut tail = KernelLogTail::unopened(path);
        tail.catching_up = true;
        tail.open(false);
        // A log that appears later holds only what was written since.
        tail.catching_up = tail.file.is_some();
        tail
    }

    fn unopened(path: &Path) -> KernelLogTail {
        KernelLogTail {
            path: path.to_owned(),
            file: None,
            position: 0,
            partial: Vec::new(),
            buf: vec![0; 16 * 1024],
            open_error_logged: false,
            problem: None,
            catching_up: false,
        }
    }

    /// Whether the lines handed out now were in the log when it was opened.
    pub fn catching_up(&self) -> bool {
        self.catching_up
    }

    fn open(&mut self, skip_existing: bool) {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path);
        match opened {
            Ok(mut file) => {
                self.position = if skip_existing {
                    file.seek(SeekFrom::End(0)).unwrap_or(0)
                } else {
                    0
                };
                self.file = Some(file);
                self.problem = None;
            }
            Err(error) => {
                if !self.open_error_logged {
                    self.open_error_logged = true;
                    tracing::warn!(path = %self.path.display(), %error, "kernel log not readable; XIDs come from NVML events only (XIDs that arrive together can be lost)");
                }
                self.problem = Some(format!("{}: {error}", self.path.display()));
            }
        }
    }

    /// Why the kernel log cannot be read now; `None` while it can.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// Reads what arrived since the last call and hands each complete line to `line`
    /// with whether it was in the log when it was opened ([`from_start`](Self::from_start)).
    pub fn poll(&mut self, line: impl FnMut(&str)) {
        let mut line = line;
        self.poll_lines(|text, _| line(text));
    }

    /// [`poll`](Self::poll), telling each line whether it was in the log at the start.
    pub fn poll_lines(&mut self, mut line: impl FnMut(&str, bool)) {
        if self.file.is_none() {
            self.open(false);
        }
        let catching_up = self.catching_up;
        let Some(file) = self.file.as_mut() else {
            return;
        };
        if let Ok(meta) = file.metadata() {
            if meta.is_file() && meta.len() < self.position {
                // Truncated or rotated in place: start over.
                self.position = file.seek(SeekFrom::Start(0)).unwrap_or(0);
                self.partial.clear();
            }
        }
        loop {
            match file.read(&mut self.buf) {
                Ok(0) => {
                    self.catching_up = false;
                    break;
                }
                Ok(n) => {
                    self.position += n as u64;
                    self.partial.extend_from_slice(&self.buf[..n]);
                    while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                        let text = String::from_utf8_lossy(&self.partial[..end]).into_owned();
                        self.partial.drain(..=end);
                        line(&text, catching_up);
                    }
                    if self.partial.len() > MAX_LINE {
                        self.partial.clear();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.catching_up = false;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // /dev/kmsg: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "reading kernel log");
                    self.problem = Some(format!("{}: {error}", self.path.display()));
                    self.file = None;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_dmesg_and_kmsg_forms() {
        let cases = [
            (
                "[ 1234.5] NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
                Some((0x3b, 79)),
            ),
            ("6,1234,5678,-;NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception", Some((1, 13))),
            ("NVRM: Xid (0000:02:00): 48, An uncorrectable double bit error", Some((2, 48))),
            ("NVRM: GPU at PCI:0000:01:00: GPU-abc", None),
            ("NVRM: Xid (PCI:zz:01:00): 13", None),
            ("NVRM: Xid (PCI:0000:01:00): , x", None),
        ];
        for (line, expected) in cases {
            let got = parse_xid_line(line).map(|x| (x.pci.bus, x.xid));
            assert_eq!(got, expected, "{line}");
        }
        assert_eq!(
            PciAddress::parse("00000000:3B:00.0"),
            PciAddress::parse("0000:3b:00")
        );
    }

    #[test]
    fn tail_skips_history_reads_growth_and_survives_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "old line\n").unwrap();
        let mut tail = KernelLogTail::new(&path);
        let mut seen = Vec::new();
        tail.poll(|l| seen.push(l.to_owned()));
        assert!(seen.is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(f, "one\ntw").unwrap();
        tail.poll(|l| seen.push(l.to_owned()));
        f.write_all(b"o\n").unwrap();
        tail.poll(|l| seen.push(l.to_owned()));
        assert_eq!(seen, ["one", "two"]);
        std::fs::write(&path, "x\n").unwrap();
        tail.poll(|l| seen.push(l.to_owned()));
        assert_eq!(seen.last().map(String::as_str), Some("x"));
    }

    #[test]
    fn kmsg_filter_skips_what_was_reported_and_marks_what_came_before_the_start() {
        // Started 100 s after boot, at wall time 1,000,000 ms; reported up to seq 5.
        let mut filter = KmsgFilter::new(Some(5), 100_000_000, 1_000_000);
        let xid = "NVRM: Xid (PCI:0000:01:00): 13, x";
        assert_eq!(
            filter.classify(&format!("3,5,50000000,-;{xid}"), true),
            LineClass::Skip
        );
        assert_eq!(
            filter.classify(&format!("3,6,60000000,-;{xid}"), true),
            LineClass::Historical {
                ts_ms: 900_000 + 60_000
            }
        );
        assert_eq!(
            filter.classify(&format!("3,7,100000001,-;{xid}"), false),
            LineClass::Live
        );
        assert_eq!(
            filter.classify(xid, true),
            LineClass::Skip,
            "no header, old"
        );
        assert_eq!(
            filter.classify(xid, false),
            LineClass::Live,
            "no header, new"
        );
        assert_eq!(filter.last_seq(), Some(7));
        // Without a cursor (first run, or a reboot) nothing is skipped.
        let mut fresh = KmsgFilter::new(None, 100_000_000, 1_000_000);
        assert!(matches!(
            fresh.classify(&format!("3,1,1,-;{xid}"), true),
            LineClass::Historical { .. }
        ));
    }

    #[test]
    fn a_cursor_of_another_boot_is_not_resumed() {
        let stored = KernelLogCursor {
            boot_id: "boot-a".into(),
            seq: 42,
        };
        assert_eq!(
            KernelLogCursor::decode(&stored.encode()),
            Some(stored.clone())
        );
        assert_eq!(
            KernelLogCursor::resume_after(Some(&stored), "boot-a"),
            Some(42)
        );
        assert_eq!(KernelLogCursor::resume_after(Some(&stored), "boot-b"), None);
        assert_eq!(KernelLogCursor::resume_after(None, "boot-a"), None);
        assert_eq!(KernelLogCursor::decode("garbage"), None);
    }

    #[test]
    fn tail_from_start_reads_what_the_log_held_then_growth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "old\n").unwrap();
        let mut tail = KernelLogTail::from_start(&path);
        let mut seen = Vec::new();
        tail.poll_lines(|l, old| seen.push((l.to_owned(), old)));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"new\n")
            .unwrap();
        tail.poll_lines(|l, old| seen.push((l.to_owned(), old)));
        assert_eq!(seen, [("old".to_owned(), true), ("new".to_owned(), false)]);
    }

    #[test]
    fn tail_of_missing_file_reads_it_from_the_start_when_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("later");
        let mut tail = KernelLogTail::new(&path);
        let mut seen = Vec::new();
        tail.poll(|l| seen.push(l.to_owned()));
        std::fs::write(&path, "first\n").unwrap();
        tail.poll(|l| seen.push(l.to_owned()));
        assert_eq!(seen, ["first"]);
    }
}
