//! Command-line interface.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Software-defined virtio devices served from user space.
#[derive(Debug, Parser)]
#[command(
    name = "virtiod",
    version,
    about,
    propagate_version = true,
    after_help = "Examples:\n  \
        virtiod doctor                                      # can this host serve VDUSE?\n  \
        virtiod serve --vduse vd0 disk.img                  # one device: the host gets /dev/vdX\n  \
        virtiod serve --vhost-user /run/virtiod/d0.sock --metrics 127.0.0.1:9810 disk.img\n  \
        virtiod run --config /etc/virtiod/devices.toml --control /run/virtiod/control.sock\n  \
        virtiod ctl --control /run/virtiod/control.sock list\n\n\
        Each command has its own examples: virtiod help COMMAND. Operations: docs/operations.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    /// Seccomp filters of the threads that read driver and frontend input (serve, run):
    /// on (a call outside a thread's list ends the process, naming the call), log (the kernel
    /// logs such calls, to learn a list), off.
    #[arg(long, global = true, value_enum, env = "VIRTIOD_SECCOMP", default_value_t = crate::seccomp::Mode::On)]
    pub seccomp: crate::seccomp::Mode,
    #[command(subcommand)]
    pub command: Command,
}

/// Logging options (every command).
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level (error, warn, info, debug, trace) or a tracing filter; RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where a VDUSE device goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachArg {
    /// virtio_vdpa: the host gets a block device /dev/vdX, or a network interface (no VM).
    Virtio,
    /// vhost_vdpa: /dev/vhost-vdpa-N for a VM or a user-space driver.
    Vhost,
    /// Create the device only; attach it yourself (vdpa dev add name NAME mgmtdev vduse).
    None,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one disk image as a virtio-blk device (or a virtio-net device: net:switch=NAME, net:tap=NAME).
    #[command(after_help = "Examples:\n  \
        virtiod serve --vduse vd0 disk.img                    # the host gets /dev/vdX\n  \
        virtiod serve --vduse vd1 --attach vhost disk.img     # /dev/vhost-vdpa-N for a VM\n  \
        virtiod serve --vhost-user /run/virtiod/disk0.sock disk.img\n  \
        virtiod serve --vhost-user /tmp/vu.sock --queues 4 --serial vol-7 /dev/nvme0n1p3\n  \
        virtiod serve --vhost-user /tmp/vu.sock --read-only base.img\n  \
        virtiod serve --vhost-user /tmp/vu.sock mem:256M\n  \
        virtiod serve --vhost-user /tmp/vu.sock --iops 2000 --write-bps 50M disk.img   # QoS limits\n  \
        virtiod serve --vduse vd0 --metrics 127.0.0.1:9810 --control /run/virtiod/ctl.sock disk.img\n  \
        virtiod serve --vduse vnet0 --mac 52:54:00:12:34:56 net:switch=sw0   # the host gets a network interface\n  \
        virtiod serve --vhost-user /tmp/net0.sock --mtu 9000 net:switch=sw0\n  \
        virtiod serve --vhost-user /run/virtiod/n0.sock net:tap=tap0   # QEMU -netdev vhost-user; then: ip link set tap0 up\n\n\
        IMAGE is a raw image file or block device (PATH or raw:PATH; formats are never probed),\n\
        a qcow2 image (qcow2:PATH, backing chain read-only), mem:SIZE (RAM), null:SIZE (discards writes),\n\
        an NBD export (nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT),\n\
        a Ceph RBD image (rbd:POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT&keyring=PATH]),\n\
        or net:switch=NAME: a virtio-net device on the in-process switch NAME,\n\
        or net:tap=NAME: a virtio-net device on the tap interface NAME (created, or attached to).")]
    Serve(ServeArgs),
    /// Check whether this host can serve VDUSE devices, and what to do about what is missing.
    #[command(after_help = "Examples:\n  \
        virtiod doctor                         # one line per check: OK, WARN or FAIL, and the fix\n  \
        virtiod doctor --json | jq '.[] | select(.status != \"OK\")'\n  \
        virtiod doctor --image qcow2:/var/lib/images/vm.qcow2   # does it open, in that format?\n  \
        virtiod doctor --state-dir /var/lib/virtiod\n\n\
        Exit status: 0 when VDUSE serving is possible, 1 when a FAIL line makes it impossible.")]
    Doctor(DoctorArgs),
    /// Serve every device of a devices.toml from one daemon.
    #[command(after_help = "Examples:\n  \
        virtiod run --config /etc/virtiod/devices.toml\n  \
        virtiod run --config devices.toml --state-dir /var/lib/virtiod\n\n\
        devices.toml (keys in kebab-case; exactly one of vduse / vhost-user per device):\n\n  \
        [[device]]\n  \
        name = \"a\"\n  \
        image = \"/var/lib/images/a.img\"   # or qcow2:PATH, null:SIZE, mem:SIZE; or net = \"switch:NAME\"\n  \
        vduse = \"vd-a\"                    # or: vhost-user = \"/run/virtiod/a.sock\"\n  \
        queues = 2\n  \
        queue-size = 256\n  \
        read-only = false\n  \
        serial = \"a\"\n  \
        attach = \"virtio\"                 # VDUSE only: virtio | vhost | none\n  \
        [device.qos]                      # optional: iops, read-iops, write-iops, bps, ... (+ -burst)\n  \
        iops = 2000\n  \
        write-bps = \"50M\"\n\n\
        Every error in the file is reported with its line and column before anything starts;\n\
        a device that fails to start is logged and the others are served. Prints one line per\n\
        started device: NAME ENDPOINT. SIGTERM stops every device cleanly.")]
    Run(RunArgs),
    /// Talk to a running daemon's control socket: list, add, remove, stats, qos, resize, upgrade.
    #[command(after_help = "Examples:\n  \
        virtiod ctl --control /run/virtiod/ctl.sock list\n  \
        virtiod ctl --control /run/virtiod/ctl.sock add 'name = \"c\"\n\
        image = \"mem:1G\"\n\
        vhost-user = \"/run/virtiod/c.sock\"'\n  \
        virtiod ctl --control /run/virtiod/ctl.sock add '{\"name\": \"d\", \"image\": \"/img/d.img\", \"vduse\": \"vd-d\"}'\n  \
        virtiod ctl --control /run/virtiod/ctl.sock add device-c.toml\n  \
        virtiod ctl --control /run/virtiod/ctl.sock remove c\n  \
        virtiod ctl --control /run/virtiod/ctl.sock stats c\n  \
        virtiod ctl --control /run/virtiod/ctl.sock --json stats\n  \
        virtiod ctl --control /run/virtiod/ctl.sock qos c --iops 2000\n  \
        virtiod ctl --control /run/virtiod/ctl.sock resize c 2G\n\n\
        The daemon must run with --control PATH (serve or run).")]
    Ctl(CtlArgs),
}

