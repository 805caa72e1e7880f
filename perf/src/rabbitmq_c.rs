//! A thin, blocking binding to rabbitmq-c (librabbitmq), the C client behind php-amqp and many
//! others, loaded at run time.
//!
//! Why this client: on loopback a client pays a `send` per publish and per ack whatever library
//! it uses, but the async Rust clients pay as much again in user space (frame moves between
//! tasks, channel hops per delivery); rabbitmq-c decodes deliveries straight out of one read
//! buffer on the caller's thread. Measured against the same broker, 1 -> 1 16 B: amqprs about
//! 10 us of generator CPU per message, rabbitmq-c about 7.7, most of it the kernel's (see
//! perf/README.md).
//!
//! Why at run time: `dlopen` keeps the workspace building and testing on a machine without the
//! library; only running loadgen needs it (Debian's `librabbitmq4`, which compare.py installs).
//!
//! Layouts mirror `amqp.h` and `amqp_framing.h` of rabbitmq-c 0.9 to 0.14 (soname 4), x86-64
//! and aarch64 Linux. Every value the library hands back is read only through these wrappers.

mod socket;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::OnceLock;
use std::time::Duration;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Bytes {
    len: usize,
    bytes: *const c_void,
}

impl Bytes {
    fn of(data: &[u8]) -> Bytes {
        Bytes {
            len: data.len(),
            bytes: data.as_ptr().cast(),
        }
    }

