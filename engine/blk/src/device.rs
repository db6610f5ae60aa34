//! virtio-blk as a [`Device`] of the core: what transports serve.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtiod_backend::Backend;
use virtiod_core::{ConfigNotifier, Device, DeviceError, QueueHandler};

use crate::{BlkConfig, BlkQueue, Qos, Stats};

/// Why a resize was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The size is zero or not a whole number of 512-byte sectors.
    #[error("{0} bytes is not a usable disk size: give a non-zero multiple of 512 (e.g. 2G)")]
    BadSize(u64),
    /// A smaller size without the permission to shrink.
    #[error("{new} bytes is smaller than the current {current}: shrinking loses the data past the new end; ask for it explicitly (virtiod ctl resize --shrink)")]
    WouldShrink {
        /// The current capacity in bytes.
        current: u64,
        /// The capacity asked for.
        new: u64,
    },
    /// The backend could not take the new size.
    #[error(transparent)]
    Backend(#[from] virtiod_backend::Error),
}

/// What a resize did.
#[derive(Debug)]
pub struct Resized {
    /// The capacity before, in bytes.
    pub old: u64,
    /// The capacity now, in bytes.
    pub new: u64,
    /// Whether the driver was told (a config-change interrupt), or why not.
    pub notified: Result<(), String>,
}

/// A virtio-blk device over a storage backend.
pub struct BlkDevice {
    cfg: Arc<BlkConfig>,
    backend: Arc<dyn Backend>,
    stats: Arc<Stats>,
    qos: Arc<Qos>,
    /// Capacity in sectors now (it changes with [`Self::resize`]; queues follow it).
    capacity: Arc<AtomicU64>,
    notifier: Mutex<Option<Arc<dyn ConfigNotifier>>>,
    /// One resize at a time.
    resizing: Mutex<()>,
}

impl BlkDevice {
    /// The device described by `cfg`, serving `backend`.
    pub fn new(cfg: BlkConfig, backend: Arc<dyn Backend>) -> Self {
        let stats = Arc::new(Stats::new(usize::from(cfg.num_queues)));
        let capacity = Arc::new(AtomicU64::new(cfg.capacity_sectors));
        Self {
            cfg: Arc::new(cfg),
            backend,
            stats,
            qos: Arc::new(Qos::unlimited()),
            capacity,
            notifier: Mutex::new(None),
            resizing: Mutex::new(()),
        }
    }

    /// Request counters (per queue).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The QoS limits shared by its queues (none at first; [`Qos::set`] changes them live).
    pub fn qos(&self) -> &Arc<Qos> {
        &self.qos
    }

    /// What the driver saw when the device was created (the capacity now is
    /// [`Self::capacity`]).
    pub fn config(&self) -> &BlkConfig {
        &self.cfg
    }

    /// The capacity now, in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire) * 512
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn notifier(&self) -> MutexGuard<'_, Option<Arc<dyn ConfigNotifier>>> {
        self.notifier.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the capacity to `bytes` while serving: the backend first (when growing; after
    /// the queues refuse requests past the new end, when shrinking, which needs `shrink`),
    /// then the capacity the driver reads, then a config-change notification through the
    /// transport. A notification that cannot be delivered does not undo the resize: it is
    /// reported in [`Resized::notified`].
    pub fn resize(&self, bytes: u64, shrink: bool) -> Result<Resized, ResizeError> {
        if bytes == 0 || !bytes.is_multiple_of(512) {
            return Err(ResizeError::BadSize(bytes));
        }
        let _one = self.resizing.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.capacity();
        if bytes < old {
            if !shrink {
                return Err(ResizeError::WouldShrink {
                    current: old,
                    new: bytes,
                });
            }
            self.capacity.store(bytes / 512, Ordering::Release);
            if let Err(e) = self.backend.resize(bytes) {
                self.capacity.store(old / 512, Ordering::Release);
                return Err(e.into());
            }
        } else {
            self.backend.resize(bytes)?;
            self.capacity.store(bytes / 512, Ordering::Release);
        }
        let notified = match self.notifier().clone() {
            Some(n) => n.config_changed(&self.config_space()),
            None => Err("no transport serves the device".to_string()),
        };
        Ok(Resized {
            old,
            new: bytes,
            notified,
        })
    }
}

impl Device for BlkDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn config_space(&self) -> Vec<u8> {
        let mut space = self.cfg.config_space().to_vec();
        let sectors = self.capacity.load(Ordering::Acquire);
        space[0..8].copy_from_slice(&sectors.to_le_bytes());
        space
    }

    fn num_queues(&self) -> u16 {
        self.cfg.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn queue_handler(&self, index: u16) -> Result<Box<dyn QueueHandler>, DeviceError> {
        BlkQueue::new(
            self.cfg.clone(),
            self.backend.as_ref(),
            self.stats.clone(),
            usize::from(index),
        )
        .map(|q| {
            let q = q
                .with_qos(self.qos.clone())
                .with_capacity(self.capacity.clone());
            Box::new(q) as Box<dyn QueueHandler>
        })
        .map_err(|e| DeviceError::Queue {
            queue: index,
            reason: e.to_string(),
        })
    }

    /// Every queue is drained: make every completed write durable.
    fn stop(&self) -> Result<(), DeviceError> {
        self.backend.flush().map_err(DeviceError::Stop)
    }

    fn set_config_notifier(&self, notifier: Option<Arc<dyn ConfigNotifier>>) {
        *self.notifier() = notifier;
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
