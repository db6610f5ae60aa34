//! The NBD backend against `nbdkit` (a second server implementation beside qemu-nbd): its
//! memory and file plugins, and its filters to take away multi-conn, inject errors and log
//! what the client sends. Served over vhost-user and driven by libblkio.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blkio::ReqFlags;
use common::*;
use virtiod_testkit::process::Served;

const MIB: u64 = 1 << 20;

/// `nbdkit` in the foreground on `socket` with `args` (filters, plugin, its parameters);
/// `None` (after [`skip_or_fail`]) when it is not installed.
fn nbdkit(socket: &Path, args: &[&str]) -> Option<Served> {
    if Command::new("nbdkit").arg("--version").output().is_err() {
        skip_or_fail("nbdkit is not installed (scripts/setup.sh installs it)");
        return None;
    }
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--foreground", "--unix"]).arg(socket).args(args);
    Some(Served::start(cmd, socket))
}

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// The daemon's stderr so far (it logs the negotiated export there).
fn daemon_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A daemon on `spec` whose stderr goes to `log`.
fn daemon_logging(sock: &Path, spec: &str, queues: &str, log: &Path) -> Served {
    let mut cmd = virtiod();
    cmd.args(["serve", "--queues", queues, "--vhost-user"])
        .arg(sock)
        .arg(spec)
        .stderr(std::fs::File::create(log).unwrap());
    Served::start(cmd, sock)
}

/// Write a pattern over `len` bytes at `base` on queue `q`, in 256 KiB requests.
fn write_pattern(client: &mut Client, q: usize, base: u64, len: usize) {
    const CHUNK: usize = 256 << 10;
    for off in (0..len).step_by(CHUNK) {
        fill_pattern(&mut client.buf()[off..off + CHUNK], base + off as u64, 5);
        assert_eq!(client.write(q, base + off as u64, off, CHUNK), 0);
    }
}

