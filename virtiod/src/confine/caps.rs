//! Capabilities after start-up: each thread keeps only what its work still needs.
//!
//! Capabilities belong to threads. After start-up, the main thread (which stops devices) and
//! the control socket's threads (which add and remove them) keep the *running set*
//! ([`running_set`]); every other thread keeps none: queue and message threads clear theirs
//! when they confine themselves (`seccomp`), the signal and metrics threads at their start.
//! The bounding set is left whole, so a new virtiod binary started by root (an upgrade) gets
//! its capabilities back at `execve` (docs/security.md).

use caps::{CapSet, Capability, CapsHashSet};

/// What the daemon's configuration may still do after start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// A VDUSE device is served (stopping it detaches it from the vdpa bus).
    pub vduse: bool,
    /// A net device on a tap interface is served.
    pub tap: bool,
    /// A control socket may add VDUSE and tap devices later.
    pub control: bool,
}

/// The capabilities the main and control threads keep after start-up.
///
/// Only `CAP_NET_ADMIN`, and only when a VDUSE device or a tap is served or may be added: the
/// vdpa netlink commands (`dev add`, `dev del`) are admin-only generic netlink operations
/// (`GENL_ADMIN_PERM`: `CAP_NET_ADMIN`), and so is `TUNSETIFF` on a tap the daemon does not
/// own. Nothing else needs one: `/dev/vduse/control` (`VDUSE_CREATE_DEV`,
/// `VDUSE_DESTROY_DEV`), the vdpa sysfs files (`driver_override`, `unbind`, `drivers_probe`),
/// `/dev/net/tun`, the state directory and images are files owned by root, whom their modes
/// already admit (so `CAP_DAC_OVERRIDE` goes too: an image owned by another user must be
/// readable and writable by the daemon's user).
pub fn running_set(work: Work) -> CapsHashSet {
    let mut set = CapsHashSet::new();
    if work.vduse || work.tap || work.control {
        set.insert(Capability::CAP_NET_ADMIN);
    }
    set
}

/// Keep only `keep` (those of them the thread has) in the calling thread's effective and
/// permitted sets; clear its inheritable and ambient sets. The bounding set is not touched.
pub fn narrow_thread(keep: &CapsHashSet) -> Result<(), caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = permitted.intersection(keep).copied().collect();
    if kept == permitted {
        return Ok(());
    }
    // The ambient set may not exist on old kernels: nothing to clear there.
    let _ = caps::clear(None, CapSet::Ambient);
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)
}

/// Whether the calling thread may use `CAP_SYS_ADMIN` now (Landlock without
/// `no_new_privs` needs it).
pub fn has_sys_admin() -> bool {
    caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vduse_taps_and_control_keep_net_admin() {
        assert!(running_set(Work::default()).is_empty());
        for work in [
            Work {
                vduse: true,
                ..Work::default()
            },
            Work {
                tap: true,
                ..Work::default()
            },
            Work {
                control: true,
                ..Work::default()
            },
        ] {
            let set = running_set(work);
            assert_eq!(set.len(), 1, "{work:?}");
            assert!(set.contains(&Capability::CAP_NET_ADMIN));
        }
    }
}
