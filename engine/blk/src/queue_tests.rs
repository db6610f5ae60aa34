//! Good requests through the blk handler and the core's queue service over a RAM disk, notification suppression
//! (EVENT_IDX), and rings broken by the driver.

/// The test harness shared with `request_tests.rs`.
#[path = "harness_tests.rs"]
pub(crate) mod harness;

use std::sync::mpsc;
use std::time::Duration;

use crate::request::{FLAG_UNMAP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
use crate::OpKind;
use harness::*;
use virtio_queue::QueueT;
use virtiod_core::inflight::InflightRegion;
use virtiod_core::ServiceError;

#[test]
fn write_then_read() {
    let mut h = Harness::new();
    let data = pattern(1, 4096);
    h.write(8, &data);
    assert_eq!(h.disk(8 * 512, 4096), data);
    assert_eq!(h.disk(0, 8 * 512), vec![0; 8 * 512], "nothing before");
    assert_eq!(h.read(8, 4096), data);
    assert_eq!(h.read(9, 512), data[512..1024]);
    assert_eq!(h.stats.requests(OpKind::Write), 1);
    assert_eq!(h.stats.requests(OpKind::Read), 2);
    assert_eq!(h.stats.bytes(OpKind::Read), 4096 + 512);
    assert_eq!(h.stats.errors(), 0);
    assert_eq!(h.stats.in_flight(), 0);
}

#[test]
fn header_split_across_descriptors() {
    let mut h = Harness::new();
    for (i, cut) in [1usize, 3, 8, 13, 15].into_iter().enumerate() {
        let sector = 10 * i as u64;
        let data = pattern(i as u8, 1024);
        let hdr = header(T_OUT, sector);
        let (a, b) = (h.readable(&hdr[..cut]), h.readable(&hdr[cut..]));
        let d = h.readable(&data);
        let status = h.status_buf();
        h.expect(&[a, b, d, status], OK, 1);
        assert_eq!(h.disk(sector * 512, 1024), data);
        let hdr = header(T_IN, sector);
        let (a, b) = (h.readable(&hdr[..cut]), h.readable(&hdr[cut..]));
        let d = h.writable(1024);
        let status = h.status_buf();
        h.expect(&[a, b, d, status], OK, 1025);
        assert_eq!(h.contents(d), data);
    }
}

#[test]
fn framing_ignores_descriptor_boundaries() {
    let mut h = Harness::new();
    // OUT: header and data in one descriptor.
    let data = pattern(2, 1024);
    let one = h.readable(&[header(T_OUT, 3), data.clone()].concat());
    let status = h.status_buf();
    h.expect(&[one, status], OK, 1);
    assert_eq!(h.disk(3 * 512, 1024), data);
    // IN: data and status in one descriptor.
    let hdr = h.readable(&header(T_IN, 3));
    let both = h.writable(1025);
    h.expect(&[hdr, both], OK, 1025);
    assert_eq!(h.get(both.addr, 1024), data);
    // OUT: the header's tail, the data and a zero-length descriptor mixed.
    let mut bytes = header(T_OUT, 7);
    bytes.extend_from_slice(&data);
    let a = h.readable(&bytes[..10]);
    let b = h.readable(&bytes[10..600]);
    let c = h.readable(&[]);
    let d = h.readable(&bytes[600..]);
    let status = h.status_buf();
    h.expect(&[a, b, c, d, status], OK, 1);
    assert_eq!(h.disk(7 * 512, 1024), data);
}

#[test]
fn data_over_several_descriptors() {
    let mut h = Harness::new();
    let data = pattern(3, 2048);
    let cuts = [0, 100, 512, 513, 1536, 2048];
    let mut chain = vec![h.readable(&header(T_OUT, 40))];
    for w in cuts.windows(2) {
        chain.push(h.readable(&data[w[0]..w[1]]));
    }
    chain.push(h.status_buf());
    h.expect(&chain, OK, 1);
    assert_eq!(h.disk(40 * 512, 2048), data);
    let mut chain = vec![h.readable(&header(T_IN, 40))];
    for w in cuts.windows(2) {
        chain.push(h.writable((w[1] - w[0]) as u32));
    }
    chain.push(h.status_buf());
    h.expect(&chain, OK, 2049);
    let read: Vec<u8> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|d| h.contents(*d))
        .collect();
    assert_eq!(read, data);
}

