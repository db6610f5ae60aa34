//! qcow2 images made by `qemu-img`, served by the real daemon over vhost-user and driven by
//! libblkio; checked afterwards by `qemu-img check` and `qemu-img compare`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const DEPTH: usize = 8;
const CHUNK: usize = 64 * 1024;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) must be installed")
}

fn qemu_img_ok(args: &[&str]) {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Write `data` at `offset` in chunks, `DEPTH` in flight on queue `q`.
fn write_all(client: &mut Client, q: usize, offset: u64, data: &[u8]) {
    let chunks: Vec<_> = data.chunks(CHUNK).enumerate().collect();
    let mut next = 0;
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut in_flight = 0;
    while next < chunks.len() || in_flight > 0 {
        while in_flight < DEPTH && next < chunks.len() {
            let slot = free.pop().unwrap();
            let (i, chunk) = chunks[next];
            client.buf()[slot * CHUNK..slot * CHUNK + chunk.len()].copy_from_slice(chunk);
            let p = client.buf_ptr(slot * CHUNK);
            let at = offset + (i * CHUNK) as u64;
            client.queues[q].write(at, p, chunk.len(), slot, ReqFlags::empty());
            next += 1;
            in_flight += 1;
        }
        for (slot, ret) in client.wait(q, 1) {
            assert_eq!(ret, 0, "write failed");
            free.push(slot);
            in_flight -= 1;
        }
    }
}

/// Read `len` bytes at `offset` through queue `q`.
fn read_all(client: &mut Client, q: usize, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        assert_eq!(client.read(q, offset + at as u64, 0, n), 0, "read failed");
        out.extend_from_slice(&client.buf()[..n]);
        at += n;
    }
    out
}

fn pattern(len: usize, base: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, base, seed);
    v
}

/// Patterned writes on two queues (unaligned to clusters, across clusters, over the backing
/// file's data), read back through both queues; SIGTERM; then qemu-img check accepts the
/// image and qemu-img compare finds it equal to the raw copy of what was written.
fn round_trip(dir: &Scratch, image: &Path, mut want: Vec<u8>) {
    let sock = dir.path("vu.sock");
    let spec = format!("qcow2:{}", s(image));
    let daemon = Daemon::start(&sock, &spec, &["--queues", "2"]);
    let mut client = Client::connect(&sock, 2, DEPTH * CHUNK).unwrap();
    assert_eq!(client.capacity(), SIZE);
    assert_eq!(
        read_all(&mut client, 1, 0, SIZE as usize),
        want,
        "before writes"
    );
    for (q, offset, len, seed) in [
        (0, 512u64, 3 * 512, 1u64),
        (1, 60 * 1024, 8 * 1024, 2),
        (0, 4 * MIB + 4096, 3 * MIB as usize, 3),
        (1, 20 * MIB, 5 * MIB as usize, 4),
        (0, SIZE - MIB, MIB as usize, 5),
    ] {
        let data = pattern(len, offset, seed);
        write_all(&mut client, q, offset, &data);
        want[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    assert_eq!(client.flush(0), 0);
    for q in 0..2 {
        let got = read_all(&mut client, q, 0, SIZE as usize);
        assert!(got == want, "read back through queue {q} differs");
    }
    drop(client);
    assert!(daemon.terminate().success());
    qemu_img_ok(&["check", s(image)]);
    let expect = dir.path("expect.raw");
    std::fs::write(&expect, &want).unwrap();
    qemu_img_ok(&["compare", "-f", "qcow2", "-F", "raw", s(image), s(&expect)]);
}

#[test]
fn fresh_image_round_trip() {
    let dir = Scratch::new("q2-fresh");
    let img = dir.path("disk.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", s(&img), "64M"]);
    round_trip(&dir, &img, vec![0; SIZE as usize]);
}

#[test]
fn overlay_on_raw_backing_round_trip() {
    let dir = Scratch::new("q2-overlay");
    let base = dir.path("base.raw");
    let data = pattern(SIZE as usize, 0, 77);
    std::fs::write(&base, &data).unwrap();
    let img = dir.path("over.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
    ]);
    round_trip(&dir, &img, data.clone());
    assert!(
        std::fs::read(&base).unwrap() == data,
        "the backing file was written"
    );
}

#[test]
fn compressed_image_round_trip() {
    let dir = Scratch::new("q2-packed");
    let raw = dir.path("src.raw");
    let mut data = pattern(SIZE as usize, 0, 78);
    data[8 * MIB as usize..16 * MIB as usize].fill(0); // some zero clusters too
    std::fs::write(&raw, &data).unwrap();
    let img = dir.path("packed.qcow2");
    qemu_img_ok(&["convert", "-c", "-O", "qcow2", s(&raw), s(&img)]);
    let map = String::from_utf8(qemu_img(&["map", "--output=json", s(&img)]).stdout).unwrap();
    assert!(
        map.contains("\"compressed\": true"),
        "no compressed clusters: {map}"
    );
    round_trip(&dir, &img, data);
}

