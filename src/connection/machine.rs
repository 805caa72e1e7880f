//! The protocol state machine of one client connection, without IO.
//!
//! Received bytes go in through [`ConnectionMachine::receive`]; bytes to send accumulate in
//! [`ConnectionMachine::outbound`], which the driver writes to the socket in one write per batch.
//! Time enters only as explicit calls (send a heartbeat, give up on a close), so the whole
//! lifecycle can be tested, and fuzzed, without a socket or a clock.
//!
//! Connection lifecycle ([`Phase`]):
//!
//! ```text
//! AwaitingProtocolHeader --header ok--> AwaitingStartOk --login ok--> AwaitingTuneOk
//!        |  (bad header: send ours, Closed)      |                          |
//!        |                                       v                          v
//!        |                              AwaitingOpen <------tune-ok---------+
//!        |                                       | vhost ok
//!        v                                       v
//!      Closed <--close-ok / timeout-- Closing <--error / shutdown-- Open
//! ```
//!
//! Any phase after the header moves to `Closed` when the client sends connection.close (we answer
//! close-ok) and to `Closing` when we send connection.close; in `Closing` every frame but
//! close/close-ok is discarded, as the spec says. A frame that cannot be decoded leaves the byte
//! stream unusable, so it sends connection.close and goes straight to `Closed`.
//!
//! Channel lifecycle: absent --channel.open--> Open --channel.close--> absent, or
//! Open --error--> Closing --close-ok--> absent.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use log::{debug, info, warn};

use super::auth::{Directory, MECHANISMS};
use super::error::{AmqpError, Scope};
use crate::codec::{
    check_protocol_header, decode_frame, encode_content, encode_delivery, encode_heartbeat,
    encode_method, ChannelCloseOk, ChannelFlowOk, ChannelOpenOk, ConnectionCloseOk, ConnectionOpen,
    ConnectionOpenOk, ConnectionStart, ConnectionStartOk, ConnectionTune, ConnectionTuneOk,
    ConnectionUpdateSecretOk, ContentHeader, DeliverArgs, FieldTable, FieldValue, Frame, LongStr,
    Method, ProtocolHeader, ReplyCode, ShortStr, FRAME_MIN_SIZE, PROTOCOL_HEADER,
};
use crate::config::ConnectionConfig;

/// What every connection of a shard shares: users, limits, and the server properties.
#[derive(Debug)]
pub struct ConnectionSettings {
    pub directory: Directory,
    pub limits: ConnectionConfig,
    pub server_properties: FieldTable,
    /// Open connections of the whole broker, shared by every shard: the one counter
    /// `max_connections` needs. Touched once per connection.open and once per close, never per
    /// message.
    pub open_connections: Arc<AtomicUsize>,
}

impl ConnectionSettings {
    pub fn new(
        directory: Directory,
        limits: ConnectionConfig,
        open_connections: Arc<AtomicUsize>,
    ) -> ConnectionSettings {
        ConnectionSettings {
            directory,
            limits,
            server_properties: server_properties(),
            open_connections,
        }
    }

    /// Counts one more open connection, unless that would pass `max_connections`.
    fn take_connection_slot(&self) -> Option<ConnectionSlot> {
        let max = self.limits.max_connections;
        let previous = self.open_connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(self.open_connections.clone());
        (max == 0 || previous < max).then_some(slot)
    }
}

/// One connection counted in [`ConnectionSettings::open_connections`]; uncounted on drop.
#[derive(Debug)]
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The server-properties table of connection.start, with the capabilities RabbitMQ clients
/// look for before they use an extension.
pub fn server_properties() -> FieldTable {
    let text = |s: &'static str| FieldValue::LongStr(LongStr::from_static(s));
    let capabilities: FieldTable = [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ]
    .into_iter()
    .map(|name| (ShortStr::from_static(name), FieldValue::Bool(true)))
    .collect();
    [
        ("product", text("shardmq")),
        ("version", text(env!("CARGO_PKG_VERSION"))),
        ("platform", text("Rust")),
        ("information", text("https://github.com/shardmq/shardmq")),
        ("cluster_name", text("shardmq")),
        ("capabilities", FieldValue::Table(capabilities)),
    ]
    .into_iter()
    .map(|(name, value)| (ShortStr::from_static(name), value))
    .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    AwaitingProtocolHeader,
    AwaitingStartOk,
    AwaitingTuneOk,
    AwaitingOpen,
    Open,
    /// We sent connection.close and wait for close-ok.
    Closing,
    /// Nothing more is read; once the outbound bytes are written the socket closes.
    Closed,
}

