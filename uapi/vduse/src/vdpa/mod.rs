//! The vDPA bus: the "vdpa" generic netlink family (what `vdpa dev add/del` does) and
//! the sysfs steps that pick the bus driver.
//!
//! ```no_run
//! use vduse::vdpa::{VdpaClient, Driver, find_device_node, bind_driver};
//! let mut vdpa = VdpaClient::open()?;
//! vdpa.add_device("vduse0", "vduse")?;          // virtio_vdpa binds: /dev/vdX appears
//! bind_driver("vduse0", Driver::Vhost)?;       // or hand it to vhost_vdpa
//! let node = find_device_node("vduse0")?;      // Some("/dev/vhost-vdpa-0") once it exists
//! vdpa.del_device("vduse0")?;
//! # Ok::<(), vduse::vdpa::VdpaError>(())
//! ```

pub mod netlink;
mod socket;
pub mod sysfs;

use std::io;
use std::path::PathBuf;

use crate::sys::vdpa::*;
use netlink::{parse_attrs, parse_replies, Attr, GenlRequest, Reply};
use socket::NetlinkSocket;
pub use sysfs::{bind_driver, find_device_node, find_net_interface, virtio_driver, Driver, Sysfs};

/// Errors of the vdpa netlink client and the sysfs helpers.
#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    /// The kernel has no "vdpa" generic netlink family.
    #[error("vdpa netlink family not found: load the vdpa module (modprobe vdpa)")]
    FamilyNotFound,
    /// The operation needs privileges.
    #[error("vdpa {op}: permission denied: needs CAP_NET_ADMIN (run as root)")]
    PermissionDenied {
        /// What was attempted.
        op: &'static str,
    },
    /// A vdpa device with this name exists.
    #[error(
        "vdpa device name {0} is in use: delete it first (vdpa dev del {0}) or pick another name"
    )]
    NameInUse(String),
    /// No vdpa device with this name.
    #[error("no vdpa device named {0}")]
    NoSuchDevice(String),
    /// The management device (e.g. "vduse") is not registered.
    #[error("vdpa management device {0} not found: load its module (modprobe vduse)")]
    NoSuchMgmtDevice(String),
    /// VDUSE refused to attach the device.
    #[error("vdpa refused to add {name}: is there a VDUSE device named {name} with every queue set up (VDUSE_VQ_SETUP)? ({detail})")]
    NotReady {
        /// Device name.
        name: String,
        /// Kernel errno/extack text.
        detail: String,
    },
    /// Any other kernel error.
    #[error("vdpa {op} failed: {source}{}", .message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// What was attempted.
        op: &'static str,
        /// The errno.
        source: io::Error,
        /// The kernel's extended-ack text.
        message: Option<String>,
    },
    /// The netlink socket failed.
    #[error("vdpa netlink socket: {0}")]
    Socket(io::Error),
    /// The kernel's reply could not be decoded.
    #[error("malformed vdpa netlink reply: {0}")]
    Protocol(String),
    /// A sysfs file could not be read or written.
    #[error("{path}: {source}{}", if .source.raw_os_error() == Some(libc::EACCES) || .source.raw_os_error() == Some(libc::EPERM) { " (needs root)" } else { "" })]
    Sysfs {
        /// The sysfs path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A vDPA management device (`vdpa mgmtdev show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MgmtDevice {
    /// Bus name, absent for bus-less devices such as "vduse".
    pub bus_name: Option<String>,
    /// Device name ("vduse").
    pub dev_name: String,
    /// Bit mask of supported virtio device ids (bit 2 = block).
    pub supported_classes: u64,
}

/// A vDPA device (`vdpa dev show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VdpaDevice {
    /// Device name.
    pub name: String,
    /// Name of its management device.
    pub mgmtdev: String,
    /// virtio device id (2 = block).
    pub device_id: u32,
    /// virtio vendor id.
    pub vendor_id: u32,
    /// Number of virtqueues.
    pub max_vqs: u32,
    /// Largest queue size.
    pub max_vq_size: u16,
}

/// A generic netlink client for the "vdpa" family.
#[derive(Debug)]
pub struct VdpaClient {
    sock: NetlinkSocket,
    family: u16,
    seq: u32,
}

const RECV_BUF: usize = 64 * 1024;

fn kernel_error(op: &'static str, errno: i32, message: Option<String>) -> VdpaError {
    match errno {
        libc::EPERM | libc::EACCES => VdpaError::PermissionDenied { op },
        _ => VdpaError::Kernel {
            op,
            source: io::Error::from_raw_os_error(errno),
            message,
        },
    }
}

