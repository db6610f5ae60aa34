//! The VDUSE message protocol: requests read from `/dev/vduse/NAME`, responses written back.
//!
//! Encoding and decoding are plain byte work (native endian, the C layout of
//! `vduse_dev_request` / `vduse_dev_response`), so they are tested without a kernel.

use crate::sys;

/// Size of one request as read(2) returns it.
pub const REQUEST_SIZE: usize = size_of::<sys::vduse_dev_request>();
/// Size of one response as write(2) takes it.
pub const RESPONSE_SIZE: usize = size_of::<sys::vduse_dev_response>();

/// Offset of the payload union in both messages.
const PAYLOAD: usize = 24;

/// State of one virtqueue, as GET_VQ_STATE wants it and VQ_GET_INFO reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VqState {
    /// Split ring: the next available index the device will read.
    Split {
        /// Next `avail->idx` value to process.
        avail_index: u16,
    },
    /// Packed ring state.
    Packed {
        /// Driver ring wrap counter last seen by the device.
        last_avail_counter: u16,
        /// Device's next available index.
        last_avail_idx: u16,
        /// Device ring wrap counter.
        last_used_counter: u16,
        /// Next used index.
        last_used_idx: u16,
    },
}

/// A decoded request from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The kernel wants virtqueue `index`'s state; answer with [`Response::vq_state`].
    GetVqState {
        /// Virtqueue index.
        index: u32,
    },
    /// The driver wrote the device status byte (0 = reset). Failing a FEATURES_OK write
    /// tells the driver the features are refused.
    SetStatus {
        /// The new virtio device status.
        status: u8,
    },
    /// Mappings of IOVA range `start..=last` changed: drop them and remap on demand.
    UpdateIotlb {
        /// First IOVA of the range.
        start: u64,
        /// Last IOVA of the range.
        last: u64,
    },
    /// A request type this crate does not know; answer [`Response::failed`].
    Unknown(u32),
}

/// A request with the id its response must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// Id to copy into the response.
    pub request_id: u32,
    /// The decoded request.
    pub request: Request,
}

/// A response to one [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub request_id: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// For GET_VQ_STATE: the queue index and state.
    pub vq_state: Option<(u32, VqState)>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

impl Message {
    /// Decodes one `vduse_dev_request`.
    pub fn decode(bytes: &[u8; REQUEST_SIZE]) -> Message {
        let kind = u32_at(bytes, 0);
        let request_id = u32_at(bytes, 4);
        let request = match kind {
            sys::VDUSE_GET_VQ_STATE => Request::GetVqState {
                index: u32_at(bytes, PAYLOAD),
            },
            sys::VDUSE_SET_STATUS => Request::SetStatus {
                status: bytes[PAYLOAD],
            },
            sys::VDUSE_UPDATE_IOTLB => Request::UpdateIotlb {
                start: u64_at(bytes, PAYLOAD),
                last: u64_at(bytes, PAYLOAD + 8),
            },
            other => Request::Unknown(other),
        };
        Message {
            request_id,
            request,
        }
    }

    /// Encodes this message as the kernel would send it (for tests and replay).
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        let kind = match self.request {
            Request::GetVqState { index } => {
                b[PAYLOAD..PAYLOAD + 4].copy_from_slice(&index.to_ne_bytes());
                sys::VDUSE_GET_VQ_STATE
            }
            Request::SetStatus { status } => {
                b[PAYLOAD] = status;
                sys::VDUSE_SET_STATUS
            }
            Request::UpdateIotlb { start, last } => {
                b[PAYLOAD..PAYLOAD + 8].copy_from_slice(&start.to_ne_bytes());
                b[PAYLOAD + 8..PAYLOAD + 16].copy_from_slice(&last.to_ne_bytes());
                sys::VDUSE_UPDATE_IOTLB
            }
            Request::Unknown(kind) => kind,
        };
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b[4..8].copy_from_slice(&self.request_id.to_ne_bytes());
        b
    }
}

impl Response {
    /// Success without payload (SET_STATUS, UPDATE_IOTLB).
    pub fn ok(request_id: u32) -> Self {
        Response {
            request_id,
            ok: true,
            vq_state: None,
        }
    }

    /// Failure (e.g. refused FEATURES_OK, unknown request).
    pub fn failed(request_id: u32) -> Self {
        Response {
            request_id,
            ok: false,
            vq_state: None,
        }
    }

    /// Successful answer to GET_VQ_STATE.
    pub fn vq_state(request_id: u32, index: u32, state: VqState) -> Self {
        Response {
            request_id,
            ok: true,
            vq_state: Some((index, state)),
        }
    }

