//! Creating, attaching and destroying one VDUSE device (any device of the core).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vduse::vdpa::{self, Driver, VdpaClient};
use vduse::{DeviceConfig, IotlbMemory, VduseControl, VduseDevice};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
use virtiod_core::{ConfigNotifier, Device, QueueService, F_ACCESS_PLATFORM, F_VERSION_1};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::shared::{QueueCtx, QueueHandle, Shared};
use crate::state::{self, Identity, StateLog};
use crate::Error;

#[path = "handover.rs"]
mod handover;

/// How long to wait for the device node after attaching.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

/// Which vDPA bus driver gets the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// `virtio_vdpa`: the host kernel drives it, a block device `/dev/vdX` appears.
    Virtio,
    /// `vhost_vdpa`: `/dev/vhost-vdpa-N` for a VM or a user-space driver.
    Vhost,
    /// Create the VDUSE device only; the operator adds it to the vDPA bus
    /// (`vdpa dev add name NAME mgmtdev vduse`).
    None,
}

/// How to expose the device.
#[derive(Debug, Clone)]
pub struct VduseOptions {
    /// Device name (`/dev/vduse/NAME`, and the vdpa device name).
    pub name: String,
    /// Bus driver choice.
    pub attach: Attach,
    /// Directory of the in-flight log (`vduse-NAME.log`) that makes a restart lossless.
    pub state_dir: PathBuf,
    /// Longest adaptive busy-poll window of each queue after its last request (zero: never
    /// poll).
    pub poll: Duration,
}

/// A device served through VDUSE. Dropping it without [`VduseServer::shutdown`] still
/// detaches and destroys the VDUSE device.
pub struct VduseServer {
    shared: Option<Arc<Shared>>,
    threads: Vec<JoinHandle<()>>,
    name: String,
    /// The VDUSE device exists and must be destroyed.
    created: bool,
    attached: bool,
    node: Option<PathBuf>,
    /// The network interface of a net device attached to `virtio_vdpa`.
    interface: Option<String>,
    /// A re-opened net device is driven by `virtio_net` but its interface is not visible here:
    /// it was moved to another network namespace.
    interface_elsewhere: bool,
    device: Arc<dyn Device>,
}

/// What VDUSE asks of a net device: VERSION_1 and no control queue (ACCESS_PLATFORM is added
/// here).
fn check_net_features(features: u64) -> Result<(), Error> {
    if features & F_VERSION_1 == 0 {
        return Err(Error::Attach(
            "a VDUSE net device must offer VIRTIO_F_VERSION_1".into(),
        ));
    }
    if features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 {
        return Err(Error::Attach(
            "VDUSE refuses net devices with a control queue (VIRTIO_NET_F_CTRL_VQ)".into(),
        ));
    }
    Ok(())
}

/// Tells the driver that the configuration space changed: the kernel keeps the config space
/// a VDUSE driver reads, so it is updated first (`VDUSE_DEV_SET_CONFIG`), then the driver is
/// interrupted (`VDUSE_DEV_INJECT_CONFIG_IRQ`; virtio-blk then re-reads its capacity).
struct ConfigIrq(Weak<Shared>);

impl ConfigNotifier for ConfigIrq {
    fn config_changed(&self, config: &[u8]) -> Result<(), String> {
        let shared = self
            .0
            .upgrade()
            .ok_or("the VDUSE device is being removed")?;
        shared
            .dev
            .set_config(0, config)
            .map_err(|e| format!("updating the kernel's copy of the config space: {e}"))?;
        shared.log.set_config_hash(state::config_hash(config));
        shared.dev.inject_config_irq().map_err(|e| {
            format!("{e} (the kernel only delivers it while a driver runs the device: attach it)")
        })
    }
}

/// Whether the vDPA bus has a device called `name`.
fn vdpa_has(name: &str) -> bool {
    VdpaClient::open()
        .and_then(|mut v| v.list_devices())
        .is_ok_and(|devs| devs.iter().any(|d| d.name == name))
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}

/// A device of that name survives: a previous virtiod died (or still runs). Open it and the
/// in-flight log it left.
fn reopen(opts: &VduseOptions, id: Identity) -> Result<(VduseDevice, StateLog), Error> {
    let dev = VduseDevice::open(&opts.name)?;
    let log = existing_log(opts, id)?;
    tracing::info!(name = %opts.name, "re-opening the existing VDUSE device");
    Ok((dev, log))
}

