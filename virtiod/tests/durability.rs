//! Durability of acknowledged writes, with the real daemon over vhost-user and libblkio.
//!
//! What a test here can see: the image file after the daemon is gone (SIGKILL or SIGTERM),
//! and, through cachestat(2), whether the kernel still holds dirty or under-writeback page
//! cache for the written range. A power cut cannot be simulated on this host, so "durable"
//! is checked as far as the kernel shows it: after a FLUSH (fdatasync) completes no written
//! page is dirty or under writeback any more. With O_DIRECT the data never sits in the page
//! cache, so there the check only proves the data reached the file.
//!
//! The rules (docs/reliability.md):
//! - a write is acknowledged only after the backend completed it, so a crash of the daemon
//!   (SIGKILL) never loses an acknowledged write, FLUSH or not;
//! - a FLUSH completes only after every write acknowledged before it was submitted is on
//!   stable storage (fdatasync);
//! - SIGTERM completes what is in flight and flushes before the daemon exits.

mod common;

use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::*;

const MIB: u64 = 1 << 20;
const CHUNK: usize = 128 * 1024;
const DEPTH: usize = 8;

/// Page-cache state of a file range, from cachestat(2) (Linux >= 6.5).
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct CacheStat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// cachestat(2) is 451 on every architecture that has it.
const SYS_CACHESTAT: libc::c_long = 451;

