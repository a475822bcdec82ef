//! Codec properties: every message round-trips; arbitrary, truncated and hostile input
//! yields an error or "need more bytes", never a panic, and the decoder never holds
//! more than one maximal frame.

use crate::support::strategies::{
    agent_message, agent_variant, collector_message, collector_variant, AGENT_VARIANTS,
    COLLECTOR_VARIANTS,
};
use crate::support::XorShift;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use razar_shared::protocol::{
    decode_payload, encode_agent, encode_collector, encode_into, AgentFrameDecoder, AgentMessage,
    CodecError, CollectorFrameDecoder, CollectorMessage, FrameDecoder, HEADER_LEN, MAX_FRAME_LEN,
};
use serde::de::DeserializeOwned;

/// Round trip check that also holds for NaN samples: the decoded message must
/// re-encode to the same bytes and print the same.
fn assert_round_trip<M>(msg: &M, frame: &[u8]) -> Result<(), TestCaseError>
where
    M: DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut decoder = FrameDecoder::<M>::new();
    let mut input = frame;
    let back = decoder.feed(&mut input)?;
    prop_assert!(input.is_empty());
    let Some(back) = back else {
        return Err(TestCaseError::fail("a whole frame decoded to nothing"));
    };
    let mut again = Vec::new();
    encode_into(&back, &mut again)?;
    prop_assert_eq!(&again[..], frame);
    prop_assert_eq!(format!("{back:?}"), format!("{msg:?}"));
    prop_assert_eq!(decoder.finish(), Ok(()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_agent_message_round_trips(msg in agent_message()) {
        let frame = encode_agent(&msg)?;
        assert_round_trip(&msg, &frame)?;
    }

    #[test]
    fn every_collector_message_round_trips(msg in collector_message()) {
        let frame = encode_collector(&msg)?;
        assert_round_trip(&msg, &frame)?;
    }

    /// Several frames back to back, cut into arbitrary chunks, come out whole and in order.
    #[test]
    fn chunked_streams_decode_in_order(
        msgs in proptest::collection::vec(agent_message(), 1..6),
        cuts in proptest::collection::vec(1usize..64, 1..40),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_into(m, &mut stream)?;
        }
        let mut decoder = AgentFrameDecoder::new();
        let mut out = Vec::new();
        let mut rest = &stream[..];
        let mut cuts = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = cuts.next().copied().unwrap_or(1).min(rest.len());
            let (mut chunk, tail) = rest.split_at(n);
            rest = tail;
            while let Some(m) = decoder.feed(&mut chunk)? {
                out.push(m);
            }
            prop_assert!(decoder.buffered_capacity() <= HEADER_LEN + MAX_FRAME_LEN);
        }
        prop_assert_eq!(format!("{out:?}"), format!("{msgs:?}"));
        prop_assert_eq!(decoder.finish(), Ok(()));
    }

    /// Arbitrary bytes, at least 100,000 cases over both decoders.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        hammer::<AgentMessage>(&bytes, 7);
        hammer::<CollectorMessage>(&bytes, 5);
        // The same bytes as a payload behind an honest header reach postcard itself.
        let _ = decode_payload::<AgentMessage>(&bytes);
        let _ = decode_payload::<CollectorMessage>(&bytes);
    }
}

