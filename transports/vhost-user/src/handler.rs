//! The vhost-user request handler of one frontend connection: features, the memory table, ring
//! set-up and the in-flight region. The `vhost` crate parses and answers the messages
//! (`BackendReqHandler`); this type decides what they do to the device's queues.
//!
//! Written here rather than taken from `vhost-user-backend`: that library answers
//! `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD` itself with an error and has no hook for the moment a
//! ring starts, which is when in-flight requests must be recovered (docs/reliability.md).

use std::fs::File;
use std::sync::{Arc, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::fault::MapError;

use crate::inflight::InflightRegion;
use crate::queue::{lock, Mem, QueueState};
use crate::VhostUserDevice;

/// Memory slots offered with `CONFIGURE_MEM_SLOTS` (what QEMU's and rust-vmm's backends offer).
const MAX_MEM_SLOTS: u64 = 509;

/// One region of the frontend's memory table: where it is in the frontend's address space,
/// where in its file, and our mapping of it.
pub(crate) struct Mapping {
    pub frontend_va: u64,
    pub size: u64,
    pub gpa: u64,
    pub mmap_offset: u64,
    pub region: Arc<GuestRegionMmap<()>>,
}

/// The state of one frontend connection.
pub(crate) struct Connection {
    pub(crate) dev: Arc<VhostUserDevice>,
    pub(crate) acked_features: u64,
    pub(crate) acked_protocol: u64,
    /// What the `vhost` crate's request handler has seen (restored on a handover):
    /// `GET_FEATURES` was answered, `SET_FEATURES` / `SET_PROTOCOL_FEATURES` were received.
    pub(crate) features_read: bool,
    pub(crate) features_set: bool,
    pub(crate) protocol_set: bool,
    /// `SET_OWNER` received (and no `RESET_OWNER` since).
    pub(crate) owner: bool,
    pub(crate) mem: Arc<Mem>,
    pub(crate) mappings: Vec<Mapping>,
    pub(crate) inflight: Option<InflightRegion>,
    /// Written by the SIGBUS handler when the frontend shrinks memory it shared.
    pub(crate) poison_wake: Arc<EventFd>,
}

/// Protocol features offered with `GET_PROTOCOL_FEATURES`.
fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
}

fn io_err(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
}

impl Connection {
    /// The protocol features the frontend acknowledged.
    pub fn acked_protocol(&self) -> u64 {
        self.acked_protocol
    }

    pub fn new(dev: Arc<VhostUserDevice>, poison_wake: Arc<EventFd>) -> Self {
        Self {
            dev,
            acked_features: 0,
            acked_protocol: 0,
            features_read: false,
            features_set: false,
            protocol_set: false,
            owner: false,
            mem: Arc::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
            inflight: None,
            poison_wake,
        }
    }

    /// Whether the frontend shrank the in-flight region it handed over.
    pub fn inflight_poisoned(&self) -> bool {
        self.inflight.as_ref().is_some_and(InflightRegion::poisoned)
    }

