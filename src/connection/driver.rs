//! The glommio tasks that drive one [`ConnectionMachine`] over its socket.
//!
//! Three tasks per connection, all on the shard that accepted it:
//! - the reader reads into a buffer and feeds the machine (and is the connection's main task);
//! - the writer swaps the machine's outbound buffer for an empty one and writes it in one go, so
//!   every frame produced since the last write shares one `send`;
//! - the timer sends heartbeats, disconnects a silent peer after two intervals, and enforces the
//!   handshake and close timeouts (an open connection without heartbeats has none of these due:
//!   its timer sleeps until the writer sends our connection.close, or the connection ends).
//!
//! Invariants: the socket is shared through a `RefCell` that is borrowed only inside one `poll_*`
//! call, never across an await. When more than `outbound_buffer_bytes_max` bytes wait to be
//! written, the reader carries out only settlements (which add nothing to write) and holds the
//! first other command until the writer drains them (TCP back-pressure for everything else).
//! The read buffer is reused while nothing cut from it is alive (see `make_room`); the machine
//! keeps no slice of it past a read.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use log::{debug, info, warn};

use super::coalescing::{StreamMeter, Streamed};
use super::machine::{Command, ConnectionMachine, ConnectionSettings, Input, Phase};
use crate::broker::session::Session;
use crate::broker::shard::ShardBroker;
use crate::codec::{ConnectionBlocked, ConnectionUnblocked, Method, ShortStr};
use crate::runtime::sync::{Event, Notify};

/// What one pass of [`Connection::feed`] over the input did.
#[derive(Default)]
struct Fed {
    streamed: Streamed,
    asked_something: bool,
    /// A command that waits for the client's backlog to drain.
    held: Option<Command>,
    /// Input left unparsed until the backlog drains.
    stalled: bool,
}

impl Fed {
    /// What the next pass must start from: the held command and whether input was left.
    fn left_over(self) -> (Option<Command>, bool) {
        (self.held, self.stalled)
    }
}

/// One live connection, as its shard sees it.
pub struct Connection {
    pub id: u64,
    stream: RefCell<TcpStream>,
    fd: RawFd,
    machine: Rc<RefCell<ConnectionMachine>>,
    settings: Rc<ConnectionSettings>,
    shard: Rc<ShardBroker>,
    session: Rc<Session>,
    /// Set when the machine has bytes to write or the connection is ending.
    write_wanted: Rc<Notify>,
    /// Set when the writer finished a write (the reader may be waiting for room).
    drained: Notify,
    /// Bytes the writer holds but has not written yet.
    in_flight_bytes: Cell<usize>,
    reader_done: Cell<bool>,
    /// The reader is held by the memory alarm; missed heartbeats do not count meanwhile, as
    /// the client's heartbeats wait unread in the socket (RabbitMQ does the same). A client
    /// that stops reading what we send is not covered: it may be gone.
    reader_paused: Cell<bool>,
    /// Bytes the machine answered by itself while the client's backlog was over the limit.
    answered_over_limit: Cell<usize>,
    /// Wakes a reader held off by flow control when the connection starts closing.
    closing: Notify,
    /// Wakes a timer that idles (an open connection without heartbeats) when the connection
    /// starts closing: the close handshake has a deadline.
    timer_wanted: Notify,
    finished: Event,
    last_read: Cell<Instant>,
    last_write: Cell<Instant>,
}

/// How much to read from a socket next: starts small, doubles while reads fill what was asked
/// for, and shrinks when they use little of it, between `READ_SIZE_MIN` and the configured
/// `read_chunk_bytes`. Each read zero-fills what it asks for and an idle connection keeps its
/// buffer, so a fixed 64 KiB read costs a 64 KiB memset per read and 64 KiB per idle connection.
struct ReadSize {
    current: usize,
    max: usize,
}

const READ_SIZE_MIN: usize = 4096;

impl ReadSize {
    fn new(max: usize) -> ReadSize {
        ReadSize {
            current: READ_SIZE_MIN.min(max),
            max,
        }
    }

    fn next(&self) -> usize {
        self.current
    }

    fn observe(&mut self, asked: usize, read: usize) {
        if read == asked {
            self.current = (self.current * 2).min(self.max);
        } else if read < asked / 8 {
            self.current = (self.current / 2).max(READ_SIZE_MIN.min(self.max));
        }
    }
}

