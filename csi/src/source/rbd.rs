//! `rbd`: each volume is an RBD image `POOL/NAME` of a Ceph cluster, created, grown and removed
//! through librbd (`virtiod_backend::rbd_admin`), served on the node by the daemon's RBD
//! backend. Volumes are not node-local: any node reaches them.
//!
//! - StorageClass parameters: `clusterID` (required; the file `CLUSTERS_DIR/CLUSTERID` holds
//!   the cluster's monitors, e.g. `192.0.2.10:6789,192.0.2.11:6789`: a ConfigMap mounted as a
//!   directory), `pool` (required), `imageFeatures` (optional: `layering`, `exclusive-lock`,
//!   `object-map`, `fast-diff`, `deep-flatten`, comma-separated; Ceph's default set
//!   otherwise).
//! - Secrets (provisioner, controller-expand and node-stage): `userID` (without `client.`)
//!   and `userKey` (`ceph auth get-key client.ID`), as ceph-csi names them.
//! - The volume id is `rbd:CLUSTERID/POOL:NAME`.
//! - A snapshot is an RBD snapshot `POOL/VOLUME@SNAPSHOT` (id `rbd:CLUSTERID/POOL:VOLUME@SNAPSHOT`);
//!   a volume from it is a clone (the snapshot is protected first), grown to the size asked
//!   for. A snapshot with clones, and a volume with snapshots, cannot be deleted
//!   (FAILED_PRECONDITION) until its clones, or its snapshots, are.
//! - NodeStageVolume writes `KEYS_DIR/csi-rbd-NAME.conf` (the monitors) and
//!   `KEYS_DIR/csi-rbd-NAME.keyring` (the key), both 0600 in a 0700 directory, and gives the
//!   daemon `rbd:POOL/NAME?conf=…&id=…&keyring=…`: the key never enters the daemon's records
//!   or logs. NodeUnstageVolume removes them.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use virtiod_backend::rbd_admin::{self, AdminError, Cluster, ClusterConfig};

mod snapshots;

use super::{Snapshot, SourceContext, SourceError, Volume, VolumeSource};
use crate::snapshot::SnapshotId;
use crate::volume::VolumeId;

/// The StorageClass parameter naming the cluster.
pub const CLUSTER_PARAM: &str = "clusterID";
/// The StorageClass parameter naming the pool.
pub const POOL_PARAM: &str = "pool";
/// The StorageClass parameter listing the image features.
pub const FEATURES_PARAM: &str = "imageFeatures";
/// The secret holding the client id.
pub const USER_SECRET: &str = "userID";
/// The secret holding the client's key.
pub const KEY_SECRET: &str = "userKey";

/// RBD images of the clusters listed in one directory.
#[derive(Debug, Clone)]
pub struct RbdSource {
    clusters_dir: PathBuf,
    keys_dir: PathBuf,
}

/// A cluster id or pool name we take: it lands in the volume id and in file names.
fn check_part(what: &str, value: &str) -> Result<(), SourceError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SourceError::Invalid(format!(
            "StorageClass parameter {what}={value:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

fn features(list: &str) -> Result<u64, SourceError> {
    let mut bits = 0;
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        bits |= match name {
            "layering" => rbd_admin::FEATURE_LAYERING,
            "exclusive-lock" => rbd_admin::FEATURE_EXCLUSIVE_LOCK,
            "object-map" => rbd_admin::FEATURE_OBJECT_MAP,
            "fast-diff" => rbd_admin::FEATURE_FAST_DIFF,
            "deep-flatten" => rbd_admin::FEATURE_DEEP_FLATTEN,
            _ => {
                return Err(SourceError::Invalid(format!(
                    "StorageClass parameter {FEATURES_PARAM}: unknown feature {name:?}: use layering, exclusive-lock, object-map, fast-diff, deep-flatten"
                )))
            }
        };
    }
    Ok(bits)
}

/// A provisioning error as the source's: what the CO and the user can act on.
fn op_error(e: AdminError) -> SourceError {
    let text = e.to_string();
    match e.errno().map(|n| -n) {
        Some(libc::EACCES | libc::EPERM) => SourceError::PermissionDenied(text),
        Some(libc::ENOSPC | libc::EDQUOT) => SourceError::Exhausted(text),
        Some(libc::EBUSY | libc::ENOTEMPTY) => SourceError::Busy(text),
        Some(libc::ETIMEDOUT) => SourceError::Unavailable(text),
        _ if matches!(e, AdminError::Nul { .. }) => SourceError::Invalid(text),
        _ => SourceError::Failed(text),
    }
}

/// The pool itself does not exist (not only the image).
fn pool_missing(e: &AdminError) -> bool {
    matches!(e, AdminError::Op { target, .. } if !target.contains('/')) && e.is_not_found()
}

/// Where an rbd volume is: its cluster and pool, from the id's location.
struct Place<'a> {
    cluster: &'a str,
    pool: &'a str,
    name: &'a str,
}

