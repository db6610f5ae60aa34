//! virtio-blk as a [`Device`] of the core: what transports serve.

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtiod_backend::Backend;
use virtiod_core::{Device, DeviceError, QueueHandler};

use crate::{BlkConfig, BlkQueue, Qos, Stats};

/// A virtio-blk device over a storage backend.
pub struct BlkDevice {
    cfg: Arc<BlkConfig>,
    backend: Arc<dyn Backend>,
    stats: Arc<Stats>,
    qos: Arc<Qos>,
}

impl BlkDevice {
    /// The device described by `cfg`, serving `backend`.
    pub fn new(cfg: BlkConfig, backend: Arc<dyn Backend>) -> Self {
        let stats = Arc::new(Stats::new(usize::from(cfg.num_queues)));
        Self {
            cfg: Arc::new(cfg),
            backend,
            stats,
            qos: Arc::new(Qos::unlimited()),
        }
    }

    /// The QoS limits shared by its queues (none at first; [`Qos::set`] changes them live).
    pub fn qos(&self) -> &Arc<Qos> {
        &self.qos
    }

    /// Request counters (per queue).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// What the driver sees.
    pub fn config(&self) -> &BlkConfig {
        &self.cfg
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
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
        self.cfg.config_space().to_vec()
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
        .map(|q| Box::new(q.with_qos(self.qos.clone())) as Box<dyn QueueHandler>)
        .map_err(|e| DeviceError::Queue {
            queue: index,
            reason: e.to_string(),
        })
    }

    /// Every queue is drained: make every completed write durable.
    fn stop(&self) -> Result<(), DeviceError> {
        self.backend.flush().map_err(DeviceError::Stop)
    }
}