#[test]
fn flush() {
    let mut h = Harness::new();
    let chain = h.bare_chain(T_FLUSH, 0);
    h.expect(&chain, OK, 1);
    // The sector field of a FLUSH is ignored (regression: `sector * 512` overflowed).
    let chain = h.bare_chain(T_FLUSH, u64::MAX);
    h.expect(&chain, OK, 1);
    assert_eq!(h.stats.requests(OpKind::Flush), 2);
}

#[test]
fn get_id() {
    let mut h = Harness::new();
    let serial = &SERIAL.as_bytes()[..20];
    for (len, written) in [(20u32, 20usize), (8, 8), (32, 20), (1, 1)] {
        let hdr = h.readable(&header(T_GET_ID, 0));
        let id = h.writable(len);
        let status = h.status_buf();
        h.expect(&[hdr, id, status], OK, written as u32 + 1);
        let got = h.contents(id);
        assert_eq!(got[..written], serial[..written]);
        assert!(got[written..].iter().all(|&b| b == FILL), "past the id");
    }
    // Split over two descriptors, with the status in the second.
    let hdr = h.readable(&header(T_GET_ID, 0));
    let (a, b) = (h.writable(7), h.writable(14));
    h.expect(&[hdr, a, b], OK, 21);
    assert_eq!([h.contents(a), h.get(b.addr, 13)].concat(), serial);
    // No room at all.
    let chain = h.bare_chain(T_GET_ID, 0);
    h.expect(&chain, OK, 1);
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = Harness::new();
    let disk = h.fill_disk();
    let cases = [
        (T_DISCARD, 0),
        (T_WRITE_ZEROES, 0),
        (T_WRITE_ZEROES, FLAG_UNMAP),
    ];
    for (i, (kind, flags)) in cases.into_iter().enumerate() {
        let start = 100 + 50 * i as u64;
        let chain = h.range_chain(kind, start, 16, flags);
        h.expect(&chain, OK, 1);
        let now = h.backend.snapshot();
        let (s, e) = (start as usize * 512, (start as usize + 16) * 512);
        assert!(now[s..e].iter().all(|&b| b == 0), "range zeroed");
        assert_eq!(now[s - 512..s], disk[s - 512..s], "sector before intact");
        assert_eq!(now[e..e + 512], disk[e..e + 512], "sector after intact");
    }
    // Up to the last sector, and an empty range.
    let chain = h.range_chain(T_WRITE_ZEROES, DISK_SECTORS - 1, 1, 0);
    h.expect(&chain, OK, 1);
    assert_eq!(h.disk(DISK_SIZE - 512, 512), vec![0; 512]);
    let chain = h.range_chain(T_DISCARD, 10, 0, 0);
    h.expect(&chain, OK, 1);
    assert_eq!(h.disk(10 * 512, 512), disk[10 * 512..11 * 512]);
    assert_eq!(h.stats.requests(OpKind::Discard), 2);
    assert_eq!(h.stats.requests(OpKind::WriteZeroes), 3);
}

#[test]
fn several_requests_per_kick() {
    let mut h = Harness::new();
    let data = pattern(4, 512);
    let w = h.out_chain(5, &data);
    let r = h.in_chain(5, 512);
    let bad = h.bare_chain(0x77, 0);
    let f = h.bare_chain(T_FLUSH, 0);
    let heads: Vec<u32> = [&w, &r, &bad, &f]
        .iter()
        .map(|c| u32::from(h.add_chain(c)))
        .collect();
    assert!(h.run(), "notify after completions");
    // Refused requests complete at once, the others when the backend completes them.
    let mut used = h.take_used();
    used.sort();
    let mut want = [(heads[0], 1), (heads[1], 513), (heads[2], 1), (heads[3], 1)];
    want.sort();
    assert_eq!(used, want);
    assert_eq!(h.contents(r[1]), data, "the read sees the earlier write");
    assert_eq!(h.status(bad[1]), UNSUPP);
    assert_eq!(h.stats.errors(), 1);
    // Nothing left: no notification.
    assert!(!h.run());
    assert!(h.take_used().is_empty());
}