/// The in-flight log an earlier process left for the existing device `opts.name`.
fn existing_log(opts: &VduseOptions, id: Identity) -> Result<StateLog, Error> {
    let log_file = state::log_path(&opts.state_dir, &opts.name);
    StateLog::open_existing(&opts.state_dir, &opts.name, id)
        .map_err(|e| {
            Error::Attach(format!(
                "cannot use the in-flight log {}: {e}",
                log_file.display()
            ))
        })?
        .ok_or_else(|| {
            Error::Attach(format!(
                "a VDUSE device named {} already exists but {} has no in-flight log for it: \
                 restart with the --state-dir it was created with, or remove it (vdpa dev del {})",
                opts.name,
                opts.state_dir.display(),
                opts.name
            ))
        })
}

/// Create the VDUSE device and its in-flight log; nothing is left behind on failure.
fn create_new(
    control: &VduseControl,
    dev_cfg: &DeviceConfig,
    opts: &VduseOptions,
    id: Identity,
) -> Result<(VduseDevice, StateLog), Error> {
    if vdpa_has(&opts.name) {
        return Err(Error::Attach(format!(
            "a vdpa device named {} already exists: choose another name or remove it (vdpa dev del {})",
            opts.name, opts.name
        )));
    }
    let log = StateLog::create(&opts.state_dir, &opts.name, id).map_err(|e| {
        Error::Attach(format!(
            "cannot create the in-flight log {}: {e} (choose a writable --state-dir)",
            state::log_path(&opts.state_dir, &opts.name).display()
        ))
    })?;
    if let Err(e) = control.create_device(dev_cfg) {
        log.remove();
        return Err(e.into());
    }
    match VduseDevice::open(&opts.name) {
        Ok(dev) => Ok((dev, log)),
        Err(e) => {
            log.remove();
            let _ = control.destroy_device(&opts.name);
            Err(e.into())
        }
    }
}

/// What the kernel is told about `device`, and the identity its in-flight log records.
fn device_config(device: &dyn Device, opts: &VduseOptions) -> (DeviceConfig, Identity) {
    let dev_cfg = DeviceConfig {
        name: opts.name.clone(),
        device_id: device.device_type(),
        vendor_id: 0,
        features: device.features() | F_ACCESS_PLATFORM,
        vq_num: u32::from(device.num_queues()),
        vq_align: 4096,
        config: device.config_space(),
    };
    let id = Identity {
        device_type: dev_cfg.device_id,
        num_queues: device.num_queues(),
        queue_size: device.max_queue_size(),
        features: dev_cfg.features,
        config_hash: state::config_hash(&dev_cfg.config),
    };
    (dev_cfg, id)
}

impl VduseServer {
    /// Create the VDUSE device for `device`, start serving it and attach it as `opts` says.
    /// Returns once the device node is usable (see [`Self::node`]).
    pub fn create(device: Arc<dyn Device>, opts: &VduseOptions) -> Result<Self, Error> {
        if device.device_type() == VIRTIO_ID_NET {
            check_net_features(device.features())?;
        }
        let control = VduseControl::open()?;
        let (dev_cfg, id) = device_config(device.as_ref(), opts);
        let exists = Path::new("/dev/vduse").join(&opts.name).exists();
        let (dev, log) = if exists {
            reopen(opts, id)?
        } else {
            create_new(&control, &dev_cfg, opts, id)?
        };
        Self::serve_opened(device, opts, dev, log, exists)
    }