/// Makes room for `asked` more bytes after the unparsed input. Frames are cut from the read
/// buffer and share it; once none is alive (frames are dropped as each read is handled, but for
/// large bodies, which are queued zero-copy and keep their buffer) the buffer is reused, the
/// unparsed tail moved to its front. A new buffer holds the tail and twice the read size, so
/// that after the next read such a move still leaves `asked` bytes of room.
fn make_room(input: &mut BytesMut, asked: usize) {
    if input.try_reclaim(asked) {
        return;
    }
    let mut fresh = BytesMut::with_capacity(input.len() + 2 * asked);
    fresh.extend_from_slice(input);
    *input = fresh;
}

async fn read_some(stream: &RefCell<TcpStream>, buffer: &mut [u8]) -> io::Result<usize> {
    poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, buffer)).await
}

async fn write_all(stream: &RefCell<TcpStream>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let written =
            poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, bytes)).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
    }
    Ok(())
}

/// Shuts the socket down in `how` (`SHUT_RDWR`: a pending read or write returns at once;
/// `SHUT_WR`: the peer reads everything sent so far, then end of stream). The descriptor stays
/// open (and owned by the `TcpStream`) until the connection is dropped.
fn shutdown_socket(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown(2) only changes the state of the socket `fd` names; it touches no memory.
    // An error (the peer already gone) leaves nothing to do.
    let _ = unsafe { libc::shutdown(fd, how) };
}

impl Connection {
    pub fn new(
        id: u64,
        stream: TcpStream,
        settings: Rc<ConnectionSettings>,
        shard: Rc<ShardBroker>,
        consumer_window: u32,
    ) -> io::Result<Rc<Connection>> {
        let peer = stream.peer_addr()?;
        stream.set_nodelay(true)?;
        let fd = stream.as_raw_fd();
        let now = Instant::now();
        let machine = Rc::new(RefCell::new(ConnectionMachine::new(settings.clone(), peer)));
        let write_wanted = Rc::new(Notify::default());
        let session = Session::new(
            shard.clone(),
            id,
            machine.clone(),
            write_wanted.clone(),
            consumer_window,
            settings.limits.outbound_buffer_bytes_max,
        );
        shard.register_connection(id, session.clone());
        Ok(Rc::new(Connection {
            id,
            stream: RefCell::new(stream),
            fd,
            machine,
            settings,
            shard,
            session,
            write_wanted,
            drained: Notify::default(),
            in_flight_bytes: Cell::new(0),
            reader_done: Cell::new(false),
            reader_paused: Cell::new(false),
            answered_over_limit: Cell::new(0),
            closing: Notify::default(),
            timer_wanted: Notify::default(),
            finished: Event::default(),
            last_read: Cell::new(now),
            last_write: Cell::new(now),
        }))
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_set()
    }

    /// Closes the connection with 320 CONNECTION_FORCED; the client gets `shutdown_grace` to
    /// answer before [`Connection::force_close`].
    pub fn begin_shutdown(&self) {
        self.machine.borrow_mut().begin_shutdown();
        self.write_wanted.notify();
        self.closing.notify();
        self.timer_wanted.notify();
    }

    /// Gives up on the peer: no more reads or writes, and the socket is shut down so that a
    /// pending read or write returns at once.
    pub fn force_close(&self) {
        self.machine.borrow_mut().abandon();
        shutdown_socket(self.fd, libc::SHUT_RDWR);
        self.write_wanted.notify();
        self.drained.notify();
        self.closing.notify();
        self.timer_wanted.notify();
    }

    /// Runs the connection to its end. Spawns the writer and the timer, reads until the peer or
    /// the machine closes, then waits for the writer to flush.
    pub async fn run(self: Rc<Self>) {
        let peer = self.machine.borrow().peer();
        debug!("{peer}: accepted connection {}", self.id);
        let writer = glommio::spawn_local(self.clone().write_loop());
        glommio::spawn_local(self.clone().timer_loop()).detach();
        self.read_loop().await;
        self.reader_done.set(true);
        self.write_wanted.notify();
        writer.await;
        self.session.connection_closed();
        self.finished.set();
        let machine = self.machine.borrow();
        info!(
            "{peer}: connection {} closed ({} channels open at close)",
            self.id,
            machine.open_channel_count()
        );
    }

