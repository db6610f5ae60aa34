//! `virtiod ctl upgrade` and SIGUSR2: a vhost-user write/verify stream (libblkio, which never
//! reconnects) continues across upgrades on the same connection — the frontend stays
//! connected, its connection is handed over — the listening socket never disappears (same
//! inode throughout), the old process exits 0 and the PID changes; failed upgrades (a binary
//! that exits at once, a new process that dies after taking the devices over or before it
//! is ready) leave the old daemon serving the same connection.

mod common;
mod ops_common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::*;
use ops_common::*;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024;

/// What the stream saw.
#[derive(Debug, Default)]
struct Report {
    writes: u64,
    /// Why the connection stopped working, if it did (blkio does not reconnect).
    lost: Option<String>,
    /// Requests that completed with an error (never acceptable).
    errors: Vec<String>,
    longest_gap: Duration,
    /// Block -> seed of the last acknowledged write.
    written: HashMap<u64, u64>,
}

/// Wait up to `timeout` for one completion: its result, or `None` (the connection is gone).
fn complete(client: &mut Client, timeout: Duration) -> Option<i32> {
    let mut done = [MaybeUninit::<Completion>::uninit()];
    let mut left = timeout;
    match client.queues[0].do_io(&mut done, 1, Some(&mut left), None) {
        // SAFETY: do_io initialised the first completion.
        Ok(1) => Some(unsafe { done[0].assume_init_ref() }.ret),
        _ => None,
    }
}

