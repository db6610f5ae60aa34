//! `--metrics ADDR`: the Prometheus endpoint counts exactly what a libblkio client did.

mod common;
mod ops_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use ops_common::*;

const N_WRITES: usize = 37;
const M_READS: usize = 23;
const LEN: usize = 8192;

#[test]
fn serve_metrics_count_every_request_and_byte() {
    let dir = Scratch::new("metrics");
    let sock = dir.path("vu.sock");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(&sock, "mem:16M", &["--metrics", &addr, "--queues", "2"]);
    wait_for_port(port);

    let (status, before) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        sample(&before, r#"virtiod_device_up{device="vu"}"#),
        Some(1.0),
        "{before}"
    );
    assert_eq!(sample(&before, r#"virtiod_queues{device="vu"}"#), Some(2.0));

    let mut client = Client::connect(&sock, 2, LEN).unwrap();
    for i in 0..N_WRITES {
        assert_eq!(client.write(i % 2, (i * LEN) as u64, 0, LEN), 0);
    }
    for i in 0..M_READS {
        assert_eq!(client.read(i % 2, (i * LEN) as u64, 0, LEN), 0);
    }
    let (_, text) = http_get(port, "/metrics");
    let get =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    let dev = r#"device="vu""#;
    assert_eq!(
        get(&format!(r#"virtiod_requests_total{{{dev},op="write"}}"#)),
        N_WRITES as f64
    );
    assert_eq!(
        get(&format!(r#"virtiod_requests_total{{{dev},op="read"}}"#)),
        M_READS as f64
    );
    assert_eq!(
        get(&format!(r#"virtiod_bytes_total{{{dev},op="write"}}"#)),
        (N_WRITES * LEN) as f64
    );
    assert_eq!(
        get(&format!(r#"virtiod_bytes_total{{{dev},op="read"}}"#)),
        (M_READS * LEN) as f64
    );
    assert_eq!(get(&format!(r#"virtiod_errors_total{{{dev}}}"#)), 0.0);
    assert_eq!(get(&format!(r#"virtiod_in_flight{{{dev}}}"#)), 0.0);
    // Every read and write went through the backend: the histogram saw each once.
    let backend_ops = ["read", "write", "flush", "discard", "write_zeroes"]
        .iter()
        .map(|op| get(&format!(r#"virtiod_requests_total{{{dev},op="{op}"}}"#)))
        .sum::<f64>();
    let count = get(&format!(
        r#"virtiod_request_latency_seconds_count{{{dev}}}"#
    ));
    assert_eq!(count, backend_ops, "{text}");
    assert!(count >= (N_WRITES + M_READS) as f64);
    assert_eq!(
        get(&format!(
            r#"virtiod_request_latency_seconds_bucket{{{dev},le="+Inf"}}"#
        )),
        count
    );
    assert!(get(&format!(r#"virtiod_request_latency_seconds_sum{{{dev}}}"#)) > 0.0);

    let (status, _) = http_get(port, "/nope");
    assert!(status.contains("404"), "{status}");
    drop(client);
    assert!(daemon.terminate().success());
}

#[test]
fn metrics_address_in_use_is_refused_before_serving() {
    let dir = Scratch::new("metrics-busy");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let sock = dir.path("vu.sock");
    let out = virtiod()
        .args(["serve", "--vhost-user"])
        .arg(&sock)
        .args(["--metrics", &addr, "mem:1M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--metrics"), "{stderr}");
    assert!(!sock.exists(), "nothing served");
}

#[test]
fn idle_and_slow_connections_do_not_delay_a_scrape() {
    let dir = Scratch::new("metrics-idle");
    let sock = dir.path("vu.sock");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(&sock, "mem:1M", &["--metrics", &addr]);
    wait_for_port(port);

    // Ten connections that say nothing and one that stops half way through its request.
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"GET /metr").unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let started = Instant::now();
    let (status, body) = http_get(port, "/metrics");
    let took = started.elapsed();
    eprintln!("scrape with 11 idle or slow connections open: {took:?}");
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains(r#"virtiod_device_up{device="vu"} 1"#),
        "{body}"
    );
    assert!(took < Duration::from_millis(100), "scrape took {took:?}");

    // A request head without end past 8 KiB: 431 and closed.
    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = big.write_all(format!("GET /metrics HTTP/1.1\r\nX: {}", "y".repeat(16384)).as_bytes());
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    drop((idle, slow));
    assert!(daemon.terminate().success());
}
