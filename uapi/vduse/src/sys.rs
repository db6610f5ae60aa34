//! Raw `#[repr(C)]` bindings of `<linux/vduse.h>` and the constants of `<linux/vdpa.h>`.
//!
//! Hand-written from the 6.12 UAPI header (API version 0). Every struct has a
//! compile-time size check against the layout the C compiler gives the header.

#![allow(non_camel_case_types)]

/// The ioctl "type" byte of every VDUSE ioctl.
pub const VDUSE_BASE: u32 = 0x81;
/// The API version this crate speaks (version 0: no VQ groups / ASIDs).
pub const VDUSE_API_VERSION: u64 = 0;
/// Size of the `name` field of [`vduse_dev_config`] (including the NUL).
pub const VDUSE_NAME_MAX: usize = 256;

/// IOTLB permission: read only.
pub const VDUSE_ACCESS_RO: u8 = 0x1;
/// IOTLB permission: write only.
pub const VDUSE_ACCESS_WO: u8 = 0x2;
/// IOTLB permission: read and write.
pub const VDUSE_ACCESS_RW: u8 = 0x3;
/// `fd` value of [`vduse_vq_eventfd`] that removes the kick eventfd.
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;
/// Capability bit of [`vduse_iova_info`]: the region supports REG_UMEM.
pub const VDUSE_IOVA_CAP_UMEM: u64 = 1 << 0;

/// Request type: the kernel asks for a virtqueue's state.
pub const VDUSE_GET_VQ_STATE: u32 = 0;
/// Request type: the driver wrote the device status.
pub const VDUSE_SET_STATUS: u32 = 1;
/// Request type: an IOVA range's mapping changed; remap it with IOTLB_GET_FD.
pub const VDUSE_UPDATE_IOTLB: u32 = 2;
/// Response result: success.
pub const VDUSE_REQ_RESULT_OK: u32 = 0x00;
/// Response result: failure.
pub const VDUSE_REQ_RESULT_FAILED: u32 = 0x01;

/// `struct vduse_dev_config` (followed in memory by `config_size` bytes of config space).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_config {
    /// Device name, NUL-terminated: `/dev/vduse/NAME` and the vdpa device name.
    pub name: [u8; VDUSE_NAME_MAX],
    /// virtio vendor id.
    pub vendor_id: u32,
    /// virtio device id (`VIRTIO_ID_BLOCK` for a block device).
    pub device_id: u32,
    /// Feature bits the device offers.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of the virtqueue rings (bytes).
    pub vq_align: u32,
    /// Must be zero.
    pub reserved: [u32; 13],
    /// Bytes of config space that follow this struct.
    pub config_size: u32,
    // __u8 config[] follows.
}

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iotlb_entry {
    /// Offset of the mapping in the file `VDUSE_IOTLB_GET_FD` returns.
    pub offset: u64,
    /// First IOVA of the range.
    pub start: u64,
    /// Last IOVA of the range (inclusive).
    pub last: u64,
    /// Access the driver granted: `VDUSE_ACCESS_RO`, `_WO` or `_RW`.
    pub perm: u8,
}

/// `struct vduse_config_data` (followed by `length` bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_config_data {
    /// Offset in the config space.
    pub offset: u32,
    /// Bytes that follow this struct.
    pub length: u32,
    // __u8 buffer[] follows.
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_config {
    /// Virtqueue index.
    pub index: u32,
    /// Largest queue size the device accepts.
    pub max_size: u16,
    /// Must be zero.
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_state_split`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_state_split {
    /// Next available-ring index the device will read.
    pub avail_index: u16,
}

/// `struct vduse_vq_state_packed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_state_packed {
    /// Wrap counter of the next available descriptor.
    pub last_avail_counter: u16,
    /// Index of the next available descriptor.
    pub last_avail_idx: u16,
    /// Wrap counter of the next used descriptor.
    pub last_used_counter: u16,
    /// Index of the next used descriptor.
    pub last_used_idx: u16,
}

/// The anonymous split/packed union inside `vduse_vq_info` and `vduse_vq_state`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_vq_state_union {
    /// State of a split virtqueue.
    pub split: vduse_vq_state_split,
    /// State of a packed virtqueue.
    pub packed: vduse_vq_state_packed,
}

impl Default for vduse_vq_state_union {
    fn default() -> Self {
        vduse_vq_state_union {
            packed: vduse_vq_state_packed::default(),
        }
    }
}