/// 4 KiB writes, each read back and compared, round and round over BLOCKS blocks, on one
/// connection, until `stop`; a request that gets no completion within 5 s means the
/// connection is lost (the stream ends there).
fn stream(socket: PathBuf, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> JoinHandle<Report> {
    std::thread::spawn(move || {
        let mut r = Report::default();
        let mut client = Client::connect(&socket, 1, 2 * BLOCK).expect("connecting");
        let mut last = Instant::now();
        let mut seed = 1u64;
        while !stop.load(Ordering::Acquire) {
            let block = seed % BLOCKS;
            let offset = block * BLOCK as u64;
            fill_pattern(&mut client.buf()[..BLOCK], offset, seed);
            let (wp, rp) = (client.buf_ptr(0), client.buf_ptr(BLOCK));
            client.queues[0].write(offset, wp, BLOCK, 0, ReqFlags::empty());
            let wrote = complete(&mut client, Duration::from_secs(5));
            let read = wrote.filter(|&ret| ret == 0).and_then(|_| {
                client.queues[0].read(offset, rp, BLOCK, 0, ReqFlags::empty());
                complete(&mut client, Duration::from_secs(5))
            });
            match (wrote, read) {
                (Some(0), Some(0)) => {
                    if let Err(e) = check_pattern(&client.buf()[BLOCK..2 * BLOCK], offset, seed) {
                        r.errors.push(format!("block {block}: {e}"));
                    }
                    r.written.insert(block, seed);
                    r.writes += 1;
                    done.store(r.writes, Ordering::Release);
                    r.longest_gap = r.longest_gap.max(last.elapsed());
                    last = Instant::now();
                    seed += 1;
                }
                (Some(ret), _) | (_, Some(ret)) if ret != 0 => {
                    r.errors
                        .push(format!("block {block}: request failed: {ret}"));
                    seed += 1;
                }
                _ => {
                    r.lost = Some(format!("block {block}: no completion within 5 s"));
                    break;
                }
            }
        }
        r
    })
}

/// Watch that `socket` stays the same socket (inode) until `stop`; returns what went wrong.
fn watch_socket(socket: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        let ino = std::fs::metadata(&socket).unwrap().ino();
        while !stop.load(Ordering::Acquire) {
            match std::fs::metadata(&socket) {
                Ok(m) if m.ino() == ino => {}
                Ok(_) => return Some("the socket was replaced by another one".into()),
                Err(e) => return Some(format!("the socket disappeared: {e}")),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    })
}

/// The PID of the virtiod that took over with `--takeover-fd` on `control`.
fn daemon_serving(control: &Path) -> Option<u32> {
    let want = control.to_str()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let has = |a: &str| args.contains(&a.as_bytes());
            if has(want) && has("--takeover-fd") && alive(pid) {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// `ctl upgrade ARGS`: the new PID.
fn upgrade(control: &Path, args: &[&str]) -> Result<u32, String> {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    let (code, out, err) = ctl(control, &all);
    if code != 0 {
        return Err(err);
    }
    let pid = out.trim().rsplit(' ').next().and_then(|p| p.parse().ok());
    pid.ok_or_else(|| format!("unexpected answer: {out}"))
}

struct Setup {
    dir: Scratch,
    socket: PathBuf,
    control: PathBuf,
    image: PathBuf,
    daemon: RunDaemon,
}

/// A daemon under Landlock (the default) with the scratch directory allowed for `ctl add`,
/// or (`landlock_off`) without it: Landlock lets the daemon run only programs next to its own
/// binary, so a failing `--binary` elsewhere would not even start.
fn setup(name: &str, landlock_off: bool) -> Setup {
    let dir = Scratch::new(name);
    let image = dir.image("a.img", BLOCKS * BLOCK as u64);
    let socket = dir.path("a.sock");
    let control = dir.path("ctl.sock");
    let config = dir.path("devices.toml");
    std::fs::write(
        &config,
        vhost_user_device("a", image.to_str().unwrap(), &socket),
    )
    .unwrap();
    let state = dir.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let confine = match landlock_off {
        true => ["--landlock", "off"],
        false => ["--allow-dir", dir.0.to_str().unwrap()],
    };
    let mut args = vec![
        "--control",
        control.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(&confine);
    let daemon = RunDaemon::start(&config, &args, std::slice::from_ref(&socket));
    Setup {
        dir,
        socket,
        control,
        image,
        daemon,
    }
}

/// Wait until the stream verified `more` writes beyond what it had (the connection works).
fn progresses(done: &AtomicU64, more: u64, what: &str) {
    let from = done.load(Ordering::Acquire);
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::Acquire) < from + more {
        assert!(
            Instant::now() < deadline,
            "{what}: the stream made no progress (stuck at {} writes)",
            done.load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGTERM a daemon that is not our child and wait until it is gone.
fn terminate(pid: u32) {
    // SAFETY: kill(2) has no memory-safety implications.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(Instant::now() < deadline, "virtiod {pid} did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_stream_continues_on_its_connection_across_upgrades() {
    let mut s = setup("upgrade", false);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = stream(s.socket.clone(), stop.clone(), done.clone());
    let watcher = watch_socket(s.socket.clone(), stop.clone());
    progresses(&done, 50, "before the first upgrade");
    // SIGUSR2 upgrades with the defaults.
    let first = s.daemon.child.id();
    s.daemon.signal(libc::SIGUSR2);
    let status = s.daemon.child.wait().unwrap();
    assert!(
        status.success(),
        "the old process exited {status} after SIGUSR2"
    );
    let mut pid = daemon_serving(&s.control).expect("no daemon took over after SIGUSR2");
    assert_ne!(pid, first);
    progresses(&done, 50, "after SIGUSR2");
    for round in 1..=3 {
        let new = upgrade(&s.control, &[]).unwrap_or_else(|e| panic!("upgrade {round}: {e}"));
        assert_ne!(new, pid, "upgrade {round}: the PID did not change");
        assert!(
            !alive(pid),
            "upgrade {round}: the old process {pid} still runs"
        );
        assert!(
            alive(new),
            "upgrade {round}: the new process {new} is not running"
        );
        pid = new;
        let (code, out, err) = ctl(&s.control, &["list"]);
        assert_eq!(code, 0, "ctl list after upgrade {round}: {err}");
        assert!(
            out.contains("a vhost-user") && out.contains(" up "),
            "{out}"
        );
        progresses(&done, 50, &format!("after upgrade {round}"));
    }
    stop.store(true, Ordering::Release);
    let report = writer.join().unwrap();
    assert_eq!(
        watcher.join().unwrap(),
        None,
        "the listening socket changed"
    );
    assert!(report.errors.is_empty(), "I/O errors: {:?}", report.errors);
    assert_eq!(report.lost, None, "the connection was lost: {report:?}");
    eprintln!(
        "upgrade over vhost-user: 4 upgrades, {} verified writes on one connection, longest gap {:?}",
        report.writes, report.longest_gap
    );
    terminate(pid);
    // Every acknowledged write is in the image.
    let image = std::fs::read(&s.image).unwrap();
    for (block, seed) in &report.written {
        let at = (block * BLOCK as u64) as usize;
        check_pattern(&image[at..at + BLOCK], block * BLOCK as u64, *seed)
            .unwrap_or_else(|e| panic!("block {block} in the image: {e}"));
    }
    assert!(!s.socket.exists(), "SIGTERM left the socket behind");
}

#[test]
fn failed_upgrades_leave_the_old_daemon_serving() {
    let mut s = setup("upgrade-fail", true);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = stream(s.socket.clone(), stop.clone(), done.clone());
    let watcher = watch_socket(s.socket.clone(), stop.clone());
    progresses(&done, 50, "before the upgrades");
    let pid = s.daemon.child.id();

    let err = upgrade(&s.control, &["--binary", "/bin/false"]).unwrap_err();
    assert!(err.contains("serves on"), "{err}");

    // A new process that exits right after it took the devices over, before confirming.
    let dies = s.dir.path("dies.sh");
    std::fs::write(
        &dies,
        format!(
            "#!/bin/sh\nVIRTIOD_DEBUG_UPGRADE_DIE=taken exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_virtiod")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&dies, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = upgrade(&s.control, &["--binary", dies.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("serves on"), "{err}");
    progresses(
        &done,
        50,
        "after a new process died having taken the devices over",
    );
    // And one that dies before it answers `ready`.
    std::fs::write(
        &dies,
        format!(
            "#!/bin/sh\nVIRTIOD_DEBUG_UPGRADE_DIE=ready exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_virtiod")
        ),
    )
    .unwrap();
    let err = upgrade(&s.control, &["--binary", dies.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("serves on"), "{err}");
    progresses(&done, 50, "after a new process died before it was ready");

    // A net device cannot move yet: the upgrade says so and nothing changes.
    let net = format!(
        "name = \"n\"\nnet = \"switch:sw0\"\nvhost-user = \"{}\"",
        s.dir.path("n.sock").display()
    );
    let (code, _, err) = ctl(&s.control, &["add", &net]);
    assert_eq!(code, 0, "ctl add a net device: {err}");
    let refused = upgrade(&s.control, &[]).unwrap_err();
    assert!(
        refused.contains("net devices cannot be upgraded"),
        "{refused}"
    );
    assert_eq!(ctl(&s.control, &["remove", "n"]).0, 0);
    assert!(
        s.daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
    let (code, out, err) = ctl(&s.control, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("a vhost-user") && out.contains(" up "),
        "{out}"
    );
    progresses(&done, 50, "at the end");
    stop.store(true, Ordering::Release);
    let report = writer.join().unwrap();
    assert_eq!(
        watcher.join().unwrap(),
        None,
        "the listening socket changed"
    );
    assert!(report.errors.is_empty(), "I/O errors: {:?}", report.errors);
    assert_eq!(report.lost, None, "the connection was lost: {report:?}");
    assert_eq!(s.daemon.child.id(), pid);
    let (status, _) = s.daemon.terminate();
    assert!(status.success(), "{status}");
}

/// Write `seed`'s pattern to `block`, read it back and compare.
fn round_trip(client: &mut Client, block: u64, seed: u64) {
    let offset = block * BLOCK as u64;
    fill_pattern(&mut client.buf()[..BLOCK], offset, seed);
    let (wp, rp) = (client.buf_ptr(0), client.buf_ptr(BLOCK));
    client.queues[0].write(offset, wp, BLOCK, 0, ReqFlags::empty());
    assert_eq!(complete(client, Duration::from_secs(5)), Some(0), "write");
    client.queues[0].read(offset, rp, BLOCK, 0, ReqFlags::empty());
    assert_eq!(complete(client, Duration::from_secs(5)), Some(0), "read");
    check_pattern(&client.buf()[BLOCK..2 * BLOCK], offset, seed).unwrap();
}

#[test]
fn a_new_process_failing_after_the_commit_leaves_the_socket_served_again() {
    let mut s = setup("upgrade-go", true);
    let mut first = Client::connect(&s.socket, 1, 2 * BLOCK).expect("connecting");
    round_trip(&mut first, 7, 70);
    // The old process lets go of the connection, then the new one dies before serving it:
    // the connection is gone with it, the old process serves the socket again.
    let dies = s.dir.path("dies.sh");
    std::fs::write(
        &dies,
        format!(
            "#!/bin/sh\nVIRTIOD_DEBUG_UPGRADE_DIE=go exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_virtiod")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&dies, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = upgrade(&s.control, &["--binary", dies.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("serves on"), "{err}");
    drop(first);
    let mut second = Client::connect(&s.socket, 1, 2 * BLOCK).expect("reconnecting");
    let rp = second.buf_ptr(BLOCK);
    second.queues[0].read(7 * BLOCK as u64, rp, BLOCK, 0, ReqFlags::empty());
    assert_eq!(complete(&mut second, Duration::from_secs(5)), Some(0));
    check_pattern(&second.buf()[BLOCK..2 * BLOCK], 7 * BLOCK as u64, 70)
        .expect("the block written before the upgrade");
    round_trip(&mut second, 8, 80);
    let (code, out, err) = ctl(&s.control, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("a vhost-user") && out.contains(" up "),
        "{out}"
    );
    // And a real upgrade after that carries the new connection over.
    let pid = upgrade(&s.control, &[]).expect("an upgrade after the failed one");
    round_trip(&mut second, 9, 90);
    assert!(s.daemon.child.wait().unwrap().success());
    drop(second);
    terminate(pid);
}
