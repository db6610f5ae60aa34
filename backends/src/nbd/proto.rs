//! The NBD wire format (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>):
//! the fixed newstyle handshake with `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_GO`, requests,
//! simple replies and structured reply chunks.
//!
//! Everything here works on any `Read + Write`, so the unit tests below talk to a scripted
//! server held in memory. All integers are big-endian.

use std::io::{self, Read, Write};

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// What an oldstyle server sends instead of `IHAVEOPT`.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server may omit (and the client asks it to omit) 124 zero bytes of padding.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Option: enter transmission on an export, with information replies.
pub const OPT_GO: u32 = 7;
/// Option: the server may answer with structured replies (READ data in chunks, holes).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option reply: the option succeeded.
pub const REP_ACK: u32 = 1;
/// Option reply: one piece of information about the export.
pub const REP_INFO: u32 = 3;
/// Bit set in every option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: refused by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: the export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// Information: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a FLUSH on one connection covers writes completed on all of them.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag of WRITE_ZEROES: do not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag of READ: answer in one data chunk (do not look for holes).
pub const CMD_FLAG_DF: u16 = 1 << 2;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_LEN: usize = 20;
/// Structured reply flag: the last chunk for this cookie.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (only with `REPLY_FLAG_DONE`).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: an offset, then READ data at that offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: an offset and a length that read as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error code and message.
#[cfg_attr(not(test), allow(dead_code))]
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error code and message, at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;
/// Largest payload sent when the server names no maximum (the protocol's default).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;
/// Largest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// What the server told about the export in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Minimum block size (1 when the server gave none).
    pub min_block: u32,
    /// Preferred block size (4096 when the server gave none).
    pub preferred_block: u32,
    /// Maximum payload size.
    pub max_block: u32,
    /// Whether the server agreed to structured replies.
    pub structured: bool,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer does not start with `NBDMAGIC`.
    #[error("not an NBD server")]
    NotNbd,
    /// The server speaks oldstyle or newstyle without the fixed extension.
    #[error("the server does not speak the fixed newstyle handshake")]
    NotFixedNewstyle,
    /// The server refused `NBD_OPT_GO` with error `code` and `message`.
    #[error("server refused the export ({code:#x}): {message}")]
    Refused {
        /// The `NBD_REP_ERR_*` code.
        code: u32,
        /// The server's message, on one line.
        message: String,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Run the fixed newstyle handshake and `NBD_OPT_GO` on `export`.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, HandshakeError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if be64(&hello[0..8]) != NBDMAGIC {
        return Err(HandshakeError::NotNbd);
    }
    let magic = be64(&hello[8..16]);
    if magic == OLDSTYLE_MAGIC {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    if magic != IHAVEOPT {
        return Err(HandshakeError::NotNbd);
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    // Encoded first: a name the protocol cannot carry sends nothing at all.
    let mut go = Vec::with_capacity(32 + export.len());
    encode_opt_go(&mut go, export)?;
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&client_flags.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg)?;
    s.flush()?;
    let structured = read_structured_reply_ack(s)?;
    s.write_all(&go)?;
    s.flush()?;
    let mut info = read_go_replies(s)?;
    info.structured = structured;
    Ok(info)
}

/// One option reply header: (option, reply type, length), its data read into `data`.
fn read_option_reply<S: Read>(s: &mut S, data: &mut Vec<u8>) -> Result<(u32, u32), HandshakeError> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    if be64(&head[0..8]) != OPT_REPLY_MAGIC {
        return Err(HandshakeError::Protocol("bad option reply magic".into()));
    }
    let len = be32(&head[16..20]);
    if len > MAX_OPTION_REPLY {
        return Err(HandshakeError::Protocol("option reply too long".into()));
    }
    data.resize(len as usize, 0);
    s.read_exact(data)?;
    Ok((be32(&head[8..12]), be32(&head[12..16])))
}

/// The server's answer to `NBD_OPT_STRUCTURED_REPLY`: ACK (true) or any error (false: the
/// client goes on with simple replies).
fn read_structured_reply_ack<S: Read>(s: &mut S) -> Result<bool, HandshakeError> {
    let mut data = Vec::new();
    loop {
        let (option, kind) = read_option_reply(s, &mut data)?;
        if option != OPT_STRUCTURED_REPLY {
            return Err(HandshakeError::Protocol(
                "option reply for an option not asked".into(),
            ));
        }
        match kind {
            REP_ACK => return Ok(true),
            k if k & REP_FLAG_ERROR != 0 => return Ok(false),
            _ => {} // unknown non-error replies are ignored, as the protocol asks
        }
    }
}

/// Append an `NBD_OPT_GO` for `export`, asking for the block size information.
pub fn encode_opt_go(out: &mut Vec<u8>, export: &str) -> Result<(), HandshakeError> {
    let name_len = u32::try_from(export.len())
        .ok()
        .filter(|&n| n <= 4096)
        .ok_or_else(|| HandshakeError::Protocol("export name longer than 4096 bytes".into()))?;
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4 + name_len + 2 + 2).to_be_bytes());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    Ok(())
}

