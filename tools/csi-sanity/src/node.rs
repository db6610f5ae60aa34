//! Node service checks.

use std::path::{Path, PathBuf};

use tonic::Code;
use virtiod_csi::proto::{
    node_service_capability, plugin_capability, CapacityRange, NodeExpandVolumeRequest,
    NodeGetCapabilitiesRequest, NodeGetInfoRequest, NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, Volume,
};

use crate::ctx::{expect_code, expect_ok, show, Ctx, NodeCap};
use crate::{fail, CheckResult, Report};

pub(crate) async fn run(ctx: &mut Ctx, report: &mut Report) {
    let checks: [(&str, Check); 13] = [
        ("Node/GetCapabilities: known capabilities only", |c| {
            Box::pin(capabilities(c))
        }),
        ("Node/GetInfo: node id, max volumes, topology", |c| {
            Box::pin(info(c))
        }),
        (
            "Node/NodeStageVolume: missing fields -> INVALID_ARGUMENT",
            |c| Box::pin(stage_missing(c)),
        ),
        (
            "Node/NodeUnstageVolume: missing fields -> INVALID_ARGUMENT",
            |c| Box::pin(unstage_missing(c)),
        ),
        (
            "Node/NodePublishVolume: missing fields -> INVALID_ARGUMENT",
            |c| Box::pin(publish_missing(c)),
        ),
        (
            "Node/NodeUnpublishVolume: missing fields -> INVALID_ARGUMENT",
            |c| Box::pin(unpublish_missing(c)),
        ),
        (
            "Node/NodeStageVolume: an unknown volume -> NOT_FOUND",
            |c| Box::pin(stage_unknown(c)),
        ),
        (
            "Node/NodePublishVolume: before NodeStageVolume -> FAILED_PRECONDITION",
            |c| Box::pin(publish_unstaged(c)),
        ),
        (
            "Node/NodeUnpublishVolume, NodeUnstageVolume: of a volume not there -> OK",
            |c| Box::pin(undo_nothing(c)),
        ),
        (
            "Node/NodeGetVolumeStats: missing fields, unknown volume",
            |c| Box::pin(stats_errors(c)),
        ),
        (
            "Node/NodeExpandVolume: missing fields, unknown volume",
            |c| Box::pin(expand_errors(c)),
        ),
        (
            "Node/stage, publish, unpublish, unstage: each twice, idempotent",
            |c| Box::pin(full_cycle(c)),
        ),
        (
            "Node/NodeExpandVolume: after ControllerExpandVolume on a published volume",
            |c| Box::pin(expand_published(c)),
        ),
    ];
    for (name, check) in checks {
        let result = check(ctx).await;
        report.record(name, result);
    }
}

type Check = for<'a> fn(
    &'a mut Ctx,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = CheckResult> + 'a>>;

