//! qcow2 images in devices.toml, through `virtiod ctl add`, and in the metrics: the spec is
//! the same everywhere, and a missing image is one error line.

mod common;
mod ops_common;

use std::process::Command;

use common::*;
use ops_common::*;

const LEN: usize = 64 * 1024;

fn qcow2(dir: &Scratch, name: &str) -> String {
    let path = dir.path(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .output()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(out.status.success(), "{out:?}");
    format!("qcow2:{}", path.display())
}

#[test]
fn qcow2_in_devices_toml_ctl_add_and_metrics() {
    let dir = Scratch::new("ops-qcow2");
    let (a, b, control) = (dir.path("a.sock"), dir.path("b.sock"), dir.path("ctl.sock"));
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, vhost_user_device("a", &qcow2(&dir, "a.qcow2"), &a)).unwrap();
    let port = free_port();
    let daemon = RunDaemon::start(
        &cfg,
        &[
            "--control",
            control.to_str().unwrap(),
            "--metrics",
            &format!("127.0.0.1:{port}"),
            // Landlock: ctl add takes images only under an allowed directory.
            "--allow-dir",
            dir.0.to_str().unwrap(),
        ],
        &[a.clone(), control.clone()],
    );
    wait_for_port(port);
    let spec = format!(
        "name = \"b\"\nimage = \"{}\"\nvhost-user = \"{}\"\n",
        qcow2(&dir, "b.qcow2"),
        b.display()
    );
    let (code, _, err) = ctl(&control, &["add", &spec]);
    assert_eq!(code, 0, "{err}");
    for (sock, seed) in [(&a, 1u64), (&b, 2)] {
        let mut client = Client::connect(sock, 1, LEN).unwrap();
        assert_eq!(client.capacity(), 16 << 20);
        for i in 0..4u64 {
            fill_pattern(client.buf(), i * 3 * LEN as u64, seed);
            assert_eq!(client.write(0, i * 3 * LEN as u64, 0, LEN), 0);
        }
        for i in 0..4u64 {
            assert_eq!(client.read(0, i * 3 * LEN as u64, 0, LEN), 0);
            check_pattern(client.buf(), i * 3 * LEN as u64, seed).unwrap();
        }
    }
    let (_, text) = http_get(port, "/metrics");
    for dev in ["a", "b"] {
        let series = format!(r#"virtiod_requests_total{{device="{dev}",op="write"}}"#);
        assert_eq!(sample(&text, &series), Some(4.0), "{series} in:\n{text}");
    }
    // A missing image: one line that says what to do; the daemon keeps serving.
    let missing = format!(
        "name = \"c\"\nimage = \"qcow2:{}\"\nvhost-user = \"{}\"\n",
        dir.path("none.qcow2").display(),
        dir.path("c.sock").display()
    );
    let (code, _, err) = ctl(&control, &["add", &missing]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("qemu-img create -f qcow2"), "{err}");
    let (status, _) = daemon.terminate();
    assert!(status.success());
    for img in ["a.qcow2", "b.qcow2"] {
        let out = Command::new("qemu-img")
            .arg("check")
            .arg(dir.path(img))
            .output()
            .unwrap();
        assert!(out.status.success(), "{img}: {out:?}");
    }
}
