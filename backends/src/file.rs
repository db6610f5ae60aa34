//! Raw image files and block devices, served with `io_uring` (one ring per queue).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::{
    Backend, BackendInfo, BackendQueue, Completion, Direction, Error, IoBuffers, IoRequest, Op,
    Result,
};

/// Alignment `O_DIRECT` needs for buffer addresses, lengths and offsets.
const DIRECT_ALIGN: usize = 512;

/// How to open a file backend.
#[derive(Debug, Clone, Copy)]
pub struct FileOptions {
    /// Open read-only and refuse writes.
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
}

/// A raw image file or block device.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    /// Capacity in bytes (changed by [`Backend::resize`]).
    size: AtomicU64,
    opts: FileOptions,
    block_device: bool,
    /// Set once a FLUSH failed: Linux reports a write-back error to one fsync only, so every
    /// later FLUSH must fail too, or a driver could believe lost data is durable.
    flush_failed: Arc<AtomicBool>,
}

impl FileBackend {
    /// Open an existing image. Never creates or truncates anything.
    pub fn open(path: &Path, opts: FileOptions) -> Result<Self> {
        let shown = path.display().to_string();
        let open_err = |cause: std::io::Error, hint| Error::Open {
            path: shown.clone(),
            cause,
            hint,
        };
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOENT) => "; create the image first (e.g. truncate -s 1G IMAGE)",
                    Some(libc::EINVAL) if opts.direct => {
                        "; the filesystem refuses O_DIRECT: pass --buffered to use the page cache"
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
                        if !opts.read_only =>
                    {
                        "; no write access: fix the permissions or pass --read-only"
                    }
                    Some(libc::EISDIR) => "; give an image file, not a directory",
                    _ => "",
                };
                open_err(e, hint)
            })?;
        let meta = file.metadata().map_err(|e| open_err(e, ""))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(open_err(
                std::io::Error::from_raw_os_error(libc::EINVAL),
                "; give a regular file or a block device",
            ));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(|e| open_err(e, ""))?;
        if size == 0 || size % crate::SECTOR_SIZE != 0 {
            return Err(Error::BadSize { path: shown, size });
        }
        Ok(Self {
            file: Arc::new(file),
            size: AtomicU64::new(size),
            opts,
            block_device,
            flush_failed: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Backend for FileBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.size.load(Ordering::Acquire),
            read_only: self.opts.read_only,
            block_size: 512,
            discard: true,
            write_zeroes: true,
        }
    }

    /// A file grows or shrinks (`ftruncate`; growing allocates nothing). A block device has
    /// the size it has: it is refused unless it already has the size asked for (grow the
    /// volume first, e.g. `lvextend`, then resize the device).
    fn resize(&self, capacity: u64) -> Result<()> {
        let shown = |n: u64| format!("{n} bytes");
        if self.opts.read_only {
            return Err(Error::Resize("the image is served read-only".into()));
        }
        if self.block_device {
            let mut file = &*self.file;
            let actual = file
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::Resize(format!("cannot read the block device's size: {e}")))?;
            if actual != capacity {
                return Err(Error::Resize(format!(
                    "the block device is {}, not {}: resize the volume itself first (e.g. lvextend), then resize the device to its size",
                    shown(actual),
                    shown(capacity)
                )));
            }
        } else {
            self.file.set_len(capacity).map_err(|e| {
                Error::Resize(format!(
                    "cannot set the image file to {}: {e}",
                    shown(capacity)
                ))
            })?;
        }
        self.size.store(capacity, Ordering::Release);
        Ok(())
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(FileQueue::new(
            self.file.clone(),
            self.opts.direct,
            self.block_device,
            self.flush_failed.clone(),
            depth,
        )?))
    }

    fn flush(&self) -> std::io::Result<()> {
        let synced = self.file.sync_data();
        if synced.is_err() {
            self.flush_failed.store(true, Ordering::Release);
        }
        if self.flush_failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "an earlier FLUSH failed: data may have been lost",
            ));
        }
        synced
    }
}

