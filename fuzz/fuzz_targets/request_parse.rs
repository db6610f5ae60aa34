//! Fuzz the request path: the input *is* the driver's memory (descriptor table, avail ring,
//! buffers, indirect tables), and the core's queue service with the real virtio-blk handler
//! processes the queue over a RAM disk.
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
use virtiod_blk::{BlkConfig, BlkQueue, Stats};
use virtiod_core::{Event, QueueService};
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

/// The driver's memory as it was before the run: `low` is 0..0x10000, `high` the last region.
struct Snapshot {
    low: Vec<u8>,
    high: Vec<u8>,
}

impl Snapshot {
    fn take(mem: &Mem) -> Self {
        let (high_addr, high_len) = REGIONS[2];
        let mut low = vec![0u8; IMAGE_LEN];
        let mut high = vec![0u8; high_len];
        mem.read_slice(&mut low, GuestAddress(0)).unwrap();
        mem.read_slice(&mut high, GuestAddress(high_addr)).unwrap();
        Self { low, high }
    }

    fn bytes(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let end = addr.checked_add(len)?;
        let high = REGIONS[2].0;
        if end <= IMAGE_LEN as u64 {
            self.low.get(addr as usize..end as usize)
        } else if addr >= high {
            self.high.get((addr - high) as usize..(end - high) as usize)
        } else {
            None
        }
    }

    fn desc(&self, table: u64, index: u64) -> Option<RawDesc> {
        let raw = self.bytes(table.checked_add(16 * index)?, 16)?;
        Some(RawDesc {
            addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(raw[12..14].try_into().unwrap()),
        })
    }
}

/// Where the device may write (device-writable buffers of the main table and of the indirect
/// tables it points to, and the used ring). `None` when a writable range overlaps
/// descriptors: a request could then rewrite a later chain and the allowed set would no
/// longer be known in advance.
fn writable_ranges(snap: &Snapshot, size: u16) -> Option<Vec<(u64, u64)>> {
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
        let Some(d) = snap.desc(DESC_TABLE, i) else {
            continue;
        };
        if d.flags & F_INDIRECT == 0 {
            add(&d, &mut writable);
            continue;
        }
        let table = (d.addr, d.addr.saturating_add(u64::from(d.len / 16) * 16));
        if tables.contains(&table) {
            continue;
        }
        tables.push(table);
        for j in 0..u64::from(d.len / 16) {
            let Some(inner) = snap.desc(d.addr, j) else {
                break; // the rest is not in memory either
            };
            add(&inner, &mut writable);
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

/// Panic if a byte of `before` (at guest address `base`) changed outside `allowed`. Compares
/// in chunks: per-byte comparisons are traced by the fuzzer and slow it down tenfold.
fn check_writes(base: u64, before: &[u8], after: &[u8], allowed: &[(u64, u64)]) {
    const CHUNK: usize = 256;
    let chunks = before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate();
    for (n, (b, a)) in chunks.filter(|(_, (b, a))| b != a) {
        for (i, (b, a)) in b.iter().zip(a.iter()).enumerate() {
            let addr = base + (n * CHUNK + i) as u64;
            if b != a && !allowed.iter().any(|&(s, e)| s <= addr && addr < e) {
                panic!(
                    "device wrote {a:#x} at {addr:#x} (was {b:#x}), outside every writable buffer"
                );
            }
        }
    }
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

    let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
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
    let handler = BlkQueue::new(cfg, &backend, stats, 0).unwrap();
    let mut svc =
        QueueService::new(0, Box::new(handler), MAX_QUEUE, std::time::Duration::ZERO).unwrap();
    *svc.queue_mut() = queue;

    let before = Snapshot::take(&mem);
    let allowed = writable_ranges(&before, size);

    // Twice: the second pass must find nothing new (or fail the same way).
    for _ in 0..2 {
        let mut m = mem.clone();
        if svc
            .serve(Event::Kick, &mut m, &mut || None, &mut || {})
            .is_err()
        {
            break;
        }
    }
    let _ = svc.drain(mem.as_ref());
    assert_eq!(svc.in_flight(), 0);
    let queue = svc.queue();

    let after = Snapshot::take(&mem);
    if let Some(allowed) = &allowed {
        let regions = [
            (0, &before.low, &after.low),
            (REGIONS[2].0, &before.high, &after.high),
        ];
        for (base, before, after) in regions {
            check_writes(base, before, after, allowed);
        }
    }
    let after = after.low;
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