/// `virtiod ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its --control PATH).
    #[arg(long, value_name = "PATH")]
    pub control: std::path::PathBuf,
    /// Print the daemon's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What to ask the daemon.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Every device: name, transport, endpoint, up or DOWN (with the reason).
    List,
    /// Start a device: TOML (keys of one `[[device]]` table), a JSON object, or a file of either.
    Add {
        /// The device description, or a file holding it.
        #[arg(value_name = "DEVICE")]
        device: String,
    },
    /// Replace the daemon by a new binary without re-creating a device (SIGUSR2 does the same
    /// with the defaults): the new process takes every device over, the old one exits; if the
    /// new one fails, the old one serves on.
    #[command(after_help = "Examples:\n  \
        virtiod ctl --control /run/virtiod/ctl.sock upgrade                  # the same path, a new file\n  \
        virtiod ctl --control /run/virtiod/ctl.sock upgrade --binary /opt/virtiod-2/virtiod --timeout 60\n\n\
        Operations: docs/operations.md, \"Upgrade in place\".")]
    Upgrade {
        /// The new binary (default: the path the daemon was started from).
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
        /// Seconds the new process has to open every image and confirm it serves.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Stop a device (completes its I/O, flushes, removes its socket or VDUSE device).
    Remove {
        /// Its name.
        name: String,
    },
    /// Request counters of one device, or of all.
    Stats {
        /// Its name (all devices when left out).
        name: Option<String>,
    },
    /// Resize a blk device while it serves: the image grows (or, with --shrink, shrinks) and
    /// the driver is told (a config-change interrupt), so /dev/vdX or the guest's disk
    /// changes size without a detach.
    #[command(after_help = "Examples:\n  \
        virtiod ctl --control /run/virtiod/ctl.sock resize a 20G\n  \
        virtiod ctl --control /run/virtiod/ctl.sock resize a 512M --shrink   # data past 512M is lost\n\n\
        A file image is truncated to the new size; a block device must already have it (grow\n\
        the volume first); mem: and null: take any size. Then grow the filesystem (resize2fs).")]
    Resize {
        /// The device's name.
        name: String,
        /// The new size in bytes or with a unit (K, M, G, T; binary), a multiple of 512.
        size: String,
        /// Allow a smaller size (everything past the new end is lost).
        #[arg(long)]
        shrink: bool,
    },
    /// Show or change a blk device's QoS limits while it serves: the limits given replace
    /// all of its limits (a limit not given is lifted); none given shows them.
    #[command(after_help = "Examples:\n  \
        virtiod ctl --control /run/virtiod/ctl.sock qos a                     # show\n  \
        virtiod ctl --control /run/virtiod/ctl.sock qos a --iops 2000\n  \
        virtiod ctl --control /run/virtiod/ctl.sock qos a --read-bps 100M --write-iops 500 --write-iops-burst 50\n  \
        virtiod ctl --control /run/virtiod/ctl.sock qos a --clear             # no limits")]
    Qos {
        /// The device's name.
        name: String,
        /// Lift every limit.
        #[arg(long, conflicts_with_all = QOS_ARG_IDS)]
        clear: bool,
        #[command(flatten)]
        limits: Box<QosArgs>,
    },
}

