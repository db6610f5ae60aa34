//! Raw image files and block devices, served with `io_uring` (one ring per queue).

use std::alloc::Layout;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::{Backend, BackendInfo, BackendQueue, Completion, Error, IoRequest, Op, Result};

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
    size: u64,
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
            size,
            opts,
            block_device,
            flush_failed: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Backend for FileBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.size,
            read_only: self.opts.read_only,
            block_size: 512,
            discard: true,
            write_zeroes: true,
        }
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        let entries = depth.max(1).next_power_of_two();
        let ring = IoUring::new(entries).map_err(Error::IoUring)?;
        // SAFETY: eventfd() has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::IoUring(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(Error::IoUring)?;
        ring.submitter()
            .register_files(&[self.file.as_raw_fd()])
            .map_err(Error::IoUring)?;
        Ok(Box::new(FileQueue {
            _file: self.file.clone(),
            ring,
            eventfd,
            tags: (0..depth).map(|_| TagState::default()).collect(),
            direct: self.opts.direct,
            block_device: self.block_device,
            flush_failed: self.flush_failed.clone(),
            in_flight: 0,
            unsubmitted: 0,
            done: Vec::new(),
            cqes: Vec::with_capacity(entries as usize),
        }))
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

/// An aligned copy buffer for driver buffers that `O_DIRECT` cannot take as they are.
struct Bounce {
    ptr: *mut u8,
    layout: Layout,
    /// The driver's buffers, to copy read data back into.
    targets: Vec<libc::iovec>,
}

impl Bounce {
    fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(DIRECT_ALIGN), 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Self {
            ptr,
            layout,
            targets: Vec::new(),
        })
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[derive(Default)]
struct TagState {
    op: Option<Op>,
    offset: u64,
    len: u64,
    bounce: Option<Bounce>,
}

// SAFETY: the raw pointers in Bounce and iovec point to memory owned by the bounce buffer or
// to driver memory the caller of `submit` keeps valid; a FileQueue is used by one thread at a time.
unsafe impl Send for FileQueue {}

