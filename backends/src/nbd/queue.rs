//! One queue's connection: requests written by the queue thread, replies read by a reader
//! thread, completions parked under a mutex and signalled on an eventfd.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::proto::{self, ExportInfo, Reply, Request};
use super::{NbdAddress, NbdError, Stream};
use crate::{BackendQueue, Completion, IoRequest, Op, Result};

/// How long a synchronous FLUSH (shutdown, queue teardown) may wait for its reply.
const SYNC_FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

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
}

/// An engine request split into one or more NBD requests.
#[derive(Debug)]
struct Pending {
    req: IoRequest,
    tag: u32,
    parts_left: usize,
    errno: i32,
    bytes: u32,
}

#[derive(Debug, Default)]
struct State {
    parts: HashMap<u64, Part>,
    requests: HashMap<u64, Pending>,
    done: Vec<Completion>,
    /// Results of synchronous FLUSHes by cookie.
    sync_done: HashMap<u64, i32>,
    /// The connection is lost: everything fails with EIO.
    broken: bool,
}

/// What the queue thread, the reader thread and [`super::NbdBackend::flush`] share.
#[derive(Debug)]
pub(super) struct Shared {
    name: String,
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

    fn cookie(&self) -> u64 {
        self.next_cookie.fetch_add(1, Ordering::Relaxed)
    }

    fn signal(&self) {
        let _ = self.event.write(1);
        self.cond.notify_all();
    }

