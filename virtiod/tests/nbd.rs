//! The NBD backend against a real `qemu-nbd` on a unix socket, served over vhost-user and
//! driven by libblkio.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use virtiod_testkit::process::Served;

const MIB: u64 = 1 << 20;
const QEMU_NBD: &str = "qemu-nbd";

/// `qemu-nbd` serving `image` (raw) on `socket`, for up to 4 clients at once; `None` (after
/// [`skip_or_fail`]) when it is not installed.
fn qemu_nbd(socket: &Path, image: &Path, extra: &[&str]) -> Option<Served> {
    if Command::new(QEMU_NBD).arg("--version").output().is_err() {
        skip_or_fail("qemu-nbd is not installed (scripts/setup.sh installs qemu-utils)");
        return None;
    }
    let mut cmd = Command::new(QEMU_NBD);
    cmd.args([
        "--persistent",
        "--shared=4",
        "-f",
        "raw",
        "--discard=unmap",
        "-k",
    ])
    .arg(socket)
    .args(extra)
    .arg(image);
    Some(Served::start(cmd, socket))
}

fn uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

#[test]
fn two_queues_round_trip_flush_discard_write_zeroes_reach_the_image() {
    let dir = Scratch::new("nbd-rt");
    let img = dir.image("disk.img", 16 * MIB);
    let nbd_sock = dir.path("nbd.sock");
    let Some(server) = qemu_nbd(&nbd_sock, &img, &[]) else {
        return;
    };
    let sock = dir.path("vu.sock");
    // qemu-nbd's default export name is the empty string.
    let daemon = Daemon::start(&sock, &uri(&nbd_sock, ""), &["--queues", "2"]);
    let mut client = Client::connect(&sock, 2, 8 * MIB as usize).unwrap();
    assert_eq!(client.capacity(), 16 * MIB);

    // 16 MiB of pattern: 8 MiB per queue, 16 requests of 512 KiB in flight on each.
    pipelined(&mut client, 0, (0, 512 << 10, 16), true, 9);
    pipelined(&mut client, 1, (8 * MIB, 512 << 10, 16), true, 9);
    assert_eq!(client.flush(0), 0);
    assert_eq!(client.flush(1), 0);
    // Read back crosswise, in one large request per queue and in pipelined ones.
    pipelined(&mut client, 1, (0, 8 << 20, 1), false, 9);
    pipelined(&mut client, 0, (8 * MIB, 256 << 10, 32), false, 9);

    // DISCARD 1 MiB at 1 MiB (qemu-nbd --discard=unmap punches a hole), WRITE_ZEROES 512 KiB
    // at 3 MiB without unmap (NO_HOLE) and 512 KiB at 4 MiB with unmap allowed.
    let discard = client.sync(0, |q| q.discard(MIB, MIB, 0, ReqFlags::empty()));
    assert_eq!(discard, 0, "qemu-nbd offers TRIM");
    let wz = client.sync(1, |q| {
        q.write_zeroes(3 * MIB, MIB / 2, 0, ReqFlags::NO_UNMAP)
    });
    assert_eq!(wz, 0, "qemu-nbd offers WRITE_ZEROES");
    let wz = client.sync(0, |q| {
        q.write_zeroes(4 * MIB, MIB / 2, 0, ReqFlags::empty())
    });
    assert_eq!(wz, 0);
    assert_eq!(client.read(1, MIB, 0, MIB as usize), 0);
    assert!(client.buf()[..MIB as usize].iter().all(|&b| b == 0));
    // Past the end: the server's error reaches the driver, and the connection goes on.
    assert_ne!(client.read(0, 16 * MIB, 0, 4096), 0);
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    check_pattern(&client.buf()[..4096], 0, 9).unwrap();

    // No final FLUSH: SIGTERM must flush every connection before the daemon exits.
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    let status = server.terminate();
    assert!(status.success(), "qemu-nbd exit status {status}");
    drop(client);

    let file = std::fs::read(&img).unwrap();
    assert_eq!(file.len() as u64, 16 * MIB);
    let zeroes = [
        MIB..2 * MIB,
        3 * MIB..3 * MIB + MIB / 2,
        4 * MIB..4 * MIB + MIB / 2,
    ];
    check_zeroed_ranges(&file, &zeroes, 9);
}

