//! Agent–collector sessions driven as a pair on a simulated clock, through the codec.

use crate::support::pair::{hello, Pair, HOST};
use proptest::prelude::*;
use razar_shared::domain::ComponentState;
use razar_shared::protocol::{
    AgentEvent, AgentMessage, AgentSession, AgentState, Batch, CollectorEvent, CollectorMessage,
    CollectorSession, CollectorState, Command, CommandAction, CommandOutcome, CommandResult,
    ComponentInfo, GpuInfo, Inventory, LogChunk, RefusalReason, SeriesPoints, SessionError,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use std::time::Duration;

fn established_pair() -> Pair {
    let mut pair = Pair::new();
    pair.connect();
    pair.drive();
    assert!(pair.agent_established(), "{:?}", pair.agent.state());
    pair
}

fn seqs(range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    range.collect()
}

#[test]
fn handshake_welcomes_with_the_stored_cursor() {
    let mut pair = Pair::new();
    pair.db_cursor = 0;
    pair.connect();
    assert_eq!(pair.agent.state(), AgentState::AwaitingWelcome);
    pair.drive();
    assert_eq!(
        pair.agent.state(),
        AgentState::Established {
            version: PROTOCOL_MAX
        }
    );
    assert_eq!(
        pair.collector_state(),
        Some(CollectorState::Established {
            version: PROTOCOL_MAX
        })
    );
    let hellos = pair.collector_events_where(|e| matches!(e, CollectorEvent::HelloReceived(_)));
    assert!(
        matches!(&hellos[..], [(_, CollectorEvent::HelloReceived(h))] if h.host_id == HOST),
        "{hellos:?}"
    );
    let welcomed = pair.agent_events_where(|e| matches!(e, AgentEvent::Established { .. }));
    assert!(
        matches!(
            &welcomed[..],
            [(_, AgentEvent::Established { version, collector_acked_seq: 0, config, .. })]
                if *version == PROTOCOL_MAX && *config == pair.config
        ),
        "{welcomed:?}"
    );
    assert_eq!(pair.agent.config(), pair.config);
}

#[test]
fn version_mismatch_is_refused_with_reason() {
    let mut pair = Pair::with_hello(hello(HOST, PROTOCOL_MAX + 1, PROTOCOL_MAX + 3));
    pair.connect();
    pair.drive();
    assert_eq!(pair.agent.state(), AgentState::Closed);
    assert_eq!(pair.collector_state(), Some(CollectorState::Closed));
    let refused = pair.agent_events_where(|e| matches!(e, AgentEvent::Refused(_)));
    match &refused[..] {
        [(_, AgentEvent::Refused(r))] => {
            assert_eq!(
                r.reason,
                RefusalReason::VersionUnsupported {
                    collector_min: PROTOCOL_MIN,
                    collector_max: PROTOCOL_MAX
                }
            );
            assert_eq!(r.reason.code(), "version_unsupported");
            assert!(r.message.contains("versions"), "{}", r.message);
        }
        other => panic!("expected one refusal, got {other:?}"),
    }
    assert!(pair
        .collector_events_where(|e| matches!(e, CollectorEvent::HelloReceived(_)))
        .is_empty());
}

#[test]
fn the_highest_common_version_is_chosen() {
    let mut pair = Pair::with_hello(hello(HOST, 1, 7));
    pair.collector_versions = (3, 5);
    pair.connect();
    pair.drive();
    assert_eq!(pair.agent.state(), AgentState::Established { version: 5 });
}

#[test]
fn host_id_mismatch_is_refused() {
    let mut pair = Pair::new();
    pair.certificate_host = "gpu-node-02".into();
    pair.connect();
    pair.drive();
    let refused = pair.agent_events_where(|e| matches!(e, AgentEvent::Refused(_)));
    match &refused[..] {
        [(_, AgentEvent::Refused(r))] => assert_eq!(
            r.reason,
            RefusalReason::HostIdMismatch {
                certificate: "gpu-node-02".into(),
                claimed: HOST.into()
            }
        ),
        other => panic!("expected one refusal, got {other:?}"),
    }
    assert_eq!(pair.collector_state(), Some(CollectorState::Closed));
    assert_eq!(pair.agent.state(), AgentState::Closed);
}

#[test]
fn batches_are_acked_in_order_within_the_window() {
    let mut pair = established_pair();
    pair.auto_commit = false;
    pair.push_batches(10);
    pair.drive();
    // Window of 4: only 4 batches reach the collector before an ack.
    assert_eq!(pair.pending, seqs(1..=4));
    assert_eq!(pair.agent.in_flight_batches(), 4);
    let mut acks = Vec::new();
    while !pair.pending.is_empty() {
        pair.commit();
        pair.drive();
        assert!(pair.agent.in_flight_batches() <= 4);
        acks.push(pair.agent.acked_seq());
    }
    assert_eq!(acks, vec![4, 8, 10]);
    assert_eq!(pair.stored, seqs(1..=10));
    let acked: Vec<u64> = pair
        .agent_events
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::Acked { upto } => Some(*upto),
            _ => None,
        })
        .collect();
    assert_eq!(acked, vec![4, 8, 10]);
    assert!(pair.spool.is_empty());
    assert_eq!(pair.agent.queued_batches(), 0);
}

