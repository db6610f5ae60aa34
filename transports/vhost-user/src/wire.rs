//! Whole vhost-user messages for the `vhost` crate's request handler.
//!
//! The socket is a byte stream: a frontend may write one message's header and payload in
//! several pieces, and that is a valid stream. The `vhost` crate (0.18) reads the payload with
//! a single `recvmsg` and closes the connection when it comes back short. So the frontend's
//! socket is read here, message by message (header, then exactly the payload it announces,
//! each completed over as many reads as it takes), and each whole message is passed on over a
//! private socket pair in one `sendmsg`, with the file descriptors that came with it; the
//! handler reads it from the other end in one piece. Its replies (with any descriptors) are
//! passed back the same way. Control messages only: the data path never crosses this.
//!
//! While waiting for the frontend, the reader also watches the connection's poison eventfd
//! (`fault.rs`): a frontend that shrank its memory is cut off at once.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes of a vhost-user header: request, flags, payload size (u32 each).
const HEADER: usize = 12;
const TOKEN_SOCKET: u64 = 0;
const TOKEN_WAKE: u64 = 1;

/// Why no message was passed on.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frontend closed the connection between messages.
    #[error("the frontend disconnected")]
    Disconnected,
    /// The frontend closed the connection in the middle of a message.
    #[error("the frontend disconnected in the middle of a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// The header announces more payload than any message has.
    #[error("message payload of {0} bytes (at most {MAX_MSG_SIZE})")]
    Oversized(usize),
    /// The frontend shrank memory it had shared with us.
    #[error("the frontend shrank the memory it shared")]
    MemoryShrunk,
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The relay between a frontend's socket and the request handler's end of a socket pair.
pub struct Wire {
    frontend: UnixStream,
    handler: UnixStream,
    epoll: Epoll,
    wake: Arc<EventFd>,
    /// A duplicate of the socket a `SET_BACKEND_REQ_FD` carried (`backend_channel.rs`).
    backend_channel: Option<UnixStream>,
}

fn sys(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl Wire {
    /// A relay for `frontend`; returns the stream to give the `vhost` request handler.
    pub fn new(frontend: UnixStream, wake: Arc<EventFd>) -> io::Result<(Self, UnixStream)> {
        let (handler, theirs) = UnixStream::pair()?;
        handler.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (frontend.as_raw_fd(), TOKEN_SOCKET),
            (wake.as_raw_fd(), TOKEN_WAKE),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let wire = Self {
            frontend,
            handler,
            epoll,
            wake,
            backend_channel: None,
        };
        Ok((wire, theirs))
    }

    /// Wait for the next whole message from the frontend and pass it to the handler.
    pub fn forward_request(&mut self) -> Result<(), WireError> {
        let mut msg = vec![0u8; HEADER];
        let mut files = Vec::new();
        let got = self.read_full(&mut msg, &mut files)?;
        if got == 0 {
            return Err(WireError::Disconnected);
        }
        if got < HEADER {
            return Err(WireError::Truncated { got, want: HEADER });
        }
        let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
        if size > MAX_MSG_SIZE {
            return Err(WireError::Oversized(size));
        }
        msg.resize(HEADER + size, 0);
        let got = self.read_full(&mut msg[HEADER..], &mut files)?;
        if got < size {
            return Err(WireError::Truncated {
                got: HEADER + got,
                want: HEADER + size,
            });
        }
        let request = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        if request == crate::backend_channel::SET_BACKEND_REQ_FD && files.len() == 1 {
            self.backend_channel = files[0]
                .try_clone()
                .ok()
                .map(|f| UnixStream::from(std::os::fd::OwnedFd::from(f)));
        }
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        // One sendmsg of at most a page and a header to an empty socket pair: one piece.
        let sent = self.handler.send_with_fds(&[&msg[..]], &fds).map_err(sys)?;
        if sent != msg.len() {
            return Err(io::Error::other("short write to the request handler").into());
        }
        Ok(())
    }

    /// The backend channel the last message handed over, if it was `SET_BACKEND_REQ_FD`.
    pub fn take_backend_channel(&mut self) -> Option<UnixStream> {
        self.backend_channel.take()
    }

    /// Pass whatever the handler wrote (its replies) to the frontend.
    pub fn forward_replies(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; HEADER + MAX_MSG_SIZE];
        loop {
            let mut files = Vec::new();
            let n = match recv_with_files(&self.handler, &mut buf, &mut files) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
            let mut done = 0;
            while done < n {
                let with = if done == 0 { &fds[..] } else { &[] };
                match self.frontend.send_with_fds(&[&buf[done..n]], with) {
                    Ok(sent) => done += sent,
                    Err(e) if e.errno() == libc::EINTR => {}
                    Err(e) => return Err(sys(e)),
                }
            }
        }
    }

    /// Fill `buf` from the frontend (fewer bytes only if it disconnects), collecting the file
    /// descriptors that come along. Returns the bytes read.
    fn read_full(&mut self, buf: &mut [u8], files: &mut Vec<File>) -> Result<usize, WireError> {
        let mut got = 0;
        while got < buf.len() {
            self.wait_readable()?;
            match recv_with_files(&self.frontend, &mut buf[got..], files) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(got)
    }

    /// Block until the frontend's socket is readable; fail if the memory was poisoned.
    fn wait_readable(&self) -> Result<(), WireError> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if events[..n].iter().any(|e| e.data() == TOKEN_WAKE) {
                let _ = self.wake.read();
                return Err(WireError::MemoryShrunk);
            }
            if n > 0 {
                return Ok(());
            }
        }
    }
}

/// One `recvmsg` into `buf`; descriptors received are appended to `files`.
fn recv_with_files(sock: &UnixStream, buf: &mut [u8], files: &mut Vec<File>) -> io::Result<usize> {
    let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, which is ours and may hold any bytes.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }.map_err(sys)?;
    for &fd in &fds[..nfds] {
        // SAFETY: the kernel just installed `fd` in our table for us; nobody else owns it.
        files.push(unsafe { File::from_raw_fd(fd) });
    }
    Ok(n)
}
