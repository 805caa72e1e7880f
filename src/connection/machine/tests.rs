//! The connection state machine driven frame by frame, one check per behaviour.
//!
//! These are unit tests of our own state machine, so our codec plays the client here; the
//! integration tests in tests/ use third-party clients instead.

use super::*;
use crate::codec::*;
use crate::config::Config;
use bytes::BufMut;
use proptest::prelude::*;

struct Harness {
    machine: ConnectionMachine,
    /// Received bytes the machine has not consumed yet, kept as the driver keeps them.
    input: BytesMut,
    /// What the machine handed to the broker layer.
    handed_over: Vec<Input>,
}

impl Harness {
    fn new() -> Harness {
        Harness::from_peer("127.0.0.1:40000")
    }

    fn from_peer(peer: &str) -> Harness {
        Harness::sharing(peer, 0, Default::default())
    }

    /// A machine whose broker allows `max_connections` and counts them in `open_connections`.
    fn sharing(peer: &str, max_connections: usize, open_connections: Arc<AtomicUsize>) -> Harness {
        let config = Config::default_config().unwrap();
        let mut limits = config.connection.clone();
        limits.max_connections = max_connections;
        let settings =
            ConnectionSettings::new(Directory::from_config(&config), limits, open_connections);
        Harness {
            machine: ConnectionMachine::new(Rc::new(settings), peer.parse().unwrap()),
            input: BytesMut::new(),
            handed_over: Vec::new(),
        }
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.input.extend_from_slice(bytes);
        while let Some(input) = self.machine.receive(&mut self.input) {
            self.handed_over.push(input);
        }
        self.replies()
    }

    fn send(&mut self, channel: u16, method: impl Into<Method>) -> Vec<Frame> {
        let mut out = BytesMut::new();
        encode_method(&mut out, channel, &method.into());
        self.send_bytes(&out)
    }

    fn replies(&mut self) -> Vec<Frame> {
        let mut out = std::mem::take(self.machine.outbound());
        let mut frames = Vec::new();
        while let Some(frame) = decode_frame(&mut out, 0).expect("server frames decode") {
            frames.push(frame);
        }
        frames
    }

    /// Runs the handshake up to an open connection with the given tune-ok.
    fn open_with(tune_ok: ConnectionTuneOk) -> Harness {
        let mut h = Harness::new();
        let start = h.send_bytes(&PROTOCOL_HEADER);
        assert!(matches!(
            start.as_slice(),
            [Frame::Method {
                channel: 0,
                method: Method::ConnectionStart(_)
            }]
        ));
        let tune = h.send(0, plain_start_ok("guest", "guest"));
        assert!(matches!(
            tune.as_slice(),
            [Frame::Method {
                channel: 0,
                method: Method::ConnectionTune(_)
            }]
        ));
        assert!(h.send(0, tune_ok).is_empty());
        let open_ok = h.send(0, open("/"));
        assert_eq!(
            open_ok,
            vec![Frame::Method {
                channel: 0,
                method: ConnectionOpenOk::default().into()
            }]
        );
        assert_eq!(h.machine.phase(), Phase::Open);
        h
    }

    fn open() -> Harness {
        Harness::open_with(ConnectionTuneOk {
            channel_max: 10,
            frame_max: 4096,
            heartbeat: 5,
        })
    }
}

fn plain_start_ok(user: &str, password: &str) -> ConnectionStartOk {
    ConnectionStartOk {
        client_properties: FieldTable::new(),
        mechanism: ShortStr::from_static("PLAIN"),
        response: LongStr::from(format!("\0{user}\0{password}").as_str()),
        locale: ShortStr::from_static("en_US"),
    }
}

fn open(vhost: &str) -> ConnectionOpen {
    ConnectionOpen {
        virtual_host: ShortStr::try_from(vhost).unwrap(),
        ..Default::default()
    }
}

/// The reply code of the single connection.close in `frames`.
fn connection_close_code(frames: &[Frame]) -> u16 {
    match frames {
        [Frame::Method {
            channel: 0,
            method: Method::ConnectionClose(close),
        }] => close.reply_code,
        other => panic!("expected one connection.close, got {other:?}"),
    }
}