/// The page-cache state of `len` bytes of `path` from `offset`, or `None` on a kernel
/// without cachestat(2) (reported through [`skip_or_fail`]: a failure under
/// `VIRTIOD_NO_SKIP=1`).
fn cachestat(path: &Path, offset: u64, len: u64) -> Option<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    let file = std::fs::File::open(path).unwrap();
    let range = Range { off: offset, len };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat` into `stat`; both
    // live on this stack frame with the kernel's layout (five u64 / two u64).
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOSYS),
            "cachestat failed: {err}"
        );
        skip_or_fail("cachestat(2) not available (Linux < 6.5): page-cache checks");
        return None;
    }
    Some(stat)
}

/// Write `total` bytes of pattern `seed` from `base`, `DEPTH` requests of `CHUNK` bytes in
/// flight on queue `q`, and wait until every one is acknowledged.
fn write_pattern(client: &mut Client, q: usize, base: u64, total: u64, seed: u64) {
    let mut next = 0u64;
    let mut in_flight = 0usize;
    let mut free: Vec<usize> = (0..DEPTH).collect();
    while next < total || in_flight > 0 {
        while in_flight < DEPTH && next < total {
            let slot = free.pop().unwrap();
            let off = base + next;
            let buf_off = slot * CHUNK;
            fill_pattern(&mut client.buf()[buf_off..buf_off + CHUNK], off, seed);
            let p = client.buf_ptr(buf_off);
            client.queues[q].write(off, p, CHUNK, slot, ReqFlags::empty());
            in_flight += 1;
            next += CHUNK as u64;
        }
        for (slot, ret) in client.wait(q, 1) {
            assert_eq!(ret, 0, "write failed: {ret}");
            free.push(slot);
            in_flight -= 1;
        }
    }
}

/// SIGKILL the daemon and wait until it is gone.
fn kill(mut daemon: Daemon) -> ExitStatus {
    daemon.signal(libc::SIGKILL);
    let status = daemon.wait_timeout(Duration::from_secs(10));
    assert!(!status.success(), "SIGKILL cannot exit cleanly: {status}");
    status
}

fn image_holds(img: &Path, base: u64, total: u64, seed: u64) {
    let file = std::fs::read(img).unwrap();
    check_pattern(&file[base as usize..(base + total) as usize], base, seed)
        .unwrap_or_else(|e| panic!("{}: {e}", img.display()));
}

/// Writes acknowledged, FLUSH acknowledged, SIGKILL at once: the image holds every byte and
/// (cachestat) nothing of the range is left dirty or under writeback in the page cache.
fn flush_then_sigkill(name: &str, extra: &[&str]) {
    let dir = Scratch::new(name);
    let img = dir.image("disk.img", 16 * MIB);
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(&sock, img.to_str().unwrap(), extra);
    let mut client = Client::connect(&sock, 1, DEPTH * CHUNK).unwrap();
    let (base, total) = (MIB, 8 * MIB);
    write_pattern(&mut client, 0, base, total, 21);
    let before = cachestat(&img, base, total);
    if let Some(before) = before {
        eprintln!("{name}: before FLUSH {before:?}");
    }
    assert_eq!(client.flush(0), 0, "FLUSH failed");
    // The moment the FLUSH completes: no chance for a clean shutdown to flush anything.
    kill(daemon);
    if let Some(after) = cachestat(&img, base, total) {
        eprintln!("{name}: after FLUSH + SIGKILL {after:?}");
        assert_eq!(
            (after.nr_dirty, after.nr_writeback),
            (0, 0),
            "FLUSH completed while written pages were not yet on stable storage"
        );
    }
    image_holds(&img, base, total, 21);
    drop(client);
}

#[test]
fn flush_then_sigkill_keeps_the_data_direct() {
    flush_then_sigkill("dur-direct", &[]);
}

#[test]
fn flush_then_sigkill_keeps_the_data_buffered() {
    flush_then_sigkill("dur-buffered", &["--buffered"]);
}

/// The page cache test is only meaningful if the written range was dirty before the FLUSH:
/// with `--buffered` it is (the kernel writes back after ~30 s), so the FLUSH is what cleans
/// it. Checked on its own so a slow machine's early writeback shows up as a clear message.
#[test]
fn buffered_writes_stay_dirty_until_flush() {
    let dir = Scratch::new("dur-dirty");
    let img = dir.image("disk.img", 8 * MIB);
    let sock = dir.path("vu.sock");
    let _daemon = Daemon::start(&sock, img.to_str().unwrap(), &["--buffered"]);
    let mut client = Client::connect(&sock, 1, DEPTH * CHUNK).unwrap();
    write_pattern(&mut client, 0, 0, 4 * MIB, 5);
    let Some(before) = cachestat(&img, 0, 4 * MIB) else {
        return;
    };
    assert!(
        before.nr_dirty + before.nr_writeback > 0,
        "acknowledged buffered writes are already clean before any FLUSH ({before:?}): \
         the kernel wrote them back early, the FLUSH checks prove less on this machine"
    );
    assert_eq!(client.flush(0), 0);
    let after = cachestat(&img, 0, 4 * MIB).unwrap();
    assert_eq!((after.nr_dirty, after.nr_writeback), (0, 0), "{after:?}");
}

/// FLUSH covers writes completed on *any* queue: fdatasync is per file, and a FLUSH on
/// queue 1 after writes acknowledged on queue 0 must leave none of them dirty.
#[test]
fn flush_on_one_queue_covers_writes_completed_on_another() {
    let dir = Scratch::new("dur-mq");
    let img = dir.image("disk.img", 8 * MIB);
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(
        &sock,
        img.to_str().unwrap(),
        &["--buffered", "--queues", "2"],
    );
    let mut client = Client::connect(&sock, 2, DEPTH * CHUNK).unwrap();
    write_pattern(&mut client, 0, 0, 4 * MIB, 9);
    assert_eq!(client.flush(1), 0);
    kill(daemon);
    if let Some(after) = cachestat(&img, 0, 4 * MIB) {
        assert_eq!((after.nr_dirty, after.nr_writeback), (0, 0), "{after:?}");
    }
    image_holds(&img, 0, 4 * MIB, 9);
}

/// Without any FLUSH, an acknowledged write survives a crash of the daemon (not of the
/// host): it completed in the kernel before the driver saw it.
#[test]
fn acknowledged_writes_survive_sigkill_without_flush() {
    for (name, extra) in [
        ("dur-kill-direct", &[][..]),
        ("dur-kill-buf", &["--buffered"]),
    ] {
        let dir = Scratch::new(name);
        let img = dir.image("disk.img", 8 * MIB);
        let sock = dir.path("vu.sock");
        let daemon = Daemon::start(&sock, img.to_str().unwrap(), extra);
        let mut client = Client::connect(&sock, 1, DEPTH * CHUNK).unwrap();
        write_pattern(&mut client, 0, 0, 4 * MIB, 13);
        kill(daemon);
        image_holds(&img, 0, 4 * MIB, 13);
    }
}

/// Acknowledged writes, no FLUSH, SIGTERM: the daemon's own final flush makes them durable
/// (nothing left dirty with `--buffered`), and it exits 0.
#[test]
fn sigterm_flushes_acknowledged_writes() {
    for (name, extra) in [
        ("dur-term-direct", &[][..]),
        ("dur-term-buf", &["--buffered"]),
    ] {
        let dir = Scratch::new(name);
        let img = dir.image("disk.img", 8 * MIB);
        let sock = dir.path("vu.sock");
        let daemon = Daemon::start(&sock, img.to_str().unwrap(), extra);
        let mut client = Client::connect(&sock, 1, DEPTH * CHUNK).unwrap();
        write_pattern(&mut client, 0, 0, 4 * MIB, 17);
        let status = daemon.terminate();
        assert!(status.success(), "{name}: exit status {status}");
        if let Some(after) = cachestat(&img, 0, 4 * MIB) {
            assert_eq!(
                (after.nr_dirty, after.nr_writeback),
                (0, 0),
                "{name}: SIGTERM exited before its final flush finished: {after:?}"
            );
        }
        image_holds(&img, 0, 4 * MIB, 17);
    }
}

/// SIGTERM while writes are in flight: whatever the driver sees acknowledged with success
/// is in the image afterwards (the daemon completes what it started before exiting; requests
/// it never took off the ring are simply not acknowledged).
#[test]
fn sigterm_with_writes_in_flight_keeps_what_was_acknowledged() {
    const N: usize = 32;
    const LEN: usize = 256 * 1024;
    let dir = Scratch::new("dur-term-inflight");
    let img = dir.image("disk.img", 16 * MIB);
    let sock = dir.path("vu.sock");
    let mut daemon = Daemon::start(&sock, img.to_str().unwrap(), &["--buffered"]);
    let mut client = Client::connect(&sock, 1, N * LEN).unwrap();
    for i in 0..N {
        let off = (i * LEN) as u64;
        fill_pattern(&mut client.buf()[i * LEN..(i + 1) * LEN], off, 23);
        let p = client.buf_ptr(i * LEN);
        client.queues[0].write(off, p, LEN, i, ReqFlags::empty());
    }
    // Submit (do_io with nothing to wait for), then stop the daemon at once.
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..N).map(|_| MaybeUninit::uninit()).collect();
    let mut acked = Vec::new();
    let mut poll = |client: &mut Client, acked: &mut Vec<(usize, i32)>| {
        let mut no_wait = Duration::ZERO;
        let got = client.queues[0]
            .do_io(&mut completions, 0, Some(&mut no_wait), None)
            .unwrap_or(0);
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            acked.push((c.user_data, c.ret));
        }
    };
    poll(&mut client, &mut acked);
    daemon.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        poll(&mut client, &mut acked);
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "virtiod did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Completions the daemon put in the used ring before exiting.
    poll(&mut client, &mut acked);
    assert!(status.success(), "exit status {status}");
    eprintln!("{} of {N} writes acknowledged around SIGTERM", acked.len());
    let file = std::fs::read(&img).unwrap();
    for &(i, ret) in &acked {
        assert_eq!(ret, 0, "write {i} failed");
        let off = i * LEN;
        check_pattern(&file[off..off + LEN], off as u64, 23)
            .unwrap_or_else(|e| panic!("acknowledged write {i}: {e}"));
    }
    if let Some(after) = cachestat(&img, 0, (N * LEN) as u64) {
        assert_eq!((after.nr_dirty, after.nr_writeback), (0, 0), "{after:?}");
    }
}
