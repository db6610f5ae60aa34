//! Fuzz the vhost-user door: a hostile frontend on the socket of the real transport serving
//! virtio-blk over a RAM disk, with guest memory it can shrink under the daemon.
//!
//! One device server per process (started on first use) listens on a unix socket in a temp
//! dir, exactly as `virtiod` serves it (`VhostUserDevice::serve` on a thread). Each input is one
//! connection: a program of operations, run in order, then the connection is closed. Two
//! memfds play the frontend's memory: *guest* (128 KiB at the start) and *inflight* (16 KiB);
//! this side never maps them (it writes with `pwrite`), so a SIGBUS can only come from the
//! daemon.
//!
//! Input layout: a sequence of operations (at most `MAX_OPS`), each an opcode byte
//! (`op % 8`) and its arguments; a truncated last operation is dropped.
//!
//! - `0..=2` **message**: `code flags extra split len_lo len_hi payload[len & 0x1fff]`.
//!   `code`: below 0xC0 a known request (`1 + (code - 1) % 44`, so 1..=44 are themselves),
//!   0xC0..0xFE an unknown one (45..), 0xFF `u32::MAX`. `flags` is the header's flags word
//!   (0x01 = version 1, 0x09 = version 1 + NEED_REPLY). The header's size is the payload's
//!   length, unless `extra` bit 7: then `split * 17` (a lie: the stream loses its framing).
//!   `extra` bit 0: no sync after this message; bit 1: pause between the two pieces; bits 2-3
//!   which fds go along: 0 the ones the request takes (SET_MEM_TABLE: the guest memfd once per
//!   region (`payload[0..4]`, 1..=32); ADD_MEM_REG, SET_LOG_BASE/FD, SET_DEVICE_STATE_FD: the
//!   guest memfd; SET_INFLIGHT_FD: the inflight memfd; SET_VRING_KICK/CALL/ERR: the kick or
//!   call eventfd of queue `payload[0] & 1`, none if `payload[1] & 1` (the NOFD bit);
//!   SET_BACKEND_REQ_FD, GPU_SET_SOCKET: an eventfd (the wrong kind of fd); others none), 1
//!   none, 2 the guest memfd, 3 an eventfd (`(extra >> 4) & 3`: kick 0, kick 1, call 0,
//!   call 1); bit 6: one more guest memfd. `split`: non-zero cuts the message (header and
//!   payload) in two at `split % len`, the fds with the first piece.
//!   After the message, unless `extra` bit 0 or the stream lost its framing, a GET_FEATURES is
//!   sent and the replies are read up to its answer: the daemon has handled the message before
//!   the next operation (a ring's queue thread may still be working).
//! - `3` **write memory**: `sel off_lo off_hi len bytes[len]`: `pwrite` into the guest
//!   (`sel` bit 0 clear) or inflight memfd at `off | (sel bit 1) << 16`, clipped to the file's
//!   size (rings, descriptors, request headers, in-flight blocks).
//! - `4` **truncate**: `sel size_lo size_hi`: `ftruncate` the guest / inflight memfd
//!   (`sel` bit 0) to `size << 4` bytes (0..1 MiB): shrink it under the daemon's mappings, or
//!   grow it.
//! - `5` **kick**: `sel`: write 1 to the eventfd `sel & 3` (kick 0, kick 1, call 0, call 1).
//! - `6` **pause**: `sel`: `sel % 4`: yield, 20 µs, 200 µs, 1 ms.
//! - `7` **raw**: `len bytes[len]`: written to the socket as is (the framing is lost).
//!
//! Checked: no panic (in any thread: libfuzzer-sys aborts on a panic), no crash (a SIGBUS
//! outside the transport's guarded mappings goes to libFuzzer's handler), no hang (every
//! reply awaited comes within `WAIT`); after each input the server thread is still running
//! and a fresh connection gets the right answer to GET_FEATURES (so the daemon tore the
//! hostile connection down and accepts the next one).
//!
//! With `VHOST_USER_FUZZ_TRACE=1` each operation is printed with the connection's state and
//! the used indexes of the two rings as seeds place them (0x2002, 0x5002), to check a seed.
//!
//! SIGPIPE is ignored, as Rust's runtime does in `virtiod` (libFuzzer's `main` does not):
//! otherwise the daemon's reply to a frontend that already closed would kill the process.
#![no_main]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use virtiod_backend::{Backend, MemBackend};
use virtiod_blk::{BlkConfig, BlkDevice};
use virtiod_core::Device;
use virtiod_vhost_user::{bind_socket, VhostUserDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAX_OPS: usize = 128;
const GUEST_SIZE: u64 = 128 << 10;
const INFLIGHT_SIZE: u64 = 16 << 10;
const DISK_SIZE: u64 = 1 << 20;
const NUM_QUEUES: u16 = 2;
const QUEUE_SIZE: u16 = 16;
/// Longest wait for an answer of the daemon before it counts as a hang.
const WAIT: Duration = Duration::from_secs(5);

const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_LOG_FD: u32 = 7;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_BACKEND_REQ_FD: u32 = 21;
const SET_INFLIGHT_FD: u32 = 32;
const GPU_SET_SOCKET: u32 = 33;
const ADD_MEM_REG: u32 = 37;
const SET_DEVICE_STATE_FD: u32 = 42;
/// Requests 1..=KNOWN are the ones the `vhost` crate (0.18) knows.
const KNOWN: u8 = 44;
/// Header flags: version 1; REPLY (set on the daemon's answers).
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const HEADER: usize = 12;

/// The device server of this process.
struct Server {
    socket: PathBuf,
    features: u64,
    thread: JoinHandle<()>,
    result: Arc<Mutex<Option<String>>>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // SAFETY: setting SIGPIPE's disposition has no memory effects (see the module doc).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vu.sock");
        let backend = MemBackend::new(DISK_SIZE, false);
        let cfg = BlkConfig::new(&backend.info(), NUM_QUEUES, QUEUE_SIZE, "fuzz");
        let blk = Arc::new(BlkDevice::new(cfg, Arc::new(backend)));
        let features = blk.features() | 1 << 30; // VHOST_USER_F_PROTOCOL_FEATURES
        let dev = VhostUserDevice::new(blk, Duration::ZERO).unwrap();
        let listener = bind_socket(&socket).unwrap();
        let result = Arc::new(Mutex::new(None));
        let thread = {
            let result = result.clone();
            std::thread::Builder::new()
                .name("vu-fuzz".into())
                .spawn(move || {
                    let stop = AtomicBool::new(false);
                    let r = dev.serve(listener, &stop);
                    *result.lock().unwrap() = Some(format!("{r:?}"));
                })
                .unwrap()
        };
        Server {
            socket,
            features,
            thread,
            result,
        }
    })
}

