//! Volume ids, names and sizes.
//!
//! A volume id is `SOURCE:LOCATION:NAME`: the source that holds it (`local`, `rbd`), where in
//! that source it is, and its name (the CO's name, which must be letters, digits, `.`, `_` or
//! `-`, at most 128 bytes, not starting with `.`). The location is the node a node-local
//! volume lives on (`local:node-a:pvc-1`) or, for `rbd`, the cluster id and the pool
//! (`rbd:ceph-a/kube:pvc-1`): what DeleteVolume and ControllerExpandVolume, which get only
//! the id and the secrets, need to find the volume again.

use std::fmt;

/// The largest volume name taken (it becomes a file name and a VDUSE device name).
pub const MAX_NAME: usize = 128;

/// A parsed volume id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    /// The source holding the volume (`local`).
    pub source: String,
    /// Where it is: its node (`local`), `CLUSTER/POOL` (`rbd`).
    pub location: String,
    /// Its name.
    pub name: String,
}

/// Why a volume id or name is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not `SOURCE:LOCATION:NAME`.
    #[error("volume id {0:?} is not one of this plugin's (SOURCE:LOCATION:NAME)")]
    Malformed(String),
    /// Not `SOURCE:LOCATION:VOLUME@SNAPSHOT`.
    #[error("snapshot id {0:?} is not one of this plugin's (SOURCE:LOCATION:VOLUME@SNAPSHOT)")]
    MalformedSnapshot(String),
    /// The name has characters or a length we do not take.
    #[error(
        "volume name {0:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadName(String),
}

/// Check a volume name (it names a file and a VDUSE device).
pub fn check_name(name: &str) -> Result<(), IdError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(IdError::BadName(name.to_string()))
    }
}

impl VolumeId {
    /// Parse `SOURCE:LOCATION:NAME`.
    pub fn parse(id: &str) -> Result<Self, IdError> {
        let mut parts = id.splitn(3, ':');
        let (Some(source), Some(location), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(IdError::Malformed(id.to_string()));
        };
        if source.is_empty()
            || !source.chars().all(|c| c.is_ascii_lowercase())
            || location.contains(['+', '\0'])
            || location.split('/').any(|part| part == "..")
            || check_name(name).is_err()
        {
            return Err(IdError::Malformed(id.to_string()));
        }
        Ok(Self {
            source: source.to_string(),
            location: location.to_string(),
            name: name.to_string(),
        })
    }

    /// The daemon's device name for this volume (also its VDUSE name).
    pub fn device_name(&self) -> String {
        format!("csi-{}-{}", self.source, self.name)
    }

    /// A file name for the plugin's state of this volume (`SOURCE_LOCATION_NAME.json`, a `/`
    /// of the location written `+`).
    pub fn state_file(&self) -> String {
        format!(
            "{}_{}_{}.json",
            self.source,
            self.location.replace('/', "+"),
            self.name
        )
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.source, self.location, self.name)
    }
}

/// Sizes are whole MiB when rounding up, whole 4 KiB blocks when a limit caps them.
pub const MIB: u64 = 1 << 20;
/// The size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Why a capacity range cannot be met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Negative bytes.
    #[error("capacity range: required_bytes and limit_bytes must not be negative")]
    Negative,
    /// Nothing fits between required and limit.
    #[error("capacity range: no size of whole 4 KiB blocks is at least {required} and at most {limit} bytes")]
    Unsatisfiable {
        /// required_bytes.
        required: u64,
        /// limit_bytes.
        limit: u64,
    },
}

/// The size to create for `required`/`limit` bytes (0: unset): `required` rounded up to a
/// MiB, capped by `limit` (rounded down to 4 KiB); [`DEFAULT_SIZE`] when nothing is asked.
pub fn size_for(required: i64, limit: i64) -> Result<u64, RangeError> {
    if required < 0 || limit < 0 {
        return Err(RangeError::Negative);
    }
    let (required, limit) = (required as u64, limit as u64);
    let wanted = if required == 0 {
        DEFAULT_SIZE
    } else {
        required.div_ceil(MIB) * MIB
    };
    let size = if limit != 0 && wanted > limit {
        limit / 4096 * 4096
    } else {
        wanted
    };
    if size < required || size == 0 {
        return Err(RangeError::Unsatisfiable { required, limit });
    }
    Ok(size)
}

/// Whether an existing volume of `size` bytes satisfies `required`/`limit`.
pub fn fits(size: u64, required: i64, limit: i64) -> bool {
    size >= required.max(0) as u64 && (limit <= 0 || size <= limit as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        let id = VolumeId::parse("local:node-a:pvc-1234").unwrap();
        assert_eq!(id.location, "node-a");
        assert_eq!(id.to_string(), "local:node-a:pvc-1234");
        assert_eq!(id.device_name(), "csi-local-pvc-1234");
        // The state file of a local volume keeps the name it always had.
        assert_eq!(id.state_file(), "local_node-a_pvc-1234.json");
        let id = VolumeId::parse("rbd:ceph-a/kube:pvc-1234").unwrap();
        assert_eq!(
            (id.source.as_str(), id.location.as_str(), id.name.as_str()),
            ("rbd", "ceph-a/kube", "pvc-1234")
        );
        assert_eq!(id.to_string(), "rbd:ceph-a/kube:pvc-1234");
        assert_eq!(id.state_file(), "rbd_ceph-a+kube_pvc-1234.json");
        assert_eq!(id.device_name(), "csi-rbd-pvc-1234");
        for bad in [
            "",
            "local",
            "local:n",
            "local:n:",
            "local:n:../x",
            ":n:x",
            "local:n:a/b",
            "Local:n:x",
            "rbd:a/../b:x",
            "rbd:a+b:x",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad}");
        }
        assert!(check_name(&"a".repeat(MAX_NAME + 1)).is_err());
        assert!(check_name(".hidden").is_err());
    }

    #[test]
    fn sizes_follow_the_range() {
        assert_eq!(size_for(0, 0), Ok(DEFAULT_SIZE));
        assert_eq!(size_for(1, 0), Ok(MIB));
        assert_eq!(size_for(MIB as i64 + 1, 0), Ok(2 * MIB));
        // A limit under the rounded size caps it at whole 4 KiB blocks.
        assert_eq!(size_for(5000, 10000), Ok(8192));
        assert_eq!(size_for(0, 10000), Ok(8192));
        assert!(matches!(
            size_for(5000, 6000),
            Err(RangeError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            size_for(10, 5),
            Err(RangeError::Unsatisfiable { .. })
        ));
        assert_eq!(size_for(-1, 0), Err(RangeError::Negative));
        assert!(fits(MIB, MIB as i64, 0));
        assert!(!fits(MIB, 2 * MIB as i64, 0));
        assert!(!fits(2 * MIB, 0, MIB as i64));
    }
}
