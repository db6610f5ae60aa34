//! Generic netlink message encoding and decoding (pure byte work, no sockets).
//!
//! Layout: `nlmsghdr` (16 bytes) + `genlmsghdr` (4 bytes) + attributes, each a
//! `nlattr` (len u16, type u16) + payload padded to 4 bytes. All native endian.

/// `NLMSG_ERROR`: an error or (errno 0) an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`: part of a multi-message reply.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_ACK`: ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// On an error message: the original request was not echoed back.
pub const NLM_F_CAPPED: u16 = 0x100;
/// On an error message: extended-ack TLVs follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// Extended-ack attribute carrying a human-readable message.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

/// The generic netlink controller's fixed family id.
pub const GENL_ID_CTRL: u16 = 0x10;
/// Controller command: resolve a family by name.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// Controller attribute: family id (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// Controller attribute: family name (string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLMSG_HDR_LEN: usize = 16;
const GENL_HDR_LEN: usize = 4;
const NLA_HDR_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic netlink request under construction.
#[derive(Clone, Debug)]
pub struct GenlRequest {
    family: u16,
    flags: u16,
    cmd: u8,
    version: u8,
    attrs: Vec<u8>,
}

impl GenlRequest {
    /// A request for `cmd` of `family`; `flags` are added to `NLM_F_REQUEST`.
    pub fn new(family: u16, cmd: u8, version: u8, flags: u16) -> Self {
        GenlRequest {
            family,
            flags: NLM_F_REQUEST | flags,
            cmd,
            version,
            attrs: Vec::new(),
        }
    }

    /// Appends an attribute with a raw payload.
    pub fn attr_bytes(mut self, kind: u16, payload: &[u8]) -> Self {
        let len = NLA_HDR_LEN + payload.len();
        self.attrs.extend_from_slice(&(len as u16).to_ne_bytes());
        self.attrs.extend_from_slice(&kind.to_ne_bytes());
        self.attrs.extend_from_slice(payload);
        self.attrs.resize(align4(self.attrs.len()), 0);
        self
    }

    /// Appends a NUL-terminated string attribute.
    pub fn attr_str(self, kind: u16, value: &str) -> Self {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.attr_bytes(kind, &payload)
    }

    /// Appends a u32 attribute.
    pub fn attr_u32(self, kind: u16, value: u32) -> Self {
        self.attr_bytes(kind, &value.to_ne_bytes())
    }

    /// Serialises the message with sequence number `seq`.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + GENL_HDR_LEN + self.attrs.len();
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&self.family.to_ne_bytes());
        b.extend_from_slice(&self.flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
        b.extend_from_slice(&[self.cmd, self.version, 0, 0]);
        b.extend_from_slice(&self.attrs);
        b
    }
}

/// One netlink attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Attribute type (flag bits stripped).
    pub kind: u16,
    /// Payload without padding.
    pub payload: &'a [u8],
}

impl Attr<'_> {
    /// The payload as a string (up to the first NUL).
    pub fn as_str(&self) -> Option<String> {
        let end = self
            .payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.payload.len());
        std::str::from_utf8(&self.payload[..end])
            .ok()
            .map(str::to_owned)
    }

    /// The payload as u16.
    pub fn as_u16(&self) -> Option<u16> {
        Some(u16::from_ne_bytes(self.payload.get(..2)?.try_into().ok()?))
    }

    /// The payload as u32.
    pub fn as_u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?))
    }

    /// The payload as u64.
    pub fn as_u64(&self) -> Option<u64> {
        Some(u64::from_ne_bytes(self.payload.get(..8)?.try_into().ok()?))
    }
}

