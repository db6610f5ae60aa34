//! The daemon's doors (the control socket, the metrics endpoint) served to hostile clients.
//!
//! One thread runs one `poll(2)` loop over the listening socket and every connection, with
//! hard limits ([`Limits`]): a request longer than `max_request` is answered with a notice and
//! the connection closed; a connection that sends no complete request for `idle_timeout` is
//! closed; at most `max_clients` connections are kept. When a new client arrives and all are
//! taken, the connection that has been quiet the longest is closed to make room (a flood of
//! idle clients therefore cannot lock out an operator); only if every slot has a request in
//! progress is the newcomer refused.
//!
//! Why a poll loop rather than a thread per connection: an idle connection then costs one file
//! descriptor and a small struct, never a thread or a stack, and the number of threads is fixed
//! (the loop and `workers` handler threads) whatever clients do. Handlers run on the workers,
//! off the loop, because some are slow (removing a device completes its I/O and flushes); the
//! loop never blocks on a client: sockets are non-blocking and answers are written as the
//! client reads them. A connection has at most one request in a handler at a time, so at most
//! `max_clients` requests wait, and each connection buffers at most one request's bytes.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// Where one request ends in the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// Not yet: read more.
    Incomplete,
    /// The first `n` bytes are one request, terminator included.
    Complete(usize),
    /// Longer than the limit: answer [`Notice::TooLong`] and close.
    TooLong,
}

/// What the loop tells a client before closing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The request exceeded `max_request`.
    TooLong,
    /// No complete request within `idle_timeout`.
    TimedOut,
    /// Closed to make room for a new client (this one was quiet the longest).
    Evicted,
    /// Refused: every slot has a request in progress.
    Busy,
}

/// A handler's answer.
pub struct Reply {
    pub bytes: Vec<u8>,
    /// Close the connection once `bytes` are written.
    pub close: bool,
}

/// One protocol served through a door.
pub trait Protocol: Send + Sync + 'static {
    /// Where the first request in `buf` ends; requests longer than `max` are [`Framing::TooLong`].
    fn frame(&self, buf: &[u8], max: usize) -> Framing;
    /// Answer one request (its bytes as framed). Runs on a worker thread.
    fn handle(&self, request: &[u8]) -> Reply;
    /// The bytes sent before closing a connection for `notice`.
    fn notice(&self, notice: Notice, limits: &Limits) -> Vec<u8>;
}

/// The bounds of one door.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request, terminator excluded.
    pub max_request: usize,
    /// Connections kept at once.
    pub max_clients: usize,
    /// Time a connection may take to send a complete request (or to read its answer).
    pub idle_timeout: Duration,
    /// Handler threads.
    pub workers: usize,
}

/// A listening socket the loop can accept from.
pub trait Listen: AsFd + Send + 'static {
    type Stream: Read + Write + AsFd + Send + 'static;
    fn set_nonblocking(&self) -> std::io::Result<()>;
    /// Accept one connection, made non-blocking.
    fn accept_one(&self) -> std::io::Result<Self::Stream>;
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    fn set_nonblocking(&self) -> std::io::Result<()> {
        UnixListener::set_nonblocking(self, true)
    }
    /// Only root, the daemon's own user and members of the control group are admitted
    /// (`SO_PEERCRED`, `SO_PEERGROUPS`), whatever the socket's mode says; others are told why
    /// and closed at once.
    fn accept_one(&self) -> std::io::Result<UnixStream> {
        loop {
            let (mut stream, _) = self.accept()?;
            if !crate::confine::admit_control_peer(&mut stream)? {
                continue;
            }
            stream.set_nonblocking(true)?;
            return Ok(stream);
        }
    }
}

