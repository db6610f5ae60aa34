//! The queue service against a small driver played in plain memory and two toy handlers: one
//! that finishes every request at once, one whose requests finish when the test says so.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::inflight::InflightRegion;
use crate::{ChainDesc, Completed, GuestMem};

const QSIZE: u16 = 8;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUF: u64 = 0x8000;
const F_WRITE: u16 = 2;

/// The driver side: writes descriptors and avail entries, reads used entries.
struct Driver {
    mem: Arc<GuestMem>,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new() -> Self {
        // Two regions, so that a test can hand out a snapshot without the second one.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0xc000),
        ])
        .unwrap();
        Self {
            mem: Arc::new(mem),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn service(&self, handler: Box<dyn QueueHandler>) -> QueueService {
        let mut svc = QueueService::new(0, handler, QSIZE, Duration::ZERO).unwrap();
        let q = svc.queue_mut();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        svc
    }

    /// Post a one-descriptor chain at `head` whose buffer is `len` writable bytes at `addr`.
    fn post(&mut self, head: u16, addr: u64, len: u32) {
        let d = virtio_queue::desc::split::Descriptor::new(addr, len, F_WRITE, 0);
        self.mem
            .write_obj(d, GuestAddress(DESC + 16 * u64::from(head)))
            .unwrap();
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Used entries published since the last call: (head, len).
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(USED + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(USED + 8 + 8 * slot))
                .unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Finishes every request at once, reporting its buffer length as written.
struct AtOnce;

impl QueueHandler for AtOnce {
    fn can_start(&self) -> bool {
        true
    }
    fn start(&mut self, chain: &Chain, _mem: &Arc<GuestMem>) -> Outcome {
        let used_len = if chain.terminated() {
            chain.descs().iter().map(|d: &ChainDesc| d.len).sum()
        } else {
            0
        };
        Outcome::Done { used_len }
    }
}

/// Requests finish when the test pushes them to `ready`; at most 2 in flight. The completion
/// fd is a real eventfd (the service only checks that there is one).
struct Later {
    started: Started,
    ready: Ready,
    running: Vec<u16>,
    fd: vmm_sys_util_like::Fd,
}

mod vmm_sys_util_like {
    /// A descriptor that only has to exist.
    pub struct Fd(pub std::fs::File);
}

impl QueueHandler for Later {
    fn can_start(&self) -> bool {
        self.running.len() < 2
    }
    fn start(&mut self, chain: &Chain, _mem: &Arc<GuestMem>) -> Outcome {
        self.started.lock().unwrap().push(chain.head());
        self.running.push(chain.head());
        Outcome::Started
    }
    fn completion_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.fd.0.as_raw_fd())
    }
    fn reap(&mut self, out: &mut Vec<Completed>) {
        for head in self.ready.lock().unwrap().drain(..) {
            if let Some(pos) = self.running.iter().position(|h| *h == head) {
                self.running.remove(pos);
                out.push(Completed { head, used_len: 7 });
            }
        }
    }
    fn wait(&mut self) -> Result<(), HandlerError> {
        // Everything running completes when waited for.
        self.ready
            .lock()
            .unwrap()
            .extend(self.running.iter().copied());
        Ok(())
    }
    fn in_flight(&self) -> usize {
        self.running.len()
    }
}

type Started = Arc<Mutex<Vec<u16>>>;
type Ready = Arc<Mutex<VecDeque<u16>>>;

fn later() -> (Later, Started, Ready) {
    let started = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(Mutex::new(VecDeque::new()));
    let h = Later {
        started: started.clone(),
        ready: ready.clone(),
        running: Vec::new(),
        fd: vmm_sys_util_like::Fd(std::fs::File::open("/dev/null").unwrap()),
    };
    (h, started, ready)
}

fn no_remap() -> Option<Arc<GuestMem>> {
    None
}

