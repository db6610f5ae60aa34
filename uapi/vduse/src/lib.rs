//! Safe Rust access to Linux VDUSE (vDPA Device in Userspace).
//!
//! - [`sys`]: raw `#[repr(C)]` bindings of `<linux/vduse.h>` and `<linux/vdpa.h>` constants.
//! - [`VduseControl`]: `/dev/vduse/control` — API version, create and destroy devices.
//! - [`VduseDevice`]: `/dev/vduse/NAME` — queues, kicks, interrupts, config space,
//!   IOTLB fds and the request/response message protocol ([`Message`], [`Response`]).
//! - [`IotlbMemory`]: the driver's IOVA space as `vm_memory::GuestMemoryMmap`.
//! - [`vdpa`]: the "vdpa" generic netlink family (attach/detach devices) and the sysfs
//!   steps that choose the bus driver (virtio_vdpa → /dev/vdX, vhost_vdpa →
//!   /dev/vhost-vdpa-N).
//!
//! Life cycle: [`VduseControl::create_device`] → [`VduseDevice::open`] →
//! [`VduseDevice::setup_vq`] for every queue → start answering messages →
//! [`vdpa::VdpaClient::add_device`]; tear down with [`vdpa::VdpaClient::del_device`] →
//! drop the [`VduseDevice`] → [`VduseControl::destroy_device`].
//!
//! `unsafe` lives only in [`sys`]-adjacent private modules (`raw` for ioctls,
//! `vdpa::socket` for the netlink socket), each block with a `// SAFETY:` comment.

#![deny(missing_docs)]

pub mod control;
pub mod device;
mod error;
pub mod iotlb;
pub mod message;
mod raw;
pub mod sys;
pub mod vdpa;

pub use control::{DeviceConfig, VduseControl};
pub use device::{IotlbEntry, IotlbPerm, VduseDevice, VqInfo};
pub use error::{Error, Result};
pub use iotlb::{IotlbMemory, IotlbSource};
pub use message::{Message, Request, Response, VqState};
