//! The in-flight record of split virtqueues: which requests a device has taken off the avail
//! ring and not yet completed, in memory that outlives the process, so that a restarted
//! daemon executes them again. One layout for every transport:
//!
//! - vhost-user (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the backend allocates a shared
//!   memory file on `GET_INFLIGHT_FD`; the frontend (QEMU) keeps it for the lifetime of the
//!   device and hands it to every backend process that connects later (`SET_INFLIGHT_FD`);
//! - VDUSE: the kernel keeps no such state, so the transport keeps the same blocks in a
//!   MAP_SHARED file of its own, after a header ([`InflightRegion::within`]).
//!
//! Layout (little endian, the one libvhost-user and DPDK use, so backends can replace each
//! other): per queue, a block of `16 + 16 × queue_size` bytes rounded up to 64:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc_num × { u8 inflight | u8 pad[5] | u16 next | u64 counter }
//! ```
//!
//! Write order (every store atomic, Release):
//! - pop: `desc[head].counter = ++counter`, then `desc[head].inflight = 1`;
//! - complete: `last_batch_head = head`, the used entry and the ring's used index (by the
//!   queue), then `desc[head].inflight = 0`, then `used_idx`.
//!
//! Recovery when the ring starts: used entries published after the region's `used_idx`
//! (killed between the ring update and the region update) are complete, so their heads are
//! cleared; every head still flagged is in flight. The device's next avail index is then
//! `used_idx + in-flight count` (a request popped but not yet flagged is simply popped again),
//! and the flagged heads are executed again in `counter` order.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory, MmapRegion, VolatileMemory, VolatileSlice,
};

const ALIGN: usize = 64;
const HEADER: usize = 16;
const DESC: usize = 16;
/// `version` of a region that has been initialised (0: fresh from `GET_INFLIGHT_FD`).
const VERSION: u16 = 1;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;

/// Bytes of one queue's block.
pub fn queue_block_len(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Memory that holds in-flight blocks: a shared mapping its owner (the transport) keeps
/// alive as long as any block of it is in use.
pub trait RecordMemory: Send + Sync {
    /// The mapping.
    fn mmap(&self) -> &MmapRegion<()>;
}

impl RecordMemory for MmapRegion<()> {
    fn mmap(&self) -> &MmapRegion<()> {
        self
    }
}

/// The blocks of every queue of a device, mapped by this process.
pub struct InflightRegion {
    region: Arc<dyn RecordMemory>,
    base: usize,
    num_queues: u16,
    queue_size: u16,
}

/// A new zero-filled shared memory file of `len` bytes, not linked anywhere.
fn anonymous_file(len: u64) -> io::Result<File> {
    let open = |dir: &std::path::Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(dir)
    };
    let file = open(std::path::Path::new("/dev/shm")).or_else(|_| open(&std::env::temp_dir()))?;
    file.set_len(len)?;
    Ok(file)
}

impl InflightRegion {
    /// A fresh region for `num_queues` queues of `queue_size` descriptors (the answer to
    /// `GET_INFLIGHT_FD`); the returned file is what the frontend keeps.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Self, File, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "in-flight region for zero queues or descriptors",
            ));
        }
        let len = usize::from(num_queues) * queue_block_len(queue_size);
        let file = anonymous_file(len as u64)?;
        let theirs = file.try_clone()?;
        let region =
            MmapRegion::from_file(FileOffset::new(file, 0), len).map_err(io::Error::other)?;
        Ok((
            Self {
                region: Arc::new(region),
                base: 0,
                num_queues,
                queue_size,
            },
            theirs,
            len as u64,
        ))
    }

    /// Map the region a frontend hands over with `SET_INFLIGHT_FD`.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let need = usize::from(num_queues) * queue_block_len(queue_size);
        if num_queues == 0 || queue_size == 0 || (size as usize) < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "in-flight region of {size} bytes cannot hold {num_queues} queues of {queue_size}"
                ),
            ));
        }
        let file_len = file.metadata()?.len();
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("in-flight region [{offset}, +{size}) is outside its {file_len}-byte file"),
            ));
        }
        let region =
            MmapRegion::from_file(FileOffset::new(file, offset), need).map_err(io::Error::other)?;
        Ok(Self {
            region: Arc::new(region),
            base: 0,
            num_queues,
            queue_size,
        })
    }

    /// Bytes the blocks of `num_queues` queues of `queue_size` descriptors take.
    pub fn len_for(num_queues: u16, queue_size: u16) -> usize {
        usize::from(num_queues) * queue_block_len(queue_size)
    }

    /// The blocks at byte `base` (a multiple of 64) of a region mapped by the caller (a
    /// file of the transport's own that starts with a header).
    pub fn within(
        region: Arc<dyn RecordMemory>,
        base: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let end = base.checked_add(Self::len_for(num_queues, queue_size));
        if num_queues == 0
            || queue_size == 0
            || !base.is_multiple_of(ALIGN)
            || end.is_none_or(|e| e > region.mmap().len())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{num_queues} in-flight blocks of {queue_size} descriptors do not fit at {base} in {} bytes", region.mmap().len()),
            ));
        }
        Ok(Self {
            region,
            base,
            num_queues,
            queue_size,
        })
    }

    /// The block of queue `index`, if the region has one.
    pub fn queue(&self, index: usize) -> Option<InflightQueue> {
        (index < usize::from(self.num_queues)).then(|| InflightQueue {
            region: self.region.clone(),
            base: self.base + index * queue_block_len(self.queue_size),
            size: self.queue_size,
            counter: 0,
        })
    }
}