    /// # Safety
    /// `self` must point at `len` readable bytes that outlive the returned slice.
    unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.bytes.is_null() {
            &[]
        } else {
            // SAFETY: the caller vouches for the pointer and length.
            unsafe { std::slice::from_raw_parts(self.bytes.cast(), self.len) }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Table {
    num_entries: c_int,
    entries: *const TableEntry,
}

const EMPTY_TABLE: Table = Table {
    num_entries: 0,
    entries: ptr::null(),
};

/// `amqp_table_entry_t` holding a string value: the key, the kind octet, then the value union
/// (16 bytes, 8-aligned), of which a string uses the first 16.
#[repr(C)]
struct TableEntry {
    key: Bytes,
    kind: u8,
    value: Bytes,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Method {
    id: u32,
    decoded: *const c_void,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RpcReply {
    reply_type: c_int,
    reply: Method,
    library_error: c_int,
}

const RESPONSE_NORMAL: c_int = 1;
const RESPONSE_LIBRARY_EXCEPTION: c_int = 2;
const RESPONSE_SERVER_EXCEPTION: c_int = 3;
const STATUS_TIMEOUT: c_int = -0x000D;
const STATUS_UNEXPECTED_STATE: c_int = -0x0010;
const FRAME_METHOD: u8 = 1;
const REPLY_SUCCESS: c_int = 200;
const SASL_METHOD_PLAIN: c_int = 0;
const FIELD_KIND_UTF8: u8 = b'S';
const DELIVERY_MODE_FLAG: u32 = 1 << 12;
const CONNECTION_CLOSE: u32 = 0x000A_0032;
const CHANNEL_CLOSE: u32 = 0x0014_0028;
const BASIC_CANCEL: u32 = 0x003C_001E;
const BASIC_RETURN: u32 = 0x003C_0032;
const BASIC_ACK: u32 = 0x003C_0050;
const BASIC_NACK: u32 = 0x003C_0078;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Properties {
    flags: u32,
    content_type: Bytes,
    content_encoding: Bytes,
    headers: Table,
    delivery_mode: u8,
    priority: u8,
    correlation_id: Bytes,
    reply_to: Bytes,
    expiration: Bytes,
    message_id: Bytes,
    timestamp: u64,
    kind: Bytes,
    user_id: Bytes,
    app_id: Bytes,
    cluster_id: Bytes,
}

#[repr(C)]
struct PoolBlocks {
    num_blocks: c_int,
    blocklist: *mut *mut c_void,
}

#[repr(C)]
struct Pool {
    pagesize: usize,
    pages: PoolBlocks,
    large_blocks: PoolBlocks,
    next_page: c_int,
    alloc_block: *mut c_char,
    alloc_used: usize,
}

#[repr(C)]
struct Message {
    properties: Properties,
    body: Bytes,
    pool: Pool,
}

#[repr(C)]
struct Envelope {
    channel: u16,
    consumer_tag: Bytes,
    delivery_tag: u64,
    redelivered: c_int,
    exchange: Bytes,
    routing_key: Bytes,
    message: Message,
}

/// `amqp_frame_t`: type, channel, then a 24-byte payload union (a method is its first 16).
#[repr(C)]
struct Frame {
    frame_type: u8,
    channel: u16,
    method: Method,
    rest: [u64; 1],
}

#[repr(C)]
struct BasicAck {
    delivery_tag: u64,
    multiple: c_int,
}

type State = *mut c_void;

/// The library's functions this binding calls.
struct Api {
    new_connection: unsafe extern "C" fn() -> State,
    tcp_socket_new: unsafe extern "C" fn(State) -> *mut c_void,
    socket_open: unsafe extern "C" fn(*mut c_void, *const c_char, c_int) -> c_int,
    login_with_properties: unsafe extern "C" fn(
        State,
        *const c_char,
        c_int,
        c_int,
        c_int,
        *const Table,
        c_int,
        ...
    ) -> RpcReply,
    get_rpc_reply: unsafe extern "C" fn(State) -> RpcReply,
    channel_open: unsafe extern "C" fn(State, u16) -> *mut c_void,
    exchange_declare: unsafe extern "C" fn(
        State,
        u16,
        Bytes,
        Bytes,
        c_int,
        c_int,
        c_int,
        c_int,
        Table,
    ) -> *mut c_void,
    exchange_delete: unsafe extern "C" fn(State, u16, Bytes, c_int) -> *mut c_void,
    queue_declare:
        unsafe extern "C" fn(State, u16, Bytes, c_int, c_int, c_int, c_int, Table) -> *mut c_void,
    queue_bind: unsafe extern "C" fn(State, u16, Bytes, Bytes, Bytes, Table) -> *mut c_void,
    queue_purge: unsafe extern "C" fn(State, u16, Bytes) -> *mut c_void,
    queue_delete: unsafe extern "C" fn(State, u16, Bytes, c_int, c_int) -> *mut c_void,
    confirm_select: unsafe extern "C" fn(State, u16) -> *mut c_void,
    basic_qos: unsafe extern "C" fn(State, u16, u32, u16, c_int) -> *mut c_void,
    basic_consume:
        unsafe extern "C" fn(State, u16, Bytes, Bytes, c_int, c_int, c_int, Table) -> *mut c_void,
    basic_publish: unsafe extern "C" fn(
        State,
        u16,
        Bytes,
        Bytes,
        c_int,
        c_int,
        *const Properties,
        Bytes,
    ) -> c_int,
    basic_ack: unsafe extern "C" fn(State, u16, u64, c_int) -> c_int,
    consume_message:
        unsafe extern "C" fn(State, *mut Envelope, *const libc::timeval, c_int) -> RpcReply,
    destroy_envelope: unsafe extern "C" fn(*mut Envelope),
    read_message: unsafe extern "C" fn(State, u16, *mut Message, c_int) -> RpcReply,
    destroy_message: unsafe extern "C" fn(*mut Message),
    maybe_release_buffers: unsafe extern "C" fn(State),
    simple_wait_frame_noblock:
        unsafe extern "C" fn(State, *mut Frame, *const libc::timeval) -> c_int,
    channel_close: unsafe extern "C" fn(State, u16, c_int) -> RpcReply,
    connection_close: unsafe extern "C" fn(State, c_int) -> RpcReply,
    destroy_connection: unsafe extern "C" fn(State) -> c_int,
    error_string2: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// The names the library is found under: the runtime package's soname, then the development
/// symlink.
const LIBRARY_NAMES: [&str; 2] = ["librabbitmq.so.4", "librabbitmq.so"];

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    let mut failures = Vec::new();
    for name in LIBRARY_NAMES {
        // SAFETY: loading librabbitmq runs no initialisers with preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => {
                // The library stays loaded for the life of the process.
                let library: &'static libloading::Library = Box::leak(Box::new(library));
                return bind(library);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(format!(
        "cannot load rabbitmq-c ({}); install it, e.g. `apt-get install librabbitmq4`",
        failures.join("; ")
    ))
}

fn bind(library: &'static libloading::Library) -> Result<Api, String> {
    macro_rules! symbol {
        ($name:literal) => {
            // SAFETY: each field's type is the C prototype of the symbol of that name.
            *unsafe { library.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("rabbitmq-c lacks {}: {e}", $name))?
        };
    }
    Ok(Api {
        new_connection: symbol!("amqp_new_connection"),
        tcp_socket_new: symbol!("amqp_tcp_socket_new"),
        socket_open: symbol!("amqp_socket_open"),
        login_with_properties: symbol!("amqp_login_with_properties"),
        get_rpc_reply: symbol!("amqp_get_rpc_reply"),
        channel_open: symbol!("amqp_channel_open"),
        exchange_declare: symbol!("amqp_exchange_declare"),
        exchange_delete: symbol!("amqp_exchange_delete"),
        queue_declare: symbol!("amqp_queue_declare"),
        queue_bind: symbol!("amqp_queue_bind"),
        queue_purge: symbol!("amqp_queue_purge"),
        queue_delete: symbol!("amqp_queue_delete"),
        confirm_select: symbol!("amqp_confirm_select"),
        basic_qos: symbol!("amqp_basic_qos"),
        basic_consume: symbol!("amqp_basic_consume"),
        basic_publish: symbol!("amqp_basic_publish"),
        basic_ack: symbol!("amqp_basic_ack"),
        consume_message: symbol!("amqp_consume_message"),
        destroy_envelope: symbol!("amqp_destroy_envelope"),
        read_message: symbol!("amqp_read_message"),
        destroy_message: symbol!("amqp_destroy_message"),
        maybe_release_buffers: symbol!("amqp_maybe_release_buffers"),
        simple_wait_frame_noblock: symbol!("amqp_simple_wait_frame_noblock"),
        channel_close: symbol!("amqp_channel_close"),
        connection_close: symbol!("amqp_connection_close"),
        destroy_connection: symbol!("amqp_destroy_connection"),
        error_string2: symbol!("amqp_error_string2"),
    })
}

/// Where to connect and as whom.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub vhost: &'a str,
    pub user: &'a str,
    pub password: &'a str,
}

/// What the broker said besides deliveries, as far as loadgen cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// basic.ack from a confirming channel: every tag up to `tag` if `multiple`.
    Confirmed { tag: u64, multiple: bool },
    /// basic.nack from a confirming channel.
    Nacked { tag: u64 },
    /// A message published as mandatory came back.
    Returned,
    /// Anything else a connection may be sent (connection.blocked, say).
    Other,
}

/// One delivery, borrowed from the connection until the next call.
pub struct Delivery<'a> {
    pub tag: u64,
    pub body: &'a [u8],
}

/// A connection with channel 1 open. Blocking; used by one thread at a time.
pub struct Connection {
    api: &'static Api,
    state: State,
    envelope: Option<Box<Envelope>>,
    /// The socket's write batching (see `socket`), freed after the state; null before the
    /// socket is open.
    socket: *mut c_void,
    batching: *mut socket::Batching,
}

// SAFETY: a connection state is used by one thread at a time (rabbitmq-c's rule); moving it to
// another thread is allowed.
unsafe impl Send for Connection {}

const CHANNEL: u16 = 1;

fn timeval(timeout: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    }
}

impl Connection {
    /// Connects, logs in (no heartbeats; frame_max 128 KiB) with `name` as the connection name,
    /// and opens channel 1.
    pub fn open(target: &Target, name: &str) -> Result<Connection, String> {
        let api = api()?;
        // SAFETY: amqp_new_connection has no preconditions; null means out of memory.
        let state = unsafe { (api.new_connection)() };
        if state.is_null() {
            return Err("rabbitmq-c: cannot allocate a connection".into());
        }
        let mut connection = Connection {
            api,
            state,
            envelope: None,
            socket: ptr::null_mut(),
            batching: ptr::null_mut(),
        };
        connection.handshake(target, name)?;
        Ok(connection)
    }