/// `struct vduse_vq_info`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_info {
    /// Virtqueue index (set by the caller).
    pub index: u32,
    /// Queue size the driver chose.
    pub num: u32,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the driver area (available ring).
    pub driver_addr: u64,
    /// IOVA of the device area (used ring).
    pub device_addr: u64,
    /// Where the device resumes (split or packed).
    pub state: vduse_vq_state_union,
    /// Non-zero once the driver enabled the queue.
    pub ready: u8,
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_eventfd {
    /// Virtqueue index.
    pub index: u32,
    /// eventfd signalled on a kick, or `VDUSE_EVENTFD_DEASSIGN`.
    pub fd: i32,
}

/// `struct vduse_iova_umem`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_umem {
    /// Start of the user memory in this process.
    pub uaddr: u64,
    /// IOVA it is registered at.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Must be zero.
    pub reserved: [u64; 3],
}

/// `struct vduse_iova_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_info {
    /// First IOVA of the range (input).
    pub start: u64,
    /// Last IOVA of the range (input, inclusive).
    pub last: u64,
    /// `VDUSE_IOVA_CAP_*` bits of the range.
    pub capability: u64,
    /// Must be zero.
    pub reserved: [u64; 3],
}

/// `struct vduse_vq_state`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_state {
    /// Virtqueue index.
    pub index: u32,
    /// Split or packed state.
    pub state: vduse_vq_state_union,
}

/// `struct vduse_dev_status`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_dev_status {
    /// virtio device status byte.
    pub status: u8,
}

/// `struct vduse_iova_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_range {
    /// First IOVA (inclusive).
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

/// The payload union of `vduse_dev_request`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_dev_request_payload {
    /// `VDUSE_GET_VQ_STATE`: the queue asked about.
    pub vq_state: vduse_vq_state,
    /// `VDUSE_SET_STATUS`: the status the driver wrote.
    pub s: vduse_dev_status,
    /// `VDUSE_UPDATE_IOTLB`: the range whose mapping changed.
    pub iova: vduse_iova_range,
    /// Fixes the size of the union.
    pub padding: [u32; 32],
}

/// `struct vduse_dev_request`: what read(2) on /dev/vduse/NAME returns.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_request {
    /// `VDUSE_GET_VQ_STATE`, `VDUSE_SET_STATUS` or `VDUSE_UPDATE_IOTLB`.
    pub type_: u32,
    /// Echoed in the response.
    pub request_id: u32,
    /// Zero.
    pub reserved: [u32; 4],
    /// Depends on `type_`.
    pub payload: vduse_dev_request_payload,
}

/// The payload union of `vduse_dev_response`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_dev_response_payload {
    /// Answer to `VDUSE_GET_VQ_STATE`.
    pub vq_state: vduse_vq_state,
    /// Fixes the size of the union.
    pub padding: [u32; 32],
}

/// `struct vduse_dev_response`: what write(2) on /dev/vduse/NAME takes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_response {
    /// The `request_id` of the request answered.
    pub request_id: u32,
    /// `VDUSE_REQ_RESULT_OK` or `VDUSE_REQ_RESULT_FAILED`.
    pub result: u32,
    /// Must be zero.
    pub reserved: [u32; 4],
    /// The answer, for requests that have one.
    pub payload: vduse_dev_response_payload,
}

impl Default for vduse_dev_response {
    fn default() -> Self {
        vduse_dev_response {
            request_id: 0,
            result: 0,
            reserved: [0; 4],
            payload: vduse_dev_response_payload { padding: [0; 32] },
        }
    }
}

// Layout checks against the C header (values from gcc on x86_64 with the 6.12 header).
const _: () = assert!(size_of::<vduse_dev_config>() == 336);
const _: () = assert!(size_of::<vduse_iotlb_entry>() == 32);
const _: () = assert!(size_of::<vduse_config_data>() == 8);
const _: () = assert!(size_of::<vduse_vq_config>() == 32);
const _: () = assert!(size_of::<vduse_vq_state_split>() == 2);
const _: () = assert!(size_of::<vduse_vq_state_packed>() == 8);
const _: () = assert!(size_of::<vduse_vq_info>() == 48);
const _: () = assert!(std::mem::offset_of!(vduse_vq_info, state) == 32);
const _: () = assert!(std::mem::offset_of!(vduse_vq_info, ready) == 40);
const _: () = assert!(size_of::<vduse_vq_eventfd>() == 8);
const _: () = assert!(size_of::<vduse_iova_umem>() == 48);
const _: () = assert!(size_of::<vduse_iova_info>() == 48);
const _: () = assert!(size_of::<vduse_vq_state>() == 12);
const _: () = assert!(size_of::<vduse_dev_status>() == 1);
const _: () = assert!(size_of::<vduse_iova_range>() == 16);
const _: () = assert!(size_of::<vduse_dev_request>() == 152);
const _: () = assert!(std::mem::offset_of!(vduse_dev_request, payload) == 24);
const _: () = assert!(size_of::<vduse_dev_response>() == 152);
const _: () = assert!(std::mem::offset_of!(vduse_dev_response, payload) == 24);

