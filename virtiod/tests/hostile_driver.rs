//! A malicious vhost-user frontend against the real `virtiod` binary.
//!
//! Each case hand-writes descriptors and ring entries into shared memory and checks the
//! device's answer (status byte, or used length 0 when there is nowhere to put one), that
//! nothing outside the allowed bytes changed (every buffer sits between canaries and the
//! whole guest memory is compared with a shadow copy), and that the next good request on the
//! same queue still works. The cases run one after the other on ONE connection; only the
//! cases that break the ring itself (a head index or an avail index the driver may not
//! write) stop the queue, and those come last, each followed by a new connection.

mod common;

use std::path::Path;
use std::time::Duration;

use common::frontend::*;
use common::{Daemon, Scratch};
use vhost::{VhostBackend, VringConfigData};

/// Sectors 0..8 hold [`known`]; every case ends by reading them back.
const KNOWN_SECTOR: u64 = 0;
/// Refused writes aim here; it must keep [`victim`].
const VICTIM: u64 = 64;
const SETTLE: Duration = Duration::from_millis(300);

fn known() -> Vec<u8> {
    (0..4096u32).map(|i| (i * 7 + 3) as u8).collect()
}

fn victim() -> Vec<u8> {
    vec![0x5A; 512]
}

/// Run `descs` (chained in table order) and return the used length; the daemon may write
/// only into `allowed`.
fn exec(d: &mut Driver, case: &str, descs: &[Desc], allowed: &[(u64, u64)]) -> u32 {
    d.exec_table(case, &linked(descs), 0, allowed)
}

/// The request must be refused with `status` in the last byte of the last descriptor and
/// nothing else written; `None`: no status can be written, used length 0, nothing written.
fn refuse(d: &mut Driver, case: &str, descs: &[Desc], status: Option<u8>) {
    refuse_table(d, case, &linked(descs), 0, status);
}

/// Refused with IOERR.
fn ioerr(d: &mut Driver, case: &str, descs: &[Desc]) {
    refuse(d, case, descs, Some(S_IOERR));
}

/// Refused without a status (used length 0).
fn no_status(d: &mut Driver, case: &str, descs: &[Desc]) {
    refuse(d, case, descs, None);
}

fn refuse_table(d: &mut Driver, case: &str, table: &[Desc], head: u16, status: Option<u8>) {
    let last = *table.last().unwrap();
    match status {
        Some(code) => {
            let used_len = d.exec_table(case, table, head, &[(last.last(), 1)]);
            assert_eq!(used_len, 1, "{case}: used length");
            assert_eq!(d.get(last.last(), 1)[0], code, "{case}: status byte");
        }
        None => {
            let used_len = d.exec_table(case, table, head, &[]);
            assert_eq!(used_len, 0, "{case}: no status, so used length 0");
        }
    }
    recovers(d, case);
}

fn write_ok(d: &mut Driver, sector: u64, data: &[u8]) {
    let h = d.readable(&header(T_OUT, sector));
    let buf = d.readable(data);
    let s = d.writable(1);
    assert_eq!(exec(d, "good write", &[h, buf, s], &[(s.addr, 1)]), 1);
    assert_eq!(d.get(s.addr, 1)[0], S_OK, "good write at sector {sector}");
}

fn read_ok(d: &mut Driver, sector: u64, len: u32) -> Vec<u8> {
    let h = d.readable(&header(T_IN, sector));
    let buf = d.writable(len);
    let s = d.writable(1);
    let allowed = [(buf.addr, u64::from(len)), (s.addr, 1)];
    assert_eq!(exec(d, "good read", &[h, buf, s], &allowed), len + 1);
    assert_eq!(d.get(s.addr, 1)[0], S_OK, "good read at sector {sector}");
    d.get(buf.addr, len as usize)
}

/// The next good request on the queue works and earlier data (and the victim) are intact.
fn recovers(d: &mut Driver, case: &str) {
    assert_eq!(read_ok(d, KNOWN_SECTOR, 4096), known(), "after {case}");
    assert_eq!(read_ok(d, VICTIM, 512), victim(), "after {case}: victim");
}

/// Header, data and status buffers for a request of `kind` at `sector`.
fn parts(d: &mut Driver, kind: u32, sector: u64) -> (Desc, Desc) {
    (d.readable(&header(kind, sector)), d.writable(1))
}

