//! The record framing every log file of shardmq uses (the metadata log and the shards'
//! write-ahead logs): length-prefixed, typed, checksummed.
//!
//! ```text
//! +-------------+-------------+---------+---------------------+
//! | length u32  | crc32 u32   | kind u8 | payload (length)     |
//! | little-end. | little-end. |         |                     |
//! +-------------+-------------+---------+---------------------+
//! crc32 (crc32fast, IEEE) covers kind and payload.
//! ```
//!
//! A length of 0 marks the end of the log: files are written in aligned blocks padded with
//! zeros, so the tail after the last record reads as zeros. Replay stops at the first record that
//! is incomplete (torn write), runs past the file, or fails its checksum, and reports how many
//! bytes it dropped from there on — a damaged tail is cut off, never fatal.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// length + crc + kind.
pub const RECORD_HEADER_BYTES: usize = 9;
/// A record's payload may not exceed this (a message body is at most 128 MiB by default).
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 512 << 20;

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut BytesMut, kind: u8, payload: &[u8]) {
    encode_record_with(out, |out| {
        out.put_slice(payload);
        kind
    });
}

/// Appends one framed record whose payload `encode` writes straight into `out` (returning the
/// record's kind), so the payload is not built elsewhere and copied; returns the record's length,
/// header included.
pub fn encode_record_with(out: &mut BytesMut, encode: impl FnOnce(&mut BytesMut) -> u8) -> usize {
    let start = out.len();
    out.put_bytes(0, RECORD_HEADER_BYTES);
    let kind = encode(out);
    let payload_len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(payload_len > 0 || kind != 0, "a record needs a kind");
    assert!(payload_len <= RECORD_PAYLOAD_BYTES_MAX);
    let record = &mut out[start..];
    record[8] = kind;
    // crc covers kind + payload; length counts them too, so it is never 0 for a real record.
    let crc = crc32fast::hash(&record[8..]);
    record[..4].copy_from_slice(&(payload_len as u32 + 1).to_le_bytes());
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub payload: Bytes,
    /// Offset of the record's first byte in the log.
    pub offset: u64,
}

/// What a replay found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replay {
    pub records: Vec<Record>,
    /// Bytes of intact records from the start of the log.
    pub valid_bytes: u64,
    /// Non-zero bytes after the last intact record: a torn or corrupt tail that was dropped.
    pub dropped_bytes: u64,
    /// Why replay stopped before the end of the data, if it did.
    pub stopped_by: Option<&'static str>,
}

/// Reads every intact record of a log image, stopping at the end marker or the first damage.
pub fn replay(log: Bytes) -> Replay {
    let mut replay = Replay::default();
    let mut rest = log.clone();
    let mut offset = 0u64;
    loop {
        if rest.len() < RECORD_HEADER_BYTES {
            if rest.iter().any(|b| *b != 0) {
                replay.stopped_by = Some("truncated record header");
            }
            break;
        }
        let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if length == 0 {
            if rest.iter().any(|b| *b != 0) {
                replay.stopped_by = Some("zero length before the end");
            }
            break;
        }
        if length - 1 > RECORD_PAYLOAD_BYTES_MAX {
            replay.stopped_by = Some("impossible record length");
            break;
        }
        if rest.len() < RECORD_HEADER_BYTES - 1 + length {
            replay.stopped_by = Some("record runs past the end of the log");
            break;
        }
        let body = rest.slice(RECORD_HEADER_BYTES - 1..RECORD_HEADER_BYTES - 1 + length);
        if crc32fast::hash(&body) != crc {
            replay.stopped_by = Some("checksum mismatch");
            break;
        }
        replay.records.push(Record {
            kind: body[0],
            payload: body.slice(1..),
            offset,
        });
        let consumed = RECORD_HEADER_BYTES - 1 + length;
        rest.advance(consumed);
        offset += consumed as u64;
    }
    replay.valid_bytes = offset;
    replay.dropped_bytes = log[offset as usize..]
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |last| last as u64 + 1);
    replay
}

/// A cursor over a record payload whose reads fail instead of panicking: payloads come from
/// disk, and disks lie.
pub struct PayloadReader {
    bytes: Bytes,
}

