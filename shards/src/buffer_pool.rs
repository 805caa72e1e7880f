//! Builds the buffers of copied messages with as little allocator work as their size allows.
//!
//! - Up to [`INLINE_MAX`] bytes the buffer lives inside the `Bytes` owner itself: one allocation
//!   per message. A `Vec` turned into `Bytes` costs two, since the first clone of it (a message
//!   is cloned into its queue and again as an unacked delivery) allocates a shared header;
//!   together with the frees that was ~6% of the broker's instructions at 1 → 1 with 16-byte
//!   bodies. Sizes go up in classes ([`INLINE_CLASSES`]), each a fixed-size array.
//! - glibc serves allocations up to about 1 KiB from per-thread caches; a larger one (a 1 KiB
//!   body with its envelope) takes its general path: ~400 instructions per allocation and ~300
//!   per free, about 5% of the broker's instructions at 4 × 4 with 1 KiB bodies. Buffers between
//!   [`POOLED_MIN`] and [`POOLED_MAX`] bytes are instead taken from, and given back to, a
//!   per-thread free list per size class (128-byte steps, so at most 127 bytes of a buffer go
//!   unused).
//!
//! Invariants: a list holds only buffers whose capacity is exactly its class's size; a thread
//! keeps at most [`KEPT_BYTES_MAX`] bytes of free buffers, so a burst's buffers go back to the
//! allocator. A buffer dropped on another thread (a message that crossed the mesh) joins that
//! thread's lists.

use std::cell::RefCell;

use bytes::{BufMut, Bytes};

/// The sizes of inline buffers: at most a third of one goes unused above 256 bytes.
pub const INLINE_CLASSES: [usize; 8] = [64, 128, 192, 256, 384, 512, 768, 1024];
pub const INLINE_MAX: usize = 1024;
const STEP: usize = 128;
pub const POOLED_MIN: usize = INLINE_MAX + 1;
pub const POOLED_MAX: usize = 10 * 1024;
/// Holds the buffers of a page-out burst (thousands of messages, ~9 MiB of 1 KiB ones) for the
/// publishes that follow; more goes back to the allocator.
const KEPT_BYTES_MAX: usize = 16 << 20;
const FIRST_CLASS: usize = POOLED_MIN.div_ceil(STEP);
const CLASSES: usize = POOLED_MAX / STEP - FIRST_CLASS + 1;

struct FreeLists {
    classes: Vec<Vec<Vec<u8>>>,
    kept_bytes: usize,
}

thread_local! {
    static FREE: RefCell<FreeLists> = RefCell::new(FreeLists {
        classes: (0..CLASSES).map(|_| Vec::new()).collect(),
        kept_bytes: 0,
    });
}

/// The size class of a `len`-byte buffer, if it is pooled.
fn class_of(len: usize) -> Option<usize> {
    (POOLED_MIN..=POOLED_MAX)
        .contains(&len)
        .then(|| len.div_ceil(STEP) - FIRST_CLASS)
}

fn class_capacity(class: usize) -> usize {
    (class + FIRST_CLASS) * STEP
}

/// Owns a pooled buffer inside a `Bytes`; gives it back when the last handle is dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buffer = std::mem::take(&mut self.0);
        let capacity = buffer.capacity();
        let Some(class) = class_of(capacity).filter(|&c| class_capacity(c) == capacity) else {
            return;
        };
        buffer.clear();
        // During thread exit the lists may be gone already: the buffer is simply freed.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.kept_bytes + capacity <= KEPT_BYTES_MAX {
                free.kept_bytes += capacity;
                free.classes[class].push(buffer);
            }
        });
    }
}