    fn handshake(&mut self, target: &Target, name: &str) -> Result<(), String> {
        let api = self.api;
        let where_to = format!("{}:{}", target.host, target.port);
        // SAFETY: the state is live; the socket belongs to it and is freed with it.
        let socket = unsafe { (api.tcp_socket_new)(self.state) };
        if socket.is_null() {
            return Err("rabbitmq-c: cannot create a socket".into());
        }
        let host = c_string(target.host)?;
        // SAFETY: socket from tcp_socket_new, host a NUL-terminated string.
        let status = unsafe { (api.socket_open)(socket, host.as_ptr(), c_int::from(target.port)) };
        if status != 0 {
            return Err(format!(
                "cannot connect to {where_to}: {}",
                self.error(status)
            ));
        }
        // SAFETY: an open socket of this state, used by this thread only.
        self.batching = unsafe { socket::Batching::install(socket.cast()) };
        self.socket = socket;
        let key = b"connection_name";
        let entry = TableEntry {
            key: Bytes::of(key),
            kind: FIELD_KIND_UTF8,
            value: Bytes::of(name.as_bytes()),
        };
        let properties = Table {
            num_entries: 1,
            entries: &entry,
        };
        let (vhost, user, password) = (
            c_string(target.vhost)?,
            c_string(target.user)?,
            c_string(target.password)?,
        );
        // SAFETY: every pointer is live for the call; PLAIN takes the user and password as two
        // further C strings.
        let reply = unsafe {
            (api.login_with_properties)(
                self.state,
                vhost.as_ptr(),
                0,
                131_072,
                0,
                &properties,
                SASL_METHOD_PLAIN,
                user.as_ptr(),
                password.as_ptr(),
            )
        };
        self.check(reply, &format!("login to {where_to}"))?;
        // SAFETY: the state is live and logged in.
        unsafe { (api.channel_open)(self.state, CHANNEL) };
        self.last_reply("channel.open")
    }