#[test]
fn series_are_defined_once_per_connection_before_use() {
    let mut pair = established_pair();
    pair.push_batches(6);
    pair.drive();
    let first = &pair.connections[0];
    let mut ids = first.defined_ids.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4], "each id exactly once");
    pair.reconnect();
    pair.push_batches(2);
    pair.drive();
    let second = &pair.connections[1];
    assert!(
        !second.defined_ids.is_empty(),
        "defined again after reconnect"
    );
    let mut ids = second.defined_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), second.defined_ids.len(), "no id twice");
    assert_eq!(pair.stored, seqs(1..=8));
}

#[test]
fn disconnect_mid_stream_resends_with_no_gap_and_no_duplicate() {
    let mut pair = established_pair();
    pair.auto_commit = false;
    pair.push_batches(10);
    pair.step(usize::MAX); // batches 1..=4 reach the store
    pair.commit(); // 1..=4 committed, ack queued
    pair.step(usize::MAX); // ack in flight to the agent
    pair.step(7); // part of the next frames only
                  // The link breaks with frames half-delivered and 5.. uncommitted.
    pair.disconnect();
    assert_eq!(
        pair.agent.queued_batches() as u64,
        10 - pair.agent.acked_seq()
    );
    pair.auto_commit = true;
    pair.connect();
    pair.drive();
    assert_eq!(pair.stored, seqs(1..=10), "every seq stored once, in order");
    assert!(pair.spool.is_empty());
    let second = &pair.connections[1].batches;
    let first_resent = second.first().copied();
    assert_eq!(
        first_resent,
        Some(5),
        "resend starts right after the cursor"
    );
    assert_eq!(second, &seqs(5..=10));
    assert_eq!(
        pair.collector.as_ref().map(|c| c.duplicate_batches()),
        Some(0)
    );
}

#[test]
fn lost_ack_is_settled_by_the_welcome_cursor_not_by_a_resend() {
    let mut pair = Pair::new();
    pair.config.max_unacked_batches = 8; // all five go out without an ack
    pair.connect();
    pair.drive();
    pair.drop_to_agent = true; // acks vanish
    pair.push_batches(5);
    pair.drive();
    assert_eq!(pair.stored, seqs(1..=5), "collector committed all five");
    assert_eq!(pair.agent.acked_seq(), 0, "agent never heard");
    assert_eq!(pair.spool.len(), 5);
    pair.drop_to_agent = false;
    pair.reconnect();
    pair.drive();
    assert_eq!(pair.agent.acked_seq(), 5);
    assert!(pair.spool.is_empty(), "spool cleared by the Welcome cursor");
    assert!(pair.connections[1].batches.is_empty(), "nothing resent");
    assert_eq!(pair.stored, seqs(1..=5));
    let tail: Vec<&AgentEvent> = pair
        .agent_events
        .iter()
        .rev()
        .take(2)
        .map(|(_, e)| e)
        .collect();
    assert!(
        matches!(
            &tail[..],
            [
                AgentEvent::Acked { upto: 5 },
                AgentEvent::Established {
                    collector_acked_seq: 5,
                    ..
                }
            ]
        ),
        "{tail:?}"
    );
    // New batches continue above.
    pair.push_batches(2);
    pair.drive();
    assert_eq!(pair.stored, seqs(1..=7));
}