/// Each fuzz process's socket directory is `DIR_PREFIX` + its pid.
const DIR_PREFIX: &str = "virtiod-fuzz-vu-";

/// Remove the socket directories of fuzz processes that are gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX));
        if pid.is_some_and(|p| !std::path::Path::new("/proc").join(p).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd that we own.
    let fd = unsafe { libc::memfd_create(c"vu-fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// Reads the input front to back; `None` once it runs out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

/// One input's frontend: its connection, memory and eventfds.
struct Frontend {
    sock: UnixStream,
    guest: File,
    inflight: File,
    /// kick 0, kick 1, call 0, call 1.
    eventfds: [EventFd; 4],
    /// Message boundaries are where this side thinks they are (no raw bytes, no lie).
    framed: bool,
    /// The daemon closed the connection.
    closed: bool,
    /// GET_FEATURES sent and not answered yet.
    pending: usize,
}

/// Read one whole message; `None` if the daemon closed the connection.
fn read_message(sock: &mut UnixStream) -> Option<(u32, u32, Vec<u8>)> {
    let mut hdr = [0u8; HEADER];
    match sock.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the daemon did not answer within {WAIT:?}")
        }
        Err(_) => return None,
    }
    let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; word(8) as usize];
    match sock.read_exact(&mut payload) {
        Ok(()) => Some((word(0), word(4), payload)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the daemon's reply stopped half-way for {WAIT:?}")
        }
        Err(_) => None,
    }
}

