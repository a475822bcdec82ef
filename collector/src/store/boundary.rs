//! The store boundary's rules, pure: what the collector stores of an agent's values and
//! what it refuses by rule, so PostgreSQL never refuses a batch because of its data.
//!
//! - Text ([`clean`]): PostgreSQL's `text` and `jsonb` refuse U+0000, so a NUL becomes
//!   U+FFFD; every field has a length cap (cut at a character boundary). A clean string
//!   within its cap is borrowed, not copied: the check is one scan of its bytes.
//! - Sample timestamps must fall in [`Window`]: `[now - retention, now + max_clock_skew]`;
//!   a sample outside it is refused (a bad agent clock must not create partitions).
//! - Series: at most [`IngestRules::max_series_per_host`] per host, and a series key
//!   (metric and labels) small enough for its unique index ([`MAX_SERIES_KEY_BYTES`]).
//! - Event timestamps outside the window are replaced by the collector's time: the
//!   event is kept (the agent's clock is noted in its message).
//!
//! What is refused is counted per [`Reason`] and recorded as an event on the host.

use std::borrow::Cow;
use std::time::Duration;

use razar_shared::protocol::EventKind;

/// Longest stored event message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Longest stored name, id or short text (component names, revisions, versions, GPU
/// fields, metric names, label names and values, event codes), in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most entries kept of a list carried by an event (`ConfigReloaded::changed`).
pub const MAX_LIST_ENTRIES: usize = 256;
/// Largest series key (metric plus labels, 8 bytes of overhead per label): the
/// `(host_id, metric, labels)` unique index refuses rows above about 2,700 bytes.
pub const MAX_SERIES_KEY_BYTES: usize = 2048;
/// Most labels on one series.
pub const MAX_LABELS: usize = 64;

/// The earliest time stored (the Unix epoch): an agent clock before it is wrong.
pub const EARLIEST_MS: i64 = 0;
/// The latest time stored (9999-12-31T23:59:59.999Z), which PostgreSQL, chrono and
/// the partition names all represent.
pub const LATEST_MS: i64 = 253_402_300_799_999;

/// How the store bounds what agents send. [`IngestRules::default`] gives the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestRules {
    /// Samples older than this (the history kept) are refused.
    pub retention: Duration,
    /// Samples further in the future than this are refused.
    pub max_clock_skew: Duration,
    /// Series a host may define; definitions past it are refused.
    pub max_series_per_host: u32,
}

impl Default for IngestRules {
    /// 30 days of retention, 5 minutes of clock skew, 100,000 series per host.
    fn default() -> IngestRules {
        IngestRules {
            retention: Duration::from_secs(30 * 86_400),
            max_clock_skew: Duration::from_secs(5 * 60),
            max_series_per_host: 100_000,
        }
    }
}

impl IngestRules {
    /// The window of sample timestamps accepted at `now_ms`, within
    /// [`EARLIEST_MS`, `LATEST_MS`] whatever the rules say.
    pub fn window(&self, now_ms: i64) -> Window {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Window {
            now_ms: now_ms.clamp(EARLIEST_MS, LATEST_MS),
            lo_ms: now_ms.saturating_sub(ms(self.retention)).max(EARLIEST_MS),
            hi_ms: now_ms
                .saturating_add(ms(self.max_clock_skew))
                .clamp(EARLIEST_MS, LATEST_MS),
        }
    }
}

/// Sample timestamps accepted, both ends included, fixed when a request is checked (its
/// partitions are created for this window, so the commit uses the same one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The collector's time when the window was taken.
    pub now_ms: i64,
    pub lo_ms: i64,
    pub hi_ms: i64,
}

impl Window {
    /// Why a sample at `ts_ms` is refused, or `None` when it is stored.
    #[inline]
    pub fn refuses(&self, ts_ms: i64) -> Option<Reason> {
        if ts_ms < self.lo_ms {
            Some(Reason::SampleTooOld)
        } else if ts_ms > self.hi_ms {
            Some(Reason::SampleInFuture)
        } else {
            None
        }
    }

    /// Whether an event at `ts_ms` keeps its own time (else it gets `now_ms`).
    pub fn keeps_event_time(&self, ts_ms: i64) -> bool {
        self.refuses(ts_ms).is_none()
    }
}

