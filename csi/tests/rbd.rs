//! The `rbd` source against a real single-node Ceph cluster (`tests/ceph/start-cluster.sh`):
//! the plugin runs as a controller and is driven through its socket as the
//! external-provisioner and external-resizer would, with a restricted cephx user's secrets;
//! the `rbd` tool is the witness. The node side of staging (the keyring files and the image
//! string the daemon gets) is checked through the library, since staging itself needs VDUSE.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Code;
use virtiod_csi::proto::controller_client::ControllerClient;
use virtiod_csi::proto::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, MountVolume,
};
use virtiod_csi::proto::volume_content_source::{SnapshotSource, Type as ContentType};
use virtiod_csi::proto::*;
use virtiod_csi::source::rbd::RbdSource;
use virtiod_csi::source::{SourceContext, VolumeSource};
use virtiod_csi::volume::VolumeId;
use virtiod_testkit::ceph::{TestCluster, NOT_INSTALLED};

const MIB: i64 = 1 << 20;

/// A test that cannot run here calls this and returns; with `VIRTIOD_NO_SKIP=1` (CI) it
/// fails instead (the same contract as virtiod's tests/common `skip_or_fail`).
fn skip_or_fail(reason: &str) {
    if std::env::var_os("VIRTIOD_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("VIRTIOD_NO_SKIP=1 but this test would skip: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    if let Some(log) = std::env::var_os("VIRTIOD_SKIP_LOG").filter(|p| !p.is_empty()) {
        use std::io::Write;
        let line = format!("virtiod_csi rbd: SKIPPED: {reason}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The plugin as a controller only, its log in `dir/plugin.log`.
fn start(dir: &Path, clusters: &Path) -> Plugin {
    let socket = dir.join("csi.sock");
    let log = std::fs::File::create(dir.join("plugin.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_virtiod-csi"))
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-id", "controller-0", "--role", "controller"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--rbd-clusters")
        .arg(clusters)
        .env("VIRTIOD_CSI_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start virtiod-csi");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "virtiod-csi did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Plugin(child)
}

fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create(
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
    secrets: &HashMap<String, String>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })),
        }],
        parameters: map(params),
        secrets: secrets.clone(),
        ..Default::default()
    }
}

/// `rbd info` of `rbd/NAME`: its size, or `None` if the image does not exist.
fn image_size(tc: &TestCluster, name: &str) -> Option<i64> {
    let listed = tc.tool("rbd", &["ls", "rbd"]);
    if !listed.lines().any(|l| l == name) {
        return None;
    }
    let info = tc.tool("rbd", &["info", &format!("rbd/{name}"), "--format", "json"]);
    let json: serde_json::Value = serde_json::from_str(&info).unwrap();
    json["size"].as_i64()
}

fn error<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    result.expect_err("expected an error")
}

const SC: &[(&str, &str)] = &[
    ("source", "rbd"),
    ("clusterID", "test"),
    ("pool", "rbd"),
    ("csi.storage.k8s.io/pvc/name", "data"),
];

