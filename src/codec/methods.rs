//! Every AMQP 0.9.1 method with RabbitMQ's extensions, from one declarative table.
//!
//! The `amqp_methods!` invocation at the bottom is the table: class and method names and ids,
//! each field's spec name and type, in wire order. From it come one struct per method, the
//! [`Method`] enum, decode and encode, and [`METHOD_TABLE`], which a test compares with
//! `shared/spec/amqp0-9-1.extended.xml`.
//!
//! Decoding a method allocates nothing unless it carries a non-empty field table: strings are
//! slices of the frame's `Bytes`.

use super::error::FrameError;
use super::types::{FieldTable, LongStr, Reader, ShortStr, Writer};

/// The wire type of a method field, as the spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Bit,
    Octet,
    Short,
    Long,
    LongLong,
    ShortStr,
    LongStr,
    Timestamp,
    Table,
}

impl FieldKind {
    /// The spec's name for the type (`<domain type="...">`).
    pub fn spec_name(self) -> &'static str {
        match self {
            FieldKind::Bit => "bit",
            FieldKind::Octet => "octet",
            FieldKind::Short => "short",
            FieldKind::Long => "long",
            FieldKind::LongLong => "longlong",
            FieldKind::ShortStr => "shortstr",
            FieldKind::LongStr => "longstr",
            FieldKind::Timestamp => "timestamp",
            FieldKind::Table => "table",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FieldInfo {
    /// The spec's field name, e.g. `routing-key`.
    pub name: &'static str,
    pub kind: FieldKind,
}

#[derive(Debug, Clone, Copy)]
pub struct MethodInfo {
    pub class_name: &'static str,
    pub class_id: u16,
    pub method_name: &'static str,
    pub method_id: u16,
    /// Followed by a content header and body frames.
    pub has_content: bool,
    pub fields: &'static [FieldInfo],
}

macro_rules! has_content {
    () => {
        false
    };
    (content) => {
        true
    };
}

/// A method marked `boxed` is held in [`Method`] behind a `Box`: it is rare (declare, bind,
/// consume, the handshake) and larger than basic.publish, which sets the enum's size. The hot
/// path moves a frame from decoder to session several times, and a smaller enum is copied with
/// a few register moves instead of a call to `memcpy`.
macro_rules! variant_type {
    ($Name:ident) => {
        $Name
    };
    ($Name:ident boxed) => {
        Box<$Name>
    };
}

macro_rules! wrap_variant {
    ($value:expr) => {
        $value
    };
    ($value:expr, boxed) => {
        Box::new($value)
    };
}

macro_rules! amqp_methods {
    ($(
        class $class_name:literal = $class_id:literal {
            $(
                $method_name:literal = $method_id:literal => $Name:ident $(+ $content:ident)? $([$boxed:ident])? {
                    $( $field:ident : $ty:ident = $field_name:literal ),* $(,)?
                }
            )*
        }
    )*) => {
        $( $(
            #[doc = concat!("`", $class_name, ".", $method_name, "` (", $class_id, ", ", $method_id, ")")]
            #[derive(Debug, Clone, Default, PartialEq)]
            pub struct $Name {
                $( pub $field: field_rust_type!($ty), )*
            }

            impl From<$Name> for Method {
                fn from(method: $Name) -> Method {
                    Method::$Name(wrap_variant!(method $(, $boxed)?))
                }
            }
        )* )*

        /// One decoded AMQP method.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method {
            $( $( $Name(variant_type!($Name $($boxed)?)), )* )*
        }

        impl Method {
            pub fn class_id(&self) -> u16 {
                match self { $( $( Method::$Name(_) => $class_id, )* )* }
            }

            pub fn method_id(&self) -> u16 {
                match self { $( $( Method::$Name(_) => $method_id, )* )* }
            }

            /// `class.method`, as the spec and RabbitMQ's error texts name it.
            pub fn name(&self) -> &'static str {
                match self { $( $( Method::$Name(_) => concat!($class_name, ".", $method_name), )* )* }
            }

            /// Whether a content header and body follow this method.
            pub fn has_content(&self) -> bool {
                match self { $( $( Method::$Name(_) => has_content!($($content)?), )* )* }
            }

            /// Decodes the arguments of method `class_id.method_id`.
            pub fn decode_arguments(
                class_id: u16,
                method_id: u16,
                reader: &mut Reader<'_>,
            ) -> Result<Method, FrameError> {
                match (class_id, method_id) {
                    $( $(
                        ($class_id, $method_id) => Ok(Method::$Name(wrap_variant!($Name {
                            $( $field: reader.$ty()?, )*
                        } $(, $boxed)?))),
                    )* )*
                    _ => Err(FrameError::UnknownMethod { class_id, method_id }),
                }
            }

            /// Encodes the arguments (not the class and method ids).
            pub fn encode_arguments(&self, writer: &mut Writer<'_>) {
                match self {
                    $( $(
                        #[allow(unused_variables)]
                        Method::$Name(method) => { $( writer.$ty(&method.$field); )* }
                    )* )*
                }
            }
        }

        /// The table the codec is built from, for checks against the spec.
        pub const METHOD_TABLE: &[MethodInfo] = &[
            $( $(
                MethodInfo {
                    class_name: $class_name,
                    class_id: $class_id,
                    method_name: $method_name,
                    method_id: $method_id,
                    has_content: has_content!($($content)?),
                    fields: &[ $( FieldInfo { name: $field_name, kind: field_kind!($ty) } ),* ],
                },
            )* )*
        ];
    };
}

