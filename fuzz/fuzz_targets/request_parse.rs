//! Fuzz the request path: the input *is* the driver's memory (descriptor table, avail ring,
//! buffers, indirect tables), and a real `QueueWorker` processes the queue over a RAM disk.
//!
//! Input layout: byte 0 selects the queue size (bits 0-2), EVENT_IDX (bit 3) and a read-only
//! disk (bit 4); the remaining bytes are copied to guest address 0. Guest memory is two
//! adjacent regions (0..0x8000, 0x8000..0x10000, so buffers can straddle them) and a third
//! one after a hole (0x20000..0x21000). The descriptor table is at 0, the avail ring at
//! 0x100, the used ring at 0x200; buffers go anywhere.
//!
//! Checked: no panic, no hang; the device writes nothing but the used ring and buffers of
//! device-writable descriptors; a read-only disk stays untouched; used ids are in range.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use virtiod_backend::{Backend, MemBackend};
use virtiod_blk::{BlkConfig, QueueWorker, Stats};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)];
const IMAGE_LEN: usize = 0x1_0000;
const MAX_QUEUE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const DISK_SIZE: u64 = 64 << 10;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
}

fn read_desc(mem: &Mem, table: u64, index: u64) -> Option<RawDesc> {
    let at = table.checked_add(16 * index)?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
    Some(RawDesc {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
        flags: u16::from_le_bytes(raw[12..14].try_into().unwrap()),
    })
}

/// Where the device may write (device-writable buffers of the main table and of the indirect
/// tables it points to, and the used ring), and where descriptors live. `None` when a
/// writable range overlaps descriptors: a request could then rewrite a later chain and the
/// allowed set would no longer be known in advance.
fn writable_ranges(mem: &Mem, size: u16) -> Option<Vec<(u64, u64)>> {
    let used_end = USED + 6 + 8 * u64::from(size);
    let mut writable = vec![(USED, used_end)];
    let mut tables = vec![(DESC_TABLE, DESC_TABLE + 16 * u64::from(size))];
    let add = |d: &RawDesc, writable: &mut Vec<(u64, u64)>| {
        if d.flags & F_WRITE != 0 && d.len > 0 {
            let end = d.addr.saturating_add(u64::from(d.len));
            writable.push((d.addr, end));
        }
    };
    for i in 0..u64::from(size) {
        let Some(d) = read_desc(mem, DESC_TABLE, i) else {
            continue;
        };
        if d.flags & F_INDIRECT != 0 {
            let n = u64::from(d.len / 16).min(0x1100); // no more fit in memory
            tables.push((d.addr, d.addr.saturating_add(16 * n)));
            for j in 0..n {
                if let Some(inner) = read_desc(mem, d.addr, j) {
                    add(&inner, &mut writable);
                }
            }
        } else {
            add(&d, &mut writable);
        }
    }
    let overlaps = |a: &(u64, u64), b: &(u64, u64)| a.0 < b.1 && b.0 < a.1;
    if writable
        .iter()
        .any(|w| tables.iter().any(|t| overlaps(w, t)))
    {
        return None;
    }
    Some(writable)
}

/// `FUZZ_DEBUG=1 cargo fuzz run request_parse INPUT` prints the used ring.
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, image)) = data.split_first() else {
        return;
    };
    let size = [1u16, 2, 4, 8, 16][usize::from(options & 7) % 5];
    let event_idx = options & 8 != 0;
    let read_only = options & 16 != 0;

    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let mem = Arc::new(Mem::from_ranges(&ranges).unwrap());
    let image = &image[..image.len().min(IMAGE_LEN)];
    mem.write_slice(image, GuestAddress(0)).unwrap();

    let mut queue = Queue::new(MAX_QUEUE).unwrap();
    queue.set_size(size);
    queue.set_ready(true);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(event_idx);
    assert!(queue.is_valid(mem.as_ref()));

    let backend = MemBackend::new(DISK_SIZE, read_only);
    let cfg = Arc::new(BlkConfig::new(&backend.info(), 1, MAX_QUEUE, "fuzz-serial"));
    let stats = Arc::new(Stats::new(1));
    let mut worker = QueueWorker::new(cfg, &backend, stats, 0).unwrap();

    let mut before = vec![0u8; IMAGE_LEN];
    mem.read_slice(&mut before, GuestAddress(0)).unwrap();
    let allowed = writable_ranges(&mem, size);

    // Twice: the second pass must find nothing new (or fail the same way).
    for _ in 0..2 {
        if worker.process_queue(&mut queue, &mem).is_err() {
            break;
        }
    }
    let _ = worker.drain(&mut queue, mem.as_ref());
    assert_eq!(worker.in_flight(), 0);

    let mut after = vec![0u8; IMAGE_LEN];
    mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    if let Some(allowed) = &allowed {
        for (addr, (b, a)) in before.iter().zip(&after).enumerate() {
            let addr = addr as u64;
            if b != a {
                assert!(
                    allowed.iter().any(|&(s, e)| s <= addr && addr < e),
                    "device wrote {a:#x} at {addr:#x}, outside every writable buffer"
                );
            }
        }
    }
    if debug() {
        eprintln!(
            "size {size} event_idx {event_idx} read_only {read_only}: used {:?}",
            (0..queue.next_used().min(size))
                .map(|i| {
                    let at = USED as usize + 4 + 8 * usize::from(i);
                    let word = |o: usize| u32::from_le_bytes(after[o..o + 4].try_into().unwrap());
                    (word(at), word(at + 4))
                })
                .collect::<Vec<_>>()
        );
    }
    // The used ring, unless a data buffer overlaps it (then reads may overwrite it).
    let used_ring = (USED, USED + 6 + 8 * u64::from(size));
    let used_intact = allowed.as_ref().is_some_and(|w| {
        w[1..]
            .iter()
            .all(|&(s, e)| e <= used_ring.0 || used_ring.1 <= s)
    });
    let next_used = queue.next_used();
    if used_intact && next_used != 0 {
        let used_idx = u16::from_le_bytes([after[USED as usize + 2], after[USED as usize + 3]]);
        assert_eq!(used_idx, next_used, "used idx published");
        for i in 0..next_used.min(size) {
            let at = USED as usize + 4 + 8 * usize::from(i);
            let id = u32::from_le_bytes(after[at..at + 4].try_into().unwrap());
            assert!(id < u32::from(size), "used id {id} out of range");
        }
    }
    if read_only {
        assert!(
            backend.snapshot().iter().all(|&b| b == 0),
            "read-only disk written"
        );
    }
});