/// Raises the case count for the arbitrary-bytes property above 100,000 without making
/// the round-trip properties slow.
#[test]
fn arbitrary_bytes_hundred_thousand_cases() {
    let config = ProptestConfig {
        cases: 100_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(any::<u8>(), 0..96);
    let result = runner.run(&strategy, |bytes| {
        let framed = frame_of(&bytes);
        hammer::<AgentMessage>(&framed, 3);
        hammer::<CollectorMessage>(&framed, 11);
        hammer::<AgentMessage>(&bytes, 1);
        Ok(())
    });
    assert_eq!(result.map_err(|e| e.to_string()), Ok(()));
}

/// `payload` behind a header announcing its true length.
fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// Feeds `bytes` in chunks of `chunk` bytes, checking the decoder's invariants; returns
/// (messages decoded, errors seen).
fn hammer<M: DeserializeOwned>(bytes: &[u8], chunk: usize) -> (usize, usize) {
    let mut decoder = FrameDecoder::<M>::new();
    let (mut ok, mut errors) = (0, 0);
    for mut piece in bytes.chunks(chunk) {
        loop {
            match decoder.feed(&mut piece) {
                Ok(Some(_)) => ok += 1,
                Ok(None) => break,
                Err(CodecError::FrameTooLarge { .. }) => {
                    errors += 1;
                    assert!(decoder.feed(&mut piece).is_err(), "too large must poison");
                    return (ok, errors);
                }
                Err(_) => errors += 1,
            }
            assert!(decoder.buffered_capacity() <= HEADER_LEN + MAX_FRAME_LEN);
        }
        assert!(decoder.buffered_capacity() <= HEADER_LEN + MAX_FRAME_LEN);
    }
    let _ = decoder.finish();
    (ok, errors)
}

/// Valid frames with a few bytes flipped, from a seeded generator: reaches deep into the
/// payload decoders, where purely random bytes rarely get.
#[test]
fn mutated_valid_frames_never_panic() {
    let mut rng = XorShift::new(0x5eed_cafe);
    let mut runner = TestRunner::deterministic();
    let mut samples = Vec::new();
    for _ in 0..200 {
        let tree = agent_message().new_tree(&mut runner);
        let tree_b = collector_message().new_tree(&mut runner);
        if let (Ok(a), Ok(b)) = (tree, tree_b) {
            samples.push((a.current(), b.current()));
        }
    }
    assert_eq!(samples.len(), 200);
    let (mut ok, mut errors) = (0, 0);
    for i in 0..100_000 {
        let (a, b) = &samples[i % samples.len()];
        let mut frame = if i % 2 == 0 {
            encode_agent(a)
        } else {
            encode_collector(b)
        }
        .expect("our own messages encode");
        let flips = 1 + rng.below(4);
        for _ in 0..flips {
            // Leave the header alone half the time so the payload decoder runs.
            let start = if rng.below(2) == 0 { HEADER_LEN } else { 0 };
            if frame.len() > start {
                let at = start + rng.below(frame.len() - start);
                frame[at] ^= 1 << rng.below(8);
            }
        }
        let chunk = 1 + rng.below(frame.len());
        let (o, e) = if i % 2 == 0 {
            hammer::<AgentMessage>(&frame, chunk)
        } else {
            hammer::<CollectorMessage>(&frame, chunk)
        };
        ok += o;
        errors += e;
    }
    // Both outcomes must actually occur, or the test exercises nothing.
    assert!(ok > 1_000, "only {ok} mutated frames decoded");
    assert!(errors > 1_000, "only {errors} mutated frames failed");
}

/// Every strict prefix of a valid frame is "need more bytes" to the stream decoder and
/// an error as a payload (postcard is self-delimiting, so no prefix is itself valid).
#[test]
fn every_truncation_is_need_more_or_error() {
    let mut runner = TestRunner::deterministic();
    let mut frames = 0;
    for _ in 0..300 {
        let (Ok(a), Ok(c)) = (
            agent_message().new_tree(&mut runner),
            collector_message().new_tree(&mut runner),
        ) else {
            continue;
        };
        let agent_frame = encode_agent(&a.current()).expect("encodes");
        let collector_frame = encode_collector(&c.current()).expect("encodes");
        check_truncations::<AgentMessage>(&agent_frame);
        check_truncations::<CollectorMessage>(&collector_frame);
        frames += 2;
    }
    assert_eq!(frames, 600);
}

fn check_truncations<M: DeserializeOwned + std::fmt::Debug>(frame: &[u8]) {
    for cut in 0..frame.len() {
        let prefix = &frame[..cut];
        let mut decoder = FrameDecoder::<M>::new();
        let mut input = prefix;
        assert!(
            matches!(decoder.feed(&mut input), Ok(None)),
            "prefix of {cut} bytes"
        );
        assert!(input.is_empty());
        let expected = if cut == 0 {
            Ok(())
        } else {
            Err(CodecError::Truncated { buffered: cut })
        };
        assert_eq!(decoder.finish(), expected);
        if cut >= HEADER_LEN {
            let payload = &frame[HEADER_LEN..cut];
            assert!(
                decode_payload::<M>(payload).is_err(),
                "strict prefix of {} payload bytes decoded",
                payload.len()
            );
            // The same prefix behind an honest header: a complete frame, still an error.
            let mut decoder = FrameDecoder::<M>::new();
            let honest = frame_of(payload);
            let mut input = &honest[..];
            assert!(decoder.feed(&mut input).is_err());
        }
    }
}

#[test]
fn hostile_length_prefixes() {
    let max = MAX_FRAME_LEN as u32;
    for len in [u32::MAX, max + 1, max.saturating_mul(2), 0x8000_0000] {
        let header = len.to_be_bytes();
        let mut decoder = AgentFrameDecoder::new();
        let mut input = &header[..];
        let err = decoder.feed(&mut input).map(|_| ());
        assert_eq!(
            err,
            Err(CodecError::FrameTooLarge {
                len: u64::from(len),
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(decoder.buffered_capacity(), HEADER_LEN, "nothing allocated");
        // Poisoned: more bytes do not help.
        assert!(decoder.push(&[0; 16]).is_err());
        assert_eq!(
            decoder.next_frame().map_err(|e| e.code()),
            Err("frame_too_large")
        );
        // The header split across pushes is refused the same way.
        let mut decoder = CollectorFrameDecoder::new();
        assert_eq!(decoder.push(&header[..3]), Ok(3));
        assert!(decoder.push(&header[3..]).is_err());
    }
    // A length larger than the bytes at hand: need more, buffer grows with the data
    // actually received, not with the announced length.
    for len in [max, max - 1, 1_000, 5] {
        let mut decoder = AgentFrameDecoder::new();
        let mut data = len.to_be_bytes().to_vec();
        data.extend_from_slice(&[1, 2, 3]);
        let mut input = &data[..];
        assert!(matches!(decoder.feed(&mut input), Ok(None)));
        assert!(decoder.buffered_capacity() <= HEADER_LEN + 3 * 2);
    }
}

/// A maximal frame of garbage is buffered within the limit and then rejected; the
/// buffer never exceeds `HEADER_LEN + MAX_FRAME_LEN`.
#[test]
fn maximal_frame_stays_within_the_limit() {
    let mut decoder = AgentFrameDecoder::new();
    let header = (MAX_FRAME_LEN as u32).to_be_bytes();
    assert_eq!(decoder.push(&header), Ok(4));
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut pushed = 0;
    while pushed < MAX_FRAME_LEN {
        let n = decoder.push(&chunk).expect("within the limit");
        pushed += n;
        assert!(decoder.buffered_capacity() <= HEADER_LEN + MAX_FRAME_LEN);
        assert!(decoder.buffered_capacity() <= HEADER_LEN + 2 * pushed.max(chunk.len()));
        if pushed < MAX_FRAME_LEN {
            assert_eq!(decoder.next_frame().map(|m| m.is_none()), Ok(true));
        }
    }
    assert_eq!(pushed, MAX_FRAME_LEN);
    assert_eq!(
        decoder.push(&chunk),
        Ok(0),
        "a complete frame takes nothing more"
    );
    assert!(decoder.next_frame().is_err());
    // Frame consumed, large buffer released, decoder usable again.
    assert_eq!(decoder.buffered_capacity(), HEADER_LEN);
    let ok = encode_agent(&AgentMessage::DefineSeries(Vec::new())).expect("encodes");
    let mut input = &ok[..];
    assert_eq!(
        decoder.feed(&mut input),
        Ok(Some(AgentMessage::DefineSeries(Vec::new())))
    );
}

#[test]
fn oversized_messages_are_refused_at_encode() {
    let chunk = razar_shared::protocol::LogChunk {
        command: [0; 16],
        component: "big".into(),
        stream: razar_shared::domain::LogStream::Stdout,
        lines: vec!["y".repeat(1 << 20); 5],
        end: false,
    };
    let mut out = vec![9, 9];
    let err = encode_into(&AgentMessage::LogChunk(chunk), &mut out);
    assert_eq!(err.map_err(|e| e.code()), Err("frame_too_large"));
    assert_eq!(out, vec![9, 9], "output left as it was");
}

#[test]
fn trailing_bytes_inside_a_frame_are_rejected() {
    let frame = encode_collector(&CollectorMessage::Ack { upto: 42 }).expect("encodes");
    let mut payload = frame[HEADER_LEN..].to_vec();
    payload.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decode_payload::<CollectorMessage>(&payload),
        Err(CodecError::TrailingBytes { count: 3 })
    );
    let framed = frame_of(&payload);
    let mut decoder = CollectorFrameDecoder::new();
    let mut input = &framed[..];
    assert_eq!(
        decoder.feed(&mut input),
        Err(CodecError::TrailingBytes { count: 3 })
    );
    // Not poisoned: the next frame decodes.
    let mut input = &frame[..];
    assert_eq!(
        decoder.feed(&mut input),
        Ok(Some(CollectorMessage::Ack { upto: 42 }))
    );
}

#[test]
fn strategies_cover_every_variant() {
    let mut runner = TestRunner::deterministic();
    let mut agent = [0usize; AGENT_VARIANTS];
    let mut collector = [0usize; COLLECTOR_VARIANTS];
    for _ in 0..500 {
        if let Ok(t) = agent_message().new_tree(&mut runner) {
            agent[agent_variant(&t.current())] += 1;
        }
        if let Ok(t) = collector_message().new_tree(&mut runner) {
            collector[collector_variant(&t.current())] += 1;
        }
    }
    assert!(agent.iter().all(|&n| n > 0), "{agent:?}");
    assert!(collector.iter().all(|&n| n > 0), "{collector:?}");
}
