//! Seccomp: queue and message threads run confined; a call outside a queue thread's list ends
//! the process with one line naming it (`VIRTIOD_DEBUG_FORBIDDEN_SYSCALL` makes each queue
//! thread issue one: syslog(2), which no virtiod thread needs).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use virtiod_testkit::process::Served;

fn daemon(dir: &Scratch, seccomp: &str, forbidden: bool) -> Served {
    daemon_env(dir, seccomp, forbidden.then_some("1"))
}

fn daemon_env(dir: &Scratch, seccomp: &str, forbidden: Option<&str>) -> Served {
    let sock = dir.path("vu.sock");
    let mut cmd = virtiod();
    cmd.args(["serve", "--seccomp", seccomp, "--vhost-user"])
        .arg(&sock)
        .arg("mem:16M")
        .env_remove("VIRTIOD_SECCOMP")
        .stderr(Stdio::piped());
    if let Some(value) = forbidden {
        cmd.env("VIRTIOD_DEBUG_FORBIDDEN_SYSCALL", value);
    }
    Served::start(cmd, &sock)
}

fn stderr_of(served: &mut Served) -> String {
    let mut text = String::new();
    use std::io::Read;
    served
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[test]
fn a_forbidden_call_in_a_queue_thread_ends_the_process_naming_it() {
    let dir = Scratch::new("seccomp-trap");
    let mut served = daemon(&dir, "on", true);
    // The queue thread starts (and confines itself) when the frontend starts the queue.
    let _client = Client::connect(&served.socket, 1, 4096);
    let status = served.wait_timeout(Duration::from_secs(20));
    assert_eq!(status.code(), Some(159), "exit status {status}");
    let err = stderr_of(&mut served);
    assert!(
        err.contains("virtiod: seccomp: forbidden system call syslog (103) in a confined thread"),
        "stderr names the call:\n{err}"
    );
}

#[test]
fn with_filters_on_the_round_trip_works_and_off_or_log_let_the_call_through() {
    let dir = Scratch::new("seccomp-rt");
    let served = daemon(&dir, "on", false);
    let mut client = Client::connect(&served.socket, 1, 1 << 20).unwrap();
    fill_pattern(&mut client.buf()[..1 << 20], 0, 3);
    assert_eq!(client.write(0, 0, 0, 1 << 20), 0);
    assert_eq!(client.flush(0), 0);
    client.buf().fill(0);
    assert_eq!(client.read(0, 0, 0, 1 << 20), 0);
    check_pattern(&client.buf()[..1 << 20], 0, 3).unwrap();
    drop(client);
    drop(served);

    for mode in ["off", "log"] {
        let dir = Scratch::new(&format!("seccomp-{mode}"));
        let mut served = daemon(&dir, mode, true);
        let mut client = Client::connect(&served.socket, 1, 4096).unwrap();
        assert_eq!(client.read(0, 0, 0, 4096), 0, "--seccomp {mode}");
        assert!(
            served.child.try_wait().unwrap().is_none(),
            "--seccomp {mode}: the daemon keeps running"
        );
    }
}

/// `(comm, CapEff, CapPrm)` of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        out.push((comm.trim().to_string(), field("CapEff:"), field("CapPrm:")));
    }
    out
}

#[test]
fn confined_threads_hold_no_capabilities() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("checking that root's capabilities are dropped needs root");
        return;
    }
    let dir = Scratch::new("seccomp-caps");
    let served = daemon(&dir, "on", false);
    let mut client = Client::connect(&served.socket, 1, 4096).unwrap();
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    let threads = thread_caps(served.child.id());
    let none = "0000000000000000";
    let confined: Vec<_> = threads
        .iter()
        .filter(|(comm, _, _)| comm.starts_with("vu-"))
        .collect();
    assert!(
        confined.iter().any(|(c, _, _)| c == "vu-queue-0") && confined.len() >= 2,
        "the message and queue threads: {threads:?}"
    );
    for (comm, eff, prm) in &confined {
        assert_eq!((eff.as_str(), prm.as_str()), (none, none), "{comm}");
    }
    // Without a control socket nothing can be added later: after start-up the main thread
    // keeps nothing either (least_privilege.rs checks the configurations that keep some).
    let (_, main_eff, _) = threads.iter().find(|(c, _, _)| c == "virtiod").unwrap();
    assert_eq!(
        main_eff, none,
        "the main thread of a vhost-user-only daemon"
    );
}

#[test]
fn a_queue_thread_opening_a_file_is_refused_and_goes_on() {
    let dir = Scratch::new("seccomp-open");
    let mut served = daemon_env(&dir, "on", Some("open"));
    let mut client = Client::connect(&served.socket, 1, 4096).unwrap();
    assert_eq!(client.read(0, 0, 0, 4096), 0, "the queue keeps serving");
    drop(client);
    served.signal(libc::SIGTERM);
    let status = served.wait_timeout(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    let err = stderr_of(&mut served);
    assert!(
        err.contains("a queue thread opening a file: Err(") && err.contains("PermissionDenied"),
        "the open is refused with EACCES:\n{err}"
    );
}