struct FileQueue {
    _file: Arc<File>,
    flush_failed: Arc<AtomicBool>,
    ring: IoUring,
    eventfd: OwnedFd,
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
    fn push(&mut self, entry: io_uring::squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: every buffer an entry refers to is kept valid until its completion is
            // reaped (our caller's contract, or bounce buffers owned by `self.tags`).
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
    unsafe fn submit(&mut self, req: &IoRequest<'_>, tag: u32) -> Result<()> {
        let fd = types::Fixed(0);
        let user_data = u64::from(tag);
        let state = self.tags.get_mut(tag as usize).ok_or(Error::Submit(
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ))?;
        state.op = Some(req.op);
        state.offset = req.offset;
        state.len = req.len;
        let entry = match req.op {
            Op::Read | Op::Write if self.direct && !is_aligned(req.iovecs, req.offset) => {
                let bounce = Bounce::new(req.len as usize).ok_or(Error::Submit(
                    std::io::Error::from_raw_os_error(libc::ENOMEM),
                ))?;
                let mut pos = 0;
                for iov in req.iovecs {
                    if req.op == Op::Write {
                        // SAFETY: the caller guarantees iov is valid readable memory; the
                        // bounce buffer holds req.len >= pos + iov_len bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                iov.iov_base.cast::<u8>(),
                                bounce.ptr.add(pos),
                                iov.iov_len,
                            )
                        };
                    }
                    pos += iov.iov_len;
                }
                let mut bounce = bounce;
                bounce.targets.clear();
                bounce.targets.extend_from_slice(req.iovecs);
                let len = bounce.layout.size().min(req.len as usize);
                let ptr = bounce.ptr;
                state.bounce = Some(bounce);
                if req.op == Op::Read {
                    opcode::Read::new(fd, ptr, len as u32)
                } else {
                    let w = opcode::Write::new(fd, ptr, len as u32);
                    return self.push(w.offset(req.offset).build().user_data(user_data));
                }
                .offset(req.offset)
                .build()
                .user_data(user_data)
            }
            Op::Read => opcode::Readv::new(fd, req.iovecs.as_ptr(), req.iovecs.len() as u32)
                .offset(req.offset)
                .build()
                .user_data(user_data),
            Op::Write => opcode::Writev::new(fd, req.iovecs.as_ptr(), req.iovecs.len() as u32)
                .offset(req.offset)
                .build()
                .user_data(user_data),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(user_data),
            Op::Discard => Self::fallocate_entry(PUNCH, req.offset, req.len, tag),
            Op::WriteZeroes { unmap } => {
                let mode = if unmap && !self.block_device {
                    PUNCH
                } else {
                    ZERO
                };
                Self::fallocate_entry(mode, req.offset, req.len, tag)
            }
        };
        self.push(entry)
    }

    fn commit(&mut self) -> Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit().map_err(Error::Submit)?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn ack_completion_event(&mut self) {
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our own non-blocking eventfd.
        let _ = unsafe { libc::read(self.eventfd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
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
                let mut pos = 0;
                for iov in &b.targets {
                    // SAFETY: the targets are the caller's iovecs, valid until this reap
                    // returns their completion; the bounce buffer holds all of them.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            b.ptr.add(pos),
                            iov.iov_base.cast::<u8>(),
                            iov.iov_len,
                        )
                    };
                    pos += iov.iov_len;
                }
            }
            out.push((tag, outcome));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    fn run(q: &mut Box<dyn BackendQueue>, req: IoRequest<'_>) -> std::result::Result<u32, i32> {
        // SAFETY: the buffers live on the caller's stack until we reap below.
        unsafe { q.submit(&req, 0).unwrap() };
        q.commit().unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            q.wait().unwrap();
            q.reap(&mut out);
        }
        out[0].1
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn a_failed_flush_stays_failed() {
        let failed = AtomicBool::new(false);
        assert_eq!(sticky_flush(Ok(0), &failed), Ok(0));
        assert_eq!(sticky_flush(Err(libc::EIO), &failed), Err(libc::EIO));
        // The kernel now says all is well (errseq reports an error once): we do not.
        assert_eq!(sticky_flush(Ok(0), &failed), Err(libc::EIO));
        assert_eq!(sticky_flush(Ok(0), &failed), Err(libc::EIO));
    }

    #[test]
    fn refuses_bad_images() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let opts = FileOptions {
            read_only: false,
            direct: false,
        };
        let e = FileBackend::open(&missing, opts).unwrap_err().to_string();
        assert!(e.contains("truncate -s"), "{e}");
        assert!(!missing.exists(), "open must not create the image");
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![1u8; 1000]).unwrap();
        let e = FileBackend::open(&odd, opts).unwrap_err().to_string();
        assert!(e.contains("not a multiple of 512"), "{e}");
        assert_eq!(std::fs::metadata(&odd).unwrap().len(), 1000, "untouched");
    }

    #[test]
    fn buffered_read_write_flush_zero() {
        let img = image(1 << 20);
        let backend = FileBackend::open(
            img.path(),
            FileOptions {
                read_only: false,
                direct: false,
            },
        )
        .unwrap();
        let mut q = backend.queue(4).unwrap();
        let mut data = vec![0xabu8; 4096];
        let iovs = [iov(&mut data)];
        let r = run(
            &mut q,
            IoRequest {
                op: Op::Write,
                offset: 8192,
                len: 4096,
                iovecs: &iovs,
            },
        );
        assert_eq!(r, Ok(4096));
        assert_eq!(
            run(
                &mut q,
                IoRequest {
                    op: Op::Flush,
                    offset: 0,
                    len: 0,
                    iovecs: &[]
                }
            ),
            Ok(0)
        );
        let on_disk = std::fs::read(img.path()).unwrap();
        assert!(on_disk[8192..12288].iter().all(|&b| b == 0xab));
        assert!(on_disk[..8192].iter().all(|&b| b == 0));
        // Unaligned buffer: goes through the bounce path only with O_DIRECT, plain here.
        let mut back = vec![0u8; 4096];
        let iovs = [iov(&mut back)];
        assert_eq!(
            run(
                &mut q,
                IoRequest {
                    op: Op::Read,
                    offset: 8192,
                    len: 4096,
                    iovecs: &iovs
                }
            ),
            Ok(4096)
        );
        assert_eq!(back, data);
        let wz = IoRequest {
            op: Op::WriteZeroes { unmap: false },
            offset: 8192,
            len: 2048,
            iovecs: &[],
        };
        assert_eq!(run(&mut q, wz), Ok(0));
        let d = IoRequest {
            op: Op::Discard,
            offset: 10240,
            len: 2048,
            iovecs: &[],
        };
        assert_eq!(run(&mut q, d), Ok(0));
        let on_disk = std::fs::read(img.path()).unwrap();
        assert!(on_disk[8192..12288].iter().all(|&b| b == 0));
    }

    #[test]
    fn direct_with_unaligned_buffers_bounces() {
        let img = image(1 << 20);
        let Ok(backend) = FileBackend::open(
            img.path(),
            FileOptions {
                read_only: false,
                direct: true,
            },
        ) else {
            eprintln!("filesystem of the temp dir refuses O_DIRECT; bounce path not exercised");
            return;
        };
        let mut q = backend.queue(4).unwrap();
        // A buffer deliberately misaligned by one byte.
        let mut store = vec![0u8; 4096 + 1];
        for (i, b) in store.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let expected = store[1..].to_vec();
        let iovs = [iov(&mut store[1..])];
        assert_eq!(
            run(
                &mut q,
                IoRequest {
                    op: Op::Write,
                    offset: 4096,
                    len: 4096,
                    iovecs: &iovs
                }
            ),
            Ok(4096)
        );
        let mut back = vec![0u8; 4096 + 3];
        let iovs = [iov(&mut back[3..])];
        assert_eq!(
            run(
                &mut q,
                IoRequest {
                    op: Op::Read,
                    offset: 4096,
                    len: 4096,
                    iovecs: &iovs
                }
            ),
            Ok(4096)
        );
        assert_eq!(&back[3..], &expected[..]);
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&on_disk[4096..8192], &expected[..]);
    }
}
