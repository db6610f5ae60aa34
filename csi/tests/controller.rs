//! The Controller service with the `local` source: the spec's answers for sizes, names,
//! capabilities, existing volumes and unknown ids.

use std::sync::Arc;

use tonic::{Code, Request};
use virtiod_csi::controller::ControllerService;
use virtiod_csi::proto::controller_server::Controller;
use virtiod_csi::proto::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, MountVolume,
};
use virtiod_csi::proto::*;
use virtiod_csi::source::local::LocalSource;
use virtiod_csi::source::{Sources, VolumeSource};

fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

fn create(name: &str, required: i64, limit: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capabilities: vec![mount_cap("ext4", Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn create_expand_validate_delete_with_the_spec_codes() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let ctl = ControllerService::new(
        "node-a".into(),
        Sources::new([Arc::new(LocalSource::new(&local)) as Arc<dyn VolumeSource>]),
        dir.path().join("state"),
    );

    let vol = ctl
        .create_volume(Request::new(create("v1", 3 << 20, 0)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "local:node-a:v1");
    assert_eq!(vol.capacity_bytes, 3 << 20);
    assert_eq!(
        vol.accessible_topology[0].segments["topology.virtiod.io/node"],
        "node-a"
    );
    assert_eq!(
        std::fs::metadata(local.join("v1.img")).unwrap().len(),
        3 << 20
    );
    // Same again: the same volume; another size: ALREADY_EXISTS.
    let again = ctl
        .create_volume(Request::new(create("v1", 3 << 20, 0)))
        .await
        .unwrap();
    assert_eq!(again.into_inner().volume.unwrap().volume_id, vol.volume_id);
    assert_eq!(
        code(
            ctl.create_volume(Request::new(create("v1", 6 << 20, 0)))
                .await
        ),
        Code::AlreadyExists
    );
    // Bad requests.
    assert_eq!(
        code(ctl.create_volume(Request::new(create("", 1, 0))).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_volume(Request::new(create("a/b", 1, 0))).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(Request::new(create("v2", 5000, 6000)))
                .await
        ),
        Code::OutOfRange
    );
    let mut no_caps = create("v2", 1, 0);
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(ctl.create_volume(Request::new(no_caps)).await),
        Code::InvalidArgument
    );
    let mut multi = create("v2", 1, 0);
    multi.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
    assert_eq!(
        code(ctl.create_volume(Request::new(multi)).await),
        Code::InvalidArgument
    );
    let mut btrfs = create("v2", 1, 0);
    btrfs.volume_capabilities = vec![mount_cap("btrfs", Mode::SingleNodeWriter)];
    assert_eq!(
        code(ctl.create_volume(Request::new(btrfs)).await),
        Code::InvalidArgument
    );
    let mut elsewhere = create("v2", 1, 0);
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: [("topology.virtiod.io/node".to_string(), "node-b".to_string())].into(),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(ctl.create_volume(Request::new(elsewhere)).await),
        Code::ResourceExhausted
    );

    // Validate: confirmed for ours, not for a multi-node mode; NOT_FOUND for an unknown id.
    let validate = |id: &str, mode: Mode| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![mount_cap("", mode)],
        ..Default::default()
    };
    let ok = ctl
        .validate_volume_capabilities(Request::new(validate(
            &vol.volume_id,
            Mode::SingleNodeWriter,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = ctl
        .validate_volume_capabilities(Request::new(validate(
            &vol.volume_id,
            Mode::MultiNodeReaderOnly,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(Request::new(validate(
                "local:node-a:nope",
                Mode::SingleNodeWriter
            )))
            .await
        ),
        Code::NotFound
    );

    // Expand: grows the file; unknown volume NOT_FOUND; no range INVALID_ARGUMENT.
    let expand = |id: &str, bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let grown = ctl
        .controller_expand_volume(Request::new(expand(&vol.volume_id, 8 << 20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 8 << 20);
    assert!(grown.node_expansion_required);
    // The file is the node's to grow (NodeExpandVolume, through the daemon).
    assert_eq!(
        std::fs::metadata(local.join("v1.img")).unwrap().len(),
        3 << 20
    );
    // A central controller (another node, or none of the volumes' directory) answers the
    // same without looking.
    let central = ControllerService::new(
        "controller-0".into(),
        Sources::new(
            [Arc::new(LocalSource::new(dir.path().join("none"))) as Arc<dyn VolumeSource>],
        ),
        dir.path().join("state"),
    );
    for id in [vol.volume_id.as_str(), "local:node-b:elsewhere"] {
        let answer = central
            .controller_expand_volume(Request::new(expand(id, (8 << 20) + 1)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.capacity_bytes, (8 << 20) + 4096, "{id}");
        assert!(answer.node_expansion_required, "{id}");
    }
    assert_eq!(
        code(
            ctl.controller_expand_volume(Request::new(expand("local:node-a:nope", 1 << 20)))
                .await
        ),
        Code::NotFound
    );
    let mut no_range = expand(&vol.volume_id, 1);
    no_range.capacity_range = None;
    assert_eq!(
        code(ctl.controller_expand_volume(Request::new(no_range)).await),
        Code::InvalidArgument
    );

    // Capacity: the local dir's free bytes.
    let cap = ctl
        .get_capacity(Request::new(GetCapacityRequest::default()))
        .await
        .unwrap();
    assert!(cap.into_inner().available_capacity > 0);

    // Delete: twice OK; an id that is not ours is OK too; a missing id INVALID_ARGUMENT.
    for id in [vol.volume_id.as_str(), vol.volume_id.as_str(), "garbage"] {
        ctl.delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    assert!(!local.join("v1.img").exists());
    assert_eq!(
        code(
            ctl.delete_volume(Request::new(DeleteVolumeRequest::default()))
                .await
        ),
        Code::InvalidArgument
    );
}

fn from_snapshot(name: &str, required: i64, limit: i64, snapshot_id: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snapshot_id.into(),
                },
            )),
        }),
        ..create(name, required, limit)
    }
}

fn snapshot(volume_id: &str, name: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: volume_id.into(),
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn snapshots_and_volumes_from_them_with_the_spec_codes() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let ctl = ControllerService::new(
        "node-a".into(),
        Sources::new([Arc::new(LocalSource::new(&local)) as Arc<dyn VolumeSource>]),
        dir.path().join("state"),
    );
    let caps = ctl
        .controller_get_capabilities(Request::new(ControllerGetCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let announced: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            let controller_service_capability::Type::Rpc(rpc) = c.r#type.as_ref()?;
            Some(rpc.r#type)
        })
        .collect();
    use controller_service_capability::rpc::Type as Rpc;
    assert!(announced.contains(&(Rpc::CreateDeleteSnapshot as i32)));
    assert!(!announced.contains(&(Rpc::ListSnapshots as i32)));

    ctl.create_volume(Request::new(create("v1", 3 << 20, 0)))
        .await
        .unwrap();
    let snap = ctl
        .create_snapshot(Request::new(snapshot("local:node-a:v1", "s1")))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.snapshot_id, "local:node-a:v1@s1");
    assert_eq!(snap.size_bytes, 3 << 20);
    assert!(snap.ready_to_use && snap.creation_time.is_some());
    assert!(local.join("snapshots/s1/v1.img").exists());
    // Required fields, bad names, parameters, unknown or other nodes' volumes.
    for (req, expected) in [
        (snapshot("", "s2"), Code::InvalidArgument),
        (snapshot("local:node-a:v1", ""), Code::InvalidArgument),
        (snapshot("local:node-a:v1", "a/b"), Code::InvalidArgument),
        (snapshot("local:node-a:nope", "s2"), Code::NotFound),
        (snapshot("local:node-b:v1", "s2"), Code::NotFound),
        (
            CreateSnapshotRequest {
                parameters: [("tier".to_string(), "gold".to_string())].into(),
                ..snapshot("local:node-a:v1", "s2")
            },
            Code::InvalidArgument,
        ),
    ] {
        assert_eq!(
            code(ctl.create_snapshot(Request::new(req.clone())).await),
            expected,
            "{req:?}"
        );
    }

    // From it: no size asked for → the snapshot's; more → that; a limit below it → OUT_OF_RANGE.
    let made = ctl
        .create_volume(Request::new(from_snapshot("v2", 0, 0, &snap.snapshot_id)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(made.capacity_bytes, 3 << 20);
    assert_eq!(made.volume_context["virtiod.io/grow-fs"], "true");
    assert!(made.content_source.is_some());
    let bigger = ctl
        .create_volume(Request::new(from_snapshot(
            "v3",
            5 << 20,
            0,
            &snap.snapshot_id,
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(bigger.capacity_bytes, 5 << 20);
    assert_eq!(
        std::fs::metadata(local.join("v3.img")).unwrap().len(),
        5 << 20
    );
    for (req, expected) in [
        (
            from_snapshot("v4", 1 << 20, 2 << 20, &snap.snapshot_id),
            Code::OutOfRange,
        ),
        (
            from_snapshot("v4", 0, 0, "local:node-a:v1@nope"),
            Code::NotFound,
        ),
        (from_snapshot("v4", 0, 0, "garbage"), Code::NotFound),
        (
            from_snapshot("v4", 0, 0, "local:node-b:v1@s1"),
            Code::NotFound,
        ),
        (
            from_snapshot("v4", 0, 0, "rbd:c/p:v1@s1"),
            Code::NotFound, // this plugin has no rbd source
        ),
        (
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Volume(
                        volume_content_source::VolumeSource {
                            volume_id: "local:node-a:v1".into(),
                        },
                    )),
                }),
                ..create("v4", 0, 0)
            },
            Code::InvalidArgument,
        ),
    ] {
        assert_eq!(
            code(ctl.create_volume(Request::new(req.clone())).await),
            expected,
            "{req:?}"
        );
    }
    assert!(!local.join("v4.img").exists());

    // Deleting: the snapshot (twice, and ids that are not ours) and the volumes, in any order.
    for id in [
        snap.snapshot_id.as_str(),
        snap.snapshot_id.as_str(),
        "x",
        "local:node-b:v@s",
    ] {
        ctl.delete_snapshot(Request::new(DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    assert_eq!(
        code(
            ctl.delete_snapshot(Request::new(DeleteSnapshotRequest::default()))
                .await
        ),
        Code::InvalidArgument
    );
    assert!(!local.join("snapshots").exists());
    for name in ["v1", "v2", "v3"] {
        ctl.delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: format!("local:node-a:{name}"),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    assert_eq!(std::fs::read_dir(&local).unwrap().count(), 0);
}
