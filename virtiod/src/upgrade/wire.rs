//! The hand-over channel: a `SOCK_SEQPACKET` socket pair between the old and the new
//! process, one JSON message per packet, descriptors attached with `SCM_RIGHTS` (at most
//! [`FDS_PER_PACKET`] per packet: a message with more sends the rest in `Fds` packets).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::net::{
    recvmsg, sendmsg, socketpair, sockopt, AddressFamily, RecvAncillaryBuffer,
    RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

/// The kernel takes at most 253 descriptors per message (SCM_MAX_FD).
pub const FDS_PER_PACKET: usize = 250;
/// Largest message (the device descriptions of a few thousand devices).
const MAX_PACKET: usize = 1 << 20;
/// Version of the hand-over messages: a new binary refuses an old process that speaks another.
pub const VERSION: u32 = 2;

/// One device as the old process serves it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Its description (a JSON object `virtiod ctl add` takes).
    pub spec: String,
}

/// A device that failed in the old process, listed again by the new one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedEntry {
    /// Its description.
    pub spec: String,
    /// Why it is not up.
    pub reason: String,
}

/// What one device's transport hands over, in the order of [`Message::Handover`]'s devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// The device name.
    pub name: String,
    /// Transport state (serializable; the descriptors travel beside it).
    pub state: serde_json::Value,
    /// How many of the hand-over's descriptors are this device's.
    pub fds: usize,
}

/// A hand-over message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum Message {
    /// Old → new: what to serve. The new process opens everything slow (images, backends).
    Hello {
        /// [`VERSION`].
        version: u32,
        /// Devices serving now.
        devices: Vec<DeviceEntry>,
        /// Devices that failed.
        failed: Vec<FailedEntry>,
        /// The devices file as the old process read it at start-up (its `[daemon]` settings:
        /// the new process may not be allowed to read the file itself under Landlock).
        #[serde(default)]
        config: String,
    },
    /// New → old: everything is open; hand the devices over.
    Ready,
    /// New → old: cannot take over (the old process keeps serving).
    Refused {
        /// What failed.
        error: String,
    },
    /// Old → new: the devices are quiesced (vhost-user ones frozen with their frontend
    /// connected); their state, then `fds` descriptors (devices' first, in order, then the
    /// control socket's and the metrics endpoint's listeners).
    Handover {
        /// Per device.
        devices: Vec<DeviceState>,
        /// Whether the control socket's listener follows the devices' descriptors.
        control: bool,
        /// Whether the metrics endpoint's listener follows.
        metrics: bool,
        /// Descriptors in all.
        fds: usize,
    },
    /// More descriptors of the message before.
    Fds,
    /// New → old: every device is taken over, vhost-user connections are imported but not
    /// served: let go of them.
    Imported,
    /// Old → new: this process let go of every vhost-user connection; serve them.
    Go,
    /// New → old: serving every device; the old process may exit.
    Serving {
        /// The new process.
        pid: u32,
    },
    /// New → old: taking over failed (the old process serves again).
    Failed {
        /// What failed.
        error: String,
    },
}

/// One end of the hand-over channel.
pub struct Channel {
    sock: OwnedFd,
}

/// A connected pair: this process's end, and the end for the new process (inheritable: not
/// close-on-exec; close it here once the child has started).
pub fn pair() -> anyhow::Result<(Channel, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .context("cannot create the hand-over socket pair")?;
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())
        .context("cannot make the hand-over socket inheritable")?;
    Ok((Channel { sock: ours }, theirs))
}

impl Channel {
    /// The channel on an inherited descriptor (`--takeover-fd N`).
    pub fn from_fd(sock: OwnedFd) -> Self {
        let _ = rustix::io::fcntl_setfd(&sock, rustix::io::FdFlags::CLOEXEC);
        Self { sock }
    }

