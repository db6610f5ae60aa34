//! Malformed requests: each shape is refused with its own [`RequestError`], answered with the
//! right status and used length, writes nothing it should not, and the queue keeps working.

use super::*;
use crate::queue::tests::harness::*;
use RequestError::*;

#[test]
fn header_shorter_than_16_bytes() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_IN, 0)[..15]);
    let chain = vec![hdr, h.writable(512), h.status_buf()];
    h.refuse(&chain, ShortHeader, IOERR, 1);
    // 15 bytes split over two descriptors, and a zero-length one in between.
    let full = header(T_FLUSH, 0);
    let a = h.readable(&full[..8]);
    let b = h.readable(&[]);
    let c = h.readable(&full[8..15]);
    let chain = vec![a, b, c, h.status_buf()];
    h.refuse(&chain, ShortHeader, IOERR, 1);
    // No readable descriptor at all.
    let chain = vec![h.writable(512), h.status_buf()];
    h.refuse(&chain, ShortHeader, IOERR, 1);
}

#[test]
fn missing_status_descriptor() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_OUT, 0));
    let data = h.readable(&pattern(1, 512));
    h.refuse(&[hdr, data], NoStatus, IOERR, 0);
    // A single readable descriptor.
    let hdr = h.readable(&header(T_FLUSH, 0));
    h.refuse(&[hdr], NoStatus, IOERR, 0);
}

#[test]
fn non_writable_last_descriptor() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_IN, 0));
    let data = h.writable(512);
    let status = h.readable(&[FILL]);
    h.refuse(&[hdr, data, status], NoStatus, IOERR, 0);
    assert_eq!(h.get(status.addr, 1), [FILL]);
}

#[test]
fn zero_length_status_descriptor() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_IN, 0));
    let data = h.writable(512);
    let mut status = h.writable(1);
    status.len = 0;
    h.refuse(&[hdr, data, status], NoStatus, IOERR, 0);
    assert_eq!(h.get(status.addr, 1), [FILL]);
}

#[test]
fn status_outside_memory() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_FLUSH, 0));
    h.refuse(&[hdr, Desc::w(MEM_SIZE, 1)], NoStatus, IOERR, 0);
    // Its last byte wraps around the address space.
    let hdr = h.readable(&header(T_FLUSH, 0));
    h.refuse(&[hdr, Desc::w(u64::MAX, 2)], NoStatus, IOERR, 0);
}

#[test]
fn wrong_direction() {
    let mut h = Harness::new();
    let disk = h.fill_disk();
    // OUT with a device-writable data buffer.
    let hdr = h.readable(&header(T_OUT, 0));
    let chain = vec![hdr, h.writable(512), h.status_buf()];
    h.refuse(&chain, WrongDirection, IOERR, 1);
    // IN with readable data after the header.
    let hdr = h.readable(&header(T_IN, 0));
    let data = h.readable(&pattern(2, 512));
    let chain = vec![hdr, data, h.writable(512), h.status_buf()];
    h.refuse(&chain, WrongDirection, IOERR, 1);
    // FLUSH with data either way; GET_ID with readable data.
    let hdr = h.readable(&header(T_FLUSH, 0));
    let chain = vec![hdr, h.writable(512), h.status_buf()];
    h.refuse(&chain, WrongDirection, IOERR, 1);
    let hdr = h.readable(&header(T_FLUSH, 0));
    let data = h.readable(&pattern(3, 512));
    let status = h.status_buf();
    h.refuse(&[hdr, data, status], WrongDirection, IOERR, 1);
    let hdr = h.readable(&header(T_GET_ID, 0));
    let data = h.readable(&[0; 4]);
    let chain = vec![hdr, data, h.writable(20), h.status_buf()];
    h.refuse(&chain, WrongDirection, IOERR, 1);
    // DISCARD with a writable buffer.
    let mut chain = h.range_chain(T_DISCARD, 0, 8, 0);
    chain.insert(2, h.writable(16));
    h.refuse(&chain, WrongDirection, IOERR, 1);
    let now = h.backend.snapshot();
    assert_eq!(now[..100 * 512], disk[..100 * 512]);
}

#[test]
fn sector_range_past_capacity() {
    let mut h = Harness::new();
    let chain = h.in_chain(DISK_SECTORS, 512);
    h.refuse(&chain, OutOfRange, IOERR, 1);
    let chain = h.in_chain(DISK_SECTORS - 1, 1024);
    h.refuse(&chain, OutOfRange, IOERR, 1);
    let chain = h.out_chain(DISK_SECTORS - 1, &pattern(4, 1024));
    h.refuse(&chain, OutOfRange, IOERR, 1);
    // A zero-length read past the end is refused too.
    let chain = h.bare_chain(T_IN, DISK_SECTORS + 1);
    h.refuse(&chain, OutOfRange, IOERR, 1);
    // The last sector itself is fine.
    let data = pattern(5, 512);
    h.write(DISK_SECTORS - 1, &data);
    assert_eq!(h.read(DISK_SECTORS - 1, 512), data);
}

