//! `--control PATH` and `virtiod ctl`: devices are added and removed while two others serve
//! I/O without an error.

mod common;
mod ops_common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ops_common::*;

const LEN: usize = 16384;

/// Write-then-verify loops on `socket` until `stop`; counts rounds in `done`.
fn io_loop(
    socket: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut client = Client::connect(&socket, 1, LEN).unwrap();
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let off = (round % 512) * LEN as u64;
            fill_pattern(client.buf(), off, seed + round);
            assert_eq!(
                client.write(0, off, 0, LEN),
                0,
                "write on {}",
                socket.display()
            );
            client.buf().fill(0);
            assert_eq!(
                client.read(0, off, 0, LEN),
                0,
                "read on {}",
                socket.display()
            );
            check_pattern(client.buf(), off, seed + round).unwrap();
            round += 1;
            done.store(round, Ordering::Relaxed);
        }
    })
}

fn wait_rounds(done: &AtomicU64, more_than: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) <= more_than {
        assert!(Instant::now() < deadline, "I/O made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hot_add_and_remove_while_two_devices_serve_io() {
    let dir = Scratch::new("control");
    let (a, b, c) = (dir.path("a.sock"), dir.path("b.sock"), dir.path("c.sock"));
    let control = dir.path("ctl.sock");
    let cfg = dir.path("devices.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            vhost_user_device("a", "mem:16M", &a),
            vhost_user_device("b", "mem:16M", &b)
        ),
    )
    .unwrap();
    let daemon = RunDaemon::start(
        &cfg,
        &["--control", control.to_str().unwrap()],
        &[a.clone(), b.clone(), control.clone()],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::default()).collect();
    let loops = [
        io_loop(a.clone(), 100, stop.clone(), done[0].clone()),
        io_loop(b.clone(), 200, stop.clone(), done[1].clone()),
    ];
    wait_rounds(&done[0], 10);
    wait_rounds(&done[1], 10);

    // Add c (TOML), use it, look at it, remove it: a and b keep going.
    let spec = format!(
        "name = \"c\"\nimage = \"mem:8M\"\nvhost-user = \"{}\"\n",
        c.display()
    );
    let (code, out, err) = ctl(&control, &["add", &spec]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), c.to_str().unwrap());
    {
        let mut client = Client::connect(&c, 1, LEN).unwrap();
        assert_eq!(client.capacity(), 8 << 20);
        for i in 0..5 {
            assert_eq!(client.write(0, i * LEN as u64, 0, LEN), 0);
        }
    }
    let (code, out, _) = ctl(&control, &["list"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines.iter().all(|l| l.contains(" up ")), "{out}");
    let (code, out, _) = ctl(&control, &["--json", "stats", "c"]);
    assert_eq!(code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats[0]["requests"]["write"], 5, "{out}");
    assert_eq!(stats[0]["bytes"]["write"], 5 * LEN as u64, "{out}");

    // Same name or socket again: refused, nothing disturbed.
    let (code, _, err) = ctl(&control, &["add", &spec]);
    assert_eq!(code, 1);
    assert!(err.contains("already served"), "{err}");
    // A bad description: refused by ctl itself with its line and column.
    let (code, _, err) = ctl(
        &control,
        &["add", "name = \"x\"\nimage = \"mem:1M\"\nsocket = \"/x\"\n"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("device: 3:1: unknown field `socket`"), "{err}");

    let before = [
        done[0].load(Ordering::Relaxed),
        done[1].load(Ordering::Relaxed),
    ];
    let (code, _, err) = ctl(&control, &["remove", "c"]);
    assert_eq!(code, 0, "{err}");
    assert!(!c.exists(), "c's socket removed");
    let (_, out, _) = ctl(&control, &["list"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, _, err) = ctl(&control, &["remove", "c"]);
    assert_eq!(code, 1);
    assert!(err.contains("no device named c"), "{err}");

    // Back again, as JSON, with a connected frontend this time: remove disconnects it.
    let json = format!(
        r#"{{"name": "c", "image": "mem:8M", "vhost-user": "{}", "queues": 2}}"#,
        c.display()
    );
    let (code, _, err) = ctl(&control, &["add", &json]);
    assert_eq!(code, 0, "{err}");
    let mut client = Client::connect(&c, 2, LEN).unwrap();
    assert_eq!(client.write(1, 0, 0, LEN), 0);
    let (code, _, err) = ctl(&control, &["remove", "c"]);
    assert_eq!(code, 0, "{err}");
    assert!(!c.exists());
    drop(client);

    // a and b never stopped.
    wait_rounds(&done[0], before[0] + 10);
    wait_rounds(&done[1], before[1] + 10);
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().expect("an I/O loop failed");
    }
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(
        !a.exists() && !b.exists() && !control.exists(),
        "sockets removed"
    );
}

#[test]
fn ctl_without_a_daemon_says_what_to_do() {
    let dir = Scratch::new("control-none");
    let (code, _, err) = ctl(&dir.path("nope.sock"), &["list"]);
    assert_eq!(code, 1);
    assert!(err.contains("is virtiod running with --control"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
