//! Least privilege for the whole daemon, beside the per-thread seccomp filters
//! (`crate::seccomp`): Landlock ([`landlock`]), capabilities narrowed after start-up
//! ([`caps`]) and the control socket's group ([`peer`]). See docs/security.md.
//!
//! `serve` and `run` call [`begin`] once their configuration is read and before any thread
//! starts, and [`started`] once every configured device and the control socket are up.

mod caps;
mod landlock;
mod peer;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use virtiod_backend::ImageSpec;
use virtiod_config::{DaemonSettings, DeviceKind, DeviceSpec, NetBackendSpec, Transport};

use crate::usage::Usage;

pub use landlock::kernel_abi as landlock_abi;

/// `--landlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LandlockMode {
    /// Restrict the files the daemon may open (a warning where the kernel has no Landlock).
    On,
    /// Restrict nothing.
    Off,
}

/// Confinement options of `serve` and `run`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Confinement (docs/security.md)")]
pub struct ConfineArgs {
    /// Landlock: the daemon may open only the files its configuration names (images, state
    /// directory, sockets, devices) and those under --allow-dir; off: no such limit.
    #[arg(long, value_enum, env = "VIRTIOD_LANDLOCK", default_value_t = LandlockMode::On)]
    pub landlock: LandlockMode,
    /// A directory where devices added later (ctl add) may have their images and sockets
    /// (read and write); repeatable; added to devices.toml's [daemon] allow-dirs.
    #[arg(long = "allow-dir", value_name = "DIR")]
    pub allow_dirs: Vec<PathBuf>,
    /// The control socket is made mode 0660 with this group, whose members may use it (besides
    /// root and the daemon's user); overrides devices.toml's [daemon] control-group.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
}

/// What [`begin`] decided, for the checks made later.
#[derive(Debug)]
struct State {
    /// Landlock is enforced: images and sockets of added devices must be under `allow_dirs`.
    landlock: bool,
    /// `--allow-dir` and `allow-dirs`, absolute (as given, and resolved).
    allow_dirs: Vec<PathBuf>,
    /// Where sockets may be created (beside the allowed directories).
    socket_dirs: Vec<PathBuf>,
    /// Images of the configuration (a removed device may be added again).
    images: Vec<PathBuf>,
    /// Capabilities the main and control threads keep.
    running: ::caps::CapsHashSet,
    /// The group admitted to the control socket.
    control_gid: Option<u32>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Environment variable: after restricting itself, the daemon opens this path and logs the
/// result (`virtiod: debug: opening PATH: ...`): the test that Landlock refuses it.
pub const FORBIDDEN_OPEN_ENV: &str = "VIRTIOD_DEBUG_LANDLOCK_OPEN";

/// What the daemon is about to set up.
pub struct Setup<'a> {
    /// The devices configured.
    pub specs: &'a [DeviceSpec],
    /// `--state-dir`.
    pub state_dir: &'a Path,
    /// `--control`.
    pub control: Option<&'a Path>,
    /// `--metrics`.
    pub metrics: Option<std::net::SocketAddr>,
}

/// `run`: [`begin`] with the `[daemon]` table of `config`.
pub fn begin_run(args: &ConfineArgs, config: &Path, setup: &Setup<'_>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| Usage(format!("cannot read {}: {e}", config.display())))?;
    let daemon = virtiod_config::parse_daemon(&text)
        .map_err(|e| Usage(format!("{}:{e}", config.display())))?;
    begin(args, &daemon, setup)
}