#[test]
fn resent_batches_at_or_below_the_cursor_are_acked_not_stored() {
    let now = std::time::Instant::now();
    let mut collector = CollectorSession::new(HOST.into(), now);
    collector.handle(AgentMessage::Hello(hello(HOST, 1, 1)), now);
    assert!(matches!(
        collector.poll_event(),
        Some(CollectorEvent::HelloReceived(_))
    ));
    collector
        .accept(7, Default::default(), now, 0)
        .expect("accept");
    assert!(
        matches!(collector.poll_transmit(), Some(CollectorMessage::Welcome(w)) if w.acked_seq == 7)
    );
    let batch = |seq| Batch {
        seq,
        base_ts_ms: 0,
        series: Vec::new(),
        events: Vec::new(),
    };
    collector.handle(AgentMessage::Batch(batch(6)), now);
    collector.handle(AgentMessage::Batch(batch(7)), now);
    assert_eq!(collector.duplicate_batches(), 2);
    assert_eq!(
        collector.poll_transmit(),
        Some(CollectorMessage::Ack { upto: 7 })
    );
    assert_eq!(
        collector.poll_transmit(),
        Some(CollectorMessage::Ack { upto: 7 })
    );
    assert_eq!(collector.poll_event(), None, "duplicates are not passed on");
    collector.handle(AgentMessage::Batch(batch(8)), now);
    assert!(matches!(collector.poll_event(), Some(CollectorEvent::Batch(b)) if b.seq == 8));
    assert_eq!(
        collector.committed(9),
        Err(SessionError::CommitBeyondReceived {
            upto: 9,
            received: 8
        })
    );
    assert_eq!(collector.committed(8), Ok(()));
    assert_eq!(
        collector.poll_transmit(),
        Some(CollectorMessage::Ack { upto: 8 })
    );
    assert_eq!(collector.cursor(), 8);
}

#[test]
fn heartbeats_flow_and_keep_both_sides_alive() {
    let mut pair = established_pair();
    pair.advance(Duration::from_secs(10));
    let beats = pair.connections[0].heartbeats;
    assert!(
        (9..=10).contains(&beats),
        "{beats} heartbeats in 10 s at 1/s"
    );
    let answered = pair
        .agent_events_where(|e| matches!(e, AgentEvent::HeartbeatAcked { .. }))
        .len();
    assert_eq!(answered, beats);
    let seen = pair
        .collector_events_where(|e| matches!(e, CollectorEvent::Heartbeat(_)))
        .len();
    assert_eq!(seen, beats);
    assert!(pair
        .agent_events_where(|e| *e == AgentEvent::PeerLost)
        .is_empty());
    assert!(pair
        .collector_events_where(|e| *e == CollectorEvent::PeerLost)
        .is_empty());
    // The collector's clock rides along.
    let last = pair.agent_events.iter().rev().find_map(|(at, e)| match e {
        AgentEvent::HeartbeatAcked { collector_time_ms } => Some((*at, *collector_time_ms)),
        _ => None,
    });
    let (at, collector_ms) = last.expect("a heartbeat answer");
    let elapsed = (at - pair.start).as_millis() as i64;
    assert_eq!(collector_ms, crate::support::pair::START_UNIX_MS + elapsed);
}

#[test]
fn lost_peer_timer_fires_on_both_sides_once() {
    let mut pair = established_pair();
    pair.advance(Duration::from_millis(2_500));
    let silent_since = pair.now;
    let agent_last_heard = pair
        .agent_events
        .iter()
        .map(|(at, _)| *at)
        .max()
        .expect("agent heard something");
    // The network goes dark both ways.
    pair.drop_to_agent = true;
    pair.drop_to_collector = true;
    pair.advance(Duration::from_secs(10));
    let lost_after = Duration::from_secs(3);
    let agent_lost = pair.agent_events_where(|e| *e == AgentEvent::PeerLost);
    let collector_lost = pair.collector_events_where(|e| *e == CollectorEvent::PeerLost);
    assert_eq!(agent_lost.len(), 1, "{agent_lost:?}");
    assert_eq!(collector_lost.len(), 1, "{collector_lost:?}");
    assert_eq!(agent_lost[0].0, agent_last_heard + lost_after);
    // The collector last heard a heartbeat at or before the network went dark.
    let collector_last_heard = collector_lost[0].0 - lost_after;
    assert!(collector_last_heard <= silent_since);
    assert!(collector_last_heard + Duration::from_secs(1) > silent_since);
    assert_eq!(pair.agent.state(), AgentState::Closed);
    assert_eq!(pair.collector_state(), Some(CollectorState::Closed));
    assert_eq!(pair.agent.poll_timeout(), None);
}

