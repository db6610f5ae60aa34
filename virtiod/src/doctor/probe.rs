//! Gathering facts about the host. Everything read from /proc, /sys, /dev and /lib/modules is
//! read under a root directory, so tests build a fake host in a temporary directory; the rest
//! (netlink, io_uring, rlimits, O_DIRECT) is probed live by [`Facts::gather`].

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vduse::vdpa::{MgmtDevice, VdpaClient};

/// Where a kernel module stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    /// In /proc/modules or /sys/module.
    Loaded,
    /// Built into the kernel (modules.builtin).
    Builtin,
    /// Not loaded, but its .ko is installed: `modprobe` would load it.
    Available(String),
    /// Not loaded, not installed.
    Absent,
}

/// What `/dev/vduse/control` looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlState {
    Missing,
    NotCharDevice,
    /// Opened and the API version negotiated (the kernel's newest version).
    Usable {
        kernel_api_version: u64,
    },
    /// It exists but cannot be used.
    Error(String),
}

/// Huge page pool of one size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugePool {
    /// Huge page size in bytes.
    pub page_size: u64,
    /// nr_hugepages of that size.
    pub count: u64,
}

/// Everything the checks look at.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `/proc/sys/kernel/osrelease`.
    pub kernel_release: Option<String>,
    /// (name, state) for each module of interest.
    pub modules: Vec<(&'static str, ModuleState)>,
    /// Where the modules of this kernel live, if anywhere.
    pub modules_dir: Option<PathBuf>,
    pub control: ControlState,
    /// vdpa management devices, or why they could not be listed.
    pub mgmt_devices: Result<Vec<MgmtDevice>, String>,
    pub io_uring: Result<(), String>,
    /// The state directory asked about.
    pub state_dir: PathBuf,
    /// The directory probed for O_DIRECT (the state directory or its nearest existing
    /// ancestor) and the outcome.
    pub o_direct: (PathBuf, Result<(), String>),
    /// RLIMIT_MEMLOCK (soft, hard); `u64::MAX` is unlimited.
    pub memlock: (u64, u64),
    pub euid: u32,
    /// CapEff of this process, from /proc/self/status.
    pub cap_eff: Option<u64>,
    /// The kernel's Landlock ABI version (0: none); `None`: not probed.
    pub landlock_abi: Option<i64>,
    /// `/proc/sys/vm/hugetlb_optimize_vmemmap`, absent on kernels without it.
    pub hugetlb_optimize_vmemmap: Option<bool>,
    pub huge_pools: Vec<HugePool>,
    /// The base page size.
    pub base_page_size: u64,
}

/// The modules VDUSE serving uses.
pub const MODULES: [&str; 4] = ["vduse", "vdpa", "virtio_vdpa", "vhost_vdpa"];

impl Facts {
    /// Read the host under `root` ("/" for the real one) and probe the live kernel.
    pub fn gather(root: &Path, state_dir: &Path) -> Self {
        let mut facts = Self::from_root(root);
        facts.mgmt_devices = VdpaClient::open()
            .and_then(|mut c| c.list_mgmt_devices())
            .map_err(|e| e.to_string());
        facts.io_uring = io_uring::IoUring::new(2)
            .map(drop)
            .map_err(|e| e.to_string());
        facts.o_direct = probe_o_direct(state_dir);
        facts.state_dir = state_dir.to_path_buf();
        facts.memlock = memlock();
        facts.landlock_abi = Some(crate::confine::landlock_abi());
        // SAFETY: geteuid has no preconditions and cannot fail.
        facts.euid = unsafe { libc::geteuid() };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        facts.base_page_size = u64::try_from(page).unwrap_or(4096);
        facts
    }

