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
//!
//! Fail-stop: after an IO error the log refuses further writes; every waiting and later callback
//! is told `false` (the broker then nacks instead of confirming). It never guesses.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::BytesMut;
use glommio::io::DmaFile;
use log::error;

use super::sync::Notify;

type Callback = Box<dyn FnOnce(bool)>;

/// Buffers that grew past this in a burst are given back once it is written: a shard keeps a
/// writer per segment (tens of them), most of them idle after the log rolled on.
const BUFFER_KEEP_BYTES: usize = 256 << 10;

pub struct LogWriter {
    path: PathBuf,
    pending: RefCell<BytesMut>,
    callbacks: RefCell<Vec<Callback>>,
    wake: Notify,
    failed: Cell<bool>,
    closed: Cell<bool>,
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
            callbacks: RefCell::new(Vec::new()),
            wake: Notify::default(),
            failed: Cell::new(false),
            closed: Cell::new(false),
            synced_bytes: Cell::new(0),
        });
        glommio::spawn_local(log.clone().run(file)).detach();
        Ok(log)
    }

    /// Appends one framed record.
    pub fn append(&self, kind: u8, payload: &[u8]) {
        if self.failed.get() {
            return;
        }
        shards::record::encode_record(&mut self.pending.borrow_mut(), kind, payload);
        self.wake.notify();
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

    /// Stops the writer task once what is pending is written (the file is being removed).
    pub fn close(&self) {
        self.closed.set(true);
        self.wake.notify();
    }

    pub fn synced_bytes(&self) -> u64 {
        self.synced_bytes.get()
    }

    async fn run(self: Rc<Self>, file: DmaFile) {
        let alignment = file.align_up(1).max(1) as usize;
        // The bytes of the last, partial block (already on disk, rewritten with the next batch)
        // followed by what was appended since.
        let mut tail = BytesMut::new();
        // File offset of `tail`'s first byte; always aligned.
        let mut tail_offset = 0u64;
        loop {
            if self.pending.borrow().is_empty() && self.callbacks.borrow().is_empty() {
                if self.closed.get() {
                    return;
                }
                // Idle: keep no more than the partial last block. A shard keeps a writer per
                // segment, and all but the newest stay idle until their segment is deleted.
                *self.pending.borrow_mut() = BytesMut::new();
                if tail.capacity() > tail.len() {
                    tail = BytesMut::from(&tail[..]);
                }
                self.wake.wait().await;
                continue;
            }
            {
                let mut pending = self.pending.borrow_mut();
                tail.extend_from_slice(&pending.split());
                // A burst (a slow sync under heavy appends) must not pin its buffer for good.
                if pending.capacity() > BUFFER_KEEP_BYTES {
                    *pending = BytesMut::new();
                }
            }
            let callbacks = std::mem::take(&mut *self.callbacks.borrow_mut());
            let result = async {
                if !tail.is_empty() {
                    let aligned = tail.len().div_ceil(alignment) * alignment;
                    let mut buffer = file.alloc_dma_buffer(aligned);
                    let bytes = buffer.as_bytes_mut();
                    bytes[..tail.len()].copy_from_slice(&tail);
                    bytes[tail.len()..].fill(0);
                    let written = file.write_at(buffer, tail_offset).await?;
                    if written < aligned {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::WriteZero,
                            format!("short write: {written} of {aligned} bytes"),
                        )
                        .into());
                    }
                }
                file.fdatasync().await
            }
            .await;
            match result {
                Ok(()) => {
                    let whole_blocks = tail.len() / alignment * alignment;
                    self.synced_bytes.set(tail_offset + tail.len() as u64);
                    tail_offset += whole_blocks as u64;
                    let _ = tail.split_to(whole_blocks);
                    if tail.capacity() > BUFFER_KEEP_BYTES {
                        tail = BytesMut::from(&tail[..]);
                    }
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

/// Makes a directory's entries (new or removed files) durable.
pub fn sync_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