fn outside_memory(d: &mut Driver) {
    let (h, s) = parts(d, T_IN, 0);
    let data = d.writable(512);
    ioerr(d, "header in a hole", &[Desc::r(HOLE, 16), data, s]);
    ioerr(d, "IN data in a hole", &[h, Desc::w(HOLE, 512), s]);
    let (ho, so) = parts(d, T_OUT, VICTIM);
    ioerr(d, "OUT data in a hole", &[ho, Desc::r(HOLE, 512), so]);
    no_status(d, "status in a hole", &[h, data, Desc::w(HOLE, 1)]);
    let wraps = Desc::w(u64::MAX - 255, 512);
    ioerr(d, "data wraps the address space", &[h, wraps, s]);
    no_status(d, "status at u64::MAX", &[h, data, Desc::w(u64::MAX, 1)]);
    no_status(d, "status past u64::MAX", &[h, data, Desc::w(u64::MAX, 2)]);
    let (hf, sf) = parts(d, T_FLUSH, 0);
    // 2 GiB of "header": far past the end of the region it starts in.
    let huge_header = Desc::r(hf.addr, 1 << 31);
    ioerr(d, "header 2 GiB long", &[huge_header, sf]);
    let huge_header = Desc::r(hf.addr, u32::MAX);
    no_status(d, "header + status over 4 GiB", &[huge_header, sf]);
}

fn straddling(d: &mut Driver) {
    // Into the hole after region B.
    let end_b = B_BASE + B_LEN;
    let (h, s) = parts(d, T_IN, 0);
    ioerr(
        d,
        "IN data into the hole",
        &[h, Desc::w(end_b - 256, 512), s],
    );
    let (ho, so) = parts(d, T_OUT, VICTIM);
    ioerr(
        d,
        "OUT data into the hole",
        &[ho, Desc::r(end_b - 256, 512), so],
    );
    let data = d.writable(512);
    no_status(d, "status into the hole", &[h, data, Desc::w(end_b - 1, 2)]);
    // Across the boundary of the adjacent regions A and B: one buffer, two mappings.
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 13) as u8).collect();
    d.put(B_BASE - 256, &pattern);
    let (ho, so) = parts(d, T_OUT, 200);
    let written = exec(
        d,
        "OUT across A|B",
        &[ho, Desc::r(B_BASE - 256, 512), so],
        &[(so.addr, 1)],
    );
    assert_eq!(written, 1);
    assert_eq!(d.get(so.addr, 1)[0], S_OK, "OUT across adjacent regions");
    d.put(B_BASE - 256, &[CANARY; 512]);
    let (hi, si) = parts(d, T_IN, 200);
    let allowed = [(B_BASE - 256, 512), (si.addr, 1)];
    let read = exec(
        d,
        "IN across A|B",
        &[hi, Desc::w(B_BASE - 256, 512), si],
        &allowed,
    );
    assert_eq!(
        (read, d.get(si.addr, 1)[0]),
        (513, S_OK),
        "IN across adjacent regions"
    );
    assert_eq!(d.get(B_BASE - 256, 512), pattern);
    recovers(d, "buffers across adjacent regions");
}

fn loops_and_long_chains(d: &mut Driver) {
    let (h, s) = parts(d, T_IN, 0);
    let data = d.writable(512);
    let to = |mut desc: Desc, next: u16| {
        desc.flags |= F_NEXT;
        desc.next = next;
        desc
    };
    refuse_table(d, "descriptor points at itself", &[to(h, 0)], 0, None);
    refuse_table(d, "two-descriptor loop", &[to(h, 1), to(data, 0)], 0, None);
    refuse_table(
        d,
        "next past the table",
        &[to(h, 1), to(data, 300)],
        0,
        None,
    );
    let ring: Vec<Desc> = (0..QSIZE).map(|i| to(data, (i + 1) % QSIZE)).collect();
    let mut ring = ring;
    ring[0] = to(h, 1);
    refuse_table(d, "loop through the whole table", &ring, 0, None);
    let looped = d.indirect(&[to(h, 1), to(data, 1)]);
    no_status(d, "loop inside an indirect table", &[looped]);
    // 1025 data segments (more than preadv takes), all on one canary buffer.
    let (hb, sb) = parts(d, T_IN, 0);
    let mut many = vec![hb];
    many.extend(std::iter::repeat_n(data, 1025));
    many.push(sb);
    let table = d.indirect(&linked(&many));
    let case = "1025 data segments";
    assert_eq!(d.exec_table(case, &[table], 0, &[(sb.addr, 1)]), 1);
    assert_eq!(d.get(sb.addr, 1)[0], S_IOERR, "{case}");
    recovers(d, case);
    // Total length over 4 GiB: the chain is cut, there is no status.
    let huge = Desc::w(data.addr, u32::MAX);
    no_status(d, "chain longer than 4 GiB", &[h, huge, huge, s]);
}

