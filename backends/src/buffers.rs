//! [`IoBuffers`]: a request's data buffers in driver memory, owned by the request.
//!
//! The engine resolves the driver's data descriptors into an [`IoBuffers`] (checking that
//! every byte is mapped driver memory the device may access in the request's direction) and
//! hands it to the backend inside the [`IoRequest`](crate::IoRequest). The buffers hold an
//! `Arc` of the driver memory, so their host ranges stay mapped for as long as the backend
//! keeps them: no lifetime, no `unsafe` contract between engine and backend.
//!
//! Synchronous backends copy with [`IoBuffers::copy_from_slice`],
//! [`IoBuffers::copy_to_slice`] and [`IoBuffers::fill_zeroes`]: volatile copies through
//! vm-memory, never `&[u8]` references into memory the driver may change at any time. Backends
//! that hand buffers to the kernel (`io_uring`, `preadv`) take [`IoBuffers::iovecs`]; using
//! those pointers is `unsafe`, at the system call, and sound as long as the backend keeps the
//! `IoBuffers` until the kernel is done with them.

use std::sync::Arc;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// The driver memory every transport maps (guest RAM for vhost-user, the IOTLB for VDUSE).
pub type DriverMemory = GuestMemoryMmap<()>;

/// Most host ranges one request may use (`UIO_MAXIOV`, the limit of `preadv`/`pwritev`).
pub const MAX_SEGMENTS: usize = 1024;

/// Zeroes to copy from in [`IoBuffers::fill_zeroes`].
static ZEROES: [u8; 4096] = [0; 4096];

/// Which way the data moves between the device and the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device writes into the buffers (a READ from the disk); the driver marked them
    /// device-writable.
    DeviceWrites,
    /// The device reads from the buffers (a WRITE to the disk); the driver marked them
    /// device-readable.
    DeviceReads,
}

impl Direction {
    fn permissions(self) -> Permissions {
        match self {
            Self::DeviceWrites => Permissions::Write,
            Self::DeviceReads => Permissions::Read,
        }
    }
}

/// Why buffers could not be set up or accessed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// A segment is not entirely in mapped driver memory, or not with the needed permission.
    #[error("buffer at {addr:#x} ({len} bytes) is not in mapped driver memory")]
    NotMapped {
        /// Driver address of the segment.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The segments need more than [`MAX_SEGMENTS`] host ranges.
    #[error("buffers need more than {MAX_SEGMENTS} host ranges")]
    TooManySegments,
    /// The total length does not fit a `usize`.
    #[error("buffers are too long")]
    TooLong,
    /// An access reaches past the end of the buffers.
    #[error("{len} bytes at offset {offset} reach past the end of {total} bytes of buffers")]
    OutOfBounds {
        /// Offset of the access in the buffers.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Total length of the buffers.
        total: usize,
    },
    /// The access goes the wrong way: writing into buffers the device may only read, or
    /// reading from buffers the device may only write.
    #[error("buffers are {0:?}: access in the other direction refused")]
    WrongDirection(Direction),
}

/// The data buffers of one request: an `Arc` of the driver memory and the host ranges the
/// request's segments resolve to.
///
/// Built (and checked) by the engine with [`IoBuffers::set`]; the backend owns it from
/// [`BackendQueue::submit`](crate::BackendQueue::submit) until it hands it back in the
/// [`Completion`](crate::Completion), and the engine reuses it for the next request, so a
/// request's buffers cost no allocation once the vectors have grown to the usual segment
/// count. An empty `IoBuffers` (no memory, no segments; [`IoBuffers::new`]) is what a request
/// without data carries in tests.
#[derive(Debug)]
pub struct IoBuffers {
    /// Keeps every host range below mapped; `None` when empty.
    mem: Option<Arc<DriverMemory>>,
    direction: Direction,
    /// The driver's segments as given (for the volatile copies through vm-memory).
    segments: Vec<(GuestAddress, usize)>,
    /// The same bytes as host ranges, split where driver memory regions end (for the kernel).
    iovecs: Vec<libc::iovec>,
    /// Sum of the segment lengths.
    len: usize,
}

// SAFETY: the raw pointers in `iovecs` are the only non-`Send` fields. They are addresses in
// the mappings of `mem`, an `Arc<GuestMemoryMmap>` (`Send + Sync`) that this value owns, so
// they stay valid wherever the value moves, and nothing about them is tied to a thread. This
// type never dereferences them (its copies go through `mem`'s volatile accessors); a backend
// that hands them to the kernel does so in its own `unsafe` block, while it owns the value.
unsafe impl Send for IoBuffers {}

impl Default for IoBuffers {
    fn default() -> Self {
        Self::new()
    }
}

impl IoBuffers {
    /// Empty buffers: no memory, no segments, length 0.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// Empty buffers with room for `segments` segments before any allocation.
    pub fn with_capacity(segments: usize) -> Self {
        Self {
            mem: None,
            direction: Direction::DeviceReads,
            segments: Vec::with_capacity(segments),
            iovecs: Vec::with_capacity(segments),
            len: 0,
        }
    }

    /// Buffers over `segments` (driver address, length) of `mem`, accessed by the device in
    /// `direction`. See [`Self::set`].
    pub fn from_segments(
        mem: Arc<DriverMemory>,
        segments: impl IntoIterator<Item = (GuestAddress, usize)>,
        direction: Direction,
    ) -> Result<Self, BufferError> {
        let mut buffers = Self::new();
        buffers.set(mem, segments, direction)?;
        Ok(buffers)
    }

