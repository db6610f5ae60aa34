//! `/dev/vduse/NAME`: virtqueue setup and info, kicks and interrupts, config space,
//! IOTLB file descriptors and the message protocol.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use vmm_sys_util::eventfd::EventFd;

use crate::control::validate_name;
use crate::error::{Error, Result};
use crate::message::{Message, Response, VqState, REQUEST_SIZE};
use crate::raw;
use crate::sys;

/// Directory of the VDUSE device nodes.
pub const DEVICE_DIR: &str = "/dev/vduse";

/// Access the driver granted to an IOVA region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbPerm {
    /// The device may only read.
    ReadOnly,
    /// The device may only write (cannot be mmapped: Linux needs read access for that).
    WriteOnly,
    /// The device may read and write.
    ReadWrite,
}

impl IotlbPerm {
    /// Decodes `VDUSE_ACCESS_*`; `None` for 0 or unknown bits.
    pub fn from_raw(perm: u8) -> Option<Self> {
        match perm {
            sys::VDUSE_ACCESS_RO => Some(IotlbPerm::ReadOnly),
            sys::VDUSE_ACCESS_WO => Some(IotlbPerm::WriteOnly),
            sys::VDUSE_ACCESS_RW => Some(IotlbPerm::ReadWrite),
            _ => None,
        }
    }

    /// The `VDUSE_ACCESS_*` value.
    pub fn to_raw(self) -> u8 {
        match self {
            IotlbPerm::ReadOnly => sys::VDUSE_ACCESS_RO,
            IotlbPerm::WriteOnly => sys::VDUSE_ACCESS_WO,
            IotlbPerm::ReadWrite => sys::VDUSE_ACCESS_RW,
        }
    }

    /// Whether the driver allows device writes.
    pub fn writable(self) -> bool {
        self != IotlbPerm::ReadOnly
    }
}

/// One IOTLB entry: IOVA range `start..=last` is at `offset` in the returned fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// mmap offset of `start` in the fd.
    pub offset: u64,
    /// Granted access.
    pub perm: IotlbPerm,
}

impl IotlbEntry {
    /// Length in bytes (`None` for the whole 2^64 space, which cannot be mapped).
    pub fn len(&self) -> Option<u64> {
        (self.last - self.start).checked_add(1)
    }

    /// Whether the entry is empty (never true for kernel entries).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `iova` lies in the entry.
    pub fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.last
    }
}

/// A virtqueue's addresses and state from `VDUSE_VQ_GET_INFO` (all IOVAs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VqInfo {
    /// Virtqueue index.
    pub index: u32,
    /// Queue size the driver chose.
    pub num: u32,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the driver area (split: avail ring).
    pub driver_addr: u64,
    /// IOVA of the device area (split: used ring).
    pub device_addr: u64,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Split ring: next available index to process (where to resume).
    pub avail_index: u16,
    /// The same state bytes read as packed-ring state (meaningful only with RING_PACKED).
    pub packed: VqState,
}

/// An open `/dev/vduse/NAME`.
///
/// Only one process may hold it open at a time. Opening an existing device is how a
/// restarted daemon reconnects: the kernel keeps the device and its undelivered messages.
#[derive(Debug)]
pub struct VduseDevice {
    file: File,
    name: String,
}