/// Resolve the control group, restrict the process with Landlock (unless off), and narrow
/// the main thread's capabilities to what start-up needs (the threads it starts inherit
/// them). Call from the main thread before any thread starts.
pub fn begin(args: &ConfineArgs, daemon: &DaemonSettings, setup: &Setup<'_>) -> anyhow::Result<()> {
    let Setup {
        specs,
        state_dir,
        control,
        metrics,
    } = *setup;
    let group = args
        .control_group
        .as_ref()
        .or(daemon.control_group.as_ref());
    let control_gid = match (group, control) {
        (Some(g), Some(_)) => Some(peer::resolve_group(g)?),
        (Some(_), None) => {
            return Err(Usage(
                "a control group without a control socket: add --control PATH".into(),
            )
            .into())
        }
        (None, _) => None,
    };
    let mut allow_dirs = Vec::new();
    for dir in args.allow_dirs.iter().chain(&daemon.allow_dirs) {
        let abs = absolute(dir);
        if !abs.is_dir() {
            return Err(Usage(format!(
                "allowed directory {} is not a directory: create it, or fix --allow-dir / allow-dirs",
                dir.display()
            ))
            .into());
        }
        if let Ok(real) = abs.canonicalize() {
            allow_dirs.push(real);
        }
        allow_dirs.push(abs);
    }
    let mut needs = needs_of(specs);
    let work = caps::Work {
        vduse: specs
            .iter()
            .any(|s| matches!(s.transport, Transport::Vduse { .. })),
        tap: specs.iter().any(|s| {
            matches!(&s.kind, DeviceKind::Net(n) if matches!(n.backend, NetBackendSpec::Tap(_)))
        }),
        control: control.is_some(),
    };
    if let Some(c) = control {
        needs.socket_dirs.push(parent_of(&absolute(c)));
        needs.ceph = true; // an RBD device may be added
    }
    // VDUSE devices keep their in-flight logs here: make it now (Landlock allows no mkdir),
    // root's alone (a forged log would be replayed into a device on restart).
    if work.vduse || work.control {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir);
    }
    needs.write_dirs.push(absolute(state_dir));
    needs.write_dirs.extend(allow_dirs.iter().cloned());
    needs.exe = std::env::current_exe().ok();
    let landlock = args.landlock == LandlockMode::On && restrict(&needs)?;
    if landlock {
        if let Ok(path) = std::env::var(FORBIDDEN_OPEN_ENV) {
            match std::fs::File::open(&path) {
                Ok(_) => eprintln!("virtiod: debug: opening {path}: opened"),
                Err(e) => eprintln!("virtiod: debug: opening {path}: refused: {e}"),
            }
        }
    }
    let running = caps::running_set(work);
    let mut start_up = running.clone();
    if control_gid.is_some() {
        start_up.insert(::caps::Capability::CAP_CHOWN); // the control socket's group
    }
    if metrics.is_some_and(|a| (1..1024).contains(&a.port())) {
        start_up.insert(::caps::Capability::CAP_NET_BIND_SERVICE);
    }
    narrow_or_exit(&start_up, "the main");
    let _ = STATE.set(State {
        landlock,
        allow_dirs,
        socket_dirs: needs.socket_dirs,
        images: needs.images.into_iter().map(|(p, _)| p).collect(),
        running,
        control_gid,
    });
    Ok(())
}

/// Landlock as planned: true when something is enforced.
fn restrict(needs: &landlock::Needs) -> anyhow::Result<bool> {
    let rules = landlock::rules(needs);
    // Without CAP_SYS_ADMIN the kernel wants no_new_privs; with it, leave it unset so that
    // an upgraded binary started by root regains its capabilities.
    let nnp = !caps::has_sys_admin();
    let outcome = match landlock::restrict(&rules, nnp) {
        Ok(outcome) => outcome,
        // Landlock stacks at most 16 domains: after many upgrades (each new daemon adds its
        // own on top of the one it inherits), keep the inherited one, as strict as ours.
        Err(e) if too_many_layers(&e) => {
            tracing::warn!("landlock: this process already runs in 16 nested domains (upgrades): keeping the inherited one");
            landlock::Outcome::Full
        }
        Err(e) => {
            return Err(anyhow::Error::from(e).context(
                "cannot restrict the daemon's files with Landlock: run with --landlock off to serve without it",
            ))
        }
    };
    match outcome {
        landlock::Outcome::Full => tracing::info!(rules = rules.len(), "landlock: enforced"),
        landlock::Outcome::Partial => tracing::info!(
            abi = landlock::kernel_abi(),
            "landlock: enforced with the rights this kernel knows"
        ),
        landlock::Outcome::None => tracing::warn!(
            "landlock: this kernel has none (or it is disabled at boot): the daemon's files are not confined; see docs/security.md"
        ),
    }
    Ok(outcome != landlock::Outcome::None)
}

