//! Test support shared by virtiod's integration tests and by devices built on its core.
//!
//! - [`frontend`]: a hand-written vhost-user frontend ([`frontend::Driver`]) that owns the
//!   "guest" memory, writes descriptor tables and rings byte by byte (hostile ones too),
//!   kicks, waits for used entries, and checks that the device wrote nothing outside the
//!   bytes a case allows. Device-neutral: the features acked and the number of queues are
//!   chosen by the test ([`frontend::Options`]).
//! - [`blk`]: virtio-blk requests on top of it (request header, status codes, a write/read
//!   round trip, the capacity).
//! - [`net`]: a virtio-net guest on top of it (receive buffers, frames sent and checked).
//! - [`process`]: start a daemon binary, wait until its socket listens, signal it, wait for
//!   its exit.
//! - [`scratch`]: a scratch directory removed at drop.
//!
//! ```no_run
//! use virtiod_testkit::frontend::{Driver, Options};
//!
//! let socket = std::path::Path::new("/tmp/dev.sock");
//! let mut d = Driver::connect_opts(socket, &Options::queues(1).features(virtiod_testkit::F_VERSION_1));
//! let buf = d.writable(64);
//! let used = d.exec_table("one writable buffer", &[buf], 0, &[(buf.addr, 64)]);
//! assert_eq!(used, 64);
//! ```
#![deny(missing_docs)]

pub mod blk;
pub mod ceph;
pub mod frontend;
pub mod net;
pub mod process;
pub mod scratch;

/// `VIRTIO_F_VERSION_1` as a feature bit.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX` as a feature bit.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_RING_F_INDIRECT_DESC` as a feature bit.
pub const F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
