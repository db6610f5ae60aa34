//! A scratch directory for a test, removed when dropped.

use std::path::{Path, PathBuf};

/// A directory under the system's temporary directory, named after the test and the process,
/// emptied at creation and removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `$TMPDIR/virtiod-{name}-{pid}`, created empty.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("virtiod-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create scratch directory {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// `file` inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