#[test]
fn read_only_export_gives_a_read_only_disk() {
    let dir = Scratch::new("nbd-ro");
    let img = dir.image("disk.img", 4 * MIB);
    std::fs::write(&img, vec![0x5au8; 4 * MIB as usize]).unwrap();
    let nbd_sock = dir.path("nbd.sock");
    let Some(_server) = qemu_nbd(&nbd_sock, &img, &["--read-only", "-x", "ro"]) else {
        return;
    };
    let sock = dir.path("vu.sock");
    let _daemon = Daemon::start(&sock, &uri(&nbd_sock, "ro"), &[]);
    let e = Client::connect(&sock, 1, MIB as usize)
        .err()
        .expect("a read-write start must fail");
    assert_eq!(e.errno().raw_os_error(), libc::EROFS, "{e:?}");
    let mut client = Client::connect_with(&sock, 1, MIB as usize, true).unwrap();
    assert_eq!(client.read(0, MIB, 0, 4096), 0);
    assert!(client.buf()[..4096].iter().all(|&b| b == 0x5a));
    assert_eq!(client.flush(0), 0);
}

struct Outcome {
    code: i32,
    stderr: String,
}

fn serve(image: &str, sock: &Path) -> Outcome {
    let out = virtiod()
        .args(["serve", "--vhost-user"])
        .arg(sock)
        .arg(image)
        .output()
        .expect("run virtiod");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One error line mentioning `needle`, a failed exit, and no socket left behind.
fn assert_one_line_error(o: &Outcome, needle: &str, sock: &Path) {
    assert_ne!(o.code, 0, "must fail: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line, got:\n{}", o.stderr);
    assert!(
        lines[0].contains(needle),
        "error should mention {needle:?}:\n{}",
        o.stderr
    );
    assert!(!sock.exists(), "no socket left behind");
}

#[test]
fn missing_server_and_unknown_export_are_one_line_errors() {
    let dir = Scratch::new("nbd-err");
    let sock = dir.path("vu.sock");
    let missing = dir.path("missing.sock");
    let want = format!(
        "cannot connect to nbd+unix:///x?socket={}: No such file or directory: is the NBD server running?",
        missing.display()
    );
    assert_one_line_error(&serve(&uri(&missing, "x"), &sock), &want, &sock);

    let img = dir.image("disk.img", MIB);
    let nbd_sock = dir.path("nbd.sock");
    let Some(_server) = qemu_nbd(&nbd_sock, &img, &["-x", "disk"]) else {
        return;
    };
    let o = serve(&uri(&nbd_sock, "nope"), &sock);
    assert_one_line_error(&o, "the server has no export \"nope\"", &sock);
    assert_one_line_error(&o, "check the export name", &sock);
}

#[test]
fn a_lost_server_fails_requests_with_eio_and_the_daemon_stays_up() {
    let dir = Scratch::new("nbd-lost");
    let img = dir.image("disk.img", 4 * MIB);
    let nbd_sock = dir.path("nbd.sock");
    let Some(server) = qemu_nbd(&nbd_sock, &img, &[]) else {
        return;
    };
    let sock = dir.path("vu.sock");
    let spec = format!("{}&reconnect=0", uri(&nbd_sock, ""));
    let mut daemon = Daemon::start(&sock, &spec, &[]);
    let mut client = Client::connect(&sock, 1, MIB as usize).unwrap();
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    drop(server); // SIGKILL: the connection drops, and reconnect=0 fails requests at once
    for _ in 0..2 {
        // virtio-blk reports IOERR; libblkio maps it to -EIO.
        assert_eq!(client.read(0, 0, 0, 4096), -libc::EIO);
        assert_eq!(client.write(0, 0, 0, 4096), -libc::EIO);
    }
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon still up"
    );
}

/// Submit pattern writes of `chunk` bytes for chunks `range` (buffer offset = disk offset) on
/// queue 0 and hand them to the daemon without waiting.
fn submit_writes(client: &mut Client, chunk: usize, range: std::ops::Range<usize>) {
    for i in range {
        let off = i * chunk;
        fill_pattern(&mut client.buf()[off..off + chunk], off as u64, 9);
        let p = client.buf_ptr(off);
        client.queues[0].write(off as u64, p, chunk, i, ReqFlags::empty());
    }
    let mut none = [];
    client.queues[0]
        .do_io(&mut none, 0, None, None)
        .expect("do_io");
}

