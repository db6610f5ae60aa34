//! The state the checks share: the clients, the plugin's capabilities, the volumes and paths
//! created (cleaned up at the end), and small helpers.

use std::path::PathBuf;

use tonic::transport::Channel;
use tonic::Code;
use virtiod_csi::proto::controller_client::ControllerClient;
use virtiod_csi::proto::identity_client::IdentityClient;
use virtiod_csi::proto::node_client::NodeClient;
use virtiod_csi::proto::{
    controller_service_capability, node_service_capability, plugin_capability, volume_capability,
    CapacityRange, ControllerGetCapabilitiesRequest, CreateVolumeRequest, DeleteSnapshotRequest,
    DeleteVolumeRequest, GetPluginCapabilitiesRequest, NodeGetCapabilitiesRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, Volume, VolumeCapability,
};

use crate::{fail, skip, Config, Outcome, SanityError};

/// Controller RPC capabilities.
pub(crate) type CtrlCap = controller_service_capability::rpc::Type;
/// Node RPC capabilities.
pub(crate) type NodeCap = node_service_capability::rpc::Type;

/// What the checks share.
pub struct Ctx {
    pub(crate) config: Config,
    pub(crate) identity: IdentityClient<Channel>,
    /// `None` when the plugin does not announce CONTROLLER_SERVICE.
    pub(crate) controller: Option<ControllerClient<Channel>>,
    pub(crate) node: NodeClient<Channel>,
    pub(crate) plugin_caps: Vec<plugin_capability::service::Type>,
    pub(crate) ctrl_caps: Vec<CtrlCap>,
    pub(crate) node_caps: Vec<NodeCap>,
    /// Volumes created and not yet deleted.
    created: Vec<String>,
    /// Snapshots created and not yet deleted.
    snapshots: Vec<String>,
    /// Staged `(volume, staging path)` and published `(volume, target path)` to undo.
    staged: Vec<(String, String)>,
    published: Vec<(String, String)>,
    serial: u32,
}

async fn connect(path: &std::path::Path) -> Result<Channel, SanityError> {
    virtiod_csi::endpoint::connect(path)
        .await
        .map_err(|e| SanityError::Connect(e.to_string()))
}