impl VduseDevice {
    /// Opens `/dev/vduse/NAME` (new or already existing device).
    pub fn open(name: &str) -> Result<Self> {
        validate_name(name)?;
        let path = PathBuf::from(DEVICE_DIR).join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => Error::NoSuchDevice(name.to_owned()),
                Some(libc::EBUSY) => Error::DeviceBusy(name.to_owned()),
                _ => Error::open(path, e),
            })?;
        Ok(VduseDevice {
            file,
            name: name.to_owned(),
        })
    }

    /// Takes over `/dev/vduse/NAME` opened by another process (an fd handed over a unix
    /// socket, e.g. by a daemon upgrading in place): the open is not repeated, so the kernel
    /// never sees the device closed.
    pub fn from_fd(name: &str, fd: OwnedFd) -> Result<Self> {
        validate_name(name)?;
        Ok(VduseDevice {
            file: File::from(fd),
            name: name.to_owned(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes reads non-blocking (then use [`Self::try_read_request`] after poll).
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        raw::set_nonblocking(&self.file, nonblocking)
            .map_err(|e| Error::ioctl("fcntl(O_NONBLOCK)", e))
    }

    /// `VDUSE_VQ_SETUP`: declares queue `index` with at most `max_size` entries. Call for
    /// every queue before attaching the device to the vdpa bus.
    pub fn setup_vq(&self, index: u32, max_size: u16) -> Result<()> {
        let cfg = sys::vduse_vq_config {
            index,
            max_size,
            reserved: [0; 13],
        };
        raw::ioctl_in(&self.file, sys::VDUSE_VQ_SETUP, &cfg)
            .map_err(|e| Error::ioctl("VDUSE_VQ_SETUP", e))?;
        Ok(())
    }

    /// `VDUSE_VQ_GET_INFO`: the queue's IOVAs, size, readiness and avail index.
    pub fn vq_info(&self, index: u32) -> Result<VqInfo> {
        let mut info = sys::vduse_vq_info {
            index,
            ..Default::default()
        };
        raw::ioctl_inout(&self.file, sys::VDUSE_VQ_GET_INFO, &mut info)
            .map_err(|e| Error::ioctl("VDUSE_VQ_GET_INFO", e))?;
        let (split, packed) = raw::vq_state_union(&info.state);
        Ok(VqInfo {
            index: info.index,
            num: info.num,
            desc_addr: info.desc_addr,
            driver_addr: info.driver_addr,
            device_addr: info.device_addr,
            ready: info.ready != 0,
            avail_index: split.avail_index,
            packed: VqState::Packed {
                last_avail_counter: packed.last_avail_counter,
                last_avail_idx: packed.last_avail_idx,
                last_used_counter: packed.last_used_counter,
                last_used_idx: packed.last_used_idx,
            },
        })
    }

    /// `VDUSE_VQ_SETUP_KICKFD`: the kernel signals `kick` when the driver kicks queue
    /// `index`; `None` removes it.
    pub fn set_vq_kickfd(&self, index: u32, kick: Option<&EventFd>) -> Result<()> {
        let arg = sys::vduse_vq_eventfd {
            index,
            fd: kick.map_or(sys::VDUSE_EVENTFD_DEASSIGN, |e| e.as_raw_fd()),
        };
        raw::ioctl_in(&self.file, sys::VDUSE_VQ_SETUP_KICKFD, &arg)
            .map_err(|e| Error::ioctl("VDUSE_VQ_SETUP_KICKFD", e))?;
        Ok(())
    }

    /// `VDUSE_VQ_INJECT_IRQ`: interrupts the driver for queue `index` (used buffers).
    pub fn inject_vq_irq(&self, index: u32) -> Result<()> {
        raw::ioctl_in(&self.file, sys::VDUSE_VQ_INJECT_IRQ, &index)
            .map_err(|e| Error::ioctl("VDUSE_VQ_INJECT_IRQ", e))?;
        Ok(())
    }

    /// `VDUSE_DEV_INJECT_CONFIG_IRQ`: tells the driver the config space changed.
    pub fn inject_config_irq(&self) -> Result<()> {
        raw::ioctl_none(&self.file, sys::VDUSE_DEV_INJECT_CONFIG_IRQ)
            .map_err(|e| Error::ioctl("VDUSE_DEV_INJECT_CONFIG_IRQ", e))?;
        Ok(())
    }

    /// `VDUSE_DEV_GET_FEATURES`: the features the driver accepted (valid after FEATURES_OK).
    pub fn get_features(&self) -> Result<u64> {
        let mut features = 0u64;
        raw::ioctl_inout(&self.file, sys::VDUSE_DEV_GET_FEATURES, &mut features)
            .map_err(|e| Error::ioctl("VDUSE_DEV_GET_FEATURES", e))?;
        Ok(features)
    }

    /// `VDUSE_DEV_SET_CONFIG`: overwrites config space bytes at `offset` (e.g. capacity
    /// after a resize; follow with [`Self::inject_config_irq`]).
    pub fn set_config(&self, offset: u32, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() || bytes.len() > crate::control::MAX_CONFIG_SIZE {
            return Err(Error::InvalidConfig(format!(
                "set_config length {} is not in 1..=4096",
                bytes.len()
            )));
        }
        let mut buf = Vec::with_capacity(8 + bytes.len());
        buf.extend_from_slice(&offset.to_ne_bytes());
        buf.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
        buf.extend_from_slice(bytes);
        raw::ioctl_in_bytes(&self.file, sys::VDUSE_DEV_SET_CONFIG, &buf)
            .map_err(|e| Error::ioctl("VDUSE_DEV_SET_CONFIG", e))?;
        Ok(())
    }

    /// `VDUSE_IOTLB_GET_FD`: the first IOTLB entry overlapping `start..=last` and an fd to
    /// mmap it from; `None` when no entry overlaps (the kernel's EINVAL).
    pub fn iotlb_get_fd(&self, start: u64, last: u64) -> Result<Option<(IotlbEntry, OwnedFd)>> {
        let mut raw_entry = sys::vduse_iotlb_entry {
            start,
            last,
            ..Default::default()
        };
        let fd = match raw::iotlb_get_fd(&self.file, &mut raw_entry) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(Error::ioctl("VDUSE_IOTLB_GET_FD", e)),
        };
        let perm = IotlbPerm::from_raw(raw_entry.perm).ok_or_else(|| Error::IotlbMap {
            start: raw_entry.start,
            last: raw_entry.last,
            reason: format!("unknown permission {:#x}", raw_entry.perm),
        })?;
        let entry = IotlbEntry {
            start: raw_entry.start,
            last: raw_entry.last,
            offset: raw_entry.offset,
            perm,
        };
        Ok(Some((entry, fd)))
    }

    /// Reads one request, blocking unless the fd is non-blocking.
    pub fn read_request(&self) -> Result<Message> {
        let mut buf = [0u8; REQUEST_SIZE];
        loop {
            match (&self.file).read(&mut buf) {
                Ok(n) if n == REQUEST_SIZE => return Ok(Message::decode(&buf)),
                Ok(n) => {
                    return Err(Error::Message(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short VDUSE request: {n} of {REQUEST_SIZE} bytes"),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Message(e)),
            }
        }
    }

    /// Reads one request if one is pending (non-blocking fd), else `None`.
    pub fn try_read_request(&self) -> Result<Option<Message>> {
        match self.read_request() {
            Ok(m) => Ok(Some(m)),
            Err(Error::Message(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the response to a request.
    pub fn write_response(&self, response: &Response) -> Result<()> {
        let buf = response.encode();
        loop {
            match (&self.file).write(&buf) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => {
                    return Err(Error::Message(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short VDUSE response write: {n} of {} bytes", buf.len()),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Message(e)),
            }
        }
    }
}

impl AsFd for VduseDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for VduseDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_round_trip() {
        for p in [
            IotlbPerm::ReadOnly,
            IotlbPerm::WriteOnly,
            IotlbPerm::ReadWrite,
        ] {
            assert_eq!(IotlbPerm::from_raw(p.to_raw()), Some(p));
        }
        assert_eq!(IotlbPerm::from_raw(0), None);
        assert!(!IotlbPerm::ReadOnly.writable());
    }

    #[test]
    fn entry_len_and_contains() {
        let e = IotlbEntry {
            start: 0x1000,
            last: 0x1fff,
            offset: 0,
            perm: IotlbPerm::ReadWrite,
        };
        assert_eq!(e.len(), Some(0x1000));
        assert!(e.contains(0x1000) && e.contains(0x1fff) && !e.contains(0x2000));
        let all = IotlbEntry {
            start: 0,
            last: u64::MAX,
            offset: 0,
            perm: IotlbPerm::ReadWrite,
        };
        assert_eq!(all.len(), None);
    }

    #[test]
    fn open_of_missing_device_is_a_clear_error() {
        // The host has no VDUSE: /dev/vduse/NAME is missing.
        let err = VduseDevice::open("virtiod-test-missing").unwrap_err();
        assert!(matches!(err, Error::NoSuchDevice(_)), "{err}");
        assert!(VduseDevice::open("bad/name").is_err());
    }
}
