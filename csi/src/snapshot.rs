//! Snapshot ids.
//!
//! A snapshot id is the id of the volume it was taken of, `@`, and the snapshot's name (the
//! CO's name, the same rules as a volume name): `local:node-a:pvc-1@snapshot-2`,
//! `rbd:ceph-a/kube:pvc-1@snapshot-2`. DeleteSnapshot gets only the id and the secrets, so the
//! id carries the source, where the volume is and the volume itself. Names never contain `@`,
//! so the last `@` splits the id.

use std::fmt;

use crate::volume::{check_name, IdError, VolumeId};

/// A parsed snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    /// The volume the snapshot was taken of.
    pub volume: VolumeId,
    /// The snapshot's name.
    pub name: String,
}

impl SnapshotId {
    /// Parse `SOURCE:LOCATION:VOLUME@SNAPSHOT`.
    pub fn parse(id: &str) -> Result<Self, IdError> {
        let malformed = || IdError::MalformedSnapshot(id.to_string());
        let (volume, name) = id.rsplit_once('@').ok_or_else(malformed)?;
        check_name(name).map_err(|_| malformed())?;
        let volume = VolumeId::parse(volume).map_err(|_| malformed())?;
        Ok(Self {
            volume,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_round_trip_and_bad_ones_are_refused() {
        for text in [
            "local:node-a:pvc-1@snapshot-2",
            "rbd:ceph-a/kube:pvc-1@snapshot-2",
        ] {
            let id = SnapshotId::parse(text).unwrap();
            assert_eq!(id.to_string(), text);
            assert_eq!(id.volume.name, "pvc-1");
            assert_eq!(id.name, "snapshot-2");
        }
        let id = SnapshotId::parse("rbd:ceph-a/kube:pvc-1@snapshot-2").unwrap();
        assert_eq!(id.volume.location, "ceph-a/kube");
        assert_eq!(id.volume.source, "rbd");
        for bad in [
            "",
            "local:n:v",
            "local:n:v@",
            "local:n:@s",
            "@s",
            "local:n:v@s@t",
            "local:n:v@../s",
            "local:n:v@.s",
            "rbd:a/../b:v@s",
            "sanity-no-such-snapshot",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad}");
        }
    }
}
