//! Disconnecting the frontends of a listening unix socket from inside the daemon.
//!
//! `vhost-user-backend` owns the accepted connection and blocks reading it; the daemon has
//! no handle on it. An accepted unix socket carries its listener's path in /proc/net/unix,
//! so the connections of a socket path are found there by inode and matched against
//! /proc/self/fd; `shutdown(2)` on them makes the library see the frontend leave.

use std::collections::HashSet;
use std::os::fd::RawFd;
use std::path::Path;

/// Inodes of the connected (not listening) sockets bound to `path`, from /proc/net/unix text.
fn connected_inodes(net_unix: &str, paths: &[&Path]) -> HashSet<u64> {
    let want: Vec<_> = paths.iter().map(|p| p.to_string_lossy()).collect();
    net_unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = line.split_whitespace().collect();
            let (st, inode, p) = (f.get(5)?, f.get(6)?, f.get(7)?);
            (want.iter().any(|w| w == p) && *st == "03").then(|| inode.parse().ok())?
        })
        .collect()
}

/// Our fds that are sockets with one of `inodes`.
fn fds_of(inodes: &HashSet<u64>) -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_str()?;
            let inode: u64 = target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            inodes
                .contains(&inode)
                .then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// Shut down every connection accepted on the unix socket at `path`; returns how many.
pub fn disconnect(path: &Path) -> usize {
    let Ok(net_unix) = std::fs::read_to_string("/proc/net/unix") else {
        return 0;
    };
    // The kernel shows the path as it was bound: relative or absolute.
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let fds = fds_of(&connected_inodes(&net_unix, &[path, &absolute]));
    for &fd in &fds {
        // SAFETY: shutdown(2) on a descriptor this process holds (found in /proc/self/fd);
        // it neither closes nor frees anything, the owner just reads end-of-file.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    if !fds.is_empty() {
        tracing::info!(socket = %path.display(), count = fds.len(), "disconnected frontends");
    }
    fds.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn parses_proc_net_unix() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/a.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 101 /run/a.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 102\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 103 /run/b.sock\n";
        let got = connected_inodes(text, &[Path::new("/run/a.sock")]);
        assert_eq!(got, HashSet::from([101]));
    }

    #[test]
    fn disconnects_accepted_connections_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let (_server, _) = listener.accept().unwrap();
        assert_eq!(disconnect(&path), 1);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "the client sees the end");
        // The listener still accepts.
        let _again = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
    }
}
