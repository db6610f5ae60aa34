//! `virtiod doctor`: can this host serve VDUSE devices, and if not, what to do.
//!
//! [`probe::Facts`] gathers what the host looks like; the checks here only judge those facts,
//! so each verdict is tested on made-up hosts. A check FAILs only when it makes VDUSE serving
//! impossible; everything that merely limits it is a WARN.

mod image;
pub mod probe;

use std::path::Path;

use serde::Serialize;

use probe::{ControlState, Facts, ModuleState};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
/// `sizeof(struct page)` on 64-bit kernels (what the vmemmap holds per base page).
const STRUCT_PAGE_SIZE: u64 = 64;
/// virtio device id of a block device (bit in a management device's supported classes).
use vduse::control::VIRTIO_ID_BLOCK;

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub status: Status,
    pub detail: String,
    /// What to do about it (empty when nothing is needed).
    pub fix: String,
}

fn check(name: &str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: name.to_string(),
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Every check, in report order.
pub fn checks(f: &Facts) -> Vec<Check> {
    let mut out = vec![kernel(f)];
    out.extend(f.modules.iter().map(|(name, state)| module(f, name, state)));
    out.extend([
        control(f),
        mgmt_devices(f),
        vduse_net(f),
        io_uring(f),
        o_direct(f),
        memlock(f),
        privileges(f),
        landlock(f),
        hugepages(f),
    ]);
    out
}

fn kernel(f: &Facts) -> Check {
    let Some(release) = &f.kernel_release else {
        return check(
            "kernel",
            Status::Warn,
            "cannot read /proc/sys/kernel/osrelease",
            "",
        );
    };
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if version >= (5, 15) {
        check(
            "kernel",
            Status::Ok,
            format!("{release} (VDUSE needs ≥ 5.15)"),
            "",
        )
    } else {
        check(
            "kernel",
            Status::Fail,
            format!("{release}: VDUSE needs Linux ≥ 5.15"),
            "boot a kernel ≥ 5.15 with CONFIG_VDPA_USER (or serve over --vhost-user)",
        )
    }
}

fn module(f: &Facts, name: &str, state: &ModuleState) -> Check {
    let title = format!("module {name}");
    // vduse and vdpa are needed for any VDUSE device; the bus drivers only for one attach mode.
    let (role, needed, config) = match name {
        "vduse" => ("VDUSE itself", true, "CONFIG_VDPA_USER"),
        "vdpa" => ("the vDPA bus", true, "CONFIG_VDPA"),
        "virtio_vdpa" => ("--attach virtio (/dev/vdX)", false, "CONFIG_VIRTIO_VDPA"),
        _ => (
            "--attach vhost (/dev/vhost-vdpa-N)",
            false,
            "CONFIG_VHOST_VDPA",
        ),
    };
    match state {
        ModuleState::Loaded => check(&title, Status::Ok, "loaded", ""),
        ModuleState::Builtin => check(&title, Status::Ok, "built into the kernel", ""),
        ModuleState::Available(path) => check(
            &title,
            Status::Warn,
            format!("not loaded, installed ({path}); needed for {role}"),
            format!("modprobe {name}"),
        ),
        ModuleState::Absent => {
            let where_ = match &f.modules_dir {
                Some(dir) => format!("not loaded and not in {}", dir.display()),
                None => format!(
                    "not loaded, and this kernel has no module directory (/lib/modules/{})",
                    f.kernel_release.as_deref().unwrap_or("?")
                ),
            };
            let status = if needed { Status::Fail } else { Status::Warn };
            check(
                &title,
                status,
                format!("{where_}; needed for {role}"),
                format!("boot a kernel with {config}=m (e.g. Debian's linux-image-cloud-amd64)"),
            )
        }
    }
}

fn vduse_fix(f: &Facts) -> String {
    let vduse = f
        .modules
        .iter()
        .find(|(n, _)| *n == "vduse")
        .map(|(_, s)| s);
    match vduse {
        Some(ModuleState::Absent) => "a kernel with CONFIG_VDPA_USER (see the module lines)".into(),
        _ => "modprobe vduse".into(),
    }
}

fn control(f: &Facts) -> Check {
    const NAME: &str = "/dev/vduse/control";
    match &f.control {
        ControlState::Usable { kernel_api_version } => check(
            NAME,
            Status::Ok,
            format!("usable (kernel VDUSE API version {kernel_api_version})"),
            "",
        ),
        ControlState::Missing => check(NAME, Status::Fail, "missing", vduse_fix(f)),
        ControlState::NotCharDevice => check(
            NAME,
            Status::Fail,
            "exists but is not a character device",
            "remove it and load the vduse module (modprobe vduse)",
        ),
        ControlState::Error(e) => check(
            NAME,
            Status::Fail,
            format!("cannot be used: {e}"),
            "run as root (CAP_SYS_ADMIN); in a container, pass /dev/vduse through",
        ),
    }
}

fn mgmt_devices(f: &Facts) -> Check {
    const NAME: &str = "vdpa management devices";
    match &f.mgmt_devices {
        Err(e) => check(
            NAME,
            Status::Fail,
            format!("cannot list: {e}"),
            vduse_fix(f),
        ),
        Ok(devs) => {
            let names: Vec<&str> = devs.iter().map(|d| d.dev_name.as_str()).collect();
            let listed = format!("[{}]", names.join(", "));
            match devs.iter().find(|d| d.dev_name == "vduse") {
                None => check(
                    NAME,
                    Status::Fail,
                    format!("{listed}: no \"vduse\" management device"),
                    vduse_fix(f),
                ),
                Some(d) if d.supported_classes & (1 << VIRTIO_ID_BLOCK) == 0 => check(
                    NAME,
                    Status::Fail,
                    format!("{listed}: vduse does not offer block devices"),
                    "use a kernel whose VDUSE supports virtio-blk",
                ),
                Some(_) => check(
                    NAME,
                    Status::Ok,
                    format!("{listed}: vduse offers block"),
                    "",
                ),
            }
        }
    }
}

/// Whether this kernel's VDUSE accepts virtio-net devices (Linux 6.10 and later): optional,
/// so a warning, not a failure, when it does not.
fn vduse_net(f: &Facts) -> Check {
    const NAME: &str = "VDUSE net";
    const VIRTIO_ID_NET: u32 = 1;
    let vduse = f
        .mgmt_devices
        .as_ref()
        .ok()
        .and_then(|devs| devs.iter().find(|d| d.dev_name == "vduse"));
    match vduse {
        Some(d) if d.supported_classes & (1 << VIRTIO_ID_NET) != 0 => check(
            NAME,
            Status::Ok,
            "vduse offers net: net:switch=NAME and net:tap=NAME devices can be served through VDUSE",
            "",
        ),
        Some(_) => check(
            NAME,
            Status::Warn,
            "vduse does not offer net devices (it needs Linux 6.10 or later)",
            "serve net devices over vhost-user, or use a newer kernel",
        ),
        None => check(
            NAME,
            Status::Warn,
            "unknown: no vduse management device listed",
            "see the vdpa management devices check",
        ),
    }
}

fn io_uring(f: &Facts) -> Check {
    match &f.io_uring {
        Ok(()) => check("io_uring", Status::Ok, "a ring can be created", ""),
        Err(e) => check(
            "io_uring",
            Status::Fail,
            format!("cannot create a ring ({e}): image files cannot be served (mem:/null: still work)"),
            "allow io_uring: sysctl -w kernel.io_uring_disabled=0; in a container, allow io_uring_setup in the seccomp profile",
        ),
    }
}

fn o_direct(f: &Facts) -> Check {
    let (dir, outcome) = &f.o_direct;
    let name = "O_DIRECT";
    let dir = if dir == &f.state_dir {
        dir.display().to_string()
    } else {
        format!(
            "{} ({} does not exist yet)",
            dir.display(),
            f.state_dir.display()
        )
    };
    match outcome {
        Ok(()) => check(name, Status::Ok, format!("supported in {dir}"), ""),
        Err(e) => check(
            name,
            Status::Warn,
            format!("not supported in {dir} ({e})"),
            "serve images on this filesystem with --buffered, or keep them on one with O_DIRECT",
        ),
    }
}

fn bytes(n: u64) -> String {
    match n {
        u64::MAX => "unlimited".into(),
        n if n >= GIB && n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n >= MIB => format!("{:.1} MiB", n as f64 / MIB as f64).replace(".0 MiB", " MiB"),
        n => format!("{} KiB", n / KIB),
    }
}

fn memlock(f: &Facts) -> Check {
    let (soft, hard) = f.memlock;
    let detail = format!("RLIMIT_MEMLOCK {} (hard {})", bytes(soft), bytes(hard));
    let old_kernel = f.kernel_release.as_deref().is_some_and(|r| {
        let mut n = r
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0)) < (5, 12)
    });
    if soft == u64::MAX || soft >= 64 * MIB {
        check("memlock", Status::Ok, detail, "")
    } else if old_kernel {
        check(
            "memlock",
            Status::Warn,
            format!("{detail}: kernels before 5.12 charge io_uring rings to it"),
            "raise it: ulimit -l unlimited (or LimitMEMLOCK=infinity in the systemd unit)",
        )
    } else {
        check(
            "memlock",
            Status::Ok,
            format!("{detail}; enough: io_uring no longer charges it on this kernel"),
            "",
        )
    }
}

