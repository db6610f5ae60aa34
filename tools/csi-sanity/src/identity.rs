//! Identity service checks.

use virtiod_csi::proto::{
    plugin_capability, GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest,
};

use crate::ctx::{expect_ok, Ctx};
use crate::{fail, CheckResult, Report};

pub(crate) async fn run(ctx: &mut Ctx, report: &mut Report) {
    report.record(
        "Identity/GetPluginInfo: name and vendor_version",
        plugin_info(ctx).await,
    );
    report.record(
        "Identity/GetPluginCapabilities: known capabilities only",
        capabilities(ctx).await,
    );
    report.record(
        "Identity/Probe: succeeds, ready unset or true",
        probe(ctx).await,
    );
}

/// The name is 1..=63 characters, domain-like (lowercase letters, digits, `-`, `.`, starting
/// and ending with a letter or digit); the vendor version is not empty.
async fn plugin_info(ctx: &mut Ctx) -> CheckResult {
    let info = expect_ok(
        "GetPluginInfo",
        ctx.identity.get_plugin_info(GetPluginInfoRequest {}).await,
    )?;
    let name = &info.name;
    if name.is_empty() || name.len() > 63 {
        return fail(format!("name {name:?}: must be 1 to 63 characters"));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !name.chars().all(allowed) || !edge(name.chars().next()) || !edge(name.chars().last()) {
        return fail(format!(
            "name {name:?}: not a domain name (lowercase alphanumerics, '-', '.')"
        ));
    }
    if info.vendor_version.is_empty() {
        return fail("vendor_version is empty");
    }
    Ok(())
}

async fn capabilities(ctx: &mut Ctx) -> CheckResult {
    let caps = expect_ok(
        "GetPluginCapabilities",
        ctx.identity
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await,
    )?;
    for cap in caps.capabilities {
        match cap.r#type {
            Some(plugin_capability::Type::Service(s)) => {
                match plugin_capability::service::Type::try_from(s.r#type) {
                    Ok(plugin_capability::service::Type::Unknown) | Err(_) => {
                        return fail(format!("unknown service capability {}", s.r#type))
                    }
                    Ok(_) => {}
                }
            }
            Some(plugin_capability::Type::VolumeExpansion(e)) => {
                match plugin_capability::volume_expansion::Type::try_from(e.r#type) {
                    Ok(plugin_capability::volume_expansion::Type::Unknown) | Err(_) => {
                        return fail(format!("unknown volume expansion type {}", e.r#type))
                    }
                    Ok(_) => {}
                }
            }
            None => return fail("a capability without a type"),
        }
    }
    Ok(())
}

async fn probe(ctx: &mut Ctx) -> CheckResult {
    let probe = expect_ok("Probe", ctx.identity.probe(ProbeRequest {}).await)?;
    if probe.ready == Some(false) {
        return fail("Probe: ready = false (the plugin is not ready)");
    }
    Ok(())
}