/// Limits agreed in tune/tune-ok.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat_secs: u16,
}

/// The open variant carries a message being assembled inline: boxing it would cost an
/// allocation per published message, and a channel table holds few entries.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum ChannelState {
    Open {
        flow_active: bool,
        /// A content-carrying method whose header and body are still arriving.
        content: Option<PendingContent>,
    },
    /// We sent channel.close and wait for close-ok.
    Closing,
}

#[derive(Debug)]
struct PendingContent {
    method: Method,
    header: Option<ContentHeader>,
    body: Body,
}

impl PendingContent {
    /// Copies what still slices the read buffer (a few short strings and the properties), so
    /// that the buffer is not held past the read that filled it.
    fn detach(&mut self) {
        if let Method::BasicPublish(publish) = &mut self.method {
            publish.exchange = publish.exchange.detached();
            publish.routing_key = publish.routing_key.detached();
        }
        if let Some(header) = &mut self.header {
            header.raw_properties = Bytes::copy_from_slice(&header.raw_properties);
            // Checked against the message size limit when the header came in.
            let body_size = usize::try_from(header.body_size).unwrap_or(usize::MAX);
            self.body.detach(body_size);
        }
    }
}

/// A body arriving in frames: one frame stays a zero-copy slice, more are joined.
#[derive(Debug)]
enum Body {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::One(bytes) => bytes.len(),
            Body::Many(bytes) => bytes.len(),
        }
    }

    fn push(&mut self, payload: Bytes) {
        *self = match std::mem::replace(self, Body::Empty) {
            Body::Empty => Body::One(payload),
            Body::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + payload.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&payload);
                Body::Many(joined)
            }
            Body::Many(mut joined) => {
                joined.extend_from_slice(&payload);
                Body::Many(joined)
            }
        };
    }

    /// Stops sharing the read buffer: a lone frame's slice is copied (as the next frame would
    /// have it copied anyway), with room for another frame of its size, up to `body_size`.
    fn detach(&mut self, body_size: usize) {
        if let Body::One(first) = self {
            let mut joined = BytesMut::with_capacity(body_size.min(2 * first.len()));
            joined.extend_from_slice(first);
            *self = Body::Many(joined);
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Body::Empty => Bytes::new(),
            Body::One(bytes) => bytes,
            Body::Many(bytes) => bytes.freeze(),
        }
    }
}

/// A method (with its content, for basic.publish) for the broker layer to carry out.
#[derive(Debug)]
pub struct Command {
    pub channel: u16,
    pub method: Method,
    pub content: Option<Content>,
}

#[derive(Debug)]
pub struct Content {
    pub header: ContentHeader,
    pub body: Bytes,
}

/// What the machine hands the broker layer. Moved once, straight to the session.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    Command(Command),
    /// A channel ended (closed by the client, or by an error the machine raised): everything the
    /// broker layer keeps for it must be released.
    ChannelClosed(u16),
}

/// What the client told us about itself in connection.start-ok.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub product: String,
    pub connection_name: String,
    pub consumer_cancel_notify: bool,
    pub authentication_failure_close: bool,
    /// Wants connection.blocked / unblocked while publishers are held off.
    pub connection_blocked: bool,
}