async fn capabilities(ctx: &mut Ctx) -> CheckResult {
    let caps = expect_ok(
        "NodeGetCapabilities",
        ctx.node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await,
    )?;
    for cap in caps.capabilities {
        let Some(node_service_capability::Type::Rpc(rpc)) = cap.r#type else {
            return fail("a capability without an RPC type");
        };
        match NodeCap::try_from(rpc.r#type) {
            Ok(NodeCap::Unknown) | Err(_) => {
                return fail(format!("unknown capability {}", rpc.r#type))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

async fn info(ctx: &mut Ctx) -> CheckResult {
    let info = expect_ok(
        "NodeGetInfo",
        ctx.node.node_get_info(NodeGetInfoRequest {}).await,
    )?;
    if info.node_id.is_empty() {
        return fail("empty node_id");
    }
    if info.max_volumes_per_node < 0 {
        return fail(format!(
            "max_volumes_per_node {} < 0",
            info.max_volumes_per_node
        ));
    }
    let constrained = ctx
        .plugin_caps
        .contains(&plugin_capability::service::Type::VolumeAccessibilityConstraints);
    if constrained && info.accessible_topology.is_none() {
        return fail("VOLUME_ACCESSIBILITY_CONSTRAINTS announced, but no accessible_topology");
    }
    Ok(())
}

/// A staging directory that exists (the CO makes it) and a target path whose parent exists
/// (the plugin makes the target).
fn paths(ctx: &mut Ctx) -> Result<(String, String), crate::Outcome> {
    let base = ctx.path("node");
    let staging = base.join("staging");
    let target_parent = base.join("pods");
    for dir in [&staging, &target_parent] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return fail(format!("cannot create {}: {e}", dir.display()));
        }
    }
    Ok((text(&staging), text(&target_parent.join("target"))))
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn stage_req(ctx: &Ctx, volume: &Volume, staging: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.into(),
        volume_capability: Some(ctx.mount_cap()),
        volume_context: volume.volume_context.clone(),
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    }
}

fn publish_req(
    ctx: &Ctx,
    volume: &Volume,
    staging: &str,
    target: &str,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(ctx.mount_cap()),
        volume_context: volume.volume_context.clone(),
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    }
}

/// A volume that need not exist: the fields are checked before the volume is looked up.
fn any_volume() -> Volume {
    Volume {
        volume_id: "sanity-any-volume".into(),
        ..Default::default()
    }
}

async fn stage_missing(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node(NodeCap::StageUnstageVolume)?;
    let (staging, _) = paths(ctx)?;
    let volume = any_volume();
    let mut req = stage_req(ctx, &volume, &staging);
    req.volume_id.clear();
    expect_code(
        "NodeStageVolume without an id",
        ctx.node.node_stage_volume(req).await,
        Code::InvalidArgument,
    )?;
    let mut req = stage_req(ctx, &volume, &staging);
    req.staging_target_path.clear();
    expect_code(
        "NodeStageVolume without a staging path",
        ctx.node.node_stage_volume(req).await,
        Code::InvalidArgument,
    )?;
    let mut req = stage_req(ctx, &volume, &staging);
    req.volume_capability = None;
    expect_code(
        "NodeStageVolume without a capability",
        ctx.node.node_stage_volume(req).await,
        Code::InvalidArgument,
    )
}

async fn unstage_missing(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node(NodeCap::StageUnstageVolume)?;
    let (staging, _) = paths(ctx)?;
    let req = NodeUnstageVolumeRequest {
        volume_id: String::new(),
        staging_target_path: staging,
    };
    expect_code(
        "NodeUnstageVolume without an id",
        ctx.node.node_unstage_volume(req).await,
        Code::InvalidArgument,
    )?;
    let req = NodeUnstageVolumeRequest {
        volume_id: "sanity-any-volume".into(),
        staging_target_path: String::new(),
    };
    expect_code(
        "NodeUnstageVolume without a staging path",
        ctx.node.node_unstage_volume(req).await,
        Code::InvalidArgument,
    )
}

async fn publish_missing(ctx: &mut Ctx) -> CheckResult {
    let (staging, target) = paths(ctx)?;
    let volume = any_volume();
    let mut req = publish_req(ctx, &volume, &staging, &target);
    req.volume_id.clear();
    expect_code(
        "NodePublishVolume without an id",
        ctx.node.node_publish_volume(req).await,
        Code::InvalidArgument,
    )?;
    let mut req = publish_req(ctx, &volume, &staging, &target);
    req.target_path.clear();
    expect_code(
        "NodePublishVolume without a target path",
        ctx.node.node_publish_volume(req).await,
        Code::InvalidArgument,
    )?;
    let mut req = publish_req(ctx, &volume, &staging, &target);
    req.volume_capability = None;
    expect_code(
        "NodePublishVolume without a capability",
        ctx.node.node_publish_volume(req).await,
        Code::InvalidArgument,
    )
}

async fn unpublish_missing(ctx: &mut Ctx) -> CheckResult {
    let (_, target) = paths(ctx)?;
    let req = NodeUnpublishVolumeRequest {
        volume_id: String::new(),
        target_path: target,
    };
    expect_code(
        "NodeUnpublishVolume without an id",
        ctx.node.node_unpublish_volume(req).await,
        Code::InvalidArgument,
    )?;
    let req = NodeUnpublishVolumeRequest {
        volume_id: "sanity-any-volume".into(),
        target_path: String::new(),
    };
    expect_code(
        "NodeUnpublishVolume without a target path",
        ctx.node.node_unpublish_volume(req).await,
        Code::InvalidArgument,
    )
}

async fn stage_unknown(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node(NodeCap::StageUnstageVolume)?;
    let volume = Volume {
        volume_id: ctx.gone_volume_id().await?,
        ..Default::default()
    };
    let (staging, _) = paths(ctx)?;
    let req = stage_req(ctx, &volume, &staging);
    let result = ctx.node.node_stage_volume(req).await;
    if result.is_ok() {
        ctx.staged(&volume.volume_id, &staging);
    }
    expect_code(
        "NodeStageVolume of a deleted volume",
        result,
        Code::NotFound,
    )
}

async fn publish_unstaged(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node(NodeCap::StageUnstageVolume)?;
    let volume = ctx.create_default("unstaged").await?;
    let (staging, target) = paths(ctx)?;
    let req = publish_req(ctx, &volume, &staging, &target);
    let result = ctx.node.node_publish_volume(req).await;
    if result.is_ok() {
        ctx.published(&volume.volume_id, &target);
    }
    expect_code(
        "NodePublishVolume of a volume not staged",
        result,
        Code::FailedPrecondition,
    )?;
    let mut req = publish_req(ctx, &volume, &staging, &target);
    req.staging_target_path.clear();
    let result = ctx.node.node_publish_volume(req).await;
    if result.is_ok() {
        ctx.published(&volume.volume_id, &target);
    }
    expect_code(
        "NodePublishVolume without a staging path (STAGE_UNSTAGE announced)",
        result,
        Code::FailedPrecondition,
    )
}

async fn undo_nothing(ctx: &mut Ctx) -> CheckResult {
    ctx.controller()?;
    let volume = ctx.create_default("undo").await?;
    let (staging, target) = paths(ctx)?;
    let req = NodeUnpublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        target_path: target,
    };
    expect_ok(
        "NodeUnpublishVolume of a volume never published",
        ctx.node.node_unpublish_volume(req).await,
    )?;
    if ctx.node_caps.contains(&NodeCap::StageUnstageVolume) {
        let req = NodeUnstageVolumeRequest {
            volume_id: volume.volume_id,
            staging_target_path: staging,
        };
        expect_ok(
            "NodeUnstageVolume of a volume never staged",
            ctx.node.node_unstage_volume(req).await,
        )?;
    }
    Ok(())
}

async fn stats_errors(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node(NodeCap::GetVolumeStats)?;
    let (_, target) = paths(ctx)?;
    let req = NodeGetVolumeStatsRequest {
        volume_path: target.clone(),
        ..Default::default()
    };
    expect_code(
        "NodeGetVolumeStats without an id",
        ctx.node.node_get_volume_stats(req).await,
        Code::InvalidArgument,
    )?;
    let req = NodeGetVolumeStatsRequest {
        volume_id: "sanity-any-volume".into(),
        ..Default::default()
    };
    expect_code(
        "NodeGetVolumeStats without a path",
        ctx.node.node_get_volume_stats(req).await,
        Code::InvalidArgument,
    )?;
    let req = NodeGetVolumeStatsRequest {
        volume_id: "sanity-no-such-volume".into(),
        volume_path: target,
        ..Default::default()
    };
    expect_code(
        "NodeGetVolumeStats of an unknown volume",
        ctx.node.node_get_volume_stats(req).await,
        Code::NotFound,
    )
}

async fn expand_errors(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node(NodeCap::ExpandVolume)?;
    let (_, target) = paths(ctx)?;
    let req = NodeExpandVolumeRequest {
        volume_path: target.clone(),
        ..Default::default()
    };
    expect_code(
        "NodeExpandVolume without an id",
        ctx.node.node_expand_volume(req).await,
        Code::InvalidArgument,
    )?;
    let req = NodeExpandVolumeRequest {
        volume_id: "sanity-no-such-volume".into(),
        volume_path: target,
        ..Default::default()
    };
    expect_code(
        "NodeExpandVolume of an unknown volume",
        ctx.node.node_expand_volume(req).await,
        Code::NotFound,
    )
}

/// Whether `path` is a mount point (in this process's mount namespace).
fn is_mount_point(path: &str) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // Field 5 is the mount point, with spaces and the like octal-escaped.
    let escaped = path
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(escaped.as_str()))
}