/// Why a value was refused or changed at the store boundary (the `reason` label of
/// `razar_collector_values_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A sample older than the retention.
    SampleTooOld,
    /// A sample further in the future than the allowed clock skew.
    SampleInFuture,
    /// A sample of a series the store refused.
    SampleOfRefusedSeries,
    /// A series past the host's cap.
    SeriesOverCap,
    /// A series whose key (metric and labels) is too large.
    SeriesTooLarge,
    /// An event whose time was outside the window (stored at the collector's time).
    EventTime,
    /// A GPU inventory entry whose index does not fit the database column.
    GpuIndex,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 7] = [
        Reason::SampleTooOld,
        Reason::SampleInFuture,
        Reason::SampleOfRefusedSeries,
        Reason::SeriesOverCap,
        Reason::SeriesTooLarge,
        Reason::EventTime,
        Reason::GpuIndex,
    ];

    /// Stable snake_case code (metric label, event payload key).
    pub fn code(self) -> &'static str {
        match self {
            Reason::SampleTooOld => "sample_too_old",
            Reason::SampleInFuture => "sample_in_future",
            Reason::SampleOfRefusedSeries => "sample_of_refused_series",
            Reason::SeriesOverCap => "series_over_cap",
            Reason::SeriesTooLarge => "series_too_large",
            Reason::EventTime => "event_time_out_of_window",
            Reason::GpuIndex => "gpu_index_out_of_range",
        }
    }
}

/// Counts of refused values, per reason, plus the text fields cleaned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    counts: [u64; Reason::ALL.len()],
    /// Text fields changed to be storable (NUL replaced or cut to their cap).
    pub texts_cleaned: u64,
}

impl Refusals {
    pub fn add(&mut self, reason: Reason, n: u64) {
        self.counts[reason as usize] = self.counts[reason as usize].saturating_add(n);
    }

    pub fn get(&self, reason: Reason) -> u64 {
        self.counts[reason as usize]
    }

    /// Whether any value was refused (cleaned text does not count).
    pub fn any(&self) -> bool {
        self.counts.iter().any(|&n| n > 0)
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Refusals) {
        for reason in Reason::ALL {
            self.add(reason, other.get(reason));
        }
        self.texts_cleaned = self.texts_cleaned.saturating_add(other.texts_cleaned);
    }

    /// The non-zero counts as `(reason, count)`.
    pub fn iter(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL
            .into_iter()
            .map(|r| (r, self.get(r)))
            .filter(|&(_, n)| n > 0)
    }

    /// A JSON object of the non-zero counts (an event's payload).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.iter()
                .map(|(r, n)| (r.code().to_owned(), serde_json::Value::from(n)))
                .collect(),
        )
    }

    /// One line for an event's message: "3 sample_too_old, 1 series_over_cap".
    pub fn summary(&self) -> String {
        self.iter()
            .map(|(r, n)| format!("{n} {}", r.code()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `text` made storable: every NUL replaced by U+FFFD, then cut to at most `max` bytes
/// at a character boundary. Borrowed when it already is; `cleaned` counts a change.
pub fn clean<'a>(text: &'a str, max: usize, cleaned: &mut u64) -> Cow<'a, str> {
    let bytes = text.as_bytes();
    if bytes.len() <= max && !bytes.contains(&0) {
        return Cow::Borrowed(text);
    }
    *cleaned += 1;
    let mut owned = if bytes.contains(&0) {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_owned()
    };
    if owned.len() > max {
        let mut end = max;
        while !owned.is_char_boundary(end) {
            end -= 1;
        }
        owned.truncate(end);
    }
    Cow::Owned(owned)
}

/// An event kind with its text made storable (strings cleaned, lists capped); borrowed
/// when nothing changes.
pub fn clean_kind<'a>(kind: &'a EventKind, cleaned: &mut u64) -> Cow<'a, EventKind> {
    match kind {
        EventKind::ConfigReloaded { changed } => {
            let dirty = changed.len() > MAX_LIST_ENTRIES
                || changed
                    .iter()
                    .any(|c| matches!(clean(c, MAX_NAME_BYTES, &mut 0), Cow::Owned(_)));
            if !dirty {
                return Cow::Borrowed(kind);
            }
            *cleaned += 1;
            Cow::Owned(EventKind::ConfigReloaded {
                changed: changed
                    .iter()
                    .take(MAX_LIST_ENTRIES)
                    .map(|c| clean(c, MAX_NAME_BYTES, &mut 0).into_owned())
                    .collect(),
            })
        }
        EventKind::QuarantineResolved { note } => match clean(note, MAX_MESSAGE_BYTES, cleaned) {
            Cow::Borrowed(_) => Cow::Borrowed(kind),
            Cow::Owned(note) => Cow::Owned(EventKind::QuarantineResolved { note }),
        },
        EventKind::Other { code } => match clean(code, MAX_NAME_BYTES, cleaned) {
            Cow::Borrowed(_) => Cow::Borrowed(kind),
            Cow::Owned(code) => Cow::Owned(EventKind::Other { code }),
        },
        _ => Cow::Borrowed(kind),
    }
}

