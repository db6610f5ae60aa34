//! Helpers of the operations tests (`ops_*.rs`): a `virtiod run` daemon from a devices file.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::virtiod;

/// A running `virtiod run` (killed at drop if still running).
pub struct RunDaemon {
    pub child: Child,
}

/// Wait until a frontend could connect to `socket`.
pub fn wait_for_socket(socket: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("virtiod exited early: {status}\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "nobody listens on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // That probe was a short-lived frontend: let the daemon go back to accept.
    std::thread::sleep(Duration::from_millis(50));
}

impl RunDaemon {
    /// `virtiod run --config CONFIG EXTRA...`, waiting for each socket in `sockets`.
    pub fn start(config: &Path, extra: &[&str], sockets: &[PathBuf]) -> Self {
        let mut child = virtiod()
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn virtiod run");
        for s in sockets {
            wait_for_socket(s, &mut child);
        }
        Self { child }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety implications.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGTERM, then the exit status and what it printed on stdout.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "virtiod did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(o) = self.child.stdout.as_mut() {
            o.read_to_string(&mut out).unwrap();
        }
        (status, out)
    }
}

impl Drop for RunDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vhost-user device table for a devices file.
pub fn vhost_user_device(name: &str, image: &str, socket: &Path) -> String {
    format!(
        "[[device]]\nname = \"{name}\"\nimage = \"{image}\"\nvhost-user = \"{}\"\n\n",
        socket.display()
    )
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://127.0.0.1:PORT/PATH: (status line, body).
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Wait until the metrics endpoint answers.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of one series (`name{labels}`) in an exposition text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `virtiod ctl --control PATH ARGS...`: (exit code, stdout, stderr).
pub fn ctl(control: &Path, args: &[&str]) -> (i32, String, String) {
    let out = virtiod()
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run virtiod ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
