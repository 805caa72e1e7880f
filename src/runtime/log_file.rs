//! An append-only log file written through glommio's DMA file (io_uring, O_DIRECT), with group
//! commit: everything appended while one fdatasync runs goes to disk with the next.
//!
//! Every write covers whole aligned blocks, so the last, partial block is written again (with
//! the same leading bytes) by the next batch, and its tail is filled with zeros: nothing but
//! zeros ever lies past the log's logical end, which is what replay's end marker relies on.
//! (glommio's stream writer pads with whatever its buffers held before, which could be stale
//! copies of earlier records; hence this writer.)
//!
//! Callers append framed records (see `shards::record`) and ask to be told when what they
//! appended is durable ([`LogWriter::after_sync`]). One background task per log writes the
//! accumulated bytes, calls fdatasync once, then runs every callback registered for that batch.
//! Records are encoded straight into the pending buffer ([`LogWriter::append_with`]) and the
//! writer swaps that buffer for an empty one, so a record's bytes are copied once more, into the
//! DMA buffers (4 MiB at a time), and buffers are reused rather than allocated per batch.
//!
//! Fail-stop: after an IO error the log refuses further writes; every waiting and later callback
//! is told `false` (the broker then nacks instead of confirming). It never guesses.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use glommio::io::DmaFile;
use log::error;

use super::sync::Notify;

type Callback = Box<dyn FnOnce(bool)>;

/// Buffers that grew past this in a burst are given back once it is written: a shard keeps a
/// writer per segment (tens of them), most of them idle after the log rolled on.
const BUFFER_KEEP_BYTES: usize = 1 << 20;

/// A batch goes to disk through DMA buffers of this size, one after another (a multiple of any
/// block size, so only the last is padded).
const WRITE_CHUNK_BYTES: usize = 4 << 20;

/// A writer with nothing to write for this long gives its buffers back (a sealed one, whose
/// segment the log has rolled past, does so at once). A busy log catches up between batches
/// all the time (a producer waiting for its confirms), and giving the buffers back then made
/// every batch grow a new one again, reallocating and copying as it grew.
const IDLE_GIVE_BACK: Duration = Duration::from_secs(1);

pub struct LogWriter {
    path: PathBuf,
    pending: RefCell<BytesMut>,
    /// The empty buffer `pending` is swapped with when a batch is written (see `run`).
    spare: RefCell<BytesMut>,
    callbacks: RefCell<Vec<Callback>>,
    wake: Notify,
    failed: Cell<bool>,
    closed: Cell<bool>,
    /// No more appends will come (see `seal`).
    sealed: Cell<bool>,
    /// Bytes made durable so far.
    synced_bytes: Cell<u64>,
}

impl LogWriter {
    /// Creates (or truncates) the log at `path` and starts its writer task.
    pub async fn create(path: &Path) -> std::io::Result<Rc<LogWriter>> {
        let file = DmaFile::create(path).await?;
        let log = Rc::new(LogWriter {
            path: path.to_path_buf(),
            pending: RefCell::new(BytesMut::new()),
            spare: RefCell::new(BytesMut::new()),
            callbacks: RefCell::new(Vec::new()),
            wake: Notify::default(),
            failed: Cell::new(false),
            closed: Cell::new(false),
            sealed: Cell::new(false),
            synced_bytes: Cell::new(0),
        });
        glommio::spawn_local(log.clone().run(file)).detach();
        Ok(log)
    }

    /// Appends one framed record whose payload `encode` writes in place (returning its kind);
    /// returns the record's length. A failed log encodes and drops it.
    pub fn append_with(&self, encode: impl FnOnce(&mut BytesMut) -> u8) -> usize {
        let mut pending = self.pending.borrow_mut();
        let start = pending.len();
        let len = shards::record::encode_record_with(&mut pending, encode);
        if self.failed.get() {
            pending.truncate(start);
        } else {
            self.wake.notify();
        }
        len
    }

    /// Makes room for `additional` more bytes of records at once: a burst of appends (a
    /// page-out writes up to a quarter of the memory budget in one go) would otherwise grow the
    /// buffer by doubling it, copying what it holds each time.
    pub fn reserve(&self, additional: usize) {
        self.pending.borrow_mut().reserve(additional);
    }