/// The ids of the [`QosArgs`] options (for `conflicts_with_all`).
const QOS_ARG_IDS: [&str; 12] = [
    "iops",
    "read_iops",
    "write_iops",
    "bps",
    "read_bps",
    "write_bps",
    "iops_burst",
    "read_iops_burst",
    "write_iops_burst",
    "bps_burst",
    "read_bps_burst",
    "write_bps_burst",
];

/// QoS limits of a blk device (`serve`, `ctl qos`); the same names as `[device.qos]` in
/// devices.toml. Requests over a limit wait, they never fail.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "QoS (blk devices; 0: no limit)")]
pub struct QosArgs {
    /// Requests per second, reads and writes together.
    #[arg(long, value_name = "N")]
    pub iops: Option<String>,
    /// Read requests per second.
    #[arg(long, value_name = "N")]
    pub read_iops: Option<String>,
    /// Write requests per second (writes, discards, write-zeroes).
    #[arg(long, value_name = "N")]
    pub write_iops: Option<String>,
    /// Bytes per second, reads and writes together (e.g. 100M).
    #[arg(long, value_name = "SIZE")]
    pub bps: Option<String>,
    /// Bytes read per second.
    #[arg(long, value_name = "SIZE")]
    pub read_bps: Option<String>,
    /// Bytes written per second.
    #[arg(long, value_name = "SIZE")]
    pub write_bps: Option<String>,
    /// Requests that may go at once after an idle time (default: --iops / 10).
    #[arg(long, value_name = "N", requires = "iops")]
    pub iops_burst: Option<String>,
    /// Burst of --read-iops.
    #[arg(long, value_name = "N", requires = "read_iops")]
    pub read_iops_burst: Option<String>,
    /// Burst of --write-iops.
    #[arg(long, value_name = "N", requires = "write_iops")]
    pub write_iops_burst: Option<String>,
    /// Burst of --bps (bytes).
    #[arg(long, value_name = "SIZE", requires = "bps")]
    pub bps_burst: Option<String>,
    /// Burst of --read-bps (bytes).
    #[arg(long, value_name = "SIZE", requires = "read_bps")]
    pub read_bps_burst: Option<String>,
    /// Burst of --write-bps (bytes).
    #[arg(long, value_name = "SIZE", requires = "write_bps")]
    pub write_bps_burst: Option<String>,
}

