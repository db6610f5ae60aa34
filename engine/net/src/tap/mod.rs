//! `tap:NAME`: a Linux tap interface as the port. The daemon opens `/dev/net/tun` and creates
//! the interface `NAME` (or attaches to an existing, e.g. persistent, one) with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte `virtio_net_hdr_v1`, non-blocking.
//!
//! - transmit: one `write` of the driver's header (checked; partial checksums and TCP GSO
//!   frames go to the kernel as they are) and the frame;
//! - receive: a reader thread per tap waits (epoll) for the fd, reads each header and frame
//!   into a reused buffer and queues it like a switch port does (bounded, drops counted),
//!   signalling the rx eventfd while the rx queue holds buffers. The kernel is told with
//!   `TUNSETOFFLOAD` which offloads the driver takes (GUEST_CSUM: `TUN_F_CSUM`, GUEST_TSO4/6:
//!   `TUN_F_TSO4/6`), so it hands over 64 KiB TCP frames and partial checksums only then.
//!
//! The interface's link state and addresses are the operator's (`ip link set NAME up`). A tap
//! the daemon created disappears when its fd closes (the daemon stops); an existing
//! persistent one stays.

mod sys;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{NetBackend, PortStats};
use crate::offload::{F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6};
use crate::steer::PortQueues;
use crate::{NetError, NET_HDR_LEN};

/// The tun/tap clone device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Largest frame read from a tap (a 64 KiB IP packet and an Ethernet header with a tag).
const MAX_READ: usize = NET_HDR_LEN + 65536 + 18;

const TOKEN_TAP: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_OFFLOAD: u64 = 2;

/// Check an interface name as the kernel does: 1 to 15 bytes, not `.` or `..`, without `/`,
/// `:` or white space.
pub fn check_tap_name(name: &str) -> Result<(), NetError> {
    let bad = name.is_empty()
        || name.len() >= sys::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(NetError::TapName(name.to_string()));
    }
    Ok(())
}

/// What the reader thread and the port share.
#[derive(Debug)]
struct Shared {
    file: File,
    rx: PortQueues,
    stats: PortStats,
    /// The `TUN_F_*` flags the driver's features call for, applied by the reader thread.
    offload_flags: AtomicU32,
    /// Tells the reader thread to apply `offload_flags`.
    offload_evt: EventFd,
}

/// A tap interface as the [`NetBackend`] of one virtio-net device.
#[derive(Debug)]
pub struct TapPort {
    name: String,
    created: bool,
    shared: Arc<Shared>,
    tx_errors: AtomicU64,
    stop: EventFd,
    reader: Option<JoinHandle<()>>,
}

impl TapPort {
    /// Create the tap `name` (or attach to the existing one) for a device with one queue
    /// pair, and start its reader thread.
    pub fn open(name: &str) -> Result<Self, NetError> {
        Self::open_with_pairs(name, 1)
    }

