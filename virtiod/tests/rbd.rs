//! The RBD backend against a real single-node Ceph cluster (`tests/ceph/start-cluster.sh`:
//! one monitor, one memstore OSD, cephx, loopback), served over vhost-user and driven by
//! libblkio. One test starts the cluster once and runs every case on it.

mod common;
mod ops_common;

use std::path::Path;
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use ops_common::{ctl, free_port, http_get, sample, vhost_user_device, wait_for_port, RunDaemon};
use virtiod_testkit::ceph::{TestCluster, NOT_INSTALLED};

const MIB: u64 = 1 << 20;

/// The daemon's image string of `image` in pool `rbd` of `cluster`, plus `query`.
fn spec(cluster: &TestCluster, image: &str, query: &str) -> String {
    format!("rbd:rbd/{image}?conf={}{query}", cluster.conf().display())
}

/// `virtiod serve` on `image`, expected to fail: its exit code and stderr.
fn serve_fails(image: &str, sock: &Path) -> String {
    let out = virtiod()
        .args(["serve", "--vhost-user"])
        .arg(sock)
        .arg(image)
        .output()
        .expect("run virtiod");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "must fail: {stderr}");
    assert!(!sock.exists(), "no socket left behind");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line, got:\n{stderr}");
    lines[0].to_string()
}

fn round_trip_flush_discard_write_zeroes(cluster: &TestCluster, dir: &Scratch) {
    cluster.run("rbd", &["create", "rbd/disk", "--size", "16M"]);
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(&sock, &spec(cluster, "disk", ""), &["--queues", "2"]);
    let mut client = Client::connect(&sock, 2, 8 * MIB as usize).unwrap();
    assert_eq!(client.capacity(), 16 * MIB, "capacity is the image size");

    // 8 MiB per queue, 16 requests of 512 KiB in flight on each; read back crosswise.
    pipelined(&mut client, 0, (0, 512 << 10, 16), true, 5);
    pipelined(&mut client, 1, (8 * MIB, 512 << 10, 16), true, 5);
    assert_eq!(client.flush(0), 0);
    assert_eq!(client.flush(1), 0);
    pipelined(&mut client, 1, (0, 8 << 20, 1), false, 5);
    pipelined(&mut client, 0, (8 * MIB, 256 << 10, 32), false, 5);

    // DISCARD 1 MiB at 1 MiB, WRITE_ZEROES 512 KiB at 3 MiB (no unmap) and at 4 MiB (unmap).
    assert_eq!(
        client.sync(0, |q| q.discard(MIB, MIB, 0, ReqFlags::empty())),
        0
    );
    let wz = client.sync(1, |q| {
        q.write_zeroes(3 * MIB, MIB / 2, 0, ReqFlags::NO_UNMAP)
    });
    assert_eq!(wz, 0);
    let wz = client.sync(0, |q| {
        q.write_zeroes(4 * MIB, MIB / 2, 0, ReqFlags::empty())
    });
    assert_eq!(wz, 0);
    assert_eq!(client.read(1, MIB, 0, MIB as usize), 0);
    assert!(client.buf()[..MIB as usize].iter().all(|&b| b == 0));
    // Past the end: an error for the driver, and the device goes on.
    assert_ne!(client.read(0, 16 * MIB, 0, 4096), 0);
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    check_pattern(&client.buf()[..4096], 0, 5).unwrap();

    // No final FLUSH: SIGTERM flushes the image before the daemon exits.
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    drop(client);

    // What the cluster holds, read with the rbd tool.
    let export = dir.path("disk.raw");
    cluster.run("rbd", &["export", "rbd/disk", export.to_str().unwrap()]);
    let data = std::fs::read(&export).unwrap();
    assert_eq!(data.len() as u64, 16 * MIB);
    let zeroes = [
        MIB..2 * MIB,
        3 * MIB..3 * MIB + MIB / 2,
        4 * MIB..4 * MIB + MIB / 2,
    ];
    check_zeroed_ranges(&data, &zeroes, 5);
}

fn snapshot_is_read_only(cluster: &TestCluster, dir: &Scratch) {
    cluster.run("rbd", &["snap", "create", "rbd/disk@s1"]);
    let sock = dir.path("vu-snap.sock");
    let _daemon = Daemon::start(&sock, &spec(cluster, "disk@s1", ""), &[]);
    let e = Client::connect(&sock, 1, MIB as usize)
        .err()
        .expect("a read-write start on a snapshot must fail");
    assert_eq!(e.errno().raw_os_error(), libc::EROFS, "{e:?}");
    let mut client = Client::connect_with(&sock, 1, MIB as usize, true).unwrap();
    assert_eq!(client.capacity(), 16 * MIB);
    assert_eq!(client.read(0, 0, 0, MIB as usize), 0);
    check_pattern(&client.buf()[..MIB as usize], 0, 5).unwrap();
    assert_eq!(client.flush(0), 0, "FLUSH on a snapshot succeeds");
}