    /// The facts readable from files under `root`; live probes are left at neutral values.
    pub fn from_root(root: &Path) -> Self {
        let kernel_release = read_trimmed(&root.join("proc/sys/kernel/osrelease"));
        let modules_dir = kernel_release.as_deref().and_then(|rel| {
            ["lib/modules", "usr/lib/modules"]
                .iter()
                .map(|d| root.join(d).join(rel))
                .find(|p| p.is_dir())
        });
        let modules = MODULES
            .iter()
            .map(|&m| (m, module_state(root, modules_dir.as_deref(), m)))
            .collect();
        let huge_pools = huge_pools(root);
        Self {
            kernel_release,
            modules,
            modules_dir,
            control: control_state(&root.join("dev/vduse/control")),
            mgmt_devices: Err("not probed".into()),
            io_uring: Err("not probed".into()),
            state_dir: PathBuf::new(),
            o_direct: (PathBuf::new(), Err("not probed".into())),
            memlock: (u64::MAX, u64::MAX),
            euid: u32::MAX,
            cap_eff: cap_eff(root),
            landlock_abi: None,
            hugetlb_optimize_vmemmap: read_trimmed(
                &root.join("proc/sys/vm/hugetlb_optimize_vmemmap"),
            )
            .map(|v| v != "0"),
            huge_pools,
            base_page_size: 4096,
        }
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Module names use `_` in /proc/modules and `-` or `_` in file names.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path in modules.dep / modules.builtin ("kernel/.../vduse.ko.xz").
fn module_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next()?;
    (file.len() > stem.len()).then(|| normalise(stem))
}

fn module_state(root: &Path, modules_dir: Option<&Path>, name: &str) -> ModuleState {
    let loaded = std::fs::read_to_string(root.join("proc/modules")).is_ok_and(|mods| {
        mods.lines()
            .any(|l| l.split_whitespace().next().map(normalise).as_deref() == Some(name))
    });
    if loaded || root.join("sys/module").join(name).is_dir() {
        return ModuleState::Loaded;
    }
    let Some(dir) = modules_dir else {
        return ModuleState::Absent;
    };
    let listed = |file: &str| -> Option<String> {
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.lines()
            .map(|l| l.split(':').next().unwrap_or(""))
            .find(|p| module_of(p).as_deref() == Some(name))
            .map(str::to_string)
    };
    if listed("modules.builtin").is_some() {
        return ModuleState::Builtin;
    }
    if let Some(path) = listed("modules.dep") {
        return ModuleState::Available(path);
    }
    match find_ko(dir, name, 0) {
        Some(path) => ModuleState::Available(path.display().to_string()),
        None => ModuleState::Absent,
    }
}

/// Look for NAME.ko* below `dir` (when modules.dep is missing).
fn find_ko(dir: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    if depth > 8 {
        return None;
    }
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let file_type = entry.file_type().ok()?;
        if file_type.is_dir() {
            if let Some(found) = find_ko(&path, name, depth + 1) {
                return Some(found);
            }
        } else if module_of(&entry.file_name().to_string_lossy()).as_deref() == Some(name) {
            return Some(path);
        }
    }
    None
}

fn control_state(path: &Path) -> ControlState {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ControlState::Missing,
        Err(e) => ControlState::Error(e.to_string()),
        Ok(m) if !m.file_type().is_char_device() => ControlState::NotCharDevice,
        Ok(_) => match vduse::VduseControl::open_path(path) {
            Ok(c) => ControlState::Usable {
                kernel_api_version: c.kernel_api_version(),
            },
            Err(e) => ControlState::Error(e.to_string()),
        },
    }
}

fn cap_eff(root: &Path) -> Option<u64> {
    let status = std::fs::read_to_string(root.join("proc/self/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn huge_pools(root: &Path) -> Vec<HugePool> {
    let Ok(dir) = std::fs::read_dir(root.join("sys/kernel/mm/hugepages")) else {
        return Vec::new();
    };
    let mut pools: Vec<HugePool> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let kib: u64 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let count = read_trimmed(&e.path().join("nr_hugepages"))?.parse().ok()?;
            Some(HugePool {
                page_size: kib * 1024,
                count,
            })
        })
        .collect();
    pools.sort_by_key(|p| p.page_size);
    pools
}

/// Open (and remove) a temporary file with O_DIRECT in `state_dir`, or in its nearest
/// existing ancestor when it does not exist yet.
fn probe_o_direct(state_dir: &Path) -> (PathBuf, Result<(), String>) {
    let dir = state_dir
        .ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let file = dir.join(format!(".virtiod-doctor-{}", std::process::id()));
    let result = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&file);
    let outcome = match result {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    // O_DIRECT failures leave the file created on some filesystems: remove it either way.
    let _ = std::fs::remove_file(&file);
    (dir, outcome)
}

