//! Framing: one postcard-encoded message per frame, behind a 4-byte big-endian length.
//!
//! ```text
//! +----------------+---------------------------+
//! | len: u32 (BE)  | postcard payload (len B)  |
//! +----------------+---------------------------+
//! ```
//!
//! The length is checked against [`MAX_FRAME_LEN`] as soon as the four header bytes are
//! in, before any payload byte is buffered or allocated. Decoding is strict: the payload
//! must be exactly one message, trailing bytes are an error. Nothing here panics on
//! untrusted input.
//!
//! The same frame layout is used in both directions: the agent encodes
//! [`AgentMessage`]s and decodes [`CollectorMessage`]s, the collector the reverse.

use super::{AgentMessage, CollectorMessage, MAX_FRAME_LEN};
use postcard::ser_flavors::Flavor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::marker::PhantomData;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// Payload buffers larger than this are freed once their frame is decoded, so an idle
/// connection does not keep a multi-megabyte buffer alive after one large frame.
const RETAINED_CAPACITY: usize = 64 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes (or an encoded
    /// message would need more). The stream's framing cannot be trusted any more.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    /// The payload is not a valid message of the expected type.
    #[error("malformed frame payload: {0}")]
    Malformed(postcard::Error),
    /// The payload holds a valid message followed by extra bytes.
    #[error("{count} trailing bytes after the message in a frame")]
    TrailingBytes { count: usize },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
    /// The message could not be serialised (a serde error; not expected for our types).
    #[error("message could not be encoded: {0}")]
    Encode(postcard::Error),
}

impl CodecError {
    /// Stable snake_case code, used as a metric label and in logs.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::FrameTooLarge { .. } => "frame_too_large",
            CodecError::Malformed(_) => "malformed",
            CodecError::TrailingBytes { .. } => "trailing_bytes",
            CodecError::Truncated { .. } => "truncated",
            CodecError::Encode(_) => "encode_failed",
        }
    }
}

/// Encodes one agent → collector message as a complete frame (header included).
pub fn encode_agent(msg: &AgentMessage) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Encodes one collector → agent message as a complete frame (header included).
pub fn encode_collector(msg: &CollectorMessage) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends one frame holding `msg` to `out`, so several messages can share one write.
///
/// Fails with [`CodecError::FrameTooLarge`] if the payload would exceed
/// [`MAX_FRAME_LEN`]; `out` is then left as it was.
pub fn encode_into<M: Serialize>(msg: &M, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = postcard::serialize_with_flavor(msg, AppendVec(out)) {
        out.truncate(start);
        return Err(CodecError::Encode(e));
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(CodecError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    // len <= MAX_FRAME_LEN < u32::MAX, so the cast is lossless.
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// postcard output flavor that appends to an existing `Vec` with bulk copies.
struct AppendVec<'a>(&'a mut Vec<u8>);

impl Flavor for AppendVec<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Reads a frame header and returns the payload length, refusing anything above
/// [`MAX_FRAME_LEN`]. For drivers that read the header and the payload separately
/// (e.g. `read_exact` on a QUIC stream): call this before allocating the payload.
pub fn read_frame_len(header: [u8; HEADER_LEN]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(len) if len <= MAX_FRAME_LEN => Ok(len),
        _ => Err(CodecError::FrameTooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        }),
    }
}

/// Decodes a frame's payload (without header) into exactly one message.
pub fn decode_payload<M: DeserializeOwned>(payload: &[u8]) -> Result<M, CodecError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(CodecError::Malformed)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(CodecError::TrailingBytes { count: rest.len() })
    }
}

/// Incremental frame decoder: feed it bytes as they arrive, take whole messages out.
///
/// It holds at most one frame: never more than [`HEADER_LEN`] + [`MAX_FRAME_LEN`] bytes
/// (see [`FrameDecoder::buffered_capacity`]). [`push`](Self::push) takes bytes only up
/// to the end of the current frame; once a frame is complete it takes nothing more
/// until [`next_frame`](Self::next_frame) has returned it. [`feed`](Self::feed) does
/// both in one loop and decodes frames that lie whole in the input without copying.
///
/// An oversized length prefix poisons the decoder (the framing is lost) and every later
/// call returns the same error. A malformed payload consumes its frame and returns an
/// error once; the protocol treats it as a violation and closes the connection anyway.
pub struct FrameDecoder<M> {
    header: [u8; HEADER_LEN],
    header_filled: usize,
    /// Payload length of the frame being assembled, once its header is complete.
    frame_len: Option<usize>,
    payload: Vec<u8>,
    poisoned: Option<CodecError>,
    _message: PhantomData<fn() -> M>,
}

