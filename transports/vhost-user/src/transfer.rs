//! Sending a handover ([`HandoverState`] and its descriptors) to another process over a unix
//! socket: an 8-byte header (JSON length, descriptor count, little endian u32 each), the
//! state as JSON, then the descriptors with `SCM_RIGHTS`, at most 32 per one-byte message.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::wire::recv_with_files;
use crate::{HandoverError, HandoverState};

/// Largest state accepted (a full memory table and every ring fit in far less).
const MAX_STATE: usize = 1 << 20;
/// Most descriptors accepted.
const MAX_FDS: usize = 4096;

fn transfer(e: impl std::fmt::Display) -> HandoverError {
    HandoverError::Transfer(e.to_string())
}

/// Send `state` and `fds` (as [`crate::Export`] gives them) on `sock`.
pub fn send_handover(
    sock: &UnixStream,
    state: &HandoverState,
    fds: &[OwnedFd],
) -> Result<(), HandoverError> {
    let json = serde_json::to_vec(state).map_err(transfer)?;
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    let mut w = sock;
    w.write_all(&header).map_err(transfer)?;
    w.write_all(&json).map_err(transfer)?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    for chunk in raw.chunks(MAX_ATTACHED_FD_ENTRIES) {
        let sent = sock
            .send_with_fds(&[&[0u8][..]], chunk)
            .map_err(|e| transfer(format!("sending descriptors: {e}")))?;
        if sent != 1 {
            return Err(transfer("sending descriptors: short write"));
        }
    }
    Ok(())
}

/// Receive what [`send_handover`] sent on `sock`.
pub fn receive_handover(sock: &UnixStream) -> Result<(HandoverState, Vec<OwnedFd>), HandoverError> {
    let mut r = sock;
    let mut header = [0u8; 8];
    r.read_exact(&mut header).map_err(transfer)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_STATE || count > MAX_FDS {
        return Err(transfer(format!(
            "a state of {len} bytes with {count} descriptors is larger than any handover"
        )));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json).map_err(transfer)?;
    let state: HandoverState = serde_json::from_slice(&json).map_err(transfer)?;
    let mut files = Vec::with_capacity(count);
    while files.len() < count {
        let mut byte = [0u8; 1];
        let n = recv_with_files(sock, &mut byte, &mut files)
            .map_err(|e| transfer(format!("receiving descriptors: {e}")))?;
        if n == 0 {
            return Err(transfer(format!(
                "the sender closed the socket after {} of {count} descriptors",
                files.len()
            )));
        }
    }
    if files.len() != count {
        return Err(transfer(format!(
            "{} descriptors received, {count} announced",
            files.len()
        )));
    }
    Ok((state, files.into_iter().map(OwnedFd::from).collect()))
}
