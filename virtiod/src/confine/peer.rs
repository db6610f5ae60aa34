//! Who may use the control socket: root, the daemon's user, and members of
//! `--control-group` (their primary group or a supplementary one, as the kernel reports them
//! for the connecting process: `SO_PEERCRED` and `SO_PEERGROUPS`).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use anyhow::Context;

/// A group given by name or number.
pub fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(crate::usage::Usage(format!(
            "control group {group:?} does not exist: create it (groupadd {group}) or give another with --control-group"
        ))
        .into()),
        Err(e) => Err(e).with_context(|| format!("cannot look up the group {group:?}")),
    }
}

/// The connecting process's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its effective user.
    pub uid: u32,
    /// Its effective group.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Read the credentials of the process at the other end of `stream`.
    pub fn of(stream: &UnixStream) -> std::io::Result<Self> {
        let cred = rustix::net::sockopt::socket_peercred(stream)?;
        Ok(Self {
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            groups: peer_groups(stream)?,
        })
    }

    /// Admitted: root, `daemon_uid`, or a member of `group`.
    pub fn admitted(&self, daemon_uid: u32, group: Option<u32>) -> bool {
        self.uid == 0
            || self.uid == daemon_uid
            || group.is_some_and(|g| self.gid == g || self.groups.contains(&g))
    }
}

/// `SO_PEERGROUPS`: the supplementary groups of the connecting process.
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes; the kernel writes at most `len`
        // bytes and sets `len` to the bytes written (or needed, with ERANGE).
        let ret = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(err);
        }
        groups.resize(needed, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_root_the_daemon_user_and_group_members() {
        let peer = |uid, gid, groups: &[u32]| Peer {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(peer(0, 0, &[]).admitted(1000, None));
        assert!(peer(1000, 1000, &[]).admitted(1000, None));
        assert!(!peer(1001, 1001, &[]).admitted(1000, None));
        assert!(peer(1001, 2000, &[]).admitted(1000, Some(2000)));
        assert!(peer(1001, 1001, &[5, 2000]).admitted(1000, Some(2000)));
        assert!(!peer(1001, 1001, &[5]).admitted(1000, Some(2000)));
    }

    #[test]
    fn reads_its_own_credentials_through_a_socket_pair() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = Peer::of(&a).unwrap();
        assert_eq!(me.uid, rustix::process::geteuid().as_raw());
        assert_eq!(me.gid, rustix::process::getegid().as_raw());
    }

    #[test]
    fn resolves_groups_by_name_and_number() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let err = resolve_group("no-such-group-virtiod").unwrap_err();
        assert!(
            err.to_string().contains("groupadd no-such-group-virtiod"),
            "{err}"
        );
    }
}
