//! Checksum and TCP segmentation offloads, carried by the `virtio_net_hdr_v1` in front of
//! every frame (a frame between the queues and the backends is that header and the packet).
//!
//! - [`check_tx`]: the header of a frame the driver sent, against the features it accepted
//!   (hostile: every offset is checked against the frame, unknown types are refused).
//! - [`Finish`]: what a receiving port must do to a frame its driver cannot take as is
//!   (no GUEST_CSUM: complete the checksum; no GUEST_TSO4/6: cut a TCP GSO frame into
//!   MSS-sized segments with their own IP and TCP headers and checksums).

use virtio_bindings::virtio_net;

use crate::{ETH_HLEN, NET_HDR_LEN, VLAN_HLEN};

/// `VIRTIO_NET_F_CSUM`: the driver may send frames with a partial checksum.
pub const F_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_CSUM;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes frames with a partial checksum.
pub const F_GUEST_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_CSUM;
/// `VIRTIO_NET_F_GUEST_TSO4`: the driver takes TCP/IPv4 GSO frames.
pub const F_GUEST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO4;
/// `VIRTIO_NET_F_GUEST_TSO6`: the driver takes TCP/IPv6 GSO frames.
pub const F_GUEST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO6;
/// `VIRTIO_NET_F_HOST_TSO4`: the driver may send TCP/IPv4 GSO frames.
pub const F_HOST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO4;
/// `VIRTIO_NET_F_HOST_TSO6`: the driver may send TCP/IPv6 GSO frames.
pub const F_HOST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO6;
/// Every offload feature the device offers.
pub const OFFLOAD_FEATURES: u64 =
    F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;

/// `flags`: the checksum at `csum_start + csum_offset` is partial (to be completed).
pub const HDR_F_NEEDS_CSUM: u8 = virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `flags`: the checksum was verified (device to driver only).
pub const HDR_F_DATA_VALID: u8 = virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;
/// `gso_type`: a TCP/IPv4 GSO frame.
pub const GSO_TCPV4: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
/// `gso_type`: a TCP/IPv6 GSO frame.
pub const GSO_TCPV6: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;