impl Ctx {
    /// Connect to the plugin (and its separate controller, if any) and read its capabilities.
    pub async fn connect(config: Config) -> Result<Self, SanityError> {
        let channel = connect(&config.socket).await?;
        let mut identity = IdentityClient::new(channel.clone());
        let mut node = NodeClient::new(channel.clone());
        let plugin_caps = identity
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .map(|r| r.into_inner().capabilities)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(plugin_capability::Type::Service(s)) => {
                    plugin_capability::service::Type::try_from(s.r#type).ok()
                }
                _ => None,
            })
            .collect::<Vec<_>>();
        let controller =
            if plugin_caps.contains(&plugin_capability::service::Type::ControllerService) {
                let channel = match &config.controller_socket {
                    Some(path) => connect(path).await?,
                    None => channel,
                };
                Some(ControllerClient::new(channel))
            } else {
                None
            };
        let mut ctrl_caps = Vec::new();
        if let Some(mut c) = controller.clone() {
            if let Ok(r) = c
                .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
                .await
            {
                for cap in r.into_inner().capabilities {
                    if let Some(controller_service_capability::Type::Rpc(rpc)) = cap.r#type {
                        ctrl_caps.extend(CtrlCap::try_from(rpc.r#type).ok());
                    }
                }
            }
        }
        let mut node_caps = Vec::new();
        if let Ok(r) = node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
        {
            for cap in r.into_inner().capabilities {
                if let Some(node_service_capability::Type::Rpc(rpc)) = cap.r#type {
                    node_caps.extend(NodeCap::try_from(rpc.r#type).ok());
                }
            }
        }
        Ok(Self {
            config,
            identity,
            controller,
            node,
            plugin_caps,
            ctrl_caps,
            node_caps,
            created: Vec::new(),
            snapshots: Vec::new(),
            staged: Vec::new(),
            published: Vec::new(),
            serial: 0,
        })
    }

    /// The controller client, or a skip when the plugin has no controller service.
    pub(crate) fn controller(&self) -> Result<ControllerClient<Channel>, Outcome> {
        match &self.controller {
            Some(c) => Ok(c.clone()),
            None => skip("the plugin does not announce CONTROLLER_SERVICE"),
        }
    }

    /// A skip unless the controller announces `cap`.
    pub(crate) fn need_ctrl(&self, cap: CtrlCap) -> Result<ControllerClient<Channel>, Outcome> {
        let c = self.controller()?;
        if !self.ctrl_caps.contains(&cap) {
            return skip(format!(
                "the controller does not announce {}",
                cap.as_str_name()
            ));
        }
        Ok(c)
    }

    /// A skip unless the node announces `cap`.
    pub(crate) fn need_node(&self, cap: NodeCap) -> Result<(), Outcome> {
        if !self.node_caps.contains(&cap) {
            return skip(format!("the node does not announce {}", cap.as_str_name()));
        }
        Ok(())
    }

    /// A skip when node I/O checks are off.
    pub(crate) fn need_node_io(&self) -> Result<(), Outcome> {
        if self.config.skip_node_io {
            return skip("--skip-node-io: staging and publishing are not exercised");
        }
        Ok(())
    }

    /// A name no other check uses: `sanity-WHAT-PID-N`.
    pub(crate) fn unique(&mut self, what: &str) -> String {
        self.serial += 1;
        format!("sanity-{what}-{}-{}", std::process::id(), self.serial)
    }

    /// A fresh directory under the work directory (a staging or target path's parent).
    pub(crate) fn path(&mut self, what: &str) -> PathBuf {
        let name = self.unique(what);
        self.config.work_dir.join(name)
    }

    /// A single-node-writer mount capability with the configured filesystem.
    pub(crate) fn mount_cap(&self) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: self.config.fs_type.clone(),
                    ..Default::default()
                },
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }
    }

    /// A CreateVolume request for `name` of `required` bytes (and `limit`, 0: none).
    pub(crate) fn create_req(&self, name: &str, required: u64, limit: u64) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: required as i64,
                limit_bytes: limit as i64,
            }),
            volume_capabilities: vec![self.mount_cap()],
            parameters: self.config.parameters.clone(),
            secrets: self.config.secrets.clone(),
            ..Default::default()
        }
    }

    /// Create a volume (registered for cleanup); any error fails the check.
    pub(crate) async fn create(&mut self, req: CreateVolumeRequest) -> Result<Volume, Outcome> {
        let mut c = self.controller()?;
        let name = req.name.clone();
        let volume = match c.create_volume(req).await {
            Ok(r) => r.into_inner().volume,
            Err(s) => return fail(format!("CreateVolume {name}: {}", show(&s))),
        };
        let Some(volume) = volume else {
            return fail(format!("CreateVolume {name}: the response has no volume"));
        };
        if volume.volume_id.is_empty() {
            return fail(format!("CreateVolume {name}: empty volume_id"));
        }
        self.track(&volume.volume_id);
        Ok(volume)
    }

    /// Create a volume of the configured size (registered for cleanup).
    pub(crate) async fn create_default(&mut self, what: &str) -> Result<Volume, Outcome> {
        let name = self.unique(what);
        let req = self.create_req(&name, self.config.volume_size, 0);
        self.create(req).await
    }

    /// Delete `volume_id` at cleanup (a volume made by a call that should have failed).
    pub(crate) fn track(&mut self, volume_id: &str) {
        if !volume_id.is_empty() && !self.created.iter().any(|v| v == volume_id) {
            self.created.push(volume_id.to_string());
        }
    }

    /// Delete snapshot `snapshot_id` at cleanup.
    pub(crate) fn track_snapshot(&mut self, snapshot_id: &str) {
        if !snapshot_id.is_empty() && !self.snapshots.iter().any(|s| s == snapshot_id) {
            self.snapshots.push(snapshot_id.to_string());
        }
    }

    /// Forget a volume the check deleted itself.
    pub(crate) fn deleted(&mut self, volume_id: &str) {
        self.created.retain(|v| v != volume_id);
    }

    /// Remember a staged or published volume, to undo at cleanup.
    pub(crate) fn staged(&mut self, volume_id: &str, path: &str) {
        self.staged.push((volume_id.into(), path.into()));
    }

    /// See [`Ctx::staged`].
    pub(crate) fn published(&mut self, volume_id: &str, path: &str) {
        self.published.push((volume_id.into(), path.into()));
    }

    /// Forget an unstaged or unpublished path.
    pub(crate) fn undone(&mut self, path: &str) {
        self.staged.retain(|(_, p)| p != path);
        self.published.retain(|(_, p)| p != path);
    }

    /// A volume id the plugin made and no longer has: created, then deleted.
    pub(crate) async fn gone_volume_id(&mut self) -> Result<String, Outcome> {
        let volume = self.create_default("gone").await?;
        let mut c = self.controller()?;
        if let Err(s) = c
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume.volume_id.clone(),
                secrets: self.config.secrets.clone(),
            })
            .await
        {
            return fail(format!("DeleteVolume {}: {}", volume.volume_id, show(&s)));
        }
        self.deleted(&volume.volume_id);
        Ok(volume.volume_id)
    }

    /// Undo what the checks left: unpublish, unstage, delete (errors ignored: best effort).
    pub(crate) async fn cleanup(&mut self) {
        for (volume_id, target_path) in std::mem::take(&mut self.published) {
            let _ = self
                .node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id,
                    target_path,
                })
                .await;
        }
        for (volume_id, staging_target_path) in std::mem::take(&mut self.staged) {
            let _ = self
                .node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id,
                    staging_target_path,
                })
                .await;
        }
        if let Some(mut c) = self.controller.clone() {
            // Newest first, then the snapshots, then what was left: a volume made from a
            // snapshot may have to go before it, and a snapshot before its volume.
            let mut left = Vec::new();
            for volume_id in std::mem::take(&mut self.created).into_iter().rev() {
                let req = DeleteVolumeRequest {
                    volume_id: volume_id.clone(),
                    secrets: self.config.secrets.clone(),
                };
                if c.delete_volume(req).await.is_err() {
                    left.push(volume_id);
                }
            }
            for snapshot_id in std::mem::take(&mut self.snapshots) {
                let _ = c
                    .delete_snapshot(DeleteSnapshotRequest {
                        snapshot_id,
                        secrets: self.config.secrets.clone(),
                    })
                    .await;
            }
            for volume_id in left {
                let _ = c
                    .delete_volume(DeleteVolumeRequest {
                        volume_id,
                        secrets: self.config.secrets.clone(),
                    })
                    .await;
            }
        }
    }
}

/// A status as `CODE: message`.
pub(crate) fn show(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The call must have failed with `code`.
pub(crate) fn expect_code<T>(
    what: &str,
    result: Result<T, tonic::Status>,
    code: Code,
) -> Result<(), Outcome> {
    match result {
        Ok(_) => fail(format!("{what}: succeeded, expected {code:?}")),
        Err(s) if s.code() == code => Ok(()),
        Err(s) => fail(format!("{what}: expected {code:?}, got {}", show(&s))),
    }
}

/// The call must have succeeded.
pub(crate) fn expect_ok<T>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, Outcome> {
    match result {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => fail(format!("{what}: {}", show(&s))),
    }
}
