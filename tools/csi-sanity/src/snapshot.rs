//! Snapshot checks: CreateSnapshot, DeleteSnapshot, CreateVolume from a snapshot (csi-test's
//! "CreateSnapshot", "DeleteSnapshot" and the snapshot cases of "CreateVolume"). ListSnapshots
//! is checked only where announced: not yet ported.

use tonic::Code;
use virtiod_csi::proto::{
    volume_content_source, CreateSnapshotRequest, DeleteSnapshotRequest, Snapshot, Volume,
    VolumeContentSource,
};

use crate::controller::MAX_NAME;
use crate::ctx::{expect_code, expect_ok, CtrlCap, Ctx};
use crate::{fail, CheckResult};

pub(crate) async fn create_from_missing_snapshot(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteSnapshot)?;
    let name = ctx.unique("fromsnap");
    let mut req = ctx.create_req(&name, ctx.config.volume_size, 0);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "sanity-no-such-snapshot".into(),
            },
        )),
    });
    expect_code(
        "CreateVolume from an unknown snapshot",
        c.create_volume(req).await,
        Code::NotFound,
    )
}

pub(crate) async fn snapshots(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteSnapshot)?;
    let volume = ctx.create_default("snapsrc").await?;
    let secrets = ctx.config.secrets.clone();
    let name = ctx.unique("snap");
    let no_name = CreateSnapshotRequest {
        source_volume_id: volume.volume_id.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "CreateSnapshot without a name",
        c.create_snapshot(no_name).await,
        Code::InvalidArgument,
    )?;
    let no_source = CreateSnapshotRequest {
        name: name.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "CreateSnapshot without a source volume",
        c.create_snapshot(no_source).await,
        Code::InvalidArgument,
    )?;
    let req = CreateSnapshotRequest {
        source_volume_id: volume.volume_id.clone(),
        name,
        secrets: secrets.clone(),
        ..Default::default()
    };
    let first = expect_ok("CreateSnapshot", c.create_snapshot(req.clone()).await)?.snapshot;
    let second = expect_ok("the second CreateSnapshot", c.create_snapshot(req).await)?.snapshot;
    let (Some(first), Some(second)) = (first, second) else {
        return fail("CreateSnapshot: the response has no snapshot");
    };
    if first.snapshot_id.is_empty() || first.snapshot_id != second.snapshot_id {
        return fail(format!(
            "snapshot ids {:?} and {:?}: must be one, not empty",
            first.snapshot_id, second.snapshot_id
        ));
    }
    if first.source_volume_id != volume.volume_id {
        return fail(format!(
            "source_volume_id {:?}, expected {:?}",
            first.source_volume_id, volume.volume_id
        ));
    }
    let no_id = DeleteSnapshotRequest {
        snapshot_id: String::new(),
        secrets: secrets.clone(),
    };
    expect_code(
        "DeleteSnapshot without an id",
        c.delete_snapshot(no_id).await,
        Code::InvalidArgument,
    )?;
    for round in ["first", "second"] {
        let req = DeleteSnapshotRequest {
            snapshot_id: first.snapshot_id.clone(),
            secrets: secrets.clone(),
        };
        expect_ok(
            &format!("the {round} DeleteSnapshot"),
            c.delete_snapshot(req).await,
        )?;
    }
    let unknown = DeleteSnapshotRequest {
        snapshot_id: "sanity-no-such-snapshot".into(),
        secrets,
    };
    expect_ok(
        "DeleteSnapshot of an unknown id",
        c.delete_snapshot(unknown).await,
    )
    .map(|_| ())
}

/// Take snapshot `name` of `volume` (registered for cleanup); any error fails the check.
async fn take(ctx: &mut Ctx, volume: &Volume, name: &str) -> Result<Snapshot, crate::Outcome> {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteSnapshot)?;
    let req = CreateSnapshotRequest {
        source_volume_id: volume.volume_id.clone(),
        name: name.to_string(),
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    let Some(snapshot) = expect_ok("CreateSnapshot", c.create_snapshot(req).await)?.snapshot else {
        return fail("CreateSnapshot: the response has no snapshot");
    };
    if snapshot.snapshot_id.is_empty() {
        return fail("CreateSnapshot: empty snapshot_id");
    }
    ctx.track_snapshot(&snapshot.snapshot_id);
    Ok(snapshot)
}

pub(crate) async fn snapshot_conflict(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteSnapshot)?;
    let first = ctx.create_default("snapsrc").await?;
    let second = ctx.create_default("snapsrc").await?;
    let name = ctx.unique("snap");
    take(ctx, &first, &name).await?;
    let req = CreateSnapshotRequest {
        source_volume_id: second.volume_id.clone(),
        name,
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    let result = c.create_snapshot(req).await;
    if let Ok(r) = &result {
        if let Some(s) = &r.get_ref().snapshot {
            ctx.track_snapshot(&s.snapshot_id);
        }
    }
    expect_code(
        "CreateSnapshot of another volume under a taken name",
        result,
        Code::AlreadyExists,
    )
}

pub(crate) async fn snapshot_long_name(ctx: &mut Ctx) -> CheckResult {
    let volume = ctx.create_default("snapsrc").await?;
    let mut name = ctx.unique("snapmax");
    while name.len() < MAX_NAME {
        name.push('x');
    }
    let snapshot = take(ctx, &volume, &name).await?;
    if snapshot.source_volume_id != volume.volume_id {
        return fail(format!(
            "source_volume_id {:?}, expected {:?}",
            snapshot.source_volume_id, volume.volume_id
        ));
    }
    Ok(())
}

pub(crate) async fn create_from_snapshot(ctx: &mut Ctx) -> CheckResult {
    ctx.need_ctrl(CtrlCap::CreateDeleteSnapshot)?;
    let volume = ctx.create_default("snapsrc").await?;
    let name = ctx.unique("snap");
    let snapshot = take(ctx, &volume, &name).await?;
    if snapshot.size_bytes != 0 && snapshot.size_bytes < volume.capacity_bytes {
        return fail(format!(
            "snapshot size_bytes {} is less than its volume's {}",
            snapshot.size_bytes, volume.capacity_bytes
        ));
    }
    let content = VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            },
        )),
    };
    let name = ctx.unique("fromsnap");
    let mut req = ctx.create_req(&name, ctx.config.volume_size, 0);
    req.volume_content_source = Some(content.clone());
    let made = ctx.create(req).await?;
    if made.capacity_bytes != 0 && made.capacity_bytes < snapshot.size_bytes {
        return fail(format!(
            "a volume of {} bytes from a snapshot of {}",
            made.capacity_bytes, snapshot.size_bytes
        ));
    }
    if made.content_source != Some(content) {
        return fail(format!(
            "content_source {:?}: the snapshot must be echoed",
            made.content_source
        ));
    }
    Ok(())
}
