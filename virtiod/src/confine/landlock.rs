//! Landlock: the files the daemon may open, from its configuration.
//!
//! The whole process is restricted once, from the main thread before any other thread
//! starts (Landlock applies to the calling thread and to the threads and programs it starts
//! later, across `execve`). The rules ([`rules`]) grant:
//!
//! - the images the configuration names (read, and write unless read-only; a qcow2 image's
//!   directory read-only, for backing files named relative to it), the state directory, the
//!   directories of the vhost-user and control sockets (create and remove sockets), the
//!   `--allow-dir` directories (images and sockets of devices added later);
//! - what serving needs: `/dev/vduse` and the vdpa sysfs files, `/dev/net/tun`, `/proc`,
//!   `/sys` read-only, the library directories and `/etc/ld.so.cache` (librbd is loaded with
//!   `dlopen`), name resolution files, Ceph's `/etc/ceph` and the `conf=`/`keyring=` files;
//! - execute: the directory of the running binary and of the dynamic loader, so that an
//!   upgrade can start the new binary (its process inherits this domain).
//!
//! Network access is not restricted (NBD and RBD servers, metrics). Access rights are those
//! of Landlock ABI 6 (best effort: an older kernel enforces what it knows).

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
};

/// The rights handled (denied unless a rule grants them).
const HANDLED: ABI = ABI::V6;

/// What a rule grants beneath its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A file (image, device node): read (and ioctl on a device node).
    FileRead,
    /// A file: read, write, truncate, ioctl.
    FileReadWrite,
    /// A directory tree: read files and list.
    Read,
    /// A directory tree: read, list and run programs.
    ReadExecute,
    /// A directory tree: read, write, create and remove files and sockets, ioctl.
    ReadWrite,
    /// A directory: create and remove sockets.
    Sockets,
    /// A directory tree of sysfs or device files: read and write (truncate) existing files,
    /// ioctl.
    Devices,
}

impl Grant {
    fn access(self) -> BitFlags<AccessFs> {
        use AccessFs::*;
        match self {
            Grant::FileRead => ReadFile | IoctlDev,
            Grant::FileReadWrite => ReadFile | WriteFile | Truncate | IoctlDev,
            Grant::Read => ReadFile | ReadDir,
            Grant::ReadExecute => ReadFile | ReadDir | Execute,
            Grant::ReadWrite => {
                ReadFile
                    | ReadDir
                    | WriteFile
                    | Truncate
                    | MakeReg
                    | RemoveFile
                    | MakeSock
                    | IoctlDev
            }
            Grant::Sockets => MakeSock | RemoveFile,
            // Truncate too: writing a sysfs attribute with std::fs::write opens it O_TRUNC.
            Grant::Devices => ReadFile | ReadDir | WriteFile | Truncate | IoctlDev,
        }
    }
}

/// One rule: `grant` beneath `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A file or directory (symbolic links are followed: the rule is on what they name).
    pub path: PathBuf,
    /// What it grants.
    pub grant: Grant,
}

/// What the configuration uses; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    /// Images: path and whether they are written.
    pub images: Vec<(PathBuf, bool)>,
    /// Directories read in full (a qcow2 image's, for its backing files).
    pub read_dirs: Vec<PathBuf>,
    /// Directories where sockets are created.
    pub socket_dirs: Vec<PathBuf>,
    /// Directories read and written in full (state directory, `--allow-dir`).
    pub write_dirs: Vec<PathBuf>,
    /// Files read (RBD `conf=` and `keyring=`).
    pub read_files: Vec<PathBuf>,
    /// The running binary.
    pub exe: Option<PathBuf>,
    /// RBD images are served or may be added: `/etc/ceph` and librados' admin socket directory.
    pub ceph: bool,
}

/// Library directories (read: `dlopen`), in the usual places.
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"];
/// Files of `/etc` the C library and librados read (loader cache, name resolution, time).
const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/localtime",
];
/// Where the dynamic loader is, per architecture.
const LOADERS: &[&str] = &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"];

