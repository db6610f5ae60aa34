//! `devices.toml`: the devices one `virtiod run` serves.
//!
//! ```toml
//! [[device]]
//! name = "a"
//! image = "/var/lib/images/a.img"   # or null:SIZE / mem:SIZE
//! vduse = "vd-a"                    # or: vhost-user = "/run/virtiod/a.sock"
//! queues = 2
//! queue-size = 256
//! read-only = false
//! serial = "a"
//! attach = "virtio"                 # VDUSE only: virtio | vhost | none
//! buffered = false                  # page cache instead of O_DIRECT
//! poll-us = 32                      # largest adaptive busy-poll window (0: never poll)
//!
//! [device.qos]                      # optional limits (blk devices; names in [`QOS_KEYS`])
//! iops = 2000                       # requests per second; read-iops, write-iops
//! bps = "100M"                      # bytes per second; read-bps, write-bps
//! iops-burst = 200                  # any limit + "-burst"
//!
//! [[device]]
//! name = "n"
//! net = "switch:sw0"                # virtio-net on the in-process switch sw0 (instead of image)
//! vhost-user = "/run/virtiod/n.sock"
//! mac = "52:54:00:12:34:56"         # optional: otherwise derived from the VDUSE name or socket path
//! mtu = 1500                        # optional
//!
//! [daemon]                          # optional: settings of the daemon (see [`parse_daemon`])
//! allow-dirs = ["/var/lib/images"]  # where devices added later may have images and sockets
//! control-group = "virtiod"         # the control socket is mode 0660 with this group
//! ```
//!
//! Everything is checked before anything starts: unknown keys, duplicate names, sockets or
//! VDUSE names, both or neither transport, bad values. Each error carries the line and column
//! it is about.

#![deny(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

mod daemon;
mod net;
mod qos;

pub use daemon::{parse_daemon, DaemonSettings, OnStop};

pub use net::{
    check_mtu, format_mac, parse_cli_net, parse_mac, parse_net_backend, DeviceKind, Mac,
    NetBackendSpec, NetSpec, MIN_MTU,
};
use qos::QosValue;
pub use qos::{qos_from_pairs, qos_pairs, QOS_KEYS};
pub use virtiod_blk::{QosLimits, Rate};

/// Largest number of queues per device.
pub const MAX_QUEUES: u16 = 64;
/// Longest serial (virtio-blk GET_ID).
pub const MAX_SERIAL: usize = 20;
/// Longest busy-poll period (µs).
pub const MAX_POLL_US: u64 = 1_000_000;
/// Default largest adaptive busy-poll window in microseconds (QEMU's default `poll-max-ns`
/// is the same 32 µs): a queue polls only while its driver keeps sending within the window.
pub const DEFAULT_POLL_US: u64 = 32;

/// Which vDPA bus driver gets a VDUSE device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// virtio_vdpa: /dev/vdX on the host.
    Virtio,
    /// vhost_vdpa: /dev/vhost-vdpa-N.
    Vhost,
    /// Create the VDUSE device only.
    None,
}

/// How a device is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// vhost-user on this socket.
    VhostUser(PathBuf),
    /// VDUSE under this name.
    Vduse {
        /// `/dev/vduse/NAME`.
        name: String,
        /// Where it goes.
        attach: Attach,
    },
}

/// One validated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Unique name of the device in this daemon.
    pub name: String,
    /// `PATH`, `mem:SIZE` or `null:SIZE` (empty for a net device).
    pub image: String,
    /// virtio-blk or virtio-net.
    pub kind: DeviceKind,
    /// The transport.
    pub transport: Transport,
    /// Request queues.
    pub queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// Page cache instead of O_DIRECT.
    pub buffered: bool,
    /// GET_ID serial (defaults to the name, cut to 20 bytes).
    pub serial: String,
    /// Busy-poll each queue this long (µs) after its last request (0: never).
    pub poll_us: u64,
    /// IOPS and bandwidth limits (blk devices).
    pub qos: QosLimits,
}

/// An error at a place in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line (0 when the input has no positions, e.g. JSON).
    pub line: usize,
    /// 1-based column in characters.
    pub column: usize,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        }
    }
}