impl Listen for TcpListener {
    type Stream = std::net::TcpStream;
    fn set_nonblocking(&self) -> std::io::Result<()> {
        TcpListener::set_nonblocking(self, true)
    }
    fn accept_one(&self) -> std::io::Result<std::net::TcpStream> {
        let (stream, _) = self.accept()?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

/// A request ends at `\n` (line protocols).
pub fn frame_line(buf: &[u8], max: usize) -> Framing {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end <= max => Framing::Complete(end + 1),
        Some(_) => Framing::TooLong,
        None if buf.len() > max => Framing::TooLong,
        None => Framing::Incomplete,
    }
}

/// An HTTP request head ends at an empty line (`\r\n\r\n`, or `\n\n` from lax clients).
pub fn frame_http_head(buf: &[u8], max: usize) -> Framing {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match crlf.into_iter().chain(lf).min() {
        Some(end) if end <= max + 4 => Framing::Complete(end),
        Some(_) => Framing::TooLong,
        None if buf.len() > max => Framing::TooLong,
        None => Framing::Incomplete,
    }
}

/// Serve `listener` with `protocol` from a new thread named `name`, for the daemon's life.
pub fn spawn<L: Listen, P: Protocol>(
    name: &str,
    listener: L,
    protocol: P,
    limits: Limits,
) -> std::io::Result<()> {
    listener.set_nonblocking()?;
    let protocol = Arc::new(protocol);
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let (job_tx, job_rx) = channel::<(u64, Vec<u8>)>();
    let (done_tx, done_rx) = channel::<(u64, Reply)>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..limits.workers.max(1) {
        let (protocol, job_rx, done_tx) = (protocol.clone(), job_rx.clone(), done_tx.clone());
        let wake_tx = wake_tx.try_clone()?;
        std::thread::Builder::new()
            .name(format!("{name}-worker"))
            .spawn(move || {
                crate::confine::enter_service_thread();
                worker(&*protocol, &job_rx, &done_tx, &wake_tx)
            })?;
    }
    let mut door = Door {
        listener,
        protocol,
        limits,
        conns: Vec::new(),
        next_id: 0,
        jobs: job_tx,
        done: done_rx,
        wake: wake_rx,
        accept_paused_until: None,
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::confine::enter_service_thread();
            door.run()
        })?;
    Ok(())
}

fn worker<P: Protocol>(
    protocol: &P,
    jobs: &Mutex<Receiver<(u64, Vec<u8>)>>,
    done: &Sender<(u64, Reply)>,
    mut wake: &UnixStream,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((id, request)) = job else { return };
        // A panicking handler closes its connection, not the door.
        let reply = std::panic::catch_unwind(AssertUnwindSafe(|| protocol.handle(&request)))
            .unwrap_or(Reply {
                bytes: Vec::new(),
                close: true,
            });
        if done.send((id, reply)).is_err() {
            return;
        }
        // A full wake pipe already wakes the loop.
        let _ = wake.write(&[1]);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for (the rest of) a request.
    Reading,
    /// A worker has its request.
    Handling,
    /// Writing the answer.
    Writing,
}

struct Conn<S> {
    id: u64,
    stream: S,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Close once `output` is written.
    close_after: bool,
    /// The client shut its side: answer what is complete, then close.
    peer_closed: bool,
    /// Closed when reached (not while Handling).
    deadline: Instant,
    /// Last time the client sent a byte or finished reading an answer: eviction order.
    last_heard: Instant,
    /// Removed at the end of this round of the loop.
    closing: bool,
}

struct Door<L: Listen, P> {
    listener: L,
    protocol: Arc<P>,
    limits: Limits,
    conns: Vec<Conn<L::Stream>>,
    next_id: u64,
    jobs: Sender<(u64, Vec<u8>)>,
    done: Receiver<(u64, Reply)>,
    wake: UnixStream,
    /// After EMFILE and the like: the listener stays readable, so stop polling it a moment.
    accept_paused_until: Option<Instant>,
}

/// What became of a connection after some progress.
#[derive(PartialEq, Eq)]
enum Keep {
    Yes,
    Close,
}