    /// Map region `index` of the frontend's memory table after checking that it lies in its
    /// file; a region that does not is refused (the connection then closes).
    pub(crate) fn map_region(
        &self,
        index: usize,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> VuResult<(Arc<GuestRegionMmap<()>>, Mapping)> {
        let gpa = region.guest_phys_addr;
        let (size, offset) = (region.memory_size, region.mmap_offset);
        let mapped =
            self.dev
                .frontend_memory()
                .map(file, offset, size, gpa, Some(self.poison_wake.clone()));
        let mapped = match mapped {
            Ok(r) => r,
            Err(MapError::OutsideFile { file_size, .. }) => {
                tracing::error!(
                    region = index,
                    gpa = format_args!("{gpa:#x}"),
                    size = format_args!("{size:#x}"),
                    offset = format_args!("{offset:#x}"),
                    fd_size = format_args!("{file_size:#x}"),
                    "memory region refused: offset + size is beyond the end of its file"
                );
                return Err(VuError::InvalidParam);
            }
            Err(err) => {
                tracing::error!(region = index, gpa = format_args!("{gpa:#x}"), %err, "memory region refused");
                return Err(io_err(err));
            }
        };
        let mapping = Mapping {
            frontend_va: region.user_addr,
            size,
            gpa,
            mmap_offset: offset,
            region: mapped.clone(),
        };
        Ok((mapped, mapping))
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn queue(&self, index: u32) -> VuResult<MutexGuard<'_, QueueState>> {
        self.dev
            .queues
            .get(index as usize)
            .map(|q| lock(q))
            .ok_or(VuError::InvalidParam)
    }

    /// Serve the ring for the first time once it is started, enabled and has memory.
    fn maybe_activate(&self, st: &mut QueueState) {
        if st.wants_activation() {
            let inflight = self.inflight.as_ref().and_then(|r| r.queue(st.index));
            st.activate(inflight);
        }
    }

    fn frontend_va_to_gpa(&self, va: u64) -> VuResult<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| va >= m.frontend_va && va - m.frontend_va < m.size)
            .map(|m| GuestAddress(va - m.frontend_va + m.gpa))
            .ok_or(VuError::InvalidParam)
    }

    fn install_memory(&mut self, mem: Mem) {
        self.mem = Arc::new(mem);
        self.start_queues();
        // The previous table's regions, unless requests in flight still use them.
        self.dev.frontend_memory().release_unused();
    }

    /// Give every queue the current memory and serve those that are ready to run.
    pub(crate) fn start_queues(&self) {
        for q in &self.dev.queues {
            let mut st = lock(q);
            st.mem = Some(self.mem.clone());
            self.maybe_activate(&mut st);
        }
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> VuResult<()> {
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owner = false;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("RESET_DEVICE is not offered"))
    }

    fn get_features(&mut self) -> VuResult<u64> {
        self.features_read = true;
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.dev.features() != 0 {
            tracing::warn!(
                features = format_args!("{features:#x}"),
                "frontend acked features the device did not offer"
            );
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        self.features_set = true;
        let enable_all = !self.protocol_features_acked();
        for q in &self.dev.queues {
            let mut st = lock(q);
            st.svc.set_driver_features(features);
            if enable_all {
                // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
                st.set_enabled(true);
                self.maybe_activate(&mut st);
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (index, (region, file)) in ctx.iter().zip(files).enumerate() {
            let (mapped, mapping) = self.map_region(index, region, file)?;
            regions.push(mapped);
            mappings.push(mapping);
        }
        let mem = GuestMemoryMmap::from_arc_regions(regions).map_err(io_err)?;
        self.mappings = mappings;
        self.install_memory(mem);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.dev.device.max_queue_size());
        if num == 0 || num > max {
            tracing::warn!(queue = index, num, max, "queue size out of range");
            return Err(VuError::InvalidParam);
        }
        let mut st = self.queue(index)?;
        st.svc
            .queue_mut()
            .try_set_size(num as u16)
            .map_err(|_| VuError::InvalidParam)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.frontend_va_to_gpa(descriptor)?;
        let avail = self.frontend_va_to_gpa(available)?;
        let used = self.frontend_va_to_gpa(used)?;
        let mut st = self.queue(index)?;
        let queue = st.svc.queue_mut();
        queue
            .try_set_desc_table_address(desc)
            .and_then(|()| queue.try_set_avail_ring_address(avail))
            .and_then(|()| queue.try_set_used_ring_address(used))
            .map_err(|_| VuError::InvalidParam)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        self.queue(index)?.svc.queue_mut().set_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let next_avail = self.queue(index)?.stop();
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut st = self.queue(u32::from(index))?;
        st.set_kick(fd);
        if !self.protocol_features_acked() {
            st.set_enabled(true);
        }
        self.maybe_activate(&mut st);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queue(u32::from(index))?.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        // Nothing is reported on the error fd; it is kept to be handed over with the rest.
        self.queue(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = offered_protocol_features().bits();
        if features & !offered != 0 {
            tracing::warn!(
                features = format_args!("{features:#x}"),
                offered = format_args!("{offered:#x}"),
                "frontend acked protocol features the device did not offer"
            );
            return Err(VuError::InvalidParam);
        }
        self.acked_protocol = features;
        self.protocol_set = true;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.dev.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let mut st = self.queue(index)?;
        st.set_enabled(enable);
        self.maybe_activate(&mut st);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // The protocol carries at most 256 bytes of configuration space.
        if size > 256 {
            tracing::warn!(
                offset,
                size,
                "GET_CONFIG: size larger than the protocol allows"
            );
            return Err(VuError::InvalidParam);
        }
        Ok(self.dev.device.read_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        self.dev.device.write_config(offset, buf).map_err(|e| {
            tracing::warn!(offset, len = buf.len(), %e, "SET_CONFIG refused");
            VuError::InvalidOperation("configuration write refused by the device")
        })
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(&mut self, req: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if req.num_queues == 0 || usize::from(req.num_queues) > self.dev.queues.len() {
            tracing::warn!(
                num_queues = req.num_queues,
                "GET_INFLIGHT_FD: bad queue count"
            );
            return Err(VuError::InvalidParam);
        }
        if req.queue_size == 0 || req.queue_size > 32768 {
            tracing::warn!(
                queue_size = req.queue_size,
                "GET_INFLIGHT_FD: bad queue size"
            );
            return Err(VuError::InvalidParam);
        }
        let (region, file, len) = InflightRegion::create(req.num_queues, req.queue_size)
            .map_err(VuError::ReqHandlerError)?;
        tracing::debug!(
            num_queues = req.num_queues,
            queue_size = req.queue_size,
            bytes = len,
            "created the in-flight region"
        );
        self.inflight = Some(region);
        Ok((
            VhostUserInflight::new(len, 0, req.num_queues, req.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, req: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::open_watched(
            file,
            req.mmap_offset,
            req.mmap_size,
            req.num_queues,
            req.queue_size,
            Some(self.poison_wake.clone()),
        )
        .map_err(|err| {
            tracing::warn!(%err, "SET_INFLIGHT_FD refused");
            VuError::ReqHandlerError(err)
        })?;
        tracing::debug!(
            num_queues = req.num_queues,
            queue_size = req.queue_size,
            "using the frontend's in-flight region"
        );
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<u64>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(VuError::InvalidParam);
        }
        let (mapped, mapping) = self.map_region(self.mappings.len(), region, fd)?;
        let mem = self.mem.insert_region(mapped).map_err(io_err)?;
        self.mappings.push(mapping);
        self.install_memory(mem);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(io_err)?;
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        self.install_memory(mem);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation(
            "shared memory regions are not supported",
        ))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging is not supported"))
    }
}