    /// Encodes as `vduse_dev_response`.
    pub fn encode(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..4].copy_from_slice(&self.request_id.to_ne_bytes());
        let result = if self.ok {
            sys::VDUSE_REQ_RESULT_OK
        } else {
            sys::VDUSE_REQ_RESULT_FAILED
        };
        b[4..8].copy_from_slice(&result.to_ne_bytes());
        if let Some((index, state)) = self.vq_state {
            b[PAYLOAD..PAYLOAD + 4].copy_from_slice(&index.to_ne_bytes());
            let words: [u16; 4] = match state {
                VqState::Split { avail_index } => [avail_index, 0, 0, 0],
                VqState::Packed {
                    last_avail_counter,
                    last_avail_idx,
                    last_used_counter,
                    last_used_idx,
                } => [
                    last_avail_counter,
                    last_avail_idx,
                    last_used_counter,
                    last_used_idx,
                ],
            };
            for (i, w) in words.iter().enumerate() {
                let off = PAYLOAD + 4 + 2 * i;
                b[off..off + 2].copy_from_slice(&w.to_ne_bytes());
            }
        }
        b
    }

    /// Decodes a `vduse_dev_response` (tests); a vq state is read as split.
    pub fn decode(b: &[u8; RESPONSE_SIZE]) -> Response {
        let index = u32_at(b, PAYLOAD);
        let avail_index = u16_at(b, PAYLOAD + 4);
        Response {
            request_id: u32_at(b, 0),
            ok: u32_at(b, 4) == sys::VDUSE_REQ_RESULT_OK,
            vq_state: (index != 0 || avail_index != 0)
                .then_some((index, VqState::Split { avail_index })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u32, id: u32, payload: &[u8]) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b[4..8].copy_from_slice(&id.to_ne_bytes());
        b[24..24 + payload.len()].copy_from_slice(payload);
        b
    }

    #[test]
    fn decodes_each_request_type() {
        let m = Message::decode(&raw(0, 7, &3u32.to_ne_bytes()));
        assert_eq!(
            m,
            Message {
                request_id: 7,
                request: Request::GetVqState { index: 3 }
            }
        );
        let m = Message::decode(&raw(1, 8, &[0x0f]));
        assert_eq!(m.request, Request::SetStatus { status: 0x0f });
        let mut p = Vec::new();
        p.extend_from_slice(&0x1000u64.to_ne_bytes());
        p.extend_from_slice(&u64::MAX.to_ne_bytes());
        let m = Message::decode(&raw(2, 9, &p));
        assert_eq!(
            m.request,
            Request::UpdateIotlb {
                start: 0x1000,
                last: u64::MAX
            }
        );
        assert_eq!(
            Message::decode(&raw(42, 1, &[])).request,
            Request::Unknown(42)
        );
    }

    #[test]
    fn request_encode_decode_round_trip() {
        for request in [
            Request::GetVqState { index: 1 },
            Request::SetStatus { status: 0x8f },
            Request::UpdateIotlb {
                start: 4096,
                last: 8191,
            },
            Request::Unknown(99),
        ] {
            let m = Message {
                request_id: 0xdead,
                request,
            };
            assert_eq!(Message::decode(&m.encode()), m);
        }
    }

    #[test]
    fn responses_have_the_c_layout() {
        let b = Response::vq_state(
            5,
            2,
            VqState::Split {
                avail_index: 0x1234,
            },
        )
        .encode();
        assert_eq!(u32_at(&b, 0), 5);
        assert_eq!(u32_at(&b, 4), sys::VDUSE_REQ_RESULT_OK);
        assert_eq!(u32_at(&b, 24), 2);
        assert_eq!(u16_at(&b, 28), 0x1234);
        let b = Response::failed(6).encode();
        assert_eq!(u32_at(&b, 4), sys::VDUSE_REQ_RESULT_FAILED);
        assert!(b[8..].iter().all(|&x| x == 0));
        let packed = VqState::Packed {
            last_avail_counter: 1,
            last_avail_idx: 2,
            last_used_counter: 3,
            last_used_idx: 4,
        };
        let b = Response::vq_state(1, 0, packed).encode();
        assert_eq!(
            [
                u16_at(&b, 28),
                u16_at(&b, 30),
                u16_at(&b, 32),
                u16_at(&b, 34)
            ],
            [1, 2, 3, 4]
        );
        let r = Response::vq_state(9, 1, VqState::Split { avail_index: 77 });
        assert_eq!(Response::decode(&r.encode()), r);
    }
}
