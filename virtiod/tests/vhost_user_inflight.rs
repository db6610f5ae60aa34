//! vhost-user in-flight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) against the real
//! binary: the daemon records every request it takes in the region the frontend keeps, and a
//! daemon started after a SIGKILL executes exactly the requests its predecessor left in
//! flight — not the ones it had completed, not the ones it never took.
//!
//! The frontend is the hand-written one of the hostile-driver suite (`virtiod-testkit`),
//! reconnecting the way QEMU does with `reconnect-ms` on its chardev.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::frontend::*;
use common::{Daemon, Scratch};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const BLOCK: usize = 4096;

/// The in-flight region as the frontend sees it (the split-ring layout).
struct Region(MmapRegion<()>);

impl Region {
    fn of(d: &Driver) -> Self {
        let (msg, file) = d.inflight.as_ref().expect("in-flight region negotiated");
        let file = file.try_clone().unwrap();
        let len = msg.mmap_size as usize;
        assert!(len >= 16 + 16 * usize::from(QSIZE), "region of {len} bytes");
        Self(MmapRegion::from_file(FileOffset::new(file, msg.mmap_offset), len).unwrap())
    }
    fn u16_at(&self, off: usize) -> u16 {
        self.0.as_volatile_slice().read_obj(off).unwrap()
    }
    fn version(&self) -> u16 {
        self.u16_at(8)
    }
    fn desc_num(&self) -> u16 {
        self.u16_at(10)
    }
    fn used_idx(&self) -> u16 {
        self.u16_at(14)
    }
    fn set_used_idx(&self, v: u16) {
        self.0.as_volatile_slice().write_obj(v, 14).unwrap();
    }
    fn inflight(&self, head: u16) -> u8 {
        self.0
            .as_volatile_slice()
            .load(16 + 16 * usize::from(head), Ordering::Acquire)
            .unwrap()
    }
    fn counter(&self, head: u16) -> u64 {
        self.0
            .as_volatile_slice()
            .read_obj(16 + 16 * usize::from(head) + 8)
            .unwrap()
    }
    /// Record `head` as taken off the ring by a backend (counter = pop order).
    fn mark(&self, head: u16, counter: u64) {
        let s = self.0.as_volatile_slice();
        s.write_obj(counter, 16 + 16 * usize::from(head) + 8)
            .unwrap();
        s.write_obj(1u8, 16 + 16 * usize::from(head)).unwrap();
    }
    fn flagged(&self) -> Vec<u16> {
        (0..QSIZE).filter(|&h| self.inflight(h) != 0).collect()
    }
}

/// Write a 3-descriptor write request at table index `head`: `fill` × 4 KiB to `sector`.
/// Returns the status byte's address.
fn put_write(d: &mut Driver, head: u16, sector: u64, fill: u8) -> u64 {
    let h = d.readable(&header(T_OUT, sector));
    let data = d.readable(&[fill; BLOCK]);
    let status = d.writable(1);
    let mut chain = [h, data, status];
    for (i, desc) in chain.iter_mut().enumerate().take(2) {
        desc.flags |= F_NEXT;
        desc.next = head + i as u16 + 1;
    }
    d.write_table(Q0.desc + 16 * u64::from(head), &chain);
    status.addr
}

fn image_block(image: &std::path::Path, sector: u64) -> Vec<u8> {
    let bytes = std::fs::read(image).unwrap();
    let at = sector as usize * 512;
    bytes[at..at + BLOCK].to_vec()
}

#[test]
fn the_daemon_keeps_the_region_up_to_date() {
    let dir = Scratch::new("inflight-live");
    let sock = dir.path("vu.sock");
    let _daemon = Daemon::start(&sock, "mem:16M", &["--queues", "1"]);
    let mut d = Driver::connect_with(&sock, true);
    let region = Region::of(&d);
    let mut statuses = Vec::new();
    for (i, head) in [0u16, 3, 6].into_iter().enumerate() {
        statuses.push(put_write(&mut d, head, 8 * i as u64, 0x40 + i as u8));
    }
    d.make_available(0, &[0, 3, 6]);
    let mut used = d.wait_used(0, 3);
    used.sort_unstable();
    assert_eq!(used, [(0, 1), (3, 1), (6, 1)]);
    for s in statuses {
        assert_eq!(d.get(s, 1)[0], S_OK);
    }
    assert_eq!(region.version(), 1, "initialised when the ring started");
    assert_eq!(region.desc_num(), QSIZE);
    assert_eq!(region.used_idx(), 3, "follows the used ring");
    assert_eq!(
        region.flagged(),
        Vec::<u16>::new(),
        "nothing left in flight"
    );
    let mut counters: Vec<u64> = [0u16, 3, 6].iter().map(|&h| region.counter(h)).collect();
    counters.sort_unstable();
    assert_eq!(counters, [1, 2, 3], "each pop got the next counter");
}

