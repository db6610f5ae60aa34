//! Where volumes live: one [`VolumeSource`] per kind of storage (`local` image files; `rbd`
//! later), each creating, finding, growing and deleting volumes by name, and telling the
//! daemon which image serves one.

pub mod local;

use std::collections::HashMap;

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
    /// The request cannot be honoured (a parameter, shrinking).
    #[error("{0}")]
    Invalid(String),
    /// Not enough space.
    #[error("{0}")]
    Exhausted(String),
    /// Storage failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// One kind of storage volumes are made of.
pub trait VolumeSource: Send + Sync + std::fmt::Debug {
    /// The source's name in volume ids (`local`).
    fn kind(&self) -> &'static str;

    /// Whether its volumes live on one node (the topology key names it).
    fn node_local(&self) -> bool;

    /// Create `name` with `bytes` (already rounded), or return the existing volume if its size
    /// is `bytes`; [`SourceError::Exists`] if it exists with another size. `params` are the
    /// StorageClass parameters.
    fn create(
        &self,
        name: &str,
        bytes: u64,
        params: &HashMap<String, String>,
    ) -> Result<Volume, SourceError>;

    /// The volume `name`, if it exists.
    fn get(&self, name: &str) -> Result<Option<Volume>, SourceError>;

    /// Delete `name`; absent already is success.
    fn delete(&self, name: &str) -> Result<(), SourceError>;

    /// Grow `name` to at least `bytes`; answers the new size (never shrinks).
    fn expand(&self, name: &str, bytes: u64) -> Result<u64, SourceError>;

    /// Bytes free for new volumes, if the source knows.
    fn available(&self) -> Result<Option<u64>, SourceError>;
}
