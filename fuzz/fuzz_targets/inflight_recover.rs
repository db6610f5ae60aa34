//! Fuzz in-flight recovery (the core's record, as vhost-user hands it over): the frontend hands a restarted daemon an in-flight
//! region (its own memory, so hostile input) and the rings; the daemon recovers the queue from
//! them and executes again what the region says was in flight.
//!
//! Input layout: byte 0 selects the queue size (1, 2, 4, 8, 16); then one queue's block of the
//! region (`queue_block_len(size)` bytes: header, per-head flags and counters), then the
//! driver's memory from guest address 0 (descriptor table at 0, avail ring at 0x100, used ring
//! at 0x200, buffers anywhere in 0..0x10000), over a RAM disk.
//!
//! Checked: no panic, no hang; the heads to resubmit are in range and distinct, in counter
//! order; the next avail index is the used index plus their count (a fresh region keeps the
//! frontend's ring base); after everything was
//! executed and drained, the region records nothing in flight and its used index is the ring's.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use virtiod_backend::{Backend, MemBackend};
use virtiod_blk::{BlkConfig, BlkQueue, Stats};
use virtiod_core::inflight::{queue_block_len, InflightRegion};
use virtiod_core::{Event, QueueService};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_LEN: usize = 0x1_0000;
const MAX_QUEUE: u16 = 16;
const USED: u64 = 0x200;

/// The ring as the frontend sets it up (base 0).
fn ring(size: u16) -> Queue {
    let mut queue = Queue::new(MAX_QUEUE).unwrap();
    queue.set_size(size);
    queue.set_ready(true);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let size = [1u16, 2, 4, 8, 16][usize::from(options & 7) % 5];
    let block = queue_block_len(size);
    if rest.len() < block {
        return;
    }
    let (region_bytes, image) = rest.split_at(block);

    // What a restarted daemon gets: the frontend's file with the region in it.
    let (_, file, len) = InflightRegion::create(1, size).unwrap();
    let mut theirs: File = file.try_clone().unwrap();
    theirs.write_all(region_bytes).unwrap();
    let region = InflightRegion::open(file, 0, len, 1, size).unwrap();

    let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap());
    mem.write_slice(&image[..image.len().min(MEM_LEN)], GuestAddress(0))
        .unwrap();
    let mut queue = ring(size);

    let mut tracker = region.queue(0).unwrap();
    let Ok(found) = tracker.recover(&mut queue, mem.as_ref()) else {
        return;
    };
    let ring_used = queue.used_idx(mem.as_ref(), std::sync::atomic::Ordering::Acquire);
    let ring_used = ring_used.unwrap().0;
    assert_eq!(queue.next_used(), ring_used);
    assert!(found.heads.iter().all(|&h| h < size));
    let mut distinct = found.heads.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        found.heads.len(),
        "a head resubmitted twice"
    );
    if found.fresh {
        // A region never written by a backend: the ring base the frontend set stands.
        assert!(found.heads.is_empty());
        assert_eq!(queue.next_avail(), 0);
    } else {
        assert_eq!(
            queue.next_avail(),
            ring_used.wrapping_add(found.heads.len() as u16)
        );
    }

    let backend = MemBackend::new(64 << 10, false);
    let cfg = Arc::new(BlkConfig::new(&backend.info(), 1, MAX_QUEUE, "fuzz-serial"));
    let handler = BlkQueue::new(cfg, &backend, Arc::new(Stats::new(1)), 0).unwrap();
    let mut svc =
        QueueService::new(0, Box::new(handler), MAX_QUEUE, std::time::Duration::ZERO).unwrap();
    // The service recovers the repaired block again (same heads) and executes them.
    *svc.queue_mut() = ring(size);
    drop(tracker);
    if svc.activate(&mem, region.queue(0)).is_ok() {
        let mut m = mem.clone();
        let _ = svc.serve(Event::Kick, &mut m, &mut || None, &mut || {});
    }
    let _ = svc.drain(mem.as_ref());
    assert_eq!(svc.in_flight(), 0);
    let queue = svc.queue();

    let view = region.queue(0).unwrap();
    assert_eq!(view.in_flight(), Vec::<u16>::new(), "left in flight");
    let ring_used = queue.used_idx(mem.as_ref(), std::sync::atomic::Ordering::Acquire);
    assert_eq!(ring_used.unwrap().0, queue.next_used());
});