    fn error(&self, status: c_int) -> String {
        // SAFETY: amqp_error_string2 returns a static string for any code.
        let text = unsafe { (self.api.error_string2)(status) };
        if text.is_null() {
            return format!("error {status}");
        }
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, reply: RpcReply, what: &str) -> Result<(), String> {
        match reply.reply_type {
            RESPONSE_NORMAL => Ok(()),
            RESPONSE_LIBRARY_EXCEPTION => {
                Err(format!("{what}: {}", self.error(reply.library_error)))
            }
            RESPONSE_SERVER_EXCEPTION => Err(format!(
                "{what}: the broker closed the {} (method {:#x})",
                if reply.reply.id == CONNECTION_CLOSE {
                    "connection"
                } else {
                    "channel"
                },
                reply.reply.id
            )),
            _ => Err(format!("{what}: the connection was closed")),
        }
    }

    fn last_reply(&self, what: &str) -> Result<(), String> {
        // SAFETY: the state is live.
        let reply = unsafe { (self.api.get_rpc_reply)(self.state) };
        self.check(reply, what)
    }

    pub fn exchange_declare(&mut self, name: &str, kind: &str) -> Result<(), String> {
        // SAFETY: the byte views live for the call.
        unsafe {
            (self.api.exchange_declare)(
                self.state,
                CHANNEL,
                Bytes::of(name.as_bytes()),
                Bytes::of(kind.as_bytes()),
                0,
                0,
                0,
                0,
                EMPTY_TABLE,
            )
        };
        self.last_reply("exchange.declare")
    }

    pub fn exchange_delete(&mut self, name: &str) -> Result<(), String> {
        // SAFETY: the byte view lives for the call.
        unsafe { (self.api.exchange_delete)(self.state, CHANNEL, Bytes::of(name.as_bytes()), 0) };
        self.last_reply("exchange.delete")
    }

    pub fn queue_declare(&mut self, name: &str, durable: bool) -> Result<(), String> {
        // SAFETY: the byte view lives for the call.
        unsafe {
            (self.api.queue_declare)(
                self.state,
                CHANNEL,
                Bytes::of(name.as_bytes()),
                0,
                c_int::from(durable),
                0,
                0,
                EMPTY_TABLE,
            )
        };
        self.last_reply("queue.declare")
    }

    pub fn queue_bind(&mut self, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
        // SAFETY: the byte views live for the call.
        unsafe {
            (self.api.queue_bind)(
                self.state,
                CHANNEL,
                Bytes::of(queue.as_bytes()),
                Bytes::of(exchange.as_bytes()),
                Bytes::of(key.as_bytes()),
                EMPTY_TABLE,
            )
        };
        self.last_reply("queue.bind")
    }

    pub fn queue_purge(&mut self, name: &str) -> Result<(), String> {
        // SAFETY: the byte view lives for the call.
        unsafe { (self.api.queue_purge)(self.state, CHANNEL, Bytes::of(name.as_bytes())) };
        self.last_reply("queue.purge")
    }

    pub fn queue_delete(&mut self, name: &str) -> Result<(), String> {
        // SAFETY: the byte view lives for the call.
        unsafe { (self.api.queue_delete)(self.state, CHANNEL, Bytes::of(name.as_bytes()), 0, 0) };
        self.last_reply("queue.delete")
    }

    pub fn confirm_select(&mut self) -> Result<(), String> {
        // SAFETY: the state is live.
        unsafe { (self.api.confirm_select)(self.state, CHANNEL) };
        self.last_reply("confirm.select")
    }

