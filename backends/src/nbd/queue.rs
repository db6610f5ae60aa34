//! One queue's connection: requests written by the queue thread, replies read by a reader
//! thread, completions parked under a mutex and signalled on an eventfd.
//!
//! The reader thread also owns reconnecting: when the connection drops it keeps the pending
//! requests (each [`Pending`] holds its [`IoRequest`] and NBD command), connects again with
//! backoff, checks the export size, bumps the connection's generation and re-sends them all.
//! Bytes the queue thread encoded for an older generation are never written (see
//! [`Shared::send`]): the reconnect re-encoded those requests already.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::proto::{self, ExportInfo, Request};
use super::{NbdAddress, NbdError, NbdOptions, Stream};
use crate::{BackendQueue, Completion, IoRequest, Op, Result};

/// How long a synchronous FLUSH (shutdown, queue teardown) may wait for its reply.
const SYNC_FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// First pause between reconnect attempts; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between reconnect attempts (also the rate after the timeout).
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[path = "reconnect.rs"]
mod reconnect;
#[path = "replies.rs"]
pub(super) mod replies;

/// Who waits for an NBD request's reply.
#[derive(Debug, Clone, Copy)]
enum Owner {
    /// A part of the engine's request `id`.
    Request(u64),
    /// A synchronous FLUSH ([`Shared::flush_sync`]).
    Sync,
}

/// One NBD request on the wire.
#[derive(Debug, Clone, Copy)]
struct Part {
    owner: Owner,
    /// Where a READ's data goes in the request's buffers.
    buf_offset: usize,
    /// Payload length of a READ's reply, 0 for every other command.
    read_len: u32,
    /// Bytes of a READ covered by structured data and hole chunks so far.
    covered: u32,
}

/// An engine request split into one or more NBD requests; kept until its last reply, so it
/// can be re-sent on a new connection.
#[derive(Debug)]
struct Pending {
    req: IoRequest,
    tag: u32,
    cmd: u16,
    flags: u16,
    parts_left: usize,
    errno: i32,
    bytes: u32,
}

/// The state of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Link {
    /// Connected: requests are sent.
    #[default]
    Up,
    /// Lost, within the reconnect timeout: requests are kept and re-sent when it is back.
    Reconnecting,
    /// Lost past the timeout: requests fail with EIO at once until it is back.
    Failed,
}

#[derive(Debug, Default)]
struct State {
    parts: HashMap<u64, Part>,
    requests: HashMap<u64, Pending>,
    done: Vec<Completion>,
    /// Results of synchronous FLUSHes by cookie.
    sync_done: HashMap<u64, i32>,
    link: Link,
    /// Bumped at each reconnect: bytes encoded for an older connection are not sent.
    generation: u64,
}

impl State {
    /// Complete every pending request with EIO; returns how many.
    fn fail_pending(&mut self) -> usize {
        self.drop_parts();
        let n = self.requests.len();
        for (_, p) in self.requests.drain() {
            self.done
                .push(Completion::new(p.tag, Err(libc::EIO), p.req));
        }
        n
    }

    /// Forget the parts on the wire (the connection is gone); synchronous FLUSHes get EIO.
    fn drop_parts(&mut self) {
        for (cookie, part) in self.parts.drain() {
            if let Owner::Sync = part.owner {
                self.sync_done.insert(cookie, libc::EIO);
            }
        }
    }
}

