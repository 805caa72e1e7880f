//! The 14 content properties of class basic, with their property-flags word.
//!
//! Property `n` (0-based, in spec order) is present when bit `15 - n` of the flags is set; bit 0
//! of a flags word announces another flags word. Basic has 14 properties, so one word suffices and
//! any flag beyond the 14th is a syntax error.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::FrameError;
use super::methods::{FieldInfo, FieldKind};
use super::types::{FieldTable, Reader, ShortStr, Writer};

pub const BASIC_CLASS_ID: u16 = 60;

macro_rules! basic_properties {
    ($( $field:ident : $ty:ident = $name:literal ),* $(,)?) => {
        /// The content properties of a basic message; `None` is an absent property.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct BasicProperties {
            $( pub $field: Option<field_rust_type!($ty)>, )*
        }

        /// The properties in wire order, for checks against the spec.
        pub const BASIC_PROPERTY_TABLE: &[FieldInfo] = &[
            $( FieldInfo { name: $name, kind: field_kind!($ty) }, )*
        ];

        impl BasicProperties {
            /// Decodes a property-flags word and the property list after it.
            #[allow(unused_assignments)]
            pub fn decode(bytes: &Bytes) -> Result<BasicProperties, FrameError> {
                let mut reader = Reader::new(bytes);
                let flags = read_flags(&mut reader)?;
                let mut flag = 1u16 << 15;
                let properties = BasicProperties {
                    $( $field: {
                        let present = flags & flag != 0;
                        flag >>= 1;
                        if present { Some(reader.$ty()?) } else { None }
                    }, )*
                };
                end_of_properties(&reader)?;
                Ok(properties)
            }

            /// Checks encoded properties as `decode` does, without keeping them (a publish
            /// passes them on as they are): returns whether delivery-mode is 2.
            #[allow(unused_assignments)]
            pub fn check(bytes: &Bytes) -> Result<bool, FrameError> {
                let mut reader = Reader::new(bytes);
                let flags = read_flags(&mut reader)?;
                let mut flag = 1u16 << 15;
                let mut persistent = false;
                $(
                    if flags & flag != 0 {
                        if flag == DELIVERY_MODE_FLAG {
                            persistent = reader.octet()? == 2;
                        } else {
                            reader.$ty()?;
                        }
                    }
                    flag >>= 1;
                )*
                end_of_properties(&reader)?;
                Ok(persistent)
            }

            /// Appends the property-flags word and the present properties.
            #[allow(unused_assignments)]
            pub fn encode(&self, out: &mut BytesMut) {
                let mut flags = 0u16;
                let mut flag = 1u16 << 15;
                $(
                    if self.$field.is_some() { flags |= flag; }
                    flag >>= 1;
                )*
                out.put_u16(flags);
                let mut writer = Writer::new(out);
                $( if let Some(value) = &self.$field { writer.$ty(value); } )*
                writer.finish();
            }
        }
    };
}

/// Flag bits 15..=2 name the 14 properties; bit 1 is unused and bit 0 is the continuation.
const ALLOWED_FLAGS_COMPLEMENT: u16 = 0b10;

/// Reads the property-flags words: the first one's, since only 14 properties exist.
fn read_flags(reader: &mut Reader<'_>) -> Result<u16, FrameError> {
    let flags = reader.short()?;
    let mut extra = flags & ALLOWED_FLAGS_COMPLEMENT;
    let mut continuation = flags & 1 == 1;
    while continuation {
        let more = reader.short()?;
        extra |= more & !1;
        continuation = more & 1 == 1;
    }
    if extra != 0 {
        return Err(FrameError::Syntax {
            what: "property flags",
        });
    }
    Ok(flags)
}

fn end_of_properties(reader: &Reader<'_>) -> Result<(), FrameError> {
    if reader.remaining() != 0 {
        return Err(FrameError::PayloadSize {
            what: "content properties",
        });
    }
    Ok(())
}
/// The flag of the headers property (the third).
pub const HEADERS_FLAG: u16 = 1 << 13;
/// The flag of the delivery-mode property (the fourth).
const DELIVERY_MODE_FLAG: u16 = 1 << 12;
/// The flag of the priority property (the fifth).
pub const PRIORITY_FLAG: u16 = 1 << 11;
/// The flag of the reply-to property (the seventh).
pub const REPLY_TO_FLAG: u16 = 1 << 9;
/// The flag of the expiration property (the eighth).
pub const EXPIRATION_FLAG: u16 = 1 << 8;
/// The flag of the user-id property (the twelfth).
pub const USER_ID_FLAG: u16 = 1 << 4;

basic_properties! {
    content_type: shortstr = "content-type",
    content_encoding: shortstr = "content-encoding",
    headers: table = "headers",
    delivery_mode: octet = "delivery-mode",
    priority: octet = "priority",
    correlation_id: shortstr = "correlation-id",
    reply_to: shortstr = "reply-to",
    expiration: shortstr = "expiration",
    message_id: shortstr = "message-id",
    timestamp: timestamp = "timestamp",
    kind: shortstr = "type",
    user_id: shortstr = "user-id",
    app_id: shortstr = "app-id",
    cluster_id: shortstr = "reserved",
}

const _: () = assert!(BASIC_PROPERTY_TABLE.len() == 14);

