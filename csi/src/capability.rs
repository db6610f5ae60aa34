//! Which volume capabilities the plugin takes: one node at a time (writer or reader), as a
//! block device or a mounted ext4 or xfs filesystem.

use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::AccessType;
use crate::proto::VolumeCapability;

/// The filesystems NodeStageVolume can make and mount; the first is the default.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];

/// How a volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A block device node.
    Block,
    /// A mounted filesystem of this type with these extra mount options.
    Mount {
        /// `ext4` or `xfs`.
        fs_type: String,
        /// Extra options (`-o`).
        flags: Vec<String>,
    },
}

/// A capability understood: its access type and whether it is read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Block or filesystem.
    pub access: Access,
    /// The access mode is a reader-only one.
    pub read_only: bool,
}

/// Check one capability; the error is a sentence for the CO.
pub fn check(cap: &VolumeCapability) -> Result<Checked, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode)
        .ok_or("volume capability without an access_mode")?;
    let read_only = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => false,
        Ok(Mode::SingleNodeReaderOnly) => true,
        _ => {
            return Err(format!(
                "access mode {} is not supported: a virtiod volume is on one node at a time \
                 (SINGLE_NODE_WRITER or SINGLE_NODE_READER_ONLY)",
                Mode::try_from(mode).map_or("UNKNOWN", |m| m.as_str_name())
            ))
        }
    };
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                FILESYSTEMS[0].to_string()
            } else {
                m.fs_type.clone()
            };
            if !FILESYSTEMS.contains(&fs_type.as_str()) {
                return Err(format!(
                    "fs_type {fs_type:?} is not supported: use ext4 or xfs"
                ));
            }
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
        None => return Err("volume capability without an access_type (block or mount)".into()),
    };
    Ok(Checked { access, read_only })
}

/// Check a list of capabilities (at least one).
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Checked>, String> {
    if caps.is_empty() {
        return Err("volume_capabilities is empty: give at least one".into());
    }
    caps.iter().map(check).collect()
}
