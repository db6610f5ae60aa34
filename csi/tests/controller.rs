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
