//! Frontend memory is hostile memory: the frontend can shrink the file behind a mapping at any
//! time, and the next access to a page past the new end raises SIGBUS, which kills the whole
//! process (every tenant's device in `virtiod run`). All the `unsafe` of that defence is here.
//!
//! - Every file a frontend hands over is checked against its real size (`fstat`) before it is
//!   mapped ([`MapError::OutsideFile`]).
//! - Every mapping of a frontend's file is registered in a fixed table of atomics
//!   ([`REGISTRY`]), readable from a signal handler. A process-wide SIGBUS handler (installed
//!   once) looks the faulting address up; inside a registered mapping it maps an anonymous
//!   zero page over the faulting page (`mmap(MAP_FIXED)` is a plain system call, safe in a
//!   signal handler), marks the mapping poisoned, wakes its connection through an eventfd and
//!   returns: the access that faulted reads zeroes instead of killing the daemon. The
//!   connection then closes (see `wire.rs`). A SIGBUS anywhere else goes to the previous
//!   handler or, if there was none, kills the process as before: a genuine bug still crashes.
//! - A mapping is unregistered *before* it is unmapped, so the handler never maps a zero page
//!   over an address that has been unmapped and reused. Guest memory regions are shared
//!   (`Arc`) with queues and requests in flight, so [`FrontendMemory`] unmaps a region only
//!   once it holds the last reference to it.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Once, OnceLock};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// Frontend mappings the process can hold at once (all devices, all connections).
const SLOTS: usize = 4096;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Why a frontend's file could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// `offset + size` does not fit in the file.
    #[error("bytes {offset:#x}..+{size:#x} are outside the {file_size:#x}-byte file")]
    OutsideFile {
        /// Offset in the file.
        offset: u64,
        /// Bytes to map.
        size: u64,
        /// The file's size now.
        file_size: u64,
    },
    /// Every slot of the registry is in use.
    #[error("too many frontend memory mappings in this process ({SLOTS})")]
    RegistryFull,
    /// fstat or mmap failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One registered mapping. `seq` is odd while the slot is being written (a seqlock), so the
/// handler never acts on half-written bounds.
struct Slot {
    claimed: AtomicBool,
    seq: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
    wake_fd: AtomicI32,
    poisoned: AtomicBool,
}

impl Slot {
    const fn empty() -> Self {
        Slot {
            claimed: AtomicBool::new(false),
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            wake_fd: AtomicI32::new(-1),
            poisoned: AtomicBool::new(false),
        }
    }

    fn write(&self, start: usize, len: usize, page: usize, wake_fd: i32) {
        self.seq.fetch_add(1, SeqCst);
        self.start.store(start, SeqCst);
        self.len.store(len, SeqCst);
        self.page.store(page, SeqCst);
        self.wake_fd.store(wake_fd, SeqCst);
        self.poisoned.store(false, SeqCst);
        self.seq.fetch_add(1, SeqCst);
    }

    /// `(start, len, page, wake_fd)` if the slot holds a mapping containing `addr`.
    fn lookup(&self, addr: usize) -> Option<(usize, usize, i32)> {
        let before = self.seq.load(SeqCst);
        if before % 2 == 1 {
            return None;
        }
        let (start, len) = (self.start.load(SeqCst), self.len.load(SeqCst));
        let (page, fd) = (self.page.load(SeqCst), self.wake_fd.load(SeqCst));
        let stable = self.seq.load(SeqCst) == before;
        (stable && len != 0 && addr >= start && addr - start < len).then_some((start, page, fd))
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::empty() }; SLOTS];
/// Pages replaced by the handler since the process started (for tests and logs).
static REPLACED_PAGES: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Pages of frontend memory replaced by zero pages since the process started.
#[cfg(test)]
fn replaced_pages() -> u64 {
    REPLACED_PAGES.load(SeqCst)
}

