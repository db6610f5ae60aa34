//! The seam between a virtio device and the transports that serve it.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::{Chain, GuestMem};

/// Errors a device reports to the transport serving it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver tried to write a configuration field that is read-only for this device.
    #[error("the configuration space of this device is read-only at offset {offset}")]
    ConfigReadOnly {
        /// Offset of the refused write.
        offset: u32,
    },
    /// A queue handler could not be created (e.g. the storage backend's I/O context).
    #[error("cannot set up queue {queue}: {reason}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What failed.
        reason: String,
    },
    /// Making the device's state durable at stop failed (e.g. the final flush).
    #[error("stopping the device: {0}")]
    Stop(#[source] std::io::Error),
}

/// Tells a driver that the device's configuration space changed (a config-change
/// interrupt). The transport serving a device registers one with it
/// ([`Device::set_config_notifier`]); the device calls it after changing what
/// [`Device::config_space`] returns (e.g. virtio-blk's capacity after a resize).
pub trait ConfigNotifier: Send + Sync {
    /// Deliver the notification; `config` is the new configuration space (a transport whose
    /// kernel keeps a copy of it, VDUSE, updates that copy first). An error says why the
    /// driver could not be told (e.g. no driver connected, or one that cannot hear it) and
    /// what to do.
    fn config_changed(&self, config: &[u8]) -> Result<(), String>;
}

/// Errors of a queue handler that stop the queue (not a refused request: those are answered
/// in the used ring).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

/// A virtio device that a transport (VDUSE, vhost-user, ...) serves.
///
/// The device is shared by the transport's threads; per-queue state lives in the
/// [`QueueHandler`]s it hands out.
pub trait Device: Send + Sync {
    /// The virtio device id (`virtio_bindings::virtio_ids::VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver, including the ring features the core implements
    /// ([`crate::F_VERSION_1`], [`crate::F_EVENT_IDX`], [`crate::F_INDIRECT_DESC`]) where the
    /// device wants them. Transport features (e.g. ACCESS_PLATFORM) are added by transports.
    fn features(&self) -> u64;
    /// The configuration space as the driver reads it.
    fn config_space(&self) -> Vec<u8>;
    /// `len` bytes of the configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u32, len: u32) -> Vec<u8> {
        let space = self.config_space();
        (0..len)
            .map(|i| {
                let at = u64::from(offset) + u64::from(i);
                usize::try_from(at)
                    .ok()
                    .and_then(|at| space.get(at).copied())
                    .unwrap_or(0)
            })
            .collect()
    }
    /// A driver write to the configuration space. The default refuses every write.
    fn write_config(&self, offset: u32, _data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigReadOnly { offset })
    }
    /// Number of virtqueues.
    fn num_queues(&self) -> u16;
    /// Largest queue size the driver may choose (a power of two).
    fn max_queue_size(&self) -> u16;
    /// The request handler of queue `index` (called once per queue when a transport starts).
    fn queue_handler(&self, index: u16) -> Result<Box<dyn QueueHandler>, DeviceError>;
    /// Called once every queue has been drained, when the device stops serving (clean
    /// shutdown or removal): make its state durable. The default does nothing.
    fn stop(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The transport serving the device registers how to tell the driver that the
    /// configuration space changed (and `None` when it stops serving). The default ignores
    /// it: a device whose configuration never changes needs none.
    fn set_config_notifier(&self, _notifier: Option<Arc<dyn ConfigNotifier>>) {}
}

/// What [`QueueHandler::start`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished at once (or refused): publish a used entry of `used_len` bytes now.
    Done {
        /// Bytes the device wrote into the chain's writable buffers.
        used_len: u32,
    },
    /// Started; it completes later through [`QueueHandler::reap`].
    Started,
}

/// A request that finished: the used entry to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Head descriptor index of the request.
    pub head: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub used_len: u32,
}

/// Executes the requests of one virtqueue; owned by that queue's thread.
///
/// The [`crate::QueueService`] calls [`Self::start`] for each chain it takes off the avail ring
/// while [`Self::can_start`] is true, then [`Self::submit`] once per batch, and collects
/// finished requests with [`Self::reap`] (right after submitting for handlers without a
/// [`Self::completion_fd`], otherwise when that fd becomes readable).
pub trait QueueHandler: Send {
    /// Whether one more request can be started now (e.g. a free I/O slot). The default,
    /// always, fits handlers that finish every request in [`Self::start`].
    fn can_start(&self) -> bool {
        true
    }
    /// Start the request in `chain` (every field of it is hostile input). Requests the device
    /// refuses are answered in the chain itself and reported as [`Outcome::Done`].
    fn start(&mut self, chain: &Chain, mem: &Arc<GuestMem>) -> Outcome;
    /// Hand the requests started since the last call to the backend (one system call for a
    /// batch).
    fn submit(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
    /// A descriptor that becomes readable when completions are ready, for handlers whose
    /// requests finish asynchronously.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// The features the driver accepted (a subset of [`Device::features`]), told before the
    /// queue first runs and again whenever the driver sets them. The default ignores them;
    /// e.g. virtio-net's rx path depends on whether MRG_RXBUF was accepted.
    fn driver_features(&mut self, _acked: u64) {}
    /// Clear the readiness of [`Self::completion_fd`] (called when woken by it).
    fn ack_completion_event(&mut self) {}
    /// Move requests that have finished into `out`, without blocking.
    fn reap(&mut self, _out: &mut Vec<Completed>) {}
    /// Block until at least one started request finished, or none is in flight.
    fn wait(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
    /// Requests started and not yet reaped.
    fn in_flight(&self) -> usize {
        0
    }
    /// When the handler holds work back for a reason that passes with time (a rate limit:
    /// [`Self::can_start`] is false or a started request waits for its turn), how long until
    /// it should be served again. The transport then wakes the queue with
    /// [`crate::Event::Timer`] even if nothing else happens ([`crate::QueueService::wake_after`]);
    /// the handler sends what may go in [`Self::submit`]. `None` (the default): nothing waits
    /// for time.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}
