//! The devices one daemon serves, by name: started, stopped, listed; shared by the main loop,
//! the control socket and the metrics endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use virtiod_blk::{OpKind, Qos, QosLimits, Stats};
use virtiod_config::{DeviceKind, DeviceSpec, Transport};
use virtiod_net::PortCounters;

use crate::device::{Device, Event};

/// What `list` and `stats` report about one device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub transport: &'static str,
    /// Socket path or device node (empty for a device that failed).
    pub endpoint: String,
    /// `blk` or `net`.
    pub kind: &'static str,
    /// The image of a blk device; the backend (`switch:NAME`) of a net device.
    pub image: String,
    /// A net device's MAC address (known once it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub queues: u16,
    pub up: bool,
    /// Why it is not up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counters of one device: a blk device's requests or a net device's frames.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    pub name: String,
    /// `blk` or `net`.
    pub kind: &'static str,
    #[serde(flatten)]
    pub counters: Counters,
}

/// The counters of one kind of device.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Counters {
    Blk(BlkStats),
    Net(NetStats),
}

/// Counters of one blk device, summed over its queues.
#[derive(Debug, Clone, Serialize)]
pub struct BlkStats {
    /// Completed requests by op.
    pub requests: BTreeMap<&'static str, u64>,
    /// Data bytes by op.
    pub bytes: BTreeMap<&'static str, u64>,
    pub errors: u64,
    pub in_flight: u64,
    /// Requests that waited for a QoS limit, and how long they waited in all.
    pub throttled_requests: u64,
    pub throttled_seconds: f64,
}

impl DeviceStats {
    /// A blk device's counters.
    pub fn blk(name: &str, stats: &Stats, qos: Option<&Arc<Qos>>) -> Self {
        Self {
            name: name.to_string(),
            kind: "blk",
            counters: Counters::Blk(BlkStats::of(stats, qos)),
        }
    }

    /// A net device's counters.
    pub fn net(name: &str, port: &PortCounters) -> Self {
        Self {
            name: name.to_string(),
            kind: "net",
            counters: Counters::Net(NetStats::of(port)),
        }
    }
}

impl BlkStats {
    fn of(stats: &Stats, qos: Option<&Arc<Qos>>) -> Self {
        Self {
            requests: OpKind::ALL
                .iter()
                .map(|k| (k.name(), stats.requests(*k)))
                .collect(),
            bytes: OpKind::ALL
                .iter()
                .map(|k| (k.name(), stats.bytes(*k)))
                .collect(),
            errors: stats.errors(),
            in_flight: stats.in_flight(),
            throttled_requests: qos.map_or(0, |q| q.throttled_requests()),
            throttled_seconds: qos.map_or(0.0, |q| q.throttled_time().as_secs_f64()),
        }
    }
}

/// Counters of one net device's port. "tx" is what the driver sent, "rx" what it received;
/// bytes are frame bytes without the virtio-net header.
#[derive(Debug, Clone, Serialize)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped frames by direction (`rx`, `tx`), then by reason.
    pub drops: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
}

impl NetStats {
    fn of(port: &PortCounters) -> Self {
        let mut drops: BTreeMap<_, BTreeMap<_, _>> = BTreeMap::new();
        for (direction, reason, n) in net_drops(port) {
            drops.entry(direction).or_default().insert(reason, n);
        }
        Self {
            rx_packets: port.rx_packets,
            rx_bytes: port.rx_bytes,
            tx_packets: port.tx_packets,
            tx_bytes: port.tx_bytes,
            drops,
        }
    }
}

/// A port's drop counters as (direction, reason, count): what the driver sent (`tx`) or was
/// to receive (`rx`), dropped because it was malformed, too big, (tx) its virtio-net header
/// was refused, or (rx) the port's queue of waiting frames was full or the offload work it
/// needed could not be done.
pub fn net_drops(port: &PortCounters) -> [(&'static str, &'static str, u64); 7] {
    [
        ("rx", "queue_full", port.rx_queue_full),
        ("rx", "too_big", port.rx_too_big),
        ("rx", "malformed", port.rx_malformed),
        ("rx", "offload", port.rx_offload_dropped),
        ("tx", "too_big", port.tx_too_big),
        ("tx", "malformed", port.tx_malformed),
        ("tx", "bad_header", port.tx_bad_header),
    ]
}