#[tokio::test]
async fn rbd_volumes_through_the_controller_on_a_real_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tc) = TestCluster::start(dir.path().join("cluster")) else {
        skip_or_fail(NOT_INSTALLED);
        return;
    };
    let key = tc.rbd_user("csi");
    let clusters = dir.path().join("clusters");
    std::fs::create_dir_all(&clusters).unwrap();
    std::fs::write(clusters.join("test"), format!("{}\n", tc.mon_host())).unwrap();
    // Nothing listens on port 1 of the loopback: a cluster that cannot be reached.
    std::fs::write(clusters.join("down"), "127.0.0.1:1\n").unwrap();
    let _plugin = start(dir.path(), &clusters);
    let channel = virtiod_csi::endpoint::connect(&dir.path().join("csi.sock"))
        .await
        .unwrap();
    let mut ctl = ControllerClient::new(channel);
    let secrets = map(&[("userID", "csi"), ("userKey", &key)]);

    // CreateVolume: the image exists, rounded up to a MiB; no topology (any node reaches it).
    let vol = ctl
        .create_volume(create("pvc-1", 10 * MIB + 1, SC, &secrets))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "rbd:test/rbd:pvc-1");
    assert_eq!(vol.capacity_bytes, 11 * MIB);
    assert!(vol.accessible_topology.is_empty());
    assert_eq!(image_size(&tc, "pvc-1"), Some(11 * MIB));

    // Same again: the same volume; another size: ALREADY_EXISTS, the image untouched.
    let again = ctl
        .create_volume(create("pvc-1", 10 * MIB + 1, SC, &secrets))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let e = error(
        ctl.create_volume(create("pvc-1", 32 * MIB, SC, &secrets))
            .await,
    );
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(image_size(&tc, "pvc-1"), Some(11 * MIB));

    // ValidateVolumeCapabilities finds it with the secrets.
    let valid = ctl
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: create("x", 0, &[], &secrets).volume_capabilities,
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(valid.confirmed.is_some(), "{valid:?}");

    // ControllerExpandVolume grows the image centrally; the node must still tell the driver.
    let expand = |bytes: i64| ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        secrets: secrets.clone(),
        volume_capability: None,
    };
    let grown = ctl
        .controller_expand_volume(expand(24 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 24 * MIB);
    assert!(grown.node_expansion_required);
    assert_eq!(image_size(&tc, "pvc-1"), Some(24 * MIB));
    // Never shrinks.
    let same = ctl
        .controller_expand_volume(expand(12 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.capacity_bytes, 24 * MIB);
    assert_eq!(image_size(&tc, "pvc-1"), Some(24 * MIB));

    // Errors: each a code the CO acts on, in one line.
    let wrong_key = map(&[
        ("userID", "csi"),
        ("userKey", "AQBpGx1nAAAAABAAw1cPAV5ISI5jZzm6ZbPhlA=="),
    ]);
    let e = error(
        ctl.create_volume(create("pvc-2", MIB, SC, &wrong_key))
            .await,
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("check its key"), "{e:?}");
    eprintln!("wrong key: {:?}: {}", e.code(), e.message());
    let e = error(
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: wrong_key.clone(),
        })
        .await,
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(image_size(&tc, "pvc-1"), Some(24 * MIB), "not deleted");
    let e = error(
        ctl.create_volume(create("pvc-2", MIB, SC, &map(&[("userID", "csi")])))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("userKey"), "{e:?}");
    let other_cluster = [("source", "rbd"), ("clusterID", "nope"), ("pool", "rbd")];
    let e = error(
        ctl.create_volume(create("pvc-2", MIB, &other_cluster, &secrets))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("--rbd-clusters"), "{e:?}");
    let no_pool = [("source", "rbd"), ("clusterID", "test"), ("pool", "nopool")];
    let e = error(
        ctl.create_volume(create("pvc-2", MIB, &no_pool, &secrets))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("no pool"), "{e:?}");
    eprintln!("no pool: {:?}: {}", e.code(), e.message());
    let down = [("source", "rbd"), ("clusterID", "down"), ("pool", "rbd")];
    let e = error(
        ctl.create_volume(create("pvc-2", MIB, &down, &secrets))
            .await,
    );
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    eprintln!("cluster down: {:?}: {}", e.code(), e.message());
    assert!(
        e.message().contains("127.0.0.1:1") && !e.message().contains('\n'),
        "{e:?}"
    );
    let e = error(
        ctl.create_volume(create("pvc-2", MIB, &[("source", "nfs")], &secrets))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(image_size(&tc, "pvc-2").is_none());

    // GetCapacity: unknown for rbd (0).
    let capacity = ctl
        .get_capacity(GetCapacityRequest {
            parameters: map(SC),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capacity.available_capacity, 0);

    node_side_of_staging(&tc, dir.path(), &clusters, &key);
    snapshots(&mut ctl, &tc, dir.path(), &secrets, &wrong_key).await;

    // DeleteVolume removes the image; again: OK.
    for _ in 0..2 {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: secrets.clone(),
        })
        .await
        .unwrap();
        assert!(image_size(&tc, "pvc-1").is_none());
    }

    let log = std::fs::read_to_string(dir.path().join("plugin.log")).unwrap();
    assert!(log.contains("created volume"), "{log}");
    assert!(!log.contains(&key), "the key is never logged");
}