#[test]
fn memory_plugin_round_trip_with_structured_replies_on_two_queues() {
    let dir = Scratch::new("nbdkit-mem");
    let nbd_sock = dir.path("nbd.sock");
    let Some(_server) = nbdkit(&nbd_sock, &["memory", "16M"]) else {
        return;
    };
    let (sock, log) = (dir.path("vu.sock"), dir.path("daemon.log"));
    let _daemon = daemon_logging(&sock, &uri(&nbd_sock), "2", &log);
    let mut client = Client::connect(&sock, 2, 4 * MIB as usize).unwrap();
    assert_eq!(client.capacity(), 16 * MIB);
    let negotiated = daemon_log(&log);
    assert!(
        negotiated.contains("structured_replies=true") && negotiated.contains("multi_conn=true"),
        "nbdkit offers structured replies and multi-conn:\n{negotiated}"
    );

    write_pattern(&mut client, 0, 0, 4 * MIB as usize);
    write_pattern(&mut client, 1, 8 * MIB, 4 * MIB as usize);
    assert_eq!(client.flush(1), 0);
    // Read back crosswise, into buffers that hold other data first.
    client.buf().fill(0xee);
    assert_eq!(client.read(1, 0, 0, 4 * MIB as usize), 0);
    check_pattern(&client.buf()[..4 * MIB as usize], 0, 5).unwrap();
    assert_eq!(client.read(0, 8 * MIB, 0, 4 * MIB as usize), 0);
    check_pattern(&client.buf()[..4 * MIB as usize], 8 * MIB, 5).unwrap();

    // Never written: zeroes, whatever the buffer held.
    client.buf().fill(0xee);
    assert_eq!(client.read(0, 5 * MIB, 0, MIB as usize), 0);
    assert!(client.buf()[..MIB as usize].iter().all(|&b| b == 0));

    // TRIM and WRITE_ZEROES, then the ranges read as zeroes and the rest keeps its data.
    assert_eq!(
        client.sync(0, |q| q.discard(MIB, MIB, 0, ReqFlags::empty())),
        0
    );
    assert_eq!(
        client.sync(1, |q| q.write_zeroes(9 * MIB, MIB, 0, ReqFlags::NO_UNMAP)),
        0
    );
    client.buf().fill(0xee);
    assert_eq!(client.read(0, 0, 0, 4 * MIB as usize), 0);
    let buf = &client.buf()[..4 * MIB as usize];
    check_pattern(&buf[..MIB as usize], 0, 5).unwrap();
    assert!(buf[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    check_pattern(&buf[2 * MIB as usize..], 2 * MIB, 5).unwrap();
    assert_eq!(client.read(1, 9 * MIB, 0, MIB as usize), 0);
    assert!(client.buf()[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn without_multi_conn_a_flush_reaches_every_connection() {
    let dir = Scratch::new("nbdkit-nomc");
    let nbd_sock = dir.path("nbd.sock");
    let nbd_log = dir.path("nbdkit.log");
    let logfile = format!("logfile={}", nbd_log.display());
    // The log filter, nearest the client, records each connection's commands.
    let args = [
        "--filter=log",
        "--filter=multi-conn",
        "memory",
        "8M",
        "multi-conn-mode=disable",
        logfile.as_str(),
    ];
    let Some(_server) = nbdkit(&nbd_sock, &args) else {
        return;
    };
    let (sock, log) = (dir.path("vu.sock"), dir.path("daemon.log"));
    let _daemon = daemon_logging(&sock, &uri(&nbd_sock), "2", &log);
    let mut client = Client::connect(&sock, 2, MIB as usize).unwrap();
    assert!(
        daemon_log(&log).contains("multi_conn=false"),
        "the filter takes multi-conn away"
    );

    // The log filter writes "connection=N Flush id=..." when a FLUSH arrives.
    let flushes = |text: &str| text.lines().filter(|l| l.contains(" Flush id=")).count();
    let before = flushes(&std::fs::read_to_string(&nbd_log).unwrap());
    // A write completed on queue 1, then a FLUSH on queue 0: it must be sent on queue 1's
    // connection as well, or the write is not covered.
    write_pattern(&mut client, 1, 0, MIB as usize);
    assert_eq!(client.flush(0), 0);
    let text = std::fs::read_to_string(&nbd_log).unwrap();
    let connections: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.contains(" Flush id="))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("connection=")))
        .collect();
    assert_eq!(
        flushes(&text) - before,
        2,
        "one FLUSH per connection:\n{text}"
    );
    assert_eq!(connections.len(), 2, "FLUSHes on two connections:\n{text}");
    client.buf().fill(0);
    assert_eq!(client.read(0, 0, 0, MIB as usize), 0);
    check_pattern(&client.buf()[..MIB as usize], 0, 5).unwrap();
}

#[test]
fn server_errors_in_structured_replies_reach_the_driver_and_the_connection_goes_on() {
    let dir = Scratch::new("nbdkit-err");
    let nbd_sock = dir.path("nbd.sock");
    let trigger = dir.path("fail-reads");
    let file = format!("error-pread-file={}", trigger.display());
    let args = [
        "--filter=error",
        "memory",
        "4M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        file.as_str(),
    ];
    let Some(_server) = nbdkit(&nbd_sock, &args) else {
        return;
    };
    let sock = dir.path("vu.sock");
    let mut daemon = Daemon::start(&sock, &uri(&nbd_sock), &[]);
    let mut client = Client::connect(&sock, 1, MIB as usize).unwrap();
    write_pattern(&mut client, 0, 0, MIB as usize);
    std::fs::write(&trigger, b"").unwrap();
    assert_eq!(client.read(0, 0, 0, 4096), -libc::EIO);
    assert_eq!(client.read(0, 0, 0, MIB as usize), -libc::EIO);
    std::fs::remove_file(&trigger).unwrap();
    client.buf().fill(0);
    assert_eq!(client.read(0, 0, 0, MIB as usize), 0);
    check_pattern(&client.buf()[..MIB as usize], 0, 5).unwrap();
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon still up"
    );
}

#[test]
fn file_plugin_restarted_under_writes_loses_none() {
    const CHUNK: usize = 128 << 10;
    let dir = Scratch::new("nbdkit-restart");
    let img = dir.image("disk.img", 4 * MIB);
    let nbd_sock = dir.path("nbd.sock");
    let file = format!("file={}", img.display());
    let Some(server) = nbdkit(&nbd_sock, &["file", file.as_str()]) else {
        return;
    };
    let sock = dir.path("vu.sock");
    let spec = format!("{}&reconnect=30", uri(&nbd_sock));
    let daemon = Daemon::start(&sock, &spec, &[]);
    let mut client = Client::connect(&sock, 1, 4 * MIB as usize).unwrap();

    let submit = |client: &mut Client, range: std::ops::Range<usize>| {
        for i in range {
            let off = i * CHUNK;
            fill_pattern(&mut client.buf()[off..off + CHUNK], off as u64, 5);
            let p = client.buf_ptr(off);
            client.queues[0].write(off as u64, p, CHUNK, i, ReqFlags::empty());
        }
        let mut none = [];
        client.queues[0].do_io(&mut none, 0, None, None).unwrap();
    };
    submit(&mut client, 0..16);
    drop(server); // SIGKILL with writes in flight
    submit(&mut client, 16..32); // submitted while the server is down: they wait
    std::thread::sleep(Duration::from_millis(500));
    // Restarted from the test thread: started from a helper thread, the new nbdkit went
    // away when that thread ended.
    let _ = std::fs::remove_file(&nbd_sock); // a killed nbdkit leaves its socket behind
    let server = nbdkit(&nbd_sock, &["file", file.as_str()]).expect("nbdkit");
    for (i, ret) in client.wait(0, 32) {
        assert_eq!(ret, 0, "request {i} failed");
    }
    assert_eq!(client.flush(0), 0);
    client.buf().fill(0);
    assert_eq!(client.read(0, 0, 0, 4 * MIB as usize), 0);
    check_pattern(&client.buf()[..4 * MIB as usize], 0, 5).unwrap();

    assert!(daemon.terminate().success());
    drop(server);
    check_pattern(&std::fs::read(&img).unwrap(), 0, 5).unwrap();
}