impl RbdSource {
    /// Clusters listed in `clusters_dir` (one file per cluster id holding its monitors);
    /// NodeStageVolume writes the daemon's configuration and keyring files in `keys_dir`.
    pub fn new(clusters_dir: impl Into<PathBuf>, keys_dir: impl Into<PathBuf>) -> Self {
        Self {
            clusters_dir: clusters_dir.into(),
            keys_dir: keys_dir.into(),
        }
    }

    fn place<'a>(&self, id: &'a VolumeId) -> Result<Place<'a>, SourceError> {
        let Some((cluster, pool)) = id.location.split_once('/') else {
            return Err(SourceError::NotFound(format!(
                "{id} (an rbd volume id is rbd:CLUSTERID/POOL:NAME)"
            )));
        };
        if check_part(CLUSTER_PARAM, cluster).is_err() || check_part(POOL_PARAM, pool).is_err() {
            return Err(SourceError::NotFound(format!(
                "{id} (an rbd volume id is rbd:CLUSTERID/POOL:NAME)"
            )));
        }
        Ok(Place {
            cluster,
            pool,
            name: &id.name,
        })
    }

    /// The monitors of cluster `cluster`, from its file.
    fn monitors(&self, cluster: &str) -> Result<String, SourceError> {
        let path = self.clusters_dir.join(cluster);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            SourceError::Invalid(format!(
                "{CLUSTER_PARAM} {cluster:?}: cannot read {} ({e}): write the cluster's monitors (host:port,...) in it (a ConfigMap mounted at the plugin's --rbd-clusters directory)",
                path.display()
            ))
        })?;
        let monitors = text.trim();
        if monitors.is_empty() || monitors.contains('\n') {
            return Err(SourceError::Invalid(format!(
                "{CLUSTER_PARAM} {cluster:?}: {} must hold the monitors on one line (host:port,...)",
                path.display()
            )));
        }
        Ok(monitors.to_string())
    }

    /// The client id and key of the call's secrets.
    fn credentials(ctx: &SourceContext) -> Result<(&str, &str), SourceError> {
        let get = |key: &str| {
            ctx.secrets
                .get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        match (get(USER_SECRET), get(KEY_SECRET)) {
            (Some(user), Some(key)) => Ok((user.strip_prefix("client.").unwrap_or(user), key)),
            _ => Err(SourceError::Invalid(format!(
                "the rbd source needs the secrets {USER_SECRET} and {KEY_SECRET} (a Secret named by the StorageClass's csi.storage.k8s.io/*-secret-name parameters)"
            ))),
        }
    }

    fn connect(&self, cluster: &str, ctx: &SourceContext) -> Result<Cluster, SourceError> {
        let monitors = self.monitors(cluster)?;
        let (user, key) = Self::credentials(ctx)?;
        let config = ClusterConfig {
            mon_host: Some(monitors.clone()),
            id: Some(user.to_string()),
            key: Some(key.to_string()),
            ..ClusterConfig::default()
        };
        Cluster::connect(&config).map_err(|e| {
            let refused = matches!(e.errno().map(|n| -n), Some(libc::EACCES | libc::EPERM));
            let text = format!(
                "{CLUSTER_PARAM} {cluster} (monitors {monitors}, from {}): {e}",
                self.clusters_dir.join(cluster).display()
            );
            match e {
                AdminError::Connect { .. } if refused => SourceError::Unauthenticated(text),
                AdminError::Connect { .. } => SourceError::Unavailable(text),
                other => op_error(other),
            }
        })
    }

    /// The image features of a new image: `imageFeatures`, or Ceph's default set.
    fn features(ctx: &SourceContext) -> Result<u64, SourceError> {
        match ctx.params.get(FEATURES_PARAM) {
            Some(list) if !list.trim().is_empty() => features(list),
            _ => Ok(rbd_admin::FEATURES_DEFAULT),
        }
    }

    fn files(&self, id: &VolumeId) -> (PathBuf, PathBuf) {
        let base = id.device_name();
        (
            self.keys_dir.join(format!("{base}.conf")),
            self.keys_dir.join(format!("{base}.keyring")),
        )
    }
}