/// The state a SIGKILL can leave, built by hand so that every case is present at once:
/// a request completed into the used ring but not yet recorded as such, three requests in
/// flight (popped in an order that differs from their ring order), and one request made
/// available that the dead daemon never took.
#[test]
fn a_restarted_daemon_executes_exactly_what_was_in_flight() {
    let dir = Scratch::new("inflight-restart");
    let sock = dir.path("vu.sock");
    let image = dir.image("disk.img", 16 << 20);
    let img = image.to_str().unwrap();
    let mut daemon = Daemon::start(&sock, img, &["--queues", "1"]);
    let mut d = Driver::connect_with(&sock, true);

    // A real write first: sector 0 holds 0xAA.
    let s0 = put_write(&mut d, 0, 0, 0xAA);
    d.make_available(0, &[0]);
    assert_eq!(d.wait_used(0, 1), [(0, 1)]);
    assert_eq!(d.get(s0, 1)[0], S_OK);
    d.verify("first write", &[(s0, 1)]);

    daemon.signal(libc::SIGKILL);
    daemon.wait_timeout(Duration::from_secs(10));
    drop(daemon);

    let region = Region::of(&d);
    assert_eq!(region.used_idx(), 1);
    // Head 3 (old data for sector 0) was completed: its used entry is in the ring, the region
    // still has it in flight. Replaying it would overwrite the newer 0xAA.
    let stale = put_write(&mut d, 3, 0, 0x11);
    // In flight, popped in the order 9, 6, 12.
    let s6 = put_write(&mut d, 6, 8, 0x66);
    let s9 = put_write(&mut d, 9, 16, 0x99);
    let s12 = put_write(&mut d, 12, 24, 0x12);
    // Available, never taken.
    let s15 = put_write(&mut d, 15, 32, 0x15);
    d.make_available(0, &[3, 6, 9, 12, 15]);
    region.mark(3, 1);
    region.mark(9, 2);
    region.mark(6, 3);
    region.mark(12, 4);
    // The dead daemon had published head 3's used entry (element, then index).
    d.put(Q0.used + 4 + 8, &[3, 0, 0, 0, 1, 0, 0, 0]);
    d.mem
        .store(
            2u16.to_le(),
            vm_memory::GuestAddress(Q0.used + 2),
            Ordering::Release,
        )
        .unwrap();
    assert_eq!(d.wait_used(0, 1), [(3, 1)]);
    d.put(stale, &[S_OK]);
    d.verify("crash state", &[]);

    let daemon = Daemon::start(&sock, img, &["--queues", "1"]);
    let mut d = d.reconnect(&sock);
    let mut used = d.wait_used(0, 4);
    used.sort_unstable();
    assert_eq!(used, [(6, 1), (9, 1), (12, 1), (15, 1)]);
    d.assert_nothing_used(0, Duration::from_millis(200));
    // Only the four status bytes were written; head 3 was not executed again.
    d.verify("after the restart", &[(s6, 1), (s9, 1), (s12, 1), (s15, 1)]);
    for s in [s6, s9, s12, s15] {
        assert_eq!(d.get(s, 1)[0], S_OK);
    }
    assert_eq!(region.flagged(), Vec::<u16>::new());
    assert_eq!(region.used_idx(), 6);

    // The device goes on serving on the same ring.
    let s18 = put_write(&mut d, 18, 40, 0x18);
    d.make_available(0, &[18]);
    assert_eq!(d.wait_used(0, 1), [(18, 1)]);
    assert_eq!(d.get(s18, 1)[0], S_OK);
    drop(d);
    assert_eq!(daemon.terminate().code(), Some(0));

    for (sector, fill) in [
        (0, 0xAA),
        (8, 0x66),
        (16, 0x99),
        (24, 0x12),
        (32, 0x15),
        (40, 0x18),
    ] {
        assert_eq!(
            image_block(&image, sector),
            vec![fill; BLOCK],
            "sector {sector} of the image"
        );
    }
}

/// A frontend that hands a restarted daemon a region full of garbage: every head flagged,
/// used index far off. The daemon must not crash or write outside the chains' writable buffers; the ring may
/// stop (a broken driver), and the next frontend is served.
#[test]
fn a_garbage_region_cannot_break_the_daemon() {
    let dir = Scratch::new("inflight-garbage");
    let sock = dir.path("vu.sock");
    let mut daemon = Daemon::start(&sock, "mem:16M", &["--queues", "1"]);
    let mut d = Driver::connect_with(&sock, true);
    let s0 = put_write(&mut d, 0, 0, 0x5A);
    d.make_available(0, &[0]);
    assert_eq!(d.wait_used(0, 1), [(0, 1)]);
    assert_eq!(d.get(s0, 1)[0], S_OK);
    let region = Region::of(&d);
    for head in 0..QSIZE {
        region.mark(head, u64::from(head).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    region.set_used_idx(0x8000);
    // The descriptor table outside head 0's chain is canary bytes: addresses nowhere.
    daemon.signal(libc::SIGKILL);
    daemon.wait_timeout(Duration::from_secs(10));
    drop(daemon);
    let mut daemon = Daemon::start(&sock, "mem:16M", &["--queues", "1"]);
    let d = d.reconnect(&sock);
    std::thread::sleep(Duration::from_millis(300));
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon alive");
    drop(d);

    let mut d = Driver::connect(&sock);
    let s = put_write(&mut d, 0, 0, 0x33);
    d.make_available(0, &[0]);
    assert_eq!(d.wait_used(0, 1), [(0, 1)]);
    assert_eq!(d.get(s, 1)[0], S_OK);
    drop(d);
    assert_eq!(daemon.terminate().code(), Some(0));
}
