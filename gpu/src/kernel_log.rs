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
}

impl KernelLogTail {
    /// Starts following `path`, skipping what it already holds.
    pub fn new(path: &Path) -> KernelLogTail {
        let mut tail = KernelLogTail {
            path: path.to_owned(),
            file: None,
            position: 0,
            partial: Vec::new(),
            buf: vec![0; 16 * 1024],
            open_error_logged: false,
            problem: None,
        };
        tail.open(true);
        tail
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

    /// Reads what arrived since the last call and hands each complete line to `line`.
    pub fn poll(&mut self, mut line: impl FnMut(&str)) {
        if self.file.is_none() {
            self.open(false);
        }
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
                Ok(0) => break,
                Ok(n) => {
                    self.position += n as u64;
                    self.partial.extend_from_slice(&self.buf[..n]);
                    while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                        let text = String::from_utf8_lossy(&self.partial[..end]).into_owned();
                        self.partial.drain(..=end);
                        line(&text);
                    }
                    if self.partial.len() > MAX_LINE {
                        self.partial.clear();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
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