impl VdpaClient {
    /// Opens a netlink socket and resolves the "vdpa" family id.
    pub fn open() -> Result<Self, VdpaError> {
        let sock = NetlinkSocket::open().map_err(VdpaError::Socket)?;
        let mut client = VdpaClient {
            sock,
            family: netlink::GENL_ID_CTRL,
            seq: 0,
        };
        let req = GenlRequest::new(
            netlink::GENL_ID_CTRL,
            netlink::CTRL_CMD_GETFAMILY,
            1,
            netlink::NLM_F_ACK,
        )
        .attr_str(netlink::CTRL_ATTR_FAMILY_NAME, VDPA_GENL_NAME);
        let replies = client
            .transact(req, false)
            .map_err(|(errno, msg)| match errno {
                libc::ENOENT => VdpaError::FamilyNotFound,
                _ => kernel_error("family lookup", errno, msg),
            })?;
        let family = replies
            .iter()
            .flat_map(|attrs| parse_attrs(attrs))
            .find(|a| a.kind == netlink::CTRL_ATTR_FAMILY_ID)
            .and_then(|a| a.as_u16())
            .ok_or_else(|| VdpaError::Protocol("GETFAMILY reply without a family id".into()))?;
        client.family = family;
        Ok(client)
    }

    /// The resolved generic netlink family id.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    /// Sends `req` and collects the attribute bytes of every reply message. Errors are
    /// `(errno, extack message)`; `errno` is `-1` for socket/protocol failures.
    #[allow(clippy::type_complexity)]
    fn transact(
        &mut self,
        req: GenlRequest,
        dump: bool,
    ) -> Result<Vec<Vec<u8>>, (i32, Option<String>)> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let io_err = |e: io::Error| (e.raw_os_error().unwrap_or(-1), Some(e.to_string()));
        self.sock.send(&req.encode(seq)).map_err(io_err)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.sock.recv(&mut buf).map_err(io_err)?;
            let replies = parse_replies(&buf[..n]).map_err(|m| (-1, Some(m.0)))?;
            for reply in replies {
                match reply {
                    Reply::Genl { seq: s, attrs, .. } if s == seq => out.push(attrs),
                    Reply::Ack { seq: s } if s == seq => return Ok(out),
                    Reply::Done { seq: s } if s == seq && dump => return Ok(out),
                    Reply::Error {
                        seq: s,
                        errno,
                        message,
                    } if s == seq => return Err((errno, message)),
                    _ => {} // stale replies of an earlier, abandoned request
                }
            }
        }
    }

    fn request(&self, cmd: u8, flags: u16) -> GenlRequest {
        GenlRequest::new(self.family, cmd, VDPA_GENL_VERSION, flags)
    }

    fn protocol_or(op: &'static str) -> impl Fn((i32, Option<String>)) -> VdpaError {
        move |(errno, msg)| {
            if errno < 0 {
                VdpaError::Protocol(msg.unwrap_or_default())
            } else {
                kernel_error(op, errno, msg)
            }
        }
    }

    /// Lists management devices (`vdpa mgmtdev show`).
    pub fn list_mgmt_devices(&mut self) -> Result<Vec<MgmtDevice>, VdpaError> {
        let req = self.request(VDPA_CMD_MGMTDEV_GET, netlink::NLM_F_DUMP);
        let replies = self
            .transact(req, true)
            .map_err(Self::protocol_or("mgmtdev list"))?;
        Ok(replies
            .iter()
            .map(|a| decode_mgmtdev(&parse_attrs(a)))
            .collect())
    }

    /// Lists vdpa devices (`vdpa dev show`).
    pub fn list_devices(&mut self) -> Result<Vec<VdpaDevice>, VdpaError> {
        let req = self.request(VDPA_CMD_DEV_GET, netlink::NLM_F_DUMP);
        let replies = self
            .transact(req, true)
            .map_err(Self::protocol_or("dev list"))?;
        Ok(replies
            .iter()
            .map(|a| decode_device(&parse_attrs(a)))
            .collect())
    }

    /// Attaches device `name` of management device `mgmtdev` ("vduse") to the vdpa bus
    /// (`vdpa dev add name NAME mgmtdev vduse`). VDUSE messages arrive during this call:
    /// the device's message loop must already run on another thread.
    pub fn add_device(&mut self, name: &str, mgmtdev: &str) -> Result<(), VdpaError> {
        let req = self
            .request(VDPA_CMD_DEV_NEW, netlink::NLM_F_ACK)
            .attr_str(VDPA_ATTR_MGMTDEV_DEV_NAME, mgmtdev)
            .attr_str(VDPA_ATTR_DEV_NAME, name);
        self.transact(req, false)
            .map_err(|(errno, msg)| match errno {
                libc::EEXIST => VdpaError::NameInUse(name.to_owned()),
                libc::ENODEV => VdpaError::NoSuchMgmtDevice(mgmtdev.to_owned()),
                libc::EINVAL => VdpaError::NotReady {
                    name: name.to_owned(),
                    detail: msg.unwrap_or_else(|| "EINVAL".into()),
                },
                _ => Self::protocol_or("dev add")((errno, msg)),
            })?;
        Ok(())
    }

    /// Detaches device `name` from the vdpa bus (`vdpa dev del NAME`).
    pub fn del_device(&mut self, name: &str) -> Result<(), VdpaError> {
        let req = self
            .request(VDPA_CMD_DEV_DEL, netlink::NLM_F_ACK)
            .attr_str(VDPA_ATTR_DEV_NAME, name);
        self.transact(req, false)
            .map_err(|(errno, msg)| match errno {
                libc::ENODEV | libc::ENOENT => VdpaError::NoSuchDevice(name.to_owned()),
                _ => Self::protocol_or("dev del")((errno, msg)),
            })?;
        Ok(())
    }
}

