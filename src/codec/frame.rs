//! Frames: the protocol header, decoding frames out of a receive buffer, and encoding frames into
//! a send buffer.
//!
//! Wire layout of every frame (big-endian):
//!
//! ```text
//! +------+---------+---------+-----------------+-----------+
//! | type | channel |  size   | payload (size)  | end 0xCE  |
//! |  u8  |   u16   |   u32   |                 |    u8     |
//! +------+---------+---------+-----------------+-----------+
//! ```
//!
//! frame_max bounds the whole frame, header and end octet included (8 bytes of overhead), as
//! RabbitMQ counts it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::FrameError;
use super::methods::Method;
use super::properties::{BasicProperties, BASIC_CLASS_ID};
use super::types::{Reader, Writer};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// type + channel + size.
pub const FRAME_HEADER_BYTES: usize = 7;
/// Header plus the end octet: what a frame costs beyond its payload.
pub const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + 1;
/// The smallest frame_max a peer may negotiate (`frame-min-size`).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// What a 0-9-1 client sends first.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// A decoded frame. Payloads are slices of the receive buffer, not copies.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Method { channel: u16, method: Method },
    Header { channel: u16, header: ContentHeader },
    Body { channel: u16, payload: Bytes },
    Heartbeat,
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }
}

/// A content header frame's payload.
///
/// The properties stay encoded (they were validated when the frame was decoded): the broker
/// passes them on to consumers as they are and needs only a few of them, so a publish does not
/// carry the decoded struct (368 bytes) through every move of the frame and the command.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    /// The encoded property flags and list exactly as received.
    pub raw_properties: Bytes,
    /// delivery-mode is 2.
    pub persistent: bool,
}

impl ContentHeader {
    pub fn new(body_size: u64, properties: BasicProperties) -> ContentHeader {
        ContentHeader {
            class_id: BASIC_CLASS_ID,
            body_size,
            raw_properties: properties.to_bytes(),
            persistent: properties.is_persistent(),
        }
    }

    /// The decoded properties (none for a class other than basic).
    pub fn properties(&self) -> BasicProperties {
        if self.class_id != BASIC_CLASS_ID {
            return BasicProperties::default();
        }
        BasicProperties::decode(&self.raw_properties).unwrap_or_default()
    }

    /// The decoded properties, only if any property of `flags` (see `HEADERS_FLAG`, say) is
    /// present: the flags word is read without decoding the rest.
    pub fn properties_if_any(&self, flags: u16) -> Option<BasicProperties> {
        match self.raw_properties.get(..2) {
            Some(&[high, low])
                if self.class_id == BASIC_CLASS_ID
                    && u16::from_be_bytes([high, low]) & flags != 0 =>
            {
                Some(self.properties())
            }
            _ => None,
        }
    }
}

/// The outcome of looking at the first bytes a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    /// Exactly `AMQP 0 0 9 1`.
    Accepted,
    /// Anything else: answer with [`PROTOCOL_HEADER`] and close.
    Refused,
    /// Fewer than 8 bytes so far, all matching.
    NeedMore,
}

pub fn check_protocol_header(received: &[u8]) -> ProtocolHeader {
    let len = received.len().min(PROTOCOL_HEADER.len());
    if received[..len] != PROTOCOL_HEADER[..len] {
        return ProtocolHeader::Refused;
    }
    if len < PROTOCOL_HEADER.len() {
        ProtocolHeader::NeedMore
    } else {
        ProtocolHeader::Accepted
    }
}

