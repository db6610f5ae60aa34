//! Least privilege: `serve --vhost-user` works as an unprivileged user, and another user
//! cannot talk to the control socket (mode 0600, and `SO_PEERCRED` checked even when the mode
//! is loosened; members of --control-group are admitted), and every thread keeps only the
//! capabilities its configuration needs after start-up.

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

/// CapEff of this test process (the daemon starts with the same sets).
fn own_cap_eff() -> u64 {
    cap_eff(&std::fs::read_to_string("/proc/self/status").unwrap())
}

fn cap_eff(status: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line");
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// (thread name, CapEff) of every thread of `pid`.
fn threads_cap_eff(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        out.push((comm.trim().to_string(), cap_eff(&status)));
    }
    out.sort();
    out
}

/// Wait (at most 10 s) until the main thread has narrowed its set to `main`, then check that
/// every thread has exactly the set `expected` gives its name.
fn assert_thread_caps(pid: u32, main: u64, expected: impl Fn(&str) -> u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let main_of = |t: &[(String, u64)]| t.iter().find(|(n, _)| n == "virtiod").map(|(_, c)| *c);
    let mut threads = threads_cap_eff(pid);
    while main_of(&threads) != Some(main) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        threads = threads_cap_eff(pid);
    }
    for (name, caps) in &threads {
        assert_eq!(
            *caps,
            expected(name),
            "thread {name}: CapEff {caps:#x}; all threads: {threads:x?}"
        );
    }
}

const CAP_NET_ADMIN: u64 = 1 << 12;

#[test]
fn capabilities_after_start_up_are_what_the_configuration_needs() {
    if !is_root() {
        skip_or_fail("capabilities to narrow need root");
        return;
    }
    let net_admin = own_cap_eff() & CAP_NET_ADMIN;
    let dir = Scratch::new("caps");
    // vhost-user only, with metrics: no thread keeps any capability.
    let sock = dir.path("a.sock");
    let mut cmd = virtiod();
    cmd.args(["serve", "--metrics", "0", "--vhost-user"])
        .arg(&sock)
        .arg("mem:4M");
    let served = Served::start(cmd, &sock);
    assert_thread_caps(served.child.id(), 0, |_| 0);
    assert!(served.terminate().success());

    // A control socket may add VDUSE devices and taps: the main and control threads keep
    // CAP_NET_ADMIN and nothing else; the others nothing.
    let (sock, control) = (dir.path("b.sock"), dir.path("ctl.sock"));
    let mut cmd = virtiod();
    cmd.args(["serve", "--metrics", "0", "--vhost-user"])
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .arg("mem:4M");
    let served = Served::start(cmd, &sock);
    assert_thread_caps(served.child.id(), net_admin, |name| match name {
        "virtiod" | "control" | "control-worker" => net_admin,
        _ => 0,
    });
    assert!(served.terminate().success());

    // A tap: the main thread keeps CAP_NET_ADMIN; the tap's reader thread (a backend thread)
    // keeps nothing and runs under its seccomp filter.
    if !Path::new("/dev/net/tun").exists() {
        skip_or_fail("no /dev/net/tun for the tap case");
        return;
    }
    let sock = dir.path("t.sock");
    let tap = format!("vdcap{}", std::process::id() % 100_000);
    let mut cmd = virtiod();
    cmd.args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg(format!("net:tap={tap}"));
    let served = Served::start(cmd, &sock);
    assert_thread_caps(served.child.id(), net_admin, |name| {
        if name == "virtiod" {
            net_admin
        } else {
            0
        }
    });
    let readers = seccomp_modes(served.child.id(), "tap-");
    assert_eq!(
        readers,
        vec![2],
        "the tap reader's Seccomp field (2: filtered)"
    );
    assert!(served.terminate().success());
}

/// The `Seccomp:` field (0 none, 2 filtered) of each thread whose name starts with `prefix`.
fn seccomp_modes(pid: u32, prefix: &str) -> Vec<u32> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Seccomp: line");
        modes.push(mode);
    }
    modes
}

/// A group and two users made for a test (a member of the group and an outsider), removed
/// at drop.
struct TestUsers {
    group: String,
    member: String,
    outsider: String,
}

impl TestUsers {
    fn create(tag: &str) -> Self {
        let id = std::process::id() % 100_000;
        let users = Self {
            group: format!("vd{tag}g{id}"),
            member: format!("vd{tag}m{id}"),
            outsider: format!("vd{tag}o{id}"),
        };
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd).args(args).output().unwrap();
            assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
        };
        run("groupadd", &[&users.group]);
        let nologin = ["-M", "-N", "-s", "/usr/sbin/nologin"];
        run(
            "useradd",
            &[&nologin[..], &["-G", &users.group, &users.member]].concat(),
        );
        run(
            "useradd",
            &[&nologin[..], &[users.outsider.as_str()]].concat(),
        );
        users
    }

    fn gid(&self) -> u32 {
        let out = std::process::Command::new("getent")
            .args(["group", &self.group])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        line.split(':').nth(2).unwrap().parse().unwrap()
    }
}

impl Drop for TestUsers {
    fn drop(&mut self) {
        for user in [&self.member, &self.outsider] {
            let _ = std::process::Command::new("userdel").arg(user).output();
        }
        let _ = std::process::Command::new("groupdel")
            .arg(&self.group)
            .output();
    }
}

/// `virtiod ctl --control PATH list` as `user`, with its groups (setpriv --init-groups).
fn ctl_list_as(control: &Path, user: &str) -> (i32, String, String) {
    let out = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            "--regid=users",
            "--init-groups",
            "--",
            env!("CARGO_BIN_EXE_virtiod"),
            "ctl",
            "--control",
        ])
        .arg(control)
        .arg("list")
        .output()
        .expect("run setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_control_group_admits_its_members_only() {
    if !is_root() {
        skip_or_fail("creating users needs root");
        return;
    }
    let users = TestUsers::create("c");
    let dir = Scratch::new("ctl-group");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (sock, control) = (dir.path("vu.sock"), dir.path("ctl.sock"));
    let mut cmd = virtiod();
    cmd.args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .arg("--control-group")
        .arg(&users.group)
        .arg("mem:4M");
    let _served = Served::start(cmd, &sock);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "control socket mode");
    assert_eq!(meta.gid(), users.gid(), "control socket group");

    // A member (through a supplementary group) is answered.
    let (code, out, err) = ctl_list_as(&control, &users.member);
    assert_eq!(code, 0, "the member is answered: {err}");
    assert!(out.contains("vu"), "{out}");

    // An outsider cannot connect, and is told what to do.
    let (code, out, err) = ctl_list_as(&control, &users.outsider);
    assert_eq!(code, 1, "the outsider is refused: {out}");
    assert!(
        err.contains("permission denied") && err.contains("ask to be added to that group"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // With the mode loosened by mistake, the daemon's own check refuses the outsider and says
    // who is admitted.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out, err) = ctl_list_as(&control, &users.outsider);
    assert_eq!(code, 1, "the outsider is refused: {out}");
    assert!(!out.contains("vu"), "{out}");
    assert!(
        err.contains("may not use this control socket")
            && err.contains(&format!("members of group {}", users.gid())),
        "{err}"
    );
    let (code, _, err) = ctl_list_as(&control, &users.member);
    assert_eq!(code, 0, "the member still is answered: {err}");
}