/// A buffer held inline by its `Bytes` owner; `len` bytes of it are in use.
struct Inline<const N: usize> {
    len: usize,
    bytes: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn inline<const N: usize>(len: usize, fill: impl FnOnce(&mut dyn BufMut)) -> Bytes {
    let mut buffer = Inline { len, bytes: [0; N] };
    let mut unfilled = &mut buffer.bytes[..len];
    fill(&mut unfilled);
    assert!(unfilled.is_empty(), "a buffer must be filled exactly");
    Bytes::from_owner(buffer)
}

/// A `len`-byte buffer that `fill` writes (exactly `len` bytes, or it panics), as `Bytes`.
/// Sizes in the pooled range reuse a buffer given back on this thread when there is one.
pub fn build(len: usize, fill: impl FnOnce(&mut dyn BufMut)) -> Bytes {
    // Must match `INLINE_CLASSES`.
    match len {
        0..=64 => return inline::<64>(len, fill),
        65..=128 => return inline::<128>(len, fill),
        129..=192 => return inline::<192>(len, fill),
        193..=256 => return inline::<256>(len, fill),
        257..=384 => return inline::<384>(len, fill),
        385..=512 => return inline::<512>(len, fill),
        513..=768 => return inline::<768>(len, fill),
        769..=INLINE_MAX => return inline::<INLINE_MAX>(len, fill),
        _ => {}
    }
    let Some(class) = class_of(len) else {
        let mut buffer = Vec::with_capacity(len);
        fill(&mut buffer);
        assert_eq!(buffer.len(), len, "a buffer must be filled exactly");
        return Bytes::from(buffer);
    };
    let recycled = FREE
        .try_with(|free| {
            let mut free = free.borrow_mut();
            let buffer = free.classes[class].pop()?;
            free.kept_bytes -= buffer.capacity();
            Some(buffer)
        })
        .ok()
        .flatten();
    let mut buffer = recycled.unwrap_or_else(|| Vec::with_capacity(class_capacity(class)));
    fill(&mut buffer);
    assert_eq!(buffer.len(), len, "a buffer must be filled exactly");
    Bytes::from_owner(Pooled(buffer))
}

/// Bytes of free buffers this thread keeps.
pub fn kept_bytes() -> usize {
    FREE.with(|free| free.borrow().kept_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_for_the_same_class_and_small_ones_are_not_kept() {
        let before = kept_bytes();
        let first = build(1100, |b| b.put_slice(&[7; 1100]));
        assert_eq!(&first[..], &[7; 1100][..]);
        let address = first.as_ptr();
        let slice = first.slice(100..);
        drop(first);
        assert_eq!(kept_bytes(), before, "a slice still holds the buffer");
        drop(slice);
        assert_eq!(kept_bytes(), before + 1152);
        // 1100 and 1150 bytes share the 1152-byte class.
        let second = build(1150, |b| b.put_slice(&[9; 1150]));
        assert_eq!(second.as_ptr(), address);
        assert_eq!(&second[..], &[9; 1150][..]);
        assert_eq!(kept_bytes(), before);
        drop(second);

        let small = build(100, |b| b.put_slice(&[1; 100]));
        let large = build(POOLED_MAX + 1, |b| b.put_bytes(2, POOLED_MAX + 1));
        drop((small, large));
        assert_eq!(kept_bytes(), before + 1152);
    }

    #[test]
    fn a_thread_keeps_a_bounded_amount() {
        let buffers: Vec<Bytes> = (0..KEPT_BYTES_MAX / 4096 + 100)
            .map(|_| build(4096, |b| b.put_bytes(0, 4096)))
            .collect();
        drop(buffers);
        assert!(kept_bytes() <= KEPT_BYTES_MAX);
        assert!(kept_bytes() > KEPT_BYTES_MAX - 4096);
    }

    #[test]
    fn every_size_up_to_the_inline_maximum_round_trips_through_its_class() {
        for len in (0..=INLINE_MAX + 1).step_by(7).chain(INLINE_CLASSES) {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let built = build(len, |b| b.put_slice(&bytes));
            assert_eq!(&built[..], &bytes[..]);
            let (head, tail) = (built.slice(..len / 2), built.slice(len / 2..));
            drop(built);
            assert_eq!([&head[..], &tail[..]].concat(), bytes);
        }
        assert_eq!(INLINE_CLASSES.last(), Some(&INLINE_MAX));
    }

    #[test]
    #[should_panic]
    fn a_pooled_buffer_filled_short_is_refused() {
        build(2000, |b| b.put_slice(&[0; 10]));
    }

    #[test]
    #[should_panic]
    fn an_inline_buffer_filled_short_is_refused() {
        build(100, |b| b.put_slice(&[0; 10]));
    }
}
