//! virtio-blk on top of the [`Driver`]: request types, status codes, the request header, a
//! write/read round trip and the capacity from the configuration space.

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

use crate::frontend::{linked, Driver};

/// Status `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// Status `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// Status `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;
/// Request type `VIRTIO_BLK_T_IN` (read).
pub const T_IN: u32 = 0;
/// Request type `VIRTIO_BLK_T_OUT` (write).
pub const T_OUT: u32 = 1;
/// Request type `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// Request type `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// Request type `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// Request type `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;

/// The 16-byte request header.
pub fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

impl Driver {
    /// virtio-blk: write `data` at `sector` and read it back on queue 0; panics unless both
    /// succeed and match.
    pub fn round_trip(&mut self, sector: u64, data: &[u8]) {
        let h = self.readable(&header(T_OUT, sector));
        let buf = self.readable(data);
        let s = self.writable(1);
        let used = self.exec_table("write", &linked(&[h, buf, s]), 0, &[(s.addr, 1)]);
        assert_eq!(
            (used, self.get(s.addr, 1)[0]),
            (1, S_OK),
            "write at {sector}"
        );
        let h = self.readable(&header(T_IN, sector));
        let len = data.len() as u32;
        let buf = self.writable(len);
        let s = self.writable(1);
        let allowed = [(buf.addr, u64::from(len)), (s.addr, 1)];
        let used = self.exec_table("read", &linked(&[h, buf, s]), 0, &allowed);
        assert_eq!(
            (used, self.get(s.addr, 1)[0]),
            (len + 1, S_OK),
            "read at {sector}"
        );
        assert!(
            self.get(buf.addr, data.len()) == data,
            "read back what was written at {sector}"
        );
    }

    /// virtio-blk: capacity in sectors, from the configuration space.
    pub fn capacity(&mut self) -> u64 {
        let (_, cfg) = self
            .fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .unwrap();
        u64::from_le_bytes(cfg[..8].try_into().unwrap())
    }
}
