//! `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`: a client of an NBD server.
//!
//! Each queue opens its own connection (the one of the handshake in [`NbdBackend::open`] goes
//! to the first queue) and pipelines its requests on it: [`BackendQueue::submit`] encodes the
//! request (and a WRITE's payload) into a buffer that `commit` writes in one go, and a reader
//! thread per connection reads the replies, copies READ data into the request's buffers and
//! signals the queue's completion eventfd. Structured replies are asked for in the handshake
//! (`NBD_OPT_STRUCTURED_REPLY`) and used when the server agrees: READ data arrives in chunks,
//! holes as zeroes without their bytes on the wire, errors with the server's message.
//!
//! Several connections are only equivalent when the server advertises multi-conn: then a
//! FLUSH on one covers the writes completed on all. Without it a queue's FLUSH is sent on
//! every queue's connection first (see `NbdQueue::flush_peers`), so it still covers them.
//!
//! When a connection drops, its reader thread reconnects (backoff 100 ms to 1 s), redoes the
//! handshake and re-sends every request still pending; requests wait meanwhile, for up to
//! [`NbdOptions::reconnect_timeout`], then fail with EIO (and new ones at once) until the
//! server is back.

mod proto;
mod queue;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use proto::{ExportInfo, HandshakeError};

use crate::{Backend, BackendInfo, BackendQueue, Result, SECTOR_SIZE};

/// Default TCP port of NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// How long connecting and the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    /// The server's socket.
    pub target: NbdTarget,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

/// The socket of an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            NbdTarget::Unix(path) => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
            NbdTarget::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            NbdTarget::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
        }
    }
}

/// Default of [`NbdOptions::reconnect_timeout`].
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How the client behaves, from the spec's query (`?reconnect=SECONDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdOptions {
    /// How long requests wait for a lost connection to come back before they fail with EIO;
    /// zero fails them at once.
    pub reconnect_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
        }
    }
}