    /// Runs `callback(true)` once everything appended so far is on disk (or `false` if the log
    /// failed).
    pub fn after_sync(&self, callback: impl FnOnce(bool) + 'static) {
        if self.failed.get() {
            callback(false);
            return;
        }
        self.callbacks.borrow_mut().push(Box::new(callback));
        self.wake.notify();
    }

    /// No more appends will come (the log rolled on to a newer segment): once what is pending is
    /// written, the writer keeps no buffer but the last partial block. Without this, every
    /// segment rolled past in a burst held up to `BUFFER_KEEP_BYTES` for `IDLE_GIVE_BACK`.
    pub fn seal(&self) {
        self.sealed.set(true);
        self.wake.notify();
    }

    /// Stops the writer task once what is pending is written (the file is being removed).
    pub fn close(&self) {
        self.closed.set(true);
        self.wake.notify();
    }

    pub fn synced_bytes(&self) -> u64 {
        self.synced_bytes.get()
    }

    /// Bytes of buffer the writer holds (what `seal` and the idle timeout give back).
    pub fn buffered_capacity(&self) -> usize {
        self.pending.borrow().capacity() + self.spare.borrow().capacity()
    }

    async fn run(self: Rc<Self>, file: DmaFile) {
        let alignment = file.align_up(1).max(1) as usize;
        // `pending` starts with `carried` bytes: the last, partial block of what was written
        // before (already on disk, rewritten with the next batch), at file offset `offset`
        // (always aligned). Appends go after them. Each round swaps `pending` with `spare`, an
        // empty buffer, so appends never wait for a write and no buffer is allocated or copied
        // but for the carried block.
        let mut carried = 0usize;
        let mut offset = 0u64;
        loop {
            if self.pending.borrow().len() == carried && self.callbacks.borrow().is_empty() {
                if self.closed.get() {
                    return;
                }
                let woken = !self.sealed.get()
                    && futures_lite::future::or(
                        async {
                            self.wake.wait().await;
                            true
                        },
                        async {
                            glommio::timer::sleep(IDLE_GIVE_BACK).await;
                            false
                        },
                    )
                    .await;
                if woken {
                    continue;
                }
                // Idle or sealed: keep no more than the partial last block. A shard keeps a
                // writer per segment, and all but the newest stay idle until their segment is
                // deleted.
                *self.spare.borrow_mut() = BytesMut::new();
                {
                    let mut pending = self.pending.borrow_mut();
                    if pending.capacity() > pending.len() {
                        *pending = BytesMut::from(&pending[..]);
                    }
                }
                self.wake.wait().await;
                continue;
            }
            // `whole_blocks`: the batch's bytes that will not be written again (its last, partial
            // block is carried into the next batch).
            let (batch, whole_blocks) = {
                let mut pending = self.pending.borrow_mut();
                let batch = std::mem::replace(&mut *pending, self.spare.take());
                let whole_blocks = batch.len() / alignment * alignment;
                pending.extend_from_slice(&batch[whole_blocks..]);
                carried = pending.len();
                (batch, whole_blocks)
            };
            let callbacks = std::mem::take(&mut *self.callbacks.borrow_mut());
            let result = async {
                write_padded(&file, &batch, offset, alignment).await?;
                file.fdatasync().await
            }
            .await;
            match result {
                Ok(()) => {
                    self.synced_bytes.set(offset + batch.len() as u64);
                    offset += whole_blocks as u64;
                    // A burst (a slow sync under heavy appends) must not pin its buffer for good;
                    // its replacement starts at the kept size, not empty, so that the next
                    // batches do not grow it again by reallocating (and copying) step by step.
                    *self.spare.borrow_mut() = if batch.capacity() <= BUFFER_KEEP_BYTES {
                        let mut batch = batch;
                        batch.clear();
                        batch
                    } else {
                        BytesMut::with_capacity(BUFFER_KEEP_BYTES)
                    };
                    for callback in callbacks {
                        callback(true);
                    }
                }
                Err(e) => {
                    error!(
                        "log {}: write failed, refusing further writes: {e}",
                        self.path.display()
                    );
                    self.failed.set(true);
                    for callback in callbacks {
                        callback(false);
                    }
                    for callback in std::mem::take(&mut *self.callbacks.borrow_mut()) {
                        callback(false);
                    }
                    return;
                }
            }
        }
    }
}