impl<L: Listen, P: Protocol> Door<L, P> {
    fn run(&mut self) {
        loop {
            let now = Instant::now();
            self.expire(now);
            let ready = match self.wait(now) {
                Ok(ready) => ready,
                Err(err) => {
                    tracing::warn!(%err, "poll failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // Indices of `ready` match `self.conns` until connections are removed, at the end.
            for (index, events) in ready[2..].iter().enumerate() {
                if !events.is_empty() && self.progress(index, *events) == Keep::Close {
                    self.conns[index].closing = true;
                }
            }
            if !ready[1].is_empty() {
                self.collect_replies();
            }
            self.conns.retain(|c| !c.closing);
            if ready[0].intersects(PollFlags::IN) {
                self.accept_all();
            }
        }
    }

    /// Close every connection past its deadline, telling the ones that were reading why.
    fn expire(&mut self, now: Instant) {
        let (protocol, limits) = (&self.protocol, &self.limits);
        self.conns.retain_mut(|c| {
            if c.state == State::Handling || now < c.deadline {
                return true;
            }
            if c.state == State::Reading {
                let _ = c.stream.write(&protocol.notice(Notice::TimedOut, limits));
            }
            false
        });
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
    }

    /// poll(2) until something happens or the next deadline; readiness of the listener, the
    /// wake pipe, then each connection.
    fn wait(&self, now: Instant) -> std::io::Result<Vec<PollFlags>> {
        let next_deadline = self
            .conns
            .iter()
            .filter(|c| c.state != State::Handling)
            .map(|c| c.deadline)
            .chain(self.accept_paused_until)
            .min();
        let timeout = next_deadline
            .map(|d| Timespec::try_from(d.saturating_duration_since(now)).unwrap_or_default());
        let listen_events = if self.accept_paused_until.is_some() {
            PollFlags::empty()
        } else {
            PollFlags::IN
        };
        let mut fds = Vec::with_capacity(self.conns.len() + 2);
        fds.push(PollFd::new(&self.listener, listen_events));
        fds.push(PollFd::new(&self.wake, PollFlags::IN));
        for c in &self.conns {
            let events = match c.state {
                State::Reading => PollFlags::IN,
                State::Writing => PollFlags::OUT,
                State::Handling => PollFlags::empty(),
            };
            fds.push(PollFd::new(&c.stream, events));
        }
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) => Ok(fds.iter().map(PollFd::revents).collect()),
            Err(rustix::io::Errno::INTR) => Ok(vec![PollFlags::empty(); fds.len()]),
            Err(e) => Err(e.into()),
        }
    }

    fn collect_replies(&mut self) {
        let mut sink = [0u8; 64];
        while matches!(self.wake.read(&mut sink), Ok(n) if n > 0) {}
        while let Ok((id, reply)) = self.done.try_recv() {
            let Some(index) = self.conns.iter().position(|c| c.id == id) else {
                continue;
            };
            if self.conns[index].closing {
                continue;
            }
            self.start_reply(index, reply.bytes, reply.close);
            if self.flush(index) == Keep::Close {
                self.conns[index].closing = true;
            }
        }
    }

    /// The connection at `index` is ready for what its state waits for (or has hung up).
    fn progress(&mut self, index: usize, events: PollFlags) -> Keep {
        match self.conns[index].state {
            State::Reading => {
                if self.read_some(index) == Keep::Close {
                    return Keep::Close;
                }
                self.next_request(index)
            }
            State::Writing => self.flush(index),
            // poll(2) reports a hang-up even when asked for nothing: nobody to answer.
            State::Handling if events.intersects(PollFlags::HUP | PollFlags::ERR) => Keep::Close,
            State::Handling => Keep::Yes,
        }
    }

    /// Read what is there, never holding more than one request over the limit.
    fn read_some(&mut self, index: usize) -> Keep {
        let cap = self.limits.max_request + 8;
        let c = &mut self.conns[index];
        let mut chunk = [0u8; 4096];
        while c.input.len() <= cap {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    c.peer_closed = true;
                    break;
                }
                Ok(n) => {
                    c.input.extend_from_slice(&chunk[..n]);
                    c.last_heard = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Keep::Close,
            }
        }
        Keep::Yes
    }

