//! Controller service checks.

use tonic::Code;
use virtiod_csi::proto::{
    controller_service_capability, CapacityRange, ControllerExpandVolumeRequest,
    ControllerGetCapabilitiesRequest, DeleteVolumeRequest, GetCapacityRequest,
    ValidateVolumeCapabilitiesRequest,
};

use crate::ctx::{expect_code, expect_ok, show, CtrlCap, Ctx};
use crate::snapshot;
use crate::{fail, CheckResult, Report};

/// The longest name CreateVolume must take (the CSI spec: 128 bytes).
pub(crate) const MAX_NAME: usize = 128;

pub(crate) async fn run(ctx: &mut Ctx, report: &mut Report) {
    let checks: [(&str, Check); 25] = [
        ("Controller/GetCapabilities: known capabilities only", |c| {
            Box::pin(capabilities(c))
        }),
        (
            "Controller/CreateVolume: no name -> INVALID_ARGUMENT",
            |c| Box::pin(create_no_name(c)),
        ),
        (
            "Controller/CreateVolume: no capabilities -> INVALID_ARGUMENT",
            |c| Box::pin(create_no_caps(c)),
        ),
        (
            "Controller/CreateVolume: a volume of at least the required size",
            |c| Box::pin(create_sized(c)),
        ),
        ("Controller/CreateVolume: no capacity range", |c| {
            Box::pin(create_unsized(c))
        }),
        ("Controller/CreateVolume: within required..limit", |c| {
            Box::pin(create_in_range(c))
        }),
        (
            "Controller/CreateVolume: limit below required -> INVALID_ARGUMENT or OUT_OF_RANGE",
            |c| Box::pin(create_bad_range(c)),
        ),
        (
            "Controller/CreateVolume: same name and capacity twice -> same volume",
            |c| Box::pin(create_twice(c)),
        ),
        (
            "Controller/CreateVolume: same name, other capacity -> ALREADY_EXISTS",
            |c| Box::pin(create_conflict(c)),
        ),
        ("Controller/CreateVolume: a 128-byte name", |c| {
            Box::pin(create_long_name(c))
        }),
        (
            "Controller/CreateVolume: from an unknown snapshot -> NOT_FOUND",
            |c| Box::pin(snapshot::create_from_missing_snapshot(c)),
        ),
        (
            "Controller/CreateVolume: from a snapshot -> its size at least, content_source echoed",
            |c| Box::pin(snapshot::create_from_snapshot(c)),
        ),
        (
            "Controller/DeleteVolume: no volume id -> INVALID_ARGUMENT",
            |c| Box::pin(delete_no_id(c)),
        ),
        ("Controller/DeleteVolume: an unknown volume id -> OK", |c| {
            Box::pin(delete_unknown(c))
        }),
        (
            "Controller/DeleteVolume: delete, then again -> OK both times",
            |c| Box::pin(delete_twice(c)),
        ),
        (
            "Controller/ValidateVolumeCapabilities: no volume id -> INVALID_ARGUMENT",
            |c| Box::pin(validate_no_id(c)),
        ),
        (
            "Controller/ValidateVolumeCapabilities: no capabilities -> INVALID_ARGUMENT",
            |c| Box::pin(validate_no_caps(c)),
        ),
        (
            "Controller/ValidateVolumeCapabilities: confirmed capabilities are not empty",
            |c| Box::pin(validate(c)),
        ),
        (
            "Controller/ValidateVolumeCapabilities: an unknown volume -> NOT_FOUND",
            |c| Box::pin(validate_unknown(c)),
        ),
        (
            "Controller/ControllerExpandVolume: missing fields -> INVALID_ARGUMENT",
            |c| Box::pin(expand_missing(c)),
        ),
        (
            "Controller/ControllerExpandVolume: grows to at least the required size",
            |c| Box::pin(expand(c)),
        ),
        ("Controller/GetCapacity: a non-negative capacity", |c| {
            Box::pin(get_capacity(c))
        }),
        (
            "Controller/CreateSnapshot, DeleteSnapshot: required fields, idempotence",
            |c| Box::pin(snapshot::snapshots(c)),
        ),
        (
            "Controller/CreateSnapshot: same name, other source volume -> ALREADY_EXISTS",
            |c| Box::pin(snapshot::snapshot_conflict(c)),
        ),
        ("Controller/CreateSnapshot: a 128-byte name", |c| {
            Box::pin(snapshot::snapshot_long_name(c))
        }),
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
    let mut c = ctx.controller()?;
    let caps = expect_ok(
        "ControllerGetCapabilities",
        c.controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await,
    )?;
    for cap in caps.capabilities {
        let Some(controller_service_capability::Type::Rpc(rpc)) = cap.r#type else {
            return fail("a capability without an RPC type");
        };
        match CtrlCap::try_from(rpc.r#type) {
            Ok(CtrlCap::Unknown) | Err(_) => {
                return fail(format!("unknown capability {}", rpc.r#type))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

async fn create_no_name(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let req = ctx.create_req("", ctx.config.volume_size, 0);
    expect_code(
        "CreateVolume without a name",
        c.create_volume(req).await,
        Code::InvalidArgument,
    )
}

async fn create_no_caps(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let name = ctx.unique("nocaps");
    let mut req = ctx.create_req(&name, ctx.config.volume_size, 0);
    req.volume_capabilities.clear();
    expect_code(
        "CreateVolume without capabilities",
        c.create_volume(req).await,
        Code::InvalidArgument,
    )
}

/// Capacity must be at least `required` (or 0: unknown, which the spec allows).
fn check_capacity(what: &str, capacity: i64, required: u64) -> CheckResult {
    if capacity != 0 && (capacity as u64) < required {
        return fail(format!(
            "{what}: capacity_bytes {capacity} < required {required}"
        ));
    }
    Ok(())
}

async fn create_sized(ctx: &mut Ctx) -> CheckResult {
    ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let size = ctx.config.volume_size;
    let name = ctx.unique("sized");
    let volume = ctx.create(ctx.create_req(&name, size, 0)).await?;
    check_capacity("CreateVolume", volume.capacity_bytes, size)
}

async fn create_unsized(ctx: &mut Ctx) -> CheckResult {
    ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let name = ctx.unique("unsized");
    let mut req = ctx.create_req(&name, 0, 0);
    req.capacity_range = None;
    ctx.create(req).await.map(|_| ())
}

async fn create_in_range(ctx: &mut Ctx) -> CheckResult {
    ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let size = ctx.config.volume_size;
    let name = ctx.unique("range");
    let volume = ctx.create(ctx.create_req(&name, size, 2 * size)).await?;
    check_capacity("CreateVolume", volume.capacity_bytes, size)?;
    if volume.capacity_bytes as u64 > 2 * size {
        return fail(format!(
            "capacity_bytes {} > limit {}",
            volume.capacity_bytes,
            2 * size
        ));
    }
    Ok(())
}

async fn create_bad_range(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let size = ctx.config.volume_size;
    let name = ctx.unique("badrange");
    let req = ctx.create_req(&name, 2 * size, size);
    match c.create_volume(req).await {
        Ok(r) => {
            if let Some(v) = r.into_inner().volume {
                ctx.deleted(&v.volume_id);
                let _ = c
                    .delete_volume(DeleteVolumeRequest {
                        volume_id: v.volume_id,
                        secrets: ctx.config.secrets.clone(),
                    })
                    .await;
            }
            fail("CreateVolume with limit_bytes < required_bytes succeeded")
        }
        Err(s) if matches!(s.code(), Code::InvalidArgument | Code::OutOfRange) => Ok(()),
        Err(s) => fail(format!(
            "expected INVALID_ARGUMENT or OUT_OF_RANGE, got {}",
            show(&s)
        )),
    }
}

async fn create_twice(ctx: &mut Ctx) -> CheckResult {
    ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let size = ctx.config.volume_size;
    let name = ctx.unique("twice");
    let first = ctx.create(ctx.create_req(&name, size, 0)).await?;
    let second = ctx.create(ctx.create_req(&name, size, 0)).await?;
    check_capacity("the second CreateVolume", second.capacity_bytes, size)?;
    if first.volume_id != second.volume_id {
        return fail(format!(
            "two volumes for one name: {} and {}",
            first.volume_id, second.volume_id
        ));
    }
    Ok(())
}

async fn create_conflict(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let size = ctx.config.volume_size;
    let name = ctx.unique("conflict");
    ctx.create(ctx.create_req(&name, size, size)).await?;
    let req = ctx.create_req(&name, 2 * size, 2 * size);
    let result = c.create_volume(req).await;
    if let Ok(r) = &result {
        if let Some(v) = &r.get_ref().volume {
            ctx.track(&v.volume_id);
        }
    }
    expect_code(
        "CreateVolume of an existing name with another capacity",
        result,
        Code::AlreadyExists,
    )
}

async fn create_long_name(ctx: &mut Ctx) -> CheckResult {
    ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let mut name = ctx.unique("maxlen");
    while name.len() < MAX_NAME {
        name.push('x');
    }
    let size = ctx.config.volume_size;
    let volume = ctx.create(ctx.create_req(&name, size, 0)).await?;
    check_capacity("CreateVolume", volume.capacity_bytes, size)
}

async fn delete_no_id(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let req = DeleteVolumeRequest {
        volume_id: String::new(),
        secrets: ctx.config.secrets.clone(),
    };
    expect_code(
        "DeleteVolume without an id",
        c.delete_volume(req).await,
        Code::InvalidArgument,
    )
}

async fn delete_unknown(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let req = DeleteVolumeRequest {
        volume_id: "sanity-no-such-volume".into(),
        secrets: ctx.config.secrets.clone(),
    };
    expect_ok("DeleteVolume of an unknown id", c.delete_volume(req).await).map(|_| ())
}

async fn delete_twice(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let volume = ctx.create_default("delete").await?;
    for round in ["first", "second"] {
        let req = DeleteVolumeRequest {
            volume_id: volume.volume_id.clone(),
            secrets: ctx.config.secrets.clone(),
        };
        expect_ok(
            &format!("the {round} DeleteVolume"),
            c.delete_volume(req).await,
        )?;
    }
    ctx.deleted(&volume.volume_id);
    Ok(())
}

async fn validate_no_id(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.controller()?;
    let req = ValidateVolumeCapabilitiesRequest {
        volume_capabilities: vec![ctx.mount_cap()],
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "ValidateVolumeCapabilities without an id",
        c.validate_volume_capabilities(req).await,
        Code::InvalidArgument,
    )
}

async fn validate_no_caps(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let volume = ctx.create_default("validate-nocaps").await?;
    let req = ValidateVolumeCapabilitiesRequest {
        volume_id: volume.volume_id,
        volume_context: volume.volume_context,
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "ValidateVolumeCapabilities without capabilities",
        c.validate_volume_capabilities(req).await,
        Code::InvalidArgument,
    )
}

async fn validate(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let volume = ctx.create_default("validate").await?;
    let req = ValidateVolumeCapabilitiesRequest {
        volume_id: volume.volume_id,
        volume_context: volume.volume_context,
        volume_capabilities: vec![ctx.mount_cap()],
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    let answer = expect_ok(
        "ValidateVolumeCapabilities",
        c.validate_volume_capabilities(req).await,
    )?;
    match answer.confirmed {
        Some(confirmed) if confirmed.volume_capabilities.is_empty() => {
            fail("confirmed, but with no volume capabilities (the spec requires them)")
        }
        Some(_) => Ok(()),
        None => fail(format!(
            "a single-node-writer {} mount was not confirmed: {}",
            ctx.config.fs_type, answer.message
        )),
    }
}

async fn validate_unknown(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::CreateDeleteVolume)?;
    let volume_id = ctx.gone_volume_id().await?;
    let req = ValidateVolumeCapabilitiesRequest {
        volume_id,
        volume_capabilities: vec![ctx.mount_cap()],
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "ValidateVolumeCapabilities of a deleted volume",
        c.validate_volume_capabilities(req).await,
        Code::NotFound,
    )
}

async fn expand_missing(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::ExpandVolume)?;
    let range = Some(CapacityRange {
        required_bytes: 2 * ctx.config.volume_size as i64,
        limit_bytes: 0,
    });
    let req = ControllerExpandVolumeRequest {
        capacity_range: range,
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "ControllerExpandVolume without an id",
        c.controller_expand_volume(req).await,
        Code::InvalidArgument,
    )?;
    let volume = ctx.create_default("expand-norange").await?;
    let req = ControllerExpandVolumeRequest {
        volume_id: volume.volume_id,
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "ControllerExpandVolume without a capacity range",
        c.controller_expand_volume(req).await,
        Code::InvalidArgument,
    )?;
    let req = ControllerExpandVolumeRequest {
        volume_id: ctx.gone_volume_id().await?,
        capacity_range: range,
        secrets: ctx.config.secrets.clone(),
        ..Default::default()
    };
    expect_code(
        "ControllerExpandVolume of a deleted volume",
        c.controller_expand_volume(req).await,
        Code::NotFound,
    )
}

async fn expand(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::ExpandVolume)?;
    let volume = ctx.create_default("expand").await?;
    let required = 2 * ctx.config.volume_size;
    for round in ["first", "second (idempotent)"] {
        let req = ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: required as i64,
                limit_bytes: 0,
            }),
            secrets: ctx.config.secrets.clone(),
            ..Default::default()
        };
        let answer = expect_ok(
            &format!("the {round} ControllerExpandVolume"),
            c.controller_expand_volume(req).await,
        )?;
        if (answer.capacity_bytes as u64) < required {
            return fail(format!(
                "{round}: capacity_bytes {} < required {required}",
                answer.capacity_bytes
            ));
        }
    }
    Ok(())
}

async fn get_capacity(ctx: &mut Ctx) -> CheckResult {
    let mut c = ctx.need_ctrl(CtrlCap::GetCapacity)?;
    let req = GetCapacityRequest {
        volume_capabilities: vec![ctx.mount_cap()],
        parameters: ctx.config.parameters.clone(),
        ..Default::default()
    };
    let answer = expect_ok("GetCapacity", c.get_capacity(req).await)?;
    if answer.available_capacity < 0 {
        return fail(format!(
            "available_capacity {} < 0",
            answer.available_capacity
        ));
    }
    Ok(())
}