#[test]
fn synchronous_requests_are_published_with_their_length_and_the_driver_is_notified() {
    let mut drv = Driver::new();
    let mut svc = drv.service(Box::new(AtOnce));
    let mut mem = drv.mem.clone();
    assert!(!svc.activate(&mem, None).unwrap());
    drv.post(0, BUF, 100);
    drv.post(3, BUF + 0x100, 200);
    let mut irqs = 0;
    svc.serve(Event::Kick, &mut mem, &mut no_remap, &mut || irqs += 1)
        .unwrap();
    assert_eq!(drv.take_used(), vec![(0, 100), (3, 200)]);
    assert_eq!(irqs, 1, "one interrupt for the batch");
}

#[test]
fn asynchronous_requests_respect_the_handler_capacity_and_complete_later() {
    let mut drv = Driver::new();
    let (h, started, ready) = later();
    let mut svc = drv.service(Box::new(h));
    let mut mem = drv.mem.clone();
    svc.activate(&mem, None).unwrap();
    for head in 0..3 {
        drv.post(head, BUF, 16);
    }
    let mut irqs = 0;
    svc.serve(Event::Kick, &mut mem, &mut no_remap, &mut || irqs += 1)
        .unwrap();
    assert_eq!(
        *started.lock().unwrap(),
        vec![0, 1],
        "two slots: the third waits"
    );
    assert_eq!(irqs, 0);
    ready.lock().unwrap().push_back(1);
    svc.serve(Event::Completion, &mut mem, &mut no_remap, &mut || {
        irqs += 1
    })
    .unwrap();
    assert_eq!(drv.take_used(), vec![(1, 7)]);
    assert_eq!(irqs, 1);
    assert_eq!(
        *started.lock().unwrap(),
        vec![0, 1, 2],
        "a freed slot takes the next"
    );
    assert!(svc.drain(&mem).unwrap());
    assert_eq!(drv.take_used(), vec![(0, 7), (2, 7)]);
    assert_eq!(svc.in_flight(), 0);
}