/// A device as the metrics endpoint sees it.
pub struct MetricsView {
    pub name: String,
    pub queues: u16,
    pub up: bool,
    /// A blk device's request counters.
    pub stats: Option<Arc<Stats>>,
    /// A net device's frame counters, read when the view was taken.
    pub net: Option<PortCounters>,
    /// A blk device's QoS (throttling counters).
    pub qos: Option<Arc<Qos>>,
}

#[derive(Default)]
struct Inner {
    devices: BTreeMap<String, Device>,
    /// Devices that failed to start or stopped by themselves, with the reason.
    failed: BTreeMap<String, (DeviceSpec, String)>,
    /// Names and endpoints being started right now (not in `devices` yet).
    starting: BTreeSet<String>,
}

/// The daemon's devices.
pub struct Registry {
    inner: Mutex<Inner>,
    /// An upgrade is handing the devices over: no device is added, removed or changed.
    upgrading: AtomicBool,
    state_dir: PathBuf,
    /// `ctl add` records its devices under `state_dir` (see `keep_records`).
    records: AtomicBool,
    events: Sender<Event>,
}

fn endpoint_key(spec: &DeviceSpec) -> String {
    match &spec.transport {
        Transport::VhostUser(p) => format!("vhost-user socket {}", p.display()),
        Transport::Vduse { name, .. } => format!("VDUSE name {name}"),
    }
}