/// Looks up the name of `class_id.method_id`, for error texts about methods we could not decode.
pub fn method_name(class_id: u16, method_id: u16) -> Option<(&'static str, &'static str)> {
    METHOD_TABLE
        .iter()
        .find(|m| m.class_id == class_id && m.method_id == method_id)
        .map(|m| (m.class_name, m.method_name))
}

amqp_methods! {
    class "connection" = 10 {
        "start" = 10 => ConnectionStart [boxed] {
            version_major: octet = "version-major",
            version_minor: octet = "version-minor",
            server_properties: table = "server-properties",
            mechanisms: longstr = "mechanisms",
            locales: longstr = "locales",
        }
        "start-ok" = 11 => ConnectionStartOk [boxed] {
            client_properties: table = "client-properties",
            mechanism: shortstr = "mechanism",
            response: longstr = "response",
            locale: shortstr = "locale",
        }
        "secure" = 20 => ConnectionSecure { challenge: longstr = "challenge" }
        "secure-ok" = 21 => ConnectionSecureOk { response: longstr = "response" }
        "tune" = 30 => ConnectionTune {
            channel_max: short = "channel-max",
            frame_max: long = "frame-max",
            heartbeat: short = "heartbeat",
        }
        "tune-ok" = 31 => ConnectionTuneOk {
            channel_max: short = "channel-max",
            frame_max: long = "frame-max",
            heartbeat: short = "heartbeat",
        }
        "open" = 40 => ConnectionOpen {
            virtual_host: shortstr = "virtual-host",
            reserved_1: shortstr = "reserved-1",
            reserved_2: bit = "reserved-2",
        }
        "open-ok" = 41 => ConnectionOpenOk { reserved_1: shortstr = "reserved-1" }
        "close" = 50 => ConnectionClose {
            reply_code: short = "reply-code",
            reply_text: shortstr = "reply-text",
            class_id: short = "class-id",
            method_id: short = "method-id",
        }
        "close-ok" = 51 => ConnectionCloseOk {}
        // RabbitMQ extensions, absent from the spec XML.
        "blocked" = 60 => ConnectionBlocked { reason: shortstr = "reason" }
        "unblocked" = 61 => ConnectionUnblocked {}
        "update-secret" = 70 => ConnectionUpdateSecret [boxed] {
            new_secret: longstr = "new-secret",
            reason: shortstr = "reason",
        }
        "update-secret-ok" = 71 => ConnectionUpdateSecretOk {}
    }
    class "channel" = 20 {
        "open" = 10 => ChannelOpen { reserved_1: shortstr = "reserved-1" }
        "open-ok" = 11 => ChannelOpenOk { reserved_1: longstr = "reserved-1" }
        "flow" = 20 => ChannelFlow { active: bit = "active" }
        "flow-ok" = 21 => ChannelFlowOk { active: bit = "active" }
        "close" = 40 => ChannelClose {
            reply_code: short = "reply-code",
            reply_text: shortstr = "reply-text",
            class_id: short = "class-id",
            method_id: short = "method-id",
        }
        "close-ok" = 41 => ChannelCloseOk {}
    }
    class "exchange" = 40 {
        "declare" = 10 => ExchangeDeclare [boxed] {
            reserved_1: short = "reserved-1",
            exchange: shortstr = "exchange",
            exchange_type: shortstr = "type",
            passive: bit = "passive",
            durable: bit = "durable",
            auto_delete: bit = "auto-delete",
            internal: bit = "internal",
            no_wait: bit = "no-wait",
            arguments: table = "arguments",
        }
        "declare-ok" = 11 => ExchangeDeclareOk {}
        "delete" = 20 => ExchangeDelete {
            reserved_1: short = "reserved-1",
            exchange: shortstr = "exchange",
            if_unused: bit = "if-unused",
            no_wait: bit = "no-wait",
        }
        "delete-ok" = 21 => ExchangeDeleteOk {}
        "bind" = 30 => ExchangeBind [boxed] {
            reserved_1: short = "reserved-1",
            destination: shortstr = "destination",
            source: shortstr = "source",
            routing_key: shortstr = "routing-key",
            no_wait: bit = "no-wait",
            arguments: table = "arguments",
        }
        "bind-ok" = 31 => ExchangeBindOk {}
        "unbind" = 40 => ExchangeUnbind [boxed] {
            reserved_1: short = "reserved-1",
            destination: shortstr = "destination",
            source: shortstr = "source",
            routing_key: shortstr = "routing-key",
            no_wait: bit = "no-wait",
            arguments: table = "arguments",
        }
        "unbind-ok" = 51 => ExchangeUnbindOk {}
    }
    class "queue" = 50 {
        "declare" = 10 => QueueDeclare {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            passive: bit = "passive",
            durable: bit = "durable",
            exclusive: bit = "exclusive",
            auto_delete: bit = "auto-delete",
            no_wait: bit = "no-wait",
            arguments: table = "arguments",
        }
        "declare-ok" = 11 => QueueDeclareOk {
            queue: shortstr = "queue",
            message_count: long = "message-count",
            consumer_count: long = "consumer-count",
        }
        "bind" = 20 => QueueBind [boxed] {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            exchange: shortstr = "exchange",
            routing_key: shortstr = "routing-key",
            no_wait: bit = "no-wait",
            arguments: table = "arguments",
        }
        "bind-ok" = 21 => QueueBindOk {}
        "unbind" = 50 => QueueUnbind [boxed] {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            exchange: shortstr = "exchange",
            routing_key: shortstr = "routing-key",
            arguments: table = "arguments",
        }
        "unbind-ok" = 51 => QueueUnbindOk {}
        "purge" = 30 => QueuePurge {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            no_wait: bit = "no-wait",
        }
        "purge-ok" = 31 => QueuePurgeOk { message_count: long = "message-count" }
        "delete" = 40 => QueueDelete {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            if_unused: bit = "if-unused",
            if_empty: bit = "if-empty",
            no_wait: bit = "no-wait",
        }
        "delete-ok" = 41 => QueueDeleteOk { message_count: long = "message-count" }
    }
    class "basic" = 60 {
        "qos" = 10 => BasicQos {
            prefetch_size: long = "prefetch-size",
            prefetch_count: short = "prefetch-count",
            global: bit = "global",
        }
        "qos-ok" = 11 => BasicQosOk {}
        "consume" = 20 => BasicConsume [boxed] {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            consumer_tag: shortstr = "consumer-tag",
            no_local: bit = "no-local",
            no_ack: bit = "no-ack",
            exclusive: bit = "exclusive",
            no_wait: bit = "no-wait",
            arguments: table = "arguments",
        }
        "consume-ok" = 21 => BasicConsumeOk { consumer_tag: shortstr = "consumer-tag" }
        "cancel" = 30 => BasicCancel {
            consumer_tag: shortstr = "consumer-tag",
            no_wait: bit = "no-wait",
        }
        "cancel-ok" = 31 => BasicCancelOk { consumer_tag: shortstr = "consumer-tag" }
        "publish" = 40 => BasicPublish + content {
            reserved_1: short = "reserved-1",
            exchange: shortstr = "exchange",
            routing_key: shortstr = "routing-key",
            mandatory: bit = "mandatory",
            immediate: bit = "immediate",
        }
        "return" = 50 => BasicReturn + content [boxed] {
            reply_code: short = "reply-code",
            reply_text: shortstr = "reply-text",
            exchange: shortstr = "exchange",
            routing_key: shortstr = "routing-key",
        }
        "deliver" = 60 => BasicDeliver + content [boxed] {
            consumer_tag: shortstr = "consumer-tag",
            delivery_tag: longlong = "delivery-tag",
            redelivered: bit = "redelivered",
            exchange: shortstr = "exchange",
            routing_key: shortstr = "routing-key",
        }
        "get" = 70 => BasicGet {
            reserved_1: short = "reserved-1",
            queue: shortstr = "queue",
            no_ack: bit = "no-ack",
        }
        "get-ok" = 71 => BasicGetOk + content [boxed] {
            delivery_tag: longlong = "delivery-tag",
            redelivered: bit = "redelivered",
            exchange: shortstr = "exchange",
            routing_key: shortstr = "routing-key",
            message_count: long = "message-count",
        }
        "get-empty" = 72 => BasicGetEmpty { reserved_1: shortstr = "reserved-1" }
        "ack" = 80 => BasicAck {
            delivery_tag: longlong = "delivery-tag",
            multiple: bit = "multiple",
        }
        "reject" = 90 => BasicReject {
            delivery_tag: longlong = "delivery-tag",
            requeue: bit = "requeue",
        }
        "recover-async" = 100 => BasicRecoverAsync { requeue: bit = "requeue" }
        "recover" = 110 => BasicRecover { requeue: bit = "requeue" }
        "recover-ok" = 111 => BasicRecoverOk {}
        "nack" = 120 => BasicNack {
            delivery_tag: longlong = "delivery-tag",
            multiple: bit = "multiple",
            requeue: bit = "requeue",
        }
    }
    class "tx" = 90 {
        "select" = 10 => TxSelect {}
        "select-ok" = 11 => TxSelectOk {}
        "commit" = 20 => TxCommit {}
        "commit-ok" = 21 => TxCommitOk {}
        "rollback" = 30 => TxRollback {}
        "rollback-ok" = 31 => TxRollbackOk {}
    }
    class "confirm" = 85 {
        "select" = 10 => ConfirmSelect { nowait: bit = "nowait" }
        "select-ok" = 11 => ConfirmSelectOk {}
    }
}
