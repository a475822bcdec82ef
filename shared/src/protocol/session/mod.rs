//! Sans-IO session state machines, one per side of a connection, in quinn-proto's shape.
//!
//! A driver (the agent's uplink, the collector's connection task) owns the stream and
//! the clock. It feeds decoded messages in with `handle(msg, now)`, fires timers with
//! `handle_timeout(now)`, writes whatever `poll_transmit()` returns, sleeps until
//! `poll_timeout()`, and acts on `poll_event()`. The sessions never read a clock, touch
//! a socket or block, so tests run an agent–collector pair on a simulated clock.
//!
//! One session value lives for one connection on the collector; the agent keeps one
//! [`AgentSession`] across reconnects (`connected` / `disconnected`) because it owns the
//! send window and the series dictionary.
//!
//! A driver over one QUIC bidirectional stream looks like this (agent side; the
//! collector's is the same with [`CollectorSession`] and `AgentFrameDecoder`):
//!
//! ```text
//! session.connected(Instant::now());
//! let mut decoder = CollectorFrameDecoder::new();
//! loop {
//!     let mut out = Vec::new();
//!     while let Some(msg) = session.poll_transmit() { codec::encode_into(&msg, &mut out)?; }
//!     send.write_all(&out).await?;
//!     while let Some(event) = session.poll_event() { /* spool deletes, commands, ... */ }
//!     let deadline = session.poll_timeout();
//!     select! {
//!         n = recv.read(&mut buf) => {
//!             let mut input = &buf[..n?];
//!             while let Some(msg) = decoder.feed(&mut input)? { session.handle(msg, Instant::now()); }
//!         }
//!         _ = sleep_until(deadline) => session.handle_timeout(Instant::now()),
//!         batch = spool.next() => session.push_batch(batch)?,
//!     }
//! }
//! // on any exit: session.disconnected();
//! ```

mod agent;
mod collector;

pub use agent::{AgentEvent, AgentSession, AgentState};
pub use collector::{CollectorEvent, CollectorSession, CollectorState};

use super::{SessionConfig, UnixMillis};
use std::time::{Duration, Instant};

/// The highest version in both inclusive ranges `a` and `b` (each `(min, max)`), if any.
pub fn negotiate_version(a: (u16, u16), b: (u16, u16)) -> Option<u16> {
    let low = a.0.max(b.0);
    let high = a.1.min(b.1);
    (low <= high).then_some(high)
}

/// A mistake by the code driving a session (not by the peer: peer mistakes become
/// refusals or events).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A batch's seq is not above every seq already queued or acknowledged.
    #[error(
        "batch seq {seq} is not above {highest}, the highest seq already queued or acknowledged"
    )]
    BatchOutOfOrder { seq: u64, highest: u64 },
    /// A batch references a series that was never given to `define_series`.
    #[error("batch {seq} references series {series}, which was never defined")]
    UnknownSeries { seq: u64, series: u32 },
    /// The call needs an established session.
    #[error("the session is not established")]
    NotEstablished,
    /// `accept` was called when no accepted `Hello` was waiting for it.
    #[error("accept called while no Hello is waiting for it")]
    NotAwaitingAccept,
    /// `committed` named a seq above the highest batch received on this connection.
    #[error("commit up to seq {upto} is beyond the highest batch received ({received})")]
    CommitBeyondReceived { upto: u64, received: u64 },
    /// A `SessionConfig` field is out of range.
    #[error("invalid session config: {0}")]
    InvalidConfig(&'static str),
    /// The command needs a newer protocol version than this session negotiated.
    #[error("the agent's session speaks protocol {version}; this command needs {needed}")]
    CommandNeedsVersion { needed: u16, version: u16 },
}

impl SessionError {
    /// Stable snake_case code, used as a metric label and in logs.
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::BatchOutOfOrder { .. } => "batch_out_of_order",
            SessionError::UnknownSeries { .. } => "unknown_series",
            SessionError::NotEstablished => "not_established",
            SessionError::NotAwaitingAccept => "not_awaiting_accept",
            SessionError::CommitBeyondReceived { .. } => "commit_beyond_received",
            SessionError::InvalidConfig(_) => "invalid_config",
            SessionError::CommandNeedsVersion { .. } => "command_needs_version",
        }
    }
}

/// Checks the fields that would make timers spin or the window useless.
pub fn validate_config(config: &SessionConfig) -> Result<(), SessionError> {
    if config.heartbeat_interval_ms == 0 {
        return Err(SessionError::InvalidConfig(
            "heartbeat_interval_ms must be at least 1",
        ));
    }
    if config.lost_after_missed == 0 {
        return Err(SessionError::InvalidConfig(
            "lost_after_missed must be at least 1",
        ));
    }
    if config.max_unacked_batches == 0 {
        return Err(SessionError::InvalidConfig(
            "max_unacked_batches must be at least 1",
        ));
    }
    Ok(())
}

fn heartbeat_interval(config: &SessionConfig) -> Duration {
    Duration::from_millis(u64::from(config.heartbeat_interval_ms))
}

/// Silence after which the peer counts as lost.
fn lost_after(config: &SessionConfig) -> Duration {
    heartbeat_interval(config).saturating_mul(config.lost_after_missed)
}

/// Maps the caller's monotonic `Instant`s to wall-clock milliseconds from one anchor
/// pair given by the caller (the session has no clock of its own).
#[derive(Debug, Clone, Copy)]
struct WallClock {
    at: Instant,
    unix_ms: UnixMillis,
}

impl WallClock {
    fn unix_ms(&self, now: Instant) -> UnixMillis {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if now >= self.at {
            self.unix_ms.saturating_add(millis(now - self.at))
        } else {
            self.unix_ms.saturating_sub(millis(self.at - now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        let cases = [
            ((1, 1), (1, 1), Some(1)),
            ((1, 3), (2, 5), Some(3)),
            ((2, 5), (1, 3), Some(3)),
            ((1, 1), (2, 2), None),
            ((3, 4), (1, 2), None),
            ((2, 1), (1, 2), None),
        ];
        for (a, b, want) in cases {
            assert_eq!(negotiate_version(a, b), want, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn zero_fields_are_invalid() {
        let ok = SessionConfig::default();
        assert_eq!(validate_config(&ok), Ok(()));
        for broken in [
            SessionConfig {
                heartbeat_interval_ms: 0,
                ..ok
            },
            SessionConfig {
                lost_after_missed: 0,
                ..ok
            },
            SessionConfig {
                max_unacked_batches: 0,
                ..ok
            },
        ] {
            assert_eq!(
                validate_config(&broken).map_err(|e| e.code()),
                Err("invalid_config")
            );
        }
    }

    #[test]
    fn wall_clock_follows_the_anchor_both_ways() {
        let at = Instant::now();
        let clock = WallClock {
            at,
            unix_ms: 1_000_000,
        };
        assert_eq!(clock.unix_ms(at + Duration::from_millis(1500)), 1_001_500);
        if let Some(before) = at.checked_sub(Duration::from_millis(250)) {
            assert_eq!(clock.unix_ms(before), 999_750);
        }
    }
}