#[test]
fn length_not_a_multiple_of_512() {
    let mut h = Harness::new();
    let chain = h.in_chain(0, 511);
    h.refuse(&chain, BadLength, IOERR, 1);
    let chain = h.out_chain(0, &pattern(6, 100));
    h.refuse(&chain, BadLength, IOERR, 1);
    // 512 + 1 over two descriptors.
    let hdr = h.readable(&header(T_IN, 0));
    let chain = vec![hdr, h.writable(512), h.writable(1), h.status_buf()];
    h.refuse(&chain, BadLength, IOERR, 1);
}

#[test]
fn sector_overflow() {
    let mut h = Harness::new();
    for sector in [u64::MAX, u64::MAX - 1, u64::MAX / 512, 1 << 63] {
        let chain = h.in_chain(sector, 1024);
        h.refuse(&chain, OutOfRange, IOERR, 1);
        let chain = h.out_chain(sector, &pattern(7, 512));
        h.refuse(&chain, OutOfRange, IOERR, 1);
        let chain = h.range_chain(T_WRITE_ZEROES, sector, 8, 0);
        h.refuse(&chain, OutOfRange, IOERR, 1);
        let chain = h.range_chain(T_DISCARD, sector, u32::MAX >> 9, 0);
        h.refuse(&chain, OutOfRange, IOERR, 1);
    }
}

#[test]
fn buffer_outside_memory() {
    let mut h = Harness::new();
    // IN data at the end of memory, and straddling it.
    for (addr, len) in [
        (MEM_SIZE, 512),
        (MEM_SIZE - 256, 512),
        (u64::MAX - 255, 512),
    ] {
        let hdr = h.readable(&header(T_IN, 0));
        let chain = vec![hdr, Desc::w(addr, len), h.status_buf()];
        h.refuse(&chain, BadAddress, IOERR, 1);
        let hdr = h.readable(&header(T_OUT, 0));
        let chain = vec![hdr, Desc::r(addr, len), h.status_buf()];
        h.refuse(&chain, BadAddress, IOERR, 1);
    }
    // The header itself.
    let chain = vec![Desc::r(MEM_SIZE, 16), h.status_buf()];
    h.refuse(&chain, BadAddress, IOERR, 1);
    // The discard segment.
    let hdr = h.readable(&header(T_DISCARD, 0));
    let chain = vec![hdr, Desc::r(MEM_SIZE - 8, 16), h.status_buf()];
    h.refuse(&chain, BadAddress, IOERR, 1);
    // GET_ID into unmapped memory.
    let hdr = h.readable(&header(T_GET_ID, 0));
    let chain = vec![hdr, Desc::w(MEM_SIZE, 20), h.status_buf()];
    h.refuse(&chain, BadAddress, IOERR, 1);
}

#[test]
fn readable_after_writable() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_IN, 0));
    let data = h.writable(512);
    let extra = h.readable(&pattern(8, 16));
    let status = h.status_buf();
    h.refuse(&[hdr, data, extra, status], BadOrder, IOERR, 1);
    // The header itself after the data.
    let data = h.writable(512);
    let hdr = h.readable(&header(T_IN, 0));
    let status = h.status_buf();
    h.refuse(&[data, hdr, status], BadOrder, IOERR, 1);
}

/// Write a raw chain into the descriptor table at the given indexes and make `head` available.
fn raw_chain(h: &mut Harness, entries: &[(u16, Desc, u16)], head: u16) {
    for &(index, desc, next) in entries {
        h.write_desc(h.desc_table, index, desc, next);
    }
    h.push_avail(head);
}

