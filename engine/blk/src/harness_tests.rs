//! Shared test harness: a real [`BlkQueue`] served by the core's [`QueueService`] over a
//! [`MemBackend`], driven through a queue
//! laid out by `virtio_queue::mock::MockSplitQueue` in plain guest memory.
//!
//! The harness plays the driver: it allocates buffers in an arena (with canary gaps between
//! them), writes descriptors and avail ring entries, runs the worker and reads the used ring.
//! After every run it checks that the device wrote nothing outside the buffers marked
//! device-writable and the used ring. Included by `request_tests.rs` and `worker_tests.rs`.
#![allow(dead_code)]

use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use virtiod_backend::{Backend, MemBackend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use virtiod_core::{Chain, Event, QueueService, ServiceError};

use crate::request::{self, Request, RequestError, RequestType};
use crate::request::{T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
use crate::{BlkConfig, BlkQueue, Stats};
use crate::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

pub type Mem = GuestMemoryMmap<()>;

/// Size of the driver's memory.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Queue size.
pub const QSIZE: u16 = 16;
/// Disk size: 2048 sectors.
pub const DISK_SIZE: u64 = 1 << 20;
pub const DISK_SECTORS: u64 = DISK_SIZE / 512;
/// Where the used ring goes (the descriptor table is at 0, the avail ring after it).
pub const USED_RING: u64 = 0x1000;
/// Buffers (and indirect tables) are allocated in `ARENA..ARENA_END`.
pub const ARENA: u64 = 0x10_0000;
pub const ARENA_END: u64 = 0x40_0000;
/// What the arena holds outside buffers.
pub const CANARY: u8 = 0xA5;
/// What a device-writable buffer holds before the device writes it.
pub const FILL: u8 = 0xCC;
/// Gap of canary bytes before each buffer.
const GAP: u64 = 32;
/// The serial given to the device (longer than 20 bytes: the device keeps the first 20).
pub const SERIAL: &str = "virtiod-serial-0123456789";

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const OK: u8 = VIRTIO_BLK_S_OK;
pub const IOERR: u8 = VIRTIO_BLK_S_IOERR;
pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP;

/// One descriptor as the driver writes it (the `next` field is filled in when chaining).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

impl Desc {
    /// A device-readable descriptor.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
        }
    }

    /// A device-writable descriptor.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: F_WRITE,
        }
    }

    /// The last byte (where the status goes if this is the last descriptor).
    pub fn last_byte(&self) -> u64 {
        self.addr + u64::from(self.len) - 1
    }
}

/// The 16-byte request header.
pub fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// One DISCARD / WRITE_ZEROES segment.
pub fn range(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend_from_slice(&num_sectors.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r
}

/// `len` bytes of a recognisable pattern seeded by `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8 ^ (i >> 8) as u8))
        .collect()
}

pub struct Harness {
    pub mem: Arc<Mem>,
    /// The core's service of the queue, with the blk handler under test.
    pub svc: QueueService,
    pub backend: MemBackend,
    pub cfg: Arc<BlkConfig>,
    pub stats: Arc<Stats>,
    pub desc_table: u64,
    pub avail: u64,
    pub used: u64,
    /// Next free slot of the descriptor table.
    next_desc: u16,
    /// The driver's avail index.
    avail_idx: u16,
    /// Used ring entries already returned by [`Self::take_used`].
    used_seen: u16,
    /// Bump allocator in the arena.
    next_buf: u64,
    /// Expected contents of `0..ARENA_END`.
    shadow: Vec<u8>,
    /// Ranges the device may write (device-writable buffers, the used ring).
    writable: Vec<(u64, u64)>,
}

impl Harness {
    /// A harness over a read-write disk.
    pub fn new() -> Self {
        Self::with_disk(false)
    }

    /// A harness over a disk that is read-only if `read_only`.
    pub fn with_disk(read_only: bool) -> Self {
        Self::with_options(read_only, None)
    }