#[test]
fn missing_welcome_times_out_the_handshake() {
    let mut pair = Pair::new();
    pair.drop_to_agent = true;
    pair.connect();
    let connected_at = pair.now;
    pair.advance(Duration::from_secs(5));
    let lost = pair.agent_events_where(|e| *e == AgentEvent::PeerLost);
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].0, connected_at + Duration::from_secs(3));
}

#[test]
fn commands_results_and_logs_travel() {
    let mut pair = established_pair();
    let command = Command {
        id: [7; 16],
        deadline_ms: 1,
        action: CommandAction::TailLogs {
            component: "trainer".into(),
            lines: 10,
            follow: false,
        },
    };
    pair.collector
        .as_mut()
        .expect("connected")
        .send_command(command.clone())
        .expect("established");
    pair.drive();
    assert_eq!(
        pair.agent_events_where(|e| matches!(e, AgentEvent::Command(_))),
        vec![(pair.now, AgentEvent::Command(command))]
    );
    let result = CommandResult {
        id: [7; 16],
        finished_ms: 2,
        outcome: CommandOutcome::Succeeded,
        message: String::new(),
    };
    let chunk = LogChunk {
        command: [7; 16],
        component: "trainer".into(),
        stream: razar_shared::domain::LogStream::Stderr,
        lines: vec!["epoch 1".into()],
        end: true,
    };
    pair.agent
        .send_command_result(result.clone())
        .expect("established");
    pair.agent
        .send_log_chunk(chunk.clone())
        .expect("established");
    pair.drive();
    let got = pair.collector_events_where(|e| {
        matches!(
            e,
            CollectorEvent::CommandResult(_) | CollectorEvent::LogChunk(_)
        )
    });
    assert_eq!(
        got.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        vec![
            CollectorEvent::CommandResult(result),
            CollectorEvent::LogChunk(chunk)
        ]
    );
}

#[test]
fn driver_mistakes_are_errors() {
    let now = std::time::Instant::now();
    let mut agent = AgentSession::new(hello(HOST, 1, 1), now);
    let empty = |seq| Batch {
        seq,
        base_ts_ms: 0,
        series: Vec::new(),
        events: Vec::new(),
    };
    assert_eq!(agent.push_batch(empty(2)), Ok(()));
    assert_eq!(
        agent.push_batch(empty(2)).map_err(|e| e.code()),
        Err("batch_out_of_order")
    );
    let unknown = Batch {
        series: vec![SeriesPoints {
            series: 99,
            points: vec![(0, 1.0)],
        }],
        ..empty(3)
    };
    assert_eq!(
        agent.push_batch(unknown),
        Err(SessionError::UnknownSeries { seq: 3, series: 99 })
    );
    assert_eq!(
        agent.send_command_result(CommandResult {
            id: [0; 16],
            finished_ms: 0,
            outcome: CommandOutcome::Failed,
            message: String::new()
        }),
        Err(SessionError::NotEstablished)
    );
    let mut collector = CollectorSession::new(HOST.into(), now);
    assert_eq!(
        collector.accept(0, Default::default(), now, 0),
        Err(SessionError::NotAwaitingAccept)
    );
}

/// Builds a collector that has seen `first` (after a Hello where applicable) and
/// returns the refusal reason it queued.
fn refusal_after(messages: Vec<AgentMessage>, accept: bool) -> Option<RefusalReason> {
    let now = std::time::Instant::now();
    let mut collector = CollectorSession::new(HOST.into(), now);
    let mut accepted = false;
    for msg in messages {
        collector.handle(msg, now);
        if accept && !accepted && collector.state() == CollectorState::AwaitingAccept {
            collector
                .accept(0, Default::default(), now, 0)
                .expect("accept");
            accepted = true;
        }
    }
    std::iter::from_fn(|| collector.poll_transmit()).find_map(|m| match m {
        CollectorMessage::Refusal(r) => Some(r.reason),
        _ => None,
    })
}