#[test]
fn descriptor_loop() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_IN, 0));
    let data = h.writable(512);
    let status = h.status_buf();
    let next = |d: Desc| Desc {
        flags: d.flags | F_NEXT,
        ..d
    };
    // 0 → 1 → 0 …
    raw_chain(&mut h, &[(0, next(hdr), 1), (1, next(data), 0)], 0);
    let (parsed, _) = h.parse_next();
    assert_eq!(parsed, Err(BrokenChain));
    h.run();
    assert_eq!(h.take_used(), [(0, 0)]);
    h.assert_data_untouched(&[hdr, data, status], true);
    h.assert_recovers();
    // A descriptor pointing at itself.
    raw_chain(&mut h, &[(5, next(hdr), 5)], 5);
    h.run();
    assert_eq!(h.take_used(), [(5, 0)]);
    // A loop through every descriptor of the table: longer than the queue.
    for i in 0..QSIZE {
        let d = if i == 0 { hdr } else { data };
        h.write_desc(h.desc_table, i, next(d), (i + 1) % QSIZE);
    }
    h.push_avail(0);
    let (parsed, _) = h.parse_next();
    assert_eq!(parsed, Err(BrokenChain));
    h.run();
    assert_eq!(h.take_used(), [(0, 0)]);
    h.assert_recovers();
}

#[test]
fn next_index_out_of_range() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_FLUSH, 0));
    for bad_next in [QSIZE, QSIZE + 1, u16::MAX] {
        let d = Desc {
            flags: F_NEXT,
            ..hdr
        };
        raw_chain(&mut h, &[(3, d, bad_next)], 3);
        let (parsed, _) = h.parse_next();
        assert_eq!(parsed, Err(BrokenChain));
        h.run();
        assert_eq!(h.take_used(), [(3, 0)]);
        h.assert_recovers();
    }
}

#[test]
fn chain_as_long_as_the_queue_is_accepted() {
    let mut h = Harness::new();
    let data = h.fill_disk();
    // Header, 14 data descriptors, status: all 16 descriptors of the table.
    let mut chain = vec![h.readable(&header(T_IN, 4))];
    chain.extend((0..QSIZE - 2).map(|_| h.writable(512)));
    chain.push(h.status_buf());
    assert_eq!(h.exec(&chain), 14 * 512 + 1);
    assert_eq!(h.status(chain[15]), OK);
    for (i, d) in chain[1..15].iter().enumerate() {
        let at = (4 + i) * 512;
        assert_eq!(h.contents(*d), data[at..at + 512]);
    }
}

#[test]
fn indirect_chain() {
    let mut h = Harness::new();
    // OUT: header and data split oddly, through an indirect table.
    let payload = pattern(9, 1024);
    let hdr = h.readable(&header(T_OUT, 20));
    let d1 = h.readable(&payload[..300]);
    let d2 = h.readable(&payload[300..]);
    let status = h.status_buf();
    let table = h.indirect(&[hdr, d1, d2, status]);
    assert_eq!(h.exec(&[table]), 1);
    assert_eq!(h.status(status), OK);
    assert_eq!(h.disk(20 * 512, 1024), payload);
    // IN through an indirect table.
    let hdr = h.readable(&header(T_IN, 20));
    let (d1, d2, status) = (h.writable(512), h.writable(512), h.status_buf());
    let table = h.indirect(&[hdr, d1, d2, status]);
    assert_eq!(h.exec(&[table]), 1025);
    assert_eq!(h.status(status), OK);
    assert_eq!([h.contents(d1), h.contents(d2)].concat(), payload);
}

#[test]
fn nested_indirect_table() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_FLUSH, 0));
    let status = h.status_buf();
    let inner = h.indirect(&[hdr, status]);
    // The nested table second: the chain ends on a descriptor with NEXT set.
    let hdr2 = h.readable(&header(T_FLUSH, 0));
    let outer = h.indirect(&[hdr2, inner]);
    h.refuse(&[outer], BrokenChain, IOERR, 0);
    // The nested table first: nothing at all.
    let outer = h.indirect(&[inner]);
    h.refuse(&[outer], EmptyChain, IOERR, 0);
    assert_eq!(h.get(status.addr, 1), [FILL]);
}

#[test]
fn bad_indirect_table() {
    let mut h = Harness::new();
    let hdr = h.readable(&header(T_FLUSH, 0));
    let status = h.status_buf();
    let good = h.indirect(&[hdr, status]);
    // Length not a multiple of 16, zero, and a table outside memory or straddling its end.
    for table in [
        Desc { len: 24, ..good },
        Desc { len: 0, ..good },
        Desc {
            addr: MEM_SIZE,
            ..good
        },
        Desc {
            addr: MEM_SIZE - 8,
            ..good
        },
        Desc {
            addr: u64::MAX - 15,
            ..good
        },
    ] {
        h.refuse(&[table], EmptyChain, IOERR, 0);
        // The same after a direct descriptor.
        let hdr = h.readable(&header(T_FLUSH, 0));
        h.refuse(&[hdr, table], BrokenChain, IOERR, 0);
    }
    assert_eq!(h.get(status.addr, 1), [FILL]);
    assert_eq!(h.exec(&[good]), 1);
    assert_eq!(h.status(status), OK);
}

