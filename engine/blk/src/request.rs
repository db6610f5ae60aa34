//! Parsing a virtio-blk request out of a descriptor chain. Every field is hostile input.
//!
//! A request is framed independently of descriptor boundaries (virtio 1.x): the
//! device-readable bytes are a 16-byte header followed by the data to write (or DISCARD /
//! WRITE_ZEROES segments); the device-writable bytes are the data to read (or the GET_ID
//! string) followed by one status byte — the last byte of the last descriptor.

use virtiod_core::{Chain, ChainDesc};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::config::MAX_DISCARD_SECTORS;
use crate::BlkConfig;

use virtio_bindings::virtio_blk;

/// VIRTIO_BLK_T_IN
pub const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
/// VIRTIO_BLK_T_OUT
pub const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
/// VIRTIO_BLK_T_FLUSH
pub const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
/// VIRTIO_BLK_T_GET_ID
pub const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
/// VIRTIO_BLK_T_DISCARD
pub const T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
/// VIRTIO_BLK_T_WRITE_ZEROES
pub const T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
/// The UNMAP flag of a DISCARD / WRITE_ZEROES segment.
pub const FLAG_UNMAP: u32 = virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Length of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: u64 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment.
pub const RANGE_LEN: u64 = 16;
/// Length of the GET_ID string.
pub const ID_LEN: u64 = 20;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device serial.
    GetId,
    /// Deallocate a range.
    Discard,
    /// Zero a range; `unmap` allows deallocating it.
    WriteZeroes {
        /// The UNMAP flag was set.
        unmap: bool,
    },
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain had no descriptors (e.g. a bad indirect table at the head).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain did not end: a loop, a `next` out of range, a bad indirect table, or more
    /// descriptors than the queue holds.
    #[error("descriptor chain does not terminate (loop, bad next index, bad indirect table or too long)")]
    BrokenChain,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    /// No writable, non-empty last descriptor to hold the status byte.
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
    /// Fewer than 16 readable bytes for the header.
    #[error("request header shorter than 16 bytes")]
    ShortHeader,
    /// A buffer lies outside the driver's memory, or has the wrong permission.
    #[error("buffer outside the driver's memory")]
    BadAddress,
    /// Data where the request type has none, or in the wrong direction.
    #[error("data buffer in the wrong direction for this request type")]
    WrongDirection,
    /// Data length not a multiple of 512 bytes, or too large.
    #[error("data length is not a multiple of 512 bytes or too large")]
    BadLength,
    /// Sector range past the end of the disk.
    #[error("sector range past the end of the disk")]
    OutOfRange,
    /// A write-type request on a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// Too many data buffers.
    #[error("too many data segments")]
    TooManySegments,
    /// An unknown request type (answered with UNSUPP).
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A DISCARD / WRITE_ZEROES segment with bad flags or more segments than offered.
    #[error("bad discard/write-zeroes segment")]
    BadRange,
}

/// One piece of a data buffer in driver memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Driver address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A parsed request. Reused between requests to avoid allocating on the hot path.
#[derive(Debug, Default, Clone)]
pub struct Request {
    /// Head descriptor index (returned in the used ring).
    pub head: u16,
    /// Where the status byte goes, if the chain has a writable one.
    pub status: Option<GuestAddress>,
    /// The parsed type, valid when parsing succeeded.
    pub kind: Option<RequestType>,
    /// First sector (IN/OUT), or the range start (DISCARD/WRITE_ZEROES).
    pub sector: u64,
    /// Number of sectors for DISCARD / WRITE_ZEROES.
    pub num_sectors: u64,
    /// Data buffers, in the direction the type implies.
    pub data: Vec<Segment>,
    /// Total data bytes in `data`.
    pub data_len: u64,
    readable: Vec<Segment>,
}

impl Request {
    fn reset(&mut self, head: u16) {
        self.head = head;
        self.status = None;
        self.kind = None;
        self.sector = 0;
        self.num_sectors = 0;
        self.data.clear();
        self.data_len = 0;
        self.readable.clear();
    }
}