#[test]
fn collector_refuses_protocol_violations() {
    let hello = || AgentMessage::Hello(hello(HOST, 1, 1));
    let batch = |seq, series: Vec<u32>| {
        AgentMessage::Batch(Batch {
            seq,
            base_ts_ms: 0,
            series: series
                .into_iter()
                .map(|series| SeriesPoints {
                    series,
                    points: vec![(0, 0.0)],
                })
                .collect(),
            events: Vec::new(),
        })
    };
    let cases: Vec<(&str, Vec<AgentMessage>, bool, Option<RefusalReason>)> = vec![
        (
            "batch first",
            vec![batch(1, vec![])],
            false,
            Some(RefusalReason::ExpectedHello),
        ),
        (
            "batch before welcome",
            vec![hello(), batch(1, vec![])],
            false,
            Some(RefusalReason::ProtocolViolation),
        ),
        (
            "second hello",
            vec![hello(), hello()],
            true,
            Some(RefusalReason::ProtocolViolation),
        ),
        (
            "undefined series",
            vec![hello(), batch(1, vec![5])],
            true,
            Some(RefusalReason::ProtocolViolation),
        ),
        (
            "seq goes back",
            vec![hello(), batch(3, vec![]), batch(2, vec![])],
            true,
            Some(RefusalReason::ProtocolViolation),
        ),
        (
            "well behaved",
            vec![hello(), batch(1, vec![]), batch(2, vec![])],
            true,
            None,
        ),
    ];
    for (name, messages, accept, want) in cases {
        assert_eq!(refusal_after(messages, accept), want, "{name}");
    }
}

#[test]
fn agent_reports_collector_violations() {
    let cases: Vec<(&str, Vec<CollectorMessage>, &str)> = vec![
        (
            "ack before welcome",
            vec![CollectorMessage::Ack { upto: 1 }],
            "expected Welcome or Refusal",
        ),
        (
            "ack beyond what was sent",
            vec![welcome(0), CollectorMessage::Ack { upto: 1 }],
            "Ack beyond the last batch sent",
        ),
        (
            "second welcome",
            vec![welcome(0), welcome(0)],
            "second Welcome",
        ),
        (
            "zero heartbeat interval",
            vec![CollectorMessage::Welcome(razar_shared::protocol::Welcome {
                config: razar_shared::protocol::SessionConfig {
                    heartbeat_interval_ms: 0,
                    ..Default::default()
                },
                ..welcome_fields(0)
            })],
            "Welcome carried an invalid session config",
        ),
    ];
    for (name, messages, want) in cases {
        let now = std::time::Instant::now();
        let mut agent = AgentSession::new(hello(HOST, 1, 1), now);
        agent.connected(now);
        for m in messages {
            agent.handle(m, now);
        }
        let events: Vec<AgentEvent> = std::iter::from_fn(|| agent.poll_event()).collect();
        assert_eq!(
            events.last(),
            Some(&AgentEvent::ProtocolViolation { detail: want }),
            "{name}: {events:?}"
        );
        assert_eq!(agent.state(), AgentState::Closed, "{name}");
    }
}

fn welcome_fields(acked_seq: u64) -> razar_shared::protocol::Welcome {
    razar_shared::protocol::Welcome {
        version: 1,
        collector_time_ms: 0,
        acked_seq,
        config: Default::default(),
    }
}

fn welcome(acked_seq: u64) -> CollectorMessage {
    CollectorMessage::Welcome(welcome_fields(acked_seq))
}