#[test]
fn too_many_segments() {
    let mut h = Harness::new();
    let max = crate::config::MAX_SEGMENTS as usize;
    // 1024 data segments (all on the same buffer) are fine, 1025 are not.
    let data = h.writable(512);
    for (segments, ok) in [(max, true), (max + 1, false)] {
        let mut descs = vec![h.readable(&header(T_IN, 0))];
        descs.extend(std::iter::repeat_n(data, segments));
        let status = h.status_buf();
        descs.push(status);
        let table = h.indirect(&descs);
        if ok {
            assert_eq!(h.exec(&[table]), (segments * 512 + 1) as u32);
            assert_eq!(h.status(status), OK);
        } else {
            h.refuse(&[table], TooManySegments, IOERR, 1);
        }
    }
}

#[test]
fn unknown_type_is_unsupported() {
    let mut h = Harness::new();
    for kind in [2, 3, 7, 9, 10, 12, 14, 0xdead_beef] {
        let chain = h.bare_chain(kind, 0);
        h.refuse(&chain, Unsupported(kind), UNSUPP, 1);
    }
}

#[test]
fn discard_flags() {
    let mut h = Harness::new();
    let chain = h.range_chain(T_DISCARD, 0, 8, FLAG_UNMAP);
    h.refuse(&chain, Unsupported(T_DISCARD), UNSUPP, 1);
    let chain = h.range_chain(T_WRITE_ZEROES, 0, 8, 2);
    h.refuse(&chain, Unsupported(T_WRITE_ZEROES), UNSUPP, 1);
    let chain = h.range_chain(T_DISCARD, 0, 8, 0x8000_0000);
    h.refuse(&chain, Unsupported(T_DISCARD), UNSUPP, 1);
}

#[test]
fn bad_discard_ranges() {
    let mut h = Harness::new();
    h.fill_disk();
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        let chain = h.range_chain(kind, DISK_SECTORS - 4, 8, 0);
        h.refuse(&chain, OutOfRange, IOERR, 1);
        let chain = h.range_chain(kind, DISK_SECTORS, 1, 0);
        h.refuse(&chain, OutOfRange, IOERR, 1);
        let chain = h.range_chain(kind, 0, MAX_DISCARD_SECTORS + 1, 0);
        h.refuse(&chain, BadRange, IOERR, 1);
        // Two segments (only one is offered), and a short one.
        let hdr = h.readable(&header(kind, 0));
        let segs = h.readable(&[range(0, 1, 0), range(8, 1, 0)].concat());
        let status = h.status_buf();
        h.refuse(&[hdr, segs, status], BadRange, IOERR, 1);
        let hdr = h.readable(&header(kind, 0));
        let seg = h.readable(&range(0, 1, 0)[..15]);
        let status = h.status_buf();
        h.refuse(&[hdr, seg, status], BadRange, IOERR, 1);
        let chain = h.bare_chain(kind, 0);
        h.refuse(&chain, BadRange, IOERR, 1);
    }
}

#[test]
fn writes_to_read_only_device() {
    let mut h = Harness::with_disk(true);
    let chain = h.out_chain(0, &pattern(10, 512));
    h.refuse(&chain, ReadOnly, IOERR, 1);
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        for flags in [0, FLAG_UNMAP] {
            let chain = h.range_chain(kind, 0, 8, flags);
            h.refuse(&chain, ReadOnly, IOERR, 1);
        }
    }
    assert!(h.backend.snapshot().iter().all(|&b| b == 0));
    // Reads, FLUSH and GET_ID still work.
    assert_eq!(h.read(0, 1024), vec![0; 1024]);
    let chain = h.bare_chain(T_FLUSH, 0);
    h.expect(&chain, OK, 1);
    let hdr = h.readable(&header(T_GET_ID, 0));
    let chain = vec![hdr, h.writable(20), h.status_buf()];
    h.expect(&chain, OK, 21);
}

#[test]
fn parse_fills_head_and_status_on_error() {
    let mut h = Harness::new();
    h.assert_recovers(); // move the next chain off descriptor 0
    let chain = h.in_chain(DISK_SECTORS, 512);
    let head = h.add_chain(&chain);
    assert_ne!(head, 0);
    let (parsed, req) = h.parse_next();
    assert_eq!(parsed, Err(OutOfRange));
    assert_eq!(req.head, head);
    assert_eq!(req.status, Some(GuestAddress(chain[2].addr)));
    assert_eq!(req.kind, None);
}
