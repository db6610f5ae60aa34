use super::*;

/// Two adjacent regions (0..0x2_0000, split at 0x1_0000), a hole, and 0x3_0000..0x4_0000.
fn memory() -> Arc<DriverMemory> {
    let ranges = [
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
        (GuestAddress(0x3_0000), 0x1_0000),
    ];
    Arc::new(DriverMemory::from_ranges(&ranges).unwrap())
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect()
}

/// Three segments of 100, 3000 (across the region boundary) and 50 bytes.
fn segments() -> [(GuestAddress, usize); 3] {
    [
        (GuestAddress(0x100), 100),
        (GuestAddress(0x1_0000 - 1000), 3000),
        (GuestAddress(0x3_0010), 50),
    ]
}

#[test]
fn resolves_segments_into_host_ranges() {
    let mem = memory();
    let b = IoBuffers::from_segments(mem.clone(), segments(), Direction::DeviceWrites).unwrap();
    assert_eq!(b.len(), 3150);
    assert_eq!(b.direction(), Direction::DeviceWrites);
    let lens: Vec<usize> = b.iovecs().iter().map(|v| v.iov_len).collect();
    assert_eq!(lens, [100, 1000, 2000, 50], "split where the regions meet");
    assert!(Arc::ptr_eq(b.memory().unwrap(), &mem));
    assert_eq!(Arc::strong_count(&mem), 2, "the buffers keep the memory");
    drop(b);
    assert_eq!(Arc::strong_count(&mem), 1);
}

#[test]
fn refuses_segments_outside_memory() {
    let mem = memory();
    let cases = [
        (GuestAddress(0x5_0000), 512),       // beyond the end
        (GuestAddress(0x2_0000 - 256), 512), // runs into the hole
        (GuestAddress(0x2_1000), 16),        // inside the hole
        (GuestAddress(0x4_0000 - 1), 2),     // runs off the end
        (GuestAddress(u64::MAX - 3), 16),    // wraps around
    ];
    for seg in cases {
        let good = (GuestAddress(0x1000), 512);
        let err =
            IoBuffers::from_segments(mem.clone(), [good, seg], Direction::DeviceReads).unwrap_err();
        assert!(
            matches!(err, BufferError::NotMapped { .. }),
            "{seg:?}: {err}"
        );
    }
    assert_eq!(Arc::strong_count(&mem), 1, "refused buffers keep nothing");
}

#[test]
fn permissions_are_not_tracked_by_plain_guest_memory() {
    // `GuestMemoryMmap` ignores `Permissions` in `get_slices` (only IOMMU-translated memory
    // checks them), so a read-only region cannot be refused here: VDUSE maps read-only IOTLB
    // entries MAP_PRIVATE, where a stray device write reaches neither the driver nor a fault.
    // What the buffers do enforce is the direction of every copy.
    let mut b = IoBuffers::from_segments(memory(), segments(), Direction::DeviceReads).unwrap();
    let err = b.copy_from_slice(0, &[1, 2, 3]).unwrap_err();
    assert_eq!(err, BufferError::WrongDirection(Direction::DeviceReads));
    assert!(b.fill_zeroes(0, 1).is_err());
    let b = IoBuffers::from_segments(memory(), segments(), Direction::DeviceWrites).unwrap();
    assert!(b.copy_to_slice(0, &mut [0; 3]).is_err());
}

#[test]
fn limits_host_ranges() {
    let mem = memory();
    let one_each = (0..MAX_SEGMENTS as u64).map(|i| (GuestAddress(i * 16), 8));
    let b = IoBuffers::from_segments(mem.clone(), one_each, Direction::DeviceReads).unwrap();
    assert_eq!(b.iovecs().len(), MAX_SEGMENTS);
    let one_more = (0..=MAX_SEGMENTS as u64).map(|i| (GuestAddress(i * 16), 8));
    let err = IoBuffers::from_segments(mem.clone(), one_more, Direction::DeviceReads);
    assert_eq!(err.unwrap_err(), BufferError::TooManySegments);
    // A segment across two regions counts twice.
    let mut segs: Vec<_> = (1..MAX_SEGMENTS as u64)
        .map(|i| (GuestAddress(i * 16), 8))
        .collect();
    segs.push((GuestAddress(0x1_0000 - 4), 8));
    let err = IoBuffers::from_segments(mem, segs, Direction::DeviceReads);
    assert_eq!(err.unwrap_err(), BufferError::TooManySegments);
}

