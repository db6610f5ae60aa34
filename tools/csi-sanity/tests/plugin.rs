//! The suite against the real plugin: `virtiod run` (the daemon, with a control socket) and
//! `virtiod-csi --role both` over it, started from this workspace's release binaries, on the
//! `local` source. Staging and publishing need VDUSE, which only the test VM has: those checks
//! are skipped here (`skip_node_io`) and run in the VM (`tests/vm/guest/csi-sanity.sh`, part of
//! `tests/vm/suite-csi.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_sanity::{Config, Outcome};

/// A child process killed and reaped at drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A release binary of this workspace (built by `cargo test --workspace` or
/// `cargo build --release -p virtiod -p virtiod-csi`).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --release -p virtiod -p virtiod-csi)",
        path.display()
    );
    path
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the process making {} exited: {status}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear in 20 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon and the plugin, in `dir`.
fn start(dir: &Path) -> (Proc, Proc, PathBuf) {
    let control = dir.join("control.sock");
    let devices = dir.join("devices.toml");
    std::fs::write(
        &devices,
        format!(
            "[[device]]\nname = \"keepalive\"\nimage = \"null:1M\"\nvhost-user = \"{}\"\n",
            dir.join("keepalive.sock").display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new(binary("virtiod"))
        .arg("run")
        .arg("--config")
        .arg(&devices)
        .arg("--control")
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.join("daemon-state"))
        .stdout(Stdio::null())
        .spawn()
        .expect("start virtiod run");
    wait_for(&control, &mut daemon);
    let daemon = Proc(daemon);

    let socket = dir.join("csi.sock");
    let mut plugin = Command::new(binary("virtiod-csi"))
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .args(["--node-id", "sanity-node", "--role", "both"])
        .arg("--daemon-socket")
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.join("csi-state"))
        .arg("--local-dir")
        .arg(dir.join("local"))
        .spawn()
        .expect("start virtiod-csi");
    wait_for(&socket, &mut plugin);
    (daemon, Proc(plugin), socket)
}

/// Checks virtiod-csi fails today, with what it answers: each a deviation from the spec to fix
/// in the plugin (then remove it here; the test fails when a listed check passes).
const KNOWN_DEVIATIONS: &[(&str, &str)] = &[];

#[test]
fn the_plugin_passes_every_check_that_needs_no_vduse() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, _plugin, socket) = start(dir.path());
    let mut config = Config::new(socket, dir.path().join("work"));
    config.skip_node_io = true;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(csi_sanity::run(&config)).unwrap();
    print!("{report}");
    for (name, outcome) in &report.checks {
        let known = KNOWN_DEVIATIONS.iter().find(|(n, _)| n == name);
        match (outcome, known) {
            (Outcome::Failed(why), Some((_, text))) => {
                assert!(why.contains(text), "{name}: fails otherwise now: {why}")
            }
            (Outcome::Failed(why), None) => panic!("{name}: {why}\n{report}"),
            (_, Some(_)) => panic!("{name}: listed as a known deviation but {outcome:?}: remove it from KNOWN_DEVIATIONS"),
            _ => {}
        }
    }

    // The checks that matter ran (a capability the plugin dropped would skip them silently).
    for name in [
        "Identity/GetPluginInfo: name and vendor_version",
        "Controller/CreateVolume: same name, other capacity -> ALREADY_EXISTS",
        "Controller/DeleteVolume: delete, then again -> OK both times",
        "Controller/ControllerExpandVolume: grows to at least the required size",
        "Controller/CreateVolume: from an unknown snapshot -> NOT_FOUND",
        "Controller/CreateVolume: from a snapshot -> its size at least, content_source echoed",
        "Controller/CreateSnapshot, DeleteSnapshot: required fields, idempotence",
        "Controller/CreateSnapshot: same name, other source volume -> ALREADY_EXISTS",
        "Controller/CreateSnapshot: a 128-byte name",
        "Node/NodeStageVolume: an unknown volume -> NOT_FOUND",
        "Node/NodeUnpublishVolume, NodeUnstageVolume: of a volume not there -> OK",
    ] {
        assert_eq!(
            report.outcome(name),
            Some(&Outcome::Passed),
            "{name}\n{report}"
        );
    }
    // Only the node I/O checks are skipped (snapshots are announced and checked).
    for (name, outcome) in &report.checks {
        if let Outcome::Skipped(why) = outcome {
            assert!(why.contains("--skip-node-io"), "{name}: {why}");
        }
    }
    // Every volume the suite made was deleted.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("local"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let snapshots: Vec<_> = std::fs::read_dir(dir.path().join("local/snapshots"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "volumes left behind: {left:?}, snapshots {snapshots:?}"
    );
}

#[test]
fn the_binary_sizes_volumes_with_test_volume_size_and_exits_1_on_failures() {
    // A size no local dir has free: every CreateVolume is refused, naming that size; the binary
    // prints the FAIL lines and the count, and exits 1.
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, _plugin, socket) = start(dir.path());
    let huge = 1u64 << 50;
    let out = Command::new(env!("CARGO_BIN_EXE_csi-sanity"))
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .args(["--skip-node-io", "--test-volume-size", &huge.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let sized = stdout
        .lines()
        .find(|l| {
            l.starts_with("FAIL Controller/CreateVolume: a volume of at least the required size")
        })
        .unwrap_or_else(|| panic!("no FAIL line for the sized volume:\n{stdout}"));
    assert!(sized.contains("ResourceExhausted"), "{sized}");
    assert!(
        sized.contains(&format!("less than the {huge} asked for")),
        "{sized}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.starts_with("csi-sanity: "), "{summary}");
    assert!(!summary.contains(" 0 failed"), "{summary}");

    // A size of 0 is refused before any call.
    let out = Command::new(env!("CARGO_BIN_EXE_csi-sanity"))
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .args(["--test-volume-size", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--test-volume-size"), "{stderr}");
}

#[test]
fn a_broken_plugin_is_reported() {
    // The suite against a socket nothing listens on: one error line, no report.
    let dir = tempfile::tempdir().unwrap();
    let config = Config::new(dir.path().join("none.sock"), dir.path().join("work"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = runtime
        .block_on(csi_sanity::run(&config))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("cannot connect to the plugin"), "{e}");
    assert!(e.contains("is it running"), "{e}");
}
