//! Handing a live vhost-user connection over: a libblkio client writes a verified stream
//! while the device's connection is exported and served on by another device (in a child
//! process that inherits the descriptors, or in this process), or the export is abandoned
//! and the first device serves on. The client never reconnects and never sees an error.
//! (Sending the descriptors over a socket is the daemon's upgrade channel's job, tested with
//! it: `virtiod/tests/upgrade.rs`.)

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use virtiod_vhost_user::{Export, HandoverError, HandoverState};

const CHILD_IMAGE: &str = "VU_HANDOVER_CHILD_IMAGE";
const CHILD_SOCKET: &str = "VU_HANDOVER_CHILD_SOCKET";
/// The exported state, as JSON.
const CHILD_STATE: &str = "VU_HANDOVER_CHILD_STATE";
/// The inherited descriptors, in the order of the export, as `N,N,...`.
const CHILD_FDS: &str = "VU_HANDOVER_CHILD_FDS";
const TIMEOUT: Duration = Duration::from_secs(10);

fn byte(sock: &mut UnixStream) -> u8 {
    let mut b = [0u8; 1];
    sock.read_exact(&mut b).unwrap();
    b[0]
}

/// Not a test of its own: the child process of
/// [`a_child_process_takes_over_the_connection_mid_stream`] (this test binary run again with
/// the image, socket, exported state and inherited descriptors in its environment and its
/// end of a socket pair as stdin). It imports the handover into a device of its own over the
/// same image, and serves when told to; it answers `Q` with the frontends it accepted and
/// stops on `X`.
#[test]
fn handover_child_process() {
    let (Some(image), Some(socket), Ok(state), Ok(fds)) = (
        std::env::var_os(CHILD_IMAGE),
        std::env::var_os(CHILD_SOCKET),
        std::env::var(CHILD_STATE),
        std::env::var(CHILD_FDS),
    ) else {
        return; // run by the parent test only
    };
    let (image, socket) = (PathBuf::from(image), PathBuf::from(socket));
    let mut sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned().unwrap());
    let state: HandoverState = serde_json::from_str(&state).unwrap();
    let fds: Vec<OwnedFd> = fds
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| {
            // SAFETY: the parent left exactly these descriptors open across exec for this
            // process (see `inheritable`); nothing else here owns them.
            unsafe { OwnedFd::from_raw_fd(n.parse().unwrap()) }
        })
        .collect();
    let dev = device(&image);
    let imported = match dev.import(&state, fds) {
        Ok(i) => i,
        Err(err) => {
            sock.write_all(b"E").unwrap();
            panic!("import failed: {err}");
        }
    };
    sock.write_all(b"I").unwrap();
    assert_eq!(byte(&mut sock), b'C', "the parent commits");
    let server = dev
        .spawn_imported(imported, &socket, "vu-child", |r| {
            panic!("serving ended: {r:?}")
        })
        .unwrap();
    sock.write_all(b"S").unwrap();
    loop {
        match byte(&mut sock) {
            b'Q' => sock
                .write_all(&dev.connections_accepted().to_le_bytes())
                .unwrap(),
            b'X' => {
                server.stop(TIMEOUT).unwrap();
                sock.write_all(b"x").unwrap();
                return;
            }
            other => panic!("unknown command {other}"),
        }
    }
}

/// Let the export's descriptors be inherited by the next child started (they are this
/// test's own duplicates); their numbers as `N,N,...`.
fn inheritable(export: &Export) -> String {
    let mut numbers = Vec::new();
    for fd in export.fds() {
        // SAFETY: F_SETFD on a descriptor the export owns only changes its close-on-exec
        // flag.
        assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }, 0);
        numbers.push(fd.as_raw_fd().to_string());
    }
    numbers.join(",")
}

fn accepted_by_child(sock: &mut UnixStream) -> u64 {
    sock.write_all(b"Q").unwrap();
    let mut n = [0u8; 8];
    sock.read_exact(&mut n).unwrap();
    u64::from_le_bytes(n)
}

