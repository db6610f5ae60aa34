//! The control socket is a door for hostile clients: a request over 64 KiB gets one error line
//! and a closed connection, and a flood of 1,000 idle clients neither delays `ctl list` past a
//! second, nor grows the daemon's memory by more than a few MiB, nor costs it a thread.

mod common;
mod ops_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ops_common::*;

const FLOOD: usize = 1000;

/// A field of /proc/PID/status (`VmRSS` in KiB, `Threads`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Send one raw request line; the answer line and how long it took.
fn request(control: &Path, line: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    (answer, started.elapsed())
}

/// Everything the daemon sends until it closes the connection (10 s at most).
fn read_until_closed(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the daemon neither answered nor closed: {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// This process holds the flood's descriptors: lift its soft limit like the daemon does.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).unwrap();
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_none_or(|n| n > FLOOD as u64 + 64),
        "RLIMIT_NOFILE {now:?} is too low for this test"
    );
}

#[test]
fn oversized_requests_and_a_flood_of_idle_clients_are_bounded() {
    raise_open_files_limit();
    let dir = Scratch::new("control-limits");
    let (a, control) = (dir.path("a.sock"), dir.path("ctl.sock"));
    let cfg = dir.path("devices.toml");
    std::fs::write(&cfg, vhost_user_device("a", "mem:16M", &a)).unwrap();
    let daemon = RunDaemon::start(
        &cfg,
        &["--control", control.to_str().unwrap()],
        &[a.clone(), control.clone()],
    );
    let pid = daemon.child.id();
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    // 1 MiB without a newline: one error line, then the daemon closes (so the write fails
    // part way, which is the point).
    let mut big = UnixStream::connect(&control).unwrap();
    let _ = big.write_all(&vec![b'x'; 1 << 20]);
    let answer = read_until_closed(&mut big);
    assert_eq!(answer.lines().count(), 1, "{answer:?}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["ok"], false);
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("longer than 64 KiB"), "{error}");

    // The daemon is warm (one answer given); then 1,000 clients connect and say nothing.
    let (answer, _) = request(&control, "{\"cmd\":\"list\"}\n");
    assert!(answer.contains("\"ok\":true"), "{answer}");
    let rss_before = proc_status(pid, "VmRSS");
    let threads_before = proc_status(pid, "Threads");
    let mut flood: Vec<UnixStream> = (0..FLOOD)
        .map(|_| UnixStream::connect(&control).expect("connect an idle client"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));

    let (answer, took) = request(&control, "{\"cmd\":\"list\"}\n");
    assert!(answer.contains("\"name\":\"a\""), "{answer}");
    assert!(took < Duration::from_secs(1), "list took {took:?}");
    let started = Instant::now();
    let (code, out, err) = ctl(&control, &["list"]);
    let ctl_took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("a vhost-user"), "{out}");
    assert!(
        ctl_took < Duration::from_secs(1),
        "ctl list took {ctl_took:?}"
    );

    let rss_after = proc_status(pid, "VmRSS");
    let threads_after = proc_status(pid, "Threads");
    eprintln!(
        "{FLOOD} idle clients: raw list {took:?}, ctl list {ctl_took:?}, \
         VmRSS {rss_before} -> {rss_after} KiB, threads {threads_before} -> {threads_after}"
    );
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "VmRSS grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(threads_after, threads_before, "a thread per client?");
    // The first idle client was the quietest when the 65th arrived: told why, and closed.
    let told = read_until_closed(&mut flood[0]);
    assert!(told.contains("closed to make room"), "{told:?}");

    drop(flood);
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0));
}
