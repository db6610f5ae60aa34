//! One served device, started from a [`DeviceSpec`] and stopped cleanly: vhost-user serves in
//! its own thread, VDUSE through [`VduseServer`]. `serve` runs one, `run` many.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use virtiod_backend::OpenOptions;
use virtiod_blk::{BlkConfig, BlkDevice, Qos, QosLimits, Stats};
use virtiod_config::{
    Attach as AttachSpec, DeviceKind, DeviceSpec, Mac, NetBackendSpec, NetSpec, Transport,
};
use virtiod_core::Device as CoreDevice;
use virtiod_net::{NetBackend, NetConfig, NetDevice, PortCounters, Switch, TapPort};
use virtiod_vduse::{Attach, VduseOptions, VduseServer};
use virtiod_vhost_user::{bind_socket, VhostUserDevice};

use crate::upgrade::vhost_user::{OnExit, VuServer};

/// How long a stop waits for a vhost-user serving thread to notice.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon's main loop waits for.
#[derive(Debug)]
pub enum Event {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// `ctl upgrade` or SIGUSR2: hand every device over to a new process.
    Upgrade(crate::upgrade::Request),
    /// A device's serving thread ended by itself (not through [`Device::stop`]).
    Exited {
        /// The device name.
        name: String,
        /// Why.
        result: Result<(), String>,
    },
}

enum Kind {
    VhostUser(VuServer),
    Vduse(VduseServer),
}

/// A device being served.
pub struct Device {
    spec: DeviceSpec,
    /// Request counters of a blk device.
    stats: Option<Arc<Stats>>,
    /// The QoS limits of a blk device.
    qos: Option<Arc<Qos>>,
    /// A blk device (for resizing).
    blk: Option<Arc<BlkDevice>>,
    /// The port of a net device, which counts its frames.
    port: Option<Arc<dyn NetBackend>>,
    /// The MAC address of a net device (the one given, or the one derived from its transport).
    mac: Option<Mac>,
    endpoint: PathBuf,
    kind: Kind,
}

/// A device's virtio side, opened (image, backend or port) but not served yet: the slow part
/// of a start, done by a new process before it takes devices over.
pub struct Opened {
    device: Arc<dyn CoreDevice>,
    stats: Option<Arc<Stats>>,
    qos: Option<Arc<Qos>>,
    blk: Option<Arc<BlkDevice>>,
    port: Option<Arc<dyn NetBackend>>,
    mac: Option<Mac>,
    what: &'static str,
}

/// What a device's transport hands over to a new process (see `crate::upgrade`).
pub enum Handed {
    /// The vhost-user listening socket.
    VhostUser(std::os::unix::net::UnixListener),
    /// The open `/dev/vduse/NAME`.
    Vduse(std::os::fd::OwnedFd),
}

impl Device {
    /// Open the image (or the net port) and start serving. Nothing is left behind on
    /// failure. `events` hears when a vhost-user server stops by itself.
    pub fn start(
        spec: DeviceSpec,
        state_dir: &Path,
        events: Sender<Event>,
    ) -> anyhow::Result<Self> {
        let opened = Self::open(&spec)?;
        Self::serve(spec, opened, state_dir, events, None)
    }

    /// Open the image (or the net port).
    pub fn open(spec: &DeviceSpec) -> anyhow::Result<Opened> {
        Ok(match &spec.kind {
            DeviceKind::Blk => {
                let blk = open_blk(spec)?;
                Opened {
                    device: blk.clone(),
                    stats: Some(blk.stats()),
                    qos: Some(blk.qos().clone()),
                    blk: Some(blk),
                    port: None,
                    mac: None,
                    what: "virtio-blk",
                }
            }
            DeviceKind::Net(net) => {
                let (dev, mac) = open_net(spec, net)?;
                Opened {
                    port: Some(dev.backend().clone()),
                    device: dev,
                    stats: None,
                    qos: None,
                    blk: None,
                    mac: Some(mac),
                    what: "virtio-net",
                }
            }
        })
    }

