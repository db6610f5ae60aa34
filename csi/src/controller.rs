//! The CSI Controller service: creating, growing and deleting volumes of a [`VolumeSource`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::capability;
use crate::locks::VolumeLocks;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::validate_volume_capabilities_response::Confirmed;
use crate::proto::volume_content_source::Type as ContentType;
use crate::proto::*;
use crate::snapshot::SnapshotId;
use crate::source::{self, SourceContext, Sources, VolumeSource};
use crate::status;
use crate::volume::{self, VolumeId};

/// The topology key naming the node a node-local volume lives on.
pub const TOPOLOGY_NODE_KEY: &str = "topology.virtiod.io/node";

/// The volume context key (value `true`) of a volume made from a snapshot: NodeStageVolume
/// grows the snapshot's filesystem to the volume's size (the CO never asks for it, the volume
/// having that size from the start).
pub const GROW_FS_CONTEXT: &str = "virtiod.io/grow-fs";

/// The Controller service of one node's plugin.
#[derive(Debug, Clone)]
pub struct ControllerService {
    node_id: String,
    sources: Sources,
    locks: VolumeLocks,
    /// Where the node service keeps its state: a staged volume is not deleted.
    state_dir: PathBuf,
}

impl ControllerService {
    /// Volumes of `sources`; node-local ones are created on `node_id`.
    pub fn new(node_id: String, sources: Sources, state_dir: PathBuf) -> Self {
        Self {
            node_id,
            sources,
            locks: VolumeLocks::default(),
            state_dir,
        }
    }

    fn topology(&self, source: &dyn VolumeSource) -> Vec<Topology> {
        if !source.node_local() {
            return Vec::new();
        }
        vec![Topology {
            segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), self.node_id.clone())]),
        }]
    }

    /// A volume id and its source (any node's, for a node-local source).
    fn resolve(&self, id: &str) -> Result<(VolumeId, Arc<dyn VolumeSource>), Status> {
        status::required(id, "volume_id")?;
        let parsed = VolumeId::parse(id).map_err(status::id)?;
        let Some(source) = self.sources.get(&parsed.source) else {
            return Err(Status::not_found(format!(
                "volume {id} is of source {}, which this plugin does not have (it has {})",
                parsed.source,
                self.sources.kinds().join(", ")
            )));
        };
        Ok((parsed, source.clone()))
    }

    /// A volume id this plugin reaches (a node-local volume of another node is not reachable
    /// from here: NOT_FOUND).
    fn ours(&self, id: &str) -> Result<(VolumeId, Arc<dyn VolumeSource>), Status> {
        let (parsed, source) = self.resolve(id)?;
        if source.node_local() && parsed.location != self.node_id {
            return Err(Status::not_found(format!(
                "volume {id} lives on node {}, not {}: ask that node's plugin",
                parsed.location, self.node_id
            )));
        }
        Ok((parsed, source))
    }

    /// A snapshot id this plugin reaches, and its source: NOT_FOUND otherwise (another
    /// node's snapshot of a node-local source too).
    fn snapshot(&self, id: &str) -> Result<(SnapshotId, Arc<dyn VolumeSource>), Status> {
        status::required(id, "snapshot_id")?;
        let parsed = SnapshotId::parse(id).map_err(status::id)?;
        let (_, source) = self
            .ours(&parsed.volume.to_string())
            .map_err(|e| Status::not_found(format!("snapshot {id}: {}", e.message())))?;
        Ok((parsed, source))
    }

    /// Whether volume `id` is staged on this node.
    fn staged(&self, id: &VolumeId) -> bool {
        self.state_dir
            .join("volumes")
            .join(id.state_file())
            .exists()
    }

    /// Whether the requirements let a volume of `source` live on this node.
    fn reachable(&self, source: &dyn VolumeSource, req: Option<&TopologyRequirement>) -> bool {
        let Some(req) = req.filter(|_| source.node_local()) else {
            return true;
        };
        let here = |t: &Topology| {
            t.segments
                .get(TOPOLOGY_NODE_KEY)
                .is_none_or(|n| *n == self.node_id)
        };
        if !req.requisite.is_empty() {
            return req.requisite.iter().any(here);
        }
        req.preferred.is_empty() || req.preferred.iter().any(here)
    }
}

/// CreateVolume of `id` from snapshot `from`: `bytes` (the size asked for) or the snapshot's
/// size, whichever is larger; OUT_OF_RANGE when the snapshot is larger than `limit`.
async fn create_from(
    source: &Arc<dyn VolumeSource>,
    id: VolumeId,
    from: SnapshotId,
    bytes: Option<u64>,
    limit: i64,
    ctx: SourceContext,
) -> Result<source::Volume, Status> {
    let (snap_id, snap_ctx) = (from.clone(), ctx.clone());
    let Some(snapshot) = source::run(source, move |s| s.get_snapshot(&snap_id, &snap_ctx)).await?
    else {
        return Err(Status::not_found(format!("snapshot {from} does not exist")));
    };
    let bytes = bytes.map_or(snapshot.size, |b| b.max(snapshot.size));
    if limit > 0 && bytes > limit as u64 {
        return Err(Status::out_of_range(format!(
            "snapshot {from} has {} bytes, more than limit_bytes {limit}: a volume from it is at least that large",
            snapshot.size
        )));
    }
    source::run(source, move |s| {
        s.create_from_snapshot(&id, &from, bytes, &ctx)
    })
    .await
}