/// One page of a bounce buffer; a `Vec` of them is page-aligned, as `O_DIRECT` needs.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; 4096]);

/// An aligned copy of driver buffers that `O_DIRECT` cannot take as they are.
struct Bounce {
    blocks: Vec<Block>,
}

impl Bounce {
    /// A zeroed bounce buffer of at least `len` bytes, `None` if memory is short.
    fn new(len: usize) -> Option<Self> {
        let count = len.div_ceil(4096).max(1);
        let mut blocks = Vec::new();
        blocks.try_reserve_exact(count).ok()?;
        blocks.resize(count, Block([0; 4096]));
        Some(Self { blocks })
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.blocks.as_mut_ptr().cast()
    }

    /// Copy the first `len` bytes of `buffers` in (a WRITE's data).
    fn load(&mut self, buffers: &IoBuffers, len: usize) -> std::result::Result<(), i32> {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let start = i * 4096;
            let n = len.saturating_sub(start).min(4096);
            if n == 0 {
                break;
            }
            buffers
                .copy_to_slice(start, &mut block.0[..n])
                .map_err(|_| libc::EFAULT)?;
        }
        Ok(())
    }

    /// Copy the first `len` bytes out into `buffers` (a READ's data).
    fn store(&self, buffers: &mut IoBuffers, len: usize) -> std::result::Result<(), i32> {
        for (i, block) in self.blocks.iter().enumerate() {
            let start = i * 4096;
            let n = len.saturating_sub(start).min(4096);
            if n == 0 {
                break;
            }
            buffers
                .copy_from_slice(start, &block.0[..n])
                .map_err(|_| libc::EFAULT)?;
        }
        Ok(())
    }
}

/// A request in flight: what the completion needs, and everything the kernel may access.
#[derive(Default)]
struct TagState {
    op: Option<Op>,
    offset: u64,
    len: u64,
    /// The request's buffers: READV/WRITEV point into them (and at their iovec array).
    buffers: IoBuffers,
    /// READ/WRITE through an aligned copy point into this instead.
    bounce: Option<Bounce>,
    /// The outcome of a request the caller completed itself ([`FileQueue::complete_now`]):
    /// a NOP carries it through the ring.
    preset: Option<std::result::Result<u32, i32>>,
}

/// The `io_uring` of one queue on a file (also the data path of the qcow2 backend).
pub(crate) struct FileQueue {
    _file: Arc<File>,
    flush_failed: Arc<AtomicBool>,
    ring: IoUring,
    tags: Vec<TagState>,
    direct: bool,
    block_device: bool,
    in_flight: u32,
    /// Entries pushed to the submission queue and not yet submitted.
    unsubmitted: u32,
    done: Vec<Completion>,
    /// Reused buffer for completion entries (no allocation per reap).
    cqes: Vec<(u64, i32)>,
}

/// A failed FLUSH stays failed: once fdatasync reported an error, data may be lost for good,
/// and the kernel would not say so again.
fn sticky_flush(
    outcome: std::result::Result<u32, i32>,
    failed: &AtomicBool,
) -> std::result::Result<u32, i32> {
    match outcome {
        Err(errno) => {
            if !failed.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    errno,
                    "FLUSH failed: data may be lost; every later FLUSH fails too"
                );
            }
            Err(errno)
        }
        Ok(_) if failed.load(Ordering::Acquire) => Err(libc::EIO),
        ok => ok,
    }
}

fn is_aligned(iovecs: &[libc::iovec], offset: u64) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && iovecs.iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(DIRECT_ALIGN) && v.iov_len % DIRECT_ALIGN == 0
        })
}