/// Encode `req` as NBD requests (split at `max_len`) into `out`, with cookies from `cookies`;
/// returns their cookies and parts, or the errno to complete the request with.
fn encode(
    out: &mut Vec<u8>,
    req: &IoRequest,
    (cmd, flags): (u16, u16),
    id: u64,
    max_len: u64,
    cookies: &AtomicU64,
) -> std::result::Result<Vec<(u64, Part)>, i32> {
    let data = matches!(req.op, Op::Read | Op::Write);
    let total = if data {
        req.buffers.len() as u64
    } else {
        req.len
    };
    let start = out.len();
    let mut parts = Vec::with_capacity(1);
    let mut done = 0u64;
    loop {
        let len = (total - done).min(max_len);
        let cookie = cookies.fetch_add(1, Ordering::Relaxed);
        Request {
            flags,
            cmd,
            cookie,
            offset: req.offset + done,
            len: len as u32, // at most max_block
        }
        .encode(out);
        if cmd == proto::CMD_WRITE {
            let at = out.len();
            out.resize(at + len as usize, 0);
            if req
                .buffers
                .copy_to_slice(done as usize, &mut out[at..])
                .is_err()
            {
                out.truncate(start);
                return Err(libc::EFAULT);
            }
        }
        let read_len = if cmd == proto::CMD_READ {
            len as u32
        } else {
            0
        };
        parts.push((
            cookie,
            Part {
                owner: Owner::Request(id),
                buf_offset: done as usize,
                read_len,
                covered: 0,
            },
        ));
        done += len;
        if done >= total {
            return Ok(parts);
        }
    }
}

/// The connections of an export's queues.
pub(super) type Peers = Arc<Mutex<Vec<Weak<Shared>>>>;

/// What the queue thread, the reader thread and [`super::NbdBackend::flush`] share.
#[derive(Debug)]
pub(super) struct Shared {
    name: String,
    addr: NbdAddress,
    /// The export as first negotiated; a reconnect must find the same size.
    info: ExportInfo,
    reconnect_timeout: Duration,
    /// Largest payload of one NBD request, a multiple of 512.
    max_len: u64,
    state: Mutex<State>,
    cond: Condvar,
    event: EventFd,
    writer: Mutex<Stream>,
    next_cookie: AtomicU64,
    closing: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, Stream> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Whether the connection is lost past its reconnect timeout.
    fn link_failed(&self) -> bool {
        self.lock().link == Link::Failed
    }

    fn signal(&self) {
        let _ = self.event.write(1);
        self.cond.notify_all();
    }

    /// Write `bytes`, encoded for connection `generation`, if that connection is up; bytes
    /// for an older one are dropped (the reconnect re-sent their requests). A write error
    /// shuts the socket down, so the reader thread sees the loss and reconnects.
    fn send(&self, bytes: &[u8], generation: u64) {
        // Lock order: writer, then state. A reconnect holds the writer while it swaps the
        // socket and re-sends, so the generation cannot change under a write.
        let mut writer = self.lock_writer();
        {
            let st = self.lock();
            if st.link != Link::Up || st.generation != generation {
                return;
            }
        }
        if let Err(e) = writer.write_all(bytes) {
            tracing::debug!(export = %self.name, "NBD write failed: {e}");
            writer.shutdown();
        }
    }

    /// Send a FLUSH and wait for its reply.
    pub(super) fn flush_sync(&self) -> io::Result<()> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let mut msg = Vec::with_capacity(proto::REQUEST_LEN);
        Request {
            flags: 0,
            cmd: proto::CMD_FLUSH,
            cookie,
            offset: 0,
            len: 0,
        }
        .encode(&mut msg);
        loop {
            {
                // A reconnect in progress ends (link up, or failed) within its timeout.
                let mut st = self.lock();
                while st.link == Link::Reconnecting && !self.closing() {
                    st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            // Lock order: writer, then state (as in `send` and the reconnect).
            let mut writer = self.lock_writer();
            {
                let mut st = self.lock();
                match st.link {
                    Link::Up => {}
                    Link::Reconnecting if !self.closing() => continue, // lost again meanwhile
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "NBD connection lost",
                        ))
                    }
                }
                let part = Part {
                    owner: Owner::Sync,
                    buf_offset: 0,
                    read_len: 0,
                    covered: 0,
                };
                st.parts.insert(cookie, part);
            }
            if writer.write_all(&msg).is_err() {
                // The reader thread sees the loss and completes the FLUSH with EIO.
                writer.shutdown();
            }
            break;
        }
        let deadline = Instant::now() + SYNC_FLUSH_TIMEOUT;
        let mut st = self.lock();
        loop {
            if let Some(errno) = st.sync_done.remove(&cookie) {
                return match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                st.parts.remove(&cookie);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "NBD FLUSH timed out",
                ));
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The reader thread: read replies; when the connection drops, reconnect and go on,
    /// until the queue closes.
    fn run(&self, mut stream: Stream) {
        loop {
            let mut payload = Vec::new();
            let why = loop {
                if let Err(e) = self.read_reply(&mut stream, &mut payload) {
                    break e;
                }
            };
            drop(stream);
            if self.closing() {
                break;
            }
            self.on_lost(&why);
            match self.reconnect() {
                Some(s) => stream = s,
                None => break,
            }
        }
        let mut st = self.lock();
        st.fail_pending();
        drop(st);
        self.signal();
    }
}

