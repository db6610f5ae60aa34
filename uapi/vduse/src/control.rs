//! `/dev/vduse/control`: API version negotiation, device creation and destruction.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use virtio_bindings::{virtio_config, virtio_ids};

use crate::error::{Error, Result};
use crate::raw;
use crate::sys;

/// Path of the VDUSE control node.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
/// Feature mask of `VIRTIO_F_VERSION_1` (modern virtio).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
/// Feature mask of `VIRTIO_F_ACCESS_PLATFORM`; VDUSE refuses devices without it.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << virtio_config::VIRTIO_F_ACCESS_PLATFORM;
/// Largest config space VDUSE accepts (one page).
pub const MAX_CONFIG_SIZE: usize = 4096;

/// What `VDUSE_CREATE_DEV` needs to create a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Device name: becomes `/dev/vduse/NAME` and the vdpa device name.
    pub name: String,
    /// virtio device id (2 = block).
    pub device_id: u32,
    /// virtio vendor id (any value; 0 is fine).
    pub vendor_id: u32,
    /// Offered virtio features; must include [`VIRTIO_F_ACCESS_PLATFORM`].
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of virtqueue metadata (e.g. 4096).
    pub vq_align: u32,
    /// Initial device config space (e.g. `struct virtio_blk_config`), at most 4096 bytes.
    pub config: Vec<u8>,
}

impl DeviceConfig {
    /// A block device config with `VERSION_1 | ACCESS_PLATFORM` features.
    pub fn block(name: impl Into<String>, vq_num: u32, config: Vec<u8>) -> Self {
        DeviceConfig {
            name: name.into(),
            device_id: VIRTIO_ID_BLOCK,
            vendor_id: 0,
            features: VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM,
            vq_num,
            vq_align: 4096,
            config,
        }
    }

    /// Serialises the config as the `CREATE_DEV` ioctl argument (header + config bytes).
    pub(crate) fn to_ioctl_bytes(&self) -> Result<Vec<u8>> {
        let name = validate_name(&self.name)?;
        if self.features & VIRTIO_F_ACCESS_PLATFORM == 0 {
            return Err(Error::InvalidConfig(
                "features must include VIRTIO_F_ACCESS_PLATFORM (bit 33)".into(),
            ));
        }
        if self.config.len() > MAX_CONFIG_SIZE {
            return Err(Error::InvalidConfig(format!(
                "config space is {} bytes, VDUSE allows at most {MAX_CONFIG_SIZE}",
                self.config.len()
            )));
        }
        if self.vq_num == 0 || self.vq_num > 0xffff {
            return Err(Error::InvalidConfig(format!(
                "vq_num {} is not in 1..=65535",
                self.vq_num
            )));
        }
        if self.vq_align as usize > MAX_CONFIG_SIZE {
            return Err(Error::InvalidConfig(format!(
                "vq_align {} exceeds 4096",
                self.vq_align
            )));
        }
        let header = sys::vduse_dev_config {
            name,
            vendor_id: self.vendor_id,
            device_id: self.device_id,
            features: self.features,
            vq_num: self.vq_num,
            vq_align: self.vq_align,
            reserved: [0; 13],
            config_size: self.config.len() as u32,
        };
        let mut buf = Vec::with_capacity(size_of::<sys::vduse_dev_config>() + self.config.len());
        buf.extend_from_slice(&header.name);
        buf.extend_from_slice(&header.vendor_id.to_ne_bytes());
        buf.extend_from_slice(&header.device_id.to_ne_bytes());
        buf.extend_from_slice(&header.features.to_ne_bytes());
        buf.extend_from_slice(&header.vq_num.to_ne_bytes());
        buf.extend_from_slice(&header.vq_align.to_ne_bytes());
        buf.extend_from_slice(&[0u8; 13 * 4]);
        buf.extend_from_slice(&header.config_size.to_ne_bytes());
        debug_assert_eq!(buf.len(), size_of::<sys::vduse_dev_config>());
        buf.extend_from_slice(&self.config);
        Ok(buf)
    }
}

