//! The AMQP 0.9.1 codec: frames, methods, content properties and field tables.
//!
//! Sans-IO: this module turns bytes into values and values into bytes and does nothing else — no
//! sockets, no clocks, no allocation per publish or deliver beyond what the caller's buffers
//! already hold. Decoding takes a `BytesMut` of received bytes and answers "need more bytes"
//! (`Ok(None)`), a frame, or a [`FrameError`] that knows its reply code; it never panics on input.
//! Encoding appends to a caller-owned `BytesMut`, so many frames share one socket write.

// The field-type macros come first: `methods` and `properties` expand them.
macro_rules! field_rust_type {
    (bit) => {
        bool
    };
    (octet) => {
        u8
    };
    (short) => {
        u16
    };
    (long) => {
        u32
    };
    (longlong) => {
        u64
    };
    (shortstr) => {
        ShortStr
    };
    (longstr) => {
        LongStr
    };
    (timestamp) => {
        u64
    };
    (table) => {
        FieldTable
    };
}

macro_rules! field_kind {
    (bit) => {
        FieldKind::Bit
    };
    (octet) => {
        FieldKind::Octet
    };
    (short) => {
        FieldKind::Short
    };
    (long) => {
        FieldKind::Long
    };
    (longlong) => {
        FieldKind::LongLong
    };
    (shortstr) => {
        FieldKind::ShortStr
    };
    (longstr) => {
        FieldKind::LongStr
    };
    (timestamp) => {
        FieldKind::Timestamp
    };
    (table) => {
        FieldKind::Table
    };
}

mod error;
mod frame;
mod methods;
mod properties;
mod types;

pub use error::{FrameError, ReplyCode};
pub use frame::{
    check_protocol_header, decode_frame, encode_body, encode_content, encode_content_header,
    encode_delivery, encode_heartbeat, encode_method, ContentHeader, DeliverArgs, Frame,
    ProtocolHeader, FRAME_END, FRAME_HEADER_BYTES, FRAME_MIN_SIZE, FRAME_OVERHEAD_BYTES,
    PROTOCOL_HEADER,
};
pub use methods::*;
pub use properties::{
    BasicProperties, BASIC_CLASS_ID, BASIC_PROPERTY_TABLE, EXPIRATION_FLAG, HEADERS_FLAG,
    PRIORITY_FLAG, REPLY_TO_FLAG, USER_ID_FLAG,
};
pub use types::{
    read_table_entries, write_table, write_table_entries, Decimal, FieldTable, FieldValue, LongStr,
    Reader, ShortStr, ShortStrTooLong, Writer, FIELD_TABLE_DEPTH_MAX,
};

#[cfg(test)]
mod spec_tests;
