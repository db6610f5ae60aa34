use super::probe::tests::FakeRoot;
use super::probe::{HugePool, MODULES};
use super::*;
use vduse::vdpa::MgmtDevice;

/// A fake host where VDUSE works: every module loaded, live probes fine.
fn good_host(root: &FakeRoot) -> Facts {
    root.file("proc/sys/kernel/osrelease", "6.12.38+deb13-cloud-amd64\n")
        .file(
            "proc/modules",
            "vduse 1 0 - Live 0\nvdpa 1 1 vduse, Live 0\nvirtio_vdpa 1 0 - Live 0\nvhost_vdpa 1 0 - Live 0\n",
        )
        .file("proc/self/status", "CapEff:\t000001ffffffffff\n")
        .file("proc/sys/vm/hugetlb_optimize_vmemmap", "0\n")
        .file("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "0\n");
    let mut f = Facts::from_root(root.path());
    f.control = ControlState::Usable {
        kernel_api_version: 0,
    };
    f.mgmt_devices = Ok(vec![MgmtDevice {
        bus_name: None,
        dev_name: "vduse".into(),
        supported_classes: (1 << 1) | (1 << 2),
    }]);
    f.io_uring = Ok(());
    f.state_dir = "/run".into();
    f.o_direct = ("/run".into(), Ok(()));
    f.euid = 0;
    f.landlock_abi = Some(7);
    f
}

fn find<'a>(report: &'a [Check], name: &str) -> &'a Check {
    report
        .iter()
        .find(|c| c.check == name)
        .unwrap_or_else(|| panic!("no check {name}"))
}

#[test]
fn a_good_host_passes_everything() {
    let root = FakeRoot::new();
    let report = checks(&good_host(&root));
    assert_eq!(report.len(), 1 + MODULES.len() + 9);
    for c in &report {
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.fix.is_empty(), "{c:?}");
    }
}

#[test]
fn missing_vduse_fails_with_the_fix() {
    let root = FakeRoot::new();
    let mut f = good_host(&root);
    root.file("proc/modules", "").file(
        "lib/modules/6.12.38+deb13-cloud-amd64/modules.dep",
        "kernel/drivers/vdpa/vdpa_user/vduse.ko.xz: kernel/drivers/vdpa/vdpa.ko.xz\n",
    );
    let fresh = Facts::from_root(root.path());
    f.modules = fresh.modules;
    f.modules_dir = fresh.modules_dir;
    f.control = ControlState::Missing;
    f.mgmt_devices = Err("vdpa netlink family not found: load the vdpa module".into());
    let report = checks(&f);
    let vduse = find(&report, "module vduse");
    assert_eq!(vduse.status, Status::Warn, "installed: modprobe fixes it");
    assert_eq!(vduse.fix, "modprobe vduse");
    // vdpa is neither loaded nor installed here: VDUSE impossible.
    assert_eq!(find(&report, "module vdpa").status, Status::Fail);
    // The bus drivers only limit the attach modes.
    assert_eq!(find(&report, "module virtio_vdpa").status, Status::Warn);
    let control = find(&report, "/dev/vduse/control");
    assert_eq!(control.status, Status::Fail);
    assert_eq!(control.fix, "modprobe vduse");
    assert_eq!(
        find(&report, "vdpa management devices").status,
        Status::Fail
    );
}

#[test]
fn old_kernel_unprivileged_no_io_uring() {
    let root = FakeRoot::new();
    let mut f = good_host(&root);
    f.kernel_release = Some("5.10.0-28-amd64".into());
    f.cap_eff = Some(0);
    f.euid = 1000;
    f.io_uring = Err("Operation not permitted (os error 1)".into());
    f.memlock = (64 * KIB, 64 * KIB);
    f.o_direct = ("/run/virtiod".into(), Err("Invalid argument".into()));
    let report = checks(&f);
    let kernel = find(&report, "kernel");
    assert_eq!(kernel.status, Status::Fail);
    assert!(kernel.detail.contains("5.15"));
    let privs = find(&report, "privileges");
    assert_eq!(privs.status, Status::Fail);
    assert!(privs.detail.contains("euid 1000"));
    assert_eq!(find(&report, "io_uring").status, Status::Fail);
    let memlock = find(&report, "memlock");
    assert_eq!(memlock.status, Status::Warn);
    assert!(memlock.detail.contains("64 KiB"), "{memlock:?}");
    let odirect = find(&report, "O_DIRECT");
    assert_eq!(odirect.status, Status::Warn);
    assert!(odirect.fix.contains("--buffered"));
    // A small memlock limit is fine on kernels that stopped charging io_uring to it.
    f.kernel_release = Some("6.1.0".into());
    assert_eq!(find(&checks(&f), "memlock").status, Status::Ok);
}