impl FileQueue {
    /// A queue of `depth` requests on `file`, with its own ring.
    pub(crate) fn new(
        file: Arc<File>,
        direct: bool,
        block_device: bool,
        flush_failed: Arc<AtomicBool>,
        depth: u32,
    ) -> Result<Self> {
        let entries = depth.max(1).next_power_of_two();
        let ring = IoUring::new(entries).map_err(Error::IoUring)?;
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(Error::IoUring)?;
        Ok(Self {
            _file: file,
            ring,
            tags: (0..depth).map(|_| TagState::default()).collect(),
            direct,
            block_device,
            flush_failed,
            in_flight: 0,
            unsubmitted: 0,
            done: Vec::new(),
            cqes: Vec::with_capacity(entries as usize),
        })
    }

    /// Complete `req` with `result`, which the caller computed itself, through the ring: its
    /// completion is reaped like the others, after the ring's fd signals it.
    pub(crate) fn complete_now(
        &mut self,
        req: IoRequest,
        tag: u32,
        result: std::result::Result<u32, i32>,
    ) -> Result<()> {
        let einval = || Error::Submit(std::io::Error::from_raw_os_error(libc::EINVAL));
        let state = self.tags.get_mut(tag as usize).ok_or_else(einval)?;
        state.op = Some(req.op);
        state.offset = req.offset;
        state.len = req.len;
        state.buffers = req.buffers;
        state.bounce = None;
        state.preset = Some(result);
        let pushed = self.push(opcode::Nop::new().build().user_data(u64::from(tag)));
        if pushed.is_err() {
            let state = &mut self.tags[tag as usize];
            state.buffers = IoBuffers::new();
            state.preset = None;
        }
        pushed
    }

