//! Memory a queued message costs beyond its body, in memory and paged out, measured with a
//! counting allocator, and the time to publish into and take from a queue.
//!
//! Targets: under 128 bytes per queued message beyond the body (messaging issue); under 8 bytes
//! per paged-out message (a backlog's memory must not grow with its length at 32 bytes each).

#[path = "support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use shards::queue::{ChannelKey, Location};
use shards::{Message, Queue, ShardId};

/// Counts live heap bytes (as requested, without the allocator's own overhead).
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A message as the broker enqueues it: a 16-byte body in its own buffer, persistent, routed
/// through the default exchange.
fn message(body: &[u8]) -> Message {
    Message::new(
        b"",
        b"orders.incoming",
        &[0x10, 0x00, 2],
        Bytes::copy_from_slice(body),
        true,
    )
}

fn main() {
    // A deep queue: the queue's ring buffer grows by doubling, so right after a doubling up to
    // 72 bytes a message sit unused; 1M is just under a power of two, the steady state.
    let count: usize = 1_000_000;
    let body = [0xABu8; 16];
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut queue = Queue::new();
    for _ in 0..count {
        queue.publish(message(&body), None);
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let per_message = (after - before) as f64 / count as f64 - body.len() as f64;
    println!(
        "queued message overhead beyond a {} B body: {per_message:.1} bytes ({count} messages, target < 128)",
        body.len()
    );
    assert!(
        per_message < 128.0,
        "over the 128-byte target: {per_message}"
    );

    // The same deep queue paged out as it grows (the pager keeps memory under its budget), its
    // records back to back in the log as a publisher's are.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut queue = Queue::new();
    let record_len = 100u32;
    for n in 0..count as u64 {
        let location = Location {
            segment: 1 + (n / 500_000) as u32,
            len: record_len,
            offset: n % 500_000 * u64::from(record_len),
        };
        queue.publish(message(&body), Some(location));
        if n % 10_000 == 9_999 {
            queue.page_out(usize::MAX, 1, |_| true);
        }
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let per_paged = (after - before) as f64 / count as f64;
    println!(
        "paged-out message: {per_paged:.1} bytes ({} of {count} paged, target < 8)",
        queue.paged_count()
    );
    assert!(per_paged < 8.0, "over the 8-byte target: {per_paged}");
    drop(queue);

    let holder = ChannelKey {
        shard: ShardId(0),
        connection: 1,
        channel: 1,
    };
    let mut queue = Queue::new();
    support::measure("publish then get+ack one message", 1, || {
        queue.publish(message(&body), None);
        let got = queue.get(holder, false).expect("a message");
        queue.ack(&[got.id], &mut Vec::new());
    });
}
