//! A daemon binary under test: started, waited for until its socket listens, signalled, and
//! waited for until it exits. Killed at drop if it still runs.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon that serves a unix socket; killed at drop if still running.
pub struct Served {
    /// The process.
    pub child: Child,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl Served {
    /// Spawn `cmd` (stdin from /dev/null) and wait until `socket` accepts a connection.
    pub fn start(mut cmd: Command, socket: &Path) -> Self {
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let mut served = Self {
            child,
            socket: socket.to_path_buf(),
        };
        wait_listening(&mut served.child, socket);
        served
    }

    /// Send signal `sig` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        send_signal(&self.child, sig);
    }

    /// Send SIGTERM and wait (at most 30 s) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_timeout(Duration::from_secs(30))
    }

    /// Wait at most `limit` for the exit status; panics when it does not exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> ExitStatus {
        wait_exit(&mut self.child, limit)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `socket` accepts a connection; panics if `child` exits first or it takes too
/// long. The probe connection is a short-lived frontend: this then waits a moment so the
/// daemon is back in `accept` before the test connects.
pub fn wait_listening(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the daemon exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not listen on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// Send signal `sig` to `child`.
pub fn send_signal(child: &Child, sig: i32) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child's pid has no memory-safety implications.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Wait at most `limit` for `child` to exit; panics when it does not.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}