fn bad_indirect_tables(d: &mut Driver) {
    let (h, s) = parts(d, T_IN, 0);
    let data = d.writable(512);
    let inner = d.indirect(&linked(&[h, data, s]));
    let nested_first = d.indirect(&[inner]);
    no_status(
        d,
        "indirect table starting with an indirect",
        &[nested_first],
    );
    let mut header_then_nested = h;
    header_then_nested.flags |= F_NEXT;
    header_then_nested.next = 1;
    let nested_later = d.indirect(&[header_then_nested, inner]);
    no_status(d, "indirect inside an indirect table", &[nested_later]);
    for len in [0, 8, 40] {
        let mut odd = d.indirect(&linked(&[h, data, s]));
        odd.len = len;
        no_status(d, &format!("indirect table of {len} bytes"), &[odd]);
    }
    let hole = Desc {
        addr: HOLE,
        len: 48,
        flags: F_INDIRECT,
        next: 0,
    };
    no_status(d, "indirect table in a hole", &[hole]);
    // The table's first two entries are mapped, the third (status) is in the hole.
    let end_b = B_BASE + B_LEN;
    let table = linked(&[h, data, s]);
    d.put(
        end_b - 32,
        &table[..2].iter().flat_map(Desc::bytes).collect::<Vec<u8>>(),
    );
    let cut = Desc {
        addr: end_b - 32,
        len: 48,
        flags: F_INDIRECT,
        next: 0,
    };
    no_status(d, "indirect table running into the hole", &[cut]);
    // INDIRECT together with NEXT (a driver must not): the table is used, NEXT ignored.
    let mut both = d.indirect(&linked(&[h, data, s]));
    both.flags |= F_NEXT;
    both.next = 1;
    let allowed = [(data.addr, 512), (s.addr, 1)];
    let used = d.exec_table("INDIRECT with NEXT", &[both, Desc::r(HOLE, 1)], 0, &allowed);
    assert_eq!(
        (used, d.get(s.addr, 1)[0]),
        (513, S_OK),
        "INDIRECT with NEXT"
    );
    d.put(data.addr, &[CANARY; 512]);
    recovers(d, "INDIRECT with NEXT");
}

fn lengths_and_directions(d: &mut Driver) {
    let (h, s) = parts(d, T_IN, KNOWN_SECTOR);
    let data = d.writable(512);
    // Empty descriptors carry nothing, wherever they point: framing ignores them.
    let allowed = [(data.addr, 512), (s.addr, 1)];
    let empty = [Desc::r(HOLE, 0), h, Desc::w(HOLE, 0), data, s];
    assert_eq!(exec(d, "empty descriptors", &empty, &allowed), 513);
    assert_eq!(d.get(s.addr, 1)[0], S_OK);
    assert_eq!(d.get(data.addr, 512), known()[..512]);
    d.put(data.addr, &[CANARY; 512]);
    no_status(d, "empty status descriptor", &[h, data, Desc::w(s.addr, 0)]);
    let short = d.readable(&header(T_IN, 0)[..8]);
    ioerr(d, "8-byte header", &[short, data, s]);
    let readable = d.readable(&[0x11; 512]);
    ioerr(d, "IN with device-readable data", &[h, readable, s]);
    let (ho, so) = parts(d, T_OUT, VICTIM);
    ioerr(d, "OUT with device-writable data", &[ho, data, so]);
    ioerr(d, "readable after writable", &[h, data, readable, s]);
    let odd = d.writable(100);
    ioerr(d, "IN of 100 bytes", &[h, odd, s]);
    let (hf, sf) = parts(d, T_FLUSH, 0);
    ioerr(d, "FLUSH with data", &[hf, data, sf]);
    // A status byte the device may not write: nothing is written, not even the data.
    let ro_status = d.readable(&[0x77]);
    no_status(d, "status in a read-only descriptor", &[h, data, ro_status]);
    no_status(d, "FLUSH with a read-only status", &[hf, ro_status]);
    let mut with_status = header(T_FLUSH, 0);
    with_status.push(0x77);
    let one = d.readable(&with_status);
    no_status(d, "status inside the readable header", &[one]);
    assert_eq!(d.get(ro_status.addr, 1), [0x77]);
}

