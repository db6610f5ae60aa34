//! Bad operator input: one line saying what is wrong and what to do, a non-zero exit, and
//! nothing created, truncated or overwritten.

mod common;

use common::*;

struct Outcome {
    code: i32,
    stderr: String,
}

fn run(args: &[&str]) -> Outcome {
    let out = virtiod().args(args).output().expect("run virtiod");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The error must be on one line and mention `needle`.
fn assert_one_line_error(o: &Outcome, needle: &str) {
    assert_ne!(o.code, 0, "must fail: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line, got:\n{}", o.stderr);
    assert!(
        lines[0].contains(needle),
        "error should mention {needle:?}:\n{}",
        o.stderr
    );
}

#[test]
fn missing_image_is_not_created() {
    let dir = Scratch::new("cli-missing");
    let img = dir.path("nope.img");
    let sock = dir.path("s.sock");
    let o = run(&[
        "serve",
        "--vhost-user",
        sock.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "truncate -s");
    assert!(!img.exists(), "image not created");
    assert!(!sock.exists(), "socket not created");
}

#[test]
fn odd_sized_image_is_refused_untouched() {
    let dir = Scratch::new("cli-odd");
    let img = dir.path("odd.img");
    std::fs::write(&img, vec![7u8; 1000]).unwrap();
    let sock = dir.path("s.sock");
    let o = run(&[
        "serve",
        "--vhost-user",
        sock.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "not a multiple of 512");
    assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 1000]);
    assert!(!sock.exists());
}

#[test]
fn unknown_spec_and_bad_sizes() {
    let dir = Scratch::new("cli-spec");
    let sock = dir.path("s.sock");
    let s = sock.to_str().unwrap();
    assert_one_line_error(
        &run(&["serve", "--vhost-user", s, "iscsi:host"]),
        "unknown kind",
    );
    assert_one_line_error(
        &run(&["serve", "--vhost-user", s, "mem:12Q"]),
        "unknown size unit",
    );
    assert_one_line_error(
        &run(&["serve", "--vhost-user", s, "null:1000"]),
        "multiple of 512",
    );
    assert!(!sock.exists());
}

#[test]
fn bad_queue_settings() {
    let dir = Scratch::new("cli-queues");
    let sock = dir.path("s.sock");
    let s = sock.to_str().unwrap();
    assert_one_line_error(
        &run(&["serve", "--vhost-user", s, "--queues", "0", "mem:1M"]),
        "give 1 to 64",
    );
    assert_one_line_error(
        &run(&["serve", "--vhost-user", s, "--queue-size", "100", "mem:1M"]),
        "power of two",
    );
    assert!(!sock.exists());
}

#[test]
fn socket_in_use_refused_stale_replaced_file_kept() {
    let dir = Scratch::new("cli-sock");
    let sock = dir.path("s.sock");
    let daemon = Daemon::start(&sock, "mem:1M", &[]);
    let o = run(&["serve", "--vhost-user", sock.to_str().unwrap(), "mem:1M"]);
    assert_one_line_error(&o, "in use by another running process");
    assert!(sock.exists(), "the running daemon's socket is left alone");
    // A stale socket file (its listener gone) is replaced.
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let second = Daemon::start(&stale, "mem:1M", &[]);
    assert!(second.terminate().success());
    // A regular file is never overwritten.
    let file = dir.path("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let o = run(&["serve", "--vhost-user", file.to_str().unwrap(), "mem:1M"]);
    assert_one_line_error(&o, "not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(daemon.terminate().success());
}

#[test]
fn socket_directory_problems() {
    let dir = Scratch::new("cli-dir");
    let sock = dir.path("missing-dir/s.sock");
    let o = run(&["serve", "--vhost-user", sock.to_str().unwrap(), "mem:1M"]);
    assert_one_line_error(&o, "does not exist");
    // An unwritable directory: /proc refuses new files even for root.
    let o = run(&["serve", "--vhost-user", "/proc/virtiod-test.sock", "mem:1M"]);
    assert_one_line_error(&o, "cannot create socket");
}

#[test]
fn a_bad_on_stop_value_says_which_are_valid() {
    let dir = Scratch::new("cli-on-stop");
    let cfg = dir.path("devices.toml");
    std::fs::write(
        &cfg,
        "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvhost-user = \"/tmp/x.sock\"\n",
    )
    .unwrap();
    let o = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--on-stop",
        "detach",
    ]);
    assert_one_line_error(&o, "use \"remove\"");
    std::fs::write(&cfg, "[daemon]\non-stop = \"later\"\n\n[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvhost-user = \"/tmp/x.sock\"\n").unwrap();
    let o = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        dir.path("st").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "2:11: on-stop \"later\"");
}