fn memlock() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return (0, 0);
    }
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    (conv(lim.rlim_cur), conv(lim.rlim_max))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake host under a temporary directory.
    pub struct FakeRoot(pub tempfile::TempDir);

    impl FakeRoot {
        pub fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }
        pub fn file(&self, path: &str, text: &str) -> &Self {
            let p = self.0.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
            self
        }
        pub fn path(&self) -> &Path {
            self.0.path()
        }
    }

    #[test]
    fn module_states_from_proc_sys_and_lib_modules() {
        let root = FakeRoot::new();
        root.file("proc/sys/kernel/osrelease", "6.12.0-test\n")
            .file(
                "proc/modules",
                "vdpa 40960 1 vduse, Live 0x0\nvirtio_blk 1 0 - Live 0x0\n",
            )
            .file("sys/module/vduse/refcnt", "0\n")
            .file(
                "lib/modules/6.12.0-test/modules.dep",
                "kernel/drivers/vdpa/virtio_vdpa.ko.xz: kernel/drivers/vdpa/vdpa.ko.xz\n",
            )
            .file(
                "lib/modules/6.12.0-test/modules.builtin",
                "kernel/drivers/vhost/vhost_vdpa.ko\n",
            );
        let facts = Facts::from_root(root.path());
        assert_eq!(facts.kernel_release.as_deref(), Some("6.12.0-test"));
        let state = |m: &str| {
            facts
                .modules
                .iter()
                .find(|(n, _)| *n == m)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(state("vduse"), ModuleState::Loaded);
        assert_eq!(state("vdpa"), ModuleState::Loaded);
        assert_eq!(
            state("virtio_vdpa"),
            ModuleState::Available("kernel/drivers/vdpa/virtio_vdpa.ko.xz".into())
        );
        assert_eq!(state("vhost_vdpa"), ModuleState::Builtin);
    }

    #[test]
    fn finds_ko_without_modules_dep_and_reports_absent() {
        let root = FakeRoot::new();
        root.file("proc/sys/kernel/osrelease", "5.15.1\n")
            .file("proc/modules", "")
            .file(
                "usr/lib/modules/5.15.1/kernel/drivers/vdpa/vdpa_user/vduse.ko.zst",
                "",
            );
        let facts = Facts::from_root(root.path());
        assert!(
            matches!(&facts.modules[0], ("vduse", ModuleState::Available(p)) if p.ends_with("vduse.ko.zst"))
        );
        assert_eq!(facts.modules[1], ("vdpa", ModuleState::Absent));
        // Without /lib/modules/RELEASE at all, everything not loaded is absent.
        let bare = FakeRoot::new();
        bare.file("proc/sys/kernel/osrelease", "6.1.0\n");
        let facts = Facts::from_root(bare.path());
        assert!(facts.modules_dir.is_none());
        assert!(facts.modules.iter().all(|(_, s)| *s == ModuleState::Absent));
    }

    #[test]
    fn control_caps_and_hugepages() {
        let root = FakeRoot::new();
        root.file("dev/vduse/control", "")
            .file(
                "proc/self/status",
                "Name:\tx\nCapEff:\t0000000000200000\nCapBnd:\t0\n",
            )
            .file("proc/sys/vm/hugetlb_optimize_vmemmap", "1\n")
            .file(
                "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
                "512\n",
            )
            .file(
                "sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
                "2\n",
            );
        let facts = Facts::from_root(root.path());
        assert_eq!(facts.control, ControlState::NotCharDevice);
        assert_eq!(facts.cap_eff, Some(1 << 21));
        assert_eq!(facts.hugetlb_optimize_vmemmap, Some(true));
        assert_eq!(
            facts.huge_pools,
            vec![
                HugePool {
                    page_size: 2 << 20,
                    count: 512
                },
                HugePool {
                    page_size: 1 << 30,
                    count: 2
                }
            ]
        );
        assert_eq!(
            Facts::from_root(FakeRoot::new().path()).control,
            ControlState::Missing
        );
    }

    #[test]
    fn o_direct_probe_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (probed, _outcome) = probe_o_direct(&dir.path().join("not/yet"));
        assert_eq!(probed, dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