/// What NodeStageVolume and NodeUnstageVolume do for rbd beside the daemon: the private
/// configuration and keyring files, an image string the daemon's backend opens, the size
/// NodeExpandVolume learns from them without secrets.
fn node_side_of_staging(tc: &TestCluster, dir: &Path, clusters: &Path, key: &str) {
    let keys = dir.join("state/ceph");
    let src = RbdSource::new(clusters, &keys);
    let id = VolumeId::parse("rbd:test/rbd:pvc-1").unwrap();
    let ctx = SourceContext::secrets(map(&[("userID", "csi"), ("userKey", key)]));
    let volume = src.stage(&id, &ctx).unwrap();
    assert_eq!(volume.capacity, 24 * MIB as u64);
    let keyring = keys.join("csi-rbd-pvc-1.keyring");
    assert_eq!(
        volume.image,
        format!(
            "rbd:rbd/pvc-1?conf={}&id=csi&keyring={}",
            keys.join("csi-rbd-pvc-1.conf").display(),
            keyring.display()
        )
    );
    assert!(
        !volume.image.contains(key),
        "the key is not in the image string"
    );
    use std::os::unix::fs::PermissionsExt;
    for path in [&keys, &keyring] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is private: {mode:o}", path.display());
    }
    // The daemon's backend opens exactly this image string.
    let spec = virtiod_backend::ImageSpec::parse(&volume.image).unwrap();
    let virtiod_backend::ImageSpec::Rbd(addr) = spec else {
        panic!("not an rbd image: {}", volume.image);
    };
    let backend = virtiod_backend::RbdBackend::open(addr, false).unwrap();
    use virtiod_backend::Backend;
    assert_eq!(backend.info().capacity, 24 * MIB as u64);
    drop(backend);
    tc.run("rbd", &["resize", "rbd/pvc-1", "--size", "28M"]);
    assert_eq!(src.node_size(&id).unwrap(), Some(28 * MIB as u64));
    src.unstage(&id).unwrap();
    assert!(!keyring.exists());
    assert_eq!(src.node_size(&id).unwrap(), None);
}

/// The snapshot of `rbd:test/rbd:NAME` named `snap` (a CreateSnapshot request).
fn snapshot(volume: &str, snap: &str, secrets: &HashMap<String, String>) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: format!("rbd:test/rbd:{volume}"),
        name: snap.into(),
        secrets: secrets.clone(),
        parameters: map(&[("csi.storage.k8s.io/volumesnapshot/name", "s")]),
    }
}

/// A CreateVolume request of `bytes` (0: none asked for) from snapshot id `from`.
fn from_snapshot(
    name: &str,
    bytes: i64,
    limit: i64,
    from: &str,
    secrets: &HashMap<String, String>,
) -> CreateVolumeRequest {
    let mut req = create(name, bytes, SC, secrets);
    req.capacity_range = Some(CapacityRange {
        required_bytes: bytes,
        limit_bytes: limit,
    });
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(ContentType::Snapshot(SnapshotSource {
            snapshot_id: from.into(),
        })),
    });
    req
}