/// The SQLSTATE classes of errors caused by the data itself (22 data exception, 23
/// integrity constraint violation, 54 program limit exceeded such as an index row too
/// large): retrying the same data cannot help.
pub fn is_data_error_code(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("22" | "23" | "54"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_clean(text: &str, max: usize, expected: &str, changed: bool) {
        let mut cleaned = 0;
        let out = clean(text, max, &mut cleaned);
        assert_eq!(out, expected);
        assert_eq!(matches!(out, Cow::Owned(_)), changed, "{text:?}");
        assert_eq!(cleaned, u64::from(changed));
    }

    #[test]
    fn clean_replaces_nul_and_cuts_at_a_char_boundary() {
        check_clean("ok", 10, "ok", false);
        check_clean("", 0, "", false);
        check_clean("a\0b", 10, "a\u{FFFD}b", true);
        check_clean("abcdef", 3, "abc", true);
        // "é" is two bytes: a cut inside it goes back to its start.
        check_clean("aé", 2, "a", true);
        // U+FFFD is three bytes: the replacement itself may be cut.
        check_clean("\0\0", 4, "\u{FFFD}", true);
    }

    #[test]
    fn window_refuses_old_and_future_samples_only() {
        let rules = IngestRules {
            retention: Duration::from_secs(10),
            max_clock_skew: Duration::from_secs(1),
            max_series_per_host: 1,
        };
        let w = rules.window(100_000);
        let cases = [
            (89_999, Some(Reason::SampleTooOld)),
            (90_000, None),
            (100_000, None),
            (101_000, None),
            (101_001, Some(Reason::SampleInFuture)),
            (i64::MIN, Some(Reason::SampleTooOld)),
            (i64::MAX, Some(Reason::SampleInFuture)),
        ];
        for (ts, expected) in cases {
            assert_eq!(w.refuses(ts), expected, "{ts}");
        }
        // Stays within what every layer represents, whatever the clock and the rules.
        let w = rules.window(i64::MIN + 5);
        assert_eq!((w.lo_ms, w.now_ms), (EARLIEST_MS, EARLIEST_MS));
        assert_eq!(w.refuses(-1), Some(Reason::SampleTooOld));
        let w = rules.window(i64::MAX - 5);
        assert_eq!((w.hi_ms, w.now_ms), (LATEST_MS, LATEST_MS));
    }

    #[test]
    fn event_kind_text_is_cleaned_and_lists_capped() {
        let mut cleaned = 0;
        let kind = EventKind::Other {
            code: "probe\0".into(),
        };
        assert_eq!(
            clean_kind(&kind, &mut cleaned).into_owned(),
            EventKind::Other {
                code: "probe\u{FFFD}".into()
            }
        );
        let long = EventKind::ConfigReloaded {
            changed: vec!["x".into(); MAX_LIST_ENTRIES + 1],
        };
        match clean_kind(&long, &mut cleaned) {
            Cow::Owned(EventKind::ConfigReloaded { changed }) => {
                assert_eq!(changed.len(), MAX_LIST_ENTRIES)
            }
            other => panic!("{other:?}"),
        }
        let fine = EventKind::QuarantineResolved { note: "ok".into() };
        assert!(matches!(clean_kind(&fine, &mut cleaned), Cow::Borrowed(_)));
        assert_eq!(cleaned, 2);
    }

    #[test]
    fn data_error_classes() {
        for (code, data) in [
            ("22021", true),
            ("23514", true),
            ("54000", true),
            ("40001", false),
            ("08006", false),
            ("55P03", false),
            ("2", false),
        ] {
            assert_eq!(is_data_error_code(code), data, "{code}");
        }
    }
}
