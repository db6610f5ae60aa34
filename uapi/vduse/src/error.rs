//! Errors of the VDUSE character-device layer.

use std::io;
use std::path::PathBuf;

/// Errors from `/dev/vduse/*`, the IOTLB mapping and the message protocol.
///
/// Messages read as one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/vduse/control` does not exist.
    #[error("VDUSE not available: load the vduse module (modprobe vduse; needs CONFIG_VDPA_USER)")]
    NotAvailable,
    /// Opening or using a VDUSE node was refused.
    #[error("{path}: permission denied: VDUSE needs root (CAP_SYS_ADMIN)")]
    PermissionDenied {
        /// The node that was refused.
        path: PathBuf,
    },
    /// `VDUSE_CREATE_DEV` found a device of that name.
    #[error("a VDUSE device named {0} already exists (destroy it, or re-open it with VduseDevice::open)")]
    DeviceExists(String),
    /// `/dev/vduse/NAME` does not exist.
    #[error("no VDUSE device named {0} (create it first with VduseControl::create_device)")]
    NoSuchDevice(String),
    /// `/dev/vduse/NAME` is held open by another process.
    #[error("VDUSE device {0} is in use: another process holds /dev/vduse/{0} open")]
    DeviceBusy(String),
    /// The kernel does not offer the API version this crate needs.
    #[error("the kernel's VDUSE API version {kernel} is older than version {wanted} that this program needs")]
    ApiVersion {
        /// The version the kernel reported.
        kernel: u64,
        /// The version this crate needs.
        wanted: u64,
    },
    /// A device configuration was refused before it reached the kernel.
    #[error("invalid VDUSE device configuration: {0}")]
    InvalidConfig(String),
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The ioctl's name.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Opening a node failed for another reason.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// read(2)/write(2) of a VDUSE message failed or was short.
    #[error("VDUSE message I/O failed: {0}")]
    Message(io::Error),
    /// Mapping an IOTLB region into this process failed.
    #[error("cannot map IOVA range {start:#x}..={last:#x}: {reason}")]
    IotlbMap {
        /// First IOVA of the range.
        start: u64,
        /// Last IOVA of the range.
        last: u64,
        /// What went wrong.
        reason: String,
    },
}

/// Result alias of this crate's VDUSE layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps the errno of a failed ioctl.
    pub(crate) fn ioctl(op: &'static str, source: io::Error) -> Self {
        Error::Ioctl { op, source }
    }

    /// Maps the error of opening `path` to the most helpful variant.
    pub(crate) fn open(path: PathBuf, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied { path },
            _ => Error::Open { path, source },
        }
    }

    /// The OS error number behind this error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Ioctl { source, .. } | Error::Open { source, .. } | Error::Message(source) => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        assert!(Error::NotAvailable.to_string().contains("modprobe vduse"));
        let e = Error::open(
            "/dev/vduse/control".into(),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
        let e = Error::open(
            "/dev/vduse/x".into(),
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert!(matches!(e, Error::PermissionDenied { .. }));
        assert!(Error::DeviceExists("blk0".into())
            .to_string()
            .contains("a VDUSE device named blk0 already exists"));
    }
}