/// Every error found, in text order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    device: Vec<Spanned<RawDevice>>,
    /// Checked by [`parse_daemon`].
    #[serde(default)]
    #[allow(dead_code)]
    daemon: Option<daemon::RawDaemon>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSingle {
    device: Spanned<RawDevice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDevice {
    name: Spanned<String>,
    image: Option<Spanned<String>>,
    net: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    mtu: Option<Spanned<u16>>,
    vduse: Option<Spanned<String>>,
    vhost_user: Option<Spanned<PathBuf>>,
    queues: Option<Spanned<u16>>,
    queue_size: Option<Spanned<u16>>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    buffered: bool,
    serial: Option<Spanned<String>>,
    attach: Option<Spanned<Attach>>,
    poll_us: Option<Spanned<u64>>,
    qos: Option<Spanned<std::collections::BTreeMap<String, QosValue>>>,
}

/// Maps byte offsets to line:column.
struct Positions<'a> {
    text: &'a str,
}

impl Positions<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = self.text.get(..start).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        ConfigError {
            line,
            column,
            message: message.into(),
        }
    }

    fn toml(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => self.error(span, message),
            None => ConfigError {
                line: 1,
                column: 1,
                message,
            },
        }
    }
}

/// Parse and validate a whole `devices.toml`. A file without devices is an empty list (a
/// daemon with a control socket gets its devices later).
pub fn parse(text: &str) -> Result<Vec<DeviceSpec>, ConfigErrors> {
    let pos = Positions { text };
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigErrors(vec![pos.toml(&e)]))?;
    let mut errors = Vec::new();
    let mut devices = Vec::new();
    for dev in raw.device {
        let span = dev.span();
        match validate(dev.into_inner(), span, &pos) {
            Ok(d) => devices.push(d),
            Err(mut e) => errors.append(&mut e),
        }
    }
    check_unique(&devices, &mut errors, &pos, text);
    errors.sort_by_key(|e| (e.line, e.column));
    if errors.is_empty() {
        Ok(devices)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Parse one device: a JSON object, or TOML (its keys bare or under `[device]`), as given to
/// `virtiod ctl add`.
pub fn parse_device(text: &str) -> Result<DeviceSpec, ConfigErrors> {
    if text.trim_start().starts_with('{') {
        if let Ok(value) = serde_json::from_str::<toml::Table>(text) {
            // Re-express it as TOML so both forms share one validator (JSON has no spans).
            let toml_text = toml::to_string(&toml::Table::from_iter([(
                "device".to_string(),
                toml::Value::Table(value),
            )]))
            .map_err(|e| one(0, e.to_string()))?;
            return parse_device(&toml_text).map_err(|mut e| {
                for err in &mut e.0 {
                    (err.line, err.column) = (0, 0);
                }
                e
            });
        }
    }
    let pos = Positions { text };
    let raw: Spanned<RawDevice> = if text.contains("[device]") {
        toml::from_str::<RawSingle>(text).map(|s| s.device)
    } else {
        toml::from_str::<RawDevice>(text).map(|d| Spanned::new(0..0, d))
    }
    .map_err(|e| ConfigErrors(vec![pos.toml(&e)]))?;
    let span = raw.span();
    validate(raw.into_inner(), span, &pos).map_err(ConfigErrors)
}

fn one(line: usize, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        line,
        column: 0,
        message,
    }])
}

/// The errors found in one device, each placed in the text.
struct Problems<'p> {
    pos: &'p Positions<'p>,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    fn bad(&mut self, span: Range<usize>, message: String) {
        self.errors.push(self.pos.error(span, message));
    }
}

/// Check one `[[device]]` table (`span`: where it is) and build its spec, or report every
/// error in it.
fn validate(
    raw: RawDevice,
    span: Range<usize>,
    pos: &Positions<'_>,
) -> Result<DeviceSpec, Vec<ConfigError>> {
    let mut problems = Problems {
        pos,
        errors: Vec::new(),
    };
    let name = raw.name.get_ref().clone();
    check_name(&raw.name, &mut problems);
    let kind = kind(&raw, &name, span.clone(), &mut problems);
    let transport = transport(&raw, &name, span, &mut problems);
    let queues = queues(raw.queues.as_ref(), &mut problems);
    let queue_size = queue_size(raw.queue_size.as_ref(), &mut problems);
    let poll_us = poll_us(raw.poll_us.as_ref(), &mut problems);
    let serial = serial(raw.serial.as_ref(), &name, &mut problems);
    let qos = qos::validate(raw.qos.as_ref(), kind.as_ref(), &mut problems);
    match (transport, kind) {
        (Some(transport), Some(kind)) if problems.errors.is_empty() => Ok(DeviceSpec {
            name,
            image: raw.image.map(Spanned::into_inner).unwrap_or_default(),
            kind,
            transport,
            queues,
            queue_size,
            read_only: raw.read_only,
            buffered: raw.buffered,
            serial,
            poll_us,
            qos,
        }),
        _ => Err(problems.errors),
    }
}