/// Whether `restrict_self` failed with E2BIG (the 16-domain limit).
fn too_many_layers(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.raw_os_error() == Some(libc::E2BIG);
        }
        cause = c.source();
    }
    false
}

/// What the configured devices use.
fn needs_of(specs: &[DeviceSpec]) -> landlock::Needs {
    let mut needs = landlock::Needs::default();
    for spec in specs {
        if let Transport::VhostUser(socket) = &spec.transport {
            needs.socket_dirs.push(parent_of(&absolute(socket)));
        }
        if !matches!(spec.kind, DeviceKind::Blk) {
            continue;
        }
        match ImageSpec::parse(&spec.image) {
            Ok(ImageSpec::Path(p)) => needs.images.push((absolute(&p), !spec.read_only)),
            Ok(ImageSpec::Qcow2(p)) => {
                let p = absolute(&p);
                needs.read_dirs.push(parent_of(&p));
                needs.images.push((p, !spec.read_only));
            }
            Ok(ImageSpec::Rbd(addr)) => {
                needs.ceph = true;
                if let Some(conf) = &addr.conf {
                    let conf = absolute(conf);
                    // The keyring and other files the configuration names usually sit beside it.
                    needs.read_dirs.push(parent_of(&conf));
                    needs.read_files.push(conf);
                }
                needs
                    .read_files
                    .extend(addr.keyring.iter().map(|k| absolute(k)));
            }
            _ => {}
        }
    }
    needs
}

/// `ctl add`: with Landlock on, the device's image file and socket must be where the rules
/// allow; say which option to set rather than let the open fail.
pub fn check_added(spec: &DeviceSpec) -> anyhow::Result<()> {
    let Some(state) = STATE.get().filter(|s| s.landlock) else {
        return Ok(());
    };
    let under = |path: &Path, dirs: &[PathBuf]| dirs.iter().any(|d| path.starts_with(d));
    let path = match ImageSpec::parse(&spec.image) {
        Ok(ImageSpec::Path(p) | ImageSpec::Qcow2(p)) if matches!(spec.kind, DeviceKind::Blk) => {
            Some(normalize(&absolute(&p)))
        }
        _ => None,
    };
    if let Some(path) = path {
        if !under(&path, &state.allow_dirs) && !state.images.contains(&path) {
            anyhow::bail!(
                "image {} is outside the directories this daemon may open (Landlock): restart it with --allow-dir DIR (or [daemon] allow-dirs in devices.toml) naming a directory that holds it",
                path.display()
            );
        }
    }
    if let Transport::VhostUser(socket) = &spec.transport {
        let dir = parent_of(&normalize(&absolute(socket)));
        if !under(&dir, &state.allow_dirs) && !state.socket_dirs.contains(&dir) {
            anyhow::bail!(
                "socket {} is outside the directories this daemon may create sockets in (Landlock): restart it with --allow-dir {} (or [daemon] allow-dirs in devices.toml), or put the socket beside the control socket",
                socket.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// The calling thread drops to what it needs after start-up: the control socket's threads
/// keep the running set, the others (signals, metrics) nothing.
pub fn enter_service_thread() {
    let keep = match (STATE.get(), std::thread::current().name()) {
        (Some(state), Some("control" | "control-worker")) => state.running.clone(),
        _ => ::caps::CapsHashSet::new(),
    };
    narrow_or_exit(&keep, "a service");
}

/// Start-up is over: the main thread keeps only the running set.
pub fn started() {
    let keep = STATE.get().map(|s| s.running.clone()).unwrap_or_default();
    narrow_or_exit(&keep, "the main");
    tracing::debug!(kept = ?keep, "capabilities narrowed");
}

fn narrow_or_exit(keep: &::caps::CapsHashSet, what: &str) {
    if let Err(e) = caps::narrow_thread(keep) {
        eprintln!("virtiod: error: cannot narrow the capabilities of {what} thread: {e}");
        std::process::exit(1);
    }
}

/// The control socket: mode 0600, or 0660 with the control group.
pub fn secure_control_socket(path: &Path) -> anyhow::Result<()> {
    let gid = STATE.get().and_then(|s| s.control_gid);
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot give the control socket {} group {gid}",
                path.display()
            )
        })?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| {
        format!(
            "cannot make the control socket {} mode {mode:o}",
            path.display()
        )
    })
}

