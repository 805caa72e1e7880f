//! Write batching under rabbitmq-c: its TCP socket, with writes held back until the connection
//! next reads (or `FLUSH_AT` bytes are waiting, or the caller flushes).
//!
//! Why: rabbitmq-c writes each frame with its own `send` (three per publish, one per ack), and on
//! loopback those sends were most of the generator's CPU (about 7.5 us per message 1 -> 1), so
//! the generator, not the broker, set the pace. Holding writes until the next read is what a
//! buffered client does (the Java client PerfTest runs on writes through a buffered stream): a
//! producer's confirm poll or a consumer's wait for deliveries sends everything before it, in
//! one `send`. Both brokers get the same byte stream.
//!
//! How: a rabbitmq-c socket is a struct whose first field points at its class, a table of six
//! functions (`amqp_socket_class_t` in `amqp_socket.h`, the same from 0.4 to 0.14). The socket
//! keeps its own struct and functions; only its class pointer is swapped for a `Batching`, which
//! starts with a copy of the original table with `send` and `recv` replaced, so those two find
//! their buffer from the socket alone.

use std::ffi::{c_int, c_void};
use std::ptr;

/// `amqp_socket_class_t`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SocketClass {
    send: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> isize,
    recv: unsafe extern "C" fn(*mut c_void, *mut c_void, usize, c_int) -> isize,
    open: *const c_void,
    close: *const c_void,
    get_sockfd: unsafe extern "C" fn(*mut c_void) -> c_int,
    delete: *const c_void,
}

/// `struct amqp_socket_t_`: the start of every socket.
#[repr(C)]
pub struct Socket {
    class: *const SocketClass,
}

/// `AMQP_PRIVATE_STATUS_SOCKET_NEEDWRITE`: a non-blocking send would have blocked.
const NEED_WRITE: isize = -0x1302;

/// Held writes go out once this many bytes wait, whatever else happens.
const FLUSH_AT: usize = 64 * 1024;

/// The class a batched socket points at. `class` must stay the first field: the socket's class
/// pointer is the pointer to the whole struct.
#[repr(C)]
pub struct Batching {
    class: SocketClass,
    original: SocketClass,
    held: Vec<u8>,
    hold: bool,
}

impl Batching {
    /// Points `socket` at a new `Batching` (holding nothing yet) and returns it; it must outlive
    /// every use of the socket, and be freed with `Box::from_raw` only after the socket is.
    ///
    /// # Safety
    /// `socket` must be a live rabbitmq-c socket not used by another thread meanwhile.
    pub unsafe fn install(socket: *mut Socket) -> *mut Batching {
        // SAFETY: the caller vouches for the socket; its class is the library's static table.
        let original = unsafe { *(*socket).class };
        let batching = Box::into_raw(Box::new(Batching {
            class: SocketClass {
                send: batched_send,
                recv: batched_recv,
                ..original
            },
            original,
            held: Vec::new(),
            hold: false,
        }));
        // SAFETY: as above; `class` is the first field, so this points at the whole Batching.
        unsafe { (*socket).class = ptr::addr_of!((*batching).class) };
        batching
    }

    /// Holds writes back (true) or sends each at once (false; what is held goes first).
    pub fn hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Sends what is held, waiting for the socket as long as it takes. 0 or a rabbitmq-c status.
    ///
    /// # Safety
    /// `socket` must be the socket this was installed on.
    pub unsafe fn flush(&mut self, socket: *mut c_void) -> isize {
        let mut sent = 0;
        while sent < self.held.len() {
            let rest = &self.held[sent..];
            // SAFETY: the original send of this socket, with a live buffer.
            let status =
                unsafe { (self.original.send)(socket, rest.as_ptr().cast(), rest.len(), 0) };
            if status > 0 {
                sent += status as usize;
            } else if status == NEED_WRITE {
                // SAFETY: the original get_sockfd of this socket.
                let fd = unsafe { (self.original.get_sockfd)(socket) };
                let mut pollfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd. An error (EINTR) just tries the send again.
                unsafe { libc::poll(&mut pollfd, 1, -1) };
            } else {
                self.held.drain(..sent);
                return status;
            }
        }
        self.held.clear();
        0
    }
}

/// The `Batching` a batched socket points at.
///
/// # Safety
/// `socket` must have been passed to `Batching::install` and the Batching not freed.
unsafe fn batching_of<'a>(socket: *mut c_void) -> &'a mut Batching {
    // SAFETY: the class pointer of an installed socket is its Batching, used by one thread.
    unsafe { &mut *((*socket.cast::<Socket>()).class as *mut Batching) }
}

unsafe extern "C" fn batched_send(
    socket: *mut c_void,
    buffer: *const c_void,
    len: usize,
    flags: c_int,
) -> isize {
    // SAFETY: rabbitmq-c calls this only through an installed socket's class.
    let batching = unsafe { batching_of(socket) };
    if !batching.hold {
        // SAFETY: this socket.
        let status = unsafe { batching.flush(socket) };
        if status < 0 {
            return status;
        }
        // SAFETY: the original send with rabbitmq-c's own arguments.
        return unsafe { (batching.original.send)(socket, buffer, len, flags) };
    }
    // SAFETY: rabbitmq-c passes `len` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), len) };
    batching.held.extend_from_slice(bytes);
    if batching.held.len() >= FLUSH_AT {
        // SAFETY: this socket.
        let status = unsafe { batching.flush(socket) };
        if status < 0 {
            return status;
        }
    }
    len as isize
}

unsafe extern "C" fn batched_recv(
    socket: *mut c_void,
    buffer: *mut c_void,
    len: usize,
    flags: c_int,
) -> isize {
    // SAFETY: rabbitmq-c calls this only through an installed socket's class.
    let batching = unsafe { batching_of(socket) };
    // Whatever the broker is to answer must have been sent before waiting for the answer.
    // SAFETY: this socket.
    let status = unsafe { batching.flush(socket) };
    if status < 0 {
        return status;
    }
    // SAFETY: the original recv with rabbitmq-c's own arguments.
    unsafe { (batching.original.recv)(socket, buffer, len, flags) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_table_matches_the_c_header() {
        assert_eq!(std::mem::size_of::<SocketClass>(), 6 * 8);
        assert_eq!(std::mem::offset_of!(SocketClass, get_sockfd), 4 * 8);
        assert_eq!(std::mem::offset_of!(Batching, class), 0);
    }
}
