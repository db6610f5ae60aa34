//! The backend request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`): the socket a frontend
//! hands over with `SET_BACKEND_REQ_FD`, on which the backend sends requests to the frontend.
//! virtiod sends one: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` when the device's configuration
//! space changed (virtio-blk: an online resize); QEMU then reads the config again
//! (`GET_CONFIG`) and interrupts its guest's driver.
//!
//! The `vhost` crate (0.18) keeps the socket inside its `Backend` type, which cannot send
//! this message, so the relay (`wire.rs`) keeps a duplicate of the descriptor as it passes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Weak};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtiod_core::ConfigNotifier;

use crate::VhostUserDevice;

/// `VHOST_USER_SET_BACKEND_REQ_FD` (frontend → backend).
pub(crate) const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (backend → frontend).
const CONFIG_CHANGE_MSG: u32 = 2;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// How long a frontend may take to acknowledge.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend channel of the current connection.
pub(crate) struct BackendChannel {
    sock: UnixStream,
    /// `REPLY_ACK` was negotiated: every request asks for an acknowledgement.
    reply_ack: bool,
    /// `CONFIG` was negotiated: the frontend reads the config space, so it may be told.
    config: bool,
}

impl BackendChannel {
    /// The channel over `sock`, with the protocol features the frontend acknowledged.
    pub fn new(sock: UnixStream, acked_protocol: u64) -> std::io::Result<Self> {
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let acked = VhostUserProtocolFeatures::from_bits_truncate(acked_protocol);
        Ok(Self {
            sock,
            reply_ack: acked.contains(VhostUserProtocolFeatures::REPLY_ACK),
            config: acked.contains(VhostUserProtocolFeatures::CONFIG),
        })
    }

    /// The channel's socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Send `CONFIG_CHANGE_MSG` (and wait for the acknowledgement with `REPLY_ACK`).
    pub fn config_changed(&mut self) -> Result<(), String> {
        if !self.config {
            return Err("the frontend did not negotiate VHOST_USER_PROTOCOL_F_CONFIG: it does not read the config space".into());
        }
        let flags = VERSION_1 | if self.reply_ack { NEED_REPLY } else { 0 };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        self.sock
            .write_all(&msg)
            .map_err(|e| format!("sending CONFIG_CHANGE_MSG to the frontend: {e}"))?;
        if !self.reply_ack {
            return Ok(());
        }
        let mut reply = [0u8; 20];
        self.sock.read_exact(&mut reply).map_err(|e| {
            format!("no acknowledgement of CONFIG_CHANGE_MSG from the frontend: {e}")
        })?;
        let word = |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().unwrap_or_default());
        let status = u64::from_le_bytes(reply[12..20].try_into().unwrap_or_default());
        if word(0) != CONFIG_CHANGE_MSG || word(4) & REPLY == 0 || word(8) != 8 {
            return Err("the frontend answered CONFIG_CHANGE_MSG with something else".into());
        }
        if status != 0 {
            return Err(format!(
                "the frontend failed to handle CONFIG_CHANGE_MSG (status {status})"
            ));
        }
        Ok(())
    }
}

/// Registered with the device by [`VhostUserDevice::new`]: a configuration change goes to
/// the connected frontend's backend channel.
pub(crate) struct ConfigChange(pub Weak<VhostUserDevice>);

impl ConfigNotifier for ConfigChange {
    fn config_changed(&self, _config: &[u8]) -> Result<(), String> {
        let dev: Arc<VhostUserDevice> = self.0.upgrade().ok_or("the device is being removed")?;
        let mut slot = dev.backend_channel();
        let Some(channel) = slot.as_mut() else {
            return Err("no frontend with a backend channel is connected (it must negotiate VHOST_USER_PROTOCOL_F_BACKEND_REQ, as QEMU does; libblkio does not): it sees the new size when it reads the config again".into());
        };
        let sent = channel.config_changed();
        if sent.is_err() {
            *slot = None; // a channel that failed once is not trusted again
        }
        sent
    }
}