    /// Replace the contents with `segments` of `mem`, reusing the vectors' capacity.
    ///
    /// Every segment must lie entirely in mapped driver memory with the permission
    /// `direction` needs, and the segments together must resolve to at most
    /// [`MAX_SEGMENTS`] host ranges (a segment spanning two memory regions takes two).
    /// On error the buffers are left empty.
    pub fn set(
        &mut self,
        mem: Arc<DriverMemory>,
        segments: impl IntoIterator<Item = (GuestAddress, usize)>,
        direction: Direction,
    ) -> Result<(), BufferError> {
        self.clear();
        self.direction = direction;
        let resolved = self.resolve(&mem, segments);
        if resolved.is_err() {
            self.clear();
        } else {
            self.mem = Some(mem);
        }
        resolved
    }

    fn resolve(
        &mut self,
        mem: &DriverMemory,
        segments: impl IntoIterator<Item = (GuestAddress, usize)>,
    ) -> Result<(), BufferError> {
        let perm = self.direction.permissions();
        for (addr, len) in segments {
            let not_mapped = BufferError::NotMapped { addr: addr.0, len };
            let slices = mem
                .get_slices(addr, len, perm)
                .map_err(|_| not_mapped.clone())?;
            for slice in slices {
                let slice = slice.map_err(|_| not_mapped.clone())?;
                if self.iovecs.len() == MAX_SEGMENTS {
                    return Err(BufferError::TooManySegments);
                }
                self.iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
            self.segments.push((addr, len));
            self.len = self.len.checked_add(len).ok_or(BufferError::TooLong)?;
        }
        Ok(())
    }

    /// Release the driver memory and forget the segments; the vectors keep their capacity.
    pub fn clear(&mut self) {
        self.mem = None;
        self.segments.clear();
        self.iovecs.clear();
        self.len = 0;
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffers hold no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Which way the device may access the buffers.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The driver memory the buffers are in (`None` when empty from [`Self::new`]/[`Self::clear`]).
    pub fn memory(&self) -> Option<&Arc<DriverMemory>> {
        self.mem.as_ref()
    }

    /// The host ranges, for handing to the kernel (`io_uring` READV/WRITEV, `preadv`).
    ///
    /// Getting them is safe; passing them to a system call is `unsafe` for the caller, and
    /// sound only while these `IoBuffers` are kept (not dropped, not [`Self::set`] or
    /// [`Self::clear`]ed) until the kernel has finished with the memory: the `Arc` of the
    /// driver memory they hold is what keeps the ranges mapped. The kernel may write into
    /// them only when [`Self::direction`] is [`Direction::DeviceWrites`].
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Copy `src` into the buffers at byte `offset` (the device writing: a READ's data).
    pub fn copy_from_slice(&mut self, offset: usize, src: &[u8]) -> Result<(), BufferError> {
        let Some(mem) = self.checked(Direction::DeviceWrites, offset, src.len())? else {
            return Ok(());
        };
        for (addr, range) in self.pieces(offset, src.len()) {
            let n = range.len();
            mem.write_slice(&src[range], addr)
                .map_err(|_| not_mapped(addr, n))?;
        }
        Ok(())
    }

    /// Copy bytes of the buffers from byte `offset` into `dst`, filling it (the device
    /// reading: a WRITE's data).
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) -> Result<(), BufferError> {
        let Some(mem) = self.checked(Direction::DeviceReads, offset, dst.len())? else {
            return Ok(());
        };
        for (addr, range) in self.pieces(offset, dst.len()) {
            let n = range.len();
            mem.read_slice(&mut dst[range], addr)
                .map_err(|_| not_mapped(addr, n))?;
        }
        Ok(())
    }

    /// Write `len` zero bytes into the buffers from byte `offset`.
    pub fn fill_zeroes(&mut self, offset: usize, len: usize) -> Result<(), BufferError> {
        let Some(mem) = self.checked(Direction::DeviceWrites, offset, len)? else {
            return Ok(());
        };
        for (addr, range) in self.pieces(offset, len) {
            let mut done = 0;
            while done < range.len() {
                let n = (range.len() - done).min(ZEROES.len());
                let at = addr.unchecked_add(done as u64);
                mem.write_slice(&ZEROES[..n], at)
                    .map_err(|_| not_mapped(at, n))?;
                done += n;
            }
        }
        Ok(())
    }

    /// The memory (`None` for empty buffers), if `want` is the buffers' direction and
    /// `offset..offset+len` is inside them.
    fn checked(
        &self,
        want: Direction,
        offset: usize,
        len: usize,
    ) -> Result<Option<&DriverMemory>, BufferError> {
        if self.direction != want && self.mem.is_some() {
            return Err(BufferError::WrongDirection(self.direction));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.mem.as_deref()),
            _ => Err(BufferError::OutOfBounds {
                offset,
                len,
                total: self.len,
            }),
        }
    }

    /// The pieces of `offset..offset+len` (checked to be inside): for each, the driver
    /// address and the matching range of the caller's slice.
    fn pieces(
        &self,
        offset: usize,
        len: usize,
    ) -> impl Iterator<Item = (GuestAddress, std::ops::Range<usize>)> + '_ {
        let mut seg_start = 0usize;
        self.segments.iter().filter_map(move |&(addr, seg_len)| {
            let seg_end = seg_start + seg_len;
            let from = offset.max(seg_start);
            let to = (offset + len).min(seg_end);
            let skip = from - seg_start;
            seg_start = seg_end;
            (from < to).then(|| (addr.unchecked_add(skip as u64), from - offset..to - offset))
        })
    }
}

fn not_mapped(addr: GuestAddress, len: usize) -> BufferError {
    BufferError::NotMapped { addr: addr.0, len }
}

#[cfg(test)]
#[path = "buffers_tests.rs"]
mod tests;