fn decode_mgmtdev(attrs: &[Attr<'_>]) -> MgmtDevice {
    let mut m = MgmtDevice::default();
    for a in attrs {
        match a.kind {
            VDPA_ATTR_MGMTDEV_BUS_NAME => m.bus_name = a.as_str(),
            VDPA_ATTR_MGMTDEV_DEV_NAME => m.dev_name = a.as_str().unwrap_or_default(),
            VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES => {
                m.supported_classes = a.as_u64().unwrap_or_default()
            }
            _ => {}
        }
    }
    m
}

fn decode_device(attrs: &[Attr<'_>]) -> VdpaDevice {
    let mut d = VdpaDevice::default();
    for a in attrs {
        match a.kind {
            VDPA_ATTR_DEV_NAME => d.name = a.as_str().unwrap_or_default(),
            VDPA_ATTR_MGMTDEV_DEV_NAME => d.mgmtdev = a.as_str().unwrap_or_default(),
            VDPA_ATTR_DEV_ID => d.device_id = a.as_u32().unwrap_or_default(),
            VDPA_ATTR_DEV_VENDOR_ID => d.vendor_id = a.as_u32().unwrap_or_default(),
            VDPA_ATTR_DEV_MAX_VQS => d.max_vqs = a.as_u32().unwrap_or_default(),
            VDPA_ATTR_DEV_MAX_VQ_SIZE => d.max_vq_size = a.as_u16().unwrap_or_default(),
            _ => {}
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};

    fn attrs_of(req: GenlRequest) -> Vec<u8> {
        req.encode(0)[20..].to_vec()
    }

    #[test]
    fn decodes_mgmtdev_and_device_attributes() {
        let m = attrs_of(
            GenlRequest::new(0, 0, 0, 0)
                .attr_str(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse")
                .attr_bytes(
                    VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES,
                    &((1u64 << VIRTIO_ID_NET) | (1 << VIRTIO_ID_BLOCK)).to_ne_bytes(),
                ),
        );
        let m = decode_mgmtdev(&parse_attrs(&m));
        assert_eq!(m.dev_name, "vduse");
        assert_eq!(m.bus_name, None);
        assert_eq!(m.supported_classes, 0b110);

        let d = attrs_of(
            GenlRequest::new(0, 0, 0, 0)
                .attr_str(VDPA_ATTR_DEV_NAME, "vduse0")
                .attr_str(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse")
                .attr_u32(VDPA_ATTR_DEV_ID, 2)
                .attr_u32(VDPA_ATTR_DEV_VENDOR_ID, 0)
                .attr_u32(VDPA_ATTR_DEV_MAX_VQS, 1)
                .attr_bytes(VDPA_ATTR_DEV_MAX_VQ_SIZE, &256u16.to_ne_bytes()),
        );
        let d = decode_device(&parse_attrs(&d));
        assert_eq!(
            d,
            VdpaDevice {
                name: "vduse0".into(),
                mgmtdev: "vduse".into(),
                device_id: 2,
                vendor_id: 0,
                max_vqs: 1,
                max_vq_size: 256
            }
        );
    }

    #[test]
    fn error_messages_say_what_to_do() {
        assert!(VdpaError::FamilyNotFound
            .to_string()
            .contains("modprobe vdpa"));
        assert!(kernel_error("dev add", libc::EPERM, None)
            .to_string()
            .contains("CAP_NET_ADMIN"));
        assert!(VdpaError::NameInUse("x".into())
            .to_string()
            .contains("in use"));
        let e = kernel_error("dev del", libc::EIO, Some("boom".into())).to_string();
        assert!(e.contains("dev del") && e.contains("(boom)"), "{e}");
    }

    #[test]
    fn client_opens_or_reports_missing_family() {
        // The build host has no vdpa module: the family lookup must map to the
        // "load the vdpa module" error (or succeed where vdpa exists).
        match VdpaClient::open() {
            Ok(c) => assert!(c.family_id() >= netlink::GENL_ID_CTRL),
            Err(e) => assert!(
                matches!(e, VdpaError::FamilyNotFound | VdpaError::Socket(_)),
                "{e}"
            ),
        }
    }
}
