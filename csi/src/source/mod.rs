//! Where volumes live: one [`VolumeSource`] per kind of storage (`local` image files, `rbd`
//! images of a Ceph cluster), each creating, finding, growing and deleting volumes by id, and
//! telling the daemon which image serves one. [`Sources`] picks the source of a call: by the
//! StorageClass parameter `source` for CreateVolume, by the volume id for everything else.

pub mod local;
pub mod rbd;
pub mod sparse;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::snapshot::SnapshotId;
use crate::volume::VolumeId;

/// The StorageClass parameter naming the source of a new volume.
pub const SOURCE_PARAM: &str = "source";
/// The source of a new volume when the StorageClass names none.
pub const DEFAULT_SOURCE: &str = "local";

/// A volume as its source knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The volume's name.
    pub name: String,
    /// Its size in bytes.
    pub capacity: u64,
    /// The `image` of the daemon's device serving it (a path, or `qcow2:PATH`, `rbd:...`).
    pub image: String,
}

/// A snapshot as its source knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its id (the volume it is of and its name).
    pub id: SnapshotId,
    /// The volume's size when it was taken, in bytes (the least a volume made from it has).
    pub size: u64,
    /// When it was taken.
    pub created: SystemTime,
}

/// What a call brings besides the volume id: the StorageClass parameters (CreateVolume,
/// GetCapacity; the volume context at NodeStageVolume) and the secrets (every call that has
/// them). Its `Debug` never shows the secrets' values.
#[derive(Clone, Default)]
pub struct SourceContext {
    /// StorageClass parameters, without [`SOURCE_PARAM`].
    pub params: HashMap<String, String>,
    /// The call's secrets.
    pub secrets: HashMap<String, String>,
}

impl SourceContext {
    /// A context of `params` and `secrets`; [`SOURCE_PARAM`] is dropped (it picked the
    /// source already).
    pub fn new(mut params: HashMap<String, String>, secrets: HashMap<String, String>) -> Self {
        params.remove(SOURCE_PARAM);
        Self { params, secrets }
    }

    /// A call with only secrets (DeleteVolume, ControllerExpandVolume).
    pub fn secrets(secrets: HashMap<String, String>) -> Self {
        Self::new(HashMap::new(), secrets)
    }
}

impl fmt::Debug for SourceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceContext")
            .field("params", &self.params)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a source can fail with; each maps to one CSI status code.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No volume of that name.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// A volume of that name exists with another size.
    #[error("volume {name} already exists with {capacity} bytes, outside the range asked for")]
    Exists {
        /// The volume.
        name: String,
        /// Its size.
        capacity: u64,
    },
    /// No snapshot of that id.
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    /// A snapshot of that name exists, of another volume.
    #[error("snapshot {name} already exists, of volume {volume}: pick another name")]
    SnapshotExists {
        /// The snapshot's name.
        name: String,
        /// The volume it is of.
        volume: String,
    },
    /// The request cannot be honoured (a parameter, a missing secret, shrinking).
    #[error("{0}")]
    Invalid(String),
    /// Not enough space.
    #[error("{0}")]
    Exhausted(String),
    /// The storage cannot be reached now (the CO retries).
    #[error("{0}")]
    Unavailable(String),
    /// The storage refused the credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credentials may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The volume is in use (open by a client, has snapshots).
    #[error("{0}")]
    Busy(String),
    /// Storage failed.
    #[error("{0}")]
    Failed(String),
    /// Local storage failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// One kind of storage volumes are made of. Calls may block (files, a cluster's network).
pub trait VolumeSource: Send + Sync + fmt::Debug {
    /// The source's name in volume ids and in the StorageClass parameter `source`.
    fn kind(&self) -> &'static str;

    /// Whether its volumes live on one node (the id's location and the topology key name
    /// it).
    fn node_local(&self) -> bool;

    /// The location of a new volume made with `ctx`'s parameters (a source that is not
    /// node-local; the node for one that is).
    fn location(&self, ctx: &SourceContext) -> Result<String, SourceError> {
        let _ = ctx;
        Ok(String::new())
    }

    /// Create `id` with `bytes` (already rounded), or return the existing volume if its size
    /// is `bytes`; [`SourceError::Exists`] if it exists with another size.
    fn create(&self, id: &VolumeId, bytes: u64, ctx: &SourceContext)
        -> Result<Volume, SourceError>;

    /// The volume `id`, if it exists.
    fn get(&self, id: &VolumeId, ctx: &SourceContext) -> Result<Option<Volume>, SourceError>;

    /// Delete `id`; absent already is success.
    fn delete(&self, id: &VolumeId, ctx: &SourceContext) -> Result<(), SourceError>;

    /// Grow `id` to at least `bytes`; answers the new size (never shrinks).
    fn expand(&self, id: &VolumeId, bytes: u64, ctx: &SourceContext) -> Result<u64, SourceError>;

    /// Bytes free for new volumes, if the source knows.
    fn available(&self, ctx: &SourceContext) -> Result<Option<u64>, SourceError>;

    /// Take snapshot `id` of its volume, or answer it if it exists already;
    /// [`SourceError::SnapshotExists`] if a snapshot of that name exists of another volume in
    /// the same place, [`SourceError::NotFound`] without the volume.
    fn create_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Snapshot, SourceError>;

    /// The snapshot `id`, if it exists.
    fn get_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Option<Snapshot>, SourceError>;