/// Stage and publish `volume` (each twice), leaving it published; the paths.
async fn stage_and_publish(
    ctx: &mut Ctx,
    volume: &Volume,
) -> Result<(String, String), crate::Outcome> {
    let (staging, target) = paths(ctx)?;
    let staged = ctx.node_caps.contains(&NodeCap::StageUnstageVolume);
    if staged {
        for round in ["first", "second (idempotent)"] {
            let req = stage_req(ctx, volume, &staging);
            expect_ok(
                &format!("the {round} NodeStageVolume"),
                ctx.node.node_stage_volume(req).await,
            )?;
            ctx.staged(&volume.volume_id, &staging);
        }
    }
    let staging_arg = if staged {
        staging.clone()
    } else {
        String::new()
    };
    for round in ["first", "second (idempotent)"] {
        let req = publish_req(ctx, volume, &staging_arg, &target);
        expect_ok(
            &format!("the {round} NodePublishVolume"),
            ctx.node.node_publish_volume(req).await,
        )?;
        ctx.published(&volume.volume_id, &target);
    }
    if !is_mount_point(&target) {
        return fail(format!(
            "after NodePublishVolume, {target} is not a mount point"
        ));
    }
    Ok((staging, target))
}

async fn full_cycle(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node_io()?;
    ctx.controller()?;
    let volume = ctx.create_default("cycle").await?;
    let (staging, target) = stage_and_publish(ctx, &volume).await?;
    if ctx.node_caps.contains(&NodeCap::GetVolumeStats) {
        let req = NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        };
        let stats = expect_ok(
            "NodeGetVolumeStats",
            ctx.node.node_get_volume_stats(req).await,
        )?;
        if stats.usage.is_empty() {
            return fail("NodeGetVolumeStats of a published volume: no usage");
        }
    }
    for round in ["first", "second (idempotent)"] {
        let req = NodeUnpublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            target_path: target.clone(),
        };
        expect_ok(
            &format!("the {round} NodeUnpublishVolume"),
            ctx.node.node_unpublish_volume(req).await,
        )?;
    }
    ctx.undone(&target);
    if PathBuf::from(&target).exists() {
        return fail(format!(
            "after NodeUnpublishVolume, {target} is still there (the plugin must remove it)"
        ));
    }
    if ctx.node_caps.contains(&NodeCap::StageUnstageVolume) {
        for round in ["first", "second (idempotent)"] {
            let req = NodeUnstageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging.clone(),
            };
            expect_ok(
                &format!("the {round} NodeUnstageVolume"),
                ctx.node.node_unstage_volume(req).await,
            )?;
        }
        ctx.undone(&staging);
        if is_mount_point(&staging) {
            return fail(format!(
                "after NodeUnstageVolume, {staging} is still a mount point"
            ));
        }
    }
    Ok(())
}

