//! The only `unsafe` of this crate's VDUSE layer: `ioctl(2)` and `fcntl(2)` wrappers,
//! each with the reason it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::sys;

/// Marker for the `#[repr(C)]` plain-old-data argument structs of VDUSE ioctls: every bit
/// pattern is a valid value and the type has no pointers or drop glue.
///
/// # Safety
/// Implement only for `#[repr(C)]` types made of integers (and unions of them).
pub(crate) unsafe trait IoctlArg: Copy {}

// SAFETY: all of these are #[repr(C)] structs/unions of integers only.
unsafe impl IoctlArg for u32 {}
// SAFETY: see above.
unsafe impl IoctlArg for u64 {}
// SAFETY: see above.
unsafe impl IoctlArg for sys::vduse_iotlb_entry {}
// SAFETY: see above.
unsafe impl IoctlArg for sys::vduse_vq_config {}
// SAFETY: see above.
unsafe impl IoctlArg for sys::vduse_vq_info {}
// SAFETY: see above.
unsafe impl IoctlArg for sys::vduse_vq_eventfd {}
// SAFETY: see above.
unsafe impl IoctlArg for [u8; sys::VDUSE_NAME_MAX] {}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl that takes no argument.
pub(crate) fn ioctl_none(fd: &impl AsRawFd, req: u64) -> io::Result<libc::c_int> {
    // SAFETY: the request takes no argument, so the kernel touches no memory of ours.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _) })
}

/// An ioctl whose argument the kernel only reads (`_IOW`).
pub(crate) fn ioctl_in<T: IoctlArg>(
    fd: &impl AsRawFd,
    req: u64,
    arg: &T,
) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a valid, initialised T for the duration of the call and the request's
    // encoded size is size_of::<T>() (checked in sys by the layout asserts), so the kernel
    // reads only inside it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *const T) })
}

/// An ioctl whose argument the kernel reads and/or writes (`_IOR`, `_IOWR`).
pub(crate) fn ioctl_inout<T: IoctlArg>(
    fd: &impl AsRawFd,
    req: u64,
    arg: &mut T,
) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a valid, exclusively borrowed T; the kernel writes at most
    // size_of::<T>() bytes (the request's encoded size), and any bit pattern is a valid T
    // (IoctlArg contract).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) })
}

/// An ioctl whose argument is a header followed by a flexible array (`CREATE_DEV`,
/// `SET_CONFIG`), passed as one byte buffer the kernel only reads.
pub(crate) fn ioctl_in_bytes(fd: &impl AsRawFd, req: u64, buf: &[u8]) -> io::Result<libc::c_int> {
    // SAFETY: `buf` is valid for reads of buf.len() bytes, which the caller sized as the
    // header plus the length the header announces; the kernel only copies from it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, buf.as_ptr()) })
}

/// `VDUSE_IOTLB_GET_FD`: on success the return value is a new fd that we now own.
pub(crate) fn iotlb_get_fd(
    fd: &impl AsRawFd,
    entry: &mut sys::vduse_iotlb_entry,
) -> io::Result<OwnedFd> {
    let raw = ioctl_inout(fd, sys::VDUSE_IOTLB_GET_FD, entry)?;
    // SAFETY: a successful VDUSE_IOTLB_GET_FD installs a fresh descriptor in our table and
    // returns it; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Reads both interpretations of the split/packed state union.
pub(crate) fn vq_state_union(
    state: &sys::vduse_vq_state_union,
) -> (sys::vduse_vq_state_split, sys::vduse_vq_state_packed) {
    // SAFETY: both union members are plain u16 structs valid for any bit pattern, and the
    // union is always fully initialised (Default initialises the larger member).
    unsafe { (state.split, state.packed) }
}

/// Sets or clears `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: &impl AsRawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor the caller keeps open; no memory is passed.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let flags = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above, F_SETFL with an integer argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) })?;
    Ok(())
}

/// The system page size (a power of two).
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory side effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}