fn huge_sectors(d: &mut Driver, capacity: u64) {
    for sector in [
        u64::MAX,
        u64::MAX - 1,
        u64::MAX / 512 + 1,
        1 << 55,
        capacity,
    ] {
        let (h, s) = parts(d, T_IN, sector);
        let data = d.writable(512);
        ioerr(d, &format!("IN at sector {sector:#x}"), &[h, data, s]);
        let (ho, so) = parts(d, T_OUT, sector);
        let payload = d.readable(&[0x33; 512]);
        ioerr(d, &format!("OUT at sector {sector:#x}"), &[ho, payload, so]);
    }
    // FLUSH has no range: its sector is ignored, whatever it is.
    let (h, s) = parts(d, T_FLUSH, u64::MAX);
    assert_eq!(
        exec(d, "FLUSH at sector u64::MAX", &[h, s], &[(s.addr, 1)]),
        1
    );
    assert_eq!(d.get(s.addr, 1)[0], S_OK, "FLUSH at sector u64::MAX");
    let (h, s) = parts(d, T_IN, capacity - 1);
    let two = d.writable(1024);
    ioerr(d, "IN across the end of the disk", &[h, two, s]);
    assert_eq!(read_ok(d, capacity - 1, 512), vec![0; 512], "last sector");
    let ranges = [
        (T_WRITE_ZEROES, u64::MAX - 1, 2),
        (T_WRITE_ZEROES, 1 << 55, 8),
        (T_DISCARD, u64::MAX, 1),
        (T_DISCARD, capacity, 1),
        (T_WRITE_ZEROES, 0, u32::MAX),
    ];
    for (kind, start, count) in ranges {
        let h = d.readable(&header(kind, 0));
        let mut seg = start.to_le_bytes().to_vec();
        seg.extend_from_slice(&count.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        let seg = d.readable(&seg);
        let s = d.writable(1);
        let case = format!("type {kind} range {start:#x}+{count:#x}");
        ioerr(d, &case, &[h, seg, s]);
    }
}

fn unknown_types(d: &mut Driver) {
    for kind in [2, 3, 7, 0xFF, 0x8000_0000, u32::MAX] {
        let (h, s) = parts(d, kind, VICTIM);
        let payload = d.readable(&[0x44; 512]);
        refuse(
            d,
            &format!("request type {kind:#x}"),
            &[h, payload, s],
            Some(S_UNSUPP),
        );
    }
    let h = d.readable(&header(T_DISCARD, 0));
    let mut seg = VICTIM.to_le_bytes().to_vec();
    seg.extend_from_slice(&1u32.to_le_bytes());
    seg.extend_from_slice(&0x8000_0000u32.to_le_bytes());
    let seg = d.readable(&seg);
    let s = d.writable(1);
    refuse(
        d,
        "DISCARD with a reserved flag",
        &[h, seg, s],
        Some(S_UNSUPP),
    );
    let (h, s) = parts(d, T_GET_ID, 0);
    ioerr(d, "GET_ID into a hole", &[h, Desc::w(HOLE, 20), s]);
}

/// Queue 1 has rings and a kick fd but was never enabled: a kick must do nothing.
fn never_enabled_queue(d: &mut Driver) {
    let (h, s) = parts(d, T_IN, KNOWN_SECTOR);
    let data = d.writable(512);
    d.write_table(Q1.desc, &linked(&[h, data, s]));
    d.make_available(1, &[0]);
    d.assert_nothing_used(1, SETTLE);
    d.verify("kick on a never-enabled queue", &[]);
    recovers(d, "kick on a never-enabled queue");
}

/// Ring set-up messages the device must refuse. The daemon answers a refused message (an
/// error reply with REPLY_ACK) and closes the connection; it then serves the next frontend,
/// with the disk intact.
fn ring_setup_abuse(sock: &Path) {
    let unmapped = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: 0x1000,
        used_ring_addr: 0x2000,
        avail_ring_addr: 0x3000,
        log_addr: None,
    };
    let cases = [
        "queue size 0",
        "queue size over the maximum",
        "rings outside the memory table",
    ];
    for case in cases {
        let mut d = Driver::connect(sock);
        recovers(&mut d, case);
        let refused = match case {
            "queue size 0" => d.fe.set_vring_num(0, 0),
            "queue size over the maximum" => d.fe.set_vring_num(0, 2 * QSIZE),
            _ => d.fe.set_vring_addr(0, &unmapped),
        };
        assert!(refused.is_err(), "{case}: must be refused");
        d.verify(case, &[]);
    }
}