    /// Serve an opened device: on a new socket or VDUSE device, or on the ones `handed` over
    /// by the process this one replaces.
    pub fn serve(
        spec: DeviceSpec,
        opened: Opened,
        state_dir: &Path,
        events: Sender<Event>,
        handed: Option<Handed>,
    ) -> anyhow::Result<Self> {
        let Opened {
            device,
            stats,
            qos,
            blk,
            port,
            mac,
            what,
        } = opened;
        let max_poll = Duration::from_micros(spec.poll_us);
        let (kind, endpoint) = match &spec.transport {
            Transport::VhostUser(socket) => {
                let dev = VhostUserDevice::new(device, max_poll)?;
                // Bind last: nothing is created unless everything before succeeded.
                let listener = match handed {
                    Some(Handed::VhostUser(listener)) => listener,
                    Some(Handed::Vduse(_)) => {
                        anyhow::bail!("a VDUSE device was handed over for a vhost-user one")
                    }
                    None => bind_socket(socket)?,
                };
                let name = spec.name.clone();
                let on_exit: OnExit = Arc::new(move |result| {
                    let result = result.map_err(|e| e.to_string());
                    let name = name.clone();
                    let _ = events.send(Event::Exited { name, result });
                });
                let thread = format!("vu-{}", spec.name);
                let server = VuServer::spawn(dev, listener, socket, &thread, on_exit)
                    .context("cannot start a vhost-user thread")?;
                tracing::info!(device = %spec.name, socket = %socket.display(), "serving {what} over vhost-user");
                (Kind::VhostUser(server), socket.clone())
            }
            Transport::Vduse { name, attach } => {
                let opts = VduseOptions {
                    name: name.clone(),
                    attach: match attach {
                        AttachSpec::Virtio => Attach::Virtio,
                        AttachSpec::Vhost => Attach::Vhost,
                        AttachSpec::None => Attach::None,
                    },
                    state_dir: state_dir.to_path_buf(),
                    poll: max_poll,
                };
                let dev = match handed {
                    None => VduseServer::create(device, &opts)?,
                    Some(Handed::Vduse(fd)) => VduseServer::import(device, &opts, fd)?,
                    Some(Handed::VhostUser(_)) => {
                        anyhow::bail!("a vhost-user socket was handed over for a VDUSE device")
                    }
                };
                let endpoint = match (dev.interface(), dev.node()) {
                    (Some(interface), _) => {
                        tracing::info!(device = %spec.name, name, interface, "serving {what} through VDUSE");
                        PathBuf::from(interface)
                    }
                    (None, Some(node)) => {
                        tracing::info!(device = %spec.name, name, node = %node.display(), "serving {what} through VDUSE");
                        node.to_path_buf()
                    }
                    (None, None) if dev.interface_elsewhere() => {
                        tracing::info!(
                            device = %spec.name,
                            name,
                            "serving {what} through VDUSE again; its interface is in another network namespace"
                        );
                        PathBuf::from(format!("/dev/vduse/{name}"))
                    }
                    (None, None) => {
                        tracing::info!(
                            device = %spec.name,
                            name,
                            "VDUSE device created; attach it with: vdpa dev add name {name} mgmtdev vduse"
                        );
                        PathBuf::from(format!("/dev/vduse/{name}"))
                    }
                };
                (Kind::Vduse(dev), endpoint)
            }
        };
        Ok(Self {
            spec,
            stats,
            qos,
            blk,
            port,
            mac,
            endpoint,
            kind,
        })
    }

    /// What it was started from.
    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    /// Its request counters (`None` for a net device: see [`Self::net_counters`]).
    pub fn stats(&self) -> Option<&Arc<Stats>> {
        self.stats.as_ref()
    }

    /// A blk device's QoS limits and throttling counters (`None` for a net device).
    pub fn qos(&self) -> Option<&Arc<Qos>> {
        self.qos.as_ref()
    }

    /// The virtio-blk device (`None` for a net device).
    pub fn blk(&self) -> Option<&Arc<BlkDevice>> {
        self.blk.as_ref()
    }

    /// Replace a blk device's QoS limits while it serves.
    pub fn set_qos(&mut self, limits: QosLimits) -> anyhow::Result<()> {
        let Some(qos) = self.qos.as_ref() else {
            anyhow::bail!(
                "device {} is a net device: QoS limits are for blk devices",
                self.spec.name
            );
        };
        qos.set(limits, std::time::Instant::now());
        self.spec.qos = limits;
        Ok(())
    }

    /// A net device's frame counters now (`None` for a blk device).
    pub fn net_counters(&self) -> Option<PortCounters> {
        self.port.as_ref().map(|port| port.stats().snapshot())
    }

    /// The MAC address of a net device.
    pub fn mac(&self) -> Option<Mac> {
        self.mac
    }

    /// Where a driver finds it: the socket, `/dev/vdX`, `/dev/vhost-vdpa-N`, `/dev/vduse/NAME`,
    /// or the network interface of a net device on `virtio_vdpa` (e.g. `eth1`; `/dev/vduse/NAME`
    /// for one re-opened after a restart whose interface is in another network namespace).
    pub fn endpoint(&self) -> &Path {
        &self.endpoint
    }