async fn expand_published(ctx: &mut Ctx) -> CheckResult {
    ctx.need_node_io()?;
    ctx.need_node(NodeCap::ExpandVolume)?;
    let mut c = ctx.need_ctrl(crate::ctx::CtrlCap::ExpandVolume)?;
    let volume = ctx.create_default("nodeexpand").await?;
    let (_, target) = stage_and_publish(ctx, &volume).await?;
    let required = 2 * ctx.config.volume_size as i64;
    let range = Some(CapacityRange {
        required_bytes: required,
        limit_bytes: 0,
    });
    let req = virtiod_csi::proto::ControllerExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        capacity_range: range,
        secrets: ctx.config.secrets.clone(),
        volume_capability: Some(ctx.mount_cap()),
    };
    let answer = match c.controller_expand_volume(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return fail(format!("ControllerExpandVolume: {}", show(&s))),
    };
    if !answer.node_expansion_required {
        return Ok(());
    }
    let req = NodeExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        volume_path: target,
        capacity_range: range,
        volume_capability: Some(ctx.mount_cap()),
        ..Default::default()
    };
    let answer = expect_ok("NodeExpandVolume", ctx.node.node_expand_volume(req).await)?;
    if answer.capacity_bytes != 0 && answer.capacity_bytes < required {
        return fail(format!(
            "NodeExpandVolume: capacity_bytes {} < {required}",
            answer.capacity_bytes
        ));
    }
    Ok(())
}