/// Write `text` to `path` (mode 0600) through a temporary file and a rename.
fn write_private(path: &Path, text: &str) -> Result<(), SourceError> {
    let io = |what: String| move |source| SourceError::Io { what, source };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("cannot create {}", tmp.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot write {}", path.display())))
}

impl VolumeSource for RbdSource {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn node_local(&self) -> bool {
        false
    }

    fn location(&self, ctx: &SourceContext) -> Result<String, SourceError> {
        for (key, value) in &ctx.params {
            if key.starts_with("csi.storage.k8s.io/") {
                continue;
            }
            match key.as_str() {
                CLUSTER_PARAM | POOL_PARAM => check_part(key, value)?,
                FEATURES_PARAM => {
                    features(value)?;
                }
                _ => {
                    return Err(SourceError::Invalid(format!(
                        "StorageClass parameter {key}={value:?} is not supported by the rbd source: only {CLUSTER_PARAM}, {POOL_PARAM}, {FEATURES_PARAM}"
                    )))
                }
            }
        }
        let required = |key: &str| {
            ctx.params.get(key).cloned().ok_or_else(|| {
                SourceError::Invalid(format!(
                    "the rbd source needs the StorageClass parameter {key}"
                ))
            })
        };
        Ok(format!(
            "{}/{}",
            required(CLUSTER_PARAM)?,
            required(POOL_PARAM)?
        ))
    }

    fn create(
        &self,
        id: &VolumeId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Volume, SourceError> {
        let place = self.place(id)?;
        let features = Self::features(ctx)?;
        let cluster = self.connect(place.cluster, ctx)?;
        let mut created = cluster.create_image(place.pool, place.name, bytes, features);
        if matches!(&created, Err(e) if e.is_already_exists()) {
            created = Ok(()); // made by an earlier call: its size decides below
        }
        match created {
            Ok(()) => {}
            Err(e) if pool_missing(&e) => {
                return Err(SourceError::Invalid(format!(
                    "StorageClass parameter {POOL_PARAM}: {e}"
                )))
            }
            Err(e) => return Err(op_error(e)),
        }
        let capacity = cluster
            .image_size(place.pool, place.name)
            .map_err(op_error)?;
        if capacity != bytes {
            return Err(SourceError::Exists {
                name: id.name.clone(),
                capacity,
            });
        }
        Ok(Volume {
            name: id.name.clone(),
            capacity,
            image: format!("rbd:{}/{}", place.pool, place.name),
        })
    }

    fn get(&self, id: &VolumeId, ctx: &SourceContext) -> Result<Option<Volume>, SourceError> {
        let place = self.place(id)?;
        let cluster = self.connect(place.cluster, ctx)?;
        match cluster.image_size(place.pool, place.name) {
            Ok(capacity) => Ok(Some(Volume {
                name: id.name.clone(),
                capacity,
                image: format!("rbd:{}/{}", place.pool, place.name),
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(op_error(e)),
        }
    }

    fn delete(&self, id: &VolumeId, ctx: &SourceContext) -> Result<(), SourceError> {
        let Ok(place) = self.place(id) else {
            return Ok(()); // not an id of ours: nothing to delete
        };
        let cluster = self.connect(place.cluster, ctx)?;
        match cluster.remove_image(place.pool, place.name) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) if e.errno() == Some(-libc::ENOTEMPTY) => Err(SourceError::Busy(format!(
                "{e}; for Kubernetes: delete the volume's VolumeSnapshots first"
            ))),
            Err(e) => Err(op_error(e)),
        }
    }

    fn expand(&self, id: &VolumeId, bytes: u64, ctx: &SourceContext) -> Result<u64, SourceError> {
        let place = self.place(id)?;
        let cluster = self.connect(place.cluster, ctx)?;
        let current = match cluster.image_size(place.pool, place.name) {
            Ok(size) => size,
            Err(e) if e.is_not_found() => return Err(SourceError::NotFound(id.to_string())),
            Err(e) => return Err(op_error(e)),
        };
        if current >= bytes {
            return Ok(current);
        }
        cluster
            .resize_image(place.pool, place.name, bytes)
            .map_err(op_error)?;
        Ok(bytes)
    }

    fn available(&self, _ctx: &SourceContext) -> Result<Option<u64>, SourceError> {
        Ok(None)
    }

    fn create_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Snapshot, SourceError> {
        self.take_snapshot(id, ctx)
    }

    fn get_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Option<Snapshot>, SourceError> {
        self.snapshot(id, ctx)
    }

    fn delete_snapshot(&self, id: &SnapshotId, ctx: &SourceContext) -> Result<(), SourceError> {
        self.remove_snapshot(id, ctx)
    }

    fn create_from_snapshot(
        &self,
        id: &VolumeId,
        from: &SnapshotId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Volume, SourceError> {
        self.clone_snapshot(id, from, bytes, ctx)
    }

    fn stage(&self, id: &VolumeId, ctx: &SourceContext) -> Result<Volume, SourceError> {
        let Some(volume) = self.get(id, ctx)? else {
            return Err(SourceError::NotFound(id.to_string()));
        };
        let place = self.place(id)?;
        let monitors = self.monitors(place.cluster)?;
        let (user, key) = Self::credentials(ctx)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.keys_dir)
            .map_err(|source| SourceError::Io {
                what: format!("cannot create {}", self.keys_dir.display()),
                source,
            })?;
        let (conf, keyring) = self.files(id);
        write_private(&conf, &format!("[global]\nmon_host = {monitors}\n"))?;
        write_private(&keyring, &format!("[client.{user}]\n\tkey = {key}\n"))?;
        Ok(Volume {
            image: format!(
                "rbd:{}/{}?conf={}&id={user}&keyring={}",
                place.pool,
                place.name,
                conf.display(),
                keyring.display()
            ),
            ..volume
        })
    }

    /// The image's size through the files NodeStageVolume wrote (NodeExpandVolume has no
    /// secrets); `None` when the volume is not staged here.
    fn node_size(&self, id: &VolumeId) -> Result<Option<u64>, SourceError> {
        let place = self.place(id)?;
        let (conf, keyring) = self.files(id);
        let header = match std::fs::read_to_string(&keyring) {
            Ok(text) => text.lines().next().unwrap_or_default().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SourceError::Io {
                    what: format!("cannot read {}", keyring.display()),
                    source,
                })
            }
        };
        let user = header
            .strip_prefix("[client.")
            .and_then(|rest| rest.strip_suffix(']'))
            .ok_or_else(|| {
                SourceError::Failed(format!(
                    "{} is not a keyring this plugin wrote: unstage the volume and stage it again",
                    keyring.display()
                ))
            })?;
        let cluster = Cluster::connect(&ClusterConfig {
            conf: Some(conf),
            id: Some(user.to_string()),
            keyring: Some(keyring),
            ..ClusterConfig::default()
        })
        .map_err(|e| SourceError::Unavailable(format!("Ceph cluster {}: {e}", place.cluster)))?;
        match cluster.image_size(place.pool, place.name) {
            Ok(size) => Ok(Some(size)),
            Err(e) if e.is_not_found() => Err(SourceError::NotFound(id.to_string())),
            Err(e) => Err(op_error(e)),
        }
    }

    fn unstage(&self, id: &VolumeId) -> Result<(), SourceError> {
        let (conf, keyring) = self.files(id);
        for path in [conf, keyring] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(SourceError::Io {
                        what: format!("cannot remove {}", path.display()),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(params: &[(&str, &str)], secrets: &[(&str, &str)]) -> SourceContext {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        SourceContext::new(map(params), map(secrets))
    }

    #[test]
    fn the_location_is_cluster_and_pool_and_bad_parameters_are_refused() {
        let src = RbdSource::new("/nonexistent", "/nonexistent");
        let good = ctx(
            &[
                ("clusterID", "ceph-a"),
                ("pool", "kube"),
                ("imageFeatures", "layering,exclusive-lock"),
                ("csi.storage.k8s.io/pvc/name", "x"),
            ],
            &[],
        );
        assert_eq!(src.location(&good).unwrap(), "ceph-a/kube");
        for bad in [
            ctx(&[("pool", "kube")], &[]),
            ctx(&[("clusterID", "a")], &[]),
            ctx(&[("clusterID", "a/b"), ("pool", "p")], &[]),
            ctx(&[("clusterID", "a"), ("pool", "..")], &[]),
            ctx(&[("clusterID", "a"), ("pool", "p"), ("monitors", "m")], &[]),
            ctx(
                &[
                    ("clusterID", "a"),
                    ("pool", "p"),
                    ("imageFeatures", "journaling"),
                ],
                &[],
            ),
        ] {
            assert!(
                matches!(src.location(&bad), Err(SourceError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            features("layering, fast-diff").unwrap(),
            rbd_admin::FEATURE_LAYERING | rbd_admin::FEATURE_FAST_DIFF
        );
    }

    #[test]
    fn an_unknown_cluster_or_missing_secrets_say_what_to_give() {
        let dir = tempfile::tempdir().unwrap();
        let src = RbdSource::new(dir.path(), dir.path().join("keys"));
        let id = VolumeId::parse("rbd:ceph-a/kube:v").unwrap();
        let secrets = ctx(&[], &[("userID", "csi"), ("userKey", "AQx==")]);
        let e = src.get(&id, &secrets).unwrap_err().to_string();
        assert!(
            e.contains("clusterID \"ceph-a\"") && e.contains("--rbd-clusters"),
            "{e}"
        );
        std::fs::write(dir.path().join("ceph-a"), "192.0.2.1:6789\n").unwrap();
        let e = src.get(&id, &ctx(&[], &[("userID", "csi")])).unwrap_err();
        assert!(
            matches!(&e, SourceError::Invalid(m) if m.contains("userKey")),
            "{e}"
        );
        // Not an rbd location: the volume is not found (delete: already gone).
        let odd = VolumeId::parse("rbd:nopool:v").unwrap();
        assert!(matches!(
            src.get(&odd, &secrets),
            Err(SourceError::NotFound(_))
        ));
        src.delete(&odd, &secrets).unwrap();
    }

    #[test]
    fn cluster_errors_map_to_what_the_co_can_act_on() {
        let op = |errno: i32, target: &str| AdminError::Op {
            target: target.into(),
            what: "cannot do it",
            errno: -errno,
            cause: "cause".into(),
            hint: String::new(),
        };
        let kind = |e: SourceError| format!("{e:?}").split('(').next().unwrap().to_string();
        for (errno, expected) in [
            (libc::EACCES, "PermissionDenied"),
            (libc::ENOSPC, "Exhausted"),
            (libc::EBUSY, "Busy"),
            (libc::ENOTEMPTY, "Busy"),
            (libc::ETIMEDOUT, "Unavailable"),
            (libc::EIO, "Failed"),
        ] {
            assert_eq!(
                kind(op_error(op(errno, "rbd/v"))),
                expected,
                "errno {errno}"
            );
        }
        assert!(pool_missing(&op(libc::ENOENT, "rbd")));
        assert!(!pool_missing(&op(libc::ENOENT, "rbd/v")));
    }

    #[test]
    fn staged_files_are_private_and_go_at_unstage() {
        let dir = tempfile::tempdir().unwrap();
        let src = RbdSource::new(dir.path(), dir.path().join("keys"));
        let id = VolumeId::parse("rbd:ceph-a/kube:v").unwrap();
        let (conf, keyring) = src.files(&id);
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        write_private(&keyring, "[client.csi]\n\tkey = AQx==\n").unwrap();
        write_private(&conf, "[global]\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keyring).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        src.unstage(&id).unwrap();
        src.unstage(&id).unwrap();
        assert!(!keyring.exists() && !conf.exists());
    }
}
