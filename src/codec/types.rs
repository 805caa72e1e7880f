//! AMQP's field types: strings, field tables and arrays, and the cursor that reads them.
//!
//! Invariants:
//! - Decoding borrows from the frame's `Bytes`: strings and byte arrays are refcounted slices of
//!   the received buffer, never copies.
//! - A [`ShortStr`] holds at most 255 bytes; the limit is checked when one is made, so encoding
//!   never fails.
//! - Reading never panics: every read checks the remaining length first.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::FrameError;

/// Field tables nested deeper than this are refused (502): a hostile peer could otherwise make
/// decoding recurse until the stack overflows.
pub const FIELD_TABLE_DEPTH_MAX: usize = 32;

/// An AMQP short string: up to 255 octets. AMQP does not require UTF-8, so this holds bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortStr(Bytes);

/// Made from a value longer than 255 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortStrTooLong {
    pub len: usize,
}

impl fmt::Display for ShortStrTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "short string of {} bytes exceeds 255", self.len)
    }
}

impl std::error::Error for ShortStrTooLong {}

impl ShortStr {
    pub const LEN_MAX: usize = 255;

    /// A short string from a literal; fails to compile (in const context) or panics if too long,
    /// so only use it with literals written in this code base.
    pub const fn from_static(value: &'static str) -> ShortStr {
        assert!(value.len() <= Self::LEN_MAX);
        ShortStr(Bytes::from_static(value.as_bytes()))
    }

    pub fn from_bytes(bytes: Bytes) -> Result<ShortStr, ShortStrTooLong> {
        if bytes.len() > Self::LEN_MAX {
            return Err(ShortStrTooLong { len: bytes.len() });
        }
        Ok(ShortStr(bytes))
    }

    /// A short string from `value`, cut to 255 bytes on a UTF-8 character boundary. For texts we
    /// compose ourselves (reply texts), which must never make encoding fail.
    pub fn truncating(value: &str) -> ShortStr {
        let mut end = value.len().min(Self::LEN_MAX);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        ShortStr(Bytes::copy_from_slice(&value.as_bytes()[..end]))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The same string in a buffer of its own, no longer holding the one it was decoded from.
    pub fn detached(&self) -> ShortStr {
        ShortStr(Bytes::copy_from_slice(&self.0))
    }

    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn to_str_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl TryFrom<&str> for ShortStr {
    type Error = ShortStrTooLong;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        ShortStr::from_bytes(Bytes::copy_from_slice(value.as_bytes()))
    }
}

impl TryFrom<String> for ShortStr {
    type Error = ShortStrTooLong;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        ShortStr::from_bytes(Bytes::from(value))
    }
}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for ShortStr {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_str_lossy(), f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_str_lossy())
    }
}

/// An AMQP long string: up to 2^32-1 octets of binary data.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct LongStr(Bytes);

impl LongStr {
    pub fn from_bytes(bytes: Bytes) -> LongStr {
        // A frame can never hold more than u32::MAX bytes, and neither can anything we build.
        debug_assert!(bytes.len() <= u32::MAX as usize);
        LongStr(bytes)
    }

    pub const fn from_static(value: &'static str) -> LongStr {
        LongStr(Bytes::from_static(value.as_bytes()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying buffer, for zero-copy reuse.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn to_str_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for LongStr {
    fn from(value: &str) -> Self {
        LongStr(Bytes::copy_from_slice(value.as_bytes()))
    }
}

impl From<Vec<u8>> for LongStr {
    fn from(value: Vec<u8>) -> Self {
        LongStr(Bytes::from(value))
    }
}

impl fmt::Debug for LongStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_str_lossy(), f)
    }
}

/// A decimal: `value / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decimal {
    pub scale: u8,
    pub value: u32,
}