// ioctl number encoding (asm-generic: x86_64, aarch64, riscv64).
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (VDUSE_BASE << 8) | nr) as u64
}

/// `_IOR(VDUSE_BASE, 0x00, __u64)`
pub const VDUSE_GET_API_VERSION: u64 = ioc(IOC_READ, 0x00, 8);
/// `_IOW(VDUSE_BASE, 0x01, __u64)`
pub const VDUSE_SET_API_VERSION: u64 = ioc(IOC_WRITE, 0x01, 8);
/// `_IOW(VDUSE_BASE, 0x02, struct vduse_dev_config)`
pub const VDUSE_CREATE_DEV: u64 = ioc(IOC_WRITE, 0x02, size_of::<vduse_dev_config>());
/// `_IOW(VDUSE_BASE, 0x03, char[VDUSE_NAME_MAX])`
pub const VDUSE_DESTROY_DEV: u64 = ioc(IOC_WRITE, 0x03, VDUSE_NAME_MAX);
/// `_IOWR(VDUSE_BASE, 0x10, struct vduse_iotlb_entry)`
pub const VDUSE_IOTLB_GET_FD: u64 = ioc(IOC_READ | IOC_WRITE, 0x10, size_of::<vduse_iotlb_entry>());
/// `_IOR(VDUSE_BASE, 0x11, __u64)`
pub const VDUSE_DEV_GET_FEATURES: u64 = ioc(IOC_READ, 0x11, 8);
/// `_IOW(VDUSE_BASE, 0x12, struct vduse_config_data)`
pub const VDUSE_DEV_SET_CONFIG: u64 = ioc(IOC_WRITE, 0x12, size_of::<vduse_config_data>());
/// `_IO(VDUSE_BASE, 0x13)`
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: u64 = ioc(IOC_NONE, 0x13, 0);
/// `_IOW(VDUSE_BASE, 0x14, struct vduse_vq_config)`
pub const VDUSE_VQ_SETUP: u64 = ioc(IOC_WRITE, 0x14, size_of::<vduse_vq_config>());
/// `_IOWR(VDUSE_BASE, 0x15, struct vduse_vq_info)`
pub const VDUSE_VQ_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, 0x15, size_of::<vduse_vq_info>());
/// `_IOW(VDUSE_BASE, 0x16, struct vduse_vq_eventfd)`
pub const VDUSE_VQ_SETUP_KICKFD: u64 = ioc(IOC_WRITE, 0x16, size_of::<vduse_vq_eventfd>());
/// `_IOW(VDUSE_BASE, 0x17, __u32)`
pub const VDUSE_VQ_INJECT_IRQ: u64 = ioc(IOC_WRITE, 0x17, 4);
/// `_IOW(VDUSE_BASE, 0x18, struct vduse_iova_umem)`
pub const VDUSE_IOTLB_REG_UMEM: u64 = ioc(IOC_WRITE, 0x18, size_of::<vduse_iova_umem>());
/// `_IOW(VDUSE_BASE, 0x19, struct vduse_iova_umem)`
pub const VDUSE_IOTLB_DEREG_UMEM: u64 = ioc(IOC_WRITE, 0x19, size_of::<vduse_iova_umem>());
/// `_IOWR(VDUSE_BASE, 0x1a, struct vduse_iova_info)`
pub const VDUSE_IOTLB_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, 0x1a, size_of::<vduse_iova_info>());

/// Constants of `<linux/vdpa.h>` (generic netlink family "vdpa").
pub mod vdpa {
    /// Generic netlink family name.
    pub const VDPA_GENL_NAME: &str = "vdpa";
    /// Generic netlink family version.
    pub const VDPA_GENL_VERSION: u8 = 0x1;

    /// No command.
    pub const VDPA_CMD_UNSPEC: u8 = 0;
    /// Reserved by the kernel (not implemented).
    pub const VDPA_CMD_MGMTDEV_NEW: u8 = 1;
    /// List management devices (e.g. "vduse").
    pub const VDPA_CMD_MGMTDEV_GET: u8 = 2;
    /// Create a vdpa device on a management device.
    pub const VDPA_CMD_DEV_NEW: u8 = 3;
    /// Delete a vdpa device.
    pub const VDPA_CMD_DEV_DEL: u8 = 4;
    /// List vdpa devices.
    pub const VDPA_CMD_DEV_GET: u8 = 5;
    /// Read a device's config.
    pub const VDPA_CMD_DEV_CONFIG_GET: u8 = 6;
    /// Read a device's vendor statistics.
    pub const VDPA_CMD_DEV_VSTATS_GET: u8 = 7;