fn errors_are_one_line(cluster: &TestCluster, dir: &Scratch) {
    let sock = dir.path("vu-err.sock");
    let line = serve_fails(&spec(cluster, "nope", ""), &sock);
    assert!(
        line.contains("rbd:rbd/nope: cannot open the image")
            && line.contains("no image \"nope\" in pool \"rbd\""),
        "{line}"
    );

    // client.admin with a key the cluster does not know.
    let keyring = dir.path("wrong.keyring");
    let status = Command::new("ceph-authtool")
        .arg("--create-keyring")
        .arg(&keyring)
        .args(["--gen-key", "-n", "client.admin"])
        .output()
        .expect("run ceph-authtool")
        .status;
    assert!(status.success());
    let query = format!("&keyring={}", keyring.display());
    let line = serve_fails(&spec(cluster, "disk", &query), &sock);
    assert!(
        line.contains("cannot connect to the cluster") && line.contains("check its key"),
        "{line}"
    );

    // No monitor on the configured address: fails within its client_mount_timeout.
    let conf = dir.path("unreachable.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = [v2:127.0.0.1:9]\nclient mount timeout = 2\n",
    )
    .unwrap();
    let spec = format!("rbd:rbd/disk?conf={}", conf.display());
    let line = serve_fails(&spec, &sock);
    assert!(line.contains("no monitor answered"), "{line}");
}

/// An RBD device from devices.toml and ones added with `ctl add` (one as the CSI plugin
/// stages an rbd volume: its own conf and keyring under an --allow-dir, Landlock on) serve
/// I/O, the metrics count them, and `ctl resize` grows them.
fn devices_file_ctl_add_and_metrics(cluster: &TestCluster, dir: &Scratch) {
    cluster.run("rbd", &["create", "rbd/a", "--size", "4M"]);
    cluster.run("rbd", &["create", "rbd/b", "--size", "8M"]);
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    let control = dir.path("ctl.sock");
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, vhost_user_device("a", &spec(cluster, "a", ""), &a)).unwrap();
    // What the CSI plugin's NodeStageVolume writes for an rbd volume: a configuration with
    // only the monitors and a private keyring of a restricted user, in a 0700 directory the
    // daemon may read under Landlock only through --allow-dir.
    let keys = dir.path("keys");
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&keys)
            .unwrap();
        let key = cluster.rbd_user("csi");
        let write = |name: &str, text: String| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(keys.join(name))
                .unwrap();
            std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        };
        write(
            "c.conf",
            format!("[global]\nmon_host = {}\n", cluster.mon_host()),
        );
        write("c.keyring", format!("[client.csi]\n\tkey = {key}\n"));
    }
    cluster.run("rbd", &["create", "rbd/c", "--size", "4M"]);
    let state = dir.path("state");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = RunDaemon::start(
        &cfg,
        &[
            "--control",
            control.to_str().unwrap(),
            "--metrics",
            &addr,
            "--allow-dir",
            keys.to_str().unwrap(),
            // Its `ctl add` records stay in the scratch directory, not in /run/virtiod.
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[a.clone(), control.clone()],
    );
    wait_for_port(port);
    let json = format!(
        r#"{{"name":"b","image":"{}","vhost-user":"{}"}}"#,
        spec(cluster, "b", ""),
        b.display()
    );
    let (code, _, err) = ctl(&control, &["add", &json]);
    assert_eq!(code, 0, "{err}");
    let c = dir.path("c.sock");
    let json = format!(
        r#"{{"name":"c","image":"rbd:rbd/c?conf={k}/c.conf&id=csi&keyring={k}/c.keyring","vhost-user":"{}"}}"#,
        c.display(),
        k = keys.display()
    );
    let (code, _, err) = ctl(&control, &["add", &json]);
    assert_eq!(code, 0, "{err}");
    for (sock, size, seed) in [(&a, 4 * MIB, 1u64), (&b, 8 * MIB, 2), (&c, 4 * MIB, 3)] {
        let mut client = Client::connect(sock, 1, MIB as usize).unwrap();
        assert_eq!(client.capacity(), size);
        fill_pattern(&mut client.buf()[..MIB as usize], MIB, seed);
        assert_eq!(client.write(0, MIB, 0, MIB as usize), 0);
        client.buf()[..MIB as usize].fill(0);
        assert_eq!(client.read(0, MIB, 0, MIB as usize), 0);
        check_pattern(&client.buf()[..MIB as usize], MIB, seed).unwrap();
    }
    let (_, text) = http_get(port, "/metrics");
    for dev in ["a", "b"] {
        let series = format!(r#"virtiod_bytes_total{{device="{dev}",op="write"}}"#);
        assert_eq!(
            sample(&text, &series),
            Some(MIB as f64),
            "{series} in:\n{text}"
        );
    }
    // ctl resize grows the image itself (b), or takes the size it was grown to through the
    // cluster (a, as the CSI plugin's controller does); the driver sees the new capacity.
    cluster.run("rbd", &["resize", "rbd/a", "--size", "8M"]);
    for (dev, sock, size) in [("a", &a, "8M"), ("b", &b, "16M")] {
        let (code, _, err) = ctl(&control, &["resize", dev, size]);
        assert_eq!(code, 0, "ctl resize {dev} {size}: {err}");
        let info = cluster.tool("rbd", &["info", &format!("rbd/{dev}"), "--format", "json"]);
        let bytes = if size == "8M" { 8 * MIB } else { 16 * MIB };
        assert!(info.contains(&format!("\"size\":{bytes},")), "{info}");
        let client = Client::connect(sock, 1, MIB as usize).unwrap();
        assert_eq!(client.capacity(), bytes, "{dev} after resize");
    }
    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn rbd_image_round_trip_snapshot_and_errors_on_a_real_cluster() {
    let dir = Scratch::new("rbd");
    let Some(cluster) = TestCluster::start(dir.path("cluster")) else {
        skip_or_fail(NOT_INSTALLED);
        return;
    };
    round_trip_flush_discard_write_zeroes(&cluster, &dir);
    snapshot_is_read_only(&cluster, &dir);
    errors_are_one_line(&cluster, &dir);
    devices_file_ctl_add_and_metrics(&cluster, &dir);
}