/// One queue's block. The [`crate::QueueService`] records every pop and completion in it.
pub struct InflightQueue {
    region: Arc<dyn RecordMemory>,
    base: usize,
    size: u16,
    counter: u64,
}

/// What [`InflightQueue::recover`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to execute again, oldest first.
    pub heads: Vec<u16>,
    /// Used entries that were published but not yet recorded in the region.
    pub repaired: u16,
    /// Whether the region was fresh (first start with it).
    pub fresh: bool,
}

impl InflightQueue {
    fn slice(&self) -> VolatileSlice<'_, ()> {
        self.region.mmap().as_volatile_slice()
    }

    fn store_u8(&self, off: usize, v: u8) {
        let _ = self.slice().store(v, self.base + off, Ordering::Release);
    }

    fn store_u16(&self, off: usize, v: u16) {
        let _ = self
            .slice()
            .store(v.to_le(), self.base + off, Ordering::Release);
    }

    fn store_u64(&self, off: usize, v: u64) {
        let _ = self
            .slice()
            .store(v.to_le(), self.base + off, Ordering::Release);
    }

    fn load_u8(&self, off: usize) -> u8 {
        self.slice()
            .load(self.base + off, Ordering::Acquire)
            .unwrap_or(0)
    }

    fn load_u16(&self, off: usize) -> u16 {
        u16::from_le(
            self.slice()
                .load(self.base + off, Ordering::Acquire)
                .unwrap_or(0),
        )
    }

    fn load_u64(&self, off: usize) -> u64 {
        u64::from_le(
            self.slice()
                .load(self.base + off, Ordering::Acquire)
                .unwrap_or(0),
        )
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    /// Start the block afresh (the driver started the queue): nothing in flight, the used
    /// index at `used_idx`.
    pub fn initialise(&mut self, used_idx: u16) {
        for head in 0..self.size {
            self.store_u8(Self::desc(head) + DESC_INFLIGHT, 0);
            self.store_u64(Self::desc(head) + DESC_COUNTER, 0);
        }
        self.store_u16(OFF_DESC_NUM, self.size);
        self.store_u16(OFF_LAST_BATCH, 0);
        self.store_u16(OFF_USED_IDX, used_idx);
        self.store_u16(OFF_VERSION, VERSION);
        self.counter = 0;
    }

    /// Heads recorded as in flight now.
    pub fn in_flight(&self) -> Vec<u16> {
        (0..self.size)
            .filter(|&h| self.load_u8(Self::desc(h) + DESC_INFLIGHT) != 0)
            .collect()
    }

    /// Bring the block up to date with the ring when the queue starts, set the queue's next
    /// avail and used indexes, and return the heads that are still in flight (to resubmit).
    /// `mem` holds the rings; the queue's ring addresses and size must be set.
    pub fn recover<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Recovered, virtio_queue::Error> {
        let ring_used = queue.used_idx(mem, Ordering::Acquire)?.0;
        queue.set_next_used(ring_used);
        if self.load_u16(OFF_VERSION) == 0 || self.load_u16(OFF_DESC_NUM) != self.size {
            if self.load_u16(OFF_VERSION) != 0 {
                tracing::warn!(
                    logged = self.load_u16(OFF_DESC_NUM),
                    size = self.size,
                    "in-flight region was written for another queue size: starting it afresh"
                );
            }
            self.initialise(ring_used);
            return Ok(Recovered {
                fresh: true,
                ..Recovered::default()
            });
        }
        if queue.size() != self.size {
            tracing::warn!(
                ring = queue.size(),
                region = self.size,
                "the ring and the in-flight region disagree on the queue size"
            );
        }
        // Used entries the ring has and the region does not: those requests are complete.
        let logged = self.load_u16(OFF_USED_IDX);
        let gap = ring_used.wrapping_sub(logged);
        let mut repaired = 0;
        if gap != 0 {
            if gap <= self.size && queue.size() > 0 {
                for k in 0..gap {
                    let slot = u64::from(logged.wrapping_add(k) % queue.size());
                    let addr = queue
                        .used_ring()
                        .checked_add(4 + 8 * slot)
                        .map(GuestAddress)
                        .ok_or(virtio_queue::Error::AddressOverflow)?;
                    let id = u32::from_le(
                        mem.read_obj::<u32>(addr)
                            .map_err(virtio_queue::Error::GuestMemory)?,
                    );
                    if id < u32::from(self.size) {
                        self.store_u8(Self::desc(id as u16) + DESC_INFLIGHT, 0);
                    }
                }
            } else {
                // More than a queue of difference cannot come from one kill: trust only the
                // head that was being completed.
                let last = self.load_u16(OFF_LAST_BATCH);
                if last < self.size {
                    self.store_u8(Self::desc(last) + DESC_INFLIGHT, 0);
                }
            }
            self.store_u16(OFF_USED_IDX, ring_used);
            repaired = gap;
        }
        let mut flagged: Vec<(u64, u16)> = self
            .in_flight()
            .into_iter()
            .map(|h| (self.load_u64(Self::desc(h) + DESC_COUNTER), h))
            .collect();
        flagged.sort_unstable();
        self.counter = flagged.last().map_or(0, |(c, _)| *c);
        queue.set_next_avail(ring_used.wrapping_add(flagged.len() as u16));
        Ok(Recovered {
            heads: flagged.into_iter().map(|(_, h)| h).collect(),
            repaired,
            fresh: false,
        })
    }
}