fn privileges(f: &Facts) -> Check {
    let has = |cap: u32| f.cap_eff.is_some_and(|c| c & (1u64 << cap) != 0);
    let detail = format!(
        "euid {}, CAP_SYS_ADMIN {}, CAP_NET_ADMIN {}",
        f.euid,
        if has(CAP_SYS_ADMIN) { "yes" } else { "no" },
        if has(CAP_NET_ADMIN) { "yes" } else { "no" }
    );
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        check("privileges", Status::Ok, detail, "")
    } else {
        check(
            "privileges",
            Status::Fail,
            format!("{detail}: creating VDUSE devices needs CAP_SYS_ADMIN, attaching them CAP_NET_ADMIN"),
            "run as root (or grant CAP_SYS_ADMIN and CAP_NET_ADMIN); vhost-user needs neither",
        )
    }
}

/// Landlock (`--landlock on`, the default): which ABI the kernel has. Never a failure: the
/// daemon serves without it, with a warning.
fn landlock(f: &Facts) -> Check {
    const NAME: &str = "landlock";
    match f.landlock_abi {
        None => check(NAME, Status::Warn, "not probed", ""),
        Some(abi) if abi <= 0 => check(
            NAME,
            Status::Warn,
            "this kernel has no Landlock (or it is not in the lsm= list it booted with): the daemon's files are not confined",
            "use a kernel with CONFIG_SECURITY_LANDLOCK=y and landlock in CONFIG_LSM (or lsm=...,landlock on its command line)",
        ),
        Some(abi) if abi < 6 => check(
            NAME,
            Status::Ok,
            format!("ABI {abi}: the daemon's files are confined with the rights this ABI knows (device ioctls need ABI 5, all rights ABI 6)"),
            "",
        ),
        Some(abi) => check(
            NAME,
            Status::Ok,
            format!("ABI {abi}: the daemon may open only the files its configuration names (--landlock on)"),
            "",
        ),
    }
}