/// Exactly one of `image` and `net`; `mac` and `mtu` only with `net`. `None` when neither or
/// both are given, or the one given is wrong (an error is reported).
fn kind(
    raw: &RawDevice,
    name: &str,
    span: Range<usize>,
    problems: &mut Problems<'_>,
) -> Option<DeviceKind> {
    match (&raw.image, &raw.net) {
        (Some(_), Some(n)) => {
            problems.bad(
                n.span(),
                format!("device {name:?} has both image and net: keep one (image for a disk, net for a network device)"),
            );
            None
        }
        (None, None) => {
            problems.bad(
                span,
                format!("device {name:?} has neither image nor net: add image = \"PATH\" or net = \"switch:NAME\" (or \"tap:NAME\")"),
            );
            None
        }
        (Some(image), None) => {
            if let Err(e) = virtiod_backend::ImageSpec::parse(image.get_ref()) {
                problems.bad(image.span(), e.to_string());
            }
            for (key, at) in [
                ("mac", raw.mac.as_ref().map(Spanned::span)),
                ("mtu", raw.mtu.as_ref().map(Spanned::span)),
            ] {
                if let Some(at) = at {
                    problems.bad(
                        at,
                        format!(
                            "{key} is for net devices only: remove it or use net = \"switch:NAME\""
                        ),
                    );
                }
            }
            Some(DeviceKind::Blk)
        }
        (None, Some(net)) => {
            let backend = parse_net_backend(net.get_ref())
                .map_err(|e| problems.bad(net.span(), e))
                .ok();
            let mac = raw.mac.as_ref().and_then(|m| {
                parse_mac(m.get_ref())
                    .map_err(|e| problems.bad(m.span(), e))
                    .ok()
            });
            let mtu = raw.mtu.as_ref().and_then(|m| {
                check_mtu(*m.get_ref())
                    .map_err(|e| problems.bad(m.span(), e))
                    .ok()
            });
            let vduse = raw.vduse.is_some();
            if let Some(q) = raw.queues.as_ref().filter(|q| vduse && *q.get_ref() != 1) {
                problems.bad(
                    q.span(),
                    "a VDUSE net device has one queue pair (the kernel refuses the control queue \
                     multiqueue needs): remove queues, or serve it over vhost-user"
                        .into(),
                );
            }
            Some(DeviceKind::Net(NetSpec {
                backend: backend?,
                mac,
                mtu,
            }))
        }
    }
}

/// A device name: letters, digits, '.', '_' or '-', not empty.
fn check_name(name: &Spanned<String>, problems: &mut Problems<'_>) {
    let value = name.get_ref();
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        problems.bad(
            name.span(),
            format!("device name {value:?}: use letters, digits, '.', '_' or '-'"),
        );
    }
}

/// Exactly one of `vduse` and `vhost-user`, and `attach` only with `vduse`. `None` when
/// neither or both are given (an error is reported).
fn transport(
    raw: &RawDevice,
    name: &str,
    span: Range<usize>,
    problems: &mut Problems<'_>,
) -> Option<Transport> {
    match (&raw.vduse, &raw.vhost_user) {
        (Some(_), Some(v)) => {
            problems.bad(
                v.span(),
                format!("device {name:?} has both vduse and vhost-user: keep one"),
            );
            None
        }
        (None, None) => {
            problems.bad(
                span,
                format!("device {name:?} has no transport: add vduse = \"NAME\" or vhost-user = \"/path/to.sock\""),
            );
            None
        }
        (Some(v), None) => {
            let vname = v.get_ref();
            if vname.is_empty() || vname.len() > 255 || vname.contains('/') {
                problems.bad(
                    v.span(),
                    format!("VDUSE name {vname:?}: 1 to 255 bytes, no '/'"),
                );
            }
            Some(Transport::Vduse {
                name: vname.clone(),
                attach: raw.attach.as_ref().map_or(Attach::Virtio, |a| *a.get_ref()),
            })
        }
        (None, Some(s)) => {
            if let Some(a) = &raw.attach {
                problems.bad(
                    a.span(),
                    "attach is for VDUSE devices only: remove it or use vduse = \"NAME\"".into(),
                );
            }
            if s.get_ref().as_os_str().is_empty() {
                problems.bad(s.span(), "vhost-user socket path is empty".into());
            }
            Some(Transport::VhostUser(s.get_ref().clone()))
        }
    }
}

