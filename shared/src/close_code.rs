//! QUIC application close codes of the agent–collector connection (both sides close
//! with them; the collector counts its closes by reason).

/// Orderly shutdown of the side that closes.
pub const SHUTDOWN: u32 = 0;
/// The collector refused the agent; the reason bytes carry the refusal code.
pub const REFUSED: u32 = 1;
/// The peer broke the protocol (undecodable frame, unexpected message).
pub const PROTOCOL_VIOLATION: u32 = 2;
/// The peer went silent past its grace.
pub const PEER_LOST: u32 = 3;