    /// As [`Self::open`], for a device with `pairs` queue pairs: one tap fd, its frames
    /// spread over the pairs' rx queues by flow, every tx queue writing to it.
    pub fn open_with_pairs(name: &str, pairs: u16) -> Result<Self, NetError> {
        check_tap_name(name)?;
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = open_tun()?;
        sys::set_iff_tap(&file, name).map_err(|err| iff_error(name, err))?;
        sys::set_vnet_hdr_size(&file, NET_HDR_LEN as libc::c_int).map_err(|source| {
            NetError::Tap {
                name: name.to_string(),
                what: "TUNSETVNETHDRSZ",
                source,
            }
        })?;
        let tap_err = |what: &'static str| {
            move |source| NetError::Tap {
                name: name.to_string(),
                what,
                source,
            }
        };
        // A persistent tap keeps the offloads of its last user: none until the driver says.
        sys::set_offload(&file, 0).map_err(tap_err("TUNSETOFFLOAD"))?;
        let shared = Arc::new(Shared {
            file,
            rx: PortQueues::new(pairs)?,
            stats: PortStats::default(),
            offload_flags: AtomicU32::new(0),
            offload_evt: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?;
        let epoll = Epoll::new().map_err(tap_err("epoll_create"))?;
        for (fd, token) in [
            (shared.file.as_raw_fd(), TOKEN_TAP),
            (stop.as_raw_fd(), TOKEN_STOP),
            (shared.offload_evt.as_raw_fd(), TOKEN_OFFLOAD),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(tap_err("epoll_ctl"))?;
        }
        let reader = {
            let shared = shared.clone();
            let thread_name = name.to_string();
            std::thread::Builder::new()
                .name(format!("tap-{name}"))
                .spawn(move || read_loop(&thread_name, &shared, &epoll))
                .map_err(tap_err("spawning the reader thread"))?
        };
        tracing::info!(
            tap = name,
            created = !existed,
            "{} the tap (bring it up with: ip link set {name} up)",
            if existed { "attached to" } else { "created" }
        );
        Ok(Self {
            name: name.to_string(),
            created: !existed,
            shared,
            tx_errors: AtomicU64::new(0),
            stop,
            reader: Some(reader),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface did not exist before (it goes away with the port, unless made
    /// persistent meanwhile).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Frames the tap refused (e.g. the interface is down or gone); they are dropped.
    pub fn tx_errors(&self) -> u64 {
        self.tx_errors.load(Ordering::Relaxed)
    }

    /// Frames waiting for receive buffers.
    pub fn queued(&self) -> usize {
        self.shared.rx.len()
    }
}

impl NetBackend for TapPort {
    fn transmit(&self, frame: &[u8]) {
        if let Err(err) = (&self.shared.file).write(frame) {
            self.tx_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(tap = %self.name, %err, "frame dropped: the tap refused it");
        }
    }

    fn receive(&self, pair: u16, frame: &mut Vec<u8>) -> bool {
        self.shared.rx.queue(pair).pop(frame)
    }

    fn rx_event(&self, pair: u16) -> &EventFd {
        self.shared.rx.event(pair)
    }

    fn set_rx_ready(&self, pair: u16, ready: bool) {
        self.shared.rx.queue(pair).set_ready(ready);
    }

    fn queue_pairs(&self) -> u16 {
        self.shared.rx.pairs()
    }

    fn set_queue_pairs(&self, pairs: u16) {
        self.shared.rx.set_active(pairs);
    }

    fn set_guest_features(&self, features: u64) {
        self.shared.rx.set_guest_features(features);
        let mut flags = 0;
        if features & F_GUEST_CSUM != 0 {
            flags |= libc::TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                flags |= libc::TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                flags |= libc::TUN_F_TSO6;
            }
        }
        // Applied by the reader thread, not here: this runs while a VDUSE device starts,
        // under the kernel's rtnl lock held by virtio_net's probe, which TUNSETOFFLOAD takes
        // too (a deadlock until VDUSE's message timeout breaks the device). Until then the
        // tap sends frames with the offloads it had, which the receive path finishes in
        // software where the driver does not take them.
        self.shared.offload_flags.store(flags, Ordering::Release);
        if let Err(err) = self.shared.offload_evt.write(1) {
            tracing::warn!(tap = %self.name, %err, "cannot wake the tap reader to set the offloads");
        }
    }

    fn stats(&self) -> &PortStats {
        &self.shared.stats
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        if let Err(err) = self.stop.write(1) {
            tracing::warn!(tap = %self.name, %err, "cannot stop the tap reader");
            return;
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        tracing::debug!(tap = %self.name, "tap port closed");
    }
}

fn open_tun() -> Result<File, NetError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => NetError::TunMissing(err),
            Some(libc::EACCES | libc::EPERM) => NetError::TapPermission(TUN_PATH.to_string()),
            _ => NetError::Tap {
                name: TUN_PATH.to_string(),
                what: "open",
                source: err,
            },
        })
}

/// The one-line error of a failed `TUNSETIFF`.
fn iff_error(name: &str, err: io::Error) -> NetError {
    let name = name.to_string();
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => NetError::TapPermission(name),
        Some(libc::EBUSY) => NetError::TapBusy(name),
        Some(libc::EINVAL) => NetError::NotTap(name),
        _ => NetError::Tap {
            name,
            what: "TUNSETIFF",
            source: err,
        },
    }
}

/// The reader thread: frames from the tap into the port's queue until told to stop.
fn read_loop(name: &str, shared: &Shared, epoll: &Epoll) {
    virtiod_core::confine::enter(virtiod_core::confine::ThreadRole::Backend);
    let mut buf = vec![0u8; MAX_READ];
    let mut events = [EpollEvent::default(); 3];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::error!(tap = name, %err, "epoll_wait failed: no more frames received");
                return;
            }
        };
        if events[..ready].iter().any(|e| e.data() == TOKEN_STOP) {
            return;
        }
        if events[..ready].iter().any(|e| e.data() == TOKEN_OFFLOAD) {
            let _ = shared.offload_evt.read();
            let flags = shared.offload_flags.load(Ordering::Acquire);
            if let Err(err) = sys::set_offload(&shared.file, flags) {
                // Frames then come without offloads: slower, still right.
                tracing::warn!(tap = name, %err, flags, "TUNSETOFFLOAD failed");
            }
        }
        loop {
            match (&shared.file).read(&mut buf) {
                Ok(len) if len > NET_HDR_LEN => {
                    shared.rx.push(&buf[..len], &shared.stats);
                }
                Ok(_) => {} // no frame behind the header
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::error!(tap = name, %err, "reading the tap failed (interface deleted?): no more frames received");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_follow_the_kernel_rules() {
        for good in ["tap0", "vtt1234", "a", "x-y_z.1", "123456789012345"] {
            assert!(check_tap_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "1234567890123456"] {
            assert!(
                matches!(check_tap_name(bad), Err(NetError::TapName(_))),
                "{bad}"
            );
        }
        let long = TapPort::open("1234567890123456").unwrap_err().to_string();
        assert!(long.contains("15"), "{long}");
    }
}