#[test]
fn ring_indexes_wrap() {
    let mut h = Harness::new();
    h.start_at(u16::MAX - 20);
    for i in 0..3 * QSIZE {
        let data = pattern(i as u8, 512);
        h.write(u64::from(i), &data);
        assert_eq!(h.read(u64::from(i), 512), data);
    }
    assert_eq!(h.used_idx(), (u16::MAX - 20).wrapping_add(6 * QSIZE));
}

#[test]
fn notifies_without_event_idx() {
    let mut h = Harness::new();
    assert!(!h.run(), "nothing done, nothing to notify");
    let chain = h.bare_chain(T_FLUSH, 0);
    h.add_chain(&chain);
    assert!(h.run());
    assert_eq!(h.used_flags(), 0, "notifications enabled again");
    let chain = h.bare_chain(0x99, 0);
    h.add_chain(&chain);
    assert!(h.run(), "errors are completions too");
}

#[test]
fn event_idx_follows_used_event() {
    let mut h = Harness::new();
    let submit = |h: &mut Harness, n: usize| {
        for _ in 0..n {
            let chain = h.bare_chain(T_FLUSH, 0);
            h.add_chain(&chain);
        }
        let notify = h.run();
        assert_eq!(h.take_used().len(), n);
        notify
    };
    // used_event 0: the driver wants to hear once entry 0 is used.
    h.set_used_event(0);
    assert!(submit(&mut h, 1)); // used 0 → 1
    assert_eq!(
        h.avail_event(),
        1,
        "the device asks for a kick at the next entry"
    );
    h.set_used_event(5);
    assert!(!submit(&mut h, 3)); // used 1 → 4: entry 5 not used yet
    assert!(submit(&mut h, 2)); // used 4 → 6: entry 5 used
    assert!(!submit(&mut h, 1)); // used 6 → 7: already told
    h.set_used_event(7);
    assert!(submit(&mut h, 1)); // used 7 → 8
    assert!(!h.run(), "nothing new");
    assert_eq!(h.avail_event(), 8);
}

#[test]
fn event_idx_across_index_wrap() {
    let mut h = Harness::new();
    h.start_at(u16::MAX - 1);
    h.set_used_event(u16::MAX);
    let chain = h.bare_chain(T_FLUSH, 0);
    h.add_chain(&chain);
    assert!(!h.run()); // used 65534 → 65535
    let chain = h.bare_chain(T_FLUSH, 0);
    h.add_chain(&chain);
    assert!(h.run()); // used 65535 → 0: entry 65535 used
}

/// Run `process_queue` on another thread so that a spinning worker fails the test.
fn process_with_timeout(mut h: Harness) -> (Harness, Result<bool, ServiceError>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = h.process();
        let _ = tx.send((h, result));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("process_queue did not return: it spins on a broken ring")
}

#[test]
fn avail_index_too_far_ahead_stops_the_queue() {
    let mut h = Harness::new();
    let chain = h.bare_chain(T_FLUSH, 0);
    h.add_chain(&chain);
    h.set_avail_idx(QSIZE + 1);
    let (h, result) = process_with_timeout(h);
    assert!(matches!(result, Err(ServiceError::Queue(_))), "{result:?}");
    h.check_untouched();
}

#[test]
fn unreadable_avail_ring_stops_the_queue() {
    let mut h = Harness::new();
    // The avail index is the last u16 of memory: the ring entries are not in memory.
    let avail = MEM_SIZE - 4;
    h.svc
        .queue_mut()
        .set_avail_ring_address(Some(avail as u32), Some(0));
    h.put(avail + 2, &1u16.to_le_bytes());
    let (h, result) = process_with_timeout(h);
    assert!(matches!(result, Err(ServiceError::Queue(_))), "{result:?}");
    h.check_untouched();
}

#[test]
fn head_index_out_of_range_stops_the_queue() {
    let mut h = Harness::new();
    let chain = h.bare_chain(T_FLUSH, 0);
    h.add_chain(&chain);
    let slot = h.avail + 4;
    h.put(slot, &QSIZE.to_le_bytes());
    let (h, result) = process_with_timeout(h);
    assert!(
        matches!(
            result,
            Err(ServiceError::Queue(
                virtio_queue::Error::InvalidDescriptorIndex
            ))
        ),
        "{result:?}"
    );
    assert_eq!(h.used_idx(), 0, "nothing used");
    h.check_untouched();
}