/// Bytes of `struct page` the HugeTLB vmemmap optimisation frees per huge page of
/// `huge` bytes: the vmemmap of its base pages minus the one page the kernel keeps.
pub fn vmemmap_saving(huge: u64, base_page: u64) -> u64 {
    let vmemmap = huge / base_page * STRUCT_PAGE_SIZE;
    let pages = vmemmap / base_page;
    pages.saturating_sub(1) * base_page
}

fn hugepages(f: &Facts) -> Check {
    const NAME: &str = "hugepages";
    let base = f.base_page_size;
    let reserved: Vec<_> = f.huge_pools.iter().filter(|p| p.count > 0).collect();
    let total: u64 = reserved
        .iter()
        .map(|p| p.count * vmemmap_saving(p.page_size, base))
        .sum();
    let pools = reserved
        .iter()
        .map(|p| {
            format!(
                "{} × {} ({} of struct page each)",
                p.count,
                bytes(p.page_size),
                bytes(vmemmap_saving(p.page_size, base))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    match (f.hugetlb_optimize_vmemmap, reserved.is_empty()) {
        (_, true) => check(
            NAME,
            Status::Ok,
            format!(
                "no hugepages reserved: hugepage-backed memory not in use (vmemmap optimisation {})",
                match f.hugetlb_optimize_vmemmap {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "not in this kernel",
                }
            ),
            "",
        ),
        (Some(true), false) => check(
            NAME,
            Status::Ok,
            format!(
                "hugepage-backed memory: {pools}; vmemmap optimisation on, frees up to {} of struct page",
                bytes(total)
            ),
            "",
        ),
        (Some(false), false) => check(
            NAME,
            Status::Warn,
            format!(
                "hugepage-backed memory: {pools}; vmemmap optimisation off, {} of struct page could be freed",
                bytes(total)
            ),
            "sysctl -w vm.hugetlb_optimize_vmemmap=1, then reserve the hugepages again (only pages allocated afterwards are optimised)",
        ),
        (None, false) => check(
            NAME,
            Status::Warn,
            format!(
                "hugepage-backed memory: {pools}; this kernel has no vmemmap optimisation ({} of struct page stays in use)",
                bytes(total)
            ),
            "a kernel with CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP (≥ 5.19) frees it",
        ),
    }
}

/// `virtiod doctor`: print the report; Ok(false) when VDUSE serving is impossible.
pub fn run(args: crate::cli::DoctorArgs) -> anyhow::Result<bool> {
    let facts = Facts::gather(Path::new("/"), &args.state_dir);
    let mut report = checks(&facts);
    let possible = report.iter().all(|c| c.status != Status::Fail);
    // Image checks say whether an image can be served; they do not decide the exit status.
    report.extend(args.images.iter().map(|spec| image::image(spec)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report {
            print!("{:<4} {}: {}", c.status.label(), c.check, c.detail);
            if !c.fix.is_empty() {
                print!(" — fix: {}", c.fix);
            }
            println!();
        }
        let fails = report
            .iter()
            .filter(|c| c.status == Status::Fail && !c.check.starts_with("image "))
            .count();
        if possible {
            println!("VDUSE serving: possible");
        } else {
            println!("VDUSE serving: impossible ({fails} FAIL); vhost-user still works");
        }
    }
    Ok(possible)
}

#[cfg(test)]
mod tests;