    /// A harness whose queue counts its requests against `qos` (if given).
    pub fn with_options(read_only: bool, qos: Option<Arc<crate::Qos>>) -> Self {
        let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
        let mock = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), QSIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        let (desc_table, avail) = (mock.desc_table_addr().0, mock.avail_addr().0);
        drop(mock);
        // virtio-queue 0.18's mock places the used ring `size` *bytes* after the avail ring's
        // entries instead of `2 * size`, so the two rings overlap: move the used ring away.
        let used = USED_RING;
        queue.set_used_ring_address(Some(used as u32), Some(0));
        let backend = MemBackend::new(DISK_SIZE, read_only);
        let cfg = Arc::new(BlkConfig::new(&backend.info(), 1, QSIZE, SERIAL));
        let stats = Arc::new(Stats::new(1));
        let mut handler = BlkQueue::new(cfg.clone(), &backend, stats.clone(), 0).unwrap();
        if let Some(qos) = qos {
            handler = handler.with_qos(qos);
        }
        let mut svc =
            QueueService::new(0, Box::new(handler), QSIZE, std::time::Duration::ZERO).unwrap();
        *svc.queue_mut() = queue;
        let mut shadow = vec![0u8; ARENA_END as usize];
        shadow[ARENA as usize..].fill(CANARY);
        mem.write_slice(&shadow[ARENA as usize..], GuestAddress(ARENA))
            .unwrap();
        let used_end = used + 6 + 8 * u64::from(QSIZE);
        Self {
            mem,
            svc,
            backend,
            cfg,
            stats,
            desc_table,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf: ARENA,
            shadow,
            writable: vec![(used, used_end)],
        }
    }

    /// Write `bytes` at `addr` as the driver (kept in the expected image).
    pub fn put(&mut self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        let start = addr as usize;
        if let Some(dst) = self.shadow.get_mut(start..start + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Read `len` bytes at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Contents of the buffer of `desc`.
    pub fn contents(&self, desc: Desc) -> Vec<u8> {
        self.get(desc.addr, desc.len as usize)
    }

    /// Reserve `len` bytes of the arena, after a gap of canary bytes.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = (self.next_buf + GAP).next_multiple_of(16);
        self.next_buf = addr + len;
        assert!(self.next_buf + GAP <= ARENA_END, "test arena exhausted");
        addr
    }

    /// A device-readable buffer holding `bytes`.
    pub fn readable(&mut self, bytes: &[u8]) -> Desc {
        let addr = self.alloc(bytes.len() as u64);
        self.put(addr, bytes);
        Desc::r(addr, bytes.len() as u32)
    }

    /// A device-writable buffer of `len` bytes, filled with [`FILL`].
    pub fn writable(&mut self, len: u32) -> Desc {
        let addr = self.alloc(u64::from(len));
        self.put(addr, &vec![FILL; len as usize]);
        self.allow_write(addr, u64::from(len));
        Desc::w(addr, len)
    }

    /// Let the device write `addr..addr+len` (a writable descriptor outside the arena).
    pub fn allow_write(&mut self, addr: u64, len: u64) {
        self.writable.push((addr, addr + len));
    }

    /// A one-byte status buffer.
    pub fn status_buf(&mut self) -> Desc {
        self.writable(1)
    }

    /// Write descriptor `index` of the table at `table`.
    pub fn write_desc(&mut self, table: u64, index: u16, desc: Desc, next: u16) {
        let mut raw = desc.addr.to_le_bytes().to_vec();
        raw.extend_from_slice(&desc.len.to_le_bytes());
        raw.extend_from_slice(&desc.flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(index), &raw);
    }

    /// An indirect table chaining `descs` (entry i → i+1), and the descriptor pointing to it.
    pub fn indirect(&mut self, descs: &[Desc]) -> Desc {
        let table = self.alloc(16 * descs.len() as u64);
        self.write_table(table, descs);
        Desc {
            addr: table,
            len: 16 * descs.len() as u32,
            flags: F_INDIRECT,
        }
    }

    /// Write `descs` as a chain starting at entry 0 of the table at `table`.
    pub fn write_table(&mut self, table: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { d.flags } else { d.flags | F_NEXT };
            let next = if last { 0 } else { i as u16 + 1 };
            self.write_desc(table, i as u16, Desc { flags, ..*d }, next);
        }
    }

    /// Write `descs` into free slots of the descriptor table, chained in order, and make the
    /// chain available. Returns the head index.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        assert!(descs.len() <= usize::from(QSIZE));
        let indexes: Vec<u16> = (0..descs.len() as u16)
            .map(|i| (self.next_desc + i) % QSIZE)
            .collect();
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { d.flags } else { d.flags | F_NEXT };
            let next = if last { 0 } else { indexes[i + 1] };
            self.write_desc(self.desc_table, indexes[i], Desc { flags, ..*d }, next);
        }
        self.push_avail(indexes[0]);
        indexes[0]
    }

    /// Put `head` on the avail ring.
    pub fn push_avail(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.put(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Write the avail index (as a broken driver may, without adding entries).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.put(self.avail + 2, &idx.to_le_bytes());
    }

    /// Write `used_event` (the trailing field of the avail ring) and turn EVENT_IDX on.
    pub fn set_used_event(&mut self, used_event: u16) {
        self.svc.queue_mut().set_event_idx(true);
        self.put(
            self.avail + 4 + 2 * u64::from(QSIZE),
            &used_event.to_le_bytes(),
        );
    }

    /// Start both rings at index `idx` (to test index wrap-around).
    pub fn start_at(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.used_seen = idx;
        self.set_avail_idx(idx);
        self.put(self.used + 2, &idx.to_le_bytes());
        self.svc.queue_mut().set_next_avail(idx);
        self.svc.queue_mut().set_next_used(idx);
    }

    /// `avail_event`, written by the device when EVENT_IDX is on.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(QSIZE);
        u16::from_le_bytes(self.get(at, 2).try_into().unwrap())
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        u16::from_le_bytes(self.get(self.used, 2).try_into().unwrap())
    }

    /// Parse the next available chain without consuming it.
    pub fn parse_next(&mut self) -> (Result<RequestType, RequestError>, Request) {
        let next_avail = self.svc.queue_mut().next_avail();
        let popped = self
            .svc
            .queue_mut()
            .pop_descriptor_chain(self.mem.as_ref())
            .expect("a chain on the avail ring");
        let mut chain = Chain::new();
        chain.collect(popped);
        let mut req = Request::default();
        let parsed = request::parse(&chain, self.mem.as_ref(), &self.cfg, &mut req);
        self.svc.queue_mut().set_next_avail(next_avail);
        (parsed, req)
    }

    /// Serve the queue as after a kick; returns whether the driver was notified.
    pub fn process(&mut self) -> Result<bool, ServiceError> {
        let mut mem = self.mem.clone();
        let mut notified = false;
        self.svc
            .serve(Event::Kick, &mut mem, &mut || None, &mut || notified = true)
            .map(|()| notified)
    }

    /// Let the service process the queue; returns whether it notified the driver.
    /// Checks that nothing outside the writable ranges changed.
    pub fn run(&mut self) -> bool {
        let notify = self.process().expect("serve");
        assert_eq!(self.svc.in_flight(), 0, "the mem backend is synchronous");
        self.check_untouched();
        notify
    }

    /// Panic if a byte outside the writable ranges differs from what the driver wrote.
    pub fn check_untouched(&self) {
        const CHUNK: usize = 4096;
        let image = self.get(0, ARENA_END as usize);
        let chunks = image.chunks(CHUNK).zip(self.shadow.chunks(CHUNK));
        for (base, (got, want)) in chunks.enumerate().filter(|(_, (g, w))| g != w) {
            for (i, (got, want)) in got.iter().zip(want).enumerate() {
                let addr = (base * CHUNK + i) as u64;
                if got != want && !self.writable.iter().any(|&(s, e)| s <= addr && addr < e) {
                    panic!("device wrote {got:#x} at {addr:#x} (expected {want:#x}): not a writable buffer");
                }
            }
        }
    }

    /// The used ring's index as the device wrote it.
    pub fn used_idx(&self) -> u16 {
        u16::from_le_bytes(self.get(self.used + 2, 2).try_into().unwrap())
    }

    /// Used ring entries `(id, len)` added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        while self.used_seen != self.used_idx() {
            let slot = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let raw = self.get(slot, 8);
            out.push((
                u32::from_le_bytes(raw[0..4].try_into().unwrap()),
                u32::from_le_bytes(raw[4..8].try_into().unwrap()),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Submit `descs`, run the worker, and return the used length of the single completion
    /// (checking its id is the chain's head).
    pub fn exec(&mut self, descs: &[Desc]) -> u32 {
        let head = self.add_chain(descs);
        self.run();
        let used = self.take_used();
        assert_eq!(used.len(), 1, "one used entry per request: {used:?}");
        assert_eq!(used[0].0, u32::from(head), "used id is the head index");
        used[0].1
    }

    /// The status byte of a chain ending in `status`.
    pub fn status(&self, status: Desc) -> u8 {
        self.get(status.last_byte(), 1)[0]
    }

    /// Submit `descs` and check the status (in the last descriptor) and used length.
    pub fn expect(&mut self, descs: &[Desc], status: u8, used_len: u32) {
        let len = self.exec(descs);
        assert_eq!(len, used_len, "used len");
        assert_eq!(self.status(*descs.last().unwrap()), status, "status byte");
    }

    /// A chain that writes `data` at `sector`: header, data, status.
    pub fn out_chain(&mut self, sector: u64, data: &[u8]) -> Vec<Desc> {
        let h = self.readable(&header(T_OUT, sector));
        let d = self.readable(data);
        vec![h, d, self.status_buf()]
    }

    /// A chain that reads `len` bytes at `sector`: header, data, status.
    pub fn in_chain(&mut self, sector: u64, len: u32) -> Vec<Desc> {
        let h = self.readable(&header(T_IN, sector));
        let d = self.writable(len);
        vec![h, d, self.status_buf()]
    }

    /// A header-only chain of type `kind` (FLUSH, unknown types).
    pub fn bare_chain(&mut self, kind: u32, sector: u64) -> Vec<Desc> {
        let h = self.readable(&header(kind, sector));
        vec![h, self.status_buf()]
    }

    /// A DISCARD / WRITE_ZEROES chain with one segment.
    pub fn range_chain(&mut self, kind: u32, sector: u64, count: u32, flags: u32) -> Vec<Desc> {
        let h = self.readable(&header(kind, sector));
        let r = self.readable(&range(sector, count, flags));
        vec![h, r, self.status_buf()]
    }

    /// Write `data` at `sector` through the queue, checking it succeeds.
    pub fn write(&mut self, sector: u64, data: &[u8]) {
        let chain = self.out_chain(sector, data);
        self.expect(&chain, OK, 1);
    }

    /// Read `len` bytes at `sector` through the queue, checking it succeeds.
    pub fn read(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let chain = self.in_chain(sector, len);
        self.expect(&chain, OK, len + 1);
        self.contents(chain[1])
    }

    /// The disk's bytes `offset..offset+len`.
    pub fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        self.backend.snapshot()[offset as usize..offset as usize + len].to_vec()
    }

    /// Fill the disk with a pattern (through the queue) and return its contents.
    pub fn fill_disk(&mut self) -> Vec<u8> {
        let chunk = 64 * 1024;
        for (i, start) in (0..DISK_SIZE).step_by(chunk).enumerate() {
            self.write(start / 512, &pattern(i as u8 + 1, chunk));
        }
        self.backend.snapshot()
    }

    /// The queue still works: a write and a read-back of the same sectors succeed.
    /// On a read-only disk only the read is done.
    pub fn assert_recovers(&mut self) {
        if self.cfg.read_only {
            let disk = self.disk(100 * 512, 1024);
            assert_eq!(self.read(100, 1024), disk);
            return;
        }
        let data = pattern(0x5a, 1024);
        self.write(100, &data);
        assert_eq!(self.read(100, 1024), data);
        assert_eq!(self.disk(100 * 512, 1024), data);
    }

    /// Submit a refused chain: check `parse` reports `err`, then that the worker answers
    /// with `status`/`used_len`, leaves the disk alone, and the queue keeps working.
    pub fn refuse(&mut self, descs: &[Desc], err: RequestError, status: u8, used_len: u32) {
        self.add_chain(descs);
        let (parsed, req) = self.parse_next();
        assert_eq!(parsed, Err(err));
        assert_eq!(req.status.is_some(), used_len > 0, "status byte found");
        let disk = self.backend.snapshot();
        self.run();
        let used = self.take_used();
        assert_eq!(used.len(), 1, "one used entry: {used:?}");
        assert_eq!(used[0].1, used_len, "used len");
        if let Some(addr) = req.status {
            assert_eq!(self.get(addr.0, 1)[0], status, "status byte");
        }
        assert!(
            self.backend.snapshot() == disk,
            "a refused request changed the disk"
        );
        self.assert_data_untouched(descs, used_len == 0);
        self.assert_recovers();
    }

    /// No data buffer of a refused chain was written (nor the status byte, if `with_status`).
    pub fn assert_data_untouched(&self, descs: &[Desc], with_status: bool) {
        for (i, d) in descs.iter().enumerate() {
            if d.flags & F_WRITE == 0 || d.addr < ARENA || d.addr >= ARENA_END {
                continue;
            }
            let len = if i + 1 == descs.len() && !with_status {
                d.len.saturating_sub(1)
            } else {
                d.len
            };
            assert!(
                self.get(d.addr, len as usize).iter().all(|&b| b == FILL),
                "writable buffer {i} was written"
            );
        }
    }
}

/// All the request type constants, for tests that loop over them.
pub const KNOWN_TYPES: [u32; 6] = [T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES];