    /// Whether it still serves (a vhost-user thread can end on a library error).
    pub fn is_up(&self) -> bool {
        match &self.kind {
            Kind::VhostUser(server) => server.is_serving(),
            Kind::Vduse(_) => true,
        }
    }

    /// Stop serving: complete what is in flight, flush, and remove what was created (the
    /// socket; the VDUSE device and its vdpa device). A connected vhost-user frontend is
    /// disconnected.
    pub fn stop(self) -> anyhow::Result<()> {
        let name = self.spec.name;
        let result = match self.kind {
            Kind::VhostUser(server) => server
                .stop(STOP_TIMEOUT)
                .context("final flush failed: data may not be durable"),
            Kind::Vduse(dev) => dev.shutdown().map_err(anyhow::Error::from),
        };
        match &result {
            Ok(()) => tracing::info!(device = %name, "stopped cleanly"),
            Err(err) => tracing::error!(device = %name, %err, "stopping failed"),
        }
        result.with_context(|| format!("device {name}"))
    }

    /// Stop serving but leave a VDUSE device in the kernel (`on-stop = "keep"`): requests in
    /// flight complete, the image is flushed, and the process closes its descriptors without
    /// detaching or destroying the device nor removing its in-flight log, so the next start
    /// re-opens it (the driver's requests wait in the kernel meanwhile). A vhost-user device
    /// is stopped as by [`Self::stop`] (its frontend reconnects to the next process).
    pub fn keep(mut self) -> anyhow::Result<()> {
        if matches!(self.kind, Kind::VhostUser(_)) {
            return self.stop();
        }
        let name = self.spec.name.clone();
        let result = (|| {
            if let Kind::Vduse(dev) = &mut self.kind {
                dev.quiesce()
                    .with_context(|| format!("device {name}: completing requests in flight"))?;
            }
            match &self.blk {
                Some(blk) => CoreDevice::stop(blk.as_ref()).with_context(|| {
                    format!("device {name}: final flush failed: data may not be durable")
                }),
                None => Ok(()),
            }
        })();
        match &result {
            Ok(()) => {
                tracing::info!(device = %name, "stopped; the VDUSE device is kept for the next start")
            }
            Err(err) => tracing::error!(device = %name, "{err:#}; the VDUSE device is kept"),
        }
        self.handed_over();
        result
    }

