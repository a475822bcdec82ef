//! Fuzzes the frame decoder on both message types: arbitrary bytes, fed in chunks of a
//! fuzzer-chosen size, must never panic, never buffer more than one maximal frame, and
//! every message that decodes must re-encode to a frame that decodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use razar_shared::protocol::{
    decode_payload, encode_into, AgentMessage, CodecError, CollectorMessage, FrameDecoder,
    HEADER_LEN, MAX_FRAME_LEN,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn drain<M: DeserializeOwned + Serialize>(bytes: &[u8], chunk: usize) {
    let mut decoder = FrameDecoder::<M>::new();
    for mut piece in bytes.chunks(chunk) {
        loop {
            match decoder.feed(&mut piece) {
                Ok(Some(msg)) => check_reencode(&msg),
                Ok(None) => break,
                Err(CodecError::FrameTooLarge { .. }) => return,
                Err(_) => {}
            }
            assert!(decoder.buffered_capacity() <= HEADER_LEN + MAX_FRAME_LEN);
        }
    }
    let _ = decoder.finish();
}

fn check_reencode<M: DeserializeOwned + Serialize>(msg: &M) {
    let mut frame = Vec::new();
    if encode_into(msg, &mut frame).is_err() {
        return;
    }
    let again: M = match decode_payload(&frame[HEADER_LEN..]) {
        Ok(m) => m,
        Err(e) => panic!("a re-encoded message failed to decode: {e}"),
    };
    let mut second = Vec::new();
    if encode_into(&again, &mut second).is_ok() {
        assert_eq!(frame, second, "encoding is not stable");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(*first).max(1);
    drain::<AgentMessage>(rest, chunk);
    drain::<CollectorMessage>(rest, chunk);
    if let Ok(msg) = decode_payload::<AgentMessage>(rest) {
        check_reencode(&msg);
    }
    if let Ok(msg) = decode_payload::<CollectorMessage>(rest) {
        check_reencode(&msg);
    }
});