fn assert_all_ok(client: &mut Client, n: usize) {
    for (i, ret) in client.wait(0, n) {
        assert_eq!(ret, 0, "request {i} failed");
    }
}

#[test]
fn a_server_restarted_within_the_timeout_loses_no_write() {
    const CHUNK: usize = 128 << 10;
    let dir = Scratch::new("nbd-restart");
    let img = dir.image("disk.img", 8 * MIB);
    let nbd_sock = dir.path("nbd.sock");
    let Some(server) = qemu_nbd(&nbd_sock, &img, &[]) else {
        return;
    };
    let sock = dir.path("vu.sock");
    let spec = format!("{}&reconnect=30", uri(&nbd_sock, ""));
    let daemon = Daemon::start(&sock, &spec, &[]);
    let mut client = Client::connect(&sock, 1, 8 * MIB as usize).unwrap();

    // 64 chunks of 128 KiB: 16 written before the kill, 16 in flight when it comes, 16
    // submitted while the server is down, 16 after it is back.
    submit_writes(&mut client, CHUNK, 0..16);
    assert_all_ok(&mut client, 16);
    submit_writes(&mut client, CHUNK, 16..32);
    drop(server); // SIGKILL with writes in flight
    submit_writes(&mut client, CHUNK, 32..48);
    let (img2, sock2) = (img.clone(), nbd_sock.clone());
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        qemu_nbd(&sock2, &img2, &[]).expect("qemu-nbd")
    });
    assert_all_ok(&mut client, 32);
    let server = restart.join().unwrap();
    submit_writes(&mut client, CHUNK, 48..64);
    assert_all_ok(&mut client, 16);

    // Read everything back through the daemon.
    client.buf().fill(0);
    for i in 0..8 {
        let off = i * MIB as usize;
        assert_eq!(client.read(0, off as u64, off, MIB as usize), 0);
    }
    check_pattern(&client.buf()[..8 * MIB as usize], 0, 9).unwrap();

    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    let status = server.terminate();
    assert!(status.success(), "qemu-nbd exit status {status}");
    drop(client);
    let file = std::fs::read(&img).unwrap();
    check_pattern(&file, 0, 9).unwrap();
}

#[test]
fn a_server_not_back_in_time_fails_requests_with_eio_until_it_is() {
    let dir = Scratch::new("nbd-timeout");
    let img = dir.image("disk.img", 4 * MIB);
    let nbd_sock = dir.path("nbd.sock");
    let Some(server) = qemu_nbd(&nbd_sock, &img, &[]) else {
        return;
    };
    let sock = dir.path("vu.sock");
    let spec = format!("{}&reconnect=2", uri(&nbd_sock, ""));
    let mut daemon = Daemon::start(&sock, &spec, &[]);
    let mut client = Client::connect(&sock, 1, MIB as usize).unwrap();
    assert_eq!(client.write(0, 0, 0, 4096), 0);

    drop(server); // SIGKILL, not restarted
    let lost = Instant::now();
    let (p0, p1) = (client.buf_ptr(0), client.buf_ptr(8192));
    client.queues[0].write(0, p0, 4096, 0, ReqFlags::empty());
    client.queues[0].read(8192, p1, 4096, 1, ReqFlags::empty());
    for (i, ret) in client.wait(0, 2) {
        assert_eq!(
            ret,
            -libc::EIO,
            "pending request {i} fails after the timeout"
        );
    }
    let waited = lost.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "requests must wait for the reconnect timeout, failed after {waited:?}"
    );
    // Past the timeout, new requests fail at once.
    assert_eq!(client.read(0, 0, 0, 4096), -libc::EIO);
    assert_eq!(client.write(0, 0, 0, 4096), -libc::EIO);
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon still up"
    );

    // The server comes back: the background reconnect picks it up.
    let _server = qemu_nbd(&nbd_sock, &img, &[]).expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.read(0, 0, 0, 4096) != 0 {
        assert!(Instant::now() < deadline, "requests never succeeded again");
        std::thread::sleep(Duration::from_millis(100));
    }
    fill_pattern(&mut client.buf()[..4096], 4096, 3);
    assert_eq!(client.write(0, 4096, 0, 4096), 0);
    client.buf()[..4096].fill(0);
    assert_eq!(client.read(0, 4096, 0, 4096), 0);
    check_pattern(&client.buf()[..4096], 4096, 3).unwrap();
}