impl QosArgs {
    /// The options given, as `(name, value)` pairs in devices.toml's names.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let values = [
            &self.iops,
            &self.read_iops,
            &self.write_iops,
            &self.bps,
            &self.read_bps,
            &self.write_bps,
            &self.iops_burst,
            &self.read_iops_burst,
            &self.write_iops_burst,
            &self.bps_burst,
            &self.read_bps_burst,
            &self.write_bps_burst,
        ];
        virtiod_config::QOS_KEYS
            .iter()
            .zip(values)
            .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
            .collect()
    }
}

/// `virtiod run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The devices file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: std::path::PathBuf,
    /// Where VDUSE devices keep their in-flight logs.
    #[arg(long, value_name = "DIR", default_value = "/run/virtiod")]
    pub state_dir: std::path::PathBuf,
    /// Serve Prometheus metrics on http://ADDR/metrics: a port alone binds 127.0.0.1 (e.g.
    /// 9810); give ADDR:PORT to listen elsewhere (e.g. 0.0.0.0:9810).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Accept control commands (JSON lines; see `virtiod ctl`) on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,
    /// What a stop (SIGTERM, SIGINT) does with VDUSE devices: `remove` them (the default), or
    /// `keep` them in the kernel, flushed, for the next `virtiod run` with the same state
    /// directory to re-open (their drivers wait instead of losing the device); overrides
    /// devices.toml's `[daemon]` on-stop.
    #[arg(long, value_name = "remove|keep", env = "VIRTIOD_ON_STOP")]
    pub on_stop: Option<virtiod_config::OnStop>,
    #[command(flatten)]
    pub confine: crate::confine::ConfineArgs,
    /// Take the devices over from the daemon that started this process (`ctl upgrade`):
    /// the hand-over socket it inherited.
    #[arg(long, value_name = "FD", hide = true)]
    pub takeover_fd: Option<i32>,
}

/// `virtiod doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print a JSON array of {check, status, detail, fix}.
    #[arg(long)]
    pub json: bool,
    /// The state directory whose filesystem is probed for O_DIRECT.
    #[arg(long, value_name = "DIR", default_value = "/run/virtiod")]
    pub state_dir: std::path::PathBuf,
    /// Also check that this image spec opens (read-only) in the format it names, and warn when
    /// a file served raw looks like qcow2 or another format; repeatable. Does not change the
    /// exit status.
    #[arg(long = "image", value_name = "SPEC")]
    pub images: Vec<String>,
}

