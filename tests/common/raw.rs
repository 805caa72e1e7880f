//! A deliberately tiny AMQP peer written byte by byte, for the tests that must send what no
//! well-behaved client library would: garbage, oversized frames, silence instead of heartbeats.
//! It shares no code with the broker's codec.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFrame {
    pub frame_type: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// (class id, method id) of a method frame.
    pub fn method_ids(&self) -> Option<(u16, u16)> {
        if self.frame_type != 1 || self.payload.len() < 4 {
            return None;
        }
        Some((
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            u16::from_be_bytes([self.payload[2], self.payload[3]]),
        ))
    }

    /// The reply code of a connection.close (10, 50) or channel.close (20, 40).
    pub fn close_code(&self) -> Option<u16> {
        match self.method_ids()? {
            (10, 50) | (20, 40) => Some(u16::from_be_bytes([self.payload[4], self.payload[5]])),
            _ => None,
        }
    }
}

/// A method frame with `arguments` already encoded.
pub fn method_frame(channel: u16, class_id: u16, method_id: u16, arguments: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&class_id.to_be_bytes());
    payload.extend_from_slice(&method_id.to_be_bytes());
    payload.extend_from_slice(arguments);
    frame(1, channel, &payload)
}

pub fn frame(frame_type: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![frame_type];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
    out
}

/// The arguments of a connection.close or channel.close: `code`, no text, no failing method.
pub fn close_arguments(code: u16) -> Vec<u8> {
    let mut arguments = code.to_be_bytes().to_vec();
    short_string(&mut arguments, "");
    arguments.extend_from_slice(&[0, 0, 0, 0]);
    arguments
}

pub fn short_string(out: &mut Vec<u8>, value: &str) {
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn long_string(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        // Several small writes per handshake: without this, Nagle holds each for ~40 ms.
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        RawClient { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one frame; `None` when the broker closed the socket.
    pub fn read_frame(&mut self) -> Option<RawFrame> {
        let mut header = [0u8; 7];
        if let Err(e) = self.stream.read_exact(&mut header) {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ),
                "reading a frame failed: {e}"
            );
            return None;
        }
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut rest = vec![0u8; size + 1];
        self.stream.read_exact(&mut rest).expect("frame payload");
        assert_eq!(rest[size], 0xCE, "frame end octet");
        rest.truncate(size);
        Some(RawFrame {
            frame_type: header[0],
            channel: u16::from_be_bytes([header[1], header[2]]),
            payload: rest,
        })
    }

    /// Reads frames, skipping heartbeats, until a method frame arrives.
    pub fn read_method(&mut self) -> Option<RawFrame> {
        loop {
            let frame = self.read_frame()?;
            if frame.frame_type != 8 {
                return Some(frame);
            }
        }
    }

    /// Whether the broker closes the socket within `limit` (heartbeats may arrive first).
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).expect("timeout");
        let mut buffer = [0u8; 1024];
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            match self.stream.read(&mut buffer) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }

    /// Header, start-ok (PLAIN guest/guest), tune-ok with the given values, open "/".
    pub fn handshake(
        addr: SocketAddr,
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    ) -> RawClient {
        let mut client = RawClient::connect(addr);
        client.send(PROTOCOL_HEADER);
        let start = client.read_method().expect("connection.start");
        assert_eq!(start.method_ids(), Some((10, 10)));

        let mut start_ok = Vec::new();
        start_ok.extend_from_slice(&0u32.to_be_bytes()); // empty client-properties
        short_string(&mut start_ok, "PLAIN");
        long_string(&mut start_ok, b"\0guest\0guest");
        short_string(&mut start_ok, "en_US");
        client.send(&method_frame(0, 10, 11, &start_ok));
        let tune = client.read_method().expect("connection.tune");
        assert_eq!(tune.method_ids(), Some((10, 30)));

        let mut tune_ok = Vec::new();
        tune_ok.extend_from_slice(&channel_max.to_be_bytes());
        tune_ok.extend_from_slice(&frame_max.to_be_bytes());
        tune_ok.extend_from_slice(&heartbeat.to_be_bytes());
        client.send(&method_frame(0, 10, 31, &tune_ok));

        let mut open = Vec::new();
        short_string(&mut open, "/");
        short_string(&mut open, "");
        open.push(0);
        client.send(&method_frame(0, 10, 40, &open));
        let open_ok = client.read_method().expect("connection.open-ok");
        assert_eq!(open_ok.method_ids(), Some((10, 41)));
        client
    }

    /// channel.open on `channel`; returns the broker's answer.
    pub fn open_channel(&mut self, channel: u16) -> Option<RawFrame> {
        self.send(&method_frame(channel, 20, 10, &[0]));
        self.read_method()
    }

    /// Answers a connection.close with close-ok.
    pub fn send_close_ok(&mut self) {
        self.send(&method_frame(0, 10, 51, &[]));
    }
}
