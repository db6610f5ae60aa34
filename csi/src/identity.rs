//! The CSI Identity service: the plugin's name and version, its capabilities, and readiness.

use tonic::{Request, Response, Status};

use crate::daemon::Daemon;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service, volume_expansion};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The driver name Kubernetes knows the plugin by (`CSIDriver` object, StorageClass
/// `provisioner`).
pub const DRIVER_NAME: &str = "csi.virtiod.io";

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    daemon: Option<Daemon>,
}

impl IdentityService {
    /// Ready when `daemon` (if any: a controller-only plugin has none) answers `list`.
    pub fn new(daemon: Option<Daemon>) -> Self {
        Self { daemon }
    }
}

fn service(kind: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let online = PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                online,
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match &self.daemon {
            None => true,
            Some(daemon) => match daemon.list().await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "probe: the daemon does not answer");
                    false
                }
            },
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
