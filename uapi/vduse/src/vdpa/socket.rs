//! A `NETLINK_GENERIC` socket: the only `unsafe` of the vdpa module.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A bound generic netlink socket talking to the kernel.
#[derive(Debug)]
pub(crate) struct NetlinkSocket {
    fd: OwnedFd,
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is a plain C struct for which all-zero bytes are valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

impl NetlinkSocket {
    /// Opens and binds the socket; asks for extended acks (error text) when available.
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: plain syscall with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = kernel_addr();
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = NetlinkSocket { fd };
        // Best effort: older kernels lack these options, and they only add detail.
        sock.set_bool_opt(libc::NETLINK_EXT_ACK);
        sock.set_bool_opt(libc::NETLINK_CAP_ACK);
        Ok(sock)
    }

    fn set_bool_opt(&self, opt: libc::c_int) {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int for the duration of the call and its size is passed.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                opt,
                &one as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// Sends one request datagram to the kernel.
    pub(crate) fn send(&self, msg: &[u8]) -> io::Result<()> {
        let addr = kernel_addr();
        loop {
            // SAFETY: `msg` is valid for reads of msg.len() bytes; `addr` is a valid
            // sockaddr_nl of the given size.
            let ret = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr() as *const libc::c_void,
                    msg.len(),
                    0,
                    &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if ret >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives one datagram into `buf`, returning its length. Fails if it was truncated.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of buf.len() bytes. MSG_TRUNC makes the
            // kernel return the real datagram length while writing at most buf.len().
            let ret = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let len = ret as usize;
            if len > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("netlink reply of {len} bytes truncated to {}", buf.len()),
                ));
            }
            return Ok(len);
        }
    }
}