/// Takes one frame off the front of `buffer`.
///
/// Returns `Ok(None)` when the buffer does not yet hold a whole frame. `frame_max` of 0 means no
/// limit, for frames we encoded ourselves; a peer's frames are always decoded under a limit.
/// The frame type and size are checked as soon as the 7 header bytes are in, so a peer cannot
/// make us wait for (or buffer) a payload we would refuse anyway. Room for the rest of a frame
/// is the reader's business (`connection::driver` reads into the buffer's spare room).
pub fn decode_frame(buffer: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    if buffer.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let frame_type = buffer[0];
    let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
    let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]);
    if !matches!(
        frame_type,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownFrameType { frame_type });
    }
    let frame_bytes = u64::from(size) + FRAME_OVERHEAD_BYTES as u64;
    if frame_max != 0 && frame_bytes > u64::from(frame_max) {
        return Err(FrameError::FrameTooLarge {
            frame_bytes,
            frame_max,
        });
    }
    // frame_bytes <= frame_max <= u32::MAX, or frame_max is 0 and the size is still a u32 plus 8.
    let frame_len = usize::try_from(frame_bytes).map_err(|_| FrameError::PayloadSize {
        what: "frame larger than this machine's address space",
    })?;
    if buffer.len() < frame_len {
        return Ok(None);
    }
    let mut frame = buffer.split_to(frame_len).freeze();
    let found = frame[frame_len - 1];
    if found != FRAME_END {
        return Err(FrameError::BadFrameEnd { found });
    }
    frame.advance(FRAME_HEADER_BYTES);
    frame.truncate(frame_len - FRAME_OVERHEAD_BYTES);
    let payload = frame;
    match frame_type {
        FRAME_METHOD => decode_method_payload(channel, &payload).map(Some),
        FRAME_HEADER => decode_header_payload(channel, &payload).map(Some),
        FRAME_BODY => Ok(Some(Frame::Body { channel, payload })),
        _ => {
            if channel != 0 {
                return Err(FrameError::HeartbeatOnChannel { channel });
            }
            if !payload.is_empty() {
                return Err(FrameError::PayloadSize {
                    what: "heartbeat with a payload",
                });
            }
            Ok(Some(Frame::Heartbeat))
        }
    }
}

fn decode_method_payload(channel: u16, payload: &Bytes) -> Result<Frame, FrameError> {
    if payload.len() < 4 {
        return Err(FrameError::PayloadSize {
            what: "method frame shorter than its class and method ids",
        });
    }
    let mut reader = Reader::new(payload);
    let class_id = reader.short()?;
    let method_id = reader.short()?;
    let bad_arguments = |cause: FrameError| FrameError::BadArguments {
        class_id,
        method_id,
        cause: Box::new(cause),
    };
    let method = match Method::decode_arguments(class_id, method_id, &mut reader) {
        Ok(method) => method,
        Err(unknown @ FrameError::UnknownMethod { .. }) => return Err(unknown),
        Err(cause) => return Err(bad_arguments(cause)),
    };
    if reader.remaining() != 0 {
        return Err(bad_arguments(FrameError::PayloadSize {
            what: "method frame longer than its arguments",
        }));
    }
    Ok(Frame::Method { channel, method })
}

fn decode_header_payload(channel: u16, payload: &Bytes) -> Result<Frame, FrameError> {
    // class-id, weight, body-size, and at least one property-flags word.
    if payload.len() < 14 {
        return Err(FrameError::PayloadSize {
            what: "content header shorter than its fixed fields",
        });
    }
    let mut reader = Reader::new(payload);
    let class_id = reader.short()?;
    let _weight = reader.short()?;
    let body_size = reader.longlong()?;
    let raw_properties = reader.rest();
    // Only basic has content. Another class is handed on with no properties: the connection
    // refuses it against the publish it should belong to (505, as RabbitMQ answers).
    let persistent = if class_id == BASIC_CLASS_ID {
        BasicProperties::check(&raw_properties)?
    } else {
        false
    };
    Ok(Frame::Header {
        channel,
        header: ContentHeader {
            class_id,
            body_size,
            raw_properties,
            persistent,
        },
    })
}

/// Writes the 7 header bytes with a zero size and returns where the payload starts.
fn begin_frame(out: &mut BytesMut, frame_type: u8, channel: u16) -> usize {
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_u32(0);
    out.len()
}

/// Patches the size in and writes the end octet.
fn end_frame(out: &mut BytesMut, payload_start: usize) {
    let size = (out.len() - payload_start) as u32;
    out[payload_start - 4..payload_start].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

pub fn encode_method(out: &mut BytesMut, channel: u16, method: &Method) {
    let start = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(method.class_id());
    out.put_u16(method.method_id());
    let mut writer = Writer::new(out);
    method.encode_arguments(&mut writer);
    writer.finish();
    end_frame(out, start);
}

pub fn encode_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// A content header frame from already-encoded properties.
pub fn encode_content_header(
    out: &mut BytesMut,
    channel: u16,
    body_size: u64,
    raw_properties: &[u8],
) {
    let start = begin_frame(out, FRAME_HEADER, channel);
    out.put_u16(BASIC_CLASS_ID);
    out.put_u16(0);
    out.put_u64(body_size);
    out.put_slice(raw_properties);
    end_frame(out, start);
}

/// Body frames for `body`, each at most `frame_max` bytes (0: no limit). An empty body gets no
/// body frame, as the spec allows and RabbitMQ does.
pub fn encode_body(out: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    let chunk_max = if frame_max == 0 {
        u32::MAX as usize - FRAME_OVERHEAD_BYTES
    } else {
        // frame_max >= FRAME_MIN_SIZE is enforced at negotiation; guard the arithmetic anyway.
        (frame_max as usize)
            .saturating_sub(FRAME_OVERHEAD_BYTES)
            .max(1)
    };
    out.reserve(body.len() + body.len().div_ceil(chunk_max) * FRAME_OVERHEAD_BYTES);
    for chunk in body.chunks(chunk_max) {
        let start = begin_frame(out, FRAME_BODY, channel);
        out.put_slice(chunk);
        end_frame(out, start);
    }
}

/// A content-carrying method, its header and its body frames, back to back.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    method: &Method,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    debug_assert!(method.has_content());
    encode_method(out, channel, method);
    encode_content_header(out, channel, body.len() as u64, raw_properties);
    encode_body(out, channel, body, frame_max);
}

