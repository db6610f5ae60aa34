//! CSI status codes for the plugin's errors.

use tonic::Status;

use crate::daemon::DaemonError;
use crate::source::SourceError;
use crate::volume::IdError;

/// INVALID_ARGUMENT when `value` is empty.
pub fn required(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// A source's error as the spec's code.
pub fn source(e: SourceError) -> Status {
    match &e {
        SourceError::NotFound(_) | SourceError::SnapshotNotFound(_) => {
            Status::not_found(e.to_string())
        }
        SourceError::Exists { .. } | SourceError::SnapshotExists { .. } => {
            Status::already_exists(e.to_string())
        }
        SourceError::Invalid(_) => Status::invalid_argument(e.to_string()),
        SourceError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        SourceError::Unavailable(_) => Status::unavailable(e.to_string()),
        SourceError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
        SourceError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
        SourceError::Busy(_) => Status::failed_precondition(e.to_string()),
        SourceError::Failed(_) | SourceError::Io { .. } => Status::internal(e.to_string()),
    }
}

/// A volume id that is not ours: NOT_FOUND (the spec's answer for an unknown volume).
pub fn id(e: IdError) -> Status {
    Status::not_found(e.to_string())
}

/// The daemon failed or refused: UNAVAILABLE when unreachable (the CO retries), INTERNAL
/// otherwise.
pub fn daemon(e: DaemonError) -> Status {
    match &e {
        DaemonError::Unreachable { .. } | DaemonError::TimedOut { .. } => {
            Status::unavailable(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}
