//! `local`: each volume is a sparse raw image file `DIR/NAME.img` on the node (`--local-dir`),
//! served by the node's daemon.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{SourceError, Volume, VolumeSource};

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
        name: &str,
        bytes: u64,
        params: &HashMap<String, String>,
    ) -> Result<Volume, SourceError> {
        for (key, value) in params {
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
        if let Some(existing) = self.get(name)? {
            if existing.capacity == bytes {
                return Ok(existing);
            }
            return Err(SourceError::Exists {
                name: name.to_string(),
                capacity: existing.capacity,
            });
        }
        if let Some(free) = self.available()? {
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

    fn get(&self, name: &str) -> Result<Option<Volume>, SourceError> {
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

    fn delete(&self, name: &str) -> Result<(), SourceError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SourceError::Io {
                what: format!("cannot delete {}", path.display()),
                source: e,
            }),
        }
    }

    fn expand(&self, name: &str, bytes: u64) -> Result<u64, SourceError> {
        let Some(volume) = self.get(name)? else {
            return Err(SourceError::NotFound(name.to_string()));
        };
        if volume.capacity >= bytes {
            return Ok(volume.capacity);
        }
        let path = self.path(name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(bytes).and_then(|()| f.sync_all()))
            .map_err(Self::io(format!("cannot grow {}", path.display())))?;
        Ok(bytes)
    }

    fn available(&self) -> Result<Option<u64>, SourceError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_get_expand_delete() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalSource::new(dir.path().join("vols"));
        let none = HashMap::new();
        let v = src.create("a", 1 << 20, &none).unwrap();
        assert_eq!(v.capacity, 1 << 20);
        assert_eq!(src.create("a", 1 << 20, &none).unwrap(), v);
        assert!(matches!(
            src.create("a", 2 << 20, &none),
            Err(SourceError::Exists { capacity, .. }) if capacity == 1 << 20
        ));
        assert_eq!(src.expand("a", 4 << 20).unwrap(), 4 << 20);
        assert_eq!(src.expand("a", 1 << 20).unwrap(), 4 << 20);
        assert_eq!(src.get("a").unwrap().unwrap().capacity, 4 << 20);
        src.delete("a").unwrap();
        src.delete("a").unwrap();
        assert!(src.get("a").unwrap().is_none());
        assert!(matches!(src.expand("a", 1), Err(SourceError::NotFound(_))));
        let bad: HashMap<_, _> = [("format".to_string(), "vmdk".to_string())].into();
        assert!(matches!(
            src.create("b", 1 << 20, &bad),
            Err(SourceError::Invalid(_))
        ));
    }
}