/// The rules for `needs` (paths that do not exist are left to [`restrict`] to skip).
pub fn rules(needs: &Needs) -> Vec<Rule> {
    let rule = |path: &Path, grant| Rule {
        path: path.to_path_buf(),
        grant,
    };
    let mut out = Vec::new();
    for (image, write) in &needs.images {
        let grant = if *write {
            Grant::FileReadWrite
        } else {
            Grant::FileRead
        };
        out.push(rule(image, grant));
    }
    out.extend(needs.read_dirs.iter().map(|d| rule(d, Grant::Read)));
    out.extend(needs.read_files.iter().map(|f| rule(f, Grant::FileRead)));
    out.extend(needs.socket_dirs.iter().map(|d| rule(d, Grant::Sockets)));
    out.extend(needs.write_dirs.iter().map(|d| rule(d, Grant::ReadWrite)));
    // Upgrades start the new binary from the same path, and the loader runs it: execute
    // beneath their directories (a package upgrade replaces the files, so a rule on the old
    // files would not cover the new ones).
    let exec_dirs = needs
        .exe
        .iter()
        .cloned()
        .chain(LOADERS.iter().filter_map(|l| std::fs::canonicalize(l).ok()))
        .filter_map(|p| p.parent().map(Path::to_path_buf));
    out.extend(exec_dirs.map(|d| rule(&d, Grant::ReadExecute)));
    out.extend(LIBRARY_DIRS.iter().map(|d| rule(Path::new(d), Grant::Read)));
    out.extend(
        ETC_FILES
            .iter()
            .map(|f| rule(Path::new(f), Grant::FileRead)),
    );
    if needs.ceph {
        out.push(rule(Path::new("/etc/ceph"), Grant::Read));
        // librados' admin socket (best effort on its side too).
        out.push(rule(Path::new("/run/ceph"), Grant::Sockets));
    }
    out.push(rule(Path::new("/proc"), Grant::Read));
    out.push(rule(Path::new("/sys"), Grant::Read));
    // The vdpa bus files written to choose a driver, and the VDUSE devices' own directories
    // (`/sys/bus/vdpa/devices/NAME` links there).
    out.push(rule(Path::new("/sys/bus/vdpa"), Grant::Devices));
    out.push(rule(
        Path::new("/sys/devices/virtual/vduse"),
        Grant::Devices,
    ));
    out.push(rule(Path::new("/dev/vduse"), Grant::Devices));
    out.push(rule(Path::new("/dev/net/tun"), Grant::FileReadWrite));
    out.push(rule(Path::new("/dev/null"), Grant::FileReadWrite));
    out.push(rule(Path::new("/dev/urandom"), Grant::FileRead));
    out
}

/// How the restriction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every right handled is enforced.
    Full,
    /// An older kernel: the rights it knows are enforced.
    Partial,
    /// No Landlock in this kernel (or disabled at boot): nothing is restricted.
    None,
}

/// Restrict the calling thread (and the threads and programs it starts later) to `rules`.
/// Rules whose path does not exist are skipped. `no_new_privs`: set it too (needed without
/// `CAP_SYS_ADMIN`; it would keep an upgraded binary from regaining its capabilities).
pub fn restrict(rules: &[Rule], no_new_privs: bool) -> Result<Outcome, landlock::RulesetError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED))?
        .create()?
        .no_new_privs(no_new_privs);
    for rule in rules {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(_) => {
                tracing::debug!(path = %rule.path.display(), "landlock: no such path, no rule");
                continue;
            }
        };
        let mut access = rule.grant.access();
        if !rule.path.is_dir() {
            access &= AccessFs::from_file(HANDLED);
        }
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
        tracing::debug!(path = %rule.path.display(), grant = ?rule.grant, "landlock rule");
    }
    let RestrictionStatus { ruleset, .. } = ruleset.restrict_self()?;
    Ok(match ruleset {
        RulesetStatus::FullyEnforced => Outcome::Full,
        RulesetStatus::PartiallyEnforced => Outcome::Partial,
        _ => Outcome::None,
    })
}

/// The kernel's Landlock ABI version (0: none, or disabled at boot).
pub fn kernel_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute, size 0 and the VERSION flag, landlock_create_ruleset
    // only returns the ABI version (or an error); it creates nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    abi.max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_get_file_rules_and_the_binary_directory_execute() {
        let needs = Needs {
            images: vec![("/img/a.raw".into(), true), ("/img/b.raw".into(), false)],
            socket_dirs: vec!["/run/vu".into()],
            write_dirs: vec!["/run/virtiod".into()],
            exe: Some("/usr/sbin/virtiod".into()),
            ..Needs::default()
        };
        let r = rules(&needs);
        let grant_of = |p: &str| r.iter().find(|r| r.path == Path::new(p)).map(|r| r.grant);
        assert_eq!(grant_of("/img/a.raw"), Some(Grant::FileReadWrite));
        assert_eq!(grant_of("/img/b.raw"), Some(Grant::FileRead));
        assert_eq!(grant_of("/img"), None, "not the images' directory");
        assert_eq!(grant_of("/run/vu"), Some(Grant::Sockets));
        assert_eq!(grant_of("/run/virtiod"), Some(Grant::ReadWrite));
        assert_eq!(grant_of("/usr/sbin"), Some(Grant::ReadExecute));
        assert_eq!(grant_of("/dev/vduse"), Some(Grant::Devices));
        assert_eq!(grant_of("/proc"), Some(Grant::Read));
        // Nothing but the binary's and the loader's directories is executable.
        let exec: Vec<_> = r.iter().filter(|r| r.grant == Grant::ReadExecute).collect();
        assert!(exec.len() <= 2, "{exec:?}");
    }

    #[test]
    fn no_grant_creates_directories_or_links() {
        for g in [
            Grant::FileRead,
            Grant::FileReadWrite,
            Grant::Read,
            Grant::ReadExecute,
            Grant::ReadWrite,
            Grant::Sockets,
            Grant::Devices,
        ] {
            let a = g.access();
            assert!(!a.contains(AccessFs::MakeDir), "{g:?}");
            assert!(!a.contains(AccessFs::MakeSym), "{g:?}");
            assert!(!a.contains(AccessFs::Refer), "{g:?}");
            assert!(!a.contains(AccessFs::MakeBlock), "{g:?}");
        }
    }
}