/// `queues`: 1 to [`MAX_QUEUES`], default 1.
fn queues(raw: Option<&Spanned<u16>>, problems: &mut Problems<'_>) -> u16 {
    let queues = raw.map_or(1, |q| *q.get_ref());
    if let Some(q) = raw.filter(|_| !(1..=MAX_QUEUES).contains(&queues)) {
        problems.bad(q.span(), format!("{queues} queues: give 1 to {MAX_QUEUES}"));
    }
    queues
}

/// `queue-size`: a power of two from 2, default 256.
fn queue_size(raw: Option<&Spanned<u16>>, problems: &mut Problems<'_>) -> u16 {
    let queue_size = raw.map_or(256, |q| *q.get_ref());
    if let Some(q) = raw.filter(|_| !queue_size.is_power_of_two() || queue_size < 2) {
        problems.bad(
            q.span(),
            format!("queue size {queue_size}: give a power of two from 2 to 32768 (e.g. 256)"),
        );
    }
    queue_size
}

/// `poll-us`: 0 to [`MAX_POLL_US`], default [`DEFAULT_POLL_US`].
fn poll_us(raw: Option<&Spanned<u64>>, problems: &mut Problems<'_>) -> u64 {
    let poll_us = raw.map_or(DEFAULT_POLL_US, |p| *p.get_ref());
    if let Some(p) = raw.filter(|_| poll_us > MAX_POLL_US) {
        problems.bad(
            p.span(),
            format!("poll-us {poll_us}: give 0 to {MAX_POLL_US}"),
        );
    }
    poll_us
}

/// `serial`: at most [`MAX_SERIAL`] bytes, default the device name cut to that length.
fn serial(raw: Option<&Spanned<String>>, name: &str, problems: &mut Problems<'_>) -> String {
    match raw {
        Some(s) if s.get_ref().len() > MAX_SERIAL => {
            problems.bad(
                s.span(),
                format!("serial {:?} is longer than {MAX_SERIAL} bytes", s.get_ref()),
            );
            String::new()
        }
        Some(s) => s.get_ref().clone(),
        None => cut(name, MAX_SERIAL),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Duplicate names, sockets and VDUSE names across devices. Positions are found again in the
/// text (the second occurrence is the one reported).
fn check_unique(
    devices: &[DeviceSpec],
    errors: &mut Vec<ConfigError>,
    pos: &Positions<'_>,
    text: &str,
) {
    let mut seen: HashMap<(&str, String), usize> = HashMap::new();
    for dev in devices {
        let mut keys = vec![("name", dev.name.clone())];
        match &dev.transport {
            Transport::VhostUser(p) => keys.push(("vhost-user", p.display().to_string())),
            Transport::Vduse { name, .. } => keys.push(("vduse", name.clone())),
        }
        for (key, value) in keys {
            let count = seen.entry((key, value.clone())).or_insert(0);
            *count += 1;
            if *count > 1 {
                let span = find_nth_value(text, key, &value, *count).unwrap_or(0..0);
                errors.push(pos.error(
                    span,
                    format!("duplicate {key} {value:?}: each device needs its own"),
                ));
            }
        }
    }
}

/// Where the `n`-th `key = "value"` assignment is (1-based `n`).
fn find_nth_value(text: &str, key: &str, value: &str, n: usize) -> Option<Range<usize>> {
    let mut found = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key) {
            if let Some(v) = rest.trim_start().strip_prefix('=') {
                let v = v.trim();
                let v = v.split('#').next().unwrap_or("").trim();
                if v.trim_matches(|c| c == '"' || c == '\'') == value {
                    found += 1;
                    if found == n {
                        let start = offset + (line.len() - trimmed.len());
                        return Some(start..start + trimmed.len());
                    }
                }
            }
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests;
