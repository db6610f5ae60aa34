//! Devices added with `virtiod ctl add` survive a SIGKILL of the daemon: the restarted
//! `virtiod run` serves them again with their data; removed ones stay gone; a corrupt record
//! is reported and skipped.

mod common;
mod ops_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use ops_common::*;

const LEN: usize = 65536;

/// `virtiod run` with its log in `log`, waiting for `sockets`.
fn start(cfg: &Path, control: &Path, state: &Path, log: &Path, sockets: &[PathBuf]) -> RunDaemon {
    let mut child = virtiod()
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .arg("--control")
        .arg(control)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn virtiod run");
    for s in sockets {
        wait_for_socket(s, &mut child);
    }
    RunDaemon { child }
}

#[test]
fn ctl_added_devices_survive_sigkill_and_removed_ones_stay_gone() {
    let dir = Scratch::new("persist");
    let (base, kept, gone) = (
        dir.path("base.sock"),
        dir.path("kept.sock"),
        dir.path("gone.sock"),
    );
    let (control, state, cfg) = (
        dir.path("ctl.sock"),
        dir.path("state"),
        dir.path("devices.toml"),
    );
    std::fs::write(&cfg, vhost_user_device("base", "mem:4M", &base)).unwrap();
    let image = dir.image("kept.img", 8 << 20);

    let daemon = start(
        &cfg,
        &control,
        &state,
        &dir.path("log1"),
        &[base.clone(), control.clone()],
    );
    let kept_spec = format!(
        "name = \"kept\"\nimage = \"{}\"\nvhost-user = \"{}\"\n",
        image.display(),
        kept.display()
    );
    let (code, _, err) = ctl(&control, &["add", &kept_spec]);
    assert_eq!(code, 0, "{err}");
    let gone_spec = format!(
        "{{\"name\":\"gone\",\"image\":\"mem:1M\",\"vhost-user\":\"{}\"}}",
        gone.display()
    );
    let (code, _, err) = ctl(&control, &["add", &gone_spec]);
    assert_eq!(code, 0, "{err}");
    assert!(state.join("devices/kept.json").is_file());
    assert!(state.join("devices/gone.json").is_file());
    {
        let mut client = Client::connect(&kept, 1, LEN).unwrap();
        fill_pattern(client.buf(), 0, 7);
        assert_eq!(client.write(0, 0, 0, LEN), 0);
        assert_eq!(client.flush(0), 0);
    }
    let (code, _, err) = ctl(&control, &["remove", "gone"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !state.join("devices/gone.json").exists(),
        "remove forgets the record"
    );
    std::fs::write(state.join("devices/broken.json"), "{ not a record").unwrap();

    // SIGKILL: nothing is cleaned up; the restarted daemon restores `kept` only.
    daemon.signal(libc::SIGKILL);
    drop(daemon);
    let log = dir.path("log2");
    let daemon = start(
        &cfg,
        &control,
        &state,
        &log,
        &[base.clone(), control.clone(), kept.clone()],
    );
    let (code, out, err) = ctl(&control, &["list"]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["base", "kept"], "{out}");
    assert!(out.lines().all(|l| l.contains(" up ")), "{out}");
    {
        let mut client = Client::connect(&kept, 1, LEN).unwrap();
        assert_eq!(client.capacity(), 8 << 20);
        client.buf().fill(0);
        assert_eq!(client.read(0, 0, 0, LEN), 0);
        check_pattern(client.buf(), 0, 7).unwrap();
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("skipping a recorded device") && text.contains("broken.json"),
        "the corrupt record is reported: {text}"
    );

    // Removed now: gone after the next restart too.
    let (code, _, err) = ctl(&control, &["remove", "kept"]);
    assert_eq!(code, 0, "{err}");
    daemon.signal(libc::SIGKILL);
    drop(daemon);
    let daemon = start(
        &cfg,
        &control,
        &state,
        &dir.path("log3"),
        &[base.clone(), control.clone()],
    );
    let (code, out, _) = ctl(&control, &["list"]);
    assert_eq!(code, 0);
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["base"], "{out}");
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status}");
}