#[test]
fn connection_start_announces_the_capabilities_clients_look_for() {
    let mut h = Harness::new();
    let frames = h.send_bytes(&PROTOCOL_HEADER);
    let Frame::Method {
        method: Method::ConnectionStart(start),
        ..
    } = &frames[0]
    else {
        panic!("expected connection.start");
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(start.mechanisms.as_bytes(), b"PLAIN AMQPLAIN");
    let Some(FieldValue::Table(capabilities)) = start.server_properties.get("capabilities") else {
        panic!("no capabilities table");
    };
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            capabilities.get(name),
            Some(&FieldValue::Bool(true)),
            "{name}"
        );
    }
}

#[test]
fn protocol_header_arriving_byte_by_byte_is_accepted() {
    let mut h = Harness::new();
    for byte in &PROTOCOL_HEADER[..7] {
        assert!(h.send_bytes(&[*byte]).is_empty());
    }
    assert_eq!(h.send_bytes(&PROTOCOL_HEADER[7..]).len(), 1);
}

#[test]
fn wrong_protocol_header_gets_ours_back_and_a_close() {
    let mut h = Harness::new();
    h.input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    h.machine.receive(&mut h.input);
    assert_eq!(&h.machine.outbound()[..], &PROTOCOL_HEADER);
    assert_eq!(h.machine.phase(), Phase::Closed);
}

#[test]
fn full_handshake_channels_and_close() {
    let mut h = Harness::open();
    assert_eq!(h.machine.tuning().frame_max, 4096);
    assert_eq!(h.machine.heartbeat_secs(), Some(5));
    for channel in 1..=3 {
        let reply = h.send(channel, ChannelOpen::default());
        assert_eq!(
            reply,
            vec![Frame::Method {
                channel,
                method: ChannelOpenOk::default().into()
            }]
        );
    }
    assert_eq!(h.machine.open_channel_count(), 3);
    let reply = h.send(
        2,
        ChannelClose {
            reply_code: 200,
            ..Default::default()
        },
    );
    assert_eq!(
        reply,
        vec![Frame::Method {
            channel: 2,
            method: ChannelCloseOk {}.into()
        }]
    );
    assert_eq!(h.machine.open_channel_count(), 2);
    let reply = h.send(
        0,
        ConnectionClose {
            reply_code: 200,
            ..Default::default()
        },
    );
    assert_eq!(
        reply,
        vec![Frame::Method {
            channel: 0,
            method: ConnectionCloseOk {}.into()
        }]
    );
    assert_eq!(h.machine.phase(), Phase::Closed);
}

#[test]
fn connection_open_past_max_connections_is_530_and_a_close_frees_the_slot() {
    let counter = Arc::new(AtomicUsize::new(0));
    let open_to_open = |h: &mut Harness| {
        h.send_bytes(&PROTOCOL_HEADER);
        h.send(0, plain_start_ok("guest", "guest"));
        h.send(0, ConnectionTuneOk::default());
        h.send(0, open("/"))
    };
    let mut first = Harness::sharing("127.0.0.1:40001", 2, counter.clone());
    let mut second = Harness::sharing("127.0.0.1:40002", 2, counter.clone());
    let mut third = Harness::sharing("127.0.0.1:40003", 2, counter.clone());
    assert_eq!(first.machine.phase(), Phase::AwaitingProtocolHeader);
    open_to_open(&mut first);
    open_to_open(&mut second);
    assert_eq!(counter.load(Ordering::Relaxed), 2);
    assert_eq!(connection_close_code(&open_to_open(&mut third)), 530);
    assert_eq!(
        counter.load(Ordering::Relaxed),
        2,
        "a refusal takes no slot"
    );
    drop(first);
    assert_eq!(counter.load(Ordering::Relaxed), 1);
    let mut fourth = Harness::sharing("127.0.0.1:40004", 2, counter.clone());
    let reply = open_to_open(&mut fourth);
    assert!(matches!(
        reply.as_slice(),
        [Frame::Method {
            method: Method::ConnectionOpenOk(_),
            ..
        }]
    ));
    assert_eq!(fourth.machine.phase(), Phase::Open);
}