/// A payload that does not parse. Replay treats the record, and what follows, as damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl PayloadReader {
    pub fn new(bytes: Bytes) -> PayloadReader {
        PayloadReader { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), Malformed> {
        if self.bytes.len() < n {
            Err(Malformed(what))
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        self.need(1, "u8")?;
        Ok(self.bytes.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        self.need(2, "u16")?;
        Ok(self.bytes.get_u16_le())
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        self.need(4, "u32")?;
        Ok(self.bytes.get_u32_le())
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        self.need(8, "u64")?;
        Ok(self.bytes.get_u64_le())
    }

    /// A u8-length-prefixed byte string.
    pub fn short(&mut self) -> Result<Bytes, Malformed> {
        let len = self.u8()? as usize;
        self.need(len, "short string")?;
        Ok(self.bytes.split_to(len))
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> Bytes {
        self.bytes.split_off(0)
    }

    /// A u32-length-prefixed byte string.
    pub fn long(&mut self) -> Result<Bytes, Malformed> {
        let len = self.u32()? as usize;
        self.need(len, "long string")?;
        Ok(self.bytes.split_to(len))
    }
}

/// Writes a u8-length-prefixed byte string (at most 255 bytes).
pub fn put_short(out: &mut BytesMut, bytes: &[u8]) {
    assert!(bytes.len() <= 255);
    out.put_u8(bytes.len() as u8);
    out.put_slice(bytes);
}

/// Writes a u32-length-prefixed byte string.
pub fn put_long(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(records: &[(u8, &[u8])]) -> BytesMut {
        let mut out = BytesMut::new();
        for (kind, payload) in records {
            encode_record(&mut out, *kind, payload);
        }
        out
    }

    const RECORDS: &[(u8, &[u8])] = &[(1, b"first"), (2, b""), (3, b"the third record")];

    #[test]
    fn the_record_layout_is_length_crc_kind_payload() {
        let mut out = BytesMut::from(&b"before"[..]);
        let len = encode_record_with(&mut out, |out| {
            out.put_slice(b"first");
            1
        });
        assert_eq!(len, RECORD_HEADER_BYTES + 5);
        // length 6 (kind + payload), crc32 (IEEE, as zlib computes it) of [1, "first"], kind,
        // payload.
        let expected = b"before\x06\0\0\0\x4c\x6b\xcd\x2e\x01first";
        assert_eq!(&out[..], &expected[..]);
        assert_eq!(&log_of(&[(1, b"first")])[..], &expected[6..]);
    }

    #[test]
    fn records_round_trip_and_zero_padding_ends_the_log() {
        let mut log = log_of(RECORDS);
        let length = log.len() as u64;
        log.put_bytes(0, 4096 - log.len() % 4096);
        let replay = replay(log.freeze());
        assert_eq!(replay.records.len(), 3);
        assert_eq!(replay.records[0].payload, Bytes::from_static(b"first"));
        assert_eq!(replay.records[1].kind, 2);
        assert!(replay.records[1].payload.is_empty());
        assert_eq!(replay.valid_bytes, length);
        assert_eq!(replay.dropped_bytes, 0);
        assert_eq!(replay.stopped_by, None);
    }

    #[test]
    fn a_torn_last_record_is_cut_at_every_byte_offset() {
        let whole = log_of(RECORDS);
        let last_start = whole.len() - (RECORD_HEADER_BYTES + RECORDS[2].1.len());
        for cut in last_start..whole.len() {
            let replay = replay(Bytes::copy_from_slice(&whole[..cut]));
            assert_eq!(replay.records.len(), 2, "cut at {cut}");
            assert_eq!(replay.valid_bytes, last_start as u64, "cut at {cut}");
            // A cut inside the zero high bytes of the length looks like padding; any other
            // cut is reported as dropped bytes.
            assert!(replay.dropped_bytes <= (cut - last_start) as u64);
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_stops_replay_there() {
        let whole = log_of(RECORDS);
        let second_start = RECORD_HEADER_BYTES + RECORDS[0].1.len();
        for byte in second_start..whole.len() {
            for bit in 0..8 {
                let mut damaged = whole.clone();
                damaged[byte] ^= 1 << bit;
                let replay = replay(damaged.freeze());
                assert!(
                    replay.records.len() <= 2,
                    "byte {byte} bit {bit}: damage went unnoticed"
                );
                assert!(!replay.records.is_empty(), "the first record is intact");
                if replay.records.len() == 2 {
                    // Damage in the third record only.
                    assert!(byte >= second_start + RECORD_HEADER_BYTES);
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678u64;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = replay(Bytes::from(bytes));
        }
    }

    #[test]
    fn payload_reader_refuses_short_payloads() {
        let mut out = BytesMut::new();
        put_short(&mut out, b"abc");
        put_long(&mut out, b"defg");
        let mut reader = PayloadReader::new(out.freeze());
        assert_eq!(reader.short().unwrap(), Bytes::from_static(b"abc"));
        assert_eq!(reader.long().unwrap(), Bytes::from_static(b"defg"));
        assert!(reader.u8().is_err());
        let mut reader = PayloadReader::new(Bytes::from_static(&[5, b'a']));
        assert_eq!(reader.short(), Err(Malformed("short string")));
    }
}