/// Why an NBD export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The server's socket could not be reached.
    #[error("cannot connect to {addr}: {cause}: is the NBD server running?")]
    Connect {
        /// The export's address.
        addr: String,
        /// The OS error, without its number.
        cause: String,
    },
    /// The server has no export of that name.
    #[error("{addr}: the server has no export {export:?}{message}: check the export name (list them with: nbdinfo --list)")]
    UnknownExport {
        /// The export's address.
        addr: String,
        /// The export name.
        export: String,
        /// The server's message, as `" (MESSAGE)"`, or empty.
        message: String,
    },
    /// The handshake failed.
    #[error("{addr}: {reason}")]
    Handshake {
        /// The export's address.
        addr: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// The export cannot be a virtio-blk disk.
    #[error("{addr}: {reason}")]
    Unusable {
        /// The export's address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// A connected socket to the server.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Self::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OS error as text, without the "(os error N)" suffix.
fn os_error_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Connect to `addr` and run the handshake.
fn connect(addr: &NbdAddress) -> std::result::Result<(Stream, ExportInfo), NbdError> {
    let connect_err = |e: io::Error| NbdError::Connect {
        addr: addr.to_string(),
        cause: os_error_text(&e),
    };
    let mut stream = match &addr.target {
        NbdTarget::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(connect_err)?),
        NbdTarget::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host name not found");
            let mut found = None;
            for sa in (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(connect_err)?
            {
                match TcpStream::connect_timeout(&sa, HANDSHAKE_TIMEOUT) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or_else(|| connect_err(last))?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
    };
    let hs_err = |reason: String| NbdError::Handshake {
        addr: addr.to_string(),
        reason,
    };
    stream
        .set_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| hs_err(os_error_text(&e)))?;
    let info = proto::handshake(&mut stream, &addr.export).map_err(|e| match e {
        HandshakeError::Refused { code, message } if code == proto::REP_ERR_UNKNOWN => {
            NbdError::UnknownExport {
                addr: addr.to_string(),
                export: addr.export.clone(),
                message: if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                },
            }
        }
        HandshakeError::Refused { code, message } => hs_err(match code {
            proto::REP_ERR_TLS_REQD => "the server requires TLS, which virtiod does not speak yet".into(),
            proto::REP_ERR_POLICY => format!("the server refused access: {message}"),
            proto::REP_ERR_UNSUP => "the server does not support NBD_OPT_GO: use a newer NBD server (qemu-nbd, nbdkit)".into(),
            _ => format!("the server refused the export (error {code:#x}): {message}"),
        }),
        HandshakeError::NotFixedNewstyle => hs_err(
            "the server does not speak the fixed newstyle handshake: use a newer NBD server (qemu-nbd, nbdkit) or drop its oldstyle option"
                .into(),
        ),
        HandshakeError::NotNbd => hs_err("not an NBD server: check the address".into()),
        HandshakeError::Io(e) => hs_err(format!(
            "handshake failed: {}: is it an NBD server, and does it accept one more client (qemu-nbd --shared=N)?",
            os_error_text(&e)
        )),
        HandshakeError::Protocol(what) => hs_err(format!("handshake failed: {what}")),
    })?;
    stream
        .set_timeout(None)
        .map_err(|e| hs_err(os_error_text(&e)))?;
    Ok((stream, info))
}

/// Check that the export can serve 512-byte virtio-blk requests.
fn check_export(addr: &NbdAddress, info: &ExportInfo) -> std::result::Result<(), NbdError> {
    let unusable = |reason: String| NbdError::Unusable {
        addr: addr.to_string(),
        reason,
    };
    if info.size == 0 || !info.size.is_multiple_of(SECTOR_SIZE) {
        return Err(unusable(format!(
            "the export is {} bytes, not a non-zero multiple of 512: resize it",
            info.size
        )));
    }
    let min = info.min_block;
    if min == 0 || !min.is_power_of_two() || !(SECTOR_SIZE as u32).is_multiple_of(min) {
        return Err(unusable(format!(
            "the server's minimum block size {min} does not divide 512: virtio-blk sends 512-byte requests"
        )));
    }
    if info.max_block < SECTOR_SIZE as u32 {
        return Err(unusable(format!(
            "the server's maximum block size {} is below 512 bytes",
            info.max_block
        )));
    }
    Ok(())
}

/// An NBD export.
#[derive(Debug)]
pub struct NbdBackend {
    addr: NbdAddress,
    options: NbdOptions,
    info: ExportInfo,
    read_only: bool,
    /// The handshake's connection, handed to the first queue.
    spare: Mutex<Option<Stream>>,
    /// The live queues' connections, for [`Backend::flush`] and for a queue's FLUSH when
    /// the server does not advertise multi-conn.
    connections: queue::Peers,
}

impl NbdBackend {
    /// Connect to `addr`, negotiate the export and check it can be a virtio-blk disk.
    pub fn open(addr: NbdAddress, options: NbdOptions, read_only: bool) -> Result<Self> {
        let (stream, info) = connect(&addr)?;
        check_export(&addr, &info)?;
        let server_ro = info.has(proto::TFLAG_READ_ONLY);
        tracing::info!(
            export = %addr,
            size = info.size,
            flags = format_args!("{:#x}", info.flags),
            min_block = info.min_block,
            preferred_block = info.preferred_block,
            max_block = info.max_block,
            server_read_only = server_ro,
            reconnect_timeout_s = options.reconnect_timeout.as_secs(),
            structured_replies = info.structured,
            multi_conn = info.has(proto::TFLAG_CAN_MULTI_CONN),
            "NBD export negotiated"
        );
        if !(info.has(proto::TFLAG_SEND_FLUSH) || read_only || server_ro) {
            tracing::warn!(export = %addr, "the NBD server offers no FLUSH: durability of writes is up to the server");
        }
        Ok(Self {
            addr,
            options,
            info,
            read_only: read_only || server_ro,
            spare: Mutex::new(Some(stream)),
            connections: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

impl Backend for NbdBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.info.size,
            read_only: self.read_only,
            block_size: 512,
            discard: self.info.has(proto::TFLAG_SEND_TRIM),
            write_zeroes: self.info.has(proto::TFLAG_SEND_WRITE_ZEROES),
        }
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stream = match spare {
            Some(s) => s,
            None => {
                let (s, info) = connect(&self.addr)?;
                if info.size != self.info.size || info.flags != self.info.flags {
                    return Err(NbdError::Unusable {
                        addr: self.addr.to_string(),
                        reason: "the export changed between connections".into(),
                    }
                    .into());
                }
                s
            }
        };
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|c| c.strong_count() > 0);
        if !connections.is_empty() && !self.info.has(proto::TFLAG_CAN_MULTI_CONN) {
            tracing::warn!(export = %self.addr, "the NBD server does not advertise multi-conn: a FLUSH on one queue is sent on every queue's connection (slower flushes; use one queue, or a server with multi-conn)");
        }
        let q = queue::NbdQueue::start(
            stream,
            &self.addr,
            self.options,
            self.info,
            self.read_only,
            depth,
            self.connections.clone(),
        )?;
        connections.push(Arc::downgrade(q.shared()));
        Ok(Box::new(q))
    }

    fn flush(&self) -> io::Result<()> {
        if !self.info.has(proto::TFLAG_SEND_FLUSH) || self.read_only {
            return Ok(());
        }
        let live: Vec<_> = {
            let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            connections.iter().filter_map(Weak::upgrade).collect()
        };
        for c in live {
            c.flush_sync()?;
        }
        Ok(())
    }
}

/// Entry points for `cargo fuzz` (`fuzz/fuzz_targets/nbd_replies.rs`): the handshake and the
/// reply parsing against bytes from a hostile server. Not a stable API.
#[doc(hidden)]
pub mod fuzz {
    use std::io::{self, Cursor, Read, Write};

    use super::proto::{self, Chunk, ChunkBody, ReplyStart};

    /// A server that answers with `input` and swallows what the client writes.
    struct Scripted(Cursor<Vec<u8>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Run the handshake on `data`; an accepted export has sane block sizes.
    pub fn handshake(data: &[u8]) {
        let mut server = Scripted(Cursor::new(data.to_vec()));
        if let Ok(info) = proto::handshake(&mut server, "export") {
            let addr = super::NbdAddress {
                target: super::NbdTarget::Unix("/x".into()),
                export: "export".into(),
            };
            let _ = super::check_export(&addr, &info);
        }
    }

    /// Parse `data` as a stream of replies (structured when `structured`) to a READ of
    /// `read_len` bytes at `offset`: every chunk that is accepted lies inside the request.
    pub fn replies(data: &[u8], structured: bool, offset: u64, read_len: u32) {
        let mut at = 0usize;
        while let Some(head) = data.get(at..at + proto::REPLY_LEN) {
            let head: &[u8; proto::REPLY_LEN] = head.try_into().expect("16 bytes");
            let Ok(start) = ReplyStart::decode(head, structured) else {
                return;
            };
            at += proto::REPLY_LEN;
            let ReplyStart::Chunk = start else {
                at += read_len as usize;
                continue;
            };
            let Some(full) = data.get(at - proto::REPLY_LEN..at + 4) else {
                return;
            };
            let chunk = Chunk::decode(full.try_into().expect("20 bytes"));
            at += 4;
            let Some(payload) = data.get(at..at.saturating_add(chunk.length as usize)) else {
                return;
            };
            at += payload.len();
            match proto::parse_chunk(chunk.kind, payload) {
                Ok(ChunkBody::Data { offset: o, data }) => {
                    check_inside(offset, read_len, o, data.len() as u64)
                }
                Ok(ChunkBody::Hole { offset: o, len }) => {
                    check_inside(offset, read_len, o, u64::from(len))
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn check_inside(start: u64, read_len: u32, offset: u64, len: u64) {
        if let Ok(Some(rel)) =
            super::queue::replies::chunk_range(Some(start), read_len, offset, len)
        {
            assert!(
                rel as u64 + len <= u64::from(read_len),
                "a chunk accepted outside its part"
            );
        }
    }
}