impl InflightQueue {
    /// `head` was taken off the avail ring; called before the request starts executing.
    pub fn popped(&mut self, head: u16) {
        if head < self.size {
            self.counter = self.counter.wrapping_add(1);
            self.store_u64(Self::desc(head) + DESC_COUNTER, self.counter);
            self.store_u8(Self::desc(head) + DESC_INFLIGHT, 1);
        }
    }

    /// The used entry for `head` is about to be published.
    pub fn completing(&mut self, head: u16) {
        self.store_u16(OFF_LAST_BATCH, head);
    }

    /// The used entry for `head` was published; the used index is now `next_used`.
    pub fn used(&mut self, head: u16, next_used: u16) {
        if head < self.size {
            self.store_u8(Self::desc(head) + DESC_INFLIGHT, 0);
        }
        self.store_u16(OFF_USED_IDX, next_used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const QS: u16 = 8;
    const DESC_TABLE: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup() -> (GuestMemoryMmap<()>, Queue) {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000usize)]).expect("guest memory");
        let mut q = Queue::new(QS).expect("queue");
        q.set_size(QS);
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .expect("desc");
        q.try_set_avail_ring_address(GuestAddress(AVAIL))
            .expect("avail");
        q.try_set_used_ring_address(GuestAddress(USED))
            .expect("used");
        q.set_ready(true);
        (mem, q)
    }

    /// Publish a used entry for `head` the way a device does (element, then index).
    fn publish_used(mem: &GuestMemoryMmap<()>, idx: u16, head: u16) -> u16 {
        let slot = u64::from(idx % QS);
        mem.write_obj(u32::from(head).to_le(), GuestAddress(USED + 4 + 8 * slot))
            .unwrap();
        mem.write_obj(0u32, GuestAddress(USED + 8 + 8 * slot))
            .unwrap();
        let next = idx.wrapping_add(1);
        mem.write_obj(next.to_le(), GuestAddress(USED + 2)).unwrap();
        next
    }

    #[test]
    fn layout_matches_the_shared_format() {
        assert_eq!(queue_block_len(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_block_len(256), 4160);
        let (region, file, len) = InflightRegion::create(2, QS).unwrap();
        assert_eq!(len, 2 * queue_block_len(QS) as u64);
        assert_eq!(file.metadata().unwrap().len(), len);
        let (mem, mut q) = setup();
        let mut q1 = region.queue(1).unwrap();
        assert!(region.queue(2).is_none());
        assert!(q1.recover(&mut q, &mem).unwrap().fresh);
        q1.popped(3);
        q1.completing(3);
        // Read the bytes back through the frontend's file descriptor.
        let other = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len as usize).unwrap();
        let s = other.as_volatile_slice();
        let base = queue_block_len(QS);
        let version: u16 = s.read_obj(base + 8).unwrap();
        let desc_num: u16 = s.read_obj(base + 10).unwrap();
        let last_batch: u16 = s.read_obj(base + 12).unwrap();
        let flag: u8 = s.read_obj(base + 16 + 16 * 3).unwrap();
        let counter: u64 = s.read_obj(base + 16 + 16 * 3 + 8).unwrap();
        assert_eq!(
            (version, desc_num, last_batch, flag, counter),
            (1, QS, 3, 1, 1)
        );
        let queue0_flag: u8 = s.read_obj(16 + 16 * 3).unwrap();
        assert_eq!(queue0_flag, 0, "queue 0's block is separate");
    }

    #[test]
    fn recovery_resubmits_in_pop_order_and_repairs_the_kill_window() {
        let (region, file, len) = InflightRegion::create(1, QS).unwrap();
        let (mem, mut q) = setup();
        let mut first = region.queue(0).unwrap();
        assert!(first.recover(&mut q, &mem).unwrap().fresh);
        // Pop 5, 2, 7, 1 (in that order); complete 2; then publish 7's used entry and die
        // before the region records it.
        for head in [5u16, 2, 7, 1] {
            first.popped(head);
        }
        first.completing(2);
        let used = publish_used(&mem, 0, 2);
        first.used(2, used);
        first.completing(7);
        let used = publish_used(&mem, used, 7);
        assert_eq!(used, 2);
        drop(first);
        drop(region);

        // A new process maps the same file and starts the queue.
        let region = InflightRegion::open(file, 0, len, 1, QS).unwrap();
        let mut q = setup().1;
        q.set_next_avail(2); // what QEMU sends after a crash: the used index
        let mut second = region.queue(0).unwrap();
        let got = second.recover(&mut q, &mem).unwrap();
        assert_eq!(
            got,
            Recovered {
                heads: vec![5, 1],
                repaired: 1,
                fresh: false
            }
        );
        assert_eq!(q.next_used(), 2);
        assert_eq!(q.next_avail(), 4, "used index + in-flight count");
        // New pops continue the counter after the highest one found.
        second.popped(4);
        let third = region.queue(0).unwrap();
        let mut third = third;
        let mut q = setup().1;
        let got = third.recover(&mut q, &mem).unwrap();
        assert_eq!(got.heads, vec![5, 1, 4]);
        assert_eq!(q.next_avail(), 5);
    }

    /// Found by the `inflight_recover` fuzz target: a region whose counters are at `u64::MAX`
    /// made the next pop overflow the counter.
    #[test]
    fn a_hostile_counter_does_not_overflow() {
        let (region, _file, _) = InflightRegion::create(1, QS).unwrap();
        let (mem, mut q) = setup();
        let mut first = region.queue(0).unwrap();
        first.recover(&mut q, &mem).unwrap();
        first.store_u64(InflightQueue::desc(2) + DESC_COUNTER, u64::MAX);
        first.store_u8(InflightQueue::desc(2) + DESC_INFLIGHT, 1);
        let mut second = region.queue(0).unwrap();
        let got = second.recover(&mut setup().1, &mem).unwrap();
        assert_eq!(got.heads, vec![2]);
        second.popped(4);
        assert_eq!(second.load_u64(InflightQueue::desc(4) + DESC_COUNTER), 0);
    }

    #[test]
    fn region_too_small_or_outside_its_file_is_refused() {
        let (_region, file, len) = InflightRegion::create(1, QS).unwrap();
        let dup = file.try_clone().unwrap();
        assert!(InflightRegion::open(file, 0, len, 2, QS).is_err());
        assert!(InflightRegion::open(dup, 4096, len, 1, QS).is_err());
    }
}