    /// Hand the next complete request to a worker, or answer a too-long one.
    fn next_request(&mut self, index: usize) -> Keep {
        let c = &mut self.conns[index];
        match self.protocol.frame(&c.input, self.limits.max_request) {
            Framing::Complete(n) => {
                let request: Vec<u8> = c.input.drain(..n).collect();
                if c.input.is_empty() {
                    c.input = Vec::new(); // an idle connection holds no buffer
                }
                c.state = State::Handling;
                if self.jobs.send((c.id, request)).is_err() {
                    return Keep::Close;
                }
                Keep::Yes
            }
            Framing::TooLong => {
                c.input = Vec::new();
                let notice = self.protocol.notice(Notice::TooLong, &self.limits);
                self.start_reply(index, notice, true);
                self.flush(index)
            }
            Framing::Incomplete if c.peer_closed => Keep::Close,
            Framing::Incomplete => Keep::Yes,
        }
    }

    fn start_reply(&mut self, index: usize, bytes: Vec<u8>, close: bool) {
        let c = &mut self.conns[index];
        c.output = bytes;
        c.written = 0;
        c.close_after |= close;
        c.state = State::Writing;
        c.deadline = Instant::now() + self.limits.idle_timeout;
    }

    /// Write what the client takes; once the answer is out, read the next request.
    fn flush(&mut self, index: usize) -> Keep {
        let c = &mut self.conns[index];
        while c.written < c.output.len() {
            match c.stream.write(&c.output[c.written..]) {
                Ok(0) => return Keep::Close,
                Ok(n) => c.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Keep::Yes,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Keep::Close,
            }
        }
        if c.close_after {
            return Keep::Close;
        }
        c.output = Vec::new();
        c.state = State::Reading;
        c.last_heard = Instant::now();
        c.deadline = c.last_heard + self.limits.idle_timeout;
        // A pipelined request may already be here.
        self.next_request(index)
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept_one() {
                Ok(stream) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if is_transient(&e) => continue,
                Err(err) => {
                    // Out of file descriptors or memory: the listener stays readable, so
                    // pausing is what keeps this loop from spinning.
                    tracing::warn!(%err, "cannot accept a connection; pausing accepts for 100 ms");
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            };
            self.admit(stream);
        }
    }

    /// Keep a new connection, closing the quietest one if all slots are taken.
    fn admit(&mut self, mut stream: L::Stream) {
        if self.conns.len() >= self.limits.max_clients {
            let quietest = self
                .conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.state != State::Handling)
                .min_by_key(|(_, c)| c.last_heard)
                .map(|(i, _)| i);
            let Some(index) = quietest else {
                let _ = stream.write(&self.protocol.notice(Notice::Busy, &self.limits));
                return;
            };
            let mut evicted = self.conns.swap_remove(index);
            if evicted.state == State::Reading {
                let _ = evicted
                    .stream
                    .write(&self.protocol.notice(Notice::Evicted, &self.limits));
            }
        }
        let now = Instant::now();
        self.next_id += 1;
        self.conns.push(Conn {
            id: self.next_id,
            stream,
            state: State::Reading,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            close_after: false,
            peer_closed: false,
            deadline: now + self.limits.idle_timeout,
            last_heard: now,
            closing: false,
        });
    }
}

/// Accept errors about one connection (it went away first), not about the listener.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Interrupted | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) || e.raw_os_error() == Some(rustix::io::Errno::PROTO.raw_os_error())
}

#[cfg(test)]
mod tests;