/// Largest GSO frame (without the virtio-net header): a 64 KiB IP packet, an Ethernet
/// header and a VLAN tag.
pub const MAX_GSO_FRAME: usize = 65536 + ETH_HLEN + VLAN_HLEN;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_CSUM_AT: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// The fields of a `virtio_net_hdr_v1` (without `num_buffers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHdr {
    /// `NEEDS_CSUM`, `DATA_VALID`.
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6`, ...
    pub gso_type: u8,
    /// Bytes of the headers up to the payload (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where the checksummed bytes start.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl NetHdr {
    /// The header at the start of `frame` (which holds at least [`NET_HDR_LEN`] bytes).
    pub fn read(frame: &[u8]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([frame[at], frame[at + 1]]);
        Self {
            flags: frame[0],
            gso_type: frame[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// Write the header at the start of `frame` (`num_buffers` is left alone).
    pub fn write(&self, frame: &mut [u8]) {
        frame[0] = self.flags;
        frame[1] = self.gso_type;
        frame[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        frame[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        frame[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        frame[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Why the header of a tx frame was refused (the frame is dropped and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    /// Flags other than NEEDS_CSUM (and DATA_VALID, ignored).
    #[error("unknown header flags {0:#x}")]
    Flags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM accepted.
    #[error("a partial checksum, but the driver did not accept VIRTIO_NET_F_CSUM")]
    CsumNotAccepted,
    /// The checksum field is not inside the packet.
    #[error("checksum at {start} + {offset} is beyond the {len}-byte packet")]
    CsumBeyondFrame {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Packet bytes.
        len: usize,
    },
    /// A GSO type that is not TCPV4/TCPV6 (UDP, USO, ECN: not offered).
    #[error("unknown or not offered GSO type {0:#x}")]
    GsoType(u8),
    /// A GSO type whose HOST_TSO feature the driver did not accept.
    #[error("GSO type {0:#x}, but the driver did not accept the matching HOST_TSO feature")]
    GsoNotAccepted(u8),
    /// A GSO frame with `gso_size` 0.
    #[error("a GSO frame with gso_size 0")]
    GsoSizeZero,
    /// A GSO frame without NEEDS_CSUM.
    #[error("a GSO frame without a partial checksum")]
    GsoWithoutCsum,
    /// `hdr_len` beyond the packet.
    #[error("hdr_len {hdr_len} is beyond the {len}-byte packet")]
    HdrLenBeyondFrame {
        /// `hdr_len`.
        hdr_len: u16,
        /// Packet bytes.
        len: usize,
    },
    /// A GSO frame that is not TCP over the IP version of its GSO type, or whose
    /// checksum is not TCP's.
    #[error("a GSO frame whose headers are not TCP over the IP version of its GSO type")]
    GsoHeaders,
}

/// Check the header of `frame` (header and packet) the driver sent, having accepted
/// `acked`; DATA_VALID (meaningless from a driver) is cleared.
pub fn check_tx(frame: &mut [u8], acked: u64) -> Result<(), HdrError> {
    let mut hdr = NetHdr::read(frame);
    let packet = &frame[NET_HDR_LEN..];
    if hdr.flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
        return Err(HdrError::Flags(hdr.flags));
    }
    hdr.flags &= !HDR_F_DATA_VALID;
    if hdr.flags & HDR_F_NEEDS_CSUM != 0 {
        if acked & F_CSUM == 0 {
            return Err(HdrError::CsumNotAccepted);
        }
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > packet.len() {
            return Err(HdrError::CsumBeyondFrame {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: packet.len(),
            });
        }
    }
    if hdr.gso_type != GSO_NONE {
        let feature = match hdr.gso_type {
            GSO_TCPV4 => F_HOST_TSO4,
            GSO_TCPV6 => F_HOST_TSO6,
            other => return Err(HdrError::GsoType(other)),
        };
        if acked & feature == 0 {
            return Err(HdrError::GsoNotAccepted(hdr.gso_type));
        }
        if hdr.gso_size == 0 {
            return Err(HdrError::GsoSizeZero);
        }
        if hdr.flags & HDR_F_NEEDS_CSUM == 0 {
            return Err(HdrError::GsoWithoutCsum);
        }
        if usize::from(hdr.hdr_len) > packet.len() {
            return Err(HdrError::HdrLenBeyondFrame {
                hdr_len: hdr.hdr_len,
                len: packet.len(),
            });
        }
        let layout = TcpLayout::parse(packet, hdr.gso_type).ok_or(HdrError::GsoHeaders)?;
        if usize::from(hdr.csum_start) != layout.l4 || usize::from(hdr.csum_offset) != TCP_CSUM_AT {
            return Err(HdrError::GsoHeaders);
        }
    }
    hdr.write(frame);
    Ok(())
}

/// Where the headers of a TCP packet are, in an Ethernet frame (without virtio-net header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpLayout {
    /// Offset of the IP header.
    l3: usize,
    ipv4: bool,
    /// Offset of the TCP header.
    l4: usize,
    /// Offset of the TCP payload.
    payload: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl TcpLayout {
    /// The layout of `packet` if it is TCP over IPv4 (`GSO_TCPV4`) or IPv6 without extension
    /// headers (`GSO_TCPV6`), behind an Ethernet header and at most one VLAN tag; IPv4
    /// fragments are refused.
    fn parse(packet: &[u8], gso_type: u8) -> Option<Self> {
        let mut l3 = ETH_HLEN;
        let mut ethertype = be16(packet.get(..ETH_HLEN)?, 12);
        if ethertype == ETH_P_8021Q {
            ethertype = be16(packet.get(..ETH_HLEN + VLAN_HLEN)?, 16);
            l3 += VLAN_HLEN;
        }
        let ip = packet.get(l3..)?;
        let (ipv4, l4) = match (gso_type, ethertype) {
            (GSO_TCPV4, ETH_P_IPV4) => {
                let ihl = usize::from(*ip.first()? & 0x0f) * 4;
                let fragment = be16(ip.get(..20)?, 6) & 0x3fff != 0;
                if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP || fragment {
                    return None;
                }
                (true, l3 + ihl)
            }
            (GSO_TCPV6, ETH_P_IPV6) => {
                if ip.get(..40)?[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                    return None;
                }
                (false, l3 + 40)
            }
            _ => return None,
        };
        let doff = usize::from(packet.get(l4 + 12)? >> 4) * 4;
        if doff < 20 || l4 + doff > packet.len() {
            return None;
        }
        Some(Self {
            l3,
            ipv4,
            l4,
            payload: l4 + doff,
        })
    }
}

/// The ones' complement sum of `bytes` (16-bit big-endian words, an odd byte padded), added
/// to `sum`, not folded.
fn sum_words(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// The Internet checksum of a ones' complement sum: folded to 16 bits and complemented.
fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Complete the partial checksum of `frame` (header and packet, NEEDS_CSUM checked by
/// [`check_tx`] or set by the kernel): sum from `csum_start` to the end, store at
/// `csum_start + csum_offset`; the header then says nothing (flags 0). False if the
/// offsets are beyond the frame (nothing changed).
pub fn complete_checksum(frame: &mut [u8]) -> bool {
    let hdr = NetHdr::read(frame);
    let packet = &mut frame[NET_HDR_LEN..];
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return false;
    }
    let csum = fold(sum_words(0, &packet[start..]));
    packet[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    frame[0] = 0;
    true
}

/// What a receiving port does with a frame, given the features its driver accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Deliver as it is (with `flags` as given).
    AsIs {
        /// The header flags to deliver (DATA_VALID cleared without GUEST_CSUM).
        flags: u8,
    },
    /// Complete the partial checksum first.
    Checksum,
    /// Cut into segments of `gso_size` payload bytes ([`Segments`]).
    Segment,
}

impl Finish {
    /// What to do with `frame` (header and packet) for a driver that accepted `guest`.
    pub fn of(frame: &[u8], guest: u64) -> Self {
        let hdr = NetHdr::read(frame);
        let tso = match hdr.gso_type {
            GSO_NONE => None,
            GSO_TCPV4 => Some(F_GUEST_TSO4),
            GSO_TCPV6 => Some(F_GUEST_TSO6),
            _ => Some(0), // nothing the driver could accept
        };
        let csum_ok = guest & F_GUEST_CSUM != 0;
        match tso {
            Some(f) if !csum_ok || guest & f != f || f == 0 => Self::Segment,
            _ if hdr.flags & HDR_F_NEEDS_CSUM != 0 && !csum_ok => Self::Checksum,
            _ if csum_ok => Self::AsIs { flags: hdr.flags },
            _ => Self::AsIs { flags: 0 },
        }
    }
}

/// The segments of a TCP GSO frame, built one at a time into a buffer of the caller's.
#[derive(Debug)]
pub struct Segments<'a> {
    /// The GSO frame (header and packet).
    frame: &'a [u8],
    layout: TcpLayout,
    mss: usize,
    /// Flags of the segments' headers (DATA_VALID for a driver with GUEST_CSUM).
    flags: u8,
}

impl<'a> Segments<'a> {
    /// The segments of `frame`, or None if it is not a TCP GSO frame that can be cut.
    pub fn new(frame: &'a [u8], guest: u64) -> Option<Self> {
        let hdr = NetHdr::read(frame);
        let layout = TcpLayout::parse(&frame[NET_HDR_LEN..], hdr.gso_type)?;
        if hdr.gso_size == 0 {
            return None;
        }
        let flags = if guest & F_GUEST_CSUM != 0 {
            HDR_F_DATA_VALID
        } else {
            0
        };
        Some(Self {
            frame,
            layout,
            mss: usize::from(hdr.gso_size),
            flags,
        })
    }

    /// How many segments (at least one, even without payload).
    pub fn count(&self) -> usize {
        let payload = self.frame.len() - NET_HDR_LEN - self.layout.payload;
        payload.div_ceil(self.mss).max(1)
    }

    /// Build segment `index` (< [`Self::count`]) into `out`: a virtio-net header (no
    /// offload), the headers of the frame with IP lengths, IPv4 id and checksum, TCP
    /// sequence number, flags and checksum fixed, and its part of the payload.
    pub fn build(&self, index: usize, out: &mut Vec<u8>) {
        let TcpLayout {
            l3,
            ipv4,
            l4,
            payload,
        } = self.layout;
        let packet = &self.frame[NET_HDR_LEN..];
        let data = &packet[payload..];
        let first = index * self.mss;
        let chunk = &data[first.min(data.len())..(first + self.mss).min(data.len())];
        let last = index + 1 == self.count();
        out.clear();
        out.resize(NET_HDR_LEN, 0);
        out[0] = self.flags;
        out.extend_from_slice(&packet[..payload]);
        out.extend_from_slice(chunk);
        let seg = &mut out[NET_HDR_LEN..];
        let l4_len = seg.len() - l4;
        if ipv4 {
            let ip_len = (seg.len() - l3) as u16;
            seg[l3 + 2..l3 + 4].copy_from_slice(&ip_len.to_be_bytes());
            let id = be16(seg, l3 + 4).wrapping_add(index as u16);
            seg[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            seg[l3 + 10..l3 + 12].fill(0);
            let csum = fold(sum_words(0, &seg[l3..l4]));
            seg[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
        } else {
            seg[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        let seq = u32::from_be_bytes(seg[l4 + 4..l4 + 8].try_into().unwrap_or_default())
            .wrapping_add(first as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        if !last {
            seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if index > 0 {
            seg[l4 + 13] &= !TCP_CWR;
        }
        // The pseudo-header: addresses, protocol, TCP length.
        let addrs = if ipv4 {
            &seg[l3 + 12..l3 + 20]
        } else {
            &seg[l3 + 8..l3 + 40]
        };
        let pseudo = sum_words(0, addrs) + u64::from(IPPROTO_TCP) + l4_len as u64;
        seg[l4 + TCP_CSUM_AT..l4 + TCP_CSUM_AT + 2].fill(0);
        let csum = fold(sum_words(pseudo, &seg[l4..]));
        seg[l4 + TCP_CSUM_AT..l4 + TCP_CSUM_AT + 2].copy_from_slice(&csum.to_be_bytes());
    }
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
