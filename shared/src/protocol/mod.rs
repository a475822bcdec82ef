//! The agent ↔ collector wire protocol, sans-IO: message types, the framing codec, and
//! one session state machine per side.

pub mod codec;
pub mod messages;
pub mod session;

pub use codec::{
    decode_payload, encode_agent, encode_collector, encode_into, read_frame_len, AgentFrameDecoder,
    CodecError, CollectorFrameDecoder, FrameDecoder, HEADER_LEN,
};
pub use messages::*;
pub use session::{
    AgentEvent, AgentSession, AgentState, CollectorEvent, CollectorSession, CollectorState,
    SessionError,
};

/// ALPN identifier; carries the protocol's major version (a mismatch closes the
/// QUIC handshake with `no_application_protocol`).
pub const ALPN: &[u8] = b"razar/1";

/// Lowest protocol version this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
/// Highest protocol version this build speaks. Version 2 adds
/// `AgentMessage::Inventory`; version 3 the GPU, deployment and profile commands
/// (`CommandAction::DrainGpu` and after) and attributed events (`EventKind::GpuFault`).
pub const PROTOCOL_MAX: u16 = 3;
/// First version with `AgentMessage::Inventory`.
pub const PROTOCOL_INVENTORY: u16 = 2;
/// First version with `CommandAction::DrainGpu`, `ResetGpu`, `SetGpuHealth`,
/// `DeployRevision` and `SwitchProfile`; a collector never sends them to an older agent.
pub const PROTOCOL_V3_COMMANDS: u16 = 3;
/// First version with attributed events (`EventKind::GpuFault`); an agent sends an
/// older collector their version 1 form.
pub const PROTOCOL_ATTRIBUTION: u16 = 3;

impl messages::CommandAction {
    /// The lowest negotiated protocol version whose agents understand this command: a
    /// collector never sends it on a session of an older version.
    pub fn min_version(&self) -> u16 {
        match self {
            messages::CommandAction::Restart { .. }
            | messages::CommandAction::Stop { .. }
            | messages::CommandAction::Start { .. }
            | messages::CommandAction::Quarantine { .. }
            | messages::CommandAction::Resolve { .. }
            | messages::CommandAction::Pulse { .. }
            | messages::CommandAction::Rollback { .. }
            | messages::CommandAction::TailLogs { .. }
            | messages::CommandAction::CancelTail { .. } => PROTOCOL_MIN,
            messages::CommandAction::DrainGpu { .. }
            | messages::CommandAction::ResetGpu { .. }
            | messages::CommandAction::SetGpuHealth { .. }
            | messages::CommandAction::DeployRevision { .. }
            | messages::CommandAction::SwitchProfile { .. } => PROTOCOL_V3_COMMANDS,
        }
    }
}

/// Hard upper bound on one frame's payload, checked before any allocation.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;
