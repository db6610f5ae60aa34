//! `local`: each volume is a sparse raw image file `DIR/NAME.img` on the node (`--local-dir`),
//! served by the node's daemon. A snapshot is a sparse copy of the image,
//! `DIR/snapshots/SNAPSHOT/VOLUME.img` (one directory per snapshot name, so a name is taken
//! once per node); a volume from a snapshot is a sparse copy back, grown to its size.

use std::path::PathBuf;

use std::fs::File;
use std::path::Path;

use super::{sparse, Snapshot, SourceContext, SourceError, Volume, VolumeSource};
use crate::snapshot::SnapshotId;
use crate::volume::VolumeId;

/// Raw image files in one directory.
#[derive(Debug, Clone)]
pub struct LocalSource {
    dir: PathBuf,
}

impl LocalSource {
    /// Volumes in `dir` (created when the first volume is).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    fn io(what: String) -> impl FnOnce(std::io::Error) -> SourceError {
        move |source| SourceError::Io { what, source }
    }

    /// The directory of the snapshots named `name`.
    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.dir.join("snapshots").join(name)
    }

    fn snapshot_path(&self, id: &SnapshotId) -> PathBuf {
        self.snapshot_dir(&id.name)
            .join(format!("{}.img", id.volume.name))
    }

    /// The volume a snapshot named `name` is of, if there is one.
    fn snapshot_owner(&self, name: &str) -> Result<Option<String>, SourceError> {
        let dir = self.snapshot_dir(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(format!("cannot list {}", dir.display()))(e)),
        };
        for entry in entries {
            let entry = entry.map_err(Self::io(format!("cannot list {}", dir.display())))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if let Some(volume) = file.strip_suffix(".img").filter(|_| !file.starts_with('.')) {
                return Ok(Some(volume.to_string()));
            }
        }
        Ok(None)
    }

    /// Make `path` a sparse copy of `from` of `bytes` (at least `from`'s size) through a
    /// temporary file, so a crash never leaves a half copy under the real name.
    fn copy_image(from: &Path, path: &Path, bytes: u64) -> Result<(), SourceError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let src = File::open(from).map_err(Self::io(format!("cannot open {}", from.display())))?;
        let copied = File::create(&tmp)
            .and_then(|dst| {
                let len = sparse::copy(&src, &dst)?;
                if bytes > len {
                    dst.set_len(bytes)?;
                }
                dst.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(SourceError::Exhausted(format!(
                    "cannot copy {} to {}: no space left: free space in the volumes' directory",
                    from.display(),
                    path.display()
                )));
            }
            return Err(Self::io(format!(
                "cannot copy {} to {}",
                from.display(),
                path.display()
            ))(e));
        }
        Ok(())
    }

    fn check_params(ctx: &SourceContext) -> Result<(), SourceError> {
        for (key, value) in &ctx.params {
            // Parameters the external-provisioner adds on its own are let through.
            if key.starts_with("csi.storage.k8s.io/") {
                continue;
            }
            match (key.as_str(), value.as_str()) {
                ("format", "raw") => {}
                _ => {
                    return Err(SourceError::Invalid(format!(
                        "StorageClass parameter {key}={value:?} is not supported by the local \
                         source: only format=raw"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Sparse volumes, but one that could never be filled is refused up front.
    fn check_space(&self, bytes: u64, ctx: &SourceContext) -> Result<(), SourceError> {
        if let Some(free) = self.available(ctx)? {
            if bytes > free {
                return Err(SourceError::Exhausted(format!(
                    "{} has {free} bytes free, less than the {bytes} asked for",
                    self.dir.display()
                )));
            }
        }
        Ok(())
    }

    /// The existing volume `id` if its size is `bytes`, `None` without it.
    fn existing(
        &self,
        id: &VolumeId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Option<Volume>, SourceError> {
        match self.get(id, ctx)? {
            Some(existing) if existing.capacity == bytes => Ok(Some(existing)),
            Some(existing) => Err(SourceError::Exists {
                name: id.name.clone(),
                capacity: existing.capacity,
            }),
            None => Ok(None),
        }
    }
}

impl VolumeSource for LocalSource {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn node_local(&self) -> bool {
        true
    }

    fn create(
        &self,
        id: &VolumeId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Volume, SourceError> {
        let name = id.name.as_str();
        Self::check_params(ctx)?;
        if let Some(existing) = self.existing(id, bytes, ctx)? {
            return Ok(existing);
        }
        self.check_space(bytes, ctx)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(Self::io(format!("cannot create {}", self.dir.display())))?;
        let path = self.path(name);
        // Made under a temporary name, so that a crash never leaves a volume of the wrong size.
        let tmp = self.dir.join(format!(".{name}.img.tmp"));
        let file = std::fs::File::create(&tmp)
            .map_err(Self::io(format!("cannot create {}", tmp.display())))?;
        file.set_len(bytes)
            .and_then(|()| file.sync_all())
            .map_err(Self::io(format!("cannot size {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(Self::io(format!("cannot create {}", path.display())))?;
        Ok(Volume {
            name: name.to_string(),
            capacity: bytes,
            image: path.display().to_string(),
        })
    }

    fn get(&self, id: &VolumeId, _ctx: &SourceContext) -> Result<Option<Volume>, SourceError> {
        let name = id.name.as_str();
        let path = self.path(name);
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(Some(Volume {
                name: name.to_string(),
                capacity: meta.len(),
                image: path.display().to_string(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SourceError::Io {
                what: format!("cannot look at {}", path.display()),
                source: e,
            }),
        }
    }

    fn delete(&self, id: &VolumeId, _ctx: &SourceContext) -> Result<(), SourceError> {
        let path = self.path(&id.name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SourceError::Io {
                what: format!("cannot delete {}", path.display()),
                source: e,
            }),
        }
    }

    fn expand(&self, id: &VolumeId, bytes: u64, ctx: &SourceContext) -> Result<u64, SourceError> {
        let Some(volume) = self.get(id, ctx)? else {
            return Err(SourceError::NotFound(id.name.clone()));
        };
        if volume.capacity >= bytes {
            return Ok(volume.capacity);
        }
        let path = self.path(&id.name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(bytes).and_then(|()| f.sync_all()))
            .map_err(Self::io(format!("cannot grow {}", path.display())))?;
        Ok(bytes)
    }

    fn create_snapshot(
        &self,
        id: &SnapshotId,
        ctx: &SourceContext,
    ) -> Result<Snapshot, SourceError> {
        if let Some(existing) = self.get_snapshot(id, ctx)? {
            return Ok(existing);
        }
        if let Some(volume) = self.snapshot_owner(&id.name)? {
            return Err(SourceError::SnapshotExists {
                name: id.name.clone(),
                volume,
            });
        }
        let from = self.path(&id.volume.name);
        if !from.exists() {
            return Err(SourceError::NotFound(id.volume.to_string()));
        }
        let dir = self.snapshot_dir(&id.name);
        std::fs::create_dir_all(&dir)
            .map_err(Self::io(format!("cannot create {}", dir.display())))?;
        Self::copy_image(&from, &self.snapshot_path(id), 0)?;
        self.get_snapshot(id, ctx)?
            .ok_or_else(|| SourceError::Failed(format!("snapshot {id} vanished once made")))
    }

    fn get_snapshot(
        &self,
        id: &SnapshotId,
        _ctx: &SourceContext,
    ) -> Result<Option<Snapshot>, SourceError> {
        let path = self.snapshot_path(id);
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(Some(Snapshot {
                id: id.clone(),
                size: meta.len(),
                created: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(format!("cannot look at {}", path.display()))(e)),
        }
    }

    fn delete_snapshot(&self, id: &SnapshotId, _ctx: &SourceContext) -> Result<(), SourceError> {
        let path = self.snapshot_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Self::io(format!("cannot delete {}", path.display()))(e)),
        }
        // The name's directory goes with its snapshot, and the snapshots' directory with the
        // last (each kept while something else is in it).
        let _ = std::fs::remove_dir(self.snapshot_dir(&id.name));
        let _ = std::fs::remove_dir(self.dir.join("snapshots"));
        Ok(())
    }

    fn create_from_snapshot(
        &self,
        id: &VolumeId,
        from: &SnapshotId,
        bytes: u64,
        ctx: &SourceContext,
    ) -> Result<Volume, SourceError> {
        Self::check_params(ctx)?;
        if let Some(existing) = self.existing(id, bytes, ctx)? {
            return Ok(existing);
        }
        let Some(snapshot) = self.get_snapshot(from, ctx)? else {
            return Err(SourceError::SnapshotNotFound(from.to_string()));
        };
        if bytes < snapshot.size {
            return Err(SourceError::Invalid(format!(
                "snapshot {from} has {} bytes: a volume from it needs at least that",
                snapshot.size
            )));
        }
        self.check_space(bytes, ctx)?;
        let path = self.path(&id.name);
        Self::copy_image(&self.snapshot_path(from), &path, bytes)?;
        Ok(Volume {
            name: id.name.clone(),
            capacity: bytes,
            image: path.display().to_string(),
        })
    }

    fn available(&self, _ctx: &SourceContext) -> Result<Option<u64>, SourceError> {
        // The directory may not exist yet: ask its nearest existing ancestor.
        let mut dir = self.dir.as_path();
        while !dir.exists() {
            match dir.parent() {
                Some(parent) => dir = parent,
                None => return Ok(None),
            }
        }
        let stat = rustix::fs::statvfs(dir).map_err(|e| SourceError::Io {
            what: format!("cannot statvfs {}", dir.display()),
            source: e.into(),
        })?;
        Ok(Some(stat.f_bavail * stat.f_frsize))
    }

    /// The file's size; NOT_FOUND without the file, `None` without the directory (a plugin
    /// that does not hold this node's volumes, e.g. a central controller).
    fn node_size(&self, id: &VolumeId) -> Result<Option<u64>, SourceError> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        match self.get(id, &SourceContext::default())? {
            Some(volume) => Ok(Some(volume.capacity)),
            None => Err(SourceError::NotFound(id.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_get_expand_delete() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalSource::new(dir.path().join("vols"));
        let none = SourceContext::default();
        let a = VolumeId::parse("local:n:a").unwrap();
        let v = src.create(&a, 1 << 20, &none).unwrap();
        assert_eq!(v.capacity, 1 << 20);
        assert_eq!(src.create(&a, 1 << 20, &none).unwrap(), v);
        assert!(matches!(
            src.create(&a, 2 << 20, &none),
            Err(SourceError::Exists { capacity, .. }) if capacity == 1 << 20
        ));
        assert_eq!(src.expand(&a, 4 << 20, &none).unwrap(), 4 << 20);
        assert_eq!(src.expand(&a, 1 << 20, &none).unwrap(), 4 << 20);
        assert_eq!(src.get(&a, &none).unwrap().unwrap().capacity, 4 << 20);
        assert_eq!(src.node_size(&a).unwrap(), Some(4 << 20));
        assert_eq!(src.stage(&a, &none).unwrap().capacity, 4 << 20);
        src.delete(&a, &none).unwrap();
        src.delete(&a, &none).unwrap();
        assert!(src.get(&a, &none).unwrap().is_none());
        assert!(matches!(src.node_size(&a), Err(SourceError::NotFound(_))));
        let elsewhere = LocalSource::new(dir.path().join("not-here"));
        assert_eq!(elsewhere.node_size(&a).unwrap(), None);
        assert!(matches!(
            src.expand(&a, 1, &none),
            Err(SourceError::NotFound(_))
        ));
        assert!(matches!(
            src.stage(&a, &none),
            Err(SourceError::NotFound(_))
        ));
        let bad = SourceContext::new(
            [("format".to_string(), "vmdk".to_string())].into(),
            Default::default(),
        );
        let b = VolumeId::parse("local:n:b").unwrap();
        assert!(matches!(
            src.create(&b, 1 << 20, &bad),
            Err(SourceError::Invalid(_))
        ));
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn snapshots_are_sparse_copies_and_volumes_are_made_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalSource::new(dir.path().join("vols"));
        let none = SourceContext::default();
        let a = VolumeId::parse("local:n:a").unwrap();
        let volume = src.create(&a, 8 << 20, &none).unwrap();
        let image = std::fs::OpenOptions::new()
            .write(true)
            .open(&volume.image)
            .unwrap();
        image.write_all_at(b"before", 4 << 20).unwrap();
        let snap = SnapshotId::parse("local:n:a@s1").unwrap();
        let taken = src.create_snapshot(&snap, &none).unwrap();
        assert_eq!(taken.size, 8 << 20);
        // Again: the same snapshot; a write after it is not in it.
        image.write_all_at(b"after!", 4 << 20).unwrap();
        assert_eq!(src.create_snapshot(&snap, &none).unwrap(), taken);
        let path = dir.path().join("vols/snapshots/s1/a.img");
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
        // The name is taken: a snapshot s1 of another volume is ALREADY_EXISTS.
        let b = VolumeId::parse("local:n:b").unwrap();
        src.create(&b, 1 << 20, &none).unwrap();
        let other = SnapshotId::parse("local:n:b@s1").unwrap();
        assert!(matches!(
            src.create_snapshot(&other, &none),
            Err(SourceError::SnapshotExists { volume, .. }) if volume == "a"
        ));
        let missing = SnapshotId::parse("local:n:nope@s2").unwrap();
        assert!(matches!(
            src.create_snapshot(&missing, &none),
            Err(SourceError::NotFound(_))
        ));
        // A volume from it: its data, grown; again: the same; another size: ALREADY_EXISTS.
        let c = VolumeId::parse("local:n:c").unwrap();
        let made = src
            .create_from_snapshot(&c, &snap, 16 << 20, &none)
            .unwrap();
        assert_eq!(made.capacity, 16 << 20);
        let mut buf = [0u8; 6];
        std::fs::File::open(&made.image)
            .unwrap()
            .read_exact_at(&mut buf, 4 << 20)
            .unwrap();
        assert_eq!(&buf, b"before");
        assert_eq!(
            src.create_from_snapshot(&c, &snap, 16 << 20, &none)
                .unwrap(),
            made
        );
        assert!(matches!(
            src.create_from_snapshot(&c, &snap, 32 << 20, &none),
            Err(SourceError::Exists { .. })
        ));
        let d = VolumeId::parse("local:n:d").unwrap();
        assert!(matches!(
            src.create_from_snapshot(&d, &missing, 16 << 20, &none),
            Err(SourceError::SnapshotNotFound(_))
        ));
        // The source volume can go; the snapshot stays. Deleting it twice is fine.
        src.delete(&a, &none).unwrap();
        assert!(src.get_snapshot(&snap, &none).unwrap().is_some());
        src.delete_snapshot(&snap, &none).unwrap();
        src.delete_snapshot(&snap, &none).unwrap();
        assert!(src.get_snapshot(&snap, &none).unwrap().is_none());
        assert!(!dir.path().join("vols/snapshots").exists());
        // The name is free again.
        src.create_snapshot(&other, &none).unwrap();
    }
}