/// Splits an attribute stream; malformed trailing bytes end the stream.
pub fn parse_attrs(mut buf: &[u8]) -> Vec<Attr<'_>> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDR_LEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDR_LEN || len > buf.len() {
            break;
        }
        out.push(Attr {
            kind,
            payload: &buf[NLA_HDR_LEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// One decoded netlink message of a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A generic netlink message: its command and raw attribute bytes.
    Genl {
        /// Sequence number it answers.
        seq: u32,
        /// genl command.
        cmd: u8,
        /// Attribute bytes (parse with [`parse_attrs`]).
        attrs: Vec<u8>,
    },
    /// `NLMSG_ERROR` with errno 0: the request succeeded.
    Ack {
        /// Sequence number it answers.
        seq: u32,
    },
    /// `NLMSG_ERROR` with an errno (positive) and the kernel's extended-ack text.
    Error {
        /// Sequence number it answers.
        seq: u32,
        /// Positive errno.
        errno: i32,
        /// Extended-ack message, when the kernel gave one.
        message: Option<String>,
    },
    /// `NLMSG_DONE`: end of a dump.
    Done {
        /// Sequence number it answers.
        seq: u32,
    },
}

/// A malformed reply buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

/// Decodes every netlink message in one received datagram.
pub fn parse_replies(mut buf: &[u8]) -> Result<Vec<Reply>, Malformed> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDR_LEN {
            return Err(Malformed(format!(
                "{} stray bytes after the last message",
                buf.len()
            )));
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let flags = u16::from_ne_bytes([buf[6], buf[7]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(Malformed(format!(
                "message length {len} of {} bytes",
                buf.len()
            )));
        }
        let body = &buf[NLMSG_HDR_LEN..len];
        out.push(match kind {
            NLMSG_ERROR => parse_error(seq, flags, body)?,
            NLMSG_DONE => Reply::Done { seq },
            _ => {
                if body.len() < GENL_HDR_LEN {
                    return Err(Malformed("generic netlink message without header".into()));
                }
                Reply::Genl {
                    seq,
                    cmd: body[0],
                    attrs: body[GENL_HDR_LEN..].to_vec(),
                }
            }
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn parse_error(seq: u32, flags: u16, body: &[u8]) -> Result<Reply, Malformed> {
    if body.len() < 4 {
        return Err(Malformed("short NLMSG_ERROR".into()));
    }
    let errno = -i32::from_ne_bytes(body[0..4].try_into().unwrap());
    if errno == 0 {
        return Ok(Reply::Ack { seq });
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 && body.len() >= 4 + NLMSG_HDR_LEN {
        // The echoed request: only its header when capped, else the whole message.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDR_LEN
        } else {
            u32::from_ne_bytes(body[4..8].try_into().unwrap()) as usize
        };
        if let Some(tlvs) = body.get(4 + align4(echoed)..) {
            message = parse_attrs(tlvs)
                .into_iter()
                .find(|a| a.kind == NLMSGERR_ATTR_MSG)
                .and_then(|a| a.as_str());
        }
    }
    Ok(Reply::Error {
        seq,
        errno,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getfamily_request_bytes() {
        let req = GenlRequest::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, NLM_F_ACK)
            .attr_str(CTRL_ATTR_FAMILY_NAME, "vdpa");
        let b = req.encode(42);
        // 16 header + 4 genl + (4 + "vdpa\0" = 9, padded to 12)
        assert_eq!(b.len(), 32);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), GENL_ID_CTRL);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 42);
        assert_eq!(&b[16..20], &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
        assert_eq!(u16::from_ne_bytes([b[20], b[21]]), 9); // nla_len excludes padding
        assert_eq!(u16::from_ne_bytes([b[22], b[23]]), CTRL_ATTR_FAMILY_NAME);
        assert_eq!(&b[24..29], b"vdpa\0");
        assert_eq!(&b[29..32], &[0, 0, 0]);
    }

    #[test]
    fn attributes_round_trip_with_padding() {
        let req = GenlRequest::new(30, 3, 1, 0)
            .attr_str(4, "vduse0")
            .attr_u32(5, 2)
            .attr_bytes(3, &7u64.to_ne_bytes())
            .attr_bytes(0x8000 | 9, &[1, 2, 3]); // NLA_F_NESTED is stripped
        let b = req.encode(1);
        let attrs = parse_attrs(&b[20..]);
        assert_eq!(attrs.len(), 4);
        assert_eq!(attrs[0].kind, 4);
        assert_eq!(attrs[0].as_str().as_deref(), Some("vduse0"));
        assert_eq!(attrs[1].as_u32(), Some(2));
        assert_eq!(attrs[2].as_u64(), Some(7));
        assert_eq!(attrs[3].kind, 9);
        assert_eq!(attrs[3].payload, &[1, 2, 3]);
        assert_eq!(attrs[3].as_u32(), None);
    }

    #[test]
    fn truncated_attributes_end_the_stream() {
        let mut b = GenlRequest::new(1, 1, 1, 0).attr_u32(1, 5).encode(0)[20..].to_vec();
        b.extend_from_slice(&[200, 0, 2, 0]); // claims 200 bytes
        assert_eq!(parse_attrs(&b).len(), 1);
    }

    fn nlmsg(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b.resize(align4(b.len()), 0);
        b
    }

    #[test]
    fn parses_a_dump_with_done() {
        let genl = GenlRequest::new(0, 0, 0, 0).attr_str(2, "vduse").encode(0);
        let mut body = vec![2u8, 1, 0, 0];
        body.extend_from_slice(&genl[20..]);
        let mut buf = nlmsg(30, NLM_F_MULTI, 5, &body);
        buf.extend(nlmsg(30, NLM_F_MULTI, 5, &body));
        buf.extend(nlmsg(NLMSG_DONE, NLM_F_MULTI, 5, &0i32.to_ne_bytes()));
        let replies = parse_replies(&buf).unwrap();
        assert_eq!(replies.len(), 3);
        let Reply::Genl { seq, cmd, attrs } = &replies[0] else {
            panic!()
        };
        assert_eq!((*seq, *cmd), (5, 2));
        assert_eq!(parse_attrs(attrs)[0].as_str().as_deref(), Some("vduse"));
        assert_eq!(replies[2], Reply::Done { seq: 5 });
    }

    #[test]
    fn parses_ack_and_error_with_extack_message() {
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(
            parse_replies(&nlmsg(NLMSG_ERROR, NLM_F_CAPPED, 9, &ack)).unwrap(),
            vec![Reply::Ack { seq: 9 }]
        );

        let mut err = (-libc::ENODEV).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0u8; 16]); // capped echo of the request header
        let tlv = GenlRequest::new(0, 0, 0, 0)
            .attr_str(NLMSGERR_ATTR_MSG, "vdpa: device not found")
            .encode(0);
        err.extend_from_slice(&tlv[20..]);
        let replies = parse_replies(&nlmsg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 9, &err));
        assert_eq!(
            replies.unwrap(),
            vec![Reply::Error {
                seq: 9,
                errno: libc::ENODEV,
                message: Some("vdpa: device not found".into()),
            }]
        );
    }

    #[test]
    fn malformed_buffers_are_errors_not_panics() {
        assert!(parse_replies(&[1, 2, 3]).is_err());
        let mut b = nlmsg(30, 0, 1, &[1, 0, 0, 0]);
        b[0] = 200;
        assert!(parse_replies(&b).is_err());
        assert!(parse_replies(&nlmsg(30, 0, 1, &[1])).is_err());
        assert!(parse_replies(&nlmsg(NLMSG_ERROR, 0, 1, &[1])).is_err());
    }
}