#[test]
fn mgmt_device_without_block_class_fails() {
    let root = FakeRoot::new();
    let mut f = good_host(&root);
    f.mgmt_devices = Ok(vec![MgmtDevice {
        bus_name: None,
        dev_name: "vduse".into(),
        supported_classes: 1 << 1,
    }]);
    assert_eq!(
        find(&checks(&f), "vdpa management devices").status,
        Status::Fail
    );
    f.mgmt_devices = Ok(vec![]);
    let c = checks(&f);
    let m = find(&c, "vdpa management devices");
    assert_eq!(m.status, Status::Fail);
    assert!(m.detail.contains("[]"));
}

#[test]
fn vmemmap_saving_is_computed_from_page_sizes() {
    // 2 MiB / 4 KiB = 512 struct pages × 64 B = 32 KiB = 8 vmemmap pages; 7 are freed.
    assert_eq!(vmemmap_saving(2 * MIB, 4 * KIB), 28 * KIB);
    // 1 GiB: 262144 × 64 B = 16 MiB = 4096 pages; all but one freed.
    assert_eq!(vmemmap_saving(GIB, 4 * KIB), 16 * MIB - 4 * KIB);
    // 64 KiB pages (arm64): 2 MiB → 32 struct pages, 2 KiB of vmemmap: less than a page.
    assert_eq!(vmemmap_saving(2 * MIB, 64 * KIB), 0);
}

#[test]
fn hugepage_wording() {
    let root = FakeRoot::new();
    let mut f = good_host(&root);
    let h = checks(&f);
    let h = find(&h, "hugepages");
    assert_eq!(h.status, Status::Ok);
    assert!(h.detail.contains("not in use"), "{h:?}");

    f.huge_pools = vec![
        HugePool {
            page_size: 2 * MIB,
            count: 512,
        },
        HugePool {
            page_size: GIB,
            count: 0,
        },
    ];
    f.hugetlb_optimize_vmemmap = Some(false);
    let report = checks(&f);
    let h = find(&report, "hugepages");
    assert_eq!(h.status, Status::Warn);
    // 512 pages × 28 KiB = 14 MiB.
    assert!(
        h.detail
            .contains("512 × 2 MiB (28 KiB of struct page each)"),
        "{h:?}"
    );
    assert!(
        h.detail.contains("14 MiB of struct page could be freed"),
        "{h:?}"
    );
    assert!(h.fix.contains("hugetlb_optimize_vmemmap=1"));

    f.hugetlb_optimize_vmemmap = Some(true);
    let report = checks(&f);
    let h = find(&report, "hugepages");
    assert_eq!(h.status, Status::Ok);
    assert!(h.detail.contains("frees up to 14 MiB"), "{h:?}");

    f.hugetlb_optimize_vmemmap = None;
    assert_eq!(find(&checks(&f), "hugepages").status, Status::Warn);
}

#[test]
fn json_shape() {
    let root = FakeRoot::new();
    let report = checks(&good_host(&root));
    let v: serde_json::Value = serde_json::to_value(&report).unwrap();
    let first = &v.as_array().unwrap()[0];
    assert_eq!(first["check"], "kernel");
    assert_eq!(first["status"], "OK");
    assert!(first["detail"].is_string() && first["fix"].is_string());
}

#[test]
fn vduse_net_is_reported_from_the_management_device_classes() {
    let root = FakeRoot::new();
    let mut f = good_host(&root);
    assert_eq!(find(&checks(&f), "VDUSE net").status, Status::Ok);
    f.mgmt_devices = Ok(vec![MgmtDevice {
        bus_name: None,
        dev_name: "vduse".into(),
        supported_classes: 1 << 2,
    }]);
    let c = checks(&f);
    let net = find(&c, "VDUSE net");
    assert_eq!(net.status, Status::Warn);
    assert!(net.detail.contains("6.10"), "{}", net.detail);
    assert_eq!(find(&c, "vdpa management devices").status, Status::Ok);
}

#[test]
fn landlock_is_reported_and_never_fails() {
    let root = FakeRoot::new();
    let mut f = good_host(&root);
    assert!(find(&checks(&f), "landlock").detail.starts_with("ABI 7:"));
    f.landlock_abi = Some(3);
    let c = find(&checks(&f), "landlock").clone();
    assert_eq!(
        (c.status, c.detail.contains("ABI 3")),
        (Status::Ok, true),
        "{c:?}"
    );
    f.landlock_abi = Some(0);
    let c = find(&checks(&f), "landlock").clone();
    assert_eq!(c.status, Status::Warn);
    assert!(c.fix.contains("CONFIG_SECURITY_LANDLOCK"), "{c:?}");
}
