//! The bodies of the fuzz targets in `fuzz/`, kept in the library so that the regression tests
//! (`tests/fuzz_regressions.rs`, on stable Rust, in CI) replay saved inputs through exactly the
//! code the fuzzer ran.
//!
//! Each function takes arbitrary bytes and panics only on a real bug: a decoder panicking, a
//! decoded value that does not survive encode → decode unchanged, or the connection machine
//! panicking or letting its buffers grow past its limits.

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::codec::{
    decode_frame, encode_method, BasicProperties, ConnectionOpen, ConnectionStartOk,
    ConnectionTuneOk, FieldTable, LongStr, Method, Reader, ShortStr, Writer, PROTOCOL_HEADER,
};
use crate::config::Config;
use crate::connection::auth::Directory;
use crate::connection::{ConnectionMachine, ConnectionSettings, Phase};

/// The frame decoder over a byte stream, with the frame_max (the minimum or the default) taken
/// from the first byte. The connection never decodes with frame_max 0 ("no limit"): that would
/// let a declared 4 GB frame reserve 4 GB, which is what the fuzzer's first run found.
pub fn frame_decoder(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let frame_max = if first & 1 == 0 { 4096 } else { 131_072 };
    let mut buffer = BytesMut::from(rest);
    while let Ok(Some(_)) = decode_frame(&mut buffer, frame_max) {}
}

/// One method's arguments: the first four bytes are its class and method ids. A method that
/// decodes must encode to bytes that decode to the same bytes again.
pub fn method_decoder(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let class_id = u16::from_be_bytes([data[0], data[1]]);
    let method_id = u16::from_be_bytes([data[2], data[3]]);
    let bytes = Bytes::copy_from_slice(&data[4..]);
    let Ok(method) = Method::decode_arguments(class_id, method_id, &mut Reader::new(&bytes)) else {
        return;
    };
    let encoded = encode_arguments(&method);
    let again = Method::decode_arguments(class_id, method_id, &mut Reader::new(&encoded))
        .expect("an encoded method decodes");
    assert_eq!(
        encode_arguments(&again),
        encoded,
        "method {}",
        method.name()
    );
}

fn encode_arguments(method: &Method) -> Bytes {
    let mut out = BytesMut::new();
    let mut writer = Writer::new(&mut out);
    method.encode_arguments(&mut writer);
    writer.finish();
    out.freeze()
}

/// A field table with its length prefix; round-trips like methods do.
pub fn field_table(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    let Ok(table) = Reader::new(&bytes).table() else {
        return;
    };
    let encoded = encode_table(&table);
    let again = Reader::new(&encoded)
        .table()
        .expect("an encoded table decodes");
    assert_eq!(encode_table(&again), encoded);
}

fn encode_table(table: &FieldTable) -> Bytes {
    let mut out = BytesMut::new();
    Writer::new(&mut out).table(table);
    out.freeze()
}

/// Basic content-header properties (flags and property list); round-trips.
pub fn content_header(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    let Ok(properties) = BasicProperties::decode(&bytes) else {
        return;
    };
    let mut encoded = BytesMut::new();
    properties.encode(&mut encoded);
    let encoded = encoded.freeze();
    let again = BasicProperties::decode(&encoded).expect("encoded properties decode");
    let mut reencoded = BytesMut::new();
    again.encode(&mut reencoded);
    assert_eq!(reencoded.freeze(), encoded);
}

/// The connection state machine after a valid handshake, fed `data` in chunks whose sizes come
/// from the input itself, with its outbound bytes drained as the driver would.
pub fn connection_machine(data: &[u8]) {
    thread_local! {
        // Parsing the embedded config on every run would dominate the fuzzer's time.
        static SETTINGS: Rc<ConnectionSettings> = {
            let config = Config::default_config().expect("the embedded config parses");
            Rc::new(ConnectionSettings::new(
                Directory::from_config(&config),
                config.connection.clone(),
                Default::default(),
            ))
        };
    }
    let settings = SETTINGS.with(Rc::clone);
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("a socket address");
    let mut machine = ConnectionMachine::new(settings, peer);
    let mut input = BytesMut::new();
    input.extend_from_slice(&PROTOCOL_HEADER);
    let handshake: [Method; 3] = [
        ConnectionStartOk {
            client_properties: FieldTable::new(),
            mechanism: ShortStr::from_static("PLAIN"),
            response: LongStr::from("\0guest\0guest"),
            locale: ShortStr::from_static("en_US"),
        }
        .into(),
        ConnectionTuneOk {
            channel_max: 16,
            frame_max: 4096,
            heartbeat: 0,
        }
        .into(),
        ConnectionOpen {
            virtual_host: ShortStr::from_static("/"),
            ..Default::default()
        }
        .into(),
    ];
    for method in &handshake {
        encode_method(&mut input, 0, method);
    }
    while machine.receive(&mut input).is_some() {}
    assert_eq!(machine.phase(), Phase::Open, "the handshake completes");

    let mut rest = data;
    while let Some((&size, tail)) = rest.split_first() {
        let take = (usize::from(size) + 1).min(tail.len());
        input.extend_from_slice(&tail[..take]);
        rest = &tail[take..];
        while machine.receive(&mut input).is_some() {}
        machine.outbound().clear();
        // What stays buffered is at most one frame the negotiated frame_max allows.
        assert!(
            input.len() <= 4096 + 8,
            "input buffer holds {} bytes",
            input.len()
        );
        if machine.phase() == Phase::Closed {
            return;
        }
    }
}
