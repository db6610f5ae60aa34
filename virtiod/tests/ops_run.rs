//! `virtiod run --config devices.toml`: validation before anything starts (errors with
//! FILE:LINE:COLUMN, exit 2), many devices in one daemon, a failing device does not stop the
//! others, SIGTERM stops all cleanly.

mod common;
mod ops_common;

use common::*;
use ops_common::*;

const MIB: u64 = 1 << 20;

fn run_config(text: &str, dir: &Scratch) -> (i32, String) {
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = virtiod()
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_name_file_line_and_column_and_start_nothing() {
    let dir = Scratch::new("run-bad");
    let a = dir.path("a.sock");
    let cases: [(String, &str); 4] = [
        (
            format!("{}\n  queue_size = 4\n", vhost_user_device("a", "mem:1M", &a).trim_end()),
            ":5:3: unknown field `queue_size`",
        ),
        (
            format!(
                "{}{}",
                vhost_user_device("a", "mem:1M", &a),
                vhost_user_device("a", "mem:1M", &dir.path("b.sock"))
            ),
            ":7:1: duplicate name \"a\"",
        ),
        (
            format!(
                "{}{}",
                vhost_user_device("a", "mem:1M", &a),
                vhost_user_device("b", "mem:1M", &a)
            ),
            ":9:1: duplicate vhost-user",
        ),
        (
            "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvduse = \"v\"\nvhost-user = \"/x.sock\"\n"
                .into(),
            ":5:14: device \"a\" has both vduse and vhost-user",
        ),
    ];
    for (text, want) in cases {
        let (code, stderr) = run_config(&text, &dir);
        assert_eq!(code, 2, "usage error exit status:\n{stderr}");
        let line = stderr.lines().find(|l| l.contains("error")).unwrap_or("");
        assert!(
            line.contains(&format!("devices.toml{want}")),
            "want {want:?} in:\n{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
        assert!(!a.exists(), "nothing started");
    }
    let (code, stderr) = run_config("[[device]]\nname = \"a\"\nimage = \"mem:1M\"\n", &dir);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("devices.toml:1:1: device \"a\" has no transport"),
        "{stderr}"
    );
}

#[test]
fn many_devices_one_failing_the_rest_serve_and_sigterm_cleans_up() {
    let dir = Scratch::new("run-many");
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    let img = dir.image("b.img", 8 * MIB);
    let text = format!(
        "{}{}{}{}",
        vhost_user_device("a", "mem:16M", &a),
        vhost_user_device("b", img.to_str().unwrap(), &b),
        // Fails at start: no such image (never created).
        vhost_user_device("c", dir.path("missing.img").to_str().unwrap(), &dir.path("c.sock")),
        // Fails at start on a host without VDUSE, serves where VDUSE exists.
        "[[device]]\nname = \"d\"\nimage = \"mem:1M\"\nvduse = \"virtiod-ops-run-d\"\nattach = \"none\"\n",
    );
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, text).unwrap();
    let state = dir.path("state");
    let daemon = RunDaemon::start(
        &cfg,
        &["--state-dir", state.to_str().unwrap()],
        &[a.clone(), b.clone()],
    );
    assert!(!dir.path("c.sock").exists());
    assert!(!dir.path("missing.img").exists(), "image not created");

    let mut ca = Client::connect(&a, 1, 1 << 20).unwrap();
    let mut cb = Client::connect(&b, 1, 1 << 20).unwrap();
    assert_eq!(ca.capacity(), 16 * MIB);
    assert_eq!(cb.capacity(), 8 * MIB);
    for (client, seed) in [(&mut ca, 1u64), (&mut cb, 2)] {
        fill_pattern(&mut client.buf()[..65536], 4096, seed);
        assert_eq!(client.write(0, 4096, 0, 65536), 0);
        client.buf()[..65536].fill(0);
        assert_eq!(client.read(0, 4096, 0, 65536), 0);
        check_pattern(&client.buf()[..65536], 4096, seed).unwrap();
    }
    drop(ca);
    // A connected frontend does not keep SIGTERM from finishing.
    let (status, stdout) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(stdout.contains(&format!("a {}", a.display())), "{stdout}");
    assert!(stdout.contains(&format!("b {}", b.display())), "{stdout}");
    assert!(!stdout.contains("\nc "), "{stdout}");
    assert!(!a.exists() && !b.exists(), "sockets removed");
    // b's data reached the image (flushed on the way out).
    let file = std::fs::read(&img).unwrap();
    check_pattern(&file[4096..4096 + 65536], 4096, 2).unwrap();
    drop(cb);
}

#[test]
fn all_devices_failing_is_an_error() {
    let dir = Scratch::new("run-none");
    let text = vhost_user_device(
        "c",
        dir.path("missing.img").to_str().unwrap(),
        &dir.path("c.sock"),
    );
    let (code, stderr) = run_config(&text, &dir);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("none of the 1 devices could be started"),
        "{stderr}"
    );
}

/// `Type=notify`: READY=1 once the devices serve, STOPPING=1 on SIGTERM, for run and serve.
#[test]
fn systemd_notify_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = Scratch::new("run-notify");
    let notify_path = dir.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let a = dir.path("a.sock");
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, vhost_user_device("a", "mem:1M", &a)).unwrap();
    for serve in [false, true] {
        let mut cmd = virtiod();
        if serve {
            cmd.args(["serve", "--vhost-user"]).arg(&a).arg("mem:1M");
        } else {
            cmd.args(["run", "--config"]).arg(&cfg);
        }
        let child = cmd.env("NOTIFY_SOCKET", &notify_path).spawn().unwrap();
        let ready = recv();
        assert!(ready.starts_with("READY=1"), "{ready}");
        assert!(a.exists(), "ready means serving");
        let daemon = Daemon(Served {
            child,
            socket: a.clone(),
        });
        assert!(daemon.terminate().success());
        assert_eq!(recv(), "STOPPING=1");
        assert!(!a.exists());
    }
}

/// A devices file without devices: refused without --control (nothing could ever serve), a
/// daemon waiting for `ctl add` with it.
#[test]
fn no_devices_needs_a_control_socket_then_ctl_add_serves() {
    let dir = Scratch::new("run-empty");
    let (code, stderr) = run_config("[daemon]\non-stop = \"keep\"\n", &dir);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no devices: add a [[device]] table") && stderr.contains("--control"),
        "{stderr}"
    );

    let (control, sock) = (dir.path("ctl.sock"), dir.path("a.sock"));
    let daemon = RunDaemon::start(
        &dir.path("devices.toml"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--state-dir",
            dir.path("state").to_str().unwrap(),
        ],
        std::slice::from_ref(&control),
    );
    let spec = format!(
        "name = \"a\"\nimage = \"mem:4M\"\nvhost-user = \"{}\"\n",
        sock.display()
    );
    let (code, out, err) = ctl(&control, &["add", &spec]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), sock.to_str().unwrap());
    let mut client = Client::connect(&sock, 1, 4096).unwrap();
    assert_eq!(client.capacity(), 4 * MIB);
    fill_pattern(client.buf(), 4096, 7);
    assert_eq!(client.write(0, 4096, 0, 4096), 0);
    client.buf().fill(0);
    assert_eq!(client.read(0, 4096, 0, 4096), 0);
    check_pattern(client.buf(), 4096, 7).unwrap();
    drop(client);
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status}");
}
