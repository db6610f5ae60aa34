//! The CSI Node service: a staged volume is a VDUSE device of the node's daemon (`ctl add`),
//! `/dev/vdX` through `virtio_vdpa`, formatted if empty and mounted at the staging path
//! (filesystem volumes); publishing bind-mounts the staging mount (or the device node, for
//! block volumes) at the pod's target.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::capability::{self, Access};
use crate::controller::{GROW_FS_CONTEXT, TOPOLOGY_NODE_KEY};
use crate::daemon::{Daemon, DaemonError};
use crate::locks::VolumeLocks;
use crate::mounts::{self, NodeError};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, rpc};
use crate::proto::*;
use crate::source::{self, SourceContext, Sources, VolumeSource};
use crate::state::{StateDir, VolumeState};
use crate::status;
use crate::volume::VolumeId;

/// How long a new device node may take to appear.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// The Node service of one node's plugin.
#[derive(Debug, Clone)]
pub struct NodeService {
    node_id: String,
    max_volumes: i64,
    daemon: Daemon,
    sources: Sources,
    states: StateDir,
    locks: VolumeLocks,
}

fn internal(e: NodeError) -> Status {
    Status::internal(e.to_string())
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Status + '_ {
    move |e| Status::internal(format!("{what}: {e}"))
}

/// Run blocking node work (mounts, mkfs) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("node task failed: {e}")))?
        .map_err(internal)
}

impl NodeService {
    /// The node `node_id`, its daemon, the sources of its volumes, its state directory.
    pub fn new(
        node_id: String,
        max_volumes: i64,
        daemon: Daemon,
        sources: Sources,
        state_dir: &Path,
    ) -> Self {
        Self {
            node_id,
            max_volumes,
            daemon,
            sources,
            states: StateDir::new(state_dir),
            locks: VolumeLocks::default(),
        }
    }

    fn ours(&self, id: &str) -> Result<VolumeId, Status> {
        status::required(id, "volume_id")?;
        let parsed = VolumeId::parse(id).map_err(status::id)?;
        let reachable = self
            .sources
            .get(&parsed.source)
            .is_some_and(|s| !s.node_local() || parsed.location == self.node_id);
        if !reachable {
            return Err(Status::not_found(format!(
                "volume {id} is not reachable from node {}",
                self.node_id
            )));
        }
        Ok(parsed)
    }

    /// The source of a volume [`Self::ours`] accepted.
    fn source_of(&self, id: &VolumeId) -> Result<Arc<dyn VolumeSource>, Status> {
        self.sources
            .get(&id.source)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("volume {id}: no source {}", id.source)))
    }

    fn load(&self, id: &VolumeId) -> Result<Option<VolumeState>, Status> {
        self.states
            .load(id)
            .map_err(io("cannot read the volume's state"))
    }

    fn save(&self, id: &VolumeId, state: &VolumeState) -> Result<(), Status> {
        self.states
            .save(id, state)
            .map_err(io("cannot record the volume's state"))
    }

    /// The device serving `state`, started if the daemon does not serve it (a first stage, or
    /// a daemon that lost it); answers its block device node.
    async fn ensure_device(&self, state: &VolumeState) -> Result<PathBuf, Status> {
        let listed = self.daemon.list().await.map_err(status::daemon)?;
        let existing = listed.iter().find(|d| d.name == state.device);
        let endpoint = match existing {
            Some(d) if d.up && !d.endpoint.is_empty() => d.endpoint.clone(),
            other => {
                if other.is_some() {
                    // Listed as failed: forget it before starting it again.
                    let _ = self.daemon.remove(&state.device).await;
                }
                let spec = device_spec(state);
                self.daemon.add(&spec).await.map_err(status::daemon)?
            }
        };
        let node = PathBuf::from(endpoint);
        let wait = node.clone();
        blocking(move || mounts::wait_block_device(&wait, DEVICE_TIMEOUT)).await?;
        Ok(node)
    }

    /// Re-discover the volumes staged before a restart: each record's device is looked up in
    /// the daemon (`list`) and started again if the daemon does not serve it.
    pub async fn rediscover(&self) -> Result<usize, DaemonError> {
        let listed = self.daemon.list().await?;
        let states = self.states.all();
        for state in &states {
            match listed.iter().find(|d| d.name == state.device) {
                Some(d) if d.up => {
                    tracing::info!(volume = %state.volume_id, device = %d.name, node = %d.endpoint, "re-discovered a staged volume")
                }
                _ => {
                    tracing::warn!(volume = %state.volume_id, device = %state.device, "the daemon does not serve a staged volume: starting its device again");
                    if let Err(e) = self.ensure_device(state).await {
                        tracing::error!(volume = %state.volume_id, "cannot restart its device: {}", e.message());
                    }
                }
            }
        }
        Ok(states.len())
    }
}