#[test]
fn a_broken_ring_stops_only_this_queue_once_and_a_reset_revives_it() {
    let drv = Driver::new();
    let mut svc = drv.service(Box::new(AtOnce));
    let mut mem = drv.mem.clone();
    svc.activate(&mem, None).unwrap();
    // The avail index jumps more than a queue ahead.
    drv.mem
        .write_obj(100u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    let r = svc.serve(Event::Kick, &mut mem, &mut no_remap, &mut || {});
    assert!(r.is_err());
    assert!(svc.is_broken());
    // Quiet afterwards: no error again, nothing served.
    assert!(svc
        .serve(Event::Kick, &mut mem, &mut no_remap, &mut || {})
        .is_ok());
    svc.reset();
    assert!(!svc.is_broken());
}

#[test]
fn a_chain_in_unmapped_memory_is_collected_again_after_a_remap() {
    let mut drv = Driver::new();
    // The driver's buffer lies beyond the memory the service uses at first: a snapshot of the
    // same memory without its second region.
    let (small, _) = drv.mem.remove_region(GuestAddress(0x4000), 0xc000).unwrap();
    let small = Arc::new(small);
    let mut svc = drv.service(Box::new(AtOnce));
    svc.set_remap_on_fault(true);
    svc.activate(&drv.mem, None).unwrap();
    drv.post(2, BUF, 64);
    let mut mem = small;
    let full = drv.mem.clone();
    let mut remaps = 0;
    let mut remap = || {
        remaps += 1;
        Some(full.clone())
    };
    // The rings are at 0..0x3000, inside the small mapping; the buffer at 0x8000 is not.
    svc.serve(Event::Kick, &mut mem, &mut remap, &mut || {})
        .unwrap();
    assert_eq!(remaps, 1);
    assert!(Arc::ptr_eq(&mem, &drv.mem), "the fresh snapshot is kept");
    assert_eq!(drv.take_used(), vec![(2, 64)]);
}

#[test]
fn requests_in_flight_at_a_kill_are_executed_again_by_the_next_service() {
    let mut drv = Driver::new();
    let (region, _file, _) = InflightRegion::create(1, QSIZE).unwrap();
    let (h, started, ready) = later();
    let mut svc = drv.service(Box::new(h));
    let mut mem = drv.mem.clone();
    svc.activate(&mem, region.queue(0)).unwrap();
    drv.post(4, BUF, 16);
    drv.post(6, BUF, 16);
    svc.serve(Event::Kick, &mut mem, &mut no_remap, &mut || {})
        .unwrap();
    ready.lock().unwrap().push_back(6);
    svc.serve(Event::Completion, &mut mem, &mut no_remap, &mut || {})
        .unwrap();
    assert_eq!(drv.take_used(), vec![(6, 7)]);
    assert_eq!(*started.lock().unwrap(), vec![4, 6]);
    // "Kill": a new service over the same ring and record; head 4 is still in flight.
    drop(svc);
    let (h2, started2, _ready2) = later();
    let mut svc2 = drv.service(Box::new(h2));
    svc2.activate(&mem, region.queue(0)).unwrap();
    assert_eq!(
        *started2.lock().unwrap(),
        vec![4],
        "exactly the request in flight"
    );
    assert_eq!(svc2.queue().next_avail(), 2);
    assert_eq!(svc2.queue().next_used(), 1);
    assert!(svc2.drain(&mem).unwrap());
    assert_eq!(drv.take_used(), vec![(4, 7)]);
}

/// A synchronous handler behind a rate limit: it starts one request per token the test
/// grants, and while it has none it asks to be woken after 5 ms.
struct Limited {
    tokens: Arc<Mutex<u32>>,
}

impl QueueHandler for Limited {
    fn can_start(&self) -> bool {
        *self.tokens.lock().unwrap() > 0
    }
    fn start(&mut self, _chain: &Chain, _mem: &Arc<GuestMem>) -> Outcome {
        *self.tokens.lock().unwrap() -= 1;
        Outcome::Done { used_len: 1 }
    }
    fn retry_after(&self) -> Option<Duration> {
        (*self.tokens.lock().unwrap() == 0).then_some(Duration::from_micros(4_100))
    }
}

#[test]
fn a_rate_limited_handler_asks_for_a_timer_and_the_timer_serves_what_waited() {
    let mut drv = Driver::new();
    let tokens = Arc::new(Mutex::new(1));
    let mut svc = drv.service(Box::new(Limited {
        tokens: tokens.clone(),
    }));
    let mut mem = drv.mem.clone();
    svc.activate(&mem, None).unwrap();
    assert_eq!(svc.wake_after(), None);
    assert_eq!(
        svc.wake_timeout_ms(),
        -1,
        "nothing waits: sleep on fds only"
    );
    for head in 0..3 {
        drv.post(head, BUF, 16);
    }
    svc.serve(Event::Kick, &mut mem, &mut no_remap, &mut || {})
        .unwrap();
    assert_eq!(drv.take_used(), vec![(0, 1)], "one token: one request");
    assert_eq!(svc.wake_after(), Some(Duration::from_micros(4_100)));
    assert_eq!(svc.wake_timeout_ms(), 5, "rounded up to whole milliseconds");
    // No kick comes (the driver was not asked for one): the timer serves the rest.
    *tokens.lock().unwrap() = 2;
    svc.serve(Event::Timer, &mut mem, &mut no_remap, &mut || {})
        .unwrap();
    assert_eq!(drv.take_used(), vec![(1, 1), (2, 1)]);
    assert_eq!(svc.wake_after(), Some(Duration::from_micros(4_100)));
    // A broken queue asks for no timer.
    drv.mem
        .write_obj(100u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    *tokens.lock().unwrap() = 1;
    assert!(svc
        .serve(Event::Timer, &mut mem, &mut no_remap, &mut || {})
        .is_err());
    *tokens.lock().unwrap() = 0;
    assert_eq!(svc.wake_after(), None);
}