/// One value of a field table or array, tagged as RabbitMQ reads and writes them.
///
/// The tags follow RabbitMQ rather than the 0-9-1 grammar where the two differ (RabbitMQ's
/// errata): `s` is a signed 16-bit integer and `l` a signed 64-bit one. `L` is kept apart as an
/// unsigned 64-bit integer so that every value round-trips bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s`
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `L`
    U64(u64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`
    Decimal(Decimal),
    /// `S`
    LongStr(LongStr),
    /// `x`
    Bytes(Bytes),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`: seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`
    Void,
}

impl FieldValue {
    pub fn tag(&self) -> u8 {
        match self {
            FieldValue::Bool(_) => b't',
            FieldValue::I8(_) => b'b',
            FieldValue::U8(_) => b'B',
            FieldValue::I16(_) => b's',
            FieldValue::U16(_) => b'u',
            FieldValue::I32(_) => b'I',
            FieldValue::U32(_) => b'i',
            FieldValue::I64(_) => b'l',
            FieldValue::U64(_) => b'L',
            FieldValue::F32(_) => b'f',
            FieldValue::F64(_) => b'd',
            FieldValue::Decimal(_) => b'D',
            FieldValue::LongStr(_) => b'S',
            FieldValue::Bytes(_) => b'x',
            FieldValue::Array(_) => b'A',
            FieldValue::Timestamp(_) => b'T',
            FieldValue::Table(_) => b'F',
            FieldValue::Void => b'V',
        }
    }

    /// RabbitMQ's name for the value's type, as its error texts give it.
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Bool(_) => "bool",
            FieldValue::I8(_) => "byte",
            FieldValue::U8(_) => "unsignedbyte",
            FieldValue::I16(_) => "short",
            FieldValue::U16(_) => "unsignedshort",
            FieldValue::I32(_) => "signedint",
            FieldValue::U32(_) => "unsignedint",
            FieldValue::I64(_) => "long",
            FieldValue::U64(_) => "unsignedlong",
            FieldValue::F32(_) => "float",
            FieldValue::F64(_) => "double",
            FieldValue::Decimal(_) => "decimal",
            FieldValue::LongStr(_) => "longstr",
            FieldValue::Bytes(_) => "binary",
            FieldValue::Array(_) => "array",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Table(_) => "table",
            FieldValue::Void => "void",
        }
    }

    /// The value as an integer, whatever its width, as RabbitMQ reads numeric arguments.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            FieldValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            FieldValue::LongStr(v) => Some(v.as_bytes()),
            FieldValue::Bytes(v) => Some(v),
            _ => None,
        }
    }
}

/// An AMQP field table: named values in the order they were received.
///
/// A `Vec` rather than a map: tables are small, their order is kept for round trips, and an
/// empty table allocates nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldTable(Vec<(ShortStr, FieldValue)>);

impl FieldTable {
    pub fn new() -> FieldTable {
        FieldTable(Vec::new())
    }

    /// Sets `name` to `value`, replacing an earlier value of the same name.
    pub fn insert(&mut self, name: ShortStr, value: FieldValue) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&FieldValue> {
        self.get_bytes(name.as_bytes())
    }

    pub fn get_bytes(&self, name: &[u8]) -> Option<&FieldValue> {
        self.0
            .iter()
            .find(|(n, _)| n.as_bytes() == name)
            .map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(ShortStr, FieldValue)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(ShortStr, FieldValue)> for FieldTable {
    fn from_iter<T: IntoIterator<Item = (ShortStr, FieldValue)>>(iter: T) -> Self {
        let mut table = FieldTable::new();
        for (name, value) in iter {
            table.insert(name, value);
        }
        table
    }
}

/// A cursor over one frame payload. Consecutive `bit` fields share octets, as the spec packs
/// them; any other read ends a run of bits.
pub struct Reader<'a> {
    bytes: &'a Bytes,
    position: usize,
    /// The octet holding the current run of bits and the index of the next bit in it (8 = none).
    bit_octet: u8,
    bit_index: u8,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a Bytes) -> Reader<'a> {
        Reader {
            bytes,
            position: 0,
            bit_octet: 0,
            bit_index: 8,
        }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    /// The unread rest of the payload, as a zero-copy slice.
    pub fn rest(&mut self) -> Bytes {
        self.bit_index = 8;
        let rest = self.bytes.slice(self.position..);
        self.position = self.bytes.len();
        rest
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        self.bit_index = 8;
        if self.remaining() < len {
            return Err(FrameError::Syntax { what });
        }
        let start = self.position;
        self.position += len;
        Ok(&self.bytes[start..start + len])
    }

    fn take_bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, FrameError> {
        self.take(len, what)?;
        Ok(self.bytes.slice(self.position - len..self.position))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let slice = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    pub fn bit(&mut self) -> Result<bool, FrameError> {
        if self.bit_index >= 8 {
            self.bit_octet = self.octet()?;
            self.bit_index = 0;
        }
        let value = (self.bit_octet >> self.bit_index) & 1 == 1;
        self.bit_index += 1;
        Ok(value)
    }

    pub fn octet(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>("octet")?[0])
    }

    pub fn short(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array("short")?))
    }

    pub fn long(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array("long")?))
    }

    pub fn longlong(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array("longlong")?))
    }

    pub fn timestamp(&mut self) -> Result<u64, FrameError> {
        self.longlong()
    }

    pub fn shortstr(&mut self) -> Result<ShortStr, FrameError> {
        let len = self.octet()? as usize;
        Ok(ShortStr(self.take_bytes(len, "short string")?))
    }

    pub fn longstr(&mut self) -> Result<LongStr, FrameError> {
        let len = self.long()? as usize;
        Ok(LongStr(self.take_bytes(len, "long string")?))
    }

    pub fn table(&mut self) -> Result<FieldTable, FrameError> {
        self.table_at_depth(0)
    }

    fn table_at_depth(&mut self, depth: usize) -> Result<FieldTable, FrameError> {
        if depth >= FIELD_TABLE_DEPTH_MAX {
            return Err(FrameError::TableTooDeep);
        }
        let len = self.long()? as usize;
        let body = self.take_bytes(len, "field table")?;
        let mut inner = Reader::new(&body);
        let mut entries = Vec::new();
        while inner.remaining() > 0 {
            let name = inner.shortstr()?;
            let value = inner.field_value(depth)?;
            entries.push((name, value));
        }
        Ok(FieldTable(entries))
    }

    fn array_at_depth(&mut self, depth: usize) -> Result<Vec<FieldValue>, FrameError> {
        if depth >= FIELD_TABLE_DEPTH_MAX {
            return Err(FrameError::TableTooDeep);
        }
        let len = self.long()? as usize;
        let body = self.take_bytes(len, "field array")?;
        let mut inner = Reader::new(&body);
        let mut values = Vec::new();
        while inner.remaining() > 0 {
            values.push(inner.field_value(depth)?);
        }
        Ok(values)
    }

    fn field_value(&mut self, depth: usize) -> Result<FieldValue, FrameError> {
        let tag = self.octet()?;
        Ok(match tag {
            b't' => FieldValue::Bool(self.octet()? != 0),
            b'b' => FieldValue::I8(i8::from_be_bytes(self.array("field value")?)),
            b'B' => FieldValue::U8(self.octet()?),
            b's' => FieldValue::I16(i16::from_be_bytes(self.array("field value")?)),
            b'u' => FieldValue::U16(self.short()?),
            b'I' => FieldValue::I32(i32::from_be_bytes(self.array("field value")?)),
            b'i' => FieldValue::U32(self.long()?),
            b'l' => FieldValue::I64(i64::from_be_bytes(self.array("field value")?)),
            b'L' => FieldValue::U64(self.longlong()?),
            b'f' => FieldValue::F32(f32::from_be_bytes(self.array("field value")?)),
            b'd' => FieldValue::F64(f64::from_be_bytes(self.array("field value")?)),
            b'D' => FieldValue::Decimal(Decimal {
                scale: self.octet()?,
                value: self.long()?,
            }),
            b'S' => FieldValue::LongStr(self.longstr()?),
            b'x' => {
                let len = self.long()? as usize;
                FieldValue::Bytes(self.take_bytes(len, "byte array")?)
            }
            b'A' => FieldValue::Array(self.array_at_depth(depth + 1)?),
            b'T' => FieldValue::Timestamp(self.longlong()?),
            b'F' => FieldValue::Table(self.table_at_depth(depth + 1)?),
            b'V' => FieldValue::Void,
            tag => return Err(FrameError::UnknownFieldType { tag }),
        })
    }
}

/// Appends fields to a buffer, packing consecutive bits into octets. Call [`Writer::finish`]
/// after the last field so a trailing run of bits is written.
pub struct Writer<'a> {
    out: &'a mut BytesMut,
    bit_octet: u8,
    bit_count: u8,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut BytesMut) -> Writer<'a> {
        Writer {
            out,
            bit_octet: 0,
            bit_count: 0,
        }
    }

    fn flush_bits(&mut self) {
        if self.bit_count > 0 {
            self.out.put_u8(self.bit_octet);
            self.bit_octet = 0;
            self.bit_count = 0;
        }
    }

    pub fn finish(mut self) {
        self.flush_bits();
    }

    pub fn bit(&mut self, value: &bool) {
        if self.bit_count == 8 {
            self.flush_bits();
        }
        self.bit_octet |= u8::from(*value) << self.bit_count;
        self.bit_count += 1;
    }

    pub fn octet(&mut self, value: &u8) {
        self.flush_bits();
        self.out.put_u8(*value);
    }

    pub fn short(&mut self, value: &u16) {
        self.flush_bits();
        self.out.put_u16(*value);
    }

    pub fn long(&mut self, value: &u32) {
        self.flush_bits();
        self.out.put_u32(*value);
    }

    pub fn longlong(&mut self, value: &u64) {
        self.flush_bits();
        self.out.put_u64(*value);
    }

    pub fn timestamp(&mut self, value: &u64) {
        self.longlong(value);
    }

    pub fn shortstr(&mut self, value: &ShortStr) {
        self.flush_bits();
        // ShortStr guarantees len <= 255.
        self.out.put_u8(value.len() as u8);
        self.out.put_slice(value.as_bytes());
    }

    pub fn longstr(&mut self, value: &LongStr) {
        self.flush_bits();
        self.out.put_u32(value.len() as u32);
        self.out.put_slice(value.as_bytes());
    }

    pub fn table(&mut self, value: &FieldTable) {
        self.flush_bits();
        write_table(self.out, value);
    }
}

/// Writes a u32 length placeholder, runs `body`, then patches the length in.
fn with_length_prefix(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn write_table(out: &mut BytesMut, table: &FieldTable) {
    with_length_prefix(out, |out| write_table_entries(out, table));
}

/// The entries of a table without its length prefix: the form AMQPLAIN responses use.
pub fn write_table_entries(out: &mut BytesMut, table: &FieldTable) {
    for (name, value) in table.iter() {
        out.put_u8(name.len() as u8);
        out.put_slice(name.as_bytes());
        write_field_value(out, value);
    }
}

fn write_field_value(out: &mut BytesMut, value: &FieldValue) {
    out.put_u8(value.tag());
    match value {
        FieldValue::Bool(v) => out.put_u8(u8::from(*v)),
        FieldValue::I8(v) => out.put_i8(*v),
        FieldValue::U8(v) => out.put_u8(*v),
        FieldValue::I16(v) => out.put_i16(*v),
        FieldValue::U16(v) => out.put_u16(*v),
        FieldValue::I32(v) => out.put_i32(*v),
        FieldValue::U32(v) => out.put_u32(*v),
        FieldValue::I64(v) => out.put_i64(*v),
        FieldValue::U64(v) => out.put_u64(*v),
        FieldValue::F32(v) => out.put_f32(*v),
        FieldValue::F64(v) => out.put_f64(*v),
        FieldValue::Decimal(v) => {
            out.put_u8(v.scale);
            out.put_u32(v.value);
        }
        FieldValue::LongStr(v) => {
            out.put_u32(v.len() as u32);
            out.put_slice(v.as_bytes());
        }
        FieldValue::Bytes(v) => {
            out.put_u32(v.len() as u32);
            out.put_slice(v);
        }
        FieldValue::Array(values) => with_length_prefix(out, |out| {
            for value in values {
                write_field_value(out, value);
            }
        }),
        FieldValue::Timestamp(v) => out.put_u64(*v),
        FieldValue::Table(table) => write_table(out, table),
        FieldValue::Void => {}
    }
}

/// Decodes the entries of a table that has no length prefix (an AMQPLAIN response).
pub fn read_table_entries(bytes: &Bytes) -> Result<FieldTable, FrameError> {
    let mut reader = Reader::new(bytes);
    let mut entries = Vec::new();
    while reader.remaining() > 0 {
        let name = reader.shortstr()?;
        let value = reader.field_value(0)?;
        entries.push((name, value));
    }
    Ok(FieldTable(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_round_trip(table: &FieldTable) -> FieldTable {
        let mut out = BytesMut::new();
        write_table(&mut out, table);
        let bytes = out.freeze();
        let mut reader = Reader::new(&bytes);
        let decoded = reader.table().expect("decodes");
        assert_eq!(reader.remaining(), 0);
        decoded
    }

    #[test]
    fn every_field_type_round_trips() {
        let nested: FieldTable = [(
            ShortStr::from_static("inner"),
            FieldValue::LongStr("x".into()),
        )]
        .into_iter()
        .collect();
        let table: FieldTable = [
            ("t", FieldValue::Bool(true)),
            ("b", FieldValue::I8(-5)),
            ("B", FieldValue::U8(250)),
            ("s", FieldValue::I16(-300)),
            ("u", FieldValue::U16(60000)),
            ("I", FieldValue::I32(-70000)),
            ("i", FieldValue::U32(4_000_000_000)),
            ("l", FieldValue::I64(-1 << 40)),
            ("L", FieldValue::U64(u64::MAX)),
            ("f", FieldValue::F32(1.5)),
            ("d", FieldValue::F64(-2.25)),
            (
                "D",
                FieldValue::Decimal(Decimal {
                    scale: 2,
                    value: 12345,
                }),
            ),
            ("S", FieldValue::LongStr("hello".into())),
            ("x", FieldValue::Bytes(Bytes::from_static(&[0, 1, 2]))),
            (
                "A",
                FieldValue::Array(vec![FieldValue::I32(1), FieldValue::Void]),
            ),
            ("T", FieldValue::Timestamp(1_700_000_000)),
            ("F", FieldValue::Table(nested)),
            ("V", FieldValue::Void),
        ]
        .into_iter()
        .map(|(k, v)| (ShortStr::from_static(k), v))
        .collect();
        assert_eq!(table_round_trip(&table), table);
    }

    #[test]
    fn golden_bytes_of_a_small_table() {
        let table: FieldTable = [(ShortStr::from_static("a"), FieldValue::U16(9))]
            .into_iter()
            .collect();
        let mut out = BytesMut::new();
        write_table(&mut out, &table);
        assert_eq!(&out[..], &[0, 0, 0, 5, 1, b'a', b'u', 0, 9]);
    }

    #[test]
    fn unknown_tag_is_a_syntax_error() {
        let bytes = Bytes::from_static(&[0, 0, 0, 3, 1, b'a', b'Z']);
        let err = Reader::new(&bytes).table().unwrap_err();
        assert_eq!(err, FrameError::UnknownFieldType { tag: b'Z' });
    }

    #[test]
    fn table_length_past_the_end_is_a_syntax_error() {
        let bytes = Bytes::from_static(&[0, 0, 0, 50, 1, b'a', b'V']);
        assert!(matches!(
            Reader::new(&bytes).table(),
            Err(FrameError::Syntax { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // 10,000 nested arrays: 'A' + length each.
        let depth = 10_000usize;
        let mut out = BytesMut::new();
        out.put_u32(0); // outer table length, patched below
        out.put_u8(1);
        out.put_u8(b'k');
        for level in 0..depth {
            out.put_u8(b'A');
            out.put_u32(((depth - level - 1) * 5) as u32);
        }
        let len = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&len.to_be_bytes());
        let bytes = out.freeze();
        assert_eq!(
            Reader::new(&bytes).table().unwrap_err(),
            FrameError::TableTooDeep
        );
    }

    #[test]
    fn bits_pack_into_octets() {
        let mut out = BytesMut::new();
        let mut writer = Writer::new(&mut out);
        for i in 0..10 {
            writer.bit(&(i % 3 == 0));
        }
        writer.octet(&7);
        writer.finish();
        assert_eq!(&out[..], &[0b0100_1001, 0b0000_0010, 7]);
        let bytes = out.freeze();
        let mut reader = Reader::new(&bytes);
        for i in 0..10 {
            assert_eq!(reader.bit().unwrap(), i % 3 == 0);
        }
        assert_eq!(reader.octet().unwrap(), 7);
    }

    #[test]
    fn short_str_limit_is_enforced() {
        assert!(ShortStr::try_from("x".repeat(255)).is_ok());
        assert_eq!(
            ShortStr::try_from("x".repeat(256)).unwrap_err(),
            ShortStrTooLong { len: 256 }
        );
        assert_eq!(ShortStr::truncating(&"é".repeat(200)).len(), 254);
    }
}