/// The per-queue I/O context: one connection.
pub(super) struct NbdQueue {
    shared: Arc<Shared>,
    /// Every queue's connection to this export (this one's included), for a FLUSH when the
    /// server does not advertise multi-conn.
    peers: Peers,
    reader: Option<JoinHandle<()>>,
    info: ExportInfo,
    read_only: bool,
    /// Requests submitted, not yet written.
    out: Vec<u8>,
    /// The connection generation `out` was encoded for.
    out_generation: u64,
    next_id: u64,
    wrote: bool,
}

impl NbdQueue {
    pub(super) fn start(
        stream: Stream,
        addr: &NbdAddress,
        options: NbdOptions,
        info: ExportInfo,
        read_only: bool,
        depth: u32,
        peers: Peers,
    ) -> Result<Self> {
        let fail = |what: &str, e: io::Error| NbdError::Unusable {
            addr: addr.to_string(),
            reason: format!("{what}: {e}"),
        };
        let event = EventFd::new(EFD_NONBLOCK).map_err(|e| fail("eventfd", e))?;
        let reading = stream.try_clone().map_err(|e| fail("socket", e))?;
        let shared = Arc::new(Shared {
            name: addr.to_string(),
            addr: addr.clone(),
            info,
            reconnect_timeout: options.reconnect_timeout,
            max_len: u64::from(info.max_block) / crate::SECTOR_SIZE * crate::SECTOR_SIZE,
            state: Mutex::new(State {
                done: Vec::with_capacity(depth as usize),
                ..State::default()
            }),
            cond: Condvar::new(),
            event,
            writer: Mutex::new(stream),
            next_cookie: AtomicU64::new(1),
            closing: AtomicBool::new(false),
        });
        let for_reader = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || for_reader.run(reading))
            .map_err(|e| fail("reader thread", e))?;
        Ok(Self {
            shared,
            peers,
            reader: Some(reader),
            info,
            read_only,
            out: Vec::new(),
            out_generation: 0,
            next_id: 0,
            wrote: false,
        })
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Without multi-conn a FLUSH covers only the writes of its own connection: flush the
    /// other queues' connections first (synchronously; a connection that is reconnecting is
    /// waited for, within its reconnect timeout).
    fn flush_peers(&self) -> io::Result<()> {
        let others: Vec<Arc<Shared>> = {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|c| !Arc::ptr_eq(c, &self.shared))
                .collect()
        };
        for peer in others {
            let mut tries = 0;
            // A FLUSH lost with its connection is sent again once the connection is back.
            while let Err(e) = peer.flush_sync() {
                tries += 1;
                if tries == 3 || peer.link_failed() {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The NBD command and flags for `op`, or the errno to complete it with at once
    /// (`Ok(None)`: complete successfully without asking the server).
    fn command(&self, op: Op) -> std::result::Result<Option<(u16, u16)>, i32> {
        let writes = !matches!(op, Op::Read | Op::Flush);
        if writes && self.read_only {
            return Err(libc::EROFS);
        }
        let has = |flag| self.info.has(flag);
        Ok(Some(match op {
            // Don't fragment: a server that splits a READ into data and holes looks up the
            // allocation of the range first (an lseek per READ for qemu-nbd on a raw file),
            // which costs more at QD1 than the zeroes it saves on the wire.
            Op::Read if self.info.structured && has(proto::TFLAG_SEND_DF) => {
                (proto::CMD_READ, proto::CMD_FLAG_DF)
            }
            Op::Read => (proto::CMD_READ, 0),
            Op::Write => (proto::CMD_WRITE, 0),
            // Without SEND_FLUSH the server gives no way to ask: durability is the server's.
            Op::Flush if !has(proto::TFLAG_SEND_FLUSH) => return Ok(None),
            Op::Flush => (proto::CMD_FLUSH, 0),
            Op::Discard if has(proto::TFLAG_SEND_TRIM) => (proto::CMD_TRIM, 0),
            Op::WriteZeroes { unmap } if has(proto::TFLAG_SEND_WRITE_ZEROES) => {
                let flags = if unmap { 0 } else { proto::CMD_FLAG_NO_HOLE };
                (proto::CMD_WRITE_ZEROES, flags)
            }
            Op::Discard | Op::WriteZeroes { .. } => return Err(libc::EOPNOTSUPP),
        }))
    }

    fn complete_now(&self, req: IoRequest, tag: u32, result: std::result::Result<u32, i32>) {
        self.shared
            .lock()
            .done
            .push(Completion::new(tag, result, req));
        self.shared.signal();
    }
}

impl BackendQueue for NbdQueue {
    fn submit(&mut self, req: IoRequest, tag: u32) -> Result<()> {
        let command = match self.command(req.op) {
            Ok(Some(c))
                if c.0 == proto::CMD_FLUSH && !self.info.has(proto::TFLAG_CAN_MULTI_CONN) =>
            {
                if let Err(e) = self.flush_peers() {
                    tracing::error!(export = %self.shared.name, "NBD FLUSH on another queue's connection failed: {e}");
                    self.complete_now(req, tag, Err(libc::EIO));
                    return Ok(());
                }
                c
            }
            Ok(Some(c)) => c,
            Ok(None) => {
                self.complete_now(req, tag, Ok(0));
                return Ok(());
            }
            Err(errno) => {
                self.complete_now(req, tag, Err(errno));
                return Ok(());
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let start = self.out.len();
        let shared = &self.shared;
        let parts = match encode(
            &mut self.out,
            &req,
            command,
            id,
            shared.max_len,
            &shared.next_cookie,
        ) {
            Ok(parts) => parts,
            Err(errno) => {
                self.complete_now(req, tag, Err(errno));
                return Ok(());
            }
        };
        let bytes = if matches!(req.op, Op::Read | Op::Write) {
            req.buffers.len() as u32
        } else {
            0
        };
        let mut st = self.shared.lock();
        if st.link == Link::Failed {
            drop(st);
            self.out.truncate(start);
            self.complete_now(req, tag, Err(libc::EIO));
            return Ok(());
        }
        if st.generation != self.out_generation {
            // A reconnect re-sent the requests encoded before this one.
            self.out.drain(..start);
            self.out_generation = st.generation;
        }
        // While reconnecting the request just waits in `requests`: the reconnect sends it.
        self.wrote |= command.0 != proto::CMD_READ;
        let parts_left = parts.len();
        st.parts.extend(parts);
        let pending = Pending {
            req,
            tag,
            cmd: command.0,
            flags: command.1,
            parts_left,
            errno: 0,
            bytes,
        };
        st.requests.insert(id, pending);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            // A failed write leaves the requests pending for the reconnect.
            self.shared.send(&self.out, self.out_generation);
            self.out.clear();
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.event.as_raw_fd())
    }

    fn ack_completion_event(&mut self) {
        let _ = self.shared.event.read();
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.shared.lock().done);
    }

    fn wait(&mut self) -> Result<()> {
        let mut st = self.shared.lock();
        while st.done.is_empty() && !st.requests.is_empty() {
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        let _ = self.commit();
        let up = self.shared.lock().link == Link::Up;
        if self.wrote && self.info.has(proto::TFLAG_SEND_FLUSH) && up {
            if let Err(e) = self.shared.flush_sync() {
                tracing::error!(export = %self.shared.name, "NBD FLUSH at queue teardown failed: {e}");
            }
        }
        let generation = {
            let st = self.shared.lock();
            self.shared.closing.store(true, Ordering::Release);
            st.generation
        };
        self.shared.cond.notify_all();
        let mut msg = Vec::with_capacity(proto::REQUEST_LEN);
        Request {
            flags: 0,
            cmd: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode(&mut msg);
        self.shared.send(&msg, generation);
        self.shared.lock_writer().shutdown();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