    /// Stop serving for a hand-over to a new process (`virtiod upgrade`): requests in flight
    /// complete, the socket or the VDUSE device stays (see [`Self::handover`]).
    pub fn quiesce(&mut self) -> anyhow::Result<()> {
        let name = &self.spec.name;
        match &mut self.kind {
            Kind::VhostUser(server) => server
                .quiesce(STOP_TIMEOUT)
                .with_context(|| format!("device {name}: the flush before the hand-over failed")),
            Kind::Vduse(dev) => {
                dev.quiesce()
                    .with_context(|| format!("device {name}: quiescing for the hand-over"))?;
                match &self.blk {
                    Some(blk) if crate::upgrade::flush_on_handover(&self.spec) => {
                        CoreDevice::stop(blk.as_ref()).with_context(|| {
                            format!("device {name}: the flush before the hand-over failed")
                        })
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Serve again after [`Self::quiesce`]: the hand-over failed.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let name = &self.spec.name;
        match &mut self.kind {
            Kind::VhostUser(server) => server.resume().map_err(anyhow::Error::from),
            Kind::Vduse(dev) => dev.resume().map_err(anyhow::Error::from),
        }
        .with_context(|| format!("device {name}: serving again after a failed hand-over"))
    }

    /// What the transport hands over after [`Self::quiesce`]: its state and its descriptors
    /// (the listening socket; the open `/dev/vduse/NAME`).
    pub fn handover(&self) -> anyhow::Result<(serde_json::Value, Vec<BorrowedFd<'_>>)> {
        match &self.kind {
            Kind::VhostUser(server) => Ok((
                serde_json::json!({ "transport": "vhost-user", "listener": true }),
                vec![server.listener_fd()],
            )),
            Kind::Vduse(dev) => {
                let fd = dev.device_fd().with_context(|| {
                    format!("device {}: its VDUSE device is not open", self.spec.name)
                })?;
                Ok((
                    serde_json::json!({ "transport": "vduse", "name": dev.name() }),
                    vec![fd],
                ))
            }
        }
    }

    /// Another process serves the device now: close this process's descriptors without
    /// removing the socket, detaching or destroying anything.
    pub fn handed_over(self) {
        match self.kind {
            Kind::VhostUser(server) => drop(server),
            Kind::Vduse(dev) => dev.handed_over(),
        }
    }
}

/// Open a virtio-blk device's image.
fn open_blk(spec: &DeviceSpec) -> anyhow::Result<Arc<BlkDevice>> {
    let backend = virtiod_backend::open(
        &spec.image,
        OpenOptions {
            read_only: spec.read_only,
            buffered: spec.buffered,
        },
    )?;
    let info = backend.info();
    let cfg = BlkConfig::new(&info, spec.queues, spec.queue_size, &spec.serial);
    tracing::info!(
        device = %spec.name,
        image = %spec.image,
        capacity = info.capacity,
        queues = spec.queues,
        queue_size = spec.queue_size,
        read_only = info.read_only,
        "opened image"
    );
    let blk = Arc::new(BlkDevice::new(cfg, backend));
    if !spec.qos.is_unlimited() {
        blk.qos().set(spec.qos, std::time::Instant::now());
        tracing::info!(device = %spec.name, limits = %qos_text(&spec.qos), "QoS limits");
    }
    Ok(blk)
}

/// Limits as `name=value ...` (devices.toml's names), or `none`.
pub fn qos_text(limits: &QosLimits) -> String {
    let pairs = virtiod_config::qos_pairs(limits);
    if pairs.is_empty() {
        return "none".into();
    }
    let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    text.join(" ")
}

/// A virtio-net device on its port (of a switch, or a tap), with the MAC given or one derived
/// from where it is served.
fn open_net(spec: &DeviceSpec, net: &NetSpec) -> anyhow::Result<(Arc<NetDevice>, Mac)> {
    // The queue pairs (--queues / queues); the control queue they need only over vhost-user
    // (VDUSE refuses it: NetDevice::new then refuses more than one pair).
    let pairs = spec.queues;
    let port: Arc<dyn NetBackend> = match &net.backend {
        NetBackendSpec::Switch(switch) => Switch::named(switch)
            .and_then(|sw| sw.port_with_pairs(pairs))
            .with_context(|| format!("cannot join switch {switch}"))?,
        NetBackendSpec::Tap(tap) => Arc::new(TapPort::open_with_pairs(tap, pairs)?),
    };
    let mac = net.mac.unwrap_or_else(|| derived_mac(&spec.transport));
    let mut cfg = NetConfig::new(mac);
    cfg.queue_size = spec.queue_size;
    cfg.queue_pairs = pairs;
    cfg.control_queue = matches!(spec.transport, Transport::VhostUser(_));
    if let Some(mtu) = net.mtu {
        cfg.mtu = mtu;
    }
    let dev = NetDevice::new(cfg, port)?;
    tracing::info!(
        device = %spec.name,
        port = %net.backend,
        mac = %virtiod_config::format_mac(&mac),
        mtu = cfg.mtu,
        derived_mac = net.mac.is_none(),
        queue_size = cfg.queue_size,
        queue_pairs = cfg.queue_pairs,
        control_queue = cfg.control_queue,
        "port opened"
    );
    Ok((Arc::new(dev), mac))
}

/// A locally administered unicast MAC address derived from where the device is served (the
/// VDUSE name or the vhost-user socket path, both unique on a host): the same on every start,
/// so a restarted daemon re-opens its VDUSE device (whose identity includes the MAC) and the
/// interface keeps its address. FNV-1a, fixed here so it does not change with the toolchain.
fn derived_mac(transport: &Transport) -> Mac {
    let key = match transport {
        Transport::Vduse { name, .. } => format!("vduse:{name}"),
        Transport::VhostUser(path) => format!("vhost-user:{}", path.display()),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vduse(name: &str) -> Transport {
        Transport::Vduse {
            name: name.into(),
            attach: virtiod_config::Attach::Virtio,
        }
    }

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let a = derived_mac(&vduse("vnet0"));
        assert_eq!(a, derived_mac(&vduse("vnet0")), "the same on every start");
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
        assert_ne!(a, derived_mac(&vduse("vnet1")));
        let v = derived_mac(&Transport::VhostUser("/run/vnet0.sock".into()));
        assert_eq!(v[0] & 0x03, 0x02);
        assert_ne!(v, a);
        // Fixed function: a toolchain change must not move every interface's address.
        // (computed independently: FNV-1a 64 of "vduse:vnet0", first 6 bytes, bit 1 set, bit 0 clear)
        assert_eq!(virtiod_config::format_mac(&a), "fa:a6:a3:24:12:6d");
    }
}
