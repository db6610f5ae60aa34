//! The real `virtiod` binary served over vhost-user, driven by libblkio.

mod common;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

/// A patterned stream of requests on one queue.
struct Job {
    q: usize,
    base: u64,
    total: u64,
    chunk: usize,
    depth: usize,
    seed: u64,
    write: bool,
}

/// Write (or read and verify) `total` bytes of pattern at queue depth `depth` with
/// `chunk`-sized requests on queue `q`.
fn stream(client: &mut Client, job: Job) {
    let Job {
        q,
        base,
        total,
        chunk,
        depth,
        seed,
        write,
    } = job;
    assert!(chunk * depth <= client.region.len);
    let mut next = 0u64;
    let mut in_flight = 0usize;
    let mut slot_of = std::collections::HashMap::new();
    let mut free: Vec<usize> = (0..depth).collect();
    let mut done = 0u64;
    while done < total {
        while in_flight < depth && next < total {
            let slot = free.pop().unwrap();
            let off = base + next;
            let buf_off = slot * chunk;
            if write {
                let b = &mut client.buf()[buf_off..buf_off + chunk];
                fill_pattern(b, off, seed);
                let p = client.buf_ptr(buf_off);
                client.queues[q].write(off, p, chunk, off as usize, ReqFlags::empty());
            } else {
                let p = client.buf_ptr(buf_off);
                client.queues[q].read(off, p, chunk, off as usize, ReqFlags::empty());
            }
            slot_of.insert(off as usize, slot);
            in_flight += 1;
            next += chunk as u64;
        }
        for (user_data, ret) in client.wait(q, 1) {
            assert_eq!(ret, 0, "request at {user_data} failed: {ret}");
            let slot = slot_of.remove(&user_data).unwrap();
            if !write {
                let buf_off = slot * chunk;
                let b = &client.buf()[buf_off..buf_off + chunk];
                check_pattern(b, user_data as u64, seed).unwrap();
            }
            free.push(slot);
            in_flight -= 1;
            done += chunk as u64;
        }
    }
}

#[test]
fn write_64mib_read_back_and_sigterm_keeps_every_byte() {
    let dir = Scratch::new("stream");
    let img = dir.image("disk.img", 64 * MIB);
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(&sock, img.to_str().unwrap(), &[]);
    let mut client = Client::connect(&sock, 1, 16 * 128 * 1024).unwrap();
    assert_eq!(client.capacity(), 64 * MIB);
    stream(
        &mut client,
        Job {
            q: 0,
            base: 0,
            total: 64 * MIB,
            chunk: 128 * 1024,
            depth: 16,
            seed: 7,
            write: true,
        },
    );
    stream(
        &mut client,
        Job {
            q: 0,
            base: 0,
            total: 64 * MIB,
            chunk: 128 * 1024,
            depth: 16,
            seed: 7,
            write: false,
        },
    );
    // No FLUSH: SIGTERM itself must complete and flush whatever was acknowledged.
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "socket removed on SIGTERM");
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(on_disk.len() as u64, 64 * MIB);
    check_pattern(&on_disk, 0, 7).unwrap();
    drop(client);
}

#[test]
fn flush_discard_and_write_zeroes_reach_the_image() {
    let dir = Scratch::new("ops");
    let img = dir.image("disk.img", 8 * MIB);
    let sock = dir.path("vu.sock");
    let _daemon = Daemon::start(&sock, img.to_str().unwrap(), &[]);
    let mut client = Client::connect(&sock, 1, 4 * MIB as usize).unwrap();
    fill_pattern(&mut client.buf()[..4 * MIB as usize], MIB, 3);
    assert_eq!(client.write(0, MIB, 0, 4 * MIB as usize), 0);
    assert_eq!(client.flush(0), 0);
    let file = std::fs::read(&img).unwrap();
    check_pattern(&file[MIB as usize..5 * MIB as usize], MIB, 3).unwrap();
    // DISCARD 1 MiB at 1 MiB: reads back as zeroes in a raw file (hole punched).
    assert_eq!(
        client.sync(0, |q| q.discard(MIB, MIB, 0, ReqFlags::empty())),
        0
    );
    // WRITE_ZEROES 512 KiB at 3 MiB (no unmap), and 512 KiB at 4 MiB with unmap allowed.
    assert_eq!(
        client.sync(0, |q| q.write_zeroes(
            3 * MIB,
            MIB / 2,
            0,
            ReqFlags::NO_UNMAP
        )),
        0
    );
    assert_eq!(
        client.sync(0, |q| q.write_zeroes(
            4 * MIB,
            MIB / 2,
            0,
            ReqFlags::empty()
        )),
        0
    );
    assert_eq!(client.flush(0), 0);
    let file = std::fs::read(&img).unwrap();
    let zero = |r: std::ops::Range<u64>| {
        file[r.start as usize..r.end as usize]
            .iter()
            .all(|&b| b == 0)
    };
    assert!(zero(MIB..2 * MIB), "discarded range reads as zeroes");
    check_pattern(&file[2 * MIB as usize..3 * MIB as usize], 2 * MIB, 3).unwrap();
    assert!(zero(3 * MIB..3 * MIB + MIB / 2));
    check_pattern(
        &file[(3 * MIB + MIB / 2) as usize..4 * MIB as usize],
        3 * MIB + MIB / 2,
        3,
    )
    .unwrap();
    assert!(zero(4 * MIB..4 * MIB + MIB / 2));
    check_pattern(
        &file[(4 * MIB + MIB / 2) as usize..5 * MIB as usize],
        4 * MIB + MIB / 2,
        3,
    )
    .unwrap();
    // Through the device too.
    assert_eq!(client.read(0, MIB, 0, MIB as usize), 0);
    assert!(client.buf()[..MIB as usize].iter().all(|&b| b == 0));
    // Past the end: an error, not a crash; the next request still works.
    assert_ne!(client.read(0, 8 * MIB, 0, 4096), 0);
    assert_eq!(client.read(0, 0, 0, 4096), 0);
}

