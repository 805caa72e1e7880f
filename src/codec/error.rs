//! Decode errors and the AMQP reply codes they map to.
//!
//! Every way a byte sequence from the network can be wrong ends here as a value; the codec never
//! panics on input. The connection turns a [`FrameError`] into a connection.close carrying
//! [`FrameError::reply_code`].

use std::fmt;

/// The reply codes of AMQP 0.9.1 (`<constant>` entries of the spec with a class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReplyCode {
    Success = 200,
    ContentTooLarge = 311,
    NoRoute = 312,
    NoConsumers = 313,
    ConnectionForced = 320,
    InvalidPath = 402,
    AccessRefused = 403,
    NotFound = 404,
    ResourceLocked = 405,
    PreconditionFailed = 406,
    FrameError = 501,
    SyntaxError = 502,
    CommandInvalid = 503,
    ChannelError = 504,
    UnexpectedFrame = 505,
    ResourceError = 506,
    NotAllowed = 530,
    NotImplemented = 540,
    InternalError = 541,
}

impl ReplyCode {
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The name RabbitMQ puts at the start of a reply text, e.g. `NOT_FOUND`.
    pub const fn name(self) -> &'static str {
        match self {
            ReplyCode::Success => "OK",
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Hard errors close the connection; soft errors close only the channel.
    pub const fn is_hard_error(self) -> bool {
        matches!(
            self,
            ReplyCode::ConnectionForced
                | ReplyCode::InvalidPath
                | ReplyCode::FrameError
                | ReplyCode::SyntaxError
                | ReplyCode::CommandInvalid
                | ReplyCode::ChannelError
                | ReplyCode::UnexpectedFrame
                | ReplyCode::ResourceError
                | ReplyCode::NotAllowed
                | ReplyCode::NotImplemented
                | ReplyCode::InternalError
        )
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

/// Why a frame or one of its fields could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The octet after the payload was not 0xCE.
    BadFrameEnd { found: u8 },
    /// A frame type other than method (1), header (2), body (3) or heartbeat (8).
    UnknownFrameType { frame_type: u8 },
    /// The frame is larger than the negotiated frame_max.
    FrameTooLarge { frame_bytes: u64, frame_max: u32 },
    /// A payload shorter or longer than its contents say.
    PayloadSize { what: &'static str },
    /// A heartbeat on a channel other than 0.
    HeartbeatOnChannel { channel: u16 },
    /// A field ran past the end of its payload, or held a malformed value.
    Syntax { what: &'static str },
    /// A field table or array held a value type tag that AMQP does not define.
    UnknownFieldType { tag: u8 },
    /// Field tables nested deeper than [`crate::codec::FIELD_TABLE_DEPTH_MAX`].
    TableTooDeep,
    /// A class/method pair that is not in the protocol.
    UnknownMethod { class_id: u16, method_id: u16 },
    /// A known method whose arguments do not decode; `cause` says which field failed.
    BadArguments {
        class_id: u16,
        method_id: u16,
        cause: Box<FrameError>,
    },
}

impl FrameError {
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            FrameError::BadFrameEnd { .. }
            | FrameError::UnknownFrameType { .. }
            | FrameError::FrameTooLarge { .. }
            | FrameError::PayloadSize { .. }
            | FrameError::BadArguments { .. } => ReplyCode::FrameError,
            // RabbitMQ's answer; the frame itself decoded, it is just not allowed there.
            FrameError::HeartbeatOnChannel { .. } => ReplyCode::UnexpectedFrame,
            FrameError::Syntax { .. }
            | FrameError::UnknownFieldType { .. }
            | FrameError::TableTooDeep => ReplyCode::SyntaxError,
            FrameError::UnknownMethod { .. } => ReplyCode::NotImplemented,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadFrameEnd { found } => {
                write!(f, "frame end octet was 0x{found:02x}, expected 0xce")
            }
            FrameError::UnknownFrameType { frame_type } => {
                write!(f, "unknown frame type {frame_type}")
            }
            FrameError::FrameTooLarge {
                frame_bytes,
                frame_max,
            } => write!(
                f,
                "frame of {frame_bytes} bytes exceeds the negotiated frame_max {frame_max}"
            ),
            FrameError::PayloadSize { what } => {
                write!(f, "payload size disagrees with its frame: {what}")
            }
            FrameError::HeartbeatOnChannel { channel } => {
                write!(f, "heartbeat frame on channel {channel}, expected 0")
            }
            FrameError::Syntax { what } => write!(f, "malformed {what}"),
            FrameError::UnknownFieldType { tag } => {
                write!(f, "unknown field value type 0x{tag:02x}")
            }
            FrameError::TableTooDeep => write!(f, "field tables nested too deep"),
            FrameError::UnknownMethod {
                class_id,
                method_id,
            } => write!(f, "unknown method {class_id}.{method_id}"),
            FrameError::BadArguments {
                class_id,
                method_id,
                cause,
            } => write!(
                f,
                "cannot decode the arguments of method {class_id}.{method_id}: {cause}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}