fn install_handler() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value; we fill in a
        // handler with the SA_SIGINFO signature and pass valid pointers to sigaction(2).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                tracing::error!(
                    err = %io::Error::last_os_error(),
                    "cannot install the SIGBUS handler: a frontend shrinking its memory will kill the daemon"
                );
                return;
            }
            let _ = PREVIOUS.set(previous);
        }
    });
}

/// The SIGBUS handler. Only async-signal-safe operations: atomics, mmap, write, sigaction,
/// raise; errno is preserved for the interrupted code.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; errno is a
    // thread-local int we may read and write.
    let (addr, errno) = unsafe { ((*info).si_addr() as usize, *libc::__errno_location()) };
    let ours = REGISTRY.iter().find_map(|slot| {
        slot.lookup(addr)
            .map(|(start, page, fd)| (slot, start, page, fd))
    });
    if let Some((slot, start, page, fd)) = ours {
        let base = (addr & !(page - 1)).max(start);
        // SAFETY: `base..base + page` lies in a mapping that is registered, hence still mapped
        // by us (unregistered before munmap) and reachable by no Rust reference of a type with
        // invariants: it is shared memory accessed only through volatile/atomic accessors.
        // MAP_FIXED replaces exactly those pages with private zero pages.
        let mapped = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.poisoned.store(true, SeqCst);
            REPLACED_PAGES.fetch_add(1, SeqCst);
            if fd >= 0 {
                let one = 1u64.to_ne_bytes();
                // SAFETY: write(2) of 8 bytes from a live buffer to an eventfd kept open as
                // long as the slot names it (closed only after unregistering).
                unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
            }
            // SAFETY: restoring the interrupted code's errno.
            unsafe { *libc::__errno_location() = errno };
            return;
        }
    }
    // Not frontend memory (or no page could be mapped): behave as if we were not here.
    // SAFETY: PREVIOUS is the action that was installed before ours; calling its handler
    // with the same arguments, or restoring the default action and re-raising, is what the
    // process would have done without us (a synchronous fault repeats on return and kills).
    unsafe {
        if let Some(previous) = PREVIOUS.get() {
            let handler = previous.sa_sigaction;
            if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(handler);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                    f(sig);
                }
                return;
            }
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
        libc::raise(libc::SIGBUS);
    }
}

/// The page size the handler replaces in a mapping of `file` (huge pages on hugetlbfs).
fn page_size_of(file: &File) -> usize {
    // SAFETY: sysconf has no memory effects.
    let small = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    // SAFETY: fstatfs writes into the zeroed struct we pass and reads nothing else.
    let huge = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        (libc::fstatfs(file.as_raw_fd(), &mut fs) == 0 && fs.f_type as i64 == HUGETLBFS_MAGIC)
            .then_some(fs.f_bsize as usize)
    };
    huge.filter(|h| h.is_power_of_two() && *h > small)
        .unwrap_or(small)
}

/// Whether the frontend can shrink `file` (memfd seals).
fn can_shrink(file: &File) -> bool {
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals < 0 || seals & libc::F_SEAL_SHRINK == 0
}

/// A registered shared mapping of a frontend's file: unregistered, then unmapped, on drop.
pub struct FrontendMapping {
    addr: usize,
    len: usize,
    slot: usize,
    file: File,
    /// Keeps the eventfd the handler writes to open while the slot names it.
    _wake: Option<Arc<EventFd>>,
}