/// The daemon's device for a volume (devices.toml syntax, one device).
fn device_spec(state: &VolumeState) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "name = {}\nimage = {}\nvduse = {}\nattach = \"virtio\"\nread-only = {}\n",
        quote(&state.device),
        quote(&state.image),
        quote(&state.device),
        state.read_only
    )
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        status::required(&req.staging_target_path, "staging_target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let checked = capability::check(cap).map_err(Status::invalid_argument)?;
        let id = self.ours(&req.volume_id)?;
        let source = self.source_of(&id)?;
        let _busy = self.locks.lock(&req.volume_id)?;
        // A volume made from a smaller snapshot holds the snapshot's filesystem: grown below.
        let grow = req
            .volume_context
            .get(GROW_FS_CONTEXT)
            .is_some_and(|v| v == "true");
        // The source prepares what the daemon needs (rbd: the keyring of the stage secrets).
        let ctx = SourceContext::new(req.volume_context, req.secrets);
        let staged_id = id.clone();
        let volume = source::run(&source, move |s| s.stage(&staged_id, &ctx)).await?;
        let staging = PathBuf::from(&req.staging_target_path);
        let (block, fs_type, options) = match &checked.access {
            Access::Block => (true, None, Vec::new()),
            Access::Mount { fs_type, flags } => (false, Some(fs_type.clone()), flags.clone()),
        };
        let mut state = match self.load(&id)? {
            Some(old) if old.staging_path != staging || old.block != block || old.fs_type != fs_type => {
                return Err(Status::already_exists(format!(
                    "volume {id} is already staged at {} as another kind of volume: unstage it first",
                    old.staging_path.display()
                )))
            }
            Some(old) => old,
            None => VolumeState {
                volume_id: id.to_string(),
                device: id.device_name(),
                image: volume.image.clone(),
                staging_path: staging.clone(),
                block,
                fs_type: fs_type.clone(),
                read_only: checked.read_only,
                dev_node: None,
                published: BTreeMap::new(),
            },
        };
        // Recorded first: whatever happens next, unstage (or a restarted plugin) finds it.
        self.save(&id, &state)?;
        let node = self.ensure_device(&state).await?;
        state.dev_node = Some(node.clone());
        self.save(&id, &state)?;
        if let Some(fs_type) = fs_type {
            let read_only = state.read_only;
            let mut grow = grow;
            blocking(move || {
                if mounts::is_mounted(&staging)? {
                    return Ok(());
                }
                match mounts::probe(&node)? {
                    None if read_only => return Err(NodeError {
                        what: format!("staging {} read-only", node.display()),
                        detail:
                            "the volume has no filesystem yet and a read-only one cannot be made"
                                .into(),
                    }),
                    None => {
                        mounts::mkfs(&node, &fs_type)?;
                        grow = false;
                    }
                    Some(found) if found == fs_type => {}
                    Some(found) => {
                        return Err(NodeError {
                            what: format!("staging {}", node.display()),
                            detail: format!(
                            "it holds {found}, not the {fs_type} asked for: nothing was changed"
                        ),
                        })
                    }
                }
                std::fs::create_dir_all(&staging).map_err(|e| NodeError {
                    what: format!("cannot create {}", staging.display()),
                    detail: e.to_string(),
                })?;
                mounts::mount_fs(&node, &staging, &fs_type, read_only, &options)?;
                if grow && !read_only {
                    mounts::grow_fs(&node, &staging, &fs_type)?;
                }
                Ok(())
            })
            .await?;
        }
        tracing::info!(volume = %id, staging = %req.staging_target_path, "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        status::required(&req.staging_target_path, "staging_target_path")?;
        let id = self.ours(&req.volume_id)?;
        let _busy = self.locks.lock(&req.volume_id)?;
        let staging = PathBuf::from(&req.staging_target_path);
        let unmount = staging.clone();
        blocking(move || mounts::unmount_all(&unmount)).await?;
        let device = self
            .load(&id)?
            .map_or_else(|| id.device_name(), |s| s.device);
        match self.daemon.remove(&device).await {
            Ok(()) => {}
            Err(DaemonError::Refused { message, .. }) if message.contains("no device named") => {}
            Err(e) => return Err(status::daemon(e)),
        }
        let source = self.source_of(&id)?;
        let unstaged = id.clone();
        source::run(&source, move |s| s.unstage(&unstaged)).await?;
        self.states
            .remove(&id)
            .map_err(io("cannot delete the volume's state"))?;
        tracing::info!(volume = %id, "unstaged");
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        status::required(&req.target_path, "target_path")?;
        if req.staging_target_path.is_empty() {
            // The spec's error table: with STAGE_UNSTAGE_VOLUME announced, a publish that
            // names no staging path is one before NodeStageVolume.
            return Err(Status::failed_precondition(
                "staging_target_path is missing: this plugin stages volumes; call \
                 NodeStageVolume first and pass its staging path",
            ));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let checked = capability::check(cap).map_err(Status::invalid_argument)?;
        let id = self.ours(&req.volume_id)?;
        let _busy = self.locks.lock(&req.volume_id)?;
        let Some(mut state) = self.load(&id)? else {
            return Err(Status::failed_precondition(format!(
                "volume {id} is not staged on node {}: NodeStageVolume first",
                self.node_id
            )));
        };
        if (checked.access == Access::Block) != state.block {
            return Err(Status::invalid_argument(format!(
                "volume {id} was staged as a {} volume",
                if state.block { "block" } else { "filesystem" }
            )));
        }
        let read_only = req.readonly || checked.read_only;
        if let Some(&was) = state.published.get(Path::new(&req.target_path)) {
            if was != read_only {
                return Err(Status::already_exists(format!(
                    "volume {id} is already published at {} with readonly={was}",
                    req.target_path
                )));
            }
        }
        let target = PathBuf::from(&req.target_path);
        let source = if state.block {
            let node = match &state.dev_node {
                Some(node) => node.clone(),
                None => self.ensure_device(&state).await?,
            };
            node
        } else {
            state.staging_path.clone()
        };
        let block = state.block;
        let bind_target = target.clone();
        blocking(move || {
            if mounts::is_mounted(&bind_target)? {
                return Ok(());
            }
            let made = if block {
                let parent = bind_target.parent().unwrap_or(Path::new("/"));
                std::fs::create_dir_all(parent).and_then(|()| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&bind_target)
                        .map(drop)
                })
            } else {
                std::fs::create_dir_all(&bind_target)
            };
            made.map_err(|e| NodeError {
                what: format!("cannot create {}", bind_target.display()),
                detail: e.to_string(),
            })?;
            mounts::bind(&source, &bind_target, read_only)
        })
        .await?;
        state.published.insert(target, read_only);
        self.save(&id, &state)?;
        tracing::info!(volume = %id, target = %req.target_path, read_only, "published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        status::required(&req.target_path, "target_path")?;
        let id = self.ours(&req.volume_id)?;
        let _busy = self.locks.lock(&req.volume_id)?;
        let target = PathBuf::from(&req.target_path);
        let gone = target.clone();
        blocking(move || {
            mounts::unmount_all(&gone)?;
            mounts::remove_target(&gone)
        })
        .await?;
        if let Some(mut state) = self.load(&id)? {
            if state.published.remove(&target).is_some() {
                self.save(&id, &state)?;
            }
        }
        tracing::info!(volume = %id, target = %req.target_path, "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        status::required(&req.volume_path, "volume_path")?;
        let id = self.ours(&req.volume_id)?;
        let Some(state) = self.load(&id)? else {
            return Err(Status::not_found(format!("volume {id} is not staged here")));
        };
        let path = PathBuf::from(&req.volume_path);
        let meta = std::fs::metadata(&path)
            .map_err(|e| Status::not_found(format!("volume path {}: {e}", path.display())))?;
        let usage = if meta.is_dir() {
            let st = rustix::fs::statvfs(&path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
            let block = st.f_frsize;
            vec![
                VolumeUsage {
                    available: (st.f_bavail * block) as i64,
                    total: (st.f_blocks * block) as i64,
                    used: ((st.f_blocks - st.f_bfree) * block) as i64,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: st.f_favail as i64,
                    total: st.f_files as i64,
                    used: (st.f_files - st.f_ffree) as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            let node = state
                .dev_node
                .clone()
                .ok_or_else(|| Status::not_found(format!("volume {id} has no device")))?;
            let total = mounts::block_size(&node).map_err(internal)?;
            vec![VolumeUsage {
                available: 0,
                total: total as i64,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }]
        };
        let condition = match self.daemon.list().await {
            Ok(list) => match list.iter().find(|d| d.name == state.device) {
                Some(d) if d.up => VolumeCondition {
                    abnormal: false,
                    message: format!("served by virtiod device {}", d.name),
                },
                Some(d) => VolumeCondition {
                    abnormal: true,
                    message: format!(
                        "virtiod device {} is down: {}",
                        d.name,
                        d.error.as_deref().unwrap_or("unknown reason")
                    ),
                },
                None => VolumeCondition {
                    abnormal: true,
                    message: format!("virtiod does not serve device {}", state.device),
                },
            },
            Err(e) => VolumeCondition {
                abnormal: true,
                message: e.to_string(),
            },
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        status::required(&req.volume_path, "volume_path")?;
        let id = self.ours(&req.volume_id)?;
        let _busy = self.locks.lock(&req.volume_id)?;
        let Some(state) = self.load(&id)? else {
            return Err(Status::not_found(format!("volume {id} is not staged here")));
        };
        if !Path::new(&req.volume_path).exists() {
            return Err(Status::not_found(format!(
                "volume path {} does not exist",
                req.volume_path
            )));
        }
        // The size the source has (the file; the RBD image, grown centrally), or what the CO
        // asks for if more: the daemon's `resize` grows a file image first.
        let source = self.source_of(&id)?;
        let sized = id.clone();
        let current = source::run(&source, move |s| s.node_size(&sized)).await?;
        let required = req
            .capacity_range
            .as_ref()
            .map_or(0, |r| r.required_bytes.max(0) as u64);
        let size = current.unwrap_or(0).max(required.div_ceil(4096) * 4096);
        if size == 0 {
            return Err(Status::invalid_argument(format!(
                "volume {id}: capacity_range.required_bytes is required (the node cannot tell the size of a {} volume)",
                id.source
            )));
        }
        let node = self.ensure_device(&state).await?;
        self.daemon
            .resize(&state.device, size)
            .await
            .map_err(status::daemon)?;
        let (fs_type, staging) = (state.fs_type.clone(), state.staging_path.clone());
        blocking(move || {
            mounts::wait_block_size(&node, size, DEVICE_TIMEOUT)?;
            match fs_type {
                Some(fs) => mounts::grow_fs(&node, &staging, &fs),
                None => Ok(()),
            }
        })
        .await?;
        tracing::info!(volume = %id, bytes = size, "expanded on the node");
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), self.node_id.clone())]),
            }),
        }))
    }
}