/// What the property test does to the pair.
#[derive(Debug, Clone)]
enum Op {
    Push(usize),
    /// Partial delivery: at most this many bytes each way.
    Step(usize),
    Drive,
    /// Commit the store's open transaction (when not auto-committing).
    Commit,
    ToggleAutoCommit,
    /// Drop the connection and open a new one.
    Reconnect,
    /// Collector → agent messages vanish (acks lost) until toggled back.
    ToggleDropAcks,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..4).prop_map(Op::Push),
        4 => (1usize..200).prop_map(Op::Step),
        2 => Just(Op::Drive),
        2 => Just(Op::Commit),
        1 => Just(Op::ToggleAutoCommit),
        2 => Just(Op::Reconnect),
        1 => Just(Op::ToggleDropAcks),
        2 => (1u64..5_000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any interleaving of pushes, partial deliveries, commits, dropped connections,
    /// lost acks and time ends with every batch stored exactly once, in order, and the
    /// agent's spool empty.
    #[test]
    fn every_batch_is_stored_exactly_once(ops in proptest::collection::vec(op(), 1..60)) {
        let mut pair = Pair::new();
        pair.connect();
        for op in ops {
            match op {
                Op::Push(n) => pair.push_batches(n),
                Op::Step(limit) => pair.step(limit),
                Op::Drive => pair.drive(),
                Op::Commit => pair.commit(),
                Op::ToggleAutoCommit => pair.auto_commit = !pair.auto_commit,
                Op::Reconnect => pair.reconnect(),
                Op::ToggleDropAcks => pair.drop_to_agent = !pair.drop_to_agent,
                Op::Advance(ms) => pair.advance(Duration::from_millis(ms)),
            }
            // The store only ever grows in order, never a duplicate.
            prop_assert!(pair.stored.windows(2).all(|w| w[0] < w[1]), "{:?}", pair.stored);
            prop_assert!(pair.agent.in_flight_batches() <= pair.config.max_unacked_batches as usize);
        }
        // Heal: a clean connection, commits on, until the agent holds nothing.
        pair.drop_to_agent = false;
        pair.auto_commit = true;
        pair.reconnect();
        pair.drive();
        pair.commit();
        pair.drive();
        let pushed = pair.next_seq - 1;
        prop_assert_eq!(&pair.stored, &seqs(1..=pushed));
        prop_assert!(pair.spool.is_empty(), "{:?}", pair.spool);
        prop_assert_eq!(pair.agent.queued_batches(), 0);
        prop_assert_eq!(pair.agent.acked_seq(), pushed);
        prop_assert_eq!(pair.db_cursor, pushed);
    }
}

fn inventory(state: ComponentState) -> (Vec<ComponentInfo>, Vec<GpuInfo>) {
    (
        vec![ComponentInfo {
            name: "trainer".into(),
            revision: "r1".into(),
            state,
            critical: true,
        }],
        vec![GpuInfo {
            index: 0,
            uuid: "GPU-0".into(),
            name: "H100".into(),
            pci_bus_id: "0000:01:00.0".into(),
            memory_total_bytes: 80 << 30,
        }],
    )
}

fn inventories(pair: &Pair) -> Vec<Inventory> {
    pair.collector_events_where(|e| matches!(e, CollectorEvent::Inventory(_)))
        .into_iter()
        .filter_map(|(_, e)| match e {
            CollectorEvent::Inventory(i) => Some(i),
            _ => None,
        })
        .collect()
}

#[test]
fn a_changed_inventory_reaches_the_collector_on_the_open_connection() {
    let mut pair = Pair::new();
    pair.connect();
    // Changed before the Welcome: the Hello on its way has the old one.
    let (components, gpus) = inventory(ComponentState::Starting);
    pair.agent.set_inventory(components.clone(), gpus.clone());
    pair.drive();
    assert_eq!(
        inventories(&pair),
        vec![Inventory {
            components: components.clone(),
            gpus: gpus.clone()
        }]
    );
    // Unchanged: nothing sent. Changed: sent at once.
    pair.agent.set_inventory(components, gpus.clone());
    pair.drive();
    assert_eq!(inventories(&pair).len(), 1);
    let (ready, _) = inventory(ComponentState::Ready);
    pair.agent.set_inventory(ready.clone(), gpus.clone());
    pair.drive();
    assert_eq!(
        inventories(&pair).last(),
        Some(&Inventory {
            components: ready,
            gpus
        })
    );
    assert_eq!(inventories(&pair).len(), 2);
}