    /// No attribute.
    pub const VDPA_ATTR_UNSPEC: u16 = 0;
    /// Padding (same value as `VDPA_ATTR_UNSPEC`).
    pub const VDPA_ATTR_PAD: u16 = 0;
    /// Bus of the management device (string).
    pub const VDPA_ATTR_MGMTDEV_BUS_NAME: u16 = 1;
    /// Name of the management device (string).
    pub const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
    /// virtio device ids it can create, as a bit mask (u64).
    pub const VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
    /// vdpa device name (string).
    pub const VDPA_ATTR_DEV_NAME: u16 = 4;
    /// virtio device id (u32).
    pub const VDPA_ATTR_DEV_ID: u16 = 5;
    /// virtio vendor id (u32).
    pub const VDPA_ATTR_DEV_VENDOR_ID: u16 = 6;
    /// Number of virtqueues (u32).
    pub const VDPA_ATTR_DEV_MAX_VQS: u16 = 7;
    /// Largest queue size (u16).
    pub const VDPA_ATTR_DEV_MAX_VQ_SIZE: u16 = 8;
    /// Smallest queue size (u16).
    pub const VDPA_ATTR_DEV_MIN_VQ_SIZE: u16 = 9;
    /// virtio-net: MAC address.
    pub const VDPA_ATTR_DEV_NET_CFG_MACADDR: u16 = 10;
    /// virtio-net: link status.
    pub const VDPA_ATTR_DEV_NET_STATUS: u16 = 11;
    /// virtio-net: queue pairs.
    pub const VDPA_ATTR_DEV_NET_CFG_MAX_VQP: u16 = 12;
    /// virtio-net: MTU.
    pub const VDPA_ATTR_DEV_NET_CFG_MTU: u16 = 13;
    /// Features the driver accepted (u64).
    pub const VDPA_ATTR_DEV_NEGOTIATED_FEATURES: u16 = 14;
    /// Most virtqueues the management device supports (u32).
    pub const VDPA_ATTR_DEV_MGMTDEV_MAX_VQS: u16 = 15;
    /// Features a management device can offer (u64).
    pub const VDPA_ATTR_DEV_SUPPORTED_FEATURES: u16 = 16;
    /// Virtqueue index (u32).
    pub const VDPA_ATTR_DEV_QUEUE_INDEX: u16 = 17;
    /// Name of a vendor statistic (string).
    pub const VDPA_ATTR_DEV_VENDOR_ATTR_NAME: u16 = 18;
    /// Value of a vendor statistic (u64).
    pub const VDPA_ATTR_DEV_VENDOR_ATTR_VALUE: u16 = 19;
    /// Features to provision a new device with (u64).
    pub const VDPA_ATTR_DEV_FEATURES: u16 = 20;
    /// Features a vdpa device offers (u64).
    pub const VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES: u16 = 21;
    /// One past the last attribute listed here (newer kernels add more before theirs).
    pub const VDPA_ATTR_MAX: u16 = 22;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_c_header() {
        // Printed by a C program including <linux/vduse.h> (x86_64, 6.12 header).
        assert_eq!(VDUSE_GET_API_VERSION, 0x80088100);
        assert_eq!(VDUSE_SET_API_VERSION, 0x40088101);
        assert_eq!(VDUSE_CREATE_DEV, 0x41508102);
        assert_eq!(VDUSE_DESTROY_DEV, 0x41008103);
        assert_eq!(VDUSE_IOTLB_GET_FD, 0xc0208110);
        assert_eq!(VDUSE_DEV_GET_FEATURES, 0x80088111);
        assert_eq!(VDUSE_DEV_SET_CONFIG, 0x40088112);
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ, 0x8113);
        assert_eq!(VDUSE_VQ_SETUP, 0x40208114);
        assert_eq!(VDUSE_VQ_GET_INFO, 0xc0308115);
        assert_eq!(VDUSE_VQ_SETUP_KICKFD, 0x40088116);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, 0x40048117);
        assert_eq!(VDUSE_IOTLB_REG_UMEM, 0x40308118);
        assert_eq!(VDUSE_IOTLB_DEREG_UMEM, 0x40308119);
        assert_eq!(VDUSE_IOTLB_GET_INFO, 0xc030811a);
    }

    #[test]
    fn ioctl_numbers_match_vmm_sys_util_encoding() {
        vmm_sys_util::ioctl_iowr_nr!(GET_FD, VDUSE_BASE, 0x10, vduse_iotlb_entry);
        vmm_sys_util::ioctl_ior_nr!(GET_API, VDUSE_BASE, 0x00, u64);
        assert_eq!(GET_FD() as u64, VDUSE_IOTLB_GET_FD);
        assert_eq!(GET_API() as u64, VDUSE_GET_API_VERSION);
    }
}