fn read_go_replies<S: Read>(s: &mut S) -> Result<ExportInfo, HandshakeError> {
    let proto = |m: &str| HandshakeError::Protocol(m.to_string());
    let mut export: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    let mut data = Vec::new();
    loop {
        let (option, kind) = read_option_reply(s, &mut data)?;
        if option != OPT_GO {
            return Err(proto("option reply for an option not asked"));
        }
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                INFO_EXPORT if data.len() >= 12 => {
                    export = Some((be64(&data[2..10]), u16::from_be_bytes([data[10], data[11]])))
                }
                INFO_BLOCK_SIZE if data.len() >= 14 => {
                    sizes = Some((be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])))
                }
                INFO_EXPORT | INFO_BLOCK_SIZE => return Err(proto("information reply too short")),
                _ => {} // information we did not ask for
            },
            REP_INFO => return Err(proto("information reply too short")),
            k if k & REP_FLAG_ERROR != 0 => {
                return Err(HandshakeError::Refused {
                    code: k,
                    message: one_line(&data),
                })
            }
            _ => {} // unknown non-error replies are ignored, as the protocol asks
        }
    }
    let (size, flags) = export.ok_or_else(|| proto("no export information before ACK"))?;
    let flags = if flags & TFLAG_HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    let (min_block, preferred_block, max_block) = sizes.unwrap_or((1, 4096, DEFAULT_MAX_BLOCK));
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_block,
        structured: false,
    })
}

/// One transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `CMD_FLAG_*`.
    pub flags: u16,
    /// `CMD_*`.
    pub cmd: u16,
    /// Echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    /// Append the 28-byte header (the caller appends a WRITE's payload).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.cmd.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }
}

/// A simple reply header (a READ's payload follows it when `error` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// NBD error (an errno value), 0 on success.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl Reply {
    /// Decode a simple reply header.
    pub fn decode(buf: &[u8; REPLY_LEN]) -> Result<Self, String> {
        match be32(&buf[0..4]) {
            SIMPLE_REPLY_MAGIC => Ok(Self {
                error: be32(&buf[4..8]),
                cookie: be64(&buf[8..16]),
            }),
            STRUCTURED_REPLY_MAGIC => Err("structured reply, never negotiated".into()),
            m => Err(format!("bad reply magic {m:#x}")),
        }
    }

    /// The errno to complete the request with (0 for success); unknown errors become EIO.
    pub fn errno(&self) -> i32 {
        errno(self.error)
    }
}

/// The errno for an NBD error value (0 for success); unknown errors become EIO.
pub fn errno(error: u32) -> i32 {
    match error {
        0 => 0,
        e @ (1 | 5 | 12 | 22 | 28 | 75 | 95 | 108) => e as i32, // the values NBD defines
        _ => libc::EIO,
    }
}

/// What the first 16 bytes of a reply are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    /// A whole simple reply header.
    Simple(Reply),
    /// The start of a structured chunk header: [`CHUNK_LEN`] bytes in all.
    Chunk,
}

impl ReplyStart {
    /// Decode the first [`REPLY_LEN`] bytes of a reply; `structured` says whether
    /// structured replies were negotiated (if not, a chunk is a protocol error).
    pub fn decode(buf: &[u8; REPLY_LEN], structured: bool) -> Result<Self, String> {
        match be32(&buf[0..4]) {
            STRUCTURED_REPLY_MAGIC if structured => Ok(Self::Chunk),
            _ => Reply::decode(buf).map(Self::Simple),
        }
    }
}

/// A structured reply chunk header; its payload (`length` bytes) follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl Chunk {
    /// Decode a chunk header (the caller checked the magic with [`ReplyStart::decode`]).
    pub fn decode(buf: &[u8; CHUNK_LEN]) -> Self {
        Self {
            flags: u16::from_be_bytes([buf[4], buf[5]]),
            kind: u16::from_be_bytes([buf[6], buf[7]]),
            cookie: be64(&buf[8..16]),
            length: be32(&buf[16..20]),
        }
    }

    /// Whether this is the last chunk for its cookie.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// What one chunk's payload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody<'a> {
    /// Nothing (the final chunk of a request without data).
    None,
    /// READ data at an export offset.
    Data {
        /// Export offset of `data`.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// `len` bytes of zeroes at an export offset.
    Hole {
        /// Export offset.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
    /// The request failed.
    Error {
        /// NBD error value.
        error: u32,
        /// The server's message, on one line.
        message: String,
    },
    /// A chunk type this client never asked for and may ignore (no error bit).
    Other,
}

/// Parse a chunk's payload; a malformed one is a protocol error.
pub fn parse_chunk(kind: u16, payload: &[u8]) -> Result<ChunkBody<'_>, String> {
    let short = || format!("structured reply chunk type {kind} too short");
    match kind {
        REPLY_TYPE_NONE if payload.is_empty() => Ok(ChunkBody::None),
        REPLY_TYPE_NONE => Err("NONE chunk with a payload".into()),
        REPLY_TYPE_OFFSET_DATA if payload.len() > 8 => Ok(ChunkBody::Data {
            offset: be64(&payload[0..8]),
            data: &payload[8..],
        }),
        REPLY_TYPE_OFFSET_HOLE if payload.len() == 12 => Ok(ChunkBody::Hole {
            offset: be64(&payload[0..8]),
            len: be32(&payload[8..12]),
        }),
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => Err(short()),
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            if payload.len() < 6 {
                return Err(short());
            }
            let error = be32(&payload[0..4]);
            let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            let message = payload.get(6..6 + msg_len).ok_or_else(|| {
                format!("error chunk message of {msg_len} bytes beyond its chunk")
            })?;
            if k == REPLY_TYPE_ERROR_OFFSET && payload.len() < 6 + msg_len + 8 {
                return Err(short());
            }
            Ok(ChunkBody::Error {
                error: if error == 0 { libc::EIO as u32 } else { error },
                message: one_line(message),
            })
        }
        _ => Ok(ChunkBody::Other),
    }
}

/// The bytes of a server message as one printable line.
fn one_line(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