#[test]
fn a_version_1_collector_gets_no_inventory_message() {
    let mut pair = Pair::new();
    pair.collector_versions = (1, 1);
    pair.connect();
    pair.drive();
    assert_eq!(pair.agent.state(), AgentState::Established { version: 1 });
    let (components, gpus) = inventory(ComponentState::Ready);
    pair.agent.set_inventory(components, gpus);
    pair.drive();
    assert!(inventories(&pair).is_empty());
    assert_eq!(pair.agent.state(), AgentState::Established { version: 1 });
}

#[test]
fn restarted_numbering_forgets_held_batches_and_takes_higher_seqs() {
    let mut pair = Pair::new();
    pair.push_batches(3);
    pair.agent.restart_numbering(500);
    assert_eq!(pair.agent.queued_batches(), 0);
    assert_eq!(pair.agent.highest_seq(), 500);
    assert!(pair.agent.poll_transmit().is_none());
    pair.next_seq = 501;
    pair.spool.clear();
    pair.db_cursor = 400;
    pair.connect();
    pair.push_batches(2);
    pair.drive();
    assert_eq!(pair.stored, seqs(501..=502));
}

#[test]
fn a_v3_command_is_never_sent_on_an_older_session() {
    let drain = Command {
        id: [9; 16],
        deadline_ms: 1,
        action: CommandAction::DrainGpu {
            gpu: "0".into(),
            note: "xid 79".into(),
        },
    };
    let restart = Command {
        id: [10; 16],
        deadline_ms: 1,
        action: CommandAction::Restart {
            component: "trainer".into(),
        },
    };
    // An agent that speaks up to version 2.
    let mut pair = Pair::with_hello(hello(HOST, PROTOCOL_MIN, 2));
    pair.connect();
    pair.drive();
    assert!(pair.agent_established());
    let collector = pair.collector.as_mut().expect("connected");
    assert_eq!(
        collector.send_command(drain.clone()),
        Err(SessionError::CommandNeedsVersion {
            needed: 3,
            version: 2
        })
    );
    collector.send_command(restart.clone()).expect("v1 command");
    pair.drive();
    assert_eq!(
        pair.agent_events_where(|e| matches!(e, AgentEvent::Command(_))),
        vec![(pair.now, AgentEvent::Command(restart))],
        "only the command the agent understands travels"
    );

    // A version 3 agent gets it.
    let mut pair = established_pair();
    pair.collector
        .as_mut()
        .expect("connected")
        .send_command(drain.clone())
        .expect("v3 session");
    pair.drive();
    assert_eq!(
        pair.agent_events_where(|e| matches!(e, AgentEvent::Command(_))),
        vec![(pair.now, AgentEvent::Command(drain))]
    );
}

/// A batch holding an attributed GPU fault (`EventKind::GpuFault`, version 3).
fn fault_batch(seq: u64) -> Batch {
    use razar_shared::domain::{Severity, XidClass};
    use razar_shared::protocol::{
        ComponentRevision, Event, EventKind, FaultProcess, GpuFault, GpuFaultKind, GpuRef, Subject,
    };
    Batch {
        seq,
        base_ts_ms: 0,
        series: Vec::new(),
        events: vec![Event {
            ts_ms: 5,
            severity: Severity::Critical,
            subject: Subject::Gpu(1),
            kind: EventKind::GpuFault(Box::new(GpuFault {
                fault: GpuFaultKind::Xid {
                    xid: 79,
                    class: XidClass::RebootHost,
                    count: 1,
                    first_ms: 5,
                    last_ms: 5,
                },
                gpu: GpuRef {
                    index: 1,
                    uuid: "GPU-1".into(),
                    pci_bus_id: "00000000:02:00.0".into(),
                },
                processes: vec![FaultProcess {
                    pid: 42,
                    name: "b".into(),
                    used_memory_bytes: Some(1 << 30),
                }],
                components: vec![ComponentRevision {
                    component: "b".into(),
                    version: "v2".into(),
                    spec_hash: "ab".into(),
                    pid: Some(42),
                }],
                historical: false,
            })),
            message: "XID 79".into(),
        }],
    }
}