#[test]
fn amqplain_login_works() {
    let mut h = Harness::new();
    h.send_bytes(&PROTOCOL_HEADER);
    let credentials: FieldTable = [
        (
            ShortStr::from_static("LOGIN"),
            FieldValue::LongStr("guest".into()),
        ),
        (
            ShortStr::from_static("PASSWORD"),
            FieldValue::LongStr("guest".into()),
        ),
    ]
    .into_iter()
    .collect();
    let mut response = BytesMut::new();
    write_table_entries(&mut response, &credentials);
    let start_ok = ConnectionStartOk {
        mechanism: ShortStr::from_static("AMQPLAIN"),
        response: LongStr::from_bytes(response.freeze()),
        ..Default::default()
    };
    let reply = h.send(0, start_ok);
    assert!(matches!(
        reply.as_slice(),
        [Frame::Method {
            method: Method::ConnectionTune(_),
            ..
        }]
    ));
}

#[test]
fn wrong_password_is_access_refused() {
    let mut h = Harness::new();
    h.send_bytes(&PROTOCOL_HEADER);
    let reply = h.send(0, plain_start_ok("guest", "wrong"));
    assert_eq!(connection_close_code(&reply), 403);
    assert_eq!(h.machine.phase(), Phase::Closing);
    h.send(0, ConnectionCloseOk {});
    assert_eq!(h.machine.phase(), Phase::Closed);
}

#[test]
fn guest_from_a_remote_address_is_access_refused() {
    let mut h = Harness::from_peer("192.0.2.7:5000");
    h.send_bytes(&PROTOCOL_HEADER);
    assert_eq!(
        connection_close_code(&h.send(0, plain_start_ok("guest", "guest"))),
        403
    );
}

#[test]
fn unknown_vhost_is_not_allowed() {
    let mut h = Harness::new();
    h.send_bytes(&PROTOCOL_HEADER);
    h.send(0, plain_start_ok("guest", "guest"));
    h.send(0, ConnectionTuneOk::default());
    let reply = h.send(0, open("/nope"));
    assert_eq!(connection_close_code(&reply), 530);
    let Frame::Method {
        method: Method::ConnectionClose(close),
        ..
    } = &reply[0]
    else {
        unreachable!()
    };
    assert!(close.reply_text.to_str_lossy().contains("/nope"));
    assert_eq!((close.class_id, close.method_id), (10, 40));
}

#[test]
fn tune_ok_outside_the_offered_limits_is_not_allowed() {
    for tune_ok in [
        ConnectionTuneOk {
            channel_max: 0,
            frame_max: 100,
            heartbeat: 0,
        },
        ConnectionTuneOk {
            channel_max: 0,
            frame_max: 1 << 30,
            heartbeat: 0,
        },
        ConnectionTuneOk {
            channel_max: 4000,
            frame_max: 0,
            heartbeat: 0,
        },
    ] {
        let mut h = Harness::new();
        h.send_bytes(&PROTOCOL_HEADER);
        h.send(0, plain_start_ok("guest", "guest"));
        assert_eq!(
            connection_close_code(&h.send(0, tune_ok.clone())),
            530,
            "{tune_ok:?}"
        );
    }
}

#[test]
fn zero_in_tune_ok_means_the_server_limit() {
    let h = Harness::open_with(ConnectionTuneOk::default());
    assert_eq!(
        h.machine.tuning(),
        Tuning {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat_secs: 0
        }
    );
    assert_eq!(h.machine.heartbeat_secs(), None);
}

#[test]
fn channel_above_channel_max_is_not_allowed() {
    let mut h = Harness::open();
    assert_eq!(
        connection_close_code(&h.send(11, ChannelOpen::default())),
        530
    );
}

#[test]
fn method_on_a_channel_that_is_not_open_is_a_channel_error() {
    let mut h = Harness::open();
    assert_eq!(connection_close_code(&h.send(4, BasicQos::default())), 504);
}

#[test]
fn second_channel_open_is_a_channel_error() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    assert_eq!(
        connection_close_code(&h.send(1, ChannelOpen::default())),
        504
    );
}

#[test]
fn channel_flow_is_answered() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    let reply = h.send(1, ChannelFlow { active: false });
    assert_eq!(
        reply,
        vec![Frame::Method {
            channel: 1,
            method: ChannelFlowOk { active: false }.into()
        }]
    );
    assert_eq!(h.machine.channel_flow_active(1), Some(false));
}

#[test]
fn broker_methods_are_handed_over_as_commands() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    assert!(h.send(1, ExchangeDeclare::default()).is_empty());
    match h.handed_over.as_slice() {
        [Input::Command(Command {
            channel: 1,
            method: Method::ExchangeDeclare(_),
            content: None,
        })] => {}
        other => panic!("expected one exchange.declare command, got {other:?}"),
    }
}

