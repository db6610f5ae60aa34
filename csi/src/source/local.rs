//! `local`: each volume is a sparse raw image file `DIR/NAME.img` on the node (`--local-dir`),
//! served by the node's daemon.

use std::path::PathBuf;

use super::{SourceContext, SourceError, Volume, VolumeSource};
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
        if let Some(existing) = self.get(id, ctx)? {
            if existing.capacity == bytes {
                return Ok(existing);
            }
            return Err(SourceError::Exists {
                name: name.to_string(),
                capacity: existing.capacity,
            });
        }
        if let Some(free) = self.available(ctx)? {
            // Sparse, but a volume that could never be filled is refused up front.
            if bytes > free {
                return Err(SourceError::Exhausted(format!(
                    "{} has {free} bytes free, less than the {bytes} asked for",
                    self.dir.display()
                )));
            }
        }
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