fn message(code: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + payload.len());
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn pause(sel: u8) {
    match sel % 4 {
        0 => std::thread::yield_now(),
        1 => std::thread::sleep(Duration::from_micros(20)),
        2 => std::thread::sleep(Duration::from_micros(200)),
        _ => std::thread::sleep(Duration::from_millis(1)),
    }
}

impl Frontend {
    fn connect(socket: &PathBuf) -> Self {
        let sock = UnixStream::connect(socket).expect("the daemon accepts connections");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.set_write_timeout(Some(WAIT)).unwrap();
        let efd = || EventFd::new(EFD_NONBLOCK).unwrap();
        Self {
            sock,
            guest: memfd(GUEST_SIZE),
            inflight: memfd(INFLIGHT_SIZE),
            eventfds: [efd(), efd(), efd(), efd()],
            framed: true,
            closed: false,
            pending: 0,
        }
    }

    fn file(&self, sel: u8) -> &File {
        if sel & 1 == 0 {
            &self.guest
        } else {
            &self.inflight
        }
    }

    /// Write `bytes` (the fds with the first byte); false once the daemon has closed.
    fn send(&mut self, bytes: &[u8], fds: &[RawFd]) -> bool {
        let mut done = 0;
        while done < bytes.len() {
            let with = if done == 0 { fds } else { &[] };
            match self.sock.send_with_fds(&[&bytes[done..]], with) {
                Ok(n) => done += n,
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) if e.errno() == libc::EAGAIN => {
                    panic!("the daemon read nothing for {WAIT:?}")
                }
                Err(_) => {
                    self.closed = true;
                    return false;
                }
            }
        }
        true
    }

    /// GET_FEATURES, then read the replies up to its answer (or the daemon's close). The
    /// input's own GET_FEATURES messages are counted: each gets an answer or closes the
    /// connection, so the last answer is the sync's.
    fn sync(&mut self) {
        if !self.send(&message(GET_FEATURES, VERSION_1, 0, &[]), &[]) {
            return;
        }
        self.pending += 1;
        while self.pending > 0 {
            match read_message(&mut self.sock) {
                Some((GET_FEATURES, flags, _)) if flags & REPLY != 0 => self.pending -= 1,
                Some(_) => {}
                None => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// The fds that go with a message (see the module doc).
    fn fds(&self, code: u32, extra: u8, payload: &[u8]) -> Vec<RawFd> {
        let guest = self.guest.as_raw_fd();
        let byte = |i: usize| payload.get(i).copied().unwrap_or(0);
        let mut fds = match (extra >> 2) & 3 {
            0 => match code {
                SET_MEM_TABLE => {
                    let n = u32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)]);
                    vec![guest; n.clamp(1, 32) as usize]
                }
                ADD_MEM_REG | SET_LOG_BASE | SET_LOG_FD | SET_DEVICE_STATE_FD => vec![guest],
                SET_INFLIGHT_FD => vec![self.inflight.as_raw_fd()],
                SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR if byte(1) & 1 == 0 => {
                    let base = if code == SET_VRING_KICK { 0 } else { 2 };
                    vec![self.eventfds[base + usize::from(byte(0) & 1)].as_raw_fd()]
                }
                SET_BACKEND_REQ_FD | GPU_SET_SOCKET => vec![self.eventfds[2].as_raw_fd()],
                _ => Vec::new(),
            },
            1 => Vec::new(),
            2 => vec![guest],
            _ => vec![self.eventfds[usize::from(extra >> 4 & 3)].as_raw_fd()],
        };
        if extra & 0x40 != 0 {
            fds.push(guest);
        }
        fds
    }

    fn message(&mut self, input: &mut Input) -> Option<()> {
        let sel = input.u8()?;
        let flags = u32::from(input.u8()?);
        let extra = input.u8()?;
        let split = input.u8()?;
        let len = input.u16()? & 0x1fff;
        let payload = input.bytes(usize::from(len));
        let code = match sel {
            0xff => u32::MAX,
            0xc0.. => u32::from(KNOWN) + 1 + u32::from(sel - 0xc0),
            _ => 1 + u32::from(sel.wrapping_sub(1) % KNOWN),
        };
        let size = if extra & 0x80 != 0 {
            self.framed = false;
            u32::from(split) * 17
        } else {
            payload.len() as u32
        };
        if self.closed {
            return Some(());
        }
        let msg = message(code, flags, size, payload);
        let fds = self.fds(code, extra, payload);
        let cut = if split == 0 {
            msg.len()
        } else {
            usize::from(split) % msg.len()
        };
        if !self.send(&msg[..cut], &fds) {
            return Some(());
        }
        if code == GET_FEATURES {
            self.pending += 1;
        }
        if cut < msg.len() {
            if extra & 2 != 0 {
                pause(split);
            }
            let fds = if cut == 0 { &fds[..] } else { &[] };
            if !self.send(&msg[cut..], fds) {
                return Some(());
            }
        }
        if self.framed && extra & 1 == 0 {
            self.sync();
        }
        Some(())
    }

    fn run(&mut self, input: &mut Input) -> Option<()> {
        match input.u8()? % 8 {
            0..=2 => self.message(input)?,
            3 => {
                let sel = input.u8()?;
                let offset = u64::from(input.u16()?) | u64::from(sel >> 1 & 1) << 16;
                let len = input.u8()?;
                let bytes = input.bytes(usize::from(len));
                let file = self.file(sel);
                // Only inside the file: a write past its end would grow it back.
                let size = file.metadata().unwrap().len();
                let end = (offset + bytes.len() as u64).min(size);
                if offset < end {
                    let n = (end - offset) as usize;
                    file.write_all_at(&bytes[..n], offset).unwrap();
                }
            }
            4 => {
                let sel = input.u8()?;
                let size = u64::from(input.u16()?) << 4;
                self.file(sel).set_len(size).unwrap();
            }
            5 => {
                let sel = input.u8()?;
                self.eventfds[usize::from(sel & 3)].write(1).unwrap();
            }
            6 => pause(input.u8()?),
            _ => {
                let len = input.u8()?;
                let bytes = input.bytes(usize::from(len));
                self.framed = false;
                if !self.closed {
                    self.send(bytes, &[]);
                }
            }
        }
        Some(())
    }
}

