//! Mounts, filesystems and block devices on the node: `mount(2)` through rustix, the
//! filesystem tools (`blkid`, `mkfs.ext4`, `mkfs.xfs`, `resize2fs`, `xfs_growfs`) as commands.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags};

/// A failed node operation, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct NodeError {
    /// What was being done.
    pub what: String,
    /// Why it failed.
    pub detail: String,
}

fn fail(what: impl Into<String>, detail: impl ToString) -> NodeError {
    NodeError {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// `\040`-style escapes of /proc/self/mountinfo.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let text = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            if let Ok(v) = u8::from_str_radix(text, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of this mount namespace (/proc/self/mountinfo), in mount order.
pub fn mount_points() -> Result<Vec<PathBuf>, NodeError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| fail("cannot read /proc/self/mountinfo", e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect())
}

/// Whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> Result<bool, NodeError> {
    Ok(mount_points()?.iter().any(|p| p == path))
}

/// Unmount everything stacked at `path` (nothing mounted: nothing to do).
pub fn unmount_all(path: &Path) -> Result<(), NodeError> {
    while is_mounted(path)? {
        rustix::mount::unmount(path, UnmountFlags::empty())
            .map_err(|e| fail(format!("cannot unmount {}", path.display()), e))?;
    }
    Ok(())
}

/// Bind-mount `source` on `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), NodeError> {
    let what = || {
        format!(
            "cannot bind-mount {} on {}",
            source.display(),
            target.display()
        )
    };
    rustix::mount::mount_bind(source, target).map_err(|e| fail(what(), e))?;
    if read_only {
        let flags = MountFlags::BIND | MountFlags::RDONLY;
        if let Err(e) = rustix::mount::mount_remount(target, flags, "") {
            let _ = rustix::mount::unmount(target, UnmountFlags::empty());
            return Err(fail(format!("{} read-only", what()), e));
        }
    }
    Ok(())
}

/// Mount the filesystem `fs_type` on `device` at `target` with `options`.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    read_only: bool,
    options: &[String],
) -> Result<(), NodeError> {
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let data = std::ffi::CString::new(options.join(","))
        .map_err(|_| fail("mount options", "a NUL byte in mount_flags"))?;
    rustix::mount::mount(device, target, fs_type, flags, data.as_c_str()).map_err(|e| {
        fail(
            format!(
                "cannot mount {fs_type} of {} at {}",
                device.display(),
                target.display()
            ),
            e,
        )
    })
}

fn run(program: &str, args: &[&str]) -> Result<std::process::Output, NodeError> {
    Command::new(program).args(args).output().map_err(|e| {
        fail(
            format!("cannot run {program}"),
            format!("{e}: install it on the node (e2fsprogs, xfsprogs, util-linux)"),
        )
    })
}

fn checked(program: &str, args: &[&str]) -> Result<(), NodeError> {
    let out = run(program, args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            format!("{program} {}", args.join(" ")),
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// The filesystem (or other signature) `blkid` finds on `device`; `None` when it is empty.
pub fn probe(device: &Path) -> Result<Option<String>, NodeError> {
    let dev = device.to_string_lossy();
    let out = run(
        "blkid",
        &["-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "value", &dev],
    )?;
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(|s| s.trim().to_string())),
        // blkid: 2 = nothing found.
        Some(2) => Ok(None),
        _ => Err(fail(
            format!("blkid -p {dev}"),
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
    }
}

/// Make an empty filesystem of `fs_type` on `device`.
pub fn mkfs(device: &Path, fs_type: &str) -> Result<(), NodeError> {
    let dev = device.to_string_lossy();
    match fs_type {
        "ext4" => checked("mkfs.ext4", &["-q", "-F", "-m", "0", &dev]),
        "xfs" => checked("mkfs.xfs", &["-q", &dev]),
        other => Err(fail("mkfs", format!("unsupported filesystem {other}"))),
    }
}

/// Grow the filesystem on `device` mounted at `mount_point` to the device's size.
pub fn grow_fs(device: &Path, mount_point: &Path, fs_type: &str) -> Result<(), NodeError> {
    match fs_type {
        "ext4" => checked("resize2fs", &[&device.to_string_lossy()]),
        "xfs" => checked("xfs_growfs", &[&mount_point.to_string_lossy()]),
        other => Err(fail("grow", format!("unsupported filesystem {other}"))),
    }
}

/// The size of block device `node` (`/dev/vdX`) as the kernel sees it.
pub fn block_size(node: &Path) -> Result<u64, NodeError> {
    let name = node.file_name().ok_or_else(|| {
        fail(
            "block size",
            format!("{} is not a device node", node.display()),
        )
    })?;
    let sys = Path::new("/sys/class/block").join(name).join("size");
    let text = std::fs::read_to_string(&sys)
        .map_err(|e| fail(format!("cannot read {}", sys.display()), e))?;
    text.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| fail(format!("{}", sys.display()), e))
}

/// Wait until `node` is a block device (udev or devtmpfs may take a moment).
pub fn wait_block_device(node: &Path, timeout: Duration) -> Result<(), NodeError> {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::metadata(node).is_ok_and(|m| m.file_type().is_block_device()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(
                format!("waiting for {}", node.display()),
                format!("no block device after {timeout:?}: is virtio_vdpa loaded?"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the kernel sees `bytes` on `node`.
pub fn wait_block_size(node: &Path, bytes: u64, timeout: Duration) -> Result<(), NodeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = block_size(node)?;
        if now >= bytes {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(
                format!("waiting for {} to grow", node.display()),
                format!("still {now} bytes after {timeout:?}, expected {bytes}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Remove `path` (an empty directory or a file); absent already is fine.
pub fn remove_target(path: &Path) -> Result<(), NodeError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| fail(format!("cannot remove {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }

    #[test]
    fn root_is_mounted() {
        assert!(is_mounted(Path::new("/")).unwrap());
    }
}