    fn pending_outbound_bytes(&self) -> usize {
        self.machine.borrow_mut().outbound().len() + self.in_flight_bytes.get()
    }

    fn phase(&self) -> Phase {
        self.machine.borrow().phase()
    }

    async fn read_loop(&self) {
        let limit = self.settings.limits.outbound_buffer_bytes_max;
        let mut read_size = ReadSize::new(self.settings.limits.read_chunk_bytes);
        let mut input = BytesMut::with_capacity(read_size.next());
        let coalesce = Duration::from_micros(self.settings.limits.read_coalesce_us);
        let mut meter = StreamMeter::new(coalesce, Instant::now());
        let mut streaming = false;
        // A command read while the client's backlog was over the limit, carried out once it
        // drains; and whether input was left unparsed for the same reason.
        let mut held: Option<Command> = None;
        let mut input_stalled = false;
        loop {
            if streaming {
                // Read coalescing (`super::coalescing`): the client streams, so let its next
                // messages gather. An answer it may wait for ends the wait, and so do window
                // answers unless the meter found holding them does not slow the client.
                let window_answered = async {
                    if meter.holds_window_answers() {
                        futures_lite::future::pending().await
                    } else {
                        self.session.window_answered.wait().await
                    }
                };
                let answered =
                    futures_lite::future::or(self.session.answered.wait(), window_answered);
                futures_lite::future::or(glommio::timer::sleep(coalesce), answered).await;
            }
            // Back-pressure: while the client does not read what we send, read only its
            // settlements (see `feed`); stop reading while our mesh outbox is not draining, or
            // (publishers) while memory is over its limit.
            loop {
                if self.phase() == Phase::Closed {
                    if self.machine.borrow().input_refused() {
                        self.linger(input, read_size.next()).await;
                    }
                    return;
                }
                let over = self.pending_outbound_bytes() > limit;
                if over && (held.is_some() || input_stalled) {
                    self.drained.wait().await;
                } else if self.shard.is_backlogged() {
                    self.shard.outbox_drained.wait().await;
                } else if !over && self.publishing_blocked() {
                    // (Over the limit, a publisher's settlements are still read; its publishes
                    // wait as held commands.)
                    self.reader_paused.set(true);
                    self.hold_off_publisher().await;
                } else if held.is_some() || input_stalled {
                    // The backlog drained: carry out what waited, then the rest of the input.
                    if let Some(command) = held.take() {
                        self.session.execute(command).await;
                    }
                    (held, input_stalled) = self.feed(&mut input, limit).await.left_over();
                } else {
                    break;
                }
            }
            if self.reader_paused.replace(false) {
                self.last_read.set(Instant::now());
            }
            let filled = input.len();
            let asked = read_size.next();
            make_room(&mut input, asked);
            input.resize(filled + asked, 0);
            let result = read_some(&self.stream, &mut input[filled..]).await;
            let read = match result {
                Ok(0) => {
                    input.truncate(filled);
                    self.peer_went_away("closed the socket");
                    return;
                }
                Ok(read) => {
                    input.truncate(filled + read);
                    read_size.observe(asked, read);
                    read
                }
                Err(error) => {
                    input.truncate(filled);
                    self.peer_went_away(&error.to_string());
                    return;
                }
            };
            let now = Instant::now();
            self.last_read.set(now);
            let fed = self.feed(&mut input, limit).await;
            // After a full read more is waiting already: read it at once.
            streaming = meter.observe(now, fed.streamed, fed.asked_something, read < asked);
            (held, input_stalled) = fed.left_over();
            if self.shard.wants_flush() {
                futures_lite::future::yield_now().await;
            }
        }
    }