#[test]
fn a_child_process_takes_over_the_connection_mid_stream() {
    let dir = Scratch::new("child");
    let img = dir.image("disk.img", 32 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut client = Client::connect(&sock, 8 * 64 * 1024);
    let mut stream = Stream::new(32 * MIB, 64 * 1024, 8);
    let done = stream.done.clone();
    let handed = AtomicBool::new(false);
    let (mut parent, child_end) = UnixStream::pair().unwrap();
    let mut child = None;
    std::thread::scope(|s| {
        let control = s.spawn(|| {
            wait_for(&done, 200);
            let a_dev = a.device().clone();
            let paused = std::time::Instant::now();
            let export = a_dev.export(TIMEOUT).expect("export");
            let frozen = paused.elapsed();
            let state = export.state().clone();
            let conn = state.connection.as_ref().expect("a frontend is connected");
            let ring = conn.vrings[0].ring;
            assert!(ring.started && ring.enabled);
            assert_eq!(ring.next_avail, ring.next_used, "drained: nothing in flight");
            let export_fds = export.fds().len();
            // The child inherits the descriptors (no other test here starts a process).
            child = Some(
                Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "handover_child_process", "--nocapture"])
                    .env(CHILD_IMAGE, &img)
                    .env(CHILD_SOCKET, &sock)
                    .env(CHILD_STATE, serde_json::to_string(&state).unwrap())
                    .env(CHILD_FDS, inheritable(&export))
                    .stdin(Stdio::from(OwnedFd::from(child_end)))
                    .spawn()
                    .unwrap(),
            );
            assert_eq!(byte(&mut parent), b'I', "the child imported the state");
            export.commit(TIMEOUT).expect("commit");
            assert!(a_dev.handed_over());
            parent.write_all(b"C").unwrap();
            assert_eq!(byte(&mut parent), b'S', "the child serves");
            println!(
                "frozen after {frozen:?}; the child serves {:?} after the export began ({} descriptors)",
                paused.elapsed(),
                export_fds
            );
            let at_handover = done.load(Ordering::Acquire);
            // The first device goes away entirely: the child serves on.
            wait_for(&done, at_handover + 100);
            a.stop(TIMEOUT).unwrap();
            assert!(
                sock.exists(),
                "the socket is the child's now: left in place"
            );
            wait_for(&done, at_handover + 200);
            handed.store(true, Ordering::Release);
            (a_dev.connections_accepted(), at_handover)
        });
        stream.run(
            &mut client,
            || handed.load(Ordering::Acquire) || control.is_finished(),
            100,
        );
        let (accepted_by_a, at_handover) = control.join().unwrap();
        let total = done.load(Ordering::Acquire);
        println!("requests: {at_handover} before the handover, {total} in all");
        assert_eq!(
            accepted_by_a, 1,
            "the first device accepted the client once"
        );
    });
    stream.verify(&mut client);
    assert_eq!(
        accepted_by_child(&mut parent),
        0,
        "the client never reconnected"
    );
    drop(client);
    // The child falls back to its accept loop: a new client is served.
    let mut second = Client::connect(&sock, 64 * 1024);
    assert_eq!(second.write(0, 4096, 99), 0);
    assert_eq!(second.read(0, 4096), 0);
    let mut want = vec![0u8; 4096];
    fill_pattern(&mut want, 0, 99);
    assert!(
        second.buf()[..4096] == want[..],
        "read back what was written"
    );
    assert_eq!(accepted_by_child(&mut parent), 1);
    drop(second);
    parent.write_all(b"X").unwrap();
    assert_eq!(byte(&mut parent), b'x');
    assert!(child.unwrap().wait().unwrap().success());
}