/// SIGKILL while writes that allocate clusters stream in: qemu-img check accepts the image
/// (leaked clusters allowed) and every write acknowledged before the last FLUSH is there.
#[test]
fn sigkill_under_writes_leaves_a_consistent_image() {
    let dir = Scratch::new("q2-kill");
    let base = dir.path("base.raw");
    let base_data = pattern(SIZE as usize, 0, 90);
    std::fs::write(&base, &base_data).unwrap();
    let img = dir.path("over.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
    ]);
    let sock = dir.path("vu.sock");
    let mut daemon = Daemon::start(&sock, &format!("qcow2:{}", s(&img)), &[]);
    let mut client = Client::connect(&sock, 1, DEPTH * CHUNK).unwrap();
    // Flushed: the first 16 MiB, one 4 KiB write per 64 KiB cluster (each allocates one).
    let mut flushed = base_data.clone();
    for i in 0..256u64 {
        let at = i * CHUNK as u64 + 1024;
        let data = pattern(4096, at, 91);
        client.buf()[..4096].copy_from_slice(&data);
        assert_eq!(client.write(0, at, 0, 4096), 0);
        flushed[at as usize..at as usize + 4096].copy_from_slice(&data);
    }
    assert_eq!(client.flush(0), 0);
    // Then a stream of allocating writes, killed in the middle.
    let stream = pattern(DEPTH * CHUNK, 0, 92);
    client.buf().copy_from_slice(&stream);
    for i in 0..DEPTH {
        let at = 16 * MIB + (i * CHUNK) as u64 + 512;
        let p = client.buf_ptr(i * CHUNK);
        client.queues[0].write(at, p, CHUNK - 512, i, ReqFlags::empty());
    }
    let _ = client.wait(0, 1);
    daemon.signal(libc::SIGKILL);
    let status = daemon.wait_timeout(Duration::from_secs(10));
    assert!(!status.success());
    drop(client);
    let check = qemu_img(&["check", "--output=json", s(&img)]);
    let report = String::from_utf8_lossy(&check.stdout);
    // 0: clean; 3: leaked clusters only. 2 would be corruption.
    assert!(
        matches!(check.status.code(), Some(0) | Some(3)),
        "qemu-img check: {report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!report.contains("\"corruptions\": ") || report.contains("\"corruptions\": 0"));
    let raw = dir.path("after.raw");
    qemu_img_ok(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let after = std::fs::read(&raw).unwrap();
    let flushed_range = 16 * MIB as usize;
    assert!(
        after[..flushed_range] == flushed[..flushed_range],
        "a FLUSHed write is missing after SIGKILL"
    );
}

#[test]
fn missing_qcow2_image_is_one_line() {
    let dir = Scratch::new("q2-missing");
    let out = virtiod()
        .args(["serve", "--vhost-user"])
        .arg(dir.path("vu.sock"))
        .arg(format!("qcow2:{}", s(&dir.path("none.qcow2"))))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<_> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("qemu-img create -f qcow2"), "{stderr}");
    assert!(!dir.path("none.qcow2").exists());
}

/// A raw image whose first bytes are a qcow2 header stays raw (the driver sees the qcow2
/// file's bytes), and the daemon says which spec serves it as qcow2.
#[test]
fn qcow2_file_served_raw_stays_raw_with_a_warning() {
    let dir = Scratch::new("q2-raw");
    let img = dir.path("looks.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=full",
        s(&img),
        "4M",
    ]);
    let file = std::fs::read(&img).unwrap();
    let sock = dir.path("vu.sock");
    let log = dir.path("stderr.log");
    let mut cmd = virtiod();
    cmd.args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg(&img)
        .stderr(std::fs::File::create(&log).unwrap());
    let daemon = Daemon(Served::start(cmd, &sock));
    let mut client = Client::connect(&sock, 1, CHUNK).unwrap();
    assert_eq!(client.capacity(), file.len() as u64);
    assert_eq!(read_all(&mut client, 0, 0, CHUNK), file[..CHUNK]);
    drop(client);
    assert!(daemon.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("starts like a qcow2 image but is served raw")
            && text.contains(&format!("qcow2:{}", s(&img))),
        "{text}"
    );
}

/// `virtiod doctor --image`: the format each spec names, and a warning for a qcow2 file
/// given as a raw image.
#[test]
fn doctor_checks_image_formats() {
    let dir = Scratch::new("q2-doctor");
    let img = dir.path("d.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=full",
        s(&img),
        "1M",
    ]);
    let raw = dir.image("d.raw", MIB);
    let out = virtiod()
        .args(["doctor", "--state-dir"])
        .arg(&dir.0)
        .arg("--image")
        .arg(format!("qcow2:{}", s(&img)))
        .arg("--image")
        .arg(&img)
        .arg("--image")
        .arg(&raw)
        .arg("--image")
        .arg(format!("qcow2:{}", s(&raw)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.contains(&format!("image {prefix}:")))
            .unwrap_or_else(|| panic!("no line for {prefix}: {text}"))
            .to_string()
    };
    assert!(
        line(&format!("qcow2:{}", s(&img))).starts_with("OK"),
        "{text}"
    );
    let warned = line(s(&img));
    assert!(
        warned.starts_with("WARN") && warned.contains(&format!("write qcow2:{}", s(&img))),
        "{text}"
    );
    assert!(line(s(&raw)).starts_with("OK"), "{text}");
    let refused = line(&format!("qcow2:{}", s(&raw)));
    assert!(
        refused.starts_with("FAIL") && refused.contains("not a qcow2 image"),
        "{text}"
    );
}