    /// Hands the complete commands in `input` to the session. While more than `limit` bytes
    /// wait to be written to the client, only settlements are carried out: they add nothing to
    /// that backlog, and a client that blocks on writing its acks (a synchronous client such as
    /// rabbitmq-c, which does not read while it writes) would otherwise never read again. The
    /// first other command is returned as held, and parsing stops once the machine's own answers
    /// (channel.open-ok, say) have grown the backlog by `limit / 4` since it went over the limit;
    /// memory stays bounded by the read buffer, one command and that growth until the client
    /// reads. (Deliveries need credit, which bounds them whatever is read.)
    async fn feed(&self, input: &mut BytesMut, limit: usize) -> Fed {
        let mut fed = Fed::default();
        loop {
            let over = self.pending_outbound_bytes() > limit;
            if !over {
                self.answered_over_limit.set(0);
            } else if self.answered_over_limit.get() > limit / 4 {
                fed.stalled = true;
                break;
            }
            let next = {
                let mut machine = self.machine.borrow_mut();
                let before = machine.outbound().len();
                let next = machine.receive(input);
                if over {
                    let grown = machine.outbound().len().saturating_sub(before);
                    self.answered_over_limit
                        .set(self.answered_over_limit.get() + grown);
                }
                next
            };
            match next {
                None => break,
                Some(Input::Command(command))
                    if over && !Session::is_settlement(&command.method) =>
                {
                    fed.held = Some(command);
                    break;
                }
                Some(Input::Command(command)) if Session::is_streamed(&command.method) => {
                    fed.streamed
                        .count(matches!(command.method, Method::BasicPublish(_)));
                    self.session.execute_streamed(command);
                }
                Some(Input::Command(command)) => {
                    self.session.execute(command).await;
                    fed.asked_something = true;
                }
                Some(Input::ChannelClosed(channel)) => {
                    fed.asked_something = true;
                    self.session.channel_closed(channel);
                }
            }
        }
        let wrote = {
            let mut machine = self.machine.borrow_mut();
            fed.asked_something |= machine.take_answered_itself();
            !machine.outbound().is_empty()
        };
        if wrote {
            self.write_wanted.notify();
        }
        fed
    }

    /// Whether flow control holds this connection's reads: it has published, and some shard
    /// holds more messages in memory than paging keeps up with (as RabbitMQ's memory alarm
    /// blocks publishing connections; connections that only consume go on).
    fn publishing_blocked(&self) -> bool {
        self.phase() == Phase::Open
            && self.session.has_published()
            && self.shard.publishers_paused()
    }

    /// Waits until flow control lets publishers go on (or the connection closes), telling a
    /// client that asked for it with connection.blocked and connection.unblocked.
    async fn hold_off_publisher(&self) {
        let reason = if self.shard.disk_alarm() {
            Some("low on disk")
        } else if self.shard.memory_alarm() {
            Some("low on memory")
        } else {
            None
        };
        let notify = reason.filter(|_| self.machine.borrow().client().connection_blocked);
        if let Some(reason) = notify {
            let reason = ShortStr::from_static(reason);
            self.session.send(0, ConnectionBlocked { reason });
        }
        futures_lite::future::or(self.shard.flow_resumed.wait(), self.closing.wait()).await;
        if notify.is_some() && self.phase() == Phase::Open {
            self.session.send(0, ConnectionUnblocked {});
        }
    }

    /// After the machine refused the input: reads and drops what the client still sends (the
    /// rest of the bad frame, its close-ok) until end of stream or `close_timeout_ms`, so that
    /// the socket is not closed with unread input, which would reset it before the client has
    /// read our connection.close.
    async fn linger(&self, mut input: BytesMut, chunk: usize) {
        let deadline = Duration::from_millis(self.settings.limits.close_timeout_ms);
        input.clear();
        input.resize(chunk, 0);
        let discard = async { while let Ok(1..) = read_some(&self.stream, &mut input).await {} };
        futures_lite::future::or(discard, glommio::timer::sleep(deadline)).await;
    }

    fn peer_went_away(&self, how: &str) {
        let mut machine = self.machine.borrow_mut();
        if machine.phase() == Phase::Open {
            info!(
                "{}: client {how} without closing the connection",
                machine.peer()
            );
        }
        machine.abandon();
    }