/// `virtiod serve`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["vhost_user", "vduse"])))]
pub struct ServeArgs {
    /// Serve over vhost-user on this unix socket (for QEMU, cloud-hypervisor, libblkio).
    #[arg(long, value_name = "SOCKET")]
    pub vhost_user: Option<std::path::PathBuf>,
    /// Serve through VDUSE as the device NAME (/dev/vduse/NAME; needs root and the vduse module).
    #[arg(long, value_name = "NAME")]
    pub vduse: Option<String>,
    /// VDUSE only: which vDPA bus driver gets the device.
    #[arg(long, value_enum, default_value_t = AttachArg::Virtio, requires = "vduse")]
    pub attach: AttachArg,
    /// VDUSE only: where the in-flight log lives, so that a restarted daemon (after a crash or
    /// SIGKILL) re-opens the device and completes every request that was in flight.
    #[arg(long, value_name = "DIR", default_value = "/run/virtiod")]
    pub state_dir: std::path::PathBuf,
    /// Refuse writes (the driver sees a read-only disk).
    #[arg(long)]
    pub read_only: bool,
    /// Number of request queues (one thread each); for a net device, queue pairs (more than
    /// one over vhost-user only: they need the control queue VDUSE refuses).
    #[arg(long, default_value_t = 1, value_parser = parse_queues)]
    pub queues: u16,
    /// Size of each queue (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Use the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Largest adaptive busy-poll window of each queue, in microseconds: a queue polls after
    /// its last request only while requests keep arriving within the window (0: never poll).
    #[arg(long, value_name = "US", default_value_t = virtiod_config::DEFAULT_POLL_US, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,
    /// Serial number returned to the driver (at most 20 bytes).
    #[arg(long, default_value = "virtiod")]
    pub serial: String,
    /// Serve Prometheus metrics on http://ADDR/metrics: a port alone binds 127.0.0.1 (e.g.
    /// 9810); give ADDR:PORT to listen elsewhere (e.g. 0.0.0.0:9810).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Accept control commands (JSON lines; see `virtiod ctl`) on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,
    /// Net devices only: the MAC address (otherwise a locally administered one derived from the
    /// VDUSE name or the socket path: the same on every start).
    #[arg(long, value_name = "MAC", value_parser = virtiod_config::parse_mac)]
    pub mac: Option<virtiod_config::Mac>,
    /// Net devices only: the MTU (default 1500).
    #[arg(long, value_name = "BYTES", value_parser = parse_mtu)]
    pub mtu: Option<u16>,
    #[command(flatten)]
    pub qos: Box<QosArgs>,
    /// What a stop (SIGTERM, SIGINT) does with a VDUSE device: `remove` it (the default) or
    /// `keep` it in the kernel, flushed, for the next `serve` of the same name and state
    /// directory to re-open.
    #[arg(long, value_name = "remove|keep", env = "VIRTIOD_ON_STOP")]
    pub on_stop: Option<virtiod_config::OnStop>,
    #[command(flatten)]
    pub confine: crate::confine::ConfineArgs,
    /// The image: a file or block device path (or raw:PATH), qcow2:PATH, mem:SIZE, null:SIZE, an
    /// nbd:// or nbd+unix:// URI; or net:switch=NAME for
    /// a virtio-net device on the in-process switch NAME, net:tap=NAME on the tap NAME.
    #[arg(value_name = "IMAGE")]
    pub image: String,
}

/// `PORT` (on 127.0.0.1) or `ADDR:PORT`.
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not a port or ADDR:PORT (e.g. 9810 for 127.0.0.1:9810, or [::1]:9810)")
    })
}

fn parse_mtu(s: &str) -> Result<u16, String> {
    let n: u16 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number from 68 to 65535"))?;
    virtiod_config::check_mtu(n)
}

fn parse_queues(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if n == 0 || n > 64 {
        return Err(format!("{n} queues: give 1 to 64"));
    }
    Ok(n)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !n.is_power_of_two() || !(2..=32768).contains(&n) {
        return Err(format!(
            "queue size {n}: give a power of two from 2 to 32768 (e.g. 256)"
        ));
    }
    Ok(n as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_address_defaults_to_loopback() {
        assert_eq!(
            parse_metrics_addr("9810").unwrap().to_string(),
            "127.0.0.1:9810"
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9810").unwrap().to_string(),
            "0.0.0.0:9810"
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9810").unwrap().to_string(),
            "[::1]:9810"
        );
        assert!(parse_metrics_addr("localhost")
            .unwrap_err()
            .contains("ADDR:PORT"));
    }

    #[test]
    fn validates_queues() {
        assert!(parse_queues("0").is_err());
        assert!(parse_queues("65").is_err());
        assert_eq!(parse_queues("4"), Ok(4));
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("0").is_err());
        assert!(parse_queue_size("65536").is_err());
        assert_eq!(parse_queue_size("1024"), Ok(1024));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