/// The lock of snapshot `name` (apart from the volumes': a name never has a space).
fn snapshot_key(name: &str) -> String {
    format!("snapshot {name}")
}

fn capacity(range: Option<&CapacityRange>) -> (i64, i64) {
    range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.name, "name")?;
        volume::check_name(&req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        capability::check_all(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        let from = match req
            .volume_content_source
            .as_ref()
            .map(|c| c.r#type.as_ref())
        {
            None => None,
            Some(Some(ContentType::Snapshot(s))) => Some(self.snapshot(&s.snapshot_id)?.0),
            Some(_) => {
                return Err(Status::invalid_argument(
                    "volume_content_source: only a snapshot (volume cloning is not supported)",
                ))
            }
        };
        let (required, limit) = capacity(req.capacity_range.as_ref());
        let size = volume::size_for(required, limit).map_err(|e| match e {
            volume::RangeError::Negative => Status::invalid_argument(e.to_string()),
            volume::RangeError::Unsatisfiable { .. } => Status::out_of_range(e.to_string()),
        })?;
        let source = self
            .sources
            .for_params(&req.parameters)
            .map_err(status::source)?
            .clone();
        if !self.reachable(source.as_ref(), req.accessibility_requirements.as_ref()) {
            return Err(Status::resource_exhausted(format!(
                "the accessibility requirements exclude node {}, where this plugin creates \
                 volumes",
                self.node_id
            )));
        }
        let ctx = SourceContext::new(req.parameters, req.secrets);
        let location = if source.node_local() {
            self.node_id.clone()
        } else {
            source.location(&ctx).map_err(status::source)?
        };
        let id = VolumeId {
            source: source.kind().to_string(),
            location,
            name: req.name.clone(),
        };
        if let Some(from) = &from {
            if from.volume.source != id.source {
                return Err(Status::invalid_argument(format!(
                    "snapshot {from} is of source {}, the StorageClass's is {}: a volume from a snapshot is made in the snapshot's source",
                    from.volume.source, id.source
                )));
            }
        }
        let _busy = self.locks.lock(&req.name)?;
        let (found_id, found_ctx) = (id.clone(), ctx.clone());
        let found = source::run(&source, move |s| s.get(&found_id, &found_ctx)).await?;
        let volume = match (found, from.clone()) {
            (Some(existing), _) if volume::fits(existing.capacity, required, limit) => existing,
            (Some(existing), _) => {
                return Err(Status::already_exists(format!(
                    "volume {} already exists with {} bytes, outside the range asked for",
                    req.name, existing.capacity
                )))
            }
            (None, None) => {
                let new_id = id.clone();
                source::run(&source, move |s| s.create(&new_id, size, &ctx)).await?
            }
            (None, Some(from)) => {
                let bytes = (required > 0).then_some(size);
                create_from(&source, id.clone(), from, bytes, limit, ctx).await?
            }
        };
        tracing::info!(volume = %id, bytes = volume.capacity, from = ?from.as_ref().map(|f| f.to_string()), "created volume");
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: volume.capacity as i64,
                volume_id: id.to_string(),
                volume_context: match from {
                    Some(_) => HashMap::from([(GROW_FS_CONTEXT.to_string(), "true".to_string())]),
                    None => HashMap::new(),
                },
                content_source: req.volume_content_source,
                accessible_topology: self.topology(source.as_ref()),
            }),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.volume_id, "volume_id")?;
        // An id that is not ours, or another node's, names nothing here: already deleted.
        let Ok((id, source)) = self.ours(&req.volume_id) else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        let _busy = self.locks.lock(&id.name)?;
        if self.staged(&id) {
            return Err(Status::failed_precondition(format!(
                "volume {id} is still staged on node {}: unstage it first",
                self.node_id
            )));
        }
        let ctx = SourceContext::secrets(req.secrets);
        let gone = id.clone();
        source::run(&source, move |s| s.delete(&gone, &ctx)).await?;
        tracing::info!(volume = %id, "deleted volume");
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerPublishVolume: not needed (node-local volumes)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerUnpublishVolume: not needed (node-local volumes)",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let (id, source) = self.ours(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let ctx = SourceContext::secrets(req.secrets.clone());
        let found = id.clone();
        if source::run(&source, move |s| s.get(&found, &ctx))
            .await?
            .is_none()
        {
            return Err(Status::not_found(format!("volume {id} does not exist")));
        }
        let answer = match capability::check_all(&req.volume_capabilities) {
            Ok(_) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            },
            Err(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
        };
        Ok(Response::new(answer))
    }

    async fn list_volumes(
        &self,
        _request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Err(Status::unimplemented("ListVolumes is not supported"))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let source = self
            .sources
            .for_params(&req.parameters)
            .map_err(status::source)?
            .clone();
        let ctx = SourceContext::new(req.parameters, HashMap::new());
        let available = source::run(&source, move |s| s.available(&ctx)).await?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available.unwrap_or(0).min(i64::MAX as u64) as i64,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::GetCapacity,
            rpc::Type::CreateDeleteSnapshot,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.name, "name")?;
        status::required(&req.source_volume_id, "source_volume_id")?;
        volume::check_name(&req.name).map_err(|e| {
            Status::invalid_argument(e.to_string().replacen("volume name", "snapshot name", 1))
        })?;
        if let Some(key) = req
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Status::invalid_argument(format!(
                "VolumeSnapshotClass parameter {key}: snapshots take no parameters"
            )));
        }
        let (volume, source) = self.ours(&req.source_volume_id)?;
        let id = SnapshotId {
            volume,
            name: req.name.clone(),
        };
        let _busy = self.locks.lock(&snapshot_key(&req.name))?;
        let _volume_busy = self.locks.lock(&id.volume.name)?;
        if source.node_local() && self.staged(&id.volume) {
            tracing::warn!(volume = %id.volume, "snapshot of a volume in use: the image is copied while the pod writes; freeze the filesystem first for a consistent copy");
        }
        let ctx = SourceContext::secrets(req.secrets);
        let taken = id.clone();
        let snapshot = source::run(&source, move |s| s.create_snapshot(&taken, &ctx)).await?;
        tracing::info!(snapshot = %id, bytes = snapshot.size, "created snapshot");
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(Snapshot {
                size_bytes: snapshot.size.min(i64::MAX as u64) as i64,
                snapshot_id: id.to_string(),
                source_volume_id: id.volume.to_string(),
                creation_time: Some(prost_types::Timestamp::from(snapshot.created)),
                ready_to_use: true,
            }),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        status::required(&req.snapshot_id, "snapshot_id")?;
        // An id that is not ours, or another node's, names nothing here: already deleted.
        let Ok((id, source)) = self.snapshot(&req.snapshot_id) else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        let _busy = self.locks.lock(&snapshot_key(&id.name))?;
        let ctx = SourceContext::secrets(req.secrets);
        let gone = id.clone();
        source::run(&source, move |s| s.delete_snapshot(&gone, &ctx)).await?;
        tracing::info!(snapshot = %id, "deleted snapshot");
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented(
            "ListSnapshots is not supported (CreateSnapshot and DeleteSnapshot are)",
        ))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let (id, source) = self.resolve(&req.volume_id)?;
        let Some(range) = req.capacity_range else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        if let Some(cap) = req.volume_capability.as_ref() {
            capability::check(cap).map_err(Status::invalid_argument)?;
        }
        let size =
            volume::size_for(range.required_bytes, range.limit_bytes).map_err(|e| match e {
                volume::RangeError::Negative => Status::invalid_argument(e.to_string()),
                volume::RangeError::Unsatisfiable { .. } => Status::out_of_range(e.to_string()),
            })?;
        if source.node_local() {
            // The image is a file on its node, which the controller may not see (the central
            // csi-resizer's plugin): the node grows it in NodeExpandVolume (the daemon's
            // `resize` grows the file first) to the bytes asked for, in whole 4 KiB blocks.
            // A controller on the volume's node that holds the volumes' directory still
            // answers NOT_FOUND for a volume that is not there.
            if id.location == self.node_id {
                let sized = id.clone();
                source::run(&source, move |s| s.node_size(&sized)).await?;
            }
            let bytes = match range.required_bytes {
                1.. => (range.required_bytes as u64).div_ceil(4096) * 4096,
                _ => size,
            };
            tracing::info!(volume = %id, bytes, "expansion left to the volume's node");
            return Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: bytes as i64,
                node_expansion_required: true,
            }));
        }
        let _busy = self.locks.lock(&id.name)?;
        let ctx = SourceContext::secrets(req.secrets);
        let grown = id.clone();
        let capacity = source::run(&source, move |s| s.expand(&grown, size, &ctx)).await?;
        if range.limit_bytes > 0 && capacity > range.limit_bytes as u64 {
            return Err(Status::out_of_range(format!(
                "volume {id} has {capacity} bytes, more than limit_bytes {}: volumes never shrink",
                range.limit_bytes
            )));
        }
        tracing::info!(volume = %id, bytes = capacity, "expanded volume");
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            // The daemon serving a staged volume learns the new size in NodeExpandVolume
            // (`resize`), block volumes too: without it the driver keeps the old size.
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerGetVolume is not supported",
        ))
    }
}