    pub fn basic_qos(&mut self, prefetch: u16) -> Result<(), String> {
        // SAFETY: the state is live.
        unsafe { (self.api.basic_qos)(self.state, CHANNEL, 0, prefetch, 0) };
        self.last_reply("basic.qos")
    }

    pub fn basic_consume(&mut self, queue: &str, no_ack: bool) -> Result<(), String> {
        // SAFETY: the byte views live for the call.
        unsafe {
            (self.api.basic_consume)(
                self.state,
                CHANNEL,
                Bytes::of(queue.as_bytes()),
                Bytes::of(&[]),
                0,
                c_int::from(no_ack),
                0,
                EMPTY_TABLE,
            )
        };
        self.last_reply("basic.consume")
    }

    /// From now on, writes wait until the connection next reads (or 64 KiB wait, or `flush`),
    /// so that one `send` carries many publishes or acks.
    pub fn batch_writes(&mut self) {
        // SAFETY: installed in `open` (or null), freed only in drop; no library call is running.
        if let Some(batching) = unsafe { self.batching.as_mut() } {
            batching.hold(true);
        }
    }

    /// Sends the writes `batch_writes` held back.
    pub fn flush(&mut self) -> Result<(), String> {
        // SAFETY: as in `batch_writes`.
        let Some(batching) = (unsafe { self.batching.as_mut() }) else {
            return Ok(());
        };
        // SAFETY: the socket it was installed on.
        let status = unsafe { batching.flush(self.socket) };
        self.status(status as c_int, "send")
    }

    /// Publishes one message.
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
        body: &[u8],
    ) -> Result<(), String> {
        // SAFETY: the byte views and the properties live for the call.
        let status = unsafe {
            (self.api.basic_publish)(
                self.state,
                CHANNEL,
                Bytes::of(exchange.as_bytes()),
                Bytes::of(routing_key.as_bytes()),
                0,
                0,
                properties,
                Bytes::of(body),
            )
        };
        self.status(status, "basic.publish")
    }

    pub fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), String> {
        // SAFETY: the state is live.
        let status =
            unsafe { (self.api.basic_ack)(self.state, CHANNEL, tag, c_int::from(multiple)) };
        self.status(status, "basic.ack")
    }

    fn status(&self, status: c_int, what: &str) -> Result<(), String> {
        if status == 0 {
            Ok(())
        } else {
            Err(format!("{what}: {}", self.error(status)))
        }
    }

    /// The next delivery, waiting at most `timeout` (None if none came). Other methods on the
    /// connection (connection.blocked, say) are skipped; a close or a cancel is an error.
    pub fn next_delivery(&mut self, timeout: Duration) -> Result<Option<Delivery<'_>>, String> {
        self.release_envelope();
        let api = self.api;
        // SAFETY: the state is live; buffers are released only with no delivery borrowed
        // (the previous one was destroyed above).
        unsafe { (api.maybe_release_buffers)(self.state) };
        let tv = timeval(timeout);
        // SAFETY: all-zero is a valid value for this plain C struct (null pointers, zero
        // lengths); consume_message fills it on success.
        let mut envelope: Box<Envelope> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: the envelope and timeval are valid for the call.
        let reply = unsafe { (api.consume_message)(self.state, &mut *envelope, &tv, 0) };
        match (reply.reply_type, reply.library_error) {
            (RESPONSE_NORMAL, _) => {
                let envelope = self.envelope.insert(envelope);
                // SAFETY: on success the body points into the envelope's pool, which lives
                // until `release_envelope`, and the borrow of self keeps that call away.
                let body = unsafe { envelope.message.body.as_slice() };
                Ok(Some(Delivery {
                    tag: envelope.delivery_tag,
                    body,
                }))
            }
            (RESPONSE_LIBRARY_EXCEPTION, STATUS_TIMEOUT) => Ok(None),
            (RESPONSE_LIBRARY_EXCEPTION, STATUS_UNEXPECTED_STATE) => {
                // Some other frame came first; it was put back for the next wait.
                match self.next_event(timeout)? {
                    Some(Event::Other) | None => Ok(None),
                    Some(event) => Err(format!("unexpected {event:?} on a consuming channel")),
                }
            }
            _ => self.check(reply, "consume").map(|()| None),
        }
    }

    fn release_envelope(&mut self) {
        if let Some(mut envelope) = self.envelope.take() {
            // SAFETY: filled by a successful consume_message and destroyed once.
            unsafe { (self.api.destroy_envelope)(&mut *envelope) };
        }
    }

    /// The next frame other than a delivery: confirms on a publishing channel, waiting at most
    /// `timeout` (zero: only what has already arrived, at most one `recv`). None if nothing
    /// came; an error if the broker closed the channel or connection or cancelled a consumer.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, String> {
        let api = self.api;
        let tv = timeval(timeout);
        // SAFETY: all-zero is a valid value for this plain C struct.
        let mut frame: Frame = unsafe { std::mem::zeroed() };
        // SAFETY: the frame and timeval are valid for the call.
        let status = unsafe { (api.simple_wait_frame_noblock)(self.state, &mut frame, &tv) };
        if status == STATUS_TIMEOUT {
            return Ok(None);
        }
        if status != 0 {
            return Err(format!("reading from the broker: {}", self.error(status)));
        }
        if frame.frame_type != FRAME_METHOD {
            return Ok(Some(Event::Other));
        }
        let decoded = frame.method.decoded;
        match frame.method.id {
            BASIC_ACK | BASIC_NACK if !decoded.is_null() => {
                // SAFETY: a decoded basic.ack and basic.nack both start with the tag and the
                // multiple flag (`amqp_basic_ack_t`, `amqp_basic_nack_t`), and live in the
                // connection's pool until its next read.
                let ack = unsafe { &*decoded.cast::<BasicAck>() };
                Ok(Some(if frame.method.id == BASIC_ACK {
                    Event::Confirmed {
                        tag: ack.delivery_tag,
                        multiple: ack.multiple != 0,
                    }
                } else {
                    Event::Nacked {
                        tag: ack.delivery_tag,
                    }
                }))
            }
            BASIC_RETURN => {
                // The returned message's header and body follow; read and drop them.
                // SAFETY: all-zero is a valid empty message; read_message fills it.
                let mut message: Message = unsafe { std::mem::zeroed() };
                // SAFETY: valid pointers; the message is destroyed once below.
                let reply =
                    unsafe { (api.read_message)(self.state, frame.channel, &mut message, 0) };
                // SAFETY: destroying a zeroed or filled message is allowed.
                unsafe { (api.destroy_message)(&mut message) };
                self.check(reply, "basic.return")
                    .map(|()| Some(Event::Returned))
            }
            CHANNEL_CLOSE => Err("the broker closed the channel".into()),
            CONNECTION_CLOSE => Err("the broker closed the connection".into()),
            BASIC_CANCEL => Err("the broker cancelled the consumer".into()),
            _ => Ok(Some(Event::Other)),
        }
    }
}

