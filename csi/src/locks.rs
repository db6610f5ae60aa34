//! One call at a time per volume: a second call for a volume that is busy gets ABORTED (the
//! spec's answer for "an operation for this volume is in progress"; the CO retries).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// The volumes with a call in progress.
#[derive(Debug, Clone, Default)]
pub struct VolumeLocks(Arc<Mutex<HashSet<String>>>);

/// Held while a call works on a volume.
#[derive(Debug)]
pub struct VolumeGuard {
    locks: VolumeLocks,
    key: String,
}

impl VolumeLocks {
    /// Take `key` (a volume id or name), or ABORTED if another call holds it.
    pub fn lock(&self, key: &str) -> Result<VolumeGuard, Status> {
        let mut busy = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on volume {key} is in progress: retry when it is done"
            )));
        }
        Ok(VolumeGuard {
            locks: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let mut busy = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_caller_is_aborted_until_the_first_is_done() {
        let locks = VolumeLocks::default();
        let first = locks.lock("v").unwrap();
        assert_eq!(locks.lock("v").unwrap_err().code(), tonic::Code::Aborted);
        let _other = locks.lock("w").unwrap();
        drop(first);
        locks.lock("v").unwrap();
    }
}