/// CreateSnapshot, CreateVolume from it (its data read back with `rbd export`),
/// DeleteSnapshot, with the `rbd` tool as witness.
async fn snapshots(
    ctl: &mut ControllerClient<Channel>,
    tc: &TestCluster,
    dir: &Path,
    secrets: &HashMap<String, String>,
    wrong_key: &HashMap<String, String>,
) {
    // The source volume: a 4 MiB image holding a pattern (made with `rbd import`).
    let pattern: Vec<u8> = (0..4 * MIB as usize)
        .map(|i| (i / 4096 % 251) as u8)
        .collect();
    let file = dir.join("pattern");
    std::fs::write(&file, &pattern).unwrap();
    tc.run("rbd", &["import", file.to_str().unwrap(), "rbd/snapsrc"]);

    let taken = ctl
        .create_snapshot(snapshot("snapsrc", "snap-1", secrets))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(taken.snapshot_id, "rbd:test/rbd:snapsrc@snap-1");
    assert_eq!(taken.source_volume_id, "rbd:test/rbd:snapsrc");
    assert_eq!(taken.size_bytes, 4 * MIB);
    assert!(taken.ready_to_use);
    let created = taken.creation_time.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - created.seconds).abs() < 600, "{created:?} vs {now}");
    let listed = tc.tool("rbd", &["snap", "ls", "rbd/snapsrc", "--format", "json"]);
    assert!(listed.contains("\"snap-1\""), "{listed}");
    // Same again: the same snapshot; the same name of another volume: ALREADY_EXISTS.
    let again = ctl
        .create_snapshot(snapshot("snapsrc", "snap-1", secrets))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again, taken);
    let e = error(
        ctl.create_snapshot(snapshot("pvc-1", "snap-1", secrets))
            .await,
    );
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = error(
        ctl.create_snapshot(snapshot("snapsrc", "snap-2", wrong_key))
            .await,
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = error(
        ctl.create_snapshot(snapshot("nosuch", "snap-3", secrets))
            .await,
    );
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A volume from it: a clone grown to 8 MiB, the snapshot's data then zeros.
    let req = from_snapshot("pvc-from", 8 * MIB, 0, &taken.snapshot_id, secrets);
    let made = ctl
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(made.volume_id, "rbd:test/rbd:pvc-from");
    assert_eq!(made.capacity_bytes, 8 * MIB);
    assert_eq!(made.content_source, req.volume_content_source);
    assert_eq!(image_size(tc, "pvc-from"), Some(8 * MIB));
    let info = tc.tool("rbd", &["info", "rbd/pvc-from", "--format", "json"]);
    assert!(
        info.contains("\"snap-1\""),
        "a clone of the snapshot: {info}"
    );
    let data = tc.run("rbd", &["export", "rbd/pvc-from", "-"]);
    assert_eq!(data.len(), 8 * MIB as usize);
    assert!(data[..pattern.len()] == pattern[..], "the snapshot's data");
    assert!(data[pattern.len()..].iter().all(|b| *b == 0));
    let again = ctl
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, made);
    // No size asked for: the snapshot's.
    let sized = ctl
        .create_volume(from_snapshot(
            "pvc-from2",
            0,
            0,
            &taken.snapshot_id,
            secrets,
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(sized.capacity_bytes, 4 * MIB);
    // Smaller than the snapshot: OUT_OF_RANGE; unknown snapshots: NOT_FOUND.
    let e = error(
        ctl.create_volume(from_snapshot(
            "pvc-x",
            MIB,
            2 * MIB,
            &taken.snapshot_id,
            secrets,
        ))
        .await,
    );
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    for unknown in [
        "rbd:test/rbd:snapsrc@nope",
        "rbd:test/rbd:nosuch@snap-1",
        "nope",
    ] {
        let e = error(
            ctl.create_volume(from_snapshot("pvc-x", MIB, 0, unknown, secrets))
                .await,
        );
        assert_eq!(e.code(), Code::NotFound, "{unknown}: {e:?}");
    }
    assert!(image_size(tc, "pvc-x").is_none());

    // While clones exist the snapshot stays, and while snapshots exist the volume does.
    let delete_snap = |id: &str| DeleteSnapshotRequest {
        snapshot_id: id.into(),
        secrets: secrets.clone(),
    };
    let e = error(ctl.delete_snapshot(delete_snap(&taken.snapshot_id)).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    eprintln!("snapshot with clones: {:?}: {}", e.code(), e.message());
    let delete_vol = |name: &str| DeleteVolumeRequest {
        volume_id: format!("rbd:test/rbd:{name}"),
        secrets: secrets.clone(),
    };
    let e = error(ctl.delete_volume(delete_vol("snapsrc")).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    eprintln!("volume with snapshots: {:?}: {}", e.code(), e.message());
    for name in ["pvc-from", "pvc-from2"] {
        ctl.delete_volume(delete_vol(name)).await.unwrap();
    }
    for _ in 0..2 {
        ctl.delete_snapshot(delete_snap(&taken.snapshot_id))
            .await
            .unwrap();
    }
    let listed = tc.tool("rbd", &["snap", "ls", "rbd/snapsrc", "--format", "json"]);
    assert_eq!(listed, "[]");
    ctl.delete_snapshot(delete_snap("not-ours")).await.unwrap();
    ctl.delete_volume(delete_vol("snapsrc")).await.unwrap();
    assert!(image_size(tc, "snapsrc").is_none());
}