    /// Delete snapshot `id`; absent already is success.
    fn delete_snapshot(&self, id: &SnapshotId, ctx: &SourceContext) -> Result<(), SourceError>;

    /// Create volume `id` of `bytes` (at least the snapshot's size) holding snapshot `from`,
    /// or answer the volume if it exists already with that size ([`SourceError::Exists`]
    /// with another).
    fn create_from_snapshot(
        &self,
        id: &VolumeId,
        from: &SnapshotId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Volume, SourceError>;

    /// NodeStageVolume: make what the node's daemon needs to serve `id` (an RBD keyring from
    /// the stage secrets) and answer the volume with the daemon's image. The default: the
    /// volume as [`Self::get`] finds it.
    fn stage(&self, id: &VolumeId, ctx: &SourceContext) -> Result<Volume, SourceError> {
        self.get(id, ctx)?
            .ok_or_else(|| SourceError::NotFound(id.to_string()))
    }

    /// NodeUnstageVolume, after the daemon let the device go: remove what [`Self::stage`]
    /// made. The default has nothing to remove.
    fn unstage(&self, id: &VolumeId) -> Result<(), SourceError> {
        let _ = id;
        Ok(())
    }

    /// The size of `id` as the node sees it without secrets (NodeExpandVolume has none):
    /// a `local` image's file; `None` when only the cluster knows.
    fn node_size(&self, id: &VolumeId) -> Result<Option<u64>, SourceError> {
        let _ = id;
        Ok(None)
    }
}

/// Run a source call off the async threads (files, a cluster's network); its error as the
/// spec's status.
pub async fn run<T: Send + 'static>(
    source: &Arc<dyn VolumeSource>,
    call: impl FnOnce(&dyn VolumeSource) -> Result<T, SourceError> + Send + 'static,
) -> Result<T, tonic::Status> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || call(source.as_ref()))
        .await
        .map_err(|e| tonic::Status::internal(format!("volume source task failed: {e}")))?
        .map_err(crate::status::source)
}

/// The sources of one plugin, by kind.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    by_kind: BTreeMap<&'static str, Arc<dyn VolumeSource>>,
}

impl Sources {
    /// These sources (one per kind; a later one of the same kind replaces an earlier).
    pub fn new(sources: impl IntoIterator<Item = Arc<dyn VolumeSource>>) -> Self {
        Self {
            by_kind: sources.into_iter().map(|s| (s.kind(), s)).collect(),
        }
    }

    /// The source of kind `kind`.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn VolumeSource>> {
        self.by_kind.get(kind)
    }

    /// The source a new volume with these StorageClass parameters goes to (`source`,
    /// [`DEFAULT_SOURCE`] when absent); INVALID_ARGUMENT for one this plugin does not have.
    pub fn for_params(
        &self,
        params: &HashMap<String, String>,
    ) -> Result<&Arc<dyn VolumeSource>, SourceError> {
        let kind = params
            .get(SOURCE_PARAM)
            .map_or(DEFAULT_SOURCE, String::as_str);
        self.get(kind).ok_or_else(|| {
            SourceError::Invalid(format!(
                "StorageClass parameter {SOURCE_PARAM}={kind:?}: this plugin has the sources {}",
                self.kinds().join(", ")
            ))
        })
    }

    /// The kinds, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.by_kind.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_comes_from_the_parameter_or_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources::new([
            Arc::new(local::LocalSource::new(dir.path().join("local"))) as Arc<dyn VolumeSource>,
            Arc::new(rbd::RbdSource::new(
                dir.path().join("clusters"),
                dir.path().join("ceph"),
            )),
        ]);
        let params = |v: Option<&str>| -> HashMap<String, String> {
            v.map(|v| (SOURCE_PARAM.to_string(), v.to_string()))
                .into_iter()
                .collect()
        };
        assert_eq!(sources.for_params(&params(None)).unwrap().kind(), "local");
        assert_eq!(
            sources.for_params(&params(Some("local"))).unwrap().kind(),
            "local"
        );
        assert_eq!(
            sources.for_params(&params(Some("rbd"))).unwrap().kind(),
            "rbd"
        );
        let e = sources.for_params(&params(Some("nfs"))).unwrap_err();
        assert!(
            matches!(&e, SourceError::Invalid(m) if m.contains("local, rbd")),
            "{e}"
        );
        let id = VolumeId::parse("rbd:c/p:v").unwrap();
        assert_eq!(sources.get(&id.source).unwrap().kind(), "rbd");
        assert!(sources.get("nfs").is_none());
        // Only local: rbd is refused.
        let only_local =
            Sources::new([Arc::new(local::LocalSource::new(dir.path())) as Arc<dyn VolumeSource>]);
        assert!(only_local.for_params(&params(Some("rbd"))).is_err());
    }

    #[test]
    fn the_context_drops_the_source_and_hides_the_secrets() {
        let ctx = SourceContext::new(
            [
                ("source".to_string(), "rbd".to_string()),
                ("pool".to_string(), "kube".to_string()),
            ]
            .into(),
            [("userKey".to_string(), "AQsecret==".to_string())].into(),
        );
        assert_eq!(ctx.params.len(), 1);
        let shown = format!("{ctx:?}");
        assert!(
            shown.contains("userKey") && !shown.contains("AQsecret"),
            "{shown}"
        );
    }
}