    /// Serve `dev` (created now, or `existing`: re-opened or handed over) and attach it.
    fn serve_opened(
        device: Arc<dyn Device>,
        opts: &VduseOptions,
        dev: VduseDevice,
        log: StateLog,
        exists: bool,
    ) -> Result<Self, Error> {
        let mut this = Self {
            shared: None,
            threads: Vec::new(),
            name: opts.name.clone(),
            // A re-opened device is only ours to destroy once it serves again; until then a
            // failure leaves it (and its log) for the next attempt.
            created: !exists,
            attached: false,
            node: None,
            interface: None,
            interface_elsewhere: false,
            device: device.clone(),
        };
        this.start(device.clone(), dev, log, exists, opts.poll)?;
        if let Some(shared) = &this.shared {
            device.set_config_notifier(Some(Arc::new(ConfigIrq(Arc::downgrade(shared)))));
        }
        if exists && vdpa_has(&opts.name) {
            this.attached = true;
            if opts.attach != Attach::None {
                this.find_existing_node(opts.attach)?;
            }
            // Serving again: from now on a stop removes it.
            this.created = true;
        } else {
            this.created = true;
            if opts.attach != Attach::None {
                this.attach(opts.attach)?;
            }
        }
        Ok(this)
    }

    fn start(
        &mut self,
        device: Arc<dyn Device>,
        dev: VduseDevice,
        log: StateLog,
        resume: bool,
        poll: Duration,
    ) -> Result<(), Error> {
        let size = device.max_queue_size();
        let mut queues = Vec::new();
        for index in 0..device.num_queues() {
            if !resume {
                dev.setup_vq(u32::from(index), size)?;
            }
            let handler = device.queue_handler(index)?;
            let mut svc = QueueService::new(index, handler, size, poll)
                .map_err(|e| Error::Attach(format!("queue {index} of size {size}: {e}")))?;
            // The IOTLB is mapped on demand: a chain in unmapped memory triggers a re-map.
            svc.set_remap_on_fault(true);
            queues.push(QueueHandle {
                ctx: Mutex::new(QueueCtx { svc, mem: None }),
                kick: EventFd::new(EFD_NONBLOCK).map_err(os("creating a kick eventfd"))?,
                wake: EventFd::new(EFD_NONBLOCK).map_err(os("creating an eventfd"))?,
            });
        }
        let shared = Arc::new(Shared {
            dev,
            log,
            iotlb: Mutex::new(IotlbMemory::new()),
            queues,
            stop: AtomicBool::new(false),
            stop_evt: EventFd::new(EFD_NONBLOCK).map_err(os("creating an eventfd"))?,
        });
        self.shared = Some(shared.clone());
        self.spawn_threads(&shared, resume)
    }