impl Drop for Connection {
    /// Closes the channel and the connection (waiting for their close-oks) and frees the state.
    fn drop(&mut self) {
        self.release_envelope();
        let api = self.api;
        // SAFETY: the state is live until destroy_connection, called once here.
        unsafe {
            (api.channel_close)(self.state, CHANNEL, REPLY_SUCCESS);
            (api.connection_close)(self.state, REPLY_SUCCESS);
            (api.destroy_connection)(self.state);
        }
        if !self.batching.is_null() {
            // SAFETY: from Box::into_raw in `install`; the socket went with the state above.
            drop(unsafe { Box::from_raw(self.batching) });
        }
    }
}

fn c_string(text: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| format!("{text:?} contains a NUL byte"))
}

/// Message properties: persistent (delivery mode 2) or none at all.
pub fn properties(persistent: bool) -> Properties {
    // SAFETY: all-zero is a valid value for this plain C struct (no fields set).
    let mut properties: Properties = unsafe { std::mem::zeroed() };
    if persistent {
        properties.flags = DELIVERY_MODE_FLAG;
        properties.delivery_mode = 2;
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes and offsets of rabbitmq-c 0.11's structs on 64-bit Linux (from its headers).
    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!(std::mem::size_of::<Bytes>(), 16);
        assert_eq!(std::mem::size_of::<Table>(), 16);
        assert_eq!(std::mem::size_of::<TableEntry>(), 40);
        assert_eq!(std::mem::size_of::<RpcReply>(), 32);
        assert_eq!(std::mem::size_of::<Properties>(), 200);
        assert_eq!(std::mem::offset_of!(Properties, timestamp), 128);
        assert_eq!(std::mem::size_of::<Pool>(), 64);
        assert_eq!(std::mem::offset_of!(Message, body), 200);
        assert_eq!(std::mem::offset_of!(Envelope, delivery_tag), 24);
        assert_eq!(std::mem::offset_of!(Envelope, message), 72);
        assert_eq!(std::mem::size_of::<Frame>(), 32);
        assert_eq!(std::mem::offset_of!(Frame, method), 8);
    }
}