    /// Requests in the ring whose completions were not reaped yet.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: every buffer an entry refers to belongs to its request's `TagState` in
            // `self.tags` until the completion is reaped: the request's `IoBuffers` (the iovec
            // array and the host ranges it lists, kept mapped by the driver-memory `Arc` the
            // buffers own; READV only into buffers the device may write, see `submit`) or its
            // bounce buffer. `reap` releases them only after their completion entry arrived,
            // and `Drop` waits for every entry still in flight.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                self.unsubmitted += 1;
                return Ok(());
            }
            self.ring.submit().map_err(Error::Submit)?;
            self.unsubmitted = 0;
        }
    }

    fn fallocate_entry(mode: i32, offset: u64, len: u64, tag: u32) -> io_uring::squeue::Entry {
        opcode::Fallocate::new(types::Fixed(0), len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(u64::from(tag))
    }
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl BackendQueue for FileQueue {
    fn submit(&mut self, req: IoRequest, tag: u32) -> Result<()> {
        let fd = types::Fixed(0);
        let direct = self.direct;
        let block_device = self.block_device;
        let einval = || Error::Submit(std::io::Error::from_raw_os_error(libc::EINVAL));
        let wanted = match req.op {
            Op::Read => Some(Direction::DeviceWrites),
            Op::Write => Some(Direction::DeviceReads),
            _ => None,
        };
        if wanted.is_some_and(|d| d != req.buffers.direction() && !req.buffers.is_empty()) {
            return Err(einval()); // the kernel must not write into device-readable buffers
        }
        let state = self.tags.get_mut(tag as usize).ok_or_else(einval)?;
        let IoRequest {
            op,
            offset,
            len,
            buffers,
        } = req;
        state.op = Some(op);
        state.offset = offset;
        state.len = len;
        state.buffers = buffers;
        state.bounce = None;
        state.preset = None;
        let entry = match op {
            Op::Read | Op::Write if direct && !is_aligned(state.buffers.iovecs(), offset) => {
                let errno = |e| Error::Submit(std::io::Error::from_raw_os_error(e));
                let mut bounce = Bounce::new(len as usize).ok_or(errno(libc::ENOMEM))?;
                if op == Op::Write {
                    bounce.load(&state.buffers, len as usize).map_err(errno)?;
                }
                let ptr = bounce.as_mut_ptr();
                state.bounce = Some(bounce);
                if op == Op::Read {
                    opcode::Read::new(fd, ptr, len as u32)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Write::new(fd, ptr, len as u32)
                        .offset(offset)
                        .build()
                }
            }
            Op::Read => {
                let iovecs = state.buffers.iovecs();
                opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset)
                    .build()
            }
            Op::Write => {
                let iovecs = state.buffers.iovecs();
                opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset)
                    .build()
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard => Self::fallocate_entry(PUNCH, offset, len, tag),
            Op::WriteZeroes { unmap } => {
                let mode = if unmap && !block_device { PUNCH } else { ZERO };
                Self::fallocate_entry(mode, offset, len, tag)
            }
        };
        let pushed = self.push(entry.user_data(u64::from(tag)));
        if pushed.is_err() {
            // Not in the ring: nothing refers to the buffers any more.
            let state = &mut self.tags[tag as usize];
            state.buffers = IoBuffers::new();
            state.bounce = None;
        }
        pushed
    }

    fn commit(&mut self) -> Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit().map_err(Error::Submit)?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// The ring's own fd: it polls readable while its completion queue holds entries, so
    /// waking on it needs no eventfd and no read to clear it (one system call less per
    /// completion than an eventfd registered with the ring).
    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ring.as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
        if self.ring.completion().is_empty() {
            // Nothing to do, and no system call: this runs in busy-poll loops.
            return;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, result) in &cqes {
            self.in_flight -= 1;
            let tag = user_data as u32;
            let Some(state) = self.tags.get_mut(tag as usize) else {
                continue;
            };
            if let Some(preset) = state.preset.take() {
                out.push(Completion {
                    tag,
                    result: preset,
                    buffers: std::mem::take(&mut state.buffers),
                });
                continue;
            }
            // tmpfs and some filesystems cannot zero a range: punching a hole reads back as
            // zeroes in a regular file, so retry with that.
            if result == -libc::EOPNOTSUPP
                && matches!(state.op, Some(Op::WriteZeroes { .. }))
                && !self.block_device
            {
                state.op = Some(Op::Discard);
                let entry = Self::fallocate_entry(PUNCH, state.offset, state.len, tag);
                let _ = state;
                if self.push(entry).is_ok() && self.commit().is_ok() {
                    continue;
                }
            }
            let state = &mut self.tags[tag as usize];
            let bounce = state.bounce.take();
            let mut buffers = std::mem::take(&mut state.buffers);
            let expected = match state.op {
                Some(Op::Read) | Some(Op::Write) => Some(state.len),
                _ => None,
            };
            let mut outcome = if result < 0 {
                Err(-result)
            } else if expected.is_some_and(|n| result as u64 != n) {
                Err(libc::EIO) // short transfer: the image shrank under us
            } else {
                Ok(result as u32)
            };
            if state.op == Some(Op::Flush) {
                outcome = sticky_flush(outcome, &self.flush_failed);
            }
            if let (Some(b), Ok(_), Some(Op::Read)) = (&bounce, &outcome, state.op) {
                if let Err(errno) = b.store(&mut buffers, state.len as usize) {
                    outcome = Err(errno);
                }
            }
            out.push(Completion {
                tag,
                result: outcome,
                buffers,
            });
        }
        self.cqes = cqes;
    }

    fn wait(&mut self) -> Result<()> {
        if self.in_flight > 0 {
            self.ring.submit_and_wait(1).map_err(Error::Submit)?;
            self.unsubmitted = 0;
        }
        Ok(())
    }
}

impl Drop for FileQueue {
    fn drop(&mut self) {
        // The kernel may still access the buffers of requests in flight: wait for them before
        // the buffers (and the driver memory they keep mapped) are released.
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!(%e, "cannot wait for in-flight I/O; leaking its buffers");
                    std::mem::forget(std::mem::take(&mut self.tags));
                    return;
                }
            }
            let reaped = self.ring.completion().count() as u32;
            self.in_flight = self.in_flight.saturating_sub(reaped);
        }
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