#[test]
fn an_abandoned_export_serves_on_and_an_in_process_import_takes_over() {
    let dir = Scratch::new("resume");
    let img = dir.image("disk.img", 32 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut client = Client::connect(&sock, 8 * 64 * 1024);
    let mut stream = Stream::new(32 * MIB, 64 * 1024, 8);
    let done = stream.done.clone();
    let finished = AtomicBool::new(false);
    std::thread::scope(|s| {
        let control = s.spawn(|| {
            let a_dev = a.device().clone();
            wait_for(&done, 100);
            // Resumed explicitly.
            a_dev.export(TIMEOUT).expect("export").resume();
            wait_for(&done, done.load(Ordering::Acquire) + 50);
            // Dropped: resumes too.
            drop(a_dev.export(TIMEOUT).expect("export"));
            wait_for(&done, done.load(Ordering::Acquire) + 50);
            // Imported by a second device that then gives up: the first serves on.
            let mut export = a_dev.export(TIMEOUT).expect("export");
            let b = device(&img);
            let imported = {
                let fds = export.take_fds();
                b.import(export.state(), fds)
            }
            .expect("import");
            assert!(imported.has_connection());
            drop(imported);
            export.resume();
            wait_for(&done, done.load(Ordering::Acquire) + 50);
            assert!(!a_dev.handed_over());
            // Now for real, in this process.
            let mut export = a_dev.export(TIMEOUT).expect("export");
            let b = device(&img);
            let imported = {
                let fds = export.take_fds();
                b.import(export.state(), fds)
            }
            .expect("import");
            export.commit(TIMEOUT).expect("commit");
            let b_server = b
                .spawn_imported(imported, &sock, "vu-b", |r| panic!("serving ended: {r:?}"))
                .unwrap();
            wait_for(&done, done.load(Ordering::Acquire) + 100);
            a.stop(TIMEOUT).unwrap();
            wait_for(&done, done.load(Ordering::Acquire) + 100);
            finished.store(true, Ordering::Release);
            (a_dev, b_server)
        });
        stream.run(
            &mut client,
            || finished.load(Ordering::Acquire) || control.is_finished(),
            50,
        );
        let (a_dev, b_server) = control.join().unwrap();
        stream.verify(&mut client);
        assert_eq!(a_dev.connections_accepted(), 1);
        assert_eq!(
            b_server.device().connections_accepted(),
            0,
            "no reconnection"
        );
        drop(client);
        b_server.stop(TIMEOUT).unwrap();
    });
}

#[test]
fn a_device_without_a_frontend_hands_its_socket_over() {
    let dir = Scratch::new("idle");
    let img = dir.image("disk.img", 4 * MIB);
    let sock = dir.path("vu.sock");
    let a = serve(&img, &sock, "vu-a");
    let mut export = a.device().export(TIMEOUT).expect("export");
    assert!(export.state().connection.is_none());
    assert_eq!(export.fds().len(), 1, "the listening socket only");
    let b = device(&img);
    let imported = {
        let fds = export.take_fds();
        b.import(export.state(), fds)
    }
    .unwrap();
    assert!(!imported.has_connection());
    export.commit(TIMEOUT).unwrap();
    assert!(matches!(
        a.device().export(TIMEOUT),
        Err(HandoverError::HandedOver)
    ));
    let b_server = b
        .spawn_imported(imported, &sock, "vu-b", |r| panic!("serving ended: {r:?}"))
        .unwrap();
    a.stop(TIMEOUT).unwrap();
    let mut client = Client::connect(&sock, 64 * 1024);
    assert_eq!(client.write(MIB, 4096, 5), 0);
    assert_eq!(client.read(MIB, 4096), 0);
    let mut want = vec![0u8; 4096];
    fill_pattern(&mut want, MIB, 5);
    assert!(client.buf()[..4096] == want[..]);
    assert_eq!(b_server.device().connections_accepted(), 1);
    drop(client);
    b_server.stop(TIMEOUT).unwrap();
    assert!(!sock.exists());
}