/// The batch frame the agent session sends after a Welcome of `version`.
fn sent_batch(version: u16) -> Batch {
    let now = std::time::Instant::now();
    let mut agent = AgentSession::new(hello(HOST, 1, PROTOCOL_MAX), now);
    agent.connected(now);
    agent.handle(
        CollectorMessage::Welcome(razar_shared::protocol::Welcome {
            version,
            ..welcome_fields(0)
        }),
        now,
    );
    assert_eq!(agent.state(), AgentState::Established { version });
    agent.push_batch(fault_batch(1)).expect("push");
    let sent: Vec<AgentMessage> = std::iter::from_fn(|| agent.poll_transmit()).collect();
    let batch = sent.into_iter().find_map(|m| match m {
        AgentMessage::Batch(b) => Some(b),
        _ => None,
    });
    // Through the codec, as the collector would decode it.
    let batch = batch.expect("a batch frame");
    let frame = razar_shared::protocol::encode_agent(&AgentMessage::Batch(batch)).expect("encode");
    let mut decoder = razar_shared::protocol::AgentFrameDecoder::new();
    decoder.push(&frame).expect("push frame");
    match decoder.next_frame() {
        Ok(Some(AgentMessage::Batch(b))) => b,
        other => panic!("decoded {other:?}"),
    }
}

/// A version 3 collector gets the attributed fault; a version 2 (or 1) collector the
/// version 1 kind it knows (`Xid`), never a variant it cannot decode.
#[test]
fn attributed_faults_go_to_a_version_3_collector_and_their_old_form_to_an_older_one() {
    use razar_shared::domain::XidClass;
    use razar_shared::protocol::EventKind;
    assert_eq!(sent_batch(3), fault_batch(1));
    for version in [1, 2] {
        let old = sent_batch(version);
        assert_eq!(
            old.events[0].kind,
            EventKind::Xid {
                xid: 79,
                class: XidClass::RebootHost
            },
            "version {version}"
        );
        assert_eq!(old.events[0].message, "XID 79");
    }
}

/// Every component kind goes into an attributed `ComponentEvent` and back unchanged,
/// and a version 2 peer gets the plain kind.
#[test]
fn component_events_round_trip_and_downgrade_to_their_plain_kind() {
    use razar_shared::protocol::{
        ComponentEvent, ComponentEventKind, ComponentRevision, Event, EventKind, GpuRef, Subject,
    };
    let kinds = vec![
        EventKind::StateChanged {
            from: ComponentState::Starting,
            to: ComponentState::Ready,
        },
        EventKind::ProcessAdopted {
            pid: 1,
            adopted: true,
        },
        EventKind::ProcessExited {
            pid: 2,
            code: Some(3),
            signal: None,
        },
        EventKind::PulseResult {
            recovered_ms: Some(4),
            budget_ms: 5,
            passed: true,
        },
        EventKind::QuarantineResolved { note: "n".into() },
        EventKind::VramBudgetExceeded {
            used_bytes: 6,
            budget_bytes: 7,
        },
        EventKind::MemoryBudgetExceeded {
            used_bytes: 8,
            budget_bytes: 9,
        },
        EventKind::Other { code: "c".into() },
    ];
    for kind in kinds {
        let inner = ComponentEventKind::from_kind(&kind).expect("a component kind");
        assert_eq!(inner.to_kind(), kind);
        let attributed = EventKind::ComponentEvent(Box::new(ComponentEvent {
            event: inner,
            revision: ComponentRevision {
                component: "b".into(),
                version: "v2".into(),
                spec_hash: "ab".into(),
                pid: Some(1),
            },
            gpus: vec![GpuRef {
                index: 1,
                uuid: "GPU-1".into(),
                pci_bus_id: "00000000:02:00.0".into(),
            }],
        }));
        let batch = Batch {
            seq: 1,
            base_ts_ms: 0,
            series: Vec::new(),
            events: vec![Event {
                ts_ms: 0,
                severity: razar_shared::domain::Severity::Info,
                subject: Subject::Component("b".into()),
                kind: attributed.clone(),
                message: String::new(),
            }],
        };
        assert_eq!(batch.clone().for_version(3).events[0].kind, attributed);
        assert_eq!(batch.for_version(2).events[0].kind, kind);
    }
    assert_eq!(ComponentEventKind::from_kind(&EventKind::GpuLost), None);
}
