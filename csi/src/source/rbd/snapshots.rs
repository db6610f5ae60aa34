//! Snapshots of rbd volumes: RBD snapshots of the image, and volumes cloned from them.

use virtiod_backend::rbd_admin::{self, Cluster};

use super::{op_error, Place, RbdSource};
use crate::snapshot::SnapshotId;
use crate::source::{Snapshot, SourceContext, SourceError, Volume};
use crate::volume::VolumeId;

impl RbdSource {
    /// Snapshot `id` of its volume's image, if both exist.
    fn find_snapshot(
        cluster: &Cluster,
        id: &SnapshotId,
        place: &Place<'_>,
    ) -> Result<Option<Snapshot>, SourceError> {
        let snaps = match cluster.list_snapshots(place.pool, place.name) {
            Ok(snaps) => snaps,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(op_error(e)),
        };
        Ok(snaps
            .into_iter()
            .find(|s| s.name == id.name)
            .map(|s| Snapshot {
                id: id.clone(),
                size: s.size,
                created: s.created,
            }))
    }

    /// The image of `pool` holding a snapshot named `name`, if one does (one look at every
    /// image of the pool: snapshot names are taken once per pool).
    fn snapshot_owner(
        cluster: &Cluster,
        pool: &str,
        name: &str,
    ) -> Result<Option<String>, SourceError> {
        for image in cluster.list_images(pool).map_err(op_error)? {
            match cluster.list_snapshots(pool, &image) {
                Ok(snaps) if snaps.iter().any(|s| s.name == name) => return Ok(Some(image)),
                Ok(_) => {}
                Err(e) if e.is_not_found() => {} // removed since the listing
                Err(e) => return Err(op_error(e)),
            }
        }
        Ok(None)
    }

    /// CreateSnapshot: `rbd snap create`, unless it exists; the name taken by another image's
    /// snapshot is [`SourceError::SnapshotExists`].
    pub(super) fn take_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Snapshot, SourceError> {
        let place = self.place(&id.volume)?;
        let cluster = self.connect(place.cluster, ctx)?;
        if let Some(existing) = Self::find_snapshot(&cluster, id, &place)? {
            return Ok(existing);
        }
        if let Some(volume) = Self::snapshot_owner(&cluster, place.pool, &id.name)? {
            return Err(SourceError::SnapshotExists {
                name: id.name.clone(),
                volume,
            });
        }
        match cluster.create_snapshot(place.pool, place.name, &id.name) {
            Ok(()) => {}
            Err(e) if e.is_already_exists() => {} // an earlier call's
            Err(e) if e.is_not_found() => return Err(SourceError::NotFound(id.volume.to_string())),
            Err(e) => return Err(op_error(e)),
        }
        Self::find_snapshot(&cluster, id, &place)?
            .ok_or_else(|| SourceError::Failed(format!("snapshot {id} vanished once made")))
    }

    /// The snapshot `id`, if it exists.
    pub(super) fn snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Option<Snapshot>, SourceError> {
        let Ok(place) = self.place(&id.volume) else {
            return Ok(None);
        };
        let cluster = self.connect(place.cluster, ctx)?;
        Self::find_snapshot(&cluster, id, &place)
    }

    /// DeleteSnapshot: unprotect and remove; with clones, [`SourceError::Busy`].
    pub(super) fn remove_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<(), SourceError> {
        let Ok(place) = self.place(&id.volume) else {
            return Ok(()); // not an id of ours: nothing to delete
        };
        let cluster = self.connect(place.cluster, ctx)?;
        match cluster.remove_snapshot(place.pool, place.name, &id.name) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            // Clones of it exist (unprotecting fails): they must go first.
            Err(e) if e.errno() == Some(-libc::EBUSY) => Err(SourceError::Busy(format!(
                "{e}; for Kubernetes: delete the volumes made from snapshot {id} first"
            ))),
            Err(e) => Err(op_error(e)),
        }
    }

    /// CreateVolume from snapshot `from`: a clone, grown to `bytes`.
    pub(super) fn clone_snapshot(
        &self,
        id: &VolumeId,
        from: &SnapshotId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Volume, SourceError> {
        let place = self.place(id)?;
        let parent = self.place(&from.volume)?;
        if id.location != from.volume.location {
            return Err(SourceError::Invalid(format!(
                "snapshot {from} is in {}, the StorageClass's volumes in {}: a volume from a snapshot is a clone in the snapshot's cluster and pool",
                from.volume.location, id.location
            )));
        }
        let features = Self::features(ctx)? | rbd_admin::FEATURE_LAYERING;
        let cluster = self.connect(place.cluster, ctx)?;
        let Some(snapshot) = Self::find_snapshot(&cluster, from, &parent)? else {
            return Err(SourceError::SnapshotNotFound(from.to_string()));
        };
        let image = format!("rbd:{}/{}", place.pool, place.name);
        let current = match cluster.image_size(place.pool, place.name) {
            Ok(size) => Some(size),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(op_error(e)),
        };
        let current = match current {
            Some(size) => size,
            None => {
                match cluster.clone_image(place.pool, parent.name, &from.name, place.name, features)
                {
                    Ok(()) => {}
                    Err(e) if e.is_already_exists() => {} // an earlier call's
                    Err(e) if e.errno() == Some(-libc::EINVAL) => {
                        return Err(SourceError::Invalid(format!(
                            "{e}: the image of volume {} needs the layering feature to be cloned (imageFeatures)",
                            from.volume
                        )))
                    }
                    Err(e) => return Err(op_error(e)),
                }
                snapshot.size
            }
        };
        // A clone has the snapshot's size; an earlier call may have cloned and not grown it.
        if current == snapshot.size && bytes > current {
            cluster
                .resize_image(place.pool, place.name, bytes)
                .map_err(op_error)?;
        } else if current != bytes {
            return Err(SourceError::Exists {
                name: id.name.clone(),
                capacity: current,
            });
        }
        Ok(Volume {
            name: id.name.clone(),
            capacity: bytes,
            image,
        })
    }
}