fn publish_frames(channel: u16, body: &[u8], declared: u64, frame_max: u32) -> BytesMut {
    let mut out = BytesMut::new();
    encode_method(&mut out, channel, &BasicPublish::default().into());
    encode_content_header(&mut out, channel, declared, &[0, 0]);
    encode_body(&mut out, channel, body, frame_max);
    out
}

/// An open harness with channel 1 open, a 10,000-byte body and its publish in 4 KiB frames.
fn harness_with_large_publish() -> (Harness, Vec<u8>, BytesMut) {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let frames = publish_frames(1, &body, body.len() as u64, 4096);
    (h, body, frames)
}

/// The body of the one publish handed over; panics on anything else.
fn the_published_body(handed_over: &[Input]) -> &[u8] {
    match handed_over {
        [Input::Command(Command {
            method: Method::BasicPublish(_),
            content: Some(content),
            ..
        })] => &content.body,
        other => panic!("expected one publish, got {other:?}"),
    }
}

#[test]
fn publish_content_is_assembled_across_frames() {
    let (mut h, body, frames) = harness_with_large_publish();
    // Byte by byte: nothing is handed over until the last body byte arrives.
    for byte in &frames[..frames.len() - 1] {
        h.send_bytes(&[*byte]);
    }
    assert!(h.handed_over.is_empty());
    h.send_bytes(&frames[frames.len() - 1..]);
    assert_eq!(the_published_body(&h.handed_over), &body[..]);
}

#[test]
fn a_publish_split_across_reads_does_not_hold_the_read_buffer() {
    let (mut h, body, frames) = harness_with_large_publish();
    // One read: the method, the header, a whole first body frame and part of the second.
    let first_read = frames.len() - 5000;
    let mut input = BytesMut::with_capacity(2 * frames.len());
    input.extend_from_slice(&frames[..first_read]);
    assert!(h.machine.receive(&mut input).is_none());
    // Nothing cut from the buffer is alive any more: it is reused for the next read.
    let room = input.capacity() + 1;
    assert!(input.try_reclaim(room), "the read buffer is still shared");
    input.extend_from_slice(&frames[first_read..]);
    let handed_over: Vec<Input> = h.machine.receive(&mut input).into_iter().collect();
    assert_eq!(the_published_body(&handed_over), &body[..]);
}

#[test]
fn empty_body_completes_at_the_header() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    h.send_bytes(&publish_frames(1, &[], 0, 4096));
    assert!(matches!(
        h.handed_over.as_slice(),
        [Input::Command(Command {
            content: Some(_),
            ..
        })]
    ));
}

#[test]
fn body_longer_than_declared_is_a_frame_error() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    let reply = h.send_bytes(&publish_frames(1, b"0123456789", 5, 4096));
    assert_eq!(connection_close_code(&reply), 501);
}

#[test]
fn a_method_where_content_is_expected_is_an_unexpected_frame() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    h.send(1, BasicPublish::default());
    assert_eq!(connection_close_code(&h.send(1, BasicQos::default())), 505);
}

#[test]
fn a_body_over_the_size_limit_closes_the_channel_with_406() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    let mut out = BytesMut::new();
    encode_method(&mut out, 1, &BasicPublish::default().into());
    encode_content_header(&mut out, 1, 1 << 40, &[0, 0]);
    let reply = h.send_bytes(&out);
    match reply.as_slice() {
        [Frame::Method {
            channel: 1,
            method: Method::ChannelClose(close),
        }] => assert_eq!(close.reply_code, 406),
        other => panic!("expected channel.close, got {other:?}"),
    }
    assert!(matches!(
        h.handed_over.as_slice(),
        [Input::ChannelClosed(1)]
    ));
    // The body frames that follow are discarded, and the connection stays up.
    encode_body(&mut out, 1, &[0u8; 100], 4096);
    h.send_bytes(&out[out.len() - 108..]);
    assert_eq!(h.machine.phase(), Phase::Open);
}

#[test]
fn channel_close_from_the_client_is_reported() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    h.send(1, ChannelClose::default());
    assert!(matches!(
        h.handed_over.as_slice(),
        [Input::ChannelClosed(1)]
    ));
}