/// Decoder for the collector side (reads what agents send).
pub type AgentFrameDecoder = FrameDecoder<AgentMessage>;
/// Decoder for the agent side (reads what the collector sends).
pub type CollectorFrameDecoder = FrameDecoder<CollectorMessage>;

impl<M> fmt::Debug for FrameDecoder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("header_filled", &self.header_filled)
            .field("frame_len", &self.frame_len)
            .field("payload_len", &self.payload.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl<M> Default for FrameDecoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> FrameDecoder<M> {
    /// An empty decoder.
    pub fn new() -> Self {
        FrameDecoder {
            header: [0; HEADER_LEN],
            header_filled: 0,
            frame_len: None,
            payload: Vec::new(),
            poisoned: None,
            _message: PhantomData,
        }
    }

    /// Bytes the decoder holds or has room for: header plus payload capacity. Never more
    /// than `HEADER_LEN + MAX_FRAME_LEN`.
    pub fn buffered_capacity(&self) -> usize {
        HEADER_LEN + self.payload.capacity()
    }

    /// Bytes of a not yet complete (or not yet taken) frame currently held.
    pub fn buffered_len(&self) -> usize {
        self.header_filled + self.payload.len()
    }

    /// Checks that the stream may end here: no partial frame is pending.
    pub fn finish(&self) -> Result<(), CodecError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        match self.buffered_len() {
            0 => Ok(()),
            buffered => Err(CodecError::Truncated { buffered }),
        }
    }

    /// Takes bytes of the current frame from `bytes` and returns how many it took
    /// (fewer than `bytes.len()` once a frame is complete: call
    /// [`next_frame`](Self::next_frame), then push the rest).
    ///
    /// Fails as soon as a header announces more than [`MAX_FRAME_LEN`] bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<usize, CodecError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        let mut taken = 0;
        if self.frame_len.is_none() {
            let want = (HEADER_LEN - self.header_filled).min(bytes.len());
            self.header[self.header_filled..self.header_filled + want]
                .copy_from_slice(&bytes[..want]);
            self.header_filled += want;
            taken += want;
            if self.header_filled < HEADER_LEN {
                return Ok(taken);
            }
            let len = self.check_len(self.header)?;
            self.frame_len = Some(len);
        }
        if let Some(len) = self.frame_len {
            let missing = len - self.payload.len();
            let want = missing.min(bytes.len() - taken);
            if want > 0 {
                self.grow_for(want, len);
                self.payload.extend_from_slice(&bytes[taken..taken + want]);
                taken += want;
            }
        }
        Ok(taken)
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<M>, CodecError>
    where
        M: DeserializeOwned,
    {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        match self.frame_len {
            Some(len) if self.payload.len() == len => {
                let result = decode_payload(&self.payload);
                self.header_filled = 0;
                self.frame_len = None;
                if self.payload.capacity() > RETAINED_CAPACITY {
                    self.payload = Vec::new();
                } else {
                    self.payload.clear();
                }
                result.map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Consumes bytes from the front of `input` until one message is complete and
    /// returns it; `Ok(None)` means `input` was used up without completing a frame.
    ///
    /// ```text
    /// let mut input = &chunk[..];
    /// while let Some(msg) = decoder.feed(&mut input)? { session.handle(msg, now); }
    /// ```
    pub fn feed(&mut self, input: &mut &[u8]) -> Result<Option<M>, CodecError>
    where
        M: DeserializeOwned,
    {
        loop {
            if let Some(msg) = self.next_frame()? {
                return Ok(Some(msg));
            }
            if input.is_empty() {
                return Ok(None);
            }
            // Fast path: nothing buffered and the whole frame is in `input`: decode it
            // in place, without copying it into the buffer.
            if self.header_filled == 0 {
                if let Some(header) = input.first_chunk::<HEADER_LEN>() {
                    let len = self.check_len(*header)?;
                    if let Some(payload) = input.get(HEADER_LEN..HEADER_LEN + len) {
                        *input = &input[HEADER_LEN + len..];
                        return decode_payload(payload).map(Some);
                    }
                }
            }
            let taken = self.push(input)?;
            *input = &input[taken..];
        }
    }

    /// Validates a header, poisoning the decoder if it is oversized.
    fn check_len(&mut self, header: [u8; HEADER_LEN]) -> Result<usize, CodecError> {
        read_frame_len(header).inspect_err(|err| self.poisoned = Some(err.clone()))
    }

    /// Makes room for `more` payload bytes, growing geometrically but never past the
    /// frame's own length, so capacity stays within `MAX_FRAME_LEN`.
    fn grow_for(&mut self, more: usize, frame_len: usize) {
        let needed = self.payload.len() + more;
        if needed <= self.payload.capacity() {
            return;
        }
        let target = needed.max(self.payload.capacity() * 2).min(frame_len);
        self.payload.reserve_exact(target - self.payload.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CollectorMessage;

    fn ack_frame(upto: u64) -> Vec<u8> {
        let msg = CollectorMessage::Ack { upto };
        encode_collector(&msg).unwrap_or_default()
    }

    #[test]
    fn frame_layout_is_length_then_postcard() {
        let frame = ack_frame(5);
        // Ack is variant 2, then varint 5.
        assert_eq!(frame, vec![0, 0, 0, 2, 2, 5]);
    }

    #[test]
    fn byte_by_byte_push_yields_the_message() {
        let frame = ack_frame(300);
        let mut dec = CollectorFrameDecoder::new();
        let mut got = Vec::new();
        for b in &frame {
            assert_eq!(dec.push(std::slice::from_ref(b)), Ok(1));
            if let Some(m) = dec.next_frame().transpose() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![Ok(CollectorMessage::Ack { upto: 300 })]);
        assert_eq!(dec.finish(), Ok(()));
    }

    #[test]
    fn push_stops_at_the_end_of_a_frame() {
        let mut two = ack_frame(1);
        two.extend(ack_frame(2));
        let mut dec = CollectorFrameDecoder::new();
        let taken = dec.push(&two);
        assert_eq!(taken, Ok(6));
        assert_eq!(dec.push(&two[6..]), Ok(0), "complete frame not yet taken");
        assert_eq!(
            dec.next_frame(),
            Ok(Some(CollectorMessage::Ack { upto: 1 }))
        );
        assert_eq!(dec.push(&two[6..]), Ok(6));
        assert_eq!(
            dec.next_frame(),
            Ok(Some(CollectorMessage::Ack { upto: 2 }))
        );
        assert_eq!(dec.next_frame(), Ok(None));
    }

    #[test]
    fn oversized_header_is_refused_before_buffering_and_poisons() {
        let mut dec = CollectorFrameDecoder::new();
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let err = dec.push(&header);
        assert_eq!(
            err.as_ref().map_err(CodecError::code),
            Err("frame_too_large")
        );
        assert_eq!(dec.buffered_capacity(), HEADER_LEN);
        assert_eq!(dec.push(&[0]).map_err(|e| e.code()), Err("frame_too_large"));
        assert_eq!(
            dec.next_frame().map_err(|e| e.code()),
            Err("frame_too_large")
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut frame = ack_frame(7);
        frame.push(0);
        frame[3] += 1;
        let mut dec = CollectorFrameDecoder::new();
        let mut input = &frame[..];
        assert_eq!(
            dec.feed(&mut input),
            Err(CodecError::TrailingBytes { count: 1 })
        );
        assert!(input.is_empty());
    }

    #[test]
    fn truncated_stream_is_reported_by_finish() {
        let frame = ack_frame(7);
        let mut dec = CollectorFrameDecoder::new();
        let mut input = &frame[..frame.len() - 1];
        assert_eq!(dec.feed(&mut input), Ok(None));
        assert_eq!(
            dec.finish(),
            Err(CodecError::Truncated {
                buffered: frame.len() - 1
            })
        );
    }

    #[test]
    fn large_frame_buffer_is_released_after_decoding() {
        let msg = AgentMessage::LogChunk(crate::protocol::LogChunk {
            command: [0; 16],
            component: "c".into(),
            stream: crate::domain::LogStream::Stdout,
            lines: vec!["x".repeat(1000); 200],
            end: true,
        });
        let frame = encode_agent(&msg).unwrap_or_default();
        let mut dec = AgentFrameDecoder::new();
        for chunk in frame.chunks(1000) {
            let mut input = chunk;
            if let Some(m) = dec.feed(&mut input).ok().flatten() {
                assert_eq!(m, msg);
            }
            assert!(dec.buffered_capacity() <= frame.len());
        }
        assert_eq!(dec.buffered_capacity(), HEADER_LEN);
    }
}