    /// Write whole messages; on error the connection is given up.
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let sent = writer.write_all(bytes);
        if let Err(e) = &sent {
            writer.shutdown();
            drop(writer);
            self.fail_all(&format!("write failed: {e}"));
        }
        sent
    }

    /// The connection is lost: complete everything in flight with EIO.
    fn fail_all(&self, why: &str) {
        let mut st = self.lock();
        if !st.broken && !self.closing.load(Ordering::Acquire) {
            // TODO(next slice): reconnect with a timeout instead of failing.
            tracing::error!(export = %self.name, "NBD connection lost ({why}): requests fail with EIO");
        }
        st.broken = true;
        st.parts.clear();
        let pending: Vec<Pending> = st.requests.drain().map(|(_, p)| p).collect();
        for p in pending {
            st.done.push(Completion::new(p.tag, Err(libc::EIO), p.req));
        }
        drop(st);
        self.signal();
    }

    /// Send a FLUSH and wait for its reply.
    pub(super) fn flush_sync(&self) -> io::Result<()> {
        let cookie = self.cookie();
        let lost = || io::Error::new(io::ErrorKind::BrokenPipe, "NBD connection lost");
        {
            let mut st = self.lock();
            if st.broken {
                return Err(lost());
            }
            let part = Part {
                owner: Owner::Sync,
                buf_offset: 0,
                read_len: 0,
            };
            st.parts.insert(cookie, part);
        }
        let mut msg = Vec::with_capacity(proto::REQUEST_LEN);
        Request {
            flags: 0,
            cmd: proto::CMD_FLUSH,
            cookie,
            offset: 0,
            len: 0,
        }
        .encode(&mut msg);
        self.send(&msg)?;
        let deadline = Instant::now() + SYNC_FLUSH_TIMEOUT;
        let mut st = self.lock();
        loop {
            if let Some(errno) = st.sync_done.remove(&cookie) {
                return match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            if st.broken {
                return Err(lost());
            }
            let now = Instant::now();
            if now >= deadline {
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

    /// Read replies until the connection ends.
    fn read_loop(&self, mut stream: Stream) {
        let mut payload = Vec::new();
        let why = loop {
            if let Err(e) = self.read_reply(&mut stream, &mut payload) {
                break e;
            }
        };
        self.fail_all(&why);
    }

    fn read_reply(
        &self,
        stream: &mut Stream,
        payload: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let mut head = [0u8; proto::REPLY_LEN];
        stream.read_exact(&mut head).map_err(|e| e.to_string())?;
        let reply = Reply::decode(&head)?;
        let part = self
            .lock()
            .parts
            .remove(&reply.cookie)
            .ok_or_else(|| format!("reply for unknown cookie {}", reply.cookie))?;
        let errno = reply.errno();
        // Simple replies carry a READ's data only on success.
        let data_len = if errno == 0 {
            part.read_len as usize
        } else {
            0
        };
        payload.resize(data_len, 0);
        stream.read_exact(payload).map_err(|e| e.to_string())?;
        let mut st = self.lock();
        let id = match part.owner {
            Owner::Sync => {
                st.sync_done.insert(reply.cookie, errno);
                drop(st);
                self.cond.notify_all();
                return Ok(());
            }
            Owner::Request(id) => id,
        };
        let Some(p) = st.requests.get_mut(&id) else {
            return Ok(()); // failed already
        };
        if errno != 0 {
            p.errno = errno;
        } else if data_len > 0
            && p.req
                .buffers
                .copy_from_slice(part.buf_offset, payload)
                .is_err()
        {
            p.errno = libc::EFAULT;
        }
        p.parts_left -= 1;
        if p.parts_left == 0 {
            let p = st.requests.remove(&id).expect("present");
            let result = if p.errno == 0 {
                Ok(p.bytes)
            } else {
                Err(p.errno)
            };
            st.done.push(Completion::new(p.tag, result, p.req));
            drop(st);
            self.signal();
        }
        Ok(())
    }
}

/// The per-queue I/O context: one connection.
pub(super) struct NbdQueue {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    info: ExportInfo,
    read_only: bool,
    /// Largest payload of one NBD request, a multiple of 512.
    max_len: u64,
    /// Requests submitted, not yet written.
    out: Vec<u8>,
    next_id: u64,
    wrote: bool,
}

impl NbdQueue {
    pub(super) fn start(
        stream: Stream,
        addr: &NbdAddress,
        info: ExportInfo,
        read_only: bool,
        depth: u32,
    ) -> Result<Self> {
        let fail = |what: &str, e: io::Error| NbdError::Unusable {
            addr: addr.to_string(),
            reason: format!("{what}: {e}"),
        };
        let event = EventFd::new(EFD_NONBLOCK).map_err(|e| fail("eventfd", e))?;
        let reading = stream.try_clone().map_err(|e| fail("socket", e))?;
        let shared = Arc::new(Shared {
            name: addr.to_string(),
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
            .spawn(move || for_reader.read_loop(reading))
            .map_err(|e| fail("reader thread", e))?;
        let max_len = u64::from(info.max_block) / crate::SECTOR_SIZE * crate::SECTOR_SIZE;
        Ok(Self {
            shared,
            reader: Some(reader),
            info,
            read_only,
            max_len,
            out: Vec::new(),
            next_id: 0,
            wrote: false,
        })
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
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

    /// Encode `req` as NBD requests (split at the server's maximum) into `self.out`;
    /// returns their cookies and parts.
    fn encode(
        &mut self,
        req: &IoRequest,
        cmd: u16,
        flags: u16,
        id: u64,
    ) -> std::result::Result<Vec<(u64, Part)>, i32> {
        let data = matches!(req.op, Op::Read | Op::Write);
        let total = if data {
            req.buffers.len() as u64
        } else {
            req.len
        };
        let start = self.out.len();
        let mut parts = Vec::with_capacity(1);
        let mut done = 0u64;
        loop {
            let len = (total - done).min(self.max_len);
            let cookie = self.shared.cookie();
            Request {
                flags,
                cmd,
                cookie,
                offset: req.offset + done,
                len: len as u32, // at most max_block
            }
            .encode(&mut self.out);
            if cmd == proto::CMD_WRITE {
                let at = self.out.len();
                self.out.resize(at + len as usize, 0);
                if req
                    .buffers
                    .copy_to_slice(done as usize, &mut self.out[at..])
                    .is_err()
                {
                    self.out.truncate(start);
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
                },
            ));
            done += len;
            if done >= total {
                return Ok(parts);
            }
        }
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
        let (cmd, flags) = match self.command(req.op) {
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
        let parts = match self.encode(&req, cmd, flags, id) {
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
        if st.broken {
            drop(st);
            self.out.clear();
            self.complete_now(req, tag, Err(libc::EIO));
            return Ok(());
        }
        self.wrote |= cmd != proto::CMD_READ;
        let parts_left = parts.len();
        st.parts.extend(parts);
        let pending = Pending {
            req,
            tag,
            parts_left,
            errno: 0,
            bytes,
        };
        st.requests.insert(id, pending);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            // A failed write fails the requests with EIO; the queue itself goes on.
            let _ = self.shared.send(&self.out);
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
        if self.wrote && self.info.has(proto::TFLAG_SEND_FLUSH) && !self.shared.lock().broken {
            if let Err(e) = self.shared.flush_sync() {
                tracing::error!(export = %self.shared.name, "NBD FLUSH at queue teardown failed: {e}");
            }
        }
        self.shared.closing.store(true, Ordering::Release);
        let mut msg = Vec::with_capacity(proto::REQUEST_LEN);
        Request {
            flags: 0,
            cmd: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode(&mut msg);
        let _ = self.shared.send(&msg);
        self.shared
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