/// The daemon is still serving: its thread runs and a new frontend gets the features.
fn check_alive(server: &Server) {
    assert!(
        !server.thread.is_finished(),
        "the vhost-user server stopped: {:?}",
        server.result.lock().unwrap()
    );
    let mut sock = UnixStream::connect(&server.socket).expect("the daemon accepts connections");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.write_all(&message(GET_FEATURES, VERSION_1, 0, &[]))
        .unwrap();
    let (code, flags, payload) =
        read_message(&mut sock).expect("a fresh connection gets an answer");
    assert_eq!(
        (code, flags & !REPLY, payload.len()),
        (GET_FEATURES, VERSION_1, 8)
    );
    assert_ne!(flags & REPLY, 0);
    let features = u64::from_le_bytes(payload.try_into().unwrap());
    assert_eq!(
        features, server.features,
        "GET_FEATURES on a fresh connection"
    );
}

fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VHOST_USER_FUZZ_TRACE").is_some())
}

impl Frontend {
    fn trace(&self, op: usize, bytes: &[u8]) {
        let used = |at: u64| {
            let mut b = [0u8; 2];
            self.guest
                .read_exact_at(&mut b, at)
                .ok()
                .map(|()| u16::from_le_bytes(b))
        };
        eprintln!(
            "op {op:3} {:02x?}: framed {} closed {} used {:?} {:?}",
            &bytes[..bytes.len().min(8)],
            self.framed,
            self.closed,
            used(0x2002),
            used(0x5002)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let mut fe = Frontend::connect(&server.socket);
    let mut input = Input(data);
    for op in 0..MAX_OPS {
        let before = input.0;
        if fe.run(&mut input).is_none() {
            break;
        }
        if trace() {
            fe.trace(op, before);
        }
    }
    drop(fe);
    check_alive(server);
});
