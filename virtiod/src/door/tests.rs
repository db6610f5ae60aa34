//! The door loop against an echo protocol, and the framing functions.

use super::*;
use std::io::BufRead;

#[test]
fn a_line_is_complete_at_its_newline_and_too_long_past_the_limit() {
    assert_eq!(frame_line(b"", 4), Framing::Incomplete);
    assert_eq!(frame_line(b"abcd", 4), Framing::Incomplete);
    assert_eq!(frame_line(b"abcd\nxy", 4), Framing::Complete(5));
    assert_eq!(frame_line(b"\n", 4), Framing::Complete(1));
    // Over the limit with or without its newline.
    assert_eq!(frame_line(b"abcde", 4), Framing::TooLong);
    assert_eq!(frame_line(b"abcde\n", 4), Framing::TooLong);
}

#[test]
fn an_http_head_ends_at_the_empty_line() {
    let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(frame_http_head(get, 8192), Framing::Complete(get.len()));
    assert_eq!(
        frame_http_head(b"GET / HTTP/1.0\n\nrest", 8192),
        Framing::Complete(16)
    );
    assert_eq!(frame_http_head(&get[..20], 8192), Framing::Incomplete);
    assert_eq!(frame_http_head(&[b'a'; 65], 64), Framing::TooLong);
    assert_eq!(frame_http_head(get, 8), Framing::TooLong);
}

/// Echoes each line; "close" closes after its answer, "panic" panics.
struct Echo;

impl Protocol for Echo {
    fn frame(&self, buf: &[u8], max: usize) -> Framing {
        frame_line(buf, max)
    }
    fn handle(&self, request: &[u8]) -> Reply {
        if request == b"panic\n" {
            panic!("handler panic");
        }
        Reply {
            bytes: request.to_vec(),
            close: request == b"close\n",
        }
    }
    fn notice(&self, notice: Notice, _: &Limits) -> Vec<u8> {
        format!("{notice:?}\n").into_bytes()
    }
}

fn echo_door(dir: &tempfile::TempDir, limits: Limits) -> std::path::PathBuf {
    let path = dir.path().join("door.sock");
    spawn(
        "test-door",
        UnixListener::bind(&path).unwrap(),
        Echo,
        limits,
    )
    .unwrap();
    path
}

const LIMITS: Limits = Limits {
    max_request: 16,
    max_clients: 2,
    idle_timeout: Duration::from_secs(30),
    workers: 1,
};

fn line(stream: &UnixStream) -> String {
    let mut text = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut text)
        .unwrap();
    text
}

/// The daemon closed `stream` (end of file or a reset), within 5 s.
fn closed(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn requests_are_answered_in_order_and_a_too_long_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = echo_door(&dir, LIMITS);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"one\ntwo\n").unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut text = String::new();
    r.read_line(&mut text).unwrap();
    r.read_line(&mut text).unwrap();
    assert_eq!(text, "one\ntwo\n");
    s.write_all(&[b'x'; 17]).unwrap();
    assert_eq!(line(&s), "TooLong\n");
    assert!(closed(&mut s));
    // A panicking handler closes its connection only.
    let mut p = UnixStream::connect(&path).unwrap();
    p.write_all(b"panic\n").unwrap();
    assert!(closed(&mut p));
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"close\n").unwrap();
    assert_eq!(line(&s), "close\n");
    assert!(closed(&mut s));
}

#[test]
fn a_quiet_connection_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        idle_timeout: Duration::from_millis(200),
        ..LIMITS
    };
    let path = echo_door(&dir, limits);
    let mut s = UnixStream::connect(&path).unwrap();
    // Half a request is not a request.
    s.write_all(b"hal").unwrap();
    let started = Instant::now();
    assert_eq!(line(&s), "TimedOut\n");
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(closed(&mut s));
}

#[test]
fn a_new_client_closes_the_quietest_when_all_slots_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let path = echo_door(&dir, LIMITS);
    let mut first = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let second = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // The first speaks last, so the second is the quietest.
    first.write_all(b"hi\n").unwrap();
    assert_eq!(line(&first), "hi\n");
    let mut third = UnixStream::connect(&path).unwrap();
    let mut second = second;
    assert_eq!(line(&second), "Evicted\n");
    assert!(closed(&mut second));
    third.write_all(b"yo\n").unwrap();
    assert_eq!(line(&third), "yo\n");
    first.write_all(b"again\n").unwrap();
    assert_eq!(line(&first), "again\n");
}