impl Registry {
    pub fn new(state_dir: &Path, events: Sender<Event>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            upgrading: AtomicBool::new(false),
            state_dir: state_dir.to_path_buf(),
            records: AtomicBool::new(false),
            events,
        })
    }

    /// Where devices keep their state (in-flight logs, `ctl add` records).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Record devices added with `ctl add` in the state dir (`virtiod run`, which restores
    /// them at start-up; `serve` does not, so it records nothing).
    pub fn keep_records(&self) {
        self.records.store(true, Ordering::Relaxed);
    }

    /// Whether `ctl add` records its devices (see [`Self::keep_records`]).
    pub fn records(&self) -> bool {
        self.records.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start a device; on failure it is remembered as failed (reported by list and metrics)
    /// and the error returned. Returns its endpoint.
    pub fn add(&self, spec: DeviceSpec) -> anyhow::Result<PathBuf> {
        self.refuse_while_upgrading()?;
        let (name, key) = (spec.name.clone(), endpoint_key(&spec));
        {
            let mut inner = self.lock();
            let taken = inner.starting.contains(&name)
                || inner.devices.contains_key(&name)
                || inner.starting.contains(&key)
                || inner
                    .devices
                    .values()
                    .any(|d| endpoint_key(d.spec()) == key);
            if taken {
                anyhow::bail!(
                    "a device named {name} or with the same {key} is already served: remove it first or pick another"
                );
            }
            inner.failed.remove(&name);
            inner.starting.insert(name.clone());
            inner.starting.insert(key.clone());
        }
        let started = Device::start(spec.clone(), &self.state_dir, self.events.clone());
        let mut inner = self.lock();
        inner.starting.remove(&name);
        inner.starting.remove(&key);
        match started {
            Ok(dev) => {
                let endpoint = dev.endpoint().to_path_buf();
                inner.devices.insert(name, dev);
                Ok(endpoint)
            }
            Err(err) => {
                inner.failed.insert(name, (spec, format!("{err:#}")));
                Err(err)
            }
        }
    }

    /// Stop and forget a device.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        self.refuse_while_upgrading()?;
        let dev = {
            let mut inner = self.lock();
            if inner.failed.remove(name).is_some() {
                return Ok(());
            }
            inner.devices.remove(name)
        };
        match dev {
            Some(dev) => dev.stop(),
            None => anyhow::bail!("no device named {name}: see `virtiod ctl list`"),
        }
    }

    /// A device stopped serving by itself: clean it up and remember why.
    pub fn failed(&self, name: &str, reason: String) {
        let dev = self.lock().devices.remove(name);
        if let Some(dev) = dev {
            let spec = dev.spec().clone();
            let _ = dev.stop();
            self.lock().failed.insert(name.to_string(), (spec, reason));
        }
    }

    /// Every device, running or failed, by name.
    pub fn list(&self) -> Vec<DeviceInfo> {
        let inner = self.lock();
        let running = inner.devices.values().map(|d| DeviceInfo {
            name: d.spec().name.clone(),
            transport: transport_name(d.spec()),
            endpoint: d.endpoint().display().to_string(),
            kind: kind_name(d.spec()),
            image: what(d.spec()),
            mac: d.mac().map(|m| virtiod_config::format_mac(&m)),
            queues: d.spec().queues,
            up: d.is_up(),
            error: None,
        });
        let failed = inner.failed.values().map(|(spec, why)| DeviceInfo {
            name: spec.name.clone(),
            transport: transport_name(spec),
            endpoint: String::new(),
            kind: kind_name(spec),
            image: what(spec),
            mac: None,
            queues: spec.queues,
            up: false,
            error: Some(why.clone()),
        });
        let mut all: Vec<DeviceInfo> = running.chain(failed).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Counters of one device or of all running ones.
    pub fn stats(&self, name: Option<&str>) -> anyhow::Result<Vec<DeviceStats>> {
        let inner = self.lock();
        let of = |n: &str, d: &Device| match (d.stats(), d.net_counters()) {
            (Some(stats), _) => Some(DeviceStats::blk(n, stats, d.qos())),
            (None, Some(port)) => Some(DeviceStats::net(n, &port)),
            (None, None) => None,
        };
        match name {
            Some(n) => match inner.devices.get(n) {
                Some(d) => Ok(of(n, d).into_iter().collect()),
                None => anyhow::bail!("no running device named {n}: see `virtiod ctl list`"),
            },
            None => Ok(inner.devices.iter().filter_map(|(n, d)| of(n, d)).collect()),
        }
    }

    /// What the metrics endpoint shows.
    pub fn metrics_view(&self) -> Vec<MetricsView> {
        let inner = self.lock();
        let running = inner.devices.values().map(|d| MetricsView {
            name: d.spec().name.clone(),
            queues: d.spec().queues,
            up: d.is_up(),
            stats: d.stats().cloned(),
            net: d.net_counters(),
            qos: d.qos().cloned(),
        });
        let failed = inner.failed.values().map(|(spec, _)| MetricsView {
            name: spec.name.clone(),
            queues: spec.queues,
            up: false,
            stats: None,
            net: None,
            qos: None,
        });
        running.chain(failed).collect()
    }

    /// Resize a running blk device (see [`virtiod_blk::BlkDevice::resize`]).
    pub fn resize(
        &self,
        name: &str,
        bytes: u64,
        shrink: bool,
    ) -> anyhow::Result<virtiod_blk::Resized> {
        self.refuse_while_upgrading()?;
        let blk = {
            let inner = self.lock();
            let Some(dev) = inner.devices.get(name) else {
                anyhow::bail!("no running device named {name}: see `virtiod ctl list`");
            };
            dev.blk().cloned().ok_or_else(|| {
                anyhow::anyhow!("device {name} is a net device: only blk devices can be resized")
            })?
        };
        // Not under the registry's lock: the frontend may take a moment to acknowledge.
        let resized = blk
            .resize(bytes, shrink)
            .map_err(|e| anyhow::anyhow!("device {name}: {e}"))?;
        match &resized.notified {
            Ok(()) => {
                tracing::info!(device = %name, old = resized.old, new = resized.new, "resized; driver notified")
            }
            Err(why) => {
                tracing::warn!(device = %name, old = resized.old, new = resized.new, why = %why, "resized; driver not notified")
            }
        }
        Ok(resized)
    }

    /// A running blk device's QoS limits, replaced first by `set` if given.
    pub fn qos(&self, name: &str, set: Option<QosLimits>) -> anyhow::Result<QosLimits> {
        if set.is_some() {
            self.refuse_while_upgrading()?;
        }
        let mut inner = self.lock();
        let Some(dev) = inner.devices.get_mut(name) else {
            anyhow::bail!("no running device named {name}: see `virtiod ctl list`");
        };
        if let Some(limits) = set {
            dev.set_qos(limits)?;
            tracing::info!(device = %name, limits = %crate::device::qos_text(&limits), "QoS limits changed");
        }
        match dev.qos() {
            Some(qos) => Ok(qos.limits()),
            None => anyhow::bail!("device {name} is a net device: QoS limits are for blk devices"),
        }
    }

    /// The main loop's channel.
    pub fn events(&self) -> Sender<Event> {
        self.events.clone()
    }

    /// An error while an upgrade runs (see [`Self::set_upgrading`]).
    pub fn refuse_while_upgrading(&self) -> anyhow::Result<()> {
        if self.upgrading.load(Ordering::Acquire) {
            anyhow::bail!(
                "an upgrade is handing the devices over to a new process: try again in a moment"
            );
        }
        Ok(())
    }

    /// Start or end an upgrade (see `crate::upgrade`): while it runs, adding, removing,
    /// resizing a device and changing its limits are refused. Returns whether one ran already.
    pub fn set_upgrading(&self, on: bool) -> bool {
        self.upgrading.swap(on, Ordering::AcqRel)
    }

    /// Run `f` on every running device (by name) and on the failed ones' specs and reasons.
    pub fn with_devices<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Device>, &BTreeMap<String, (DeviceSpec, String)>) -> T,
    ) -> T {
        let mut inner = self.lock();
        let Inner {
            devices, failed, ..
        } = &mut *inner;
        f(devices, failed)
    }

    /// A device taken over from the process this one replaces, serving already.
    pub fn adopt(&self, dev: Device) {
        self.lock().devices.insert(dev.spec().name.clone(), dev);
    }

    /// A device that had failed in the process this one replaces.
    pub fn adopt_failed(&self, spec: DeviceSpec, reason: String) {
        self.lock().failed.insert(spec.name.clone(), (spec, reason));
    }

    /// The devices were handed over: forget them without stopping anything.
    pub fn handed_over(&self) {
        let devices = std::mem::take(&mut self.lock().devices);
        for dev in devices.into_values() {
            dev.handed_over();
        }
    }

    /// How many devices serve now.
    pub fn running(&self) -> usize {
        self.lock().devices.len()
    }

    /// Stop every device (each completes its I/O and flushes); the first error is returned
    /// after all were stopped.
    pub fn stop_all(&self) -> anyhow::Result<()> {
        self.each_device(Device::stop)
    }

    /// Stop every device like [`Self::stop_all`] but leave the VDUSE devices in the kernel
    /// for the next start (`on-stop = "keep"`; see [`Device::keep`]).
    pub fn keep_all(&self) -> anyhow::Result<()> {
        self.each_device(Device::keep)
    }

    /// Take every device out of the registry and run `f` on each in a thread of its own; the
    /// first error is returned after all were done.
    fn each_device(&self, f: fn(Device) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let devices = std::mem::take(&mut self.lock().devices);
        let handles: Vec<_> = devices
            .into_values()
            .map(|d| std::thread::spawn(move || f(d)))
            .collect();
        let mut first = Ok(());
        for h in handles {
            let result = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a device panicked while stopping")));
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

fn transport_name(spec: &DeviceSpec) -> &'static str {
    match spec.transport {
        Transport::VhostUser(_) => "vhost-user",
        Transport::Vduse { .. } => "vduse",
    }
}

fn kind_name(spec: &DeviceSpec) -> &'static str {
    match spec.kind {
        DeviceKind::Blk => "blk",
        DeviceKind::Net(_) => "net",
    }
}

/// What a device serves: its image, or its net backend.
fn what(spec: &DeviceSpec) -> String {
    match &spec.kind {
        DeviceKind::Blk => spec.image.clone(),
        DeviceKind::Net(net) => net.backend.to_string(),
    }
}