/// basic.deliver's method id in the basic class (the method table's; `encode_delivery`'s test
/// holds the two together).
const BASIC_DELIVER_METHOD_ID: u16 = 60;

/// The arguments of one basic.deliver, its names borrowed from the consumer and the message.
#[derive(Debug, Clone, Copy)]
pub struct DeliverArgs<'a> {
    pub consumer_tag: &'a [u8],
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: &'a [u8],
    pub routing_key: &'a [u8],
}

/// basic.deliver with its header and body frames: the same bytes as `encode_content` of a
/// `BasicDeliver`, written from borrowed names. Every delivery goes through here, so it builds
/// no method value and takes no reference on the message's names. A name longer than a short
/// string can hold (never: each came in as one) is sent empty.
pub fn encode_delivery(
    out: &mut BytesMut,
    channel: u16,
    args: DeliverArgs<'_>,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    fn put_short(out: &mut BytesMut, name: &[u8]) {
        let name = if name.len() <= usize::from(u8::MAX) {
            name
        } else {
            &[]
        };
        out.put_u8(name.len() as u8);
        out.put_slice(name);
    }
    let start = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(BASIC_CLASS_ID);
    out.put_u16(BASIC_DELIVER_METHOD_ID);
    put_short(out, args.consumer_tag);
    out.put_u64(args.delivery_tag);
    out.put_u8(u8::from(args.redelivered));
    put_short(out, args.exchange);
    put_short(out, args.routing_key);
    end_frame(out, start);
    encode_content_header(out, channel, body.len() as u64, raw_properties);
    encode_body(out, channel, body, frame_max);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::methods::*;
    use crate::codec::types::ShortStr;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_delivery_writes_what_encode_content_writes(
            channel in any::<u16>(),
            consumer_tag in "[a-z0-9.-]{0,40}",
            exchange in "[a-z.]{0,40}",
            routing_key in proptest::collection::vec(any::<u8>(), 0..300),
            delivery_tag in any::<u64>(),
            redelivered in any::<bool>(),
            properties in proptest::collection::vec(any::<u8>(), 0..40),
            body in proptest::collection::vec(any::<u8>(), 0..600),
            frame_max in prop_oneof![Just(0u32), 8u32..700],
        ) {
            // A routing key past 255 bytes cannot be a short string: both send it empty.
            let key = ShortStr::from_bytes(Bytes::from(routing_key.clone())).unwrap_or_default();
            let deliver = BasicDeliver {
                consumer_tag: ShortStr::try_from(consumer_tag.as_str()).unwrap(),
                delivery_tag,
                redelivered,
                exchange: ShortStr::try_from(exchange.as_str()).unwrap(),
                routing_key: key,
            };
            let mut expected = BytesMut::new();
            encode_content(&mut expected, channel, &deliver.into(), &properties, &body, frame_max);
            let mut written = BytesMut::new();
            let args = DeliverArgs {
                consumer_tag: consumer_tag.as_bytes(),
                delivery_tag,
                redelivered,
                exchange: exchange.as_bytes(),
                routing_key: &routing_key,
            };
            encode_delivery(&mut written, channel, args, &properties, &body, frame_max);
            prop_assert_eq!(written, expected);
        }
    }

    fn decode_all(bytes: &[u8], frame_max: u32) -> Result<Vec<Frame>, FrameError> {
        let mut buffer = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decode_frame(&mut buffer, frame_max)? {
            frames.push(frame);
        }
        assert!(buffer.is_empty(), "trailing bytes left");
        Ok(frames)
    }

    #[test]
    fn golden_bytes_of_channel_open_ok() {
        let mut out = BytesMut::new();
        encode_method(&mut out, 1, &ChannelOpenOk::default().into());
        assert_eq!(
            &out[..],
            &[1, 0, 1, 0, 0, 0, 8, 0, 20, 0, 11, 0, 0, 0, 0, 0xCE]
        );
    }

    #[test]
    fn golden_bytes_of_heartbeat() {
        let mut out = BytesMut::new();
        encode_heartbeat(&mut out);
        assert_eq!(decode_all(&out, 4096).unwrap(), vec![Frame::Heartbeat]);
        assert_eq!(&out[..], &[8, 0, 0, 0, 0, 0, 0, 0xCE]);
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let mut out = BytesMut::new();
        encode_method(&mut out, 3, &BasicQos::default().into());
        for cut in 0..out.len() {
            let mut buffer = BytesMut::from(&out[..cut]);
            assert_eq!(decode_frame(&mut buffer, 4096), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_frame_end_is_a_frame_error() {
        let mut out = BytesMut::new();
        encode_heartbeat(&mut out);
        let last = out.len() - 1;
        out[last] = 0;
        let err = decode_all(&out, 4096).unwrap_err();
        assert_eq!(err, FrameError::BadFrameEnd { found: 0 });
        assert_eq!(err.reply_code().code(), 501);
    }

    #[test]
    fn unknown_frame_type_is_a_frame_error() {
        let err = decode_all(&[9, 0, 0, 0, 0, 0, 0, 0xCE], 4096).unwrap_err();
        assert_eq!(err.reply_code().code(), 501);
    }

    #[test]
    fn oversized_frame_is_refused_before_its_payload_arrives() {
        let header = [3u8, 0, 1, 0, 0, 0x20, 0];
        let err = decode_all(&header, 4096).unwrap_err();
        assert!(matches!(err, FrameError::FrameTooLarge { .. }));
        assert_eq!(err.reply_code().code(), 501);
    }

    #[test]
    fn method_payload_longer_than_its_arguments_is_a_frame_error() {
        let mut out = BytesMut::new();
        encode_method(&mut out, 1, &ChannelFlow { active: true }.into());
        // Grow the payload by one byte and fix up the size.
        out.truncate(out.len() - 1);
        out.put_u8(0);
        out.put_u8(FRAME_END);
        let size = (out.len() - FRAME_OVERHEAD_BYTES) as u32;
        out[3..7].copy_from_slice(&size.to_be_bytes());
        assert_eq!(decode_all(&out, 4096).unwrap_err().reply_code().code(), 501);
    }

    #[test]
    fn truncated_arguments_are_a_frame_error_naming_the_method() {
        // queue.declare with only the reserved short.
        let payload = [0u8, 50, 0, 10, 0, 0];
        let mut out = BytesMut::new();
        out.put_u8(1);
        out.put_u16(1);
        out.put_u32(payload.len() as u32);
        out.put_slice(&payload);
        out.put_u8(FRAME_END);
        let error = decode_all(&out, 4096).unwrap_err();
        // RabbitMQ answers undecodable arguments with 501 and names the method.
        assert_eq!(error.reply_code().code(), 501);
        assert!(matches!(
            error,
            FrameError::BadArguments {
                class_id: 50,
                method_id: 10,
                ..
            }
        ));
    }

    #[test]
    fn unknown_method_is_not_implemented() {
        let mut out = BytesMut::new();
        out.put_slice(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, FRAME_END]);
        let err = decode_all(&out, 4096).unwrap_err();
        assert_eq!(
            err,
            FrameError::UnknownMethod {
                class_id: 60,
                method_id: 99
            }
        );
    }

    #[test]
    fn heartbeat_on_a_channel_is_a_frame_error() {
        let err = decode_all(&[8, 0, 5, 0, 0, 0, 0, 0xCE], 4096).unwrap_err();
        assert_eq!(err, FrameError::HeartbeatOnChannel { channel: 5 });
    }

    #[test]
    fn content_is_fragmented_at_frame_max_and_reassembles() {
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let properties = BasicProperties {
            delivery_mode: Some(2),
            ..Default::default()
        };
        let raw = properties.to_bytes();
        let deliver = BasicDeliver {
            consumer_tag: ShortStr::from_static("ctag"),
            delivery_tag: 42,
            redelivered: true,
            exchange: ShortStr::from_static("amq.direct"),
            routing_key: ShortStr::from_static("rk"),
        };
        let mut out = BytesMut::new();
        encode_content(&mut out, 7, &deliver.clone().into(), &raw, &body, 4096);
        let frames = decode_all(&out, 4096).unwrap();
        assert_eq!(frames.len(), 2 + 3, "10000 bytes need 3 frames of 4088");
        assert_eq!(
            frames[0],
            Frame::Method {
                channel: 7,
                method: deliver.into()
            }
        );
        match &frames[1] {
            Frame::Header { channel, header } => {
                assert_eq!(*channel, 7);
                assert_eq!(header.body_size, 10_000);
                assert_eq!(header.properties(), properties);
                assert_eq!(header.raw_properties, raw);
            }
            other => panic!("expected a header, got {other:?}"),
        }
        let mut reassembled = Vec::new();
        for frame in &frames[2..] {
            match frame {
                Frame::Body {
                    channel: 7,
                    payload,
                } => {
                    assert!(payload.len() + FRAME_OVERHEAD_BYTES <= 4096);
                    reassembled.extend_from_slice(payload);
                }
                other => panic!("expected a body, got {other:?}"),
            }
        }
        assert_eq!(reassembled, body);
    }

    #[test]
    fn body_decoding_does_not_copy() {
        let mut out = BytesMut::new();
        encode_body(&mut out, 1, &[7u8; 100], 4096);
        let mut buffer = out;
        let base = buffer.as_ptr() as usize;
        match decode_frame(&mut buffer, 4096).unwrap() {
            Some(Frame::Body { payload, .. }) => {
                assert_eq!(payload.as_ptr() as usize, base + FRAME_HEADER_BYTES);
            }
            other => panic!("expected a body, got {other:?}"),
        }
    }

    #[test]
    fn protocol_header_checks() {
        assert_eq!(
            check_protocol_header(b"AMQP\x00\x00\x09\x01"),
            ProtocolHeader::Accepted
        );
        assert_eq!(check_protocol_header(b"AMQ"), ProtocolHeader::NeedMore);
        assert_eq!(
            check_protocol_header(b"AMQP\x01\x01\x00\x0a"),
            ProtocolHeader::Refused
        );
        assert_eq!(
            check_protocol_header(b"GET / HTTP/1.1"),
            ProtocolHeader::Refused
        );
    }

    proptest! {
        /// Whatever bytes arrive, decoding returns a value; it never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buffer = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_frame(&mut buffer, 4096) {}
        }

        /// Valid frames with random channel numbers and bodies round-trip through any split.
        #[test]
        fn frames_round_trip_through_any_split(
            channel in any::<u16>(),
            body in proptest::collection::vec(any::<u8>(), 0..20_000),
            split in 0usize..30_000,
        ) {
            let mut out = BytesMut::new();
            encode_content(&mut out, channel, &BasicPublish::default().into(), &[0, 0], &body, 4096);
            encode_heartbeat(&mut out);
            let split = split.min(out.len());
            let mut buffer = BytesMut::from(&out[..split]);
            let mut frames = Vec::new();
            while let Some(frame) = decode_frame(&mut buffer, 4096).unwrap() {
                frames.push(frame);
            }
            buffer.extend_from_slice(&out[split..]);
            while let Some(frame) = decode_frame(&mut buffer, 4096).unwrap() {
                frames.push(frame);
            }
            prop_assert!(buffer.is_empty());
            prop_assert_eq!(frames.last(), Some(&Frame::Heartbeat));
            let received: Vec<u8> = frames.iter().filter_map(|f| match f {
                Frame::Body { payload, .. } => Some(payload.to_vec()),
                _ => None,
            }).flatten().collect();
            prop_assert_eq!(received, body);
        }
    }

    /// A publish moves its frame from the decoder through the connection machine to the session
    /// several times; past 128 bytes each move is a call to `memcpy` (see `boxed` in
    /// `methods.rs`). basic.publish sets the size.
    #[test]
    fn frames_stay_small_enough_to_move_in_registers() {
        // At most basic.publish plus the enum's tag, rounded to the struct's alignment.
        let publish_variant =
            std::mem::size_of::<BasicPublish>() + std::mem::align_of::<BasicPublish>();
        assert!(std::mem::size_of::<Method>() <= publish_variant);
        assert!(std::mem::size_of::<Frame>() <= 128);
    }
}