    /// Send `msg` with `fds` (in packets of at most [`FDS_PER_PACKET`]).
    pub fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
        let mut chunks = fds.chunks(FDS_PER_PACKET);
        self.packet(msg, chunks.next().unwrap_or(&[]))?;
        for chunk in chunks {
            self.packet(&Message::Fds, chunk)?;
        }
        Ok(())
    }

    fn packet(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(msg)?;
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            anyhow::bail!("hand-over: no room for {} descriptors", fds.len());
        }
        let sent = sendmsg(
            &self.sock,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .context("hand-over: sending to the other process failed (did it exit?)")?;
        anyhow::ensure!(sent == bytes.len(), "hand-over: message cut short");
        Ok(())
    }

    /// Receive the next message and its descriptors (`expect_fds` in all, gathered from the
    /// `Fds` packets that follow), waiting until `deadline`.
    pub fn recv(
        &self,
        deadline: Instant,
        expect_fds: impl Fn(&Message) -> usize,
    ) -> anyhow::Result<(Message, Vec<OwnedFd>)> {
        let (msg, mut fds) = self.packet_in(deadline)?;
        let want = expect_fds(&msg);
        while fds.len() < want {
            let (more, extra) = self.packet_in(deadline)?;
            anyhow::ensure!(
                matches!(more, Message::Fds) && !extra.is_empty(),
                "hand-over: expected {want} descriptors, got {}",
                fds.len()
            );
            fds.extend(extra);
        }
        anyhow::ensure!(
            fds.len() == want,
            "hand-over: expected {want} descriptors, got {}",
            fds.len()
        );
        Ok((msg, fds))
    }

    fn packet_in(&self, deadline: Instant) -> anyhow::Result<(Message, Vec<OwnedFd>)> {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            !left.is_zero(),
            "hand-over: the other process did not answer in time"
        );
        // SO_RCVTIMEO of zero means "forever": wait at least a millisecond.
        let wait = left.max(Duration::from_millis(1));
        sockopt::set_socket_timeout(&self.sock, sockopt::Timeout::Recv, Some(wait))
            .context("hand-over: setting a receive timeout")?;
        let mut buf = vec![0u8; MAX_PACKET];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_PACKET))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            match recvmsg(
                &self.sock,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(got) => break got,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => {
                    anyhow::bail!("hand-over: the other process did not answer in time")
                }
                Err(e) => return Err(e).context("hand-over: receiving failed"),
            }
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        anyhow::ensure!(
            got.bytes > 0,
            "hand-over: the other process closed the channel (it exited)"
        );
        anyhow::ensure!(
            !got.flags.contains(rustix::net::ReturnFlags::TRUNC)
                && !got.flags.contains(rustix::net::ReturnFlags::CTRUNC),
            "hand-over: message cut short"
        );
        let msg = serde_json::from_slice(&buf[..got.bytes])
            .context("hand-over: unreadable message (are both binaries virtiod?)")?;
        Ok((msg, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    #[test]
    fn messages_carry_hundreds_of_descriptors_in_order() {
        let (a, b) = pair().unwrap();
        let b = Channel::from_fd(b);
        let files: Vec<std::fs::File> = (0..600).map(sized_file).collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        let msg = Message::Handover {
            devices: Vec::new(),
            control: false,
            metrics: false,
            fds: fds.len(),
        };
        a.send(&msg, &fds).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (got, received) = b
            .recv(deadline, |m| match m {
                Message::Handover { fds, .. } => *fds,
                _ => 0,
            })
            .unwrap();
        assert!(matches!(got, Message::Handover { fds: 600, .. }));
        assert_eq!(received.len(), 600);
        // Same open files, in order: each carries its index as its length.
        for (i, fd) in received.into_iter().enumerate() {
            let raw = fd.as_raw_fd();
            let len = std::fs::File::from(fd).metadata().unwrap().len();
            assert_eq!(len, i as u64, "descriptor {i} (fd {raw})");
        }
    }

    #[test]
    fn a_closed_or_silent_peer_is_an_error_not_a_hang() {
        let (a, b) = pair().unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        let err = a.recv(deadline, |_| 0).unwrap_err().to_string();
        assert!(err.contains("in time"), "{err}");
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = a.recv(deadline, |_| 0).unwrap_err().to_string();
        assert!(err.contains("closed the channel"), "{err}");
    }

    /// An unnamed file of `len` bytes: nothing to clean up.
    fn sized_file(len: u64) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(std::env::temp_dir())
            .unwrap();
        file.set_len(len).unwrap();
        file
    }
}