/// Writes `bytes` at `offset` (aligned), the last block padded with zeros, through DMA buffers
/// of at most `WRITE_CHUNK_BYTES`: a burst of appends is not copied whole a second time.
async fn write_padded(
    file: &DmaFile,
    bytes: &[u8],
    offset: u64,
    alignment: usize,
) -> glommio::Result<(), ()> {
    for (index, part) in bytes.chunks(WRITE_CHUNK_BYTES).enumerate() {
        let aligned = part.len().div_ceil(alignment) * alignment;
        let mut buffer = file.alloc_dma_buffer(aligned);
        let out = buffer.as_bytes_mut();
        out[..part.len()].copy_from_slice(part);
        out[part.len()..].fill(0);
        let at = offset + (index * WRITE_CHUNK_BYTES) as u64;
        let written = file.write_at(buffer, at).await?;
        if written < aligned {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {aligned} bytes"),
            )
            .into());
        }
    }
    Ok(())
}

/// Makes a directory's entries (new or removed files) durable.
pub fn sync_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use glommio::{LocalExecutorBuilder, Placement};

    use super::LogWriter;

    /// Rounds of records of uneven sizes, some appended while a write is in flight, some with
    /// several syncs in between: the file replays to exactly those records, with zeros after,
    /// and every callback saw its records counted in `synced_bytes`.
    #[test]
    fn records_survive_many_rounds_with_partial_blocks_carried_between_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal-test.log");
        let written = {
            let path = path.clone();
            LocalExecutorBuilder::new(Placement::Unbound)
                .spawn(move || async move {
                    let log = LogWriter::create(&path).await.unwrap();
                    let mut expected: Vec<(u8, Vec<u8>)> = Vec::new();
                    let mut total = 0u64;
                    for round in 0..40u32 {
                        for i in 0..(round % 7 + 1) {
                            let kind = (round % 250 + 1) as u8;
                            let payload =
                                vec![(round * 31 + i) as u8; (round * 97 + i * 13) as usize % 3000];
                            total += log.append_with(|out| {
                                out.extend_from_slice(&payload);
                                kind
                            }) as u64;
                            expected.push((kind, payload));
                        }
                        // Every third round waits for its sync; the others pile up behind the
                        // write in flight.
                        if round % 3 == 0 {
                            let (sender, receiver) = crate::broker::oneshot::channel();
                            let at_least = total;
                            let log_after = Rc::clone(&log);
                            log.after_sync(move |ok| {
                                assert!(ok);
                                assert!(log_after.synced_bytes() >= at_least);
                                sender.send(());
                            });
                            receiver.await.unwrap();
                        }
                    }
                    let (sender, receiver) = crate::broker::oneshot::channel();
                    log.after_sync(move |ok| sender.send(ok));
                    assert!(receiver.await.unwrap());
                    assert_eq!(log.synced_bytes(), total);
                    log.close();
                    (expected, total)
                })
                .unwrap()
                .join()
                .unwrap()
        };
        let (expected, total) = written;
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[total as usize..].iter().all(|&b| b == 0));
        let replay = shards::record::replay(bytes.into());
        assert_eq!(replay.valid_bytes, total);
        assert_eq!(replay.dropped_bytes, 0);
        let found: Vec<(u8, Vec<u8>)> = replay
            .records
            .into_iter()
            .map(|r| (r.kind, r.payload.to_vec()))
            .collect();
        assert_eq!(found, expected);
    }

    /// A writer the log has rolled past gives its buffers back as soon as its last batch is
    /// written, without waiting to be idle: a burst through small segments otherwise kept a
    /// megabyte per segment for a second.
    #[test]
    fn a_sealed_writer_keeps_only_its_last_partial_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal-sealed.log");
        LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                let log = LogWriter::create(&path).await.unwrap();
                for _ in 0..3 {
                    for _ in 0..100 {
                        log.append_with(|out| {
                            out.extend_from_slice(&[7u8; 5000]);
                            1
                        });
                    }
                    let (sender, receiver) = crate::broker::oneshot::channel();
                    log.after_sync(move |ok| sender.send(ok));
                    assert!(receiver.await.unwrap());
                }
                let busy = log.buffered_capacity();
                assert!(busy >= 500_000, "a busy writer keeps its buffers: {busy}");
                log.seal();
                let start = std::time::Instant::now();
                while log.buffered_capacity() > 4096 {
                    assert!(
                        start.elapsed() < std::time::Duration::from_millis(500),
                        "still holding {} bytes",
                        log.buffered_capacity()
                    );
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
                log.close();
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