#[test]
fn server_only_methods_from_a_client_are_command_invalid() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    assert_eq!(
        connection_close_code(&h.send(1, BasicDeliver::default())),
        503
    );
}

#[test]
fn connection_methods_off_channel_zero_are_command_invalid() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    assert_eq!(
        connection_close_code(&h.send(1, ConnectionOpen::default())),
        503
    );
}

#[test]
fn content_without_a_content_method_is_an_unexpected_frame() {
    let mut h = Harness::open();
    h.send(1, ChannelOpen::default());
    let mut out = BytesMut::new();
    encode_content_header(&mut out, 1, 3, &[0, 0]);
    assert_eq!(connection_close_code(&h.send_bytes(&out)), 505);
}

#[test]
fn oversized_frame_is_a_frame_error_and_closes() {
    let mut h = Harness::open();
    let mut out = BytesMut::new();
    encode_body(&mut out, 1, &[0u8; 5000], 0);
    assert_eq!(connection_close_code(&h.send_bytes(&out)), 501);
    assert_eq!(h.machine.phase(), Phase::Closed);
}

#[test]
fn frames_after_our_close_are_discarded_until_close_ok() {
    let mut h = Harness::open();
    h.machine.begin_shutdown();
    assert_eq!(connection_close_code(&h.replies()), 320);
    assert!(h.send(1, ChannelOpen::default()).is_empty());
    assert_eq!(h.machine.phase(), Phase::Closing);
    h.send(0, ConnectionCloseOk {});
    assert_eq!(h.machine.phase(), Phase::Closed);
}

#[test]
fn heartbeats_are_accepted_and_sent() {
    let mut h = Harness::open();
    assert!(h.send_bytes(&[8, 0, 0, 0, 0, 0, 0, 0xCE]).is_empty());
    h.machine.send_heartbeat();
    assert_eq!(h.replies(), vec![Frame::Heartbeat]);
}

#[test]
fn update_secret_checks_the_new_secret() {
    let mut h = Harness::open();
    let reply = h.send(
        0,
        ConnectionUpdateSecret {
            new_secret: "guest".into(),
            reason: ShortStr::from_static("r"),
        },
    );
    assert_eq!(
        reply,
        vec![Frame::Method {
            channel: 0,
            method: ConnectionUpdateSecretOk {}.into()
        }]
    );
    let reply = h.send(
        0,
        ConnectionUpdateSecret {
            new_secret: "bad".into(),
            reason: ShortStr::from_static("r"),
        },
    );
    assert_eq!(connection_close_code(&reply), 403);
}

proptest! {
    /// Whatever an open connection receives, the machine answers without panicking.
    #[test]
    fn arbitrary_input_after_the_handshake_never_panics(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)
    ) {
        let mut h = Harness::open();
        for chunk in chunks {
            let mut input = BytesMut::from(&chunk[..]);
            h.machine.receive(&mut input);
        }
        h.machine.outbound().clear();
    }

    /// Well-formed frames with random methods and channels never panic either.
    #[test]
    fn arbitrary_methods_never_panic(
        picks in proptest::collection::vec((0usize..METHOD_TABLE.len(), 0u16..20), 0..20)
    ) {
        let mut h = Harness::open();
        for (index, channel) in picks {
            let info = &METHOD_TABLE[index];
            let mut payload = BytesMut::new();
            payload.put_u16(info.class_id);
            payload.put_u16(info.method_id);
            // Minimal arguments: zero for every field, empty strings and tables.
            let mut in_bits = false;
            for field in info.fields {
                let bit = field.kind == FieldKind::Bit;
                if bit && in_bits {
                    continue; // packed into the octet already written
                }
                in_bits = bit;
                match field.kind {
                    FieldKind::Bit | FieldKind::Octet => payload.put_u8(0),
                    FieldKind::Short => payload.put_u16(0),
                    FieldKind::Long | FieldKind::LongStr | FieldKind::Table => payload.put_u32(0),
                    FieldKind::LongLong | FieldKind::Timestamp => payload.put_u64(0),
                    FieldKind::ShortStr => payload.put_u8(0),
                }
            }
            let mut frame = BytesMut::new();
            frame.put_u8(1);
            frame.put_u16(channel);
            frame.put_u32(payload.len() as u32);
            frame.extend_from_slice(&payload);
            frame.put_u8(0xCE);
            h.machine.receive(&mut frame);
        }
    }
}