    async fn write_loop(self: Rc<Self>) {
        let mut buffer = BytesMut::with_capacity(4096);
        let mut failed = false;
        loop {
            let swapped = {
                let mut machine = self.machine.borrow_mut();
                if machine.outbound().is_empty() {
                    if machine.phase() == Phase::Closed || self.reader_done.get() {
                        break;
                    }
                    false
                } else {
                    std::mem::swap(machine.outbound(), &mut buffer);
                    if machine.phase() == Phase::Closing {
                        // This write holds our connection.close: its close-ok has a deadline.
                        self.timer_wanted.notify();
                    }
                    true
                }
            };
            if !swapped {
                self.write_wanted.wait().await;
                continue;
            }
            self.in_flight_bytes.set(buffer.len());
            let result = write_all(&self.stream, &buffer).await;
            buffer.clear();
            self.in_flight_bytes.set(0);
            self.last_write.set(Instant::now());
            self.drained.notify();
            self.session.on_drained();
            if let Err(error) = result {
                debug!("{}: write failed: {error}", self.machine.borrow().peer());
                self.machine.borrow_mut().abandon();
                failed = true;
                break;
            }
        }
        // Everything is written: end our direction (the reader drains the client's until it
        // ends too); after a failed write, both, which also ends a read still pending.
        shutdown_socket(
            self.fd,
            if failed {
                libc::SHUT_RDWR
            } else {
                libc::SHUT_WR
            },
        );
        self.drained.notify();
    }

    async fn timer_loop(self: Rc<Self>) {
        let limits = &self.settings.limits;
        let started = Instant::now();
        let mut closing_since: Option<Instant> = None;
        loop {
            let heartbeat = self.machine.borrow().heartbeat_secs();
            let tick = match heartbeat {
                Some(secs) => Some(Duration::from_millis(u64::from(secs) * 500)),
                // Open without heartbeats, nothing is due until the connection closes: a
                // thousand idle connections must not wake the shard twice a second each.
                None if self.phase() == Phase::Open => None,
                None => Some(Duration::from_millis(500)),
            };
            let finished = futures_lite::future::or(
                async {
                    match tick {
                        Some(tick) => glommio::timer::sleep(tick).await,
                        None => self.timer_wanted.wait().await,
                    }
                    false
                },
                async {
                    self.finished.wait().await;
                    true
                },
            )
            .await;
            if finished {
                return;
            }
            let now = Instant::now();
            let peer = self.machine.borrow().peer();
            match self.phase() {
                Phase::Closed => return,
                Phase::Closing => {
                    let since = *closing_since.get_or_insert(now);
                    if now - since > Duration::from_millis(limits.close_timeout_ms) {
                        info!("{peer}: no connection.close-ok in time, closing the socket");
                        self.force_close();
                        return;
                    }
                }
                _ if self.machine.borrow().in_handshake()
                    && now - started > Duration::from_millis(limits.handshake_timeout_ms) =>
                {
                    warn!("{peer}: handshake not completed in time, closing the socket");
                    self.force_close();
                    return;
                }
                _ => {}
            }
            if let Some(secs) = heartbeat {
                let interval = Duration::from_secs(u64::from(secs));
                if !self.reader_paused.get() && now - self.last_read.get() > interval * 2 {
                    warn!("{peer}: missed heartbeats from client, timeout: {secs}s");
                    self.force_close();
                    return;
                }
                if now - self.last_write.get() >= interval / 2 {
                    self.machine.borrow_mut().send_heartbeat();
                    self.write_wanted.notify();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ReadSize, READ_SIZE_MIN};

    #[test]
    fn read_size_grows_on_full_reads_and_shrinks_on_small_ones() {
        let max = 65536;
        let mut size = ReadSize::new(max);
        assert_eq!(size.next(), READ_SIZE_MIN);
        // A busy publisher fills every read: the size doubles up to the configured chunk.
        for _ in 0..10 {
            let asked = size.next();
            size.observe(asked, asked);
        }
        assert_eq!(size.next(), max);
        // A read that uses a quarter keeps the size; one that uses little halves it.
        size.observe(max, max / 4);
        assert_eq!(size.next(), max);
        for _ in 0..10 {
            let asked = size.next();
            size.observe(asked, 10);
        }
        assert_eq!(size.next(), READ_SIZE_MIN);
        // A configured chunk below the minimum is respected.
        let mut small = ReadSize::new(1024);
        small.observe(1024, 1024);
        small.observe(1024, 1);
        assert_eq!(small.next(), 1024);
    }
}