impl FrontendMapping {
    /// Map `size` bytes of `file` at `offset` (shared, read/write), after checking they lie
    /// in the file, and register them with the SIGBUS handler; a fault in them writes to
    /// `wake`.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        wake: Option<Arc<EventFd>>,
    ) -> Result<Self, MapError> {
        let file_size = file.metadata()?.len();
        let outside = MapError::OutsideFile {
            offset,
            size,
            file_size,
        };
        match offset.checked_add(size) {
            Some(end) if size != 0 && end <= file_size && end <= i64::MAX as u64 => {}
            _ => return Err(outside),
        }
        let len = usize::try_from(size).map_err(|_| io::Error::other("size too large"))?;
        let page = page_size_of(&file);
        tracing::debug!(
            fd_size = file_size,
            sealed = !can_shrink(&file),
            "mapping frontend memory (unless sealed against shrinking, a shrink is caught)"
        );
        install_handler();
        // SAFETY: a new shared mapping chosen by the kernel (no MAP_FIXED), of a range
        // checked to lie inside the file; it is ours until `Drop` unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let addr = addr as usize;
        let Some(slot) = REGISTRY.iter().position(|s| {
            s.claimed
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_ok()
        }) else {
            // SAFETY: unmapping the mapping made above, which nothing else refers to.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            return Err(MapError::RegistryFull);
        };
        let fd = wake.as_ref().map_or(-1, |w| w.as_raw_fd());
        REGISTRY[slot].write(addr, len, page, fd);
        Ok(Self {
            addr,
            len,
            slot,
            file,
            _wake: wake,
        })
    }

    /// Whether the frontend shrank the file under this mapping (a page was replaced).
    pub fn poisoned(&self) -> bool {
        REGISTRY[self.slot].poisoned.load(SeqCst)
    }

    /// The file's size now.
    pub fn file_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.len())
    }

    /// The file mapped.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A region of `vm-memory` over this mapping. It must not outlive `self`: only the types
    /// of this module hold both ([`FrontendMemory`], [`SharedFile`]).
    fn region(&self) -> Result<MmapRegion<()>, io::Error> {
        let builder = MmapRegionBuilder::<()>::new(self.len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE);
        // SAFETY: `addr..addr + len` is our live mapping; the region built does not own it
        // (no munmap on drop) and every holder drops it before this mapping (see above).
        unsafe { builder.with_raw_mmap_pointer(self.addr as *mut u8) }
            .build()
            .map_err(io::Error::other)
    }
}

impl Drop for FrontendMapping {
    fn drop(&mut self) {
        // Unregister first: from here on a SIGBUS at this address is not ours. The mapping
        // is only dropped when nothing refers to it, so nothing can fault in it any more.
        REGISTRY[self.slot].write(0, 0, 0, -1);
        REGISTRY[self.slot].claimed.store(false, SeqCst);
        // SAFETY: our mapping, unregistered, referred to by nobody (see the callers).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A frontend's file mapped whole for our own use (the in-flight region): the region is
/// dropped before the mapping.
pub struct SharedFile {
    region: MmapRegion<()>,
    mapping: FrontendMapping,
}

impl SharedFile {
    /// See [`FrontendMapping::map`].
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        wake: Option<Arc<EventFd>>,
    ) -> Result<Self, MapError> {
        let mapping = FrontendMapping::map(file, offset, size, wake)?;
        let region = mapping.region()?;
        Ok(Self { region, mapping })
    }

    /// Whether the frontend shrank the file under the mapping.
    pub fn poisoned(&self) -> bool {
        self.mapping.poisoned()
    }

    /// The file mapped.
    pub fn file(&self) -> &File {
        self.mapping.file()
    }
}

impl Deref for SharedFile {
    type Target = MmapRegion<()>;
    fn deref(&self) -> &MmapRegion<()> {
        &self.region
    }
}

/// One mapped region of a frontend's memory table.
pub struct GuestMapping {
    /// The region, shared with the guest memory, queues and requests in flight.
    pub region: Arc<GuestRegionMmap<()>>,
    mapping: FrontendMapping,
}

impl GuestMapping {
    /// Whether the frontend shrank the file under this region.
    pub fn poisoned(&self) -> bool {
        self.mapping.poisoned()
    }
    /// The file's size now.
    pub fn file_size(&self) -> Option<u64> {
        self.mapping.file_size()
    }
}

/// The guest memory regions a device has mapped from its frontends. A region is unmapped only
/// when this holds the last reference to it; regions still referenced when this is dropped
/// are leaked rather than unmapped under someone's feet.
#[derive(Default)]
pub struct FrontendMemory {
    held: Vec<GuestMapping>,
}

impl FrontendMemory {
    /// Map `size` bytes of `file` at `offset` as guest memory at `gpa`.
    pub fn map(
        &mut self,
        file: File,
        offset: u64,
        size: u64,
        gpa: u64,
        wake: Option<Arc<EventFd>>,
    ) -> Result<Arc<GuestRegionMmap<()>>, MapError> {
        let mapping = FrontendMapping::map(file, offset, size, wake)?;
        let region = GuestRegionMmap::new(mapping.region()?, GuestAddress(gpa))
            .ok_or_else(|| io::Error::other("region wraps the guest address space"))?;
        let region = Arc::new(region);
        self.held.push(GuestMapping {
            region: region.clone(),
            mapping,
        });
        Ok(region)
    }

