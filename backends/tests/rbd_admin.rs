//! The RBD provisioning API against a real single-node Ceph cluster
//! (`tests/ceph/start-cluster.sh`: one monitor, one memstore OSD, cephx, loopback). One test
//! starts the cluster once and runs every case on it.

use std::process::Command;

use virtiod_backend::rbd_admin::{Cluster, ClusterConfig, FEATURES_DEFAULT, FEATURE_LAYERING};
use virtiod_testkit::ceph::{TestCluster, NOT_INSTALLED};

const MIB: u64 = 1 << 20;

/// A test that cannot run here calls this and returns; with `VIRTIOD_NO_SKIP=1` (CI) it
/// fails instead (the same contract as virtiod's tests/common `skip_or_fail`).
fn skip_or_fail(reason: &str) {
    if std::env::var_os("VIRTIOD_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("VIRTIOD_NO_SKIP=1 but this test would skip: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    if let Some(log) = std::env::var_os("VIRTIOD_SKIP_LOG").filter(|p| !p.is_empty()) {
        use std::io::Write;
        let line = format!("virtiod_backend::rbd_admin: SKIPPED: {reason}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// `client.admin` through the test configuration (which names the admin keyring).
fn admin(tc: &TestCluster) -> ClusterConfig {
    ClusterConfig {
        conf: Some(tc.conf()),
        ..ClusterConfig::default()
    }
}

/// create → size/features → resize → snapshot → list → clone → remove, through the API, with
/// the `rbd` tool as the witness.
fn life_cycle(tc: &TestCluster) {
    let cluster = Cluster::connect(&admin(tc)).unwrap();
    cluster
        .create_image("rbd", "life", 64 * MIB, FEATURES_DEFAULT)
        .unwrap();
    assert_eq!(cluster.image_size("rbd", "life").unwrap(), 64 * MIB);
    assert_eq!(
        cluster.image_features("rbd", "life").unwrap() & FEATURES_DEFAULT,
        FEATURES_DEFAULT
    );
    let info = tc.tool("rbd", &["info", "rbd/life", "--format", "json"]);
    assert!(info.contains("\"size\":67108864"), "{info}");
    assert!(
        info.contains("fast-diff") && info.contains("deep-flatten"),
        "{info}"
    );

    cluster.resize_image("rbd", "life", 96 * MIB).unwrap();
    assert_eq!(cluster.image_size("rbd", "life").unwrap(), 96 * MIB);

    cluster.create_snapshot("rbd", "life", "s1").unwrap();
    cluster.resize_image("rbd", "life", 128 * MIB).unwrap();
    cluster.create_snapshot("rbd", "life", "s2").unwrap();
    let snaps = cluster.list_snapshots("rbd", "life").unwrap();
    let names: Vec<(&str, u64)> = snaps.iter().map(|s| (s.name.as_str(), s.size)).collect();
    assert_eq!(names, [("s1", 96 * MIB), ("s2", 128 * MIB)]);
    assert!(tc.tool("rbd", &["snap", "ls", "rbd/life"]).contains("s2"));
    let e = cluster.create_snapshot("rbd", "life", "s1").unwrap_err();
    assert!(e.is_already_exists(), "{e}");

    // A clone of s1 has s1's size; while it exists, s1 cannot go.
    cluster
        .clone_image("rbd", "life", "s1", "life-clone", FEATURE_LAYERING)
        .unwrap();
    assert_eq!(cluster.image_size("rbd", "life-clone").unwrap(), 96 * MIB);
    let e = cluster.remove_snapshot("rbd", "life", "s1").unwrap_err();
    assert_eq!(e.errno(), Some(-libc::EBUSY), "{e}");
    assert!(e.to_string().contains("rbd children"), "{e}");

    let mut images = cluster.list_images("rbd").unwrap();
    images.retain(|i| i.starts_with("life"));
    assert_eq!(images, ["life", "life-clone"]);

    // An image with snapshots cannot be removed; the error says how to proceed.
    let e = cluster.remove_image("rbd", "life").unwrap_err();
    assert_eq!(e.errno(), Some(-libc::ENOTEMPTY), "{e}");
    assert!(e.to_string().contains("rbd snap purge rbd/life"), "{e}");

    cluster.remove_image("rbd", "life-clone").unwrap();
    cluster.remove_snapshot("rbd", "life", "s1").unwrap();
    cluster.remove_snapshot("rbd", "life", "s2").unwrap();
    assert!(cluster.list_snapshots("rbd", "life").unwrap().is_empty());
    cluster.remove_image("rbd", "life").unwrap();
    assert!(!cluster
        .list_images("rbd")
        .unwrap()
        .iter()
        .any(|i| i.starts_with("life")));
    assert!(!tc.tool("rbd", &["ls", "rbd"]).contains("life"));

    // Removing what is gone says "not found" (callers make deletion idempotent with it).
    let e = cluster.remove_image("rbd", "life").unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

/// More than the first listing buffer holds (8 images, 4 snapshots with the terminating entry): the lists grow.
fn long_lists(tc: &TestCluster) {
    let cluster = Cluster::connect(&admin(tc)).unwrap();
    // From 8 threads at once: a `Cluster` is shared between threads.
    let each = |op: &(dyn Fn(usize) + Sync)| {
        std::thread::scope(|s| {
            for t in 0..8 {
                s.spawn(move || (t..12).step_by(8).for_each(op));
            }
        })
    };
    each(&|i| {
        cluster
            .create_image("rbd", &format!("many-{i:02}"), MIB, FEATURE_LAYERING)
            .unwrap()
    });
    let images: Vec<String> = cluster
        .list_images("rbd")
        .unwrap()
        .into_iter()
        .filter(|i| i.starts_with("many-"))
        .collect();
    assert_eq!(images.len(), 12);
    assert_eq!(images[0], "many-00");
    for i in 0..6 {
        cluster
            .create_snapshot("rbd", "many-00", &format!("s{i:02}"))
            .unwrap();
    }
    let snaps = cluster.list_snapshots("rbd", "many-00").unwrap();
    assert_eq!(snaps.len(), 6);
    assert_eq!(
        (snaps[0].name.as_str(), snaps[5].name.as_str()),
        ("s00", "s05")
    );
    for i in 0..6 {
        cluster
            .remove_snapshot("rbd", "many-00", &format!("s{i:02}"))
            .unwrap();
    }
    each(&|i| {
        cluster
            .remove_image("rbd", &format!("many-{i:02}"))
            .unwrap()
    });
}

/// Missing pool, missing image, a name taken: one-line errors that say what to do.
fn errors_for_missing_things(tc: &TestCluster) {
    let cluster = Cluster::connect(&admin(tc)).unwrap();
    let e = cluster
        .create_image("nopool", "x", MIB, FEATURES_DEFAULT)
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(
        e.to_string(),
        "nopool: cannot open the pool: No such file or directory: no pool \"nopool\": check the name (ceph osd pool ls)"
    );
    let e = cluster.image_size("rbd", "noimage").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        e.to_string().starts_with(
            "rbd/noimage: cannot open the image: No such file or directory: no such image"
        ),
        "{e}"
    );
    let e = cluster.resize_image("rbd", "noimage", MIB).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = cluster.list_snapshots("rbd", "noimage").unwrap_err();
    assert!(e.is_not_found(), "{e}");

    cluster
        .create_image("rbd", "taken", MIB, FEATURES_DEFAULT)
        .unwrap();
    let e = cluster
        .create_image("rbd", "taken", 2 * MIB, FEATURES_DEFAULT)
        .unwrap_err();
    assert!(e.is_already_exists(), "{e}");
    assert!(e.to_string().contains("pick another name"), "{e}");
    assert_eq!(
        cluster.image_size("rbd", "taken").unwrap(),
        MIB,
        "untouched"
    );
    cluster.remove_image("rbd", "taken").unwrap();
}

/// A restricted cephx user given by monitors + id + key (what a CSI StorageClass and Secret
/// carry, no configuration file): works with its key, is refused with another.
fn monitors_id_and_key(tc: &TestCluster) {
    let key = tc.rbd_user("csi");
    let config = ClusterConfig {
        mon_host: Some(tc.mon_host()),
        id: Some("csi".into()),
        key: Some(key),
        ..ClusterConfig::default()
    };
    let cluster = Cluster::connect(&config).unwrap();
    cluster
        .create_image("rbd", "by-csi", 4 * MIB, FEATURES_DEFAULT)
        .unwrap();
    cluster.resize_image("rbd", "by-csi", 8 * MIB).unwrap();
    assert_eq!(cluster.image_size("rbd", "by-csi").unwrap(), 8 * MIB);
    cluster.remove_image("rbd", "by-csi").unwrap();
    drop(cluster);

    let out = Command::new("ceph-authtool")
        .arg("--gen-print-key")
        .output()
        .unwrap();
    let wrong = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let e = Cluster::connect(&ClusterConfig {
        key: Some(wrong),
        ..config
    })
    .unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e.errno(), Some(x) if x == -libc::EACCES || x == -libc::EPERM),
        "{text}"
    );
    assert!(
        text.starts_with("Ceph cluster as client.csi: cannot connect to the cluster: ")
            && text.contains("was refused: check its key"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
}

#[test]
fn rbd_admin_against_a_test_cluster() {
    let dir = std::env::temp_dir().join(format!("virtiod-rbd-admin-{}", std::process::id()));
    let Some(tc) = TestCluster::start(dir) else {
        skip_or_fail(NOT_INSTALLED);
        return;
    };
    life_cycle(&tc);
    long_lists(&tc);
    errors_for_missing_things(&tc);
    monitors_id_and_key(&tc);
}