    /// Start the queue threads and the control thread (`resume`: set the queues up again from
    /// the kernel's view and the in-flight log, as after a restart).
    fn spawn_threads(&mut self, shared: &Arc<Shared>, resume: bool) -> Result<(), Error> {
        for index in 0..shared.queues.len() {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("vduse-q{index}"))
                .spawn(move || crate::queue::run(&s, index))
                .map_err(os("starting a queue thread"))?;
            self.threads.push(t);
        }
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("vduse-control".into())
            .spawn(move || crate::control::run(&s, resume))
            .map_err(os("starting the control thread"))?;
        self.threads.push(t);
        Ok(())
    }

    fn attach(&mut self, attach: Attach) -> Result<(), Error> {
        let mut vdpa = VdpaClient::open()?;
        vdpa.add_device(&self.name, "vduse")?;
        self.attached = true;
        let want_vhost = attach == Attach::Vhost;
        if want_vhost {
            vdpa::bind_driver(&self.name, Driver::Vhost)?;
        }
        self.wait_for_node(attach, want_vhost)
    }

    /// A re-opened device already on the bus: its node, or for a net device its interface. The
    /// interface of a net device may have been moved to another network namespace, where sysfs
    /// does not show it: the device is then served as it is.
    fn find_existing_node(&mut self, attach: Attach) -> Result<(), Error> {
        let want_interface = attach == Attach::Virtio && self.device.device_type() == VIRTIO_ID_NET;
        if want_interface && vdpa::find_net_interface(&self.name)?.is_none() {
            let driver = vdpa::virtio_driver(&self.name)?;
            if driver.as_deref() == Some("virtio_net") {
                tracing::info!(
                    name = %self.name,
                    "re-opened: the network interface is in another network namespace"
                );
                self.interface_elsewhere = true;
                return Ok(());
            }
        }
        self.wait_for_node(attach, false)
    }

    /// Wait until the bus driver `attach` asks for has made the device node (for a net
    /// device on `virtio_vdpa`: the network interface); rebind once if another driver took
    /// the device (unless `rebound` already).
    fn wait_for_node(&mut self, attach: Attach, mut rebound: bool) -> Result<(), Error> {
        let want_vhost = attach == Attach::Vhost;
        let want_interface = !want_vhost && self.device.device_type() == VIRTIO_ID_NET;
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if want_interface {
                if let Some(interface) = vdpa::find_net_interface(&self.name)? {
                    self.interface = Some(interface);
                    return Ok(());
                }
            }
            if let Some(node) = vdpa::find_device_node(&self.name)? {
                let is_vhost = node.to_string_lossy().contains("vhost-vdpa");
                if is_vhost == want_vhost && node.exists() {
                    self.node = Some(node);
                    return Ok(());
                }
                if is_vhost != want_vhost && !rebound {
                    // Another bus driver won the race for it: hand it to the one asked for.
                    let driver = if want_vhost {
                        Driver::Vhost
                    } else {
                        Driver::Virtio
                    };
                    vdpa::bind_driver(&self.name, driver)?;
                    rebound = true;
                }
            }
            if Instant::now() > deadline {
                let (module, what) = if want_vhost {
                    ("vhost_vdpa", "device node")
                } else if want_interface {
                    ("virtio_vdpa and virtio_net", "network interface")
                } else {
                    ("virtio_vdpa and virtio_blk", "device node")
                };
                return Err(Error::Attach(format!(
                    "vdpa device {} was added but no {what} appeared within {}s: load {module} (modprobe)",
                    self.name,
                    ATTACH_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The device node: `/dev/vdX` or `/dev/vhost-vdpa-N` (None with [`Attach::None`], and
    /// for a net device on `virtio_vdpa`: see [`Self::interface`]).
    pub fn node(&self) -> Option<&Path> {
        self.node.as_deref()
    }

    /// The network interface the host kernel made of a net device attached with
    /// [`Attach::Virtio`] (e.g. `eth1`).
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// Whether this is a re-opened net device whose interface is in another network namespace
    /// ([`Self::interface`] is then `None`: sysfs only shows this namespace's interfaces).
    pub fn interface_elsewhere(&self) -> bool {
        self.interface_elsewhere
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Detach from the vDPA bus (the kernel driver completes its I/O and resets the device),
    /// complete anything still in flight, stop the device (virtio-blk: flush the backend),
    /// and destroy the VDUSE device.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), Error> {
        let mut first_err = None;
        if std::mem::take(&mut self.attached) && self.created {
            match VdpaClient::open().and_then(|mut v| v.del_device(&self.name)) {
                Ok(()) => tracing::info!(name = %self.name, "detached from the vDPA bus"),
                Err(e) => first_err = Some(Error::from(e)),
            }
        }
        if let Some(shared) = self.shared.take() {
            self.device.set_config_notifier(None);
            shared.stop.store(true, Ordering::Release);
            let _ = shared.stop_evt.write(1);
            for q in &shared.queues {
                let _ = q.wake.write(1);
            }
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
            crate::control::stop_queues(&shared);
            if self.created {
                shared.log.remove(); // a clean stop leaves nothing to recover
            }
            drop(shared); // closes /dev/vduse/NAME once the last reference goes
        }
        if let Err(e) = self.device.stop() {
            tracing::error!(%e, "stopping the device failed");
            first_err.get_or_insert(Error::Device(e));
        }
        if !std::mem::take(&mut self.created) {
            return first_err.map_or(Ok(()), Err);
        }
        match VduseControl::open().and_then(|c| c.destroy_device(&self.name)) {
            Ok(()) => tracing::info!(name = %self.name, "VDUSE device destroyed"),
            Err(e) => {
                first_err.get_or_insert(Error::from(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for VduseServer {
    fn drop(&mut self) {
        if self.created || self.shared.is_some() {
            if let Err(e) = self.teardown() {
                tracing::warn!(%e, "cleaning up the VDUSE device");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_devices_need_version_1_and_no_control_queue() {
        assert!(check_net_features(net_features()).is_ok());
        assert!(check_net_features(net_features() & !F_VERSION_1).is_err());
        assert!(check_net_features(net_features() | 1 << VIRTIO_NET_F_CTRL_VQ).is_err());
    }

    fn net_features() -> u64 {
        F_VERSION_1 | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC
    }
}
