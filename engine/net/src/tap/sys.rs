//! The tap ioctls (`TUNSETIFF`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`): the only `unsafe` of this crate.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `IFNAMSIZ`: an interface name has at most 15 bytes and its NUL.
pub(crate) const IFNAMSIZ: usize = 16;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and `ifr_flags`, padded to the size of
/// the union (24 bytes on 64-bit Linux; the kernel copies `sizeof(struct ifreq)`).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() >= std::mem::size_of::<libc::ifreq>());

/// `TUNSETIFF` on a fresh `/dev/net/tun` fd: create the tap `name` (at most 15 bytes, checked
/// by the caller), or attach to the existing one, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
pub(crate) fn set_iff_tap(tun: &File, name: &str) -> io::Result<()> {
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `tun` is an open fd of /dev/net/tun; TUNSETIFF reads (and may write back) one
    // `struct ifreq`, and `req` is a live, writable, NUL-terminated buffer at least that large
    // for the duration of the call. No memory is retained by the kernel after it returns.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETVNETHDRSZ`: the size of the virtio-net header before each frame read or written.
pub(crate) fn set_vnet_hdr_size(tun: &File, size: libc::c_int) -> io::Result<()> {
    // SAFETY: `tun` is an attached tap fd; TUNSETVNETHDRSZ reads one `int` through the
    // pointer, which points to `size`, alive for the call; nothing is written back.
    let ret = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the frames read from the tap may use.
pub(crate) fn set_offload(tun: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: `tun` is an attached tap fd; TUNSETOFFLOAD takes its argument by value (an
    // unsigned long of flags), no memory is passed.
    let ret = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