impl BasicProperties {
    /// The encoded form, for a content header built by the broker.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// delivery-mode 2 marks a persistent message.
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_flags_match_the_table() {
        let flags = |properties: BasicProperties| {
            let bytes = properties.to_bytes();
            u16::from_be_bytes([bytes[0], bytes[1]])
        };
        let headers = BasicProperties {
            headers: Some(FieldTable::default()),
            ..Default::default()
        };
        assert_eq!(flags(headers), HEADERS_FLAG);
        let user_id = BasicProperties {
            user_id: Some(ShortStr::from_static("guest")),
            ..Default::default()
        };
        assert_eq!(flags(user_id), USER_ID_FLAG);
        let expiration = BasicProperties {
            expiration: Some(ShortStr::from_static("60000")),
            ..Default::default()
        };
        assert_eq!(flags(expiration), EXPIRATION_FLAG);
        let priority = BasicProperties {
            priority: Some(9),
            ..Default::default()
        };
        assert_eq!(flags(priority), PRIORITY_FLAG);
        let reply_to = BasicProperties {
            reply_to: Some(ShortStr::from_static("amq.rabbitmq.reply-to")),
            ..Default::default()
        };
        assert_eq!(flags(reply_to), REPLY_TO_FLAG);
    }
    use crate::codec::types::FieldValue;

    fn all_properties() -> BasicProperties {
        let headers: FieldTable = [(ShortStr::from_static("h"), FieldValue::I32(7))]
            .into_iter()
            .collect();
        BasicProperties {
            content_type: Some(ShortStr::from_static("text/plain")),
            content_encoding: Some(ShortStr::from_static("gzip")),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(9),
            correlation_id: Some(ShortStr::from_static("corr")),
            reply_to: Some(ShortStr::from_static("amq.rabbitmq.reply-to")),
            expiration: Some(ShortStr::from_static("60000")),
            message_id: Some(ShortStr::from_static("id-1")),
            timestamp: Some(1_700_000_000),
            kind: Some(ShortStr::from_static("event")),
            user_id: Some(ShortStr::from_static("guest")),
            app_id: Some(ShortStr::from_static("app")),
            cluster_id: Some(ShortStr::from_static("")),
        }
    }

    #[test]
    fn all_fourteen_round_trip() {
        let properties = all_properties();
        let bytes = properties.to_bytes();
        assert_eq!(&bytes[..2], &0xfffcu16.to_be_bytes());
        assert_eq!(BasicProperties::decode(&bytes).unwrap(), properties);
    }

    #[test]
    fn each_property_alone_round_trips_with_its_own_flag() {
        let full = all_properties();
        for index in 0..14 {
            let mut only = BasicProperties::default();
            match index {
                0 => only.content_type = full.content_type.clone(),
                1 => only.content_encoding = full.content_encoding.clone(),
                2 => only.headers = full.headers.clone(),
                3 => only.delivery_mode = full.delivery_mode,
                4 => only.priority = full.priority,
                5 => only.correlation_id = full.correlation_id.clone(),
                6 => only.reply_to = full.reply_to.clone(),
                7 => only.expiration = full.expiration.clone(),
                8 => only.message_id = full.message_id.clone(),
                9 => only.timestamp = full.timestamp,
                10 => only.kind = full.kind.clone(),
                11 => only.user_id = full.user_id.clone(),
                12 => only.app_id = full.app_id.clone(),
                _ => only.cluster_id = full.cluster_id.clone(),
            }
            let bytes = only.to_bytes();
            let flags = u16::from_be_bytes([bytes[0], bytes[1]]);
            assert_eq!(flags, 1 << (15 - index), "property {index}");
            assert_eq!(BasicProperties::decode(&bytes).unwrap(), only);
            assert_eq!(
                BasicProperties::check(&bytes),
                Ok(index == 3),
                "property {index}"
            );
        }
    }

    #[test]
    fn golden_bytes_for_delivery_mode_only() {
        let properties = BasicProperties {
            delivery_mode: Some(2),
            ..Default::default()
        };
        assert_eq!(&properties.to_bytes()[..], &[0x10, 0x00, 2]);
    }

    #[test]
    fn unknown_flags_and_trailing_bytes_are_refused() {
        let bytes = Bytes::from_static(&[0x00, 0x02]);
        assert!(BasicProperties::decode(&bytes).is_err());
        let bytes = Bytes::from_static(&[0x10, 0x00, 2, 99]);
        assert!(BasicProperties::decode(&bytes).is_err());
        let bytes = Bytes::from_static(&[0x80, 0x00, 10, b'a']);
        assert!(BasicProperties::decode(&bytes).is_err());
    }

    #[test]
    fn check_reads_delivery_mode_among_all_properties() {
        let mut properties = all_properties();
        assert_eq!(BasicProperties::check(&properties.to_bytes()), Ok(true));
        properties.delivery_mode = Some(1);
        assert_eq!(BasicProperties::check(&properties.to_bytes()), Ok(false));
    }

    proptest::proptest! {
        #[test]
        fn check_accepts_exactly_what_decode_accepts(
            flags in proptest::prelude::any::<u16>(),
            list in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)
        ) {
            // Mostly flags that name properties, so that the lists get read.
            let flags = if flags % 8 == 0 { flags } else { flags & !0b11 };
            let bytes = Bytes::from([&flags.to_be_bytes()[..], &list].concat());
            let decoded = BasicProperties::decode(&bytes);
            let checked = BasicProperties::check(&bytes);
            proptest::prop_assert_eq!(checked.is_ok(), decoded.is_ok());
            if let (Ok(persistent), Ok(properties)) = (checked, decoded) {
                proptest::prop_assert_eq!(persistent, properties.is_persistent());
            }
        }
    }
}
