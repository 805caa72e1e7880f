//! AMQP errors as the broker raises them: a reply code, a text naming the offending thing, the
//! method that caused it, and whether it closes the channel or the whole connection.

use std::fmt;

use crate::codec::{ChannelClose, ConnectionClose, FrameError, Method, ReplyCode, ShortStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Channel,
    Connection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub scope: Scope,
    pub code: ReplyCode,
    /// `CODE_NAME - detail`, the form RabbitMQ uses.
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    fn new(scope: Scope, code: ReplyCode, detail: impl fmt::Display) -> AmqpError {
        AmqpError {
            scope,
            code,
            text: format!("{} - {detail}", code.name()),
            class_id: 0,
            method_id: 0,
        }
    }

    /// An error that closes the connection.
    pub fn connection(code: ReplyCode, detail: impl fmt::Display) -> AmqpError {
        AmqpError::new(Scope::Connection, code, detail)
    }

    /// An error that closes only the channel it happened on.
    pub fn channel(code: ReplyCode, detail: impl fmt::Display) -> AmqpError {
        AmqpError::new(Scope::Channel, code, detail)
    }

    /// Names `method` as the cause in the close method's class-id and method-id.
    pub fn caused_by(mut self, method: &Method) -> AmqpError {
        self.class_id = method.class_id();
        self.method_id = method.method_id();
        self
    }

    pub fn from_frame_error(error: &FrameError) -> AmqpError {
        let mut amqp = AmqpError::connection(error.reply_code(), error);
        if let FrameError::UnknownMethod {
            class_id,
            method_id,
        }
        | FrameError::BadArguments {
            class_id,
            method_id,
            ..
        } = *error
        {
            amqp.class_id = class_id;
            amqp.method_id = method_id;
        }
        amqp
    }

    pub fn connection_close(&self) -> Method {
        ConnectionClose {
            reply_code: self.code.code(),
            reply_text: ShortStr::truncating(&self.text),
            class_id: self.class_id,
            method_id: self.method_id,
        }
        .into()
    }

    pub fn channel_close(&self) -> Method {
        ChannelClose {
            reply_code: self.code.code(),
            reply_text: ShortStr::truncating(&self.text),
            class_id: self.class_id,
            method_id: self.method_id,
        }
        .into()
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.text)
    }
}

impl std::error::Error for AmqpError {}