/// Admit or refuse a control connection: root, the daemon's user and members of the control
/// group are admitted; anyone else gets one JSON line saying why, and is closed.
pub fn admit_control_peer(stream: &mut UnixStream) -> std::io::Result<bool> {
    let peer = peer::Peer::of(stream)?;
    let gid = STATE.get().and_then(|s| s.control_gid);
    if peer.admitted(rustix::process::geteuid().as_raw(), gid) {
        return Ok(true);
    }
    let who = match gid {
        Some(g) => format!("root, the daemon's user and members of group {g}"),
        None => "root and the daemon's user (start it with --control-group to admit a group)"
            .to_string(),
    };
    let error = format!(
        "user {} (group {}) may not use this control socket: it admits {who}",
        peer.uid, peer.gid
    );
    tracing::warn!(
        uid = peer.uid,
        gid = peer.gid,
        "refused a control connection: {error}"
    );
    let mut line = serde_json::json!({ "ok": false, "error": error }).to_string();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes());
    Ok(false)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// `..` and `.` removed lexically (symbolic links are the kernel's business: Landlock checks
/// the file a path resolves to).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sixteen_domain_limit_is_recognized() {
        assert!(
            landlock::kernel_abi() >= 1,
            "this test needs a kernel with Landlock"
        );
        // Landlock applies to the calling thread: a thread of its own, ended after.
        std::thread::spawn(|| {
            let nnp = !caps::has_sys_admin();
            for _ in 0..16 {
                landlock::restrict(&[], nnp).unwrap();
            }
            let err = landlock::restrict(&[], nnp).unwrap_err();
            assert!(too_many_layers(&err), "{err}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn normalizes_lexically() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("/a/../../x")), PathBuf::from("/x"));
    }

    #[test]
    fn needs_follow_the_image_kinds() {
        let mut spec = virtiod_config::parse_device(
            "name = \"a\"\nimage = \"qcow2:/img/a.qcow2\"\nvhost-user = \"/run/vu/a.sock\"\nread-only = true\n",
        )
        .unwrap();
        let needs = needs_of(std::slice::from_ref(&spec));
        assert_eq!(needs.images, vec![(PathBuf::from("/img/a.qcow2"), false)]);
        assert_eq!(needs.read_dirs, vec![PathBuf::from("/img")]);
        assert_eq!(needs.socket_dirs, vec![PathBuf::from("/run/vu")]);
        spec.image = "rbd:p/i?conf=/c/ceph.conf&keyring=/k/key".into();
        let needs = needs_of(std::slice::from_ref(&spec));
        assert!(needs.images.is_empty());
        assert_eq!(needs.read_dirs, vec![PathBuf::from("/c")]);
        assert_eq!(
            needs.read_files,
            vec![PathBuf::from("/c/ceph.conf"), PathBuf::from("/k/key")]
        );
        spec.image = "mem:1M".into();
        assert!(needs_of(&[spec]).images.is_empty());
    }
}