/// The same chain made available twice in one kick: both are answered.
fn head_twice(d: &mut Driver) {
    let (h, s) = parts(d, T_FLUSH, 0);
    d.write_table(Q0.desc, &linked(&[h, s]));
    d.make_available(0, &[0, 0]);
    assert_eq!(d.wait_used(0, 2), [(0, 1), (0, 1)]);
    d.verify("one head twice", &[(s.addr, 1)]);
    assert_eq!(d.get(s.addr, 1)[0], S_OK);
    recovers(d, "one head twice");
}

/// After a ring-breaking `case`, queue 0 answers nothing, not even a good request made
/// available afterwards (with a sane avail index): it stays stopped until the frontend
/// reconnects. Nothing is written anywhere.
fn assert_queue_stopped(d: &mut Driver, case: &str) {
    d.assert_nothing_used(0, SETTLE);
    d.verify(case, &[]);
    let (h, s) = parts(d, T_FLUSH, 0);
    d.write_table(Q0.desc, &linked(&[h, s]));
    d.make_available(0, &[0]);
    d.assert_nothing_used(0, SETTLE);
    d.verify(case, &[]);
}

#[test]
fn hostile_driver_cannot_escape_or_stop_the_daemon() {
    let dir = Scratch::new("hostile");
    let sock = dir.path("vu.sock");
    let mut daemon = Daemon::start(&sock, "mem:16M", &["--queues", "2"]);
    let mut d = Driver::connect(&sock);
    let capacity = d.capacity();
    assert_eq!(capacity, (16 << 20) / 512);
    write_ok(&mut d, KNOWN_SECTOR, &known());
    write_ok(&mut d, VICTIM, &victim());
    recovers(&mut d, "setup");

    outside_memory(&mut d);
    straddling(&mut d);
    loops_and_long_chains(&mut d);
    bad_indirect_tables(&mut d);
    lengths_and_directions(&mut d);
    huge_sectors(&mut d, capacity);
    unknown_types(&mut d);
    never_enabled_queue(&mut d);
    head_twice(&mut d);

    // A head index past the table breaks the ring: the driver is broken (virtio 2.7.13) and
    // the device stops serving that queue; nothing is written anywhere.
    let (h, s) = parts(&mut d, T_FLUSH, 0);
    d.write_table(Q0.desc, &linked(&[h, s]));
    d.make_available(0, &[QSIZE]);
    assert_queue_stopped(&mut d, "head index out of range");
    drop(d);
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon alive");

    // An avail index more than a queue ahead of the device: the queue stops as well.
    let mut d = Driver::connect(&sock);
    recovers(&mut d, "new connection");
    let used = d.used_idx(0);
    d.publish_avail_idx(0, used.wrapping_add(QSIZE + 44));
    assert_queue_stopped(&mut d, "avail index jumps past the queue size");
    drop(d);
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon alive");

    ring_setup_abuse(&sock);
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon alive");

    // A new connection is served, with every byte written before intact.
    let mut d = Driver::connect(&sock);
    recovers(&mut d, "the ring-breaking connections");
    drop(d);
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0: {status}");
}

#[test]
fn read_only_device_refuses_direct_writes() {
    let dir = Scratch::new("hostile-ro");
    let img = dir.path("ro.img");
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &content).unwrap();
    let sock = dir.path("vu.sock");
    let daemon = Daemon::start(&sock, img.to_str().unwrap(), &["--read-only"]);
    let mut d = Driver::connect(&sock);
    assert_eq!(read_ok(&mut d, 3, 512), content[3 * 512..4 * 512]);
    let (h, s) = parts(&mut d, T_OUT, 3);
    let payload = d.readable(&[0xEE; 512]);
    let used = exec(
        &mut d,
        "OUT on a read-only disk",
        &[h, payload, s],
        &[(s.addr, 1)],
    );
    assert_eq!((used, d.get(s.addr, 1)[0]), (1, S_IOERR), "OUT is refused");
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        let h = d.readable(&header(kind, 0));
        let mut seg = 3u64.to_le_bytes().to_vec();
        seg.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        let seg = d.readable(&seg);
        let s = d.writable(1);
        let case = format!("type {kind} on a read-only disk");
        let used = exec(&mut d, &case, &[h, seg, s], &[(s.addr, 1)]);
        assert_eq!((used, d.get(s.addr, 1)[0]), (1, S_IOERR), "{case}");
    }
    let (h, s) = parts(&mut d, T_FLUSH, 0);
    assert_eq!(exec(&mut d, "FLUSH", &[h, s], &[(s.addr, 1)]), 1);
    assert_eq!(read_ok(&mut d, 3, 512), content[3 * 512..4 * 512]);
    drop(d);
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(
        std::fs::read(&img).unwrap() == content,
        "the image is unchanged"
    );
}