#[test]
fn read_only_device_refuses_writes() {
    let dir = Scratch::new("ro");
    let img = dir.image("disk.img", 4 * MIB);
    std::fs::write(&img, vec![0x5au8; 4 * MIB as usize]).unwrap();
    let sock = dir.path("vu.sock");
    let _daemon = Daemon::start(&sock, img.to_str().unwrap(), &["--read-only"]);
    let e = Client::connect(&sock, 1, MIB as usize)
        .err()
        .expect("a read-write start must fail");
    assert_eq!(
        e.errno().raw_os_error(),
        libc::EROFS,
        "driver sees VIRTIO_BLK_F_RO: {e:?}"
    );
    let mut client = Client::connect_with(&sock, 1, MIB as usize, true).unwrap();
    client.buf()[..4096].fill(0xff);
    // The device itself refuses writes too (IOERR): covered by the engine's unit tests and the
    // hostile-driver suite, since a well-behaved driver never sends them.
    assert_ne!(client.write(0, 0, 0, 4096), 0, "write must fail");
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    assert!(client.buf()[..4096].iter().all(|&b| b == 0x5a));
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0x5a),
        "image unchanged"
    );
}

#[test]
fn multiqueue_serves_each_queue() {
    let dir = Scratch::new("mq");
    let img = dir.image("disk.img", 16 * MIB);
    let sock = dir.path("vu.sock");
    let _daemon = Daemon::start(&sock, img.to_str().unwrap(), &["--queues", "4"]);
    const CHUNK: usize = 64 * 1024;
    const DEPTH: usize = 8;
    let mut client = Client::connect(&sock, 4, 4 * DEPTH * CHUNK).unwrap();
    assert_eq!(client.blkio.get_i32("num-queues").unwrap(), 4);
    // Each queue writes its own 4 MiB quarter; in every round all four queues have DEPTH
    // requests in flight at once before any completion is collected.
    for write in [true, false] {
        for round in 0..(4 * MIB as usize / (DEPTH * CHUNK)) {
            for q in 0..4 {
                // Read back through a different queue than the one that wrote.
                let quarter = if write { q } else { (q + 1) % 4 };
                for i in 0..DEPTH {
                    let off = (quarter as u64 * 4 * MIB) + ((round * DEPTH + i) * CHUNK) as u64;
                    let buf_off = (q * DEPTH + i) * CHUNK;
                    let p = client.buf_ptr(buf_off);
                    if write {
                        fill_pattern(&mut client.buf()[buf_off..buf_off + CHUNK], off, 11);
                        client.queues[q].write(off, p, CHUNK, buf_off, ReqFlags::empty());
                    } else {
                        client.queues[q].read(off, p, CHUNK, buf_off, ReqFlags::empty());
                    }
                }
            }
            for q in 0..4 {
                for (buf_off, ret) in client.wait(q, DEPTH) {
                    assert_eq!(ret, 0);
                    if !write {
                        let quarter = (q + 1) % 4;
                        let i = buf_off / CHUNK - q * DEPTH;
                        let off = (quarter as u64 * 4 * MIB) + ((round * DEPTH + i) * CHUNK) as u64;
                        check_pattern(&client.buf()[buf_off..buf_off + CHUNK], off, 11).unwrap();
                    }
                }
            }
        }
    }
    let file = std::fs::read(&img).unwrap();
    check_pattern(&file, 0, 11).unwrap();
}

#[test]
fn second_client_after_first_disconnects() {
    let dir = Scratch::new("reconnect");
    let img = dir.image("disk.img", 4 * MIB);
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(&sock, img.to_str().unwrap(), &[]);
    {
        let mut first = Client::connect(&sock, 1, MIB as usize).unwrap();
        fill_pattern(&mut first.buf()[..MIB as usize], 0, 5);
        assert_eq!(first.write(0, 0, 0, MIB as usize), 0);
    }
    for round in 0..2 {
        let mut next = Client::connect(&sock, 1, MIB as usize)
            .unwrap_or_else(|e| panic!("client {round}: {e:?}"));
        assert_eq!(next.read(0, 0, 0, MIB as usize), 0);
        check_pattern(&next.buf()[..MIB as usize], 0, 5).unwrap();
    }
    assert!(daemon.terminate().success());
}

#[test]
fn busy_polling_server_serves_every_request() {
    let dir = Scratch::new("poll");
    let img = dir.image("disk.img", 16 * MIB);
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(
        &sock,
        img.to_str().unwrap(),
        &["--poll-us", "200", "--queues", "2"],
    );
    let mut client = Client::connect(&sock, 2, 8 * 64 * 1024).unwrap();
    // Queue 0 writes the first half, queue 1 the second; then each reads the other's half.
    for (q, base, write) in [
        (0, 0, true),
        (1, 8 * MIB, true),
        (1, 0, false),
        (0, 8 * MIB, false),
    ] {
        let job = Job {
            q,
            base,
            total: 8 * MIB,
            chunk: 64 * 1024,
            depth: 8,
            seed: 21,
            write,
        };
        stream(&mut client, job);
    }
    // Idle long enough for the poll period to end, then one more request must still be
    // served (notifications were turned back on).
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    check_pattern(&client.buf()[..4096], 0, 21).unwrap();
    assert!(daemon.terminate().success());
    check_pattern(&std::fs::read(&img).unwrap(), 0, 21).unwrap();
}