    /// Unmap the regions nobody refers to any more.
    pub fn release_unused(&mut self) {
        // `GuestMapping` drops `region` (the last reference) before `mapping` (the munmap).
        self.held.retain(|m| Arc::strong_count(&m.region) > 1);
    }

    /// The regions mapped now.
    pub fn regions(&self) -> impl Iterator<Item = &GuestMapping> {
        self.held.iter()
    }

    /// The file behind `region` (one this table mapped).
    pub fn file_of(&self, region: &Arc<GuestRegionMmap<()>>) -> Option<&File> {
        self.held
            .iter()
            .find(|m| Arc::ptr_eq(&m.region, region))
            .map(|m| m.mapping.file())
    }
}

impl Drop for FrontendMemory {
    fn drop(&mut self) {
        self.release_unused();
        for m in self.held.drain(..) {
            tracing::warn!("frontend memory still referenced at teardown: left mapped");
            std::mem::forget(m);
        }
    }
}

/// A new memfd of `len` bytes that nobody can shrink (sealed), for memory we hand out.
pub fn sealed_memfd(name: &std::ffi::CStr, len: u64) -> io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd that we own.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    // SAFETY: F_ADD_SEALS on our own memfd, no memory involved.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap, MemoryRegionAddress};

    fn memfd(len: u64) -> File {
        // SAFETY: as in `sealed_memfd`.
        let fd = unsafe { libc::memfd_create(c"fault-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn regions_outside_their_file_are_refused() {
        let cases = [
            (16 << 20, 4096),
            (0, (1 << 20) + 1),
            (u64::MAX - 10, 4096),
            (0, 0),
        ];
        for (offset, size) in cases {
            let got = FrontendMapping::map(memfd(1 << 20), offset, size, None);
            assert!(
                matches!(got, Err(MapError::OutsideFile { .. })),
                "{offset} {size}"
            );
        }
        assert!(FrontendMapping::map(memfd(1 << 20), 4096, (1 << 20) - 4096, None).is_ok());
    }

    #[test]
    fn a_shrunk_file_reads_zeroes_and_poisons_the_mapping() {
        let file = memfd(64 << 10);
        let theirs = file.try_clone().unwrap();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut mem = FrontendMemory::default();
        let region = mem
            .map(file, 0, 64 << 10, 0x1000, Some(wake.clone()))
            .unwrap();
        region
            .write_obj(0xabu8, MemoryRegionAddress(0x9000))
            .unwrap();
        let gm = GuestMemoryMmap::from_arc_regions(vec![region]).unwrap();
        theirs.set_len(0).unwrap();
        let before = replaced_pages();
        let got: u8 = gm.read_obj(GuestAddress(0x1000 + 0x9000)).unwrap();
        assert_eq!(got, 0, "a replaced page reads zero");
        assert!(replaced_pages() > before);
        assert!(mem.regions().all(|m| m.poisoned()));
        assert_eq!(wake.read().unwrap(), 1, "the connection is woken");
        drop(gm);
        mem.release_unused();
        assert_eq!(mem.regions().count(), 0, "unmapped once unreferenced");
    }

    #[test]
    fn sealed_memfds_cannot_shrink() {
        let file = sealed_memfd(c"fault-test", 8192).unwrap();
        assert!(!can_shrink(&file));
        assert!(file.set_len(0).is_err());
        assert!(can_shrink(&memfd(4096)));
    }
}