/// Checks a device name and returns it as the NUL-padded C array.
pub(crate) fn validate_name(name: &str) -> Result<[u8; sys::VDUSE_NAME_MAX]> {
    if name.is_empty() || name.len() >= sys::VDUSE_NAME_MAX {
        return Err(Error::InvalidConfig(format!(
            "device name must be 1..{} bytes long",
            sys::VDUSE_NAME_MAX
        )));
    }
    if name.bytes().any(|b| b == 0 || b == b'/') || name == "." || name == ".." || name == "control"
    {
        return Err(Error::InvalidConfig(format!(
            "device name {name:?} may not contain '/' or NUL, nor be '.', '..' or 'control'"
        )));
    }
    let mut out = [0u8; sys::VDUSE_NAME_MAX];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

/// An open `/dev/vduse/control` with the API version negotiated.
#[derive(Debug)]
pub struct VduseControl {
    file: File,
    api_version: u64,
    kernel_api_version: u64,
}

impl VduseControl {
    /// Opens `/dev/vduse/control` and negotiates API version 0.
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(CONTROL_PATH))
    }

    /// Opens a control node at `path` (tests, containers with another /dev).
    pub fn open_path(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => Error::NotAvailable,
                _ => Error::open(path.to_owned(), e),
            })?;
        let mut kernel_version = 0u64;
        raw::ioctl_inout(&file, sys::VDUSE_GET_API_VERSION, &mut kernel_version)
            .map_err(|e| Error::ioctl("VDUSE_GET_API_VERSION", e))?;
        // Version 0 is all we use, and every kernel with VDUSE supports it; newer
        // versions (VQ groups, ASIDs) stay off until this crate learns them.
        let api_version = sys::VDUSE_API_VERSION;
        raw::ioctl_in(&file, sys::VDUSE_SET_API_VERSION, &api_version)
            .map_err(|e| Error::ioctl("VDUSE_SET_API_VERSION", e))?;
        Ok(VduseControl {
            file,
            api_version,
            kernel_api_version: kernel_version,
        })
    }

    /// The negotiated API version (always 0 for now).
    pub fn api_version(&self) -> u64 {
        self.api_version
    }

    /// The newest API version the kernel offered.
    pub fn kernel_api_version(&self) -> u64 {
        self.kernel_api_version
    }

    /// Creates a VDUSE device; `/dev/vduse/NAME` appears on success.
    pub fn create_device(&self, config: &DeviceConfig) -> Result<()> {
        let buf = config.to_ioctl_bytes()?;
        raw::ioctl_in_bytes(&self.file, sys::VDUSE_CREATE_DEV, &buf).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EEXIST) => Error::DeviceExists(config.name.clone()),
                Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                    path: CONTROL_PATH.into(),
                },
                _ => Error::ioctl("VDUSE_CREATE_DEV", e),
            }
        })?;
        Ok(())
    }

    /// Destroys a VDUSE device. It must be detached from the vdpa bus and closed first.
    pub fn destroy_device(&self, name: &str) -> Result<()> {
        let cname = validate_name(name)?;
        raw::ioctl_in(&self.file, sys::VDUSE_DESTROY_DEV, &cname).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EBUSY) => Error::DeviceBusy(name.to_owned()),
                Some(libc::EINVAL) | Some(libc::ENOENT) => Error::NoSuchDevice(name.to_owned()),
                _ => Error::ioctl("VDUSE_DESTROY_DEV", e),
            }
        })?;
        Ok(())
    }
}

/// True when `/dev/vduse/control` exists (the vduse module is loaded).
pub fn vduse_available() -> bool {
    Path::new(CONTROL_PATH).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dev_bytes_match_the_c_layout() {
        let cfg = DeviceConfig::block("blk0", 1, vec![0xaa; 8]);
        let b = cfg.to_ioctl_bytes().unwrap();
        assert_eq!(b.len(), 336 + 8);
        assert_eq!(&b[..4], b"blk0");
        assert_eq!(b[4], 0);
        assert_eq!(u32::from_ne_bytes(b[256..260].try_into().unwrap()), 0); // vendor
        assert_eq!(u32::from_ne_bytes(b[260..264].try_into().unwrap()), 2); // device id
        let features = u64::from_ne_bytes(b[264..272].try_into().unwrap());
        assert_eq!(features, VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
        assert_eq!(u32::from_ne_bytes(b[272..276].try_into().unwrap()), 1); // vq_num
        assert_eq!(u32::from_ne_bytes(b[276..280].try_into().unwrap()), 4096);
        assert!(b[280..332].iter().all(|&x| x == 0)); // reserved
        assert_eq!(u32::from_ne_bytes(b[332..336].try_into().unwrap()), 8);
        assert_eq!(&b[336..], &[0xaa; 8]);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let mut cfg = DeviceConfig::block("blk0", 1, vec![]);
        cfg.features = VIRTIO_F_VERSION_1;
        assert!(cfg
            .to_ioctl_bytes()
            .unwrap_err()
            .to_string()
            .contains("ACCESS_PLATFORM"));
        let cfg = DeviceConfig::block("a/b", 1, vec![]);
        assert!(matches!(cfg.to_ioctl_bytes(), Err(Error::InvalidConfig(_))));
        let cfg = DeviceConfig::block("x".repeat(256), 1, vec![]);
        assert!(cfg.to_ioctl_bytes().is_err());
        let cfg = DeviceConfig::block("ok", 0, vec![]);
        assert!(cfg.to_ioctl_bytes().is_err());
        let cfg = DeviceConfig::block("ok", 1, vec![0; 4097]);
        assert!(cfg.to_ioctl_bytes().is_err());
        assert!(validate_name("control").is_err());
    }

    #[test]
    fn missing_control_node_says_load_the_module() {
        let err = VduseControl::open_path(Path::new("/nonexistent/vduse/control")).unwrap_err();
        assert!(matches!(err, Error::NotAvailable));
        assert!(err.to_string().contains("modprobe vduse"));
    }
}