impl ClientInfo {
    fn from_properties(properties: &FieldTable) -> ClientInfo {
        let text = |name: &str| {
            properties
                .get(name)
                .and_then(FieldValue::as_bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let capability = |name: &str| match properties.get("capabilities") {
            Some(FieldValue::Table(table)) => table
                .get(name)
                .and_then(FieldValue::as_bool)
                .unwrap_or(false),
            _ => false,
        };
        ClientInfo {
            product: text("product"),
            connection_name: text("connection_name"),
            consumer_cancel_notify: capability("consumer_cancel_notify"),
            authentication_failure_close: capability("authentication_failure_close"),
            connection_blocked: capability("connection.blocked"),
        }
    }
}

/// Whether a client may send `method` at all (the rest are server-to-client only).
fn sent_by_clients(method: &Method) -> bool {
    use Method::*;
    matches!(
        method,
        ConnectionStartOk(_)
            | ConnectionSecureOk(_)
            | ConnectionTuneOk(_)
            | ConnectionOpen(_)
            | ConnectionClose(_)
            | ConnectionCloseOk(_)
            | ConnectionUpdateSecret(_)
            | ChannelOpen(_)
            | ChannelFlow(_)
            | ChannelFlowOk(_)
            | ChannelClose(_)
            | ChannelCloseOk(_)
            | ExchangeDeclare(_)
            | ExchangeDelete(_)
            | ExchangeBind(_)
            | ExchangeUnbind(_)
            | QueueDeclare(_)
            | QueueBind(_)
            | QueueUnbind(_)
            | QueuePurge(_)
            | QueueDelete(_)
            | BasicQos(_)
            | BasicConsume(_)
            | BasicCancel(_)
            | BasicPublish(_)
            | BasicGet(_)
            | BasicAck(_)
            | BasicReject(_)
            | BasicRecoverAsync(_)
            | BasicRecover(_)
            | BasicNack(_)
            | TxSelect(_)
            | TxCommit(_)
            | TxRollback(_)
            | ConfirmSelect(_)
    )
}

pub struct ConnectionMachine {
    settings: Rc<ConnectionSettings>,
    peer: SocketAddr,
    phase: Phase,
    tuning: Tuning,
    channels: ahash::HashMap<u16, ChannelState>,
    user: Option<String>,
    vhost: Option<String>,
    client: ClientInfo,
    outbound: BytesMut,
    /// Held from connection.open-ok until the machine is dropped.
    slot: Option<ConnectionSlot>,
    /// Closed because the input could not be read (a wrong protocol header, a bad frame): the
    /// client may still be sending what followed.
    input_refused: bool,
    /// See `take_answered_itself`.
    answered_itself: bool,
    /// What the frame just handled gives the broker layer (at most one per frame). Kept here
    /// rather than returned through every handler: an `Input` is 168 bytes, and each return
    /// through a `Result` copied it for every frame, a command or not.
    handed_over: Option<Input>,
    /// Channels whose publish being assembled took frames from the current read buffer.
    assembling: Vec<u16>,
}

impl ConnectionMachine {
    pub fn new(settings: Rc<ConnectionSettings>, peer: SocketAddr) -> ConnectionMachine {
        let tuning = Tuning {
            channel_max: settings.limits.channel_max,
            frame_max: settings.limits.frame_max_bytes,
            heartbeat_secs: 0,
        };
        ConnectionMachine {
            settings,
            peer,
            phase: Phase::AwaitingProtocolHeader,
            tuning,
            channels: ahash::HashMap::default(),
            user: None,
            vhost: None,
            client: ClientInfo::default(),
            outbound: BytesMut::with_capacity(4096),
            input_refused: false,
            answered_itself: false,
            handed_over: None,
            assembling: Vec::new(),
            slot: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn client(&self) -> &ClientInfo {
        &self.client
    }

    /// The authenticated user, once start-ok succeeded.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The vhost connection.open selected.
    pub fn vhost(&self) -> Option<&str> {
        self.vhost.as_deref()
    }

    pub fn frame_max(&self) -> u32 {
        self.tuning.frame_max
    }

    pub fn open_channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Whether `channel` is open with deliveries allowed (`Some(false)` after channel.flow
    /// active=false); `None` when it is not open.
    pub fn channel_flow_active(&self, channel: u16) -> Option<bool> {
        match self.channels.get(&channel)? {
            ChannelState::Open { flow_active, .. } => Some(*flow_active),
            ChannelState::Closing => None,
        }
    }

    /// Bytes waiting to be written. The driver swaps this buffer out, writes it, and clears it.
    pub fn outbound(&mut self) -> &mut BytesMut {
        &mut self.outbound
    }

    /// The heartbeat interval once tune-ok has fixed it; `None` when heartbeats are off.
    pub fn heartbeat_secs(&self) -> Option<u16> {
        let tuned = matches!(
            self.phase,
            Phase::AwaitingOpen | Phase::Open | Phase::Closing
        );
        (tuned && self.tuning.heartbeat_secs > 0).then_some(self.tuning.heartbeat_secs)
    }

    pub fn send_heartbeat(&mut self) {
        if self.phase != Phase::Closed {
            encode_heartbeat(&mut self.outbound);
        }
    }

    /// Whether the handshake is still under way (the handshake timeout applies).
    pub fn in_handshake(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitingProtocolHeader
                | Phase::AwaitingStartOk
                | Phase::AwaitingTuneOk
                | Phase::AwaitingOpen
        )
    }

    /// Processes whole frames from `input` until one needs the broker layer: returns it, with the
    /// rest of `input` left for the next call. `None`: everything was handled and what is left (a
    /// partial frame at most) needs more bytes.
    pub fn receive(&mut self, input: &mut BytesMut) -> Option<Input> {
        if self.phase == Phase::AwaitingProtocolHeader {
            match check_protocol_header(input) {
                ProtocolHeader::NeedMore => return None,
                ProtocolHeader::Refused => {
                    info!(
                        "{}: refused connection: not an AMQP 0-9-1 protocol header",
                        self.peer
                    );
                    self.outbound.extend_from_slice(&PROTOCOL_HEADER);
                    self.phase = Phase::Closed;
                    self.input_refused = true;
                    input.clear();
                    return None;
                }
                ProtocolHeader::Accepted => {
                    input.advance(PROTOCOL_HEADER.len());
                    self.send_start();
                }
            }
        }
        while self.phase != Phase::Closed {
            // Until tune-ok the client has not agreed to a frame_max yet; our own maximum bounds
            // what we accept from it.
            let frame_max =
                if self.phase == Phase::AwaitingStartOk || self.phase == Phase::AwaitingTuneOk {
                    self.settings.limits.frame_max_bytes
                } else {
                    self.tuning.frame_max
                };
            match decode_frame(input, frame_max) {
                Ok(None) => {
                    self.detach_assembling();
                    return None;
                }
                Ok(Some(frame)) => {
                    self.handle_frame(frame);
                    if self.handed_over.is_some() {
                        return self.handed_over.take();
                    }
                }
                Err(error) => {
                    let amqp = AmqpError::from_frame_error(&error);
                    self.fail_connection(&amqp);
                    // The byte stream can no longer be trusted: close once the close is written.
                    self.phase = Phase::Closed;
                    self.input_refused = true;
                }
            }
        }
        input.clear();
        None
    }

    /// Starts a server-initiated close with 320 CONNECTION_FORCED (broker shutdown).
    pub fn begin_shutdown(&mut self) {
        match self.phase {
            Phase::AwaitingProtocolHeader => self.phase = Phase::Closed,
            Phase::Closing | Phase::Closed => {}
            _ => {
                let error = AmqpError::connection(
                    ReplyCode::ConnectionForced,
                    "broker forced connection closure with reason 'shutdown'",
                );
                self.answer(0, &error.connection_close());
                self.phase = Phase::Closing;
            }
        }
    }

    /// Whether the machine closed on input it could not read (more of it may be on the way).
    pub fn input_refused(&self) -> bool {
        self.input_refused
    }

    /// The peer did not answer our connection.close in time, or went silent: give up on it.
    pub fn abandon(&mut self) {
        self.phase = Phase::Closed;
    }

    pub fn send_method(&mut self, channel: u16, method: &Method) {
        encode_method(&mut self.outbound, channel, method);
    }

    /// Sends a method the machine itself answers with (handshake, channel open and close,
    /// flow, errors), noting it for `take_answered_itself`.
    fn answer(&mut self, channel: u16, method: &Method) {
        self.answered_itself = true;
        self.send_method(channel, method);
    }

    /// Whether the machine answered a frame itself since the last call: the client may be
    /// waiting for that answer (the driver then does not coalesce its next read).
    pub fn take_answered_itself(&mut self) -> bool {
        std::mem::take(&mut self.answered_itself)
    }

    /// A basic.deliver with its header and body frames (see `frame::encode_delivery`).
    pub fn send_delivery(
        &mut self,
        channel: u16,
        args: DeliverArgs<'_>,
        properties: &[u8],
        body: &[u8],
    ) {
        encode_delivery(
            &mut self.outbound,
            channel,
            args,
            properties,
            body,
            self.tuning.frame_max,
        );
    }

    /// A content-carrying method (deliver, get-ok, return) with its header and body frames.
    pub fn send_content(&mut self, channel: u16, method: &Method, properties: &[u8], body: &[u8]) {
        encode_content(
            &mut self.outbound,
            channel,
            method,
            properties,
            body,
            self.tuning.frame_max,
        );
    }

    /// Whether `channel` is open (not closing, not closed).
    pub fn is_channel_open(&self, channel: u16) -> bool {
        matches!(self.channels.get(&channel), Some(ChannelState::Open { .. }))
    }

    /// Raises `error` on `channel`: a channel error closes the channel (the broker layer cleans
    /// up its own state for it), a connection error the connection.
    pub fn raise(&mut self, channel: u16, error: AmqpError) {
        self.fail(channel, error);
    }

    fn send_start(&mut self) {
        let start = ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: self.settings.server_properties.clone(),
            mechanisms: LongStr::from_static(MECHANISMS),
            locales: LongStr::from_static("en_US"),
        };
        self.answer(0, &start.into());
        self.phase = Phase::AwaitingStartOk;
    }

    /// Sends connection.close for `error` and waits for close-ok.
    fn fail_connection(&mut self, error: &AmqpError) {
        warn!(
            "{} (user {:?}): closing connection: {error}",
            self.peer,
            self.user.as_deref().unwrap_or("-")
        );
        self.answer(0, &error.connection_close());
        self.phase = Phase::Closing;
    }

    fn fail(&mut self, channel: u16, error: AmqpError) {
        match error.scope {
            Scope::Connection => self.fail_connection(&error),
            Scope::Channel => {
                if !self.is_channel_open(channel) {
                    return;
                }
                info!("{}: closing channel {channel}: {error}", self.peer);
                self.answer(channel, &error.channel_close());
                self.channels.insert(channel, ChannelState::Closing);
            }
        }
    }

    /// Handles one frame; what the broker layer must carry out goes to `handed_over`.
    fn handle_frame(&mut self, frame: Frame) {
        let channel = frame.channel();
        // connection.close is honoured in every phase once the header is through.
        if let Frame::Method {
            channel: 0,
            method: Method::ConnectionClose(close),
        } = &frame
        {
            debug!(
                "{}: client closed the connection: {} {}",
                self.peer, close.reply_code, close.reply_text
            );
            self.answer(0, &ConnectionCloseOk {}.into());
            self.phase = Phase::Closed;
            return;
        }
        if matches!(frame, Frame::Heartbeat) {
            return;
        }
        let result = match self.phase {
            Phase::AwaitingStartOk => match frame {
                Frame::Method {
                    channel: 0,
                    method: Method::ConnectionStartOk(start_ok),
                } => self.handle_start_ok(*start_ok),
                other => Err(unexpected_in_handshake(&other, "connection.start-ok")),
            },
            Phase::AwaitingTuneOk => match frame {
                Frame::Method {
                    channel: 0,
                    method: Method::ConnectionTuneOk(tune_ok),
                } => self.handle_tune_ok(tune_ok),
                other => Err(unexpected_in_handshake(&other, "connection.tune-ok")),
            },
            Phase::AwaitingOpen => match frame {
                Frame::Method {
                    channel: 0,
                    method: Method::ConnectionOpen(open),
                } => self.handle_open(open),
                other => Err(unexpected_in_handshake(&other, "connection.open")),
            },
            Phase::Open => self.handle_open_frame(frame),
            Phase::Closing => {
                if let Frame::Method {
                    channel: 0,
                    method: Method::ConnectionCloseOk(_),
                } = frame
                {
                    self.phase = Phase::Closed;
                }
                Ok(())
            }
            Phase::AwaitingProtocolHeader | Phase::Closed => Ok(()),
        };
        if let Err(error) = result {
            let closes_open_channel =
                error.scope == Scope::Channel && self.is_channel_open(channel);
            self.fail(channel, error);
            if closes_open_channel {
                self.hand_over(Input::ChannelClosed(channel));
            }
        }
    }

    fn hand_over(&mut self, input: Input) {
        debug_assert!(self.handed_over.is_none(), "one input per frame");
        self.handed_over = Some(input);
    }

    fn handle_start_ok(&mut self, start_ok: ConnectionStartOk) -> Result<(), AmqpError> {
        self.client = ClientInfo::from_properties(&start_ok.client_properties);
        let login = self.settings.directory.login(
            start_ok.mechanism.as_bytes(),
            start_ok.response.bytes(),
            self.peer.ip(),
        );
        match login {
            Ok(user) => {
                self.user = Some(user);
                let limits = &self.settings.limits;
                let tune = ConnectionTune {
                    channel_max: limits.channel_max,
                    frame_max: limits.frame_max_bytes,
                    heartbeat: limits.heartbeat_secs,
                };
                self.answer(0, &tune.into());
                self.phase = Phase::AwaitingTuneOk;
                Ok(())
            }
            Err(reason) => {
                warn!("{}: login refused: {reason}", self.peer);
                Err(AmqpError::connection(
                    ReplyCode::AccessRefused,
                    format_args!(
                        "Login was refused using authentication mechanism {}. \
                         For details see the broker logfile.",
                        start_ok.mechanism
                    ),
                ))
            }
        }
    }

    fn handle_tune_ok(&mut self, tune_ok: ConnectionTuneOk) -> Result<(), AmqpError> {
        let limits = &self.settings.limits;
        let cause = Method::ConnectionTuneOk(tune_ok.clone());
        let refuse = |detail: String| {
            Err(AmqpError::connection(ReplyCode::NotAllowed, detail).caused_by(&cause))
        };
        // 0 means "no limit of the client's own": ours applies.
        let channel_max = match tune_ok.channel_max {
            0 => limits.channel_max,
            n if n > limits.channel_max => {
                return refuse(format!(
                    "negotiated channel_max = {n} is higher than the maximum allowed value ({})",
                    limits.channel_max
                ))
            }
            n => n,
        };
        let frame_max = match tune_ok.frame_max {
            0 => limits.frame_max_bytes,
            n if n < FRAME_MIN_SIZE => {
                return refuse(format!("frame_max={n} < {FRAME_MIN_SIZE} min size"))
            }
            n if n > limits.frame_max_bytes => {
                return refuse(format!(
                    "frame_max={n} > {} max size",
                    limits.frame_max_bytes
                ))
            }
            n => n,
        };
        self.tuning = Tuning {
            channel_max,
            frame_max,
            heartbeat_secs: tune_ok.heartbeat,
        };
        self.phase = Phase::AwaitingOpen;
        Ok(())
    }

    fn handle_open(&mut self, open: ConnectionOpen) -> Result<(), AmqpError> {
        let vhost = open.virtual_host.to_str_lossy().into_owned();
        let cause = Method::ConnectionOpen(open);
        let directory = &self.settings.directory;
        if !directory.vhost_exists(&vhost) {
            return Err(AmqpError::connection(
                ReplyCode::NotAllowed,
                format_args!("vhost {vhost} not found"),
            )
            .caused_by(&cause));
        }
        let user = self.user.clone().unwrap_or_default();
        if !directory.may_access(&user, &vhost) {
            return Err(AmqpError::connection(
                ReplyCode::NotAllowed,
                format_args!("access to vhost '{vhost}' refused for user '{user}'"),
            )
            .caused_by(&cause));
        }
        let Some(slot) = self.settings.take_connection_slot() else {
            return Err(AmqpError::connection(
                ReplyCode::NotAllowed,
                format_args!(
                    "connection refused: node connection limit ({}) is reached",
                    self.settings.limits.max_connections
                ),
            )
            .caused_by(&cause));
        };
        self.slot = Some(slot);
        self.answer(0, &ConnectionOpenOk::default().into());
        self.phase = Phase::Open;
        info!(
            "{}: connection opened (user '{user}', vhost '{vhost}', client {:?}{}, \
             channel_max {}, frame_max {}, heartbeat {}s)",
            self.peer,
            self.client.product,
            if self.client.connection_name.is_empty() {
                String::new()
            } else {
                format!(" named {:?}", self.client.connection_name)
            },
            self.tuning.channel_max,
            self.tuning.frame_max,
            self.tuning.heartbeat_secs
        );
        self.vhost = Some(vhost);
        Ok(())
    }

    fn handle_open_frame(&mut self, frame: Frame) -> Result<(), AmqpError> {
        match frame {
            Frame::Method { channel: 0, method } => self.handle_connection_method(method),
            Frame::Method { channel, method } => self.handle_channel_frame_method(channel, method),
            Frame::Header { channel: 0, .. } | Frame::Body { channel: 0, .. } => {
                Err(AmqpError::connection(
                    ReplyCode::UnexpectedFrame,
                    "expected method frame on channel 0, got non method frame instead",
                ))
            }
            Frame::Header { channel, header } => self.handle_content_header(channel, header),
            Frame::Body { channel, payload } => self.handle_content_body(channel, payload),
            Frame::Heartbeat => Ok(()),
        }
    }

    /// Called when the input is used up: a publish still being assembled gets copies of the
    /// frames it took from the read buffer. Without this a publish split across two reads
    /// (most reads, with streaming clients) kept the whole buffer shared, and the next read
    /// could not reuse it but allocated another (`driver::make_room`).
    fn detach_assembling(&mut self) {
        for channel in self.assembling.drain(..) {
            if let Some(ChannelState::Open {
                content: Some(content),
                ..
            }) = self.channels.get_mut(&channel)
            {
                content.detach();
            }
        }
    }

    fn note_assembling(&mut self, channel: u16) {
        if !self.assembling.contains(&channel) {
            self.assembling.push(channel);
        }
    }

    fn pending_content(&mut self, channel: u16) -> Result<Option<&mut PendingContent>, AmqpError> {
        match self.channels.get_mut(&channel) {
            // Discarded until the client acknowledges our channel.close.
            Some(ChannelState::Closing) => Ok(None),
            Some(ChannelState::Open {
                content: Some(content),
                ..
            }) => Ok(Some(content)),
            _ => Err(AmqpError::connection(
                ReplyCode::UnexpectedFrame,
                format_args!(
                    "expected method frame on channel {channel}, got non method frame instead"
                ),
            )),
        }
    }

    fn handle_content_header(
        &mut self,
        channel: u16,
        header: ContentHeader,
    ) -> Result<(), AmqpError> {
        let message_bytes_max = self.settings.limits.message_bytes_max;
        let Some(content) = self.pending_content(channel)? else {
            return Ok(());
        };
        if content.header.is_some() {
            return Err(AmqpError::connection(
                ReplyCode::UnexpectedFrame,
                format_args!(
                    "expected content body on channel {channel}, got a second content header"
                ),
            ));
        }
        let expected_class = content.method.class_id();
        if header.class_id != expected_class {
            return Err(AmqpError::connection(
                ReplyCode::UnexpectedFrame,
                format_args!(
                    "expected content header for class {expected_class} on channel {channel}, \
                     got one for class {}",
                    header.class_id
                ),
            )
            .caused_by(&content.method));
        }
        if header.body_size > message_bytes_max {
            let error = AmqpError::channel(
                ReplyCode::PreconditionFailed,
                format_args!(
                    "message size {} is larger than configured max size {message_bytes_max}",
                    header.body_size
                ),
            )
            .caused_by(&content.method);
            return Err(error);
        }
        let complete = header.body_size == 0;
        content.header = Some(header);
        if complete {
            self.take_command(channel);
        } else {
            self.note_assembling(channel);
        }
        Ok(())
    }

    fn handle_content_body(&mut self, channel: u16, payload: Bytes) -> Result<(), AmqpError> {
        let Some(content) = self.pending_content(channel)? else {
            return Ok(());
        };
        let Some(header) = &content.header else {
            return Err(AmqpError::connection(
                ReplyCode::UnexpectedFrame,
                format_args!(
                    "expected content header on channel {channel}, got a content body instead"
                ),
            ));
        };
        let expected = header.body_size;
        let received = (content.body.len() + payload.len()) as u64;
        if received > expected {
            return Err(AmqpError::connection(
                ReplyCode::FrameError,
                format_args!(
                    "content body on channel {channel} is {received} bytes, more than the {expected} its header declared"
                ),
            ));
        }
        content.body.push(payload);
        if received == expected {
            self.take_command(channel);
        } else {
            self.note_assembling(channel);
        }
        Ok(())
    }

    /// Hands a fully assembled publish to the broker layer.
    fn take_command(&mut self, channel: u16) {
        let Some(ChannelState::Open { content, .. }) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(PendingContent {
            method,
            header: Some(header),
            body,
        }) = content.take()
        else {
            return;
        };
        self.hand_over(Input::Command(Command {
            channel,
            method,
            content: Some(Content {
                header,
                body: body.into_bytes(),
            }),
        }));
    }

    fn handle_connection_method(&mut self, method: Method) -> Result<(), AmqpError> {
        match method {
            // connection.close was handled before dispatch; a stray close-ok is harmless.
            Method::ConnectionCloseOk(_) => Ok(()),
            Method::ConnectionUpdateSecret(update) => {
                let user = self.user.clone().unwrap_or_default();
                let checked = self.settings.directory.check_password(
                    &user,
                    update.new_secret.as_bytes(),
                    self.peer.ip(),
                );
                match checked {
                    Ok(()) => {
                        self.answer(0, &ConnectionUpdateSecretOk {}.into());
                        Ok(())
                    }
                    Err(reason) => {
                        warn!("{}: update-secret refused: {reason}", self.peer);
                        Err(AmqpError::connection(
                            ReplyCode::AccessRefused,
                            "new secret was refused",
                        )
                        .caused_by(&Method::ConnectionUpdateSecret(update)))
                    }
                }
            }
            // Channel-level methods on channel 0 are a channel error in RabbitMQ.
            other if other.class_id() != 10 => Err(AmqpError::connection(
                ReplyCode::ChannelError,
                format_args!("unexpected method {} on channel 0", other.name()),
            )
            .caused_by(&other)),
            other => Err(AmqpError::connection(
                ReplyCode::CommandInvalid,
                format_args!("unexpected method {} on channel 0", other.name()),
            )
            .caused_by(&other)),
        }
    }

    fn handle_channel_frame_method(
        &mut self,
        channel: u16,
        method: Method,
    ) -> Result<(), AmqpError> {
        if method.class_id() == 10 {
            return Err(AmqpError::connection(
                ReplyCode::CommandInvalid,
                format_args!(
                    "{} is only allowed on channel 0, got it on {channel}",
                    method.name()
                ),
            )
            .caused_by(&method));
        }
        match self.channels.get(&channel) {
            None => match method {
                Method::ChannelOpen(_) => {
                    if channel > self.tuning.channel_max {
                        return Err(AmqpError::connection(
                            ReplyCode::NotAllowed,
                            format_args!(
                                "channel number {channel} exceeds the negotiated channel_max {}",
                                self.tuning.channel_max
                            ),
                        )
                        .caused_by(&method));
                    }
                    self.channels.insert(
                        channel,
                        ChannelState::Open {
                            flow_active: true,
                            content: None,
                        },
                    );
                    self.answer(channel, &ChannelOpenOk::default().into());
                    Ok(())
                }
                other => Err(AmqpError::connection(
                    ReplyCode::ChannelError,
                    format_args!(
                        "expected 'channel.open' on channel {channel}, got '{}'",
                        other.name()
                    ),
                )
                .caused_by(&other)),
            },
            Some(ChannelState::Closing) => {
                match method {
                    Method::ChannelCloseOk(_) => {
                        self.channels.remove(&channel);
                    }
                    Method::ChannelClose(_) => {
                        self.answer(channel, &ChannelCloseOk {}.into());
                        self.channels.remove(&channel);
                    }
                    // Discarded until the client acknowledges our channel.close.
                    _ => {}
                }
                Ok(())
            }
            // Blames the publish being assembled, as RabbitMQ does.
            Some(ChannelState::Open {
                content: Some(pending),
                ..
            }) => Err(AmqpError::connection(
                ReplyCode::UnexpectedFrame,
                format_args!(
                    "expected content header for class 60 on channel {channel}, got method {} instead",
                    method.name()
                ),
            )
            .caused_by(&pending.method)),
            Some(ChannelState::Open { .. }) => self.handle_channel_method(channel, method),
        }
    }

    fn handle_channel_method(&mut self, channel: u16, method: Method) -> Result<(), AmqpError> {
        match method {
            Method::ChannelOpen(_) => Err(AmqpError::connection(
                ReplyCode::ChannelError,
                format_args!("second 'channel.open' seen on channel {channel}"),
            )
            .caused_by(&method)),
            Method::ChannelClose(_) => {
                self.answer(channel, &ChannelCloseOk {}.into());
                self.channels.remove(&channel);
                self.hand_over(Input::ChannelClosed(channel));
                Ok(())
            }
            // We never send channel.close without waiting, nor channel.flow: nothing to settle.
            Method::ChannelCloseOk(_) | Method::ChannelFlowOk(_) => Ok(()),
            Method::ChannelFlow(flow) => {
                if let Some(ChannelState::Open { flow_active, .. }) =
                    self.channels.get_mut(&channel)
                {
                    *flow_active = flow.active;
                }
                self.answer(
                    channel,
                    &ChannelFlowOk {
                        active: flow.active,
                    }
                    .into(),
                );
                // The broker layer resumes held deliveries when flow comes back on.
                self.hand_over(Input::Command(Command {
                    channel,
                    method: Method::ChannelFlow(flow),
                    content: None,
                }));
                Ok(())
            }
            method if method.has_content() && sent_by_clients(&method) => {
                if let Some(ChannelState::Open { content, .. }) = self.channels.get_mut(&channel) {
                    *content = Some(PendingContent {
                        method,
                        header: None,
                        body: Body::Empty,
                    });
                    self.note_assembling(channel);
                }
                Ok(())
            }
            method if sent_by_clients(&method) => {
                self.hand_over(Input::Command(Command {
                    channel,
                    method,
                    content: None,
                }));
                Ok(())
            }
            other => Err(AmqpError::connection(
                ReplyCode::CommandInvalid,
                format_args!("{} is sent by servers, not clients", other.name()),
            )
            .caused_by(&other)),
        }
    }
}

fn unexpected_in_handshake(frame: &Frame, expected: &str) -> AmqpError {
    match frame {
        Frame::Method { method, .. } => AmqpError::connection(
            ReplyCode::CommandInvalid,
            format_args!("expected '{expected}', got '{}'", method.name()),
        )
        .caused_by(method),
        _ => AmqpError::connection(
            ReplyCode::UnexpectedFrame,
            format_args!("expected '{expected}', got a content frame"),
        ),
    }
}

#[cfg(test)]
mod tests;
