//! Least privilege: `serve --vhost-user` works as an unprivileged user, and another user
//! cannot talk to the control socket (mode 0600, and `SO_PEERCRED` checked even when the mode
//! is loosened).

mod common;

use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use common::*;
use virtiod_testkit::process::Served;

/// The unprivileged user and group the tests run things as (nobody / nogroup).
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `virtiod ctl --control PATH list`, as `uid` (root if None): (exit code, stdout, stderr).
fn ctl_list(control: &Path, uid: Option<u32>) -> (i32, String, String) {
    let mut cmd = virtiod();
    cmd.args(["ctl", "--control"]).arg(control).arg("list");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("run virtiod ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_vhost_user_as_an_unprivileged_user_round_trips() {
    if !is_root() {
        skip_or_fail("switching to an unprivileged user needs root");
        return;
    }
    let dir = Scratch::new("unpriv");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path("nobody");
    std::fs::create_dir(&home).unwrap();
    chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let img = dir.image("nobody/disk.img", 4 << 20);
    chown(&img, Some(NOBODY), Some(NOBODY)).unwrap();
    let sock = home.join("vu.sock");
    let mut cmd = virtiod();
    cmd.args(["serve", "--state-dir"])
        .arg(home.join("state"))
        .arg("--vhost-user")
        .arg(&sock)
        .arg(&img)
        .uid(NOBODY)
        .gid(NOBODY)
        .stderr(Stdio::inherit());
    let served = Served::start(cmd, &sock);
    let mut client = Client::connect(&sock, 1, 1 << 20).unwrap();
    fill_pattern(&mut client.buf()[..1 << 20], 0, 4);
    assert_eq!(client.write(0, 0, 0, 1 << 20), 0);
    assert_eq!(client.flush(0), 0);
    client.buf().fill(0);
    assert_eq!(client.read(0, 0, 0, 1 << 20), 0);
    check_pattern(&client.buf()[..1 << 20], 0, 4).unwrap();
    drop(client);
    let status = served.terminate();
    assert!(status.success(), "exit status {status}");
    check_pattern(&std::fs::read(&img).unwrap()[..1 << 20], 0, 4).unwrap();
}

#[test]
fn another_user_cannot_use_the_control_socket() {
    if !is_root() {
        skip_or_fail("switching to another user needs root");
        return;
    }
    let dir = Scratch::new("ctl-peer");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (sock, control) = (dir.path("vu.sock"), dir.path("ctl.sock"));
    let mut cmd = virtiod();
    cmd.args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .arg("mem:4M");
    let _served = Served::start(cmd, &sock);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    let (code, out, _) = ctl_list(&control, None);
    assert_eq!(code, 0, "root is answered");
    assert!(out.contains("vu"), "{out}");

    // The mode keeps another user out...
    let (code, out, err) = ctl_list(&control, Some(NOBODY));
    assert_ne!(code, 0, "another user is refused: {out}");
    assert!(err.contains("ermission denied"), "{err}");
    // ...and so does the peer check, when the mode is loosened by mistake.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out, err) = ctl_list(&control, Some(NOBODY));
    assert_ne!(code, 0, "another user gets no answer: {out}");
    assert!(
        !out.contains("vu"),
        "no device list for another user: {out}\n{err}"
    );
    let (code, _, _) = ctl_list(&control, None);
    assert_eq!(code, 0, "root still is answered");
}
