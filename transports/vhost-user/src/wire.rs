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
//! One message is answered here instead: QEMU's virtio-net enables its rings
//! (`SET_VRING_ENABLE`) when the device is realized, before `SET_FEATURES`, which the `vhost`
//! crate refuses (protocol features not acked yet) by closing the connection, and does not
//! enable them again when it starts the device. Such an early enable is acknowledged here,
//! kept, and passed on to the handler right after the `SET_FEATURES` that acks the protocol
//! features.
//!
//! While waiting for the frontend, the reader also watches the connection's poison eventfd
//! (`fault.rs`): a frontend that shrank its memory is cut off at once.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
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
/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_F_PROTOCOL_FEATURES`, a bit of `SET_FEATURES`.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Header flags: protocol version 1, a reply, the frontend wants a reply.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const TOKEN_WAKE: u64 = 1;
const TOKEN_HANDOVER: u64 = 2;

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
    /// A handover was asked for, and the socket is between two messages with nothing
    /// received (no message half-read).
    #[error("a handover of the connection was asked for")]
    Handover,
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
    /// The last `SET_FEATURES` acked `VHOST_USER_F_PROTOCOL_FEATURES`.
    protocol_acked: bool,
    /// Payloads of the `SET_VRING_ENABLE`s that came before that (the last per ring).
    early_enables: Vec<[u8; 8]>,
    /// Messages to pass to the handler before reading the frontend again.
    pending: VecDeque<Vec<u8>>,
    /// A duplicate of the socket a `SET_BACKEND_REQ_FD` carried (`backend_channel.rs`).
    backend_channel: Option<UnixStream>,
    /// Written to ask for a handover (`handover.rs`).
    handover: Option<Arc<EventFd>>,
    /// A handover was asked for: stop at the next message boundary with nothing received.
    handover_asked: bool,
}

/// What the relay itself remembers of a connection (handed over with it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireState {
    /// The last `SET_FEATURES` acked `VHOST_USER_F_PROTOCOL_FEATURES`.
    pub protocol_acked: bool,
    /// `SET_VRING_ENABLE`s received before that and not passed on yet: (ring, enable).
    pub early_enables: Vec<(u32, u32)>,
}

fn sys(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl Wire {
    /// A relay for `frontend`; returns the stream to give the `vhost` request handler.
    /// A write to `handover` asks the relay to stop between two messages
    /// ([`WireError::Handover`]).
    pub fn new(
        frontend: UnixStream,
        wake: Arc<EventFd>,
        handover: Option<Arc<EventFd>>,
    ) -> io::Result<(Self, UnixStream)> {
        let (handler, theirs) = UnixStream::pair()?;
        handler.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let handover_fd = handover.as_ref().map(|h| (h.as_raw_fd(), TOKEN_HANDOVER));
        for (fd, token) in [
            (frontend.as_raw_fd(), TOKEN_SOCKET),
            (wake.as_raw_fd(), TOKEN_WAKE),
        ]
        .into_iter()
        .chain(handover_fd)
        {
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
            protocol_acked: false,
            early_enables: Vec::new(),
            pending: VecDeque::new(),
            backend_channel: None,
            handover,
            handover_asked: false,
        };
        Ok((wire, theirs))
    }

    /// The frontend's socket.
    pub fn frontend(&self) -> &UnixStream {
        &self.frontend
    }

    /// What the relay remembers, to hand over (only between messages: nothing is pending).
    pub fn state(&self) -> WireState {
        let word =
            |p: &[u8; 8], at: usize| u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        WireState {
            protocol_acked: self.protocol_acked,
            early_enables: self
                .early_enables
                .iter()
                .map(|p| (word(p, 0), word(p, 4)))
                .collect(),
        }
    }

    /// Take over what another process's relay remembered.
    pub fn restore(&mut self, state: &WireState) {
        self.protocol_acked = state.protocol_acked;
        self.early_enables = state
            .early_enables
            .iter()
            .map(|&(ring, on)| {
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&ring.to_le_bytes());
                p[4..].copy_from_slice(&on.to_le_bytes());
                p
            })
            .collect();
    }

    /// Pass a message of our own to the handler (`request`, `payload`; no reply asked):
    /// how a handover brings the `vhost` crate's handler to the state of the connection.
    pub fn inject(&self, request: u32, payload: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(HEADER + payload.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&VERSION_1.to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        self.send_to_handler(&msg, &[]).map_err(|e| match e {
            WireError::Io(e) => e,
            e => io::Error::other(e.to_string()),
        })
    }

    /// Drop whatever the handler replied (to messages of [`Self::inject`]).
    pub fn discard_replies(&self) {
        let mut buf = vec![0u8; HEADER + MAX_MSG_SIZE];
        loop {
            let mut files = Vec::new();
            match recv_with_files(&self.handler, &mut buf, &mut files) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Wait for the next whole message from the frontend and pass it to the handler; false
    /// when it was answered here instead (an early `SET_VRING_ENABLE`): the handler has
    /// nothing to read.
    pub fn forward_request(&mut self) -> Result<bool, WireError> {
        if let Some(msg) = self.pending.pop_front() {
            self.send_to_handler(&msg, &[])?;
            return Ok(true);
        }
        self.wait_readable(true)?;
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
        let flags = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
        tracing::trace!(request, flags, size, "vhost-user message");
        if request == SET_FEATURES && size == 8 {
            let features = u64::from_le_bytes(msg[HEADER..].try_into().unwrap_or_default());
            self.protocol_acked = features & F_PROTOCOL_FEATURES != 0;
            if self.protocol_acked {
                for payload in self.early_enables.drain(..) {
                    let mut enable = Vec::with_capacity(HEADER + 8);
                    enable.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                    enable.extend_from_slice(&VERSION_1.to_le_bytes());
                    enable.extend_from_slice(&8u32.to_le_bytes());
                    enable.extend_from_slice(&payload);
                    self.pending.push_back(enable);
                }
            }
        }
        if request == SET_VRING_ENABLE && !self.protocol_acked && size == 8 {
            tracing::debug!("SET_VRING_ENABLE before SET_FEATURES: kept for after it");
            let payload: [u8; 8] = msg[HEADER..].try_into().unwrap_or_default();
            self.early_enables.retain(|p| p[..4] != payload[..4]);
            self.early_enables.push(payload);
            if flags & NEED_REPLY != 0 {
                let mut reply = Vec::with_capacity(HEADER + 8);
                reply.extend_from_slice(&request.to_le_bytes());
                reply.extend_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                (&self.frontend).write_all(&reply)?;
            }
            return Ok(false);
        }
        if request == crate::backend_channel::SET_BACKEND_REQ_FD && files.len() == 1 {
            self.backend_channel = files[0]
                .try_clone()
                .ok()
                .map(|f| UnixStream::from(std::os::fd::OwnedFd::from(f)));
        }
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        self.send_to_handler(&msg, &fds)?;
        Ok(true)
    }

    /// Pass one whole message (and its descriptors) to the handler.
    fn send_to_handler(&self, msg: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
        // One sendmsg of at most a page and a header to an empty socket pair: one piece.
        let sent = self.handler.send_with_fds(&[msg], fds).map_err(sys)?;
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
            self.wait_readable(false)?;
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

    /// Block until the frontend's socket is readable; fail if the memory was poisoned. At a
    /// message `boundary` (nothing of the next message received), a handover that was asked
    /// for ends the wait if the socket has nothing to read right now.
    fn wait_readable(&mut self, boundary: bool) -> Result<(), WireError> {
        let mut events = [EpollEvent::default(); 3];
        loop {
            let handover_due = boundary && self.handover_asked;
            let timeout = if handover_due { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let events = &events[..n];
            if events.iter().any(|e| e.data() == TOKEN_WAKE) {
                let _ = self.wake.read();
                return Err(WireError::MemoryShrunk);
            }
            if events.iter().any(|e| e.data() == TOKEN_HANDOVER) {
                // Remembered, and honoured only between messages (never mid-message).
                if let Some(h) = self.handover.as_ref() {
                    let _ = h.read();
                }
                self.handover_asked = true;
            }
            if events.iter().any(|e| e.data() == TOKEN_SOCKET) {
                return Ok(());
            }
            if handover_due && n == 0 {
                self.handover_asked = false;
                return Err(WireError::Handover);
            }
        }
    }
}

/// One `recvmsg` into `buf`; descriptors received are appended to `files`.
pub(crate) fn recv_with_files(
    sock: &UnixStream,
    buf: &mut [u8],
    files: &mut Vec<File>,
) -> io::Result<usize> {
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

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn enable(index: u32, on: u32) -> Vec<u8> {
        [index.to_le_bytes(), on.to_le_bytes()].concat()
    }

    fn read_exact(s: &mut UnixStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn an_enable_before_set_features_is_acked_and_passed_on_after_it() {
        let (mut qemu, ours) = UnixStream::pair().unwrap();
        let (mut wire, mut handler) =
            Wire::new(ours, Arc::new(EventFd::new(0).unwrap()), None).unwrap();
        handler.set_nonblocking(true).unwrap();
        // Two early enables (ring 0 twice: the last counts), one wanting a reply.
        qemu.write_all(&message(
            SET_VRING_ENABLE,
            VERSION_1 | NEED_REPLY,
            &enable(0, 0),
        ))
        .unwrap();
        assert!(!wire.forward_request().unwrap(), "answered by the wire");
        let ack = message(SET_VRING_ENABLE, VERSION_1 | REPLY, &0u64.to_le_bytes());
        assert_eq!(read_exact(&mut qemu, ack.len()), ack);
        qemu.write_all(&message(SET_VRING_ENABLE, VERSION_1, &enable(1, 1)))
            .unwrap();
        assert!(!wire.forward_request().unwrap());
        qemu.write_all(&message(SET_VRING_ENABLE, VERSION_1, &enable(0, 1)))
            .unwrap();
        assert!(!wire.forward_request().unwrap());
        let mut none = [0u8; 1];
        assert!(
            handler.read(&mut none).is_err(),
            "nothing reached the handler"
        );
        // SET_FEATURES with the protocol features, then the kept enables, in order.
        let features = message(SET_FEATURES, VERSION_1, &F_PROTOCOL_FEATURES.to_le_bytes());
        qemu.write_all(&features).unwrap();
        assert!(wire.forward_request().unwrap());
        assert_eq!(read_exact(&mut handler, features.len()), features);
        for ring in [1, 0] {
            assert!(wire.forward_request().unwrap());
            let want = message(SET_VRING_ENABLE, VERSION_1, &enable(ring, 1));
            assert_eq!(read_exact(&mut handler, want.len()), want);
        }
        // From now on enables go to the handler as they come.
        let late = message(SET_VRING_ENABLE, VERSION_1 | NEED_REPLY, &enable(0, 0));
        qemu.write_all(&late).unwrap();
        assert!(wire.forward_request().unwrap());
        assert_eq!(read_exact(&mut handler, late.len()), late);
    }

    #[test]
    fn early_enables_are_handed_over_with_the_relay_state() {
        let (mut qemu, ours) = UnixStream::pair().unwrap();
        let (mut wire, _handler) =
            Wire::new(ours, Arc::new(EventFd::new(0).unwrap()), None).unwrap();
        qemu.write_all(&message(SET_VRING_ENABLE, VERSION_1, &enable(1, 1)))
            .unwrap();
        assert!(!wire.forward_request().unwrap());
        let state = wire.state();
        assert_eq!(
            state,
            WireState {
                protocol_acked: false,
                early_enables: vec![(1, 1)],
            }
        );
        // Another process's relay (here over a fresh pair) passes the kept enable on after
        // the SET_FEATURES that acks the protocol features.
        let (mut qemu, ours) = UnixStream::pair().unwrap();
        let (mut wire, mut handler) =
            Wire::new(ours, Arc::new(EventFd::new(0).unwrap()), None).unwrap();
        wire.restore(&state);
        assert_eq!(wire.state(), state);
        let features = message(SET_FEATURES, VERSION_1, &F_PROTOCOL_FEATURES.to_le_bytes());
        qemu.write_all(&features).unwrap();
        assert!(wire.forward_request().unwrap());
        assert_eq!(read_exact(&mut handler, features.len()), features);
        assert!(wire.forward_request().unwrap());
        let want = message(SET_VRING_ENABLE, VERSION_1, &enable(1, 1));
        assert_eq!(read_exact(&mut handler, want.len()), want);
    }
}