#[test]
fn copies_in_at_offsets_across_segments() {
    let mem = memory();
    let mut b = IoBuffers::from_segments(mem.clone(), segments(), Direction::DeviceWrites).unwrap();
    let data = pattern(3150);
    // Three overlapping copies with the same data at its own offsets end up as one.
    b.copy_from_slice(0, &data[..90]).unwrap();
    b.copy_from_slice(90, &data[90..3110]).unwrap(); // from segment 0 into segment 2
    b.copy_from_slice(3110, &data[3110..]).unwrap();
    let mut seen = Vec::new();
    for (addr, len) in segments() {
        let mut part = vec![0u8; len];
        mem.read_slice(&mut part, addr).unwrap();
        seen.extend(part);
    }
    assert_eq!(seen, data);
    // Nothing outside the segments was touched.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0xff)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x164)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3_0010 + 50)).unwrap(), 0);
    // Zeroes into the middle, across the region boundary and into segment 2.
    b.fill_zeroes(50, 3090).unwrap();
    let mut expect = data.clone();
    expect[50..3140].fill(0);
    let mut seen = Vec::new();
    for (addr, len) in segments() {
        let mut part = vec![0u8; len];
        mem.read_slice(&mut part, addr).unwrap();
        seen.extend(part);
    }
    assert_eq!(seen, expect);
}

#[test]
fn copies_out_at_offsets_across_segments() {
    let mem = memory();
    let data = pattern(3150);
    let mut pos = 0;
    for (addr, len) in segments() {
        mem.write_slice(&data[pos..pos + len], addr).unwrap();
        pos += len;
    }
    let b = IoBuffers::from_segments(mem, segments(), Direction::DeviceReads).unwrap();
    for (offset, len) in [(0, 3150), (0, 1), (99, 2), (1099, 2), (3099, 51), (3149, 1)] {
        let mut out = vec![0u8; len];
        b.copy_to_slice(offset, &mut out).unwrap();
        assert_eq!(
            out,
            &data[offset..offset + len],
            "offset {offset} len {len}"
        );
    }
}

#[test]
fn accesses_past_the_end_fail_without_panicking() {
    let mem = memory();
    let mut w = IoBuffers::from_segments(mem.clone(), segments(), Direction::DeviceWrites).unwrap();
    let r = IoBuffers::from_segments(mem.clone(), segments(), Direction::DeviceReads).unwrap();
    let big = vec![9u8; 3151];
    let oob = |offset, len| BufferError::OutOfBounds {
        offset,
        len,
        total: 3150,
    };
    assert_eq!(w.copy_from_slice(0, &big), Err(oob(0, 3151)));
    assert_eq!(w.copy_from_slice(3150, &big[..1]), Err(oob(3150, 1)));
    assert_eq!(
        w.copy_from_slice(usize::MAX, &big[..2]),
        Err(oob(usize::MAX, 2))
    );
    assert_eq!(w.fill_zeroes(1, 3150), Err(oob(1, 3150)));
    assert_eq!(r.copy_to_slice(3000, &mut [0; 151]), Err(oob(3000, 151)));
    // Refused copies wrote nothing.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100)).unwrap(), 0);
    // Empty accesses at the end are fine.
    w.copy_from_slice(3150, &[]).unwrap();
    r.copy_to_slice(3150, &mut []).unwrap();
    // Empty buffers hold no byte.
    let mut empty = IoBuffers::new();
    assert!(empty.is_empty() && empty.memory().is_none() && empty.iovecs().is_empty());
    empty.copy_from_slice(0, &[]).unwrap();
    assert!(empty.copy_from_slice(0, &[1]).is_err());
    assert!(empty.copy_to_slice(0, &mut [0]).is_err());
}

#[test]
fn set_reuses_and_clear_releases() {
    let mem = memory();
    let mut b = IoBuffers::with_capacity(4);
    b.set(mem.clone(), segments(), Direction::DeviceWrites)
        .unwrap();
    let iovecs_at = b.iovecs().as_ptr();
    b.set(
        mem.clone(),
        [(GuestAddress(0x200), 512)],
        Direction::DeviceReads,
    )
    .unwrap();
    assert_eq!((b.len(), b.direction()), (512, Direction::DeviceReads));
    assert_eq!(b.iovecs().as_ptr(), iovecs_at, "no reallocation");
    // A refused set leaves the buffers empty, not half-filled.
    let bad = [(GuestAddress(0x200), 512), (GuestAddress(0x2_0000), 1)];
    assert!(b.set(mem.clone(), bad, Direction::DeviceWrites).is_err());
    assert!(b.is_empty() && b.memory().is_none() && b.iovecs().is_empty());
    assert_eq!(Arc::strong_count(&mem), 1);
    b.set(mem.clone(), segments(), Direction::DeviceWrites)
        .unwrap();
    b.clear();
    assert!(b.is_empty() && b.memory().is_none());
    assert_eq!(Arc::strong_count(&mem), 1);
}