/// Split `segs` after `skip` bytes, appending the tail to `out`.
fn tail_after(segs: &[Segment], mut skip: u64, out: &mut Vec<Segment>) {
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(Segment {
            addr: s.addr.unchecked_add(skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
}

/// Copy the first `buf.len()` bytes of `segs` out of driver memory.
fn read_prefix<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut pos = 0;
    for s in segs {
        if pos == buf.len() {
            break;
        }
        let n = (buf.len() - pos).min(s.len as usize);
        mem.read_slice(&mut buf[pos..pos + n], s.addr)
            .map_err(|_| RequestError::BadAddress)?;
        pos += n;
    }
    if pos == buf.len() {
        Ok(())
    } else {
        Err(RequestError::ShortHeader)
    }
}

fn check_access<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    perm: Permissions,
) -> Result<(), RequestError> {
    for s in segs {
        if s.len > 0 && !mem.check_range(s.addr, s.len as usize, perm) {
            return Err(RequestError::BadAddress);
        }
    }
    Ok(())
}

/// Parse the request in `chain` into `req`. On error, `req.head` and `req.status` are still
/// filled in as far as they could be established, so that the caller can answer with an
/// error status.
pub fn parse<M: GuestMemory + ?Sized>(
    chain: &Chain,
    mem: &M,
    cfg: &BlkConfig,
    req: &mut Request,
) -> Result<RequestType, RequestError> {
    req.reset(chain.head());
    let descs = chain.descs();
    let last = descs.last().ok_or(RequestError::EmptyChain)?;
    if !chain.terminated() {
        return Err(RequestError::BrokenChain);
    }
    req.status = status_byte(last, mem);
    if req.status.is_none() {
        return Err(RequestError::NoStatus);
    }
    if chain.bad_order() {
        return Err(RequestError::BadOrder);
    }
    let (readable_len, writable_len) = split(descs, req);
    let mut header = [0u8; HEADER_LEN as usize];
    read_prefix(mem, &req.readable, &mut header)?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    req.sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let out_len = readable_len - HEADER_LEN;
    let kind = match req_type {
        T_IN => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            req.data_len = writable_len;
            check_io_range(cfg, req.sector, writable_len, req.data.len())?;
            check_access(mem, &req.data, Permissions::Write)?;
            RequestType::In
        }
        T_OUT => {
            if writable_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            if cfg.read_only {
                return Err(RequestError::ReadOnly);
            }
            req.data.clear();
            tail_after(&req.readable, HEADER_LEN, &mut req.data);
            req.data_len = out_len;
            check_io_range(cfg, req.sector, out_len, req.data.len())?;
            check_access(mem, &req.data, Permissions::Read)?;
            RequestType::Out
        }
        T_FLUSH => {
            if out_len != 0 || writable_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            req.data.clear();
            RequestType::Flush
        }
        T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            check_access(mem, &req.data, Permissions::Write)?;
            req.data_len = writable_len.min(ID_LEN);
            RequestType::GetId
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if writable_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            parse_range(req_type, out_len, mem, cfg, req)?
        }
        other => return Err(RequestError::Unsupported(other)),
    };
    req.kind = Some(kind);
    Ok(kind)
}

/// The status byte: the last byte of the last descriptor, which must be writable.
fn status_byte<M: GuestMemory + ?Sized>(last: &ChainDesc, mem: &M) -> Option<GuestAddress> {
    if !last.writable || last.len == 0 {
        return None;
    }
    last.addr
        .checked_add(u64::from(last.len) - 1)
        .filter(|a| mem.check_range(*a, 1, Permissions::Write))
}

/// Split the chain into readable segments (`req.readable`) and writable data segments
/// (`req.data`, without the status byte). Returns the bytes of each.
fn split(descs: &[ChainDesc], req: &mut Request) -> (u64, u64) {
    let mut readable_len = 0u64;
    let mut writable_len = 0u64;
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let len = if i + 1 == n { d.len - 1 } else { d.len };
        if len == 0 {
            continue;
        }
        let seg = Segment { addr: d.addr, len };
        if d.writable {
            writable_len += u64::from(len);
            req.data.push(seg);
        } else {
            readable_len += u64::from(len);
            req.readable.push(seg);
        }
    }
    (readable_len, writable_len)
}

/// The single segment of a DISCARD / WRITE_ZEROES request (`out_len` readable bytes after
/// the header).
fn parse_range<M: GuestMemory + ?Sized>(
    req_type: u32,
    out_len: u64,
    mem: &M,
    cfg: &BlkConfig,
    req: &mut Request,
) -> Result<RequestType, RequestError> {
    let offered = if req_type == T_DISCARD {
        cfg.discard
    } else {
        cfg.write_zeroes
    };
    if !offered {
        return Err(if cfg.read_only {
            RequestError::ReadOnly
        } else {
            RequestError::Unsupported(req_type)
        });
    }
    // We offer max_discard_seg = max_write_zeroes_seg = 1.
    if out_len != RANGE_LEN {
        return Err(RequestError::BadRange);
    }
    let mut range = [0u8; (HEADER_LEN + RANGE_LEN) as usize];
    read_prefix(mem, &req.readable, &mut range)?;
    let start = u64::from_le_bytes(range[16..24].try_into().unwrap_or_default());
    let count = u32::from_le_bytes(range[24..28].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(range[28..32].try_into().unwrap_or_default());
    // Reserved flag bits, and UNMAP on a DISCARD, are not supported (5.2.6.2).
    if flags & !FLAG_UNMAP != 0 || (req_type == T_DISCARD && flags != 0) {
        return Err(RequestError::Unsupported(req_type));
    }
    if count > MAX_DISCARD_SECTORS {
        return Err(RequestError::BadRange);
    }
    let end = start
        .checked_add(u64::from(count))
        .ok_or(RequestError::OutOfRange)?;
    if end > cfg.capacity_sectors {
        return Err(RequestError::OutOfRange);
    }
    req.sector = start;
    req.num_sectors = u64::from(count);
    req.data.clear();
    Ok(if req_type == T_DISCARD {
        RequestType::Discard
    } else {
        RequestType::WriteZeroes {
            unmap: flags & FLAG_UNMAP != 0,
        }
    })
}

fn check_io_range(
    cfg: &BlkConfig,
    sector: u64,
    len: u64,
    segments: usize,
) -> Result<(), RequestError> {
    if !len.is_multiple_of(512) || len > u64::from(u32::MAX) {
        return Err(RequestError::BadLength);
    }
    if segments > crate::config::MAX_SEGMENTS as usize {
        return Err(RequestError::TooManySegments);
    }
    let end = sector
        .checked_add(len / 512)
        .ok_or(RequestError::OutOfRange)?;
    if end > cfg.capacity_sectors {
        return Err(RequestError::OutOfRange);
    }
    Ok(())
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
