//! Logs written to a file (journald, a redirect) carry no terminal colour codes.

mod common;
mod ops_common;

use std::process::Stdio;

use common::*;
use ops_common::*;

#[test]
fn logs_to_a_file_have_no_escape_codes() {
    let dir = Scratch::new("logs");
    let (sock, log) = (dir.path("vu.sock"), dir.path("stderr.log"));
    let child = virtiod()
        .args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg("mem:1M")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = RunDaemon { child };
    wait_for_socket(&sock, &mut daemon.child);
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read(&log).unwrap();
    let shown = String::from_utf8_lossy(&text);
    assert!(!text.contains(&0x1b), "escape codes in:\n{shown:?}");
    assert!(shown.contains(" INFO "), "no log lines:\n{shown}");
    assert!(shown.contains("stopping"), "{shown}");
}
