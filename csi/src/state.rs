//! The node's record of each staged volume: `STATE_DIR/volumes/SOURCE_NODE_NAME.json`, written
//! atomically (temporary file, fsync, rename, fsync of the directory), read back after a
//! restart of the plugin.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volume::VolumeId;

/// What the node did for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// The volume id.
    pub volume_id: String,
    /// The daemon's device serving it.
    pub device: String,
    /// The image that device serves.
    pub image: String,
    /// Where NodeStageVolume staged it.
    pub staging_path: PathBuf,
    /// Block volume (else a filesystem mounted at the staging path).
    pub block: bool,
    /// The filesystem (filesystem volumes).
    #[serde(default)]
    pub fs_type: Option<String>,
    /// Staged read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The device node once known (`/dev/vdX`).
    #[serde(default)]
    pub dev_node: Option<PathBuf>,
    /// Publish targets, and whether each is read-only.
    #[serde(default)]
    pub published: BTreeMap<PathBuf, bool>,
}

/// The directory of volume records.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Records under `state_dir/volumes`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("volumes"),
        }
    }

    fn path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(id.state_file())
    }

    /// The record of `id`, if any.
    pub fn load(&self, id: &VolumeId) -> std::io::Result<Option<VolumeState>> {
        let path = self.path(id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a volume record ({e}): delete it", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write the record of `id` atomically.
    pub fn save(&self, id: &VolumeId, state: &VolumeState) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(id);
        let tmp = self.dir.join(format!(".{}.tmp", id.state_file()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(state)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Delete the record of `id` (absent: nothing to do).
    pub fn remove(&self, id: &VolumeId) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => std::fs::File::open(&self.dir)?.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every readable record; unreadable ones are logged and skipped.
    pub fn all(&self) -> Vec<VolumeState> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|x| x != "json")
                || path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<VolumeState>(&b)) {
                Ok(Ok(state)) => out.push(state),
                Ok(Err(e)) => {
                    tracing::error!(record = %path.display(), "not a volume record ({e}): delete it")
                }
                Err(e) => tracing::error!(record = %path.display(), "cannot read: {e}"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let states = StateDir::new(dir.path());
        let id = VolumeId::parse("local:n:v").unwrap();
        assert_eq!(states.load(&id).unwrap(), None);
        let mut state = VolumeState {
            volume_id: id.to_string(),
            device: id.device_name(),
            image: "/x/v.img".into(),
            staging_path: "/stage".into(),
            block: false,
            fs_type: Some("ext4".into()),
            read_only: false,
            dev_node: None,
            published: BTreeMap::new(),
        };
        states.save(&id, &state).unwrap();
        state.published.insert("/pod/a".into(), true);
        states.save(&id, &state).unwrap();
        assert_eq!(states.load(&id).unwrap(), Some(state.clone()));
        assert_eq!(states.all(), vec![state]);
        states.remove(&id).unwrap();
        states.remove(&id).unwrap();
        assert!(states.all().is_empty());
    }
}