#[test]
#[should_panic(expected = "not a writable buffer")]
fn harness_catches_stray_writes() {
    let h = Harness::new();
    let d = Desc::r(ARENA + 0x1000, 1);
    // Written behind the harness's back, as a buggy device would.
    vm_memory::Bytes::write_slice(h.mem.as_ref(), &[0], vm_memory::GuestAddress(d.addr)).unwrap();
    h.check_untouched();
}

#[test]
fn read_only_device_serves_reads() {
    let mut h = Harness::with_disk(true);
    assert_eq!(h.read(DISK_SECTORS - 2, 1024), vec![0; 1024]);
    assert!(h.cfg.read_only);
    let chain = h.out_chain(0, &pattern(5, 512));
    h.expect(&chain, IOERR, 1);
    assert_eq!(h.stats.errors(), 1);
}

#[test]
fn requests_in_flight_at_a_kill_are_executed_again_through_the_in_flight_record() {
    let mut h = Harness::new();
    let data = pattern(9, 1024);
    h.write(16, &pattern(3, 512));
    let _ = h.take_used();
    // The driver made an OUT and an IN available; a previous process popped both (and
    // recorded them) and died.
    let out = h.out_chain(4, &data);
    let head_out = h.add_chain(&out);
    let read = h.in_chain(16, 512);
    let head_in = h.add_chain(&read);
    let (region, _file, _) = InflightRegion::create(1, QSIZE).unwrap();
    let mut block = region.queue(0).unwrap();
    block.initialise(h.used_idx());
    block.popped(head_out);
    block.popped(head_in);
    let mem = h.mem.clone();
    let notify = h.svc.activate(&mem, region.queue(0)).unwrap();
    assert!(notify);
    h.check_untouched();
    assert_eq!(
        h.take_used(),
        vec![(u32::from(head_out), 1), (u32::from(head_in), 513)]
    );
    assert_eq!(h.disk(4 * 512, 1024), data);
    assert_eq!(h.contents(read[1]), pattern(3, 512));
    assert_eq!(h.status(out[2]), OK);
    assert_eq!(h.svc.queue().next_avail(), h.svc.queue().next_used());
    // Nothing in flight is left in the record.
    assert!(region.queue(0).unwrap().in_flight().is_empty());
    // A recorded head whose chain is a loop is answered without a status byte.
    let a = h.writable(16);
    let last = QSIZE - 1;
    h.write_desc(
        h.desc_table,
        last,
        Desc {
            flags: a.flags | 1,
            ..a
        },
        last,
    );
    let mut block = region.queue(0).unwrap();
    block.popped(last);
    let next_used = h.used_idx();
    h.svc.activate(&mem, region.queue(0)).unwrap();
    assert_eq!(h.used_idx(), next_used.wrapping_add(1));
    assert_eq!(h.take_used(), vec![(u32::from(last), 0)]);
}

#[test]
fn a_request_over_the_qos_limit_waits_and_a_drain_sends_it() {
    use crate::{Qos, QosLimits, Rate};
    // One request per second, a burst of two: the third waits (about a second; the test
    // does not wait for it, it drains).
    let limits = QosLimits {
        iops: Some(Rate {
            per_sec: 1,
            burst: Some(2),
        }),
        ..QosLimits::default()
    };
    let qos = std::sync::Arc::new(Qos::new(limits, std::time::Instant::now()));
    let mut h = Harness::with_options(false, Some(qos.clone()));
    let chains: Vec<_> = (0..3).map(|i| h.in_chain(i, 512)).collect();
    for c in &chains {
        h.add_chain(c);
    }
    h.process().unwrap();
    let used = h.take_used();
    assert_eq!(used.len(), 2, "the burst goes at once: {used:?}");
    assert_eq!(h.svc.in_flight(), 1, "the third is held, not failed");
    assert!(h.svc.wake_after().is_some(), "the queue asks to be woken");
    assert_eq!(h.status(chains[2][2]), FILL, "no status written yet");
    // Draining (reset, disconnect, stop) sends what is held, whatever the limit.
    h.svc.drain(&h.mem.clone()).unwrap();
    let used = h.take_used();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(h.status(chains[2][2]), OK);
    assert_eq!(h.svc.in_flight(), 0);
    assert_eq!(h.svc.wake_after(), None);
    assert_eq!(qos.throttled_requests(), 1);
    h.check_untouched();
}
