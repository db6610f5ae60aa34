//! A hostile vhost-user frontend: it owns the "guest" memory (memfd-backed, shared with the
//! daemon), writes descriptor tables and avail rings byte by byte, kicks, and watches the
//! used ring. Nothing here validates what it writes: that is the point.
//!
//! Every byte of guest memory is mirrored in a shadow copy; after each request
//! [`Driver::verify`] checks that the daemon wrote nothing outside the ranges the case allows
//! (the used rings of the enabled queues and, e.g., one status byte). Fresh buffers are
//! surrounded by at least [`GUARD`] bytes of [`CANARY`], so any stray write shows up as a
//! changed canary.
//!
//! Guest memory is three regions: A (rings, then the buffer arena), B right after A (a
//! buffer may straddle the two) and C after a hole; [`HOLE`] is in no region.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use crate::F_EVENT_IDX;

/// Queue size used for every queue (virtiod's default; the device must allow it).
pub const QSIZE: u16 = 256;
/// Descriptor flag `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag `VIRTQ_DESC_F_WRITE` (device-writable buffer).
pub const F_WRITE: u16 = 2;
/// Descriptor flag `VIRTQ_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// Region A: rings and the buffer arena.
pub const A_BASE: u64 = 0x1_0000;
/// Length of region A.
pub const A_LEN: u64 = 2 << 20;
/// Region B starts exactly where A ends (a buffer may straddle the two).
pub const B_BASE: u64 = A_BASE + A_LEN;
/// Length of region B.
pub const B_LEN: u64 = 1 << 20;
/// Region C, after a hole: `B_BASE + B_LEN .. C_BASE` is not guest memory.
pub const C_BASE: u64 = 0x1000_0000;
/// Length of region C.
pub const C_LEN: u64 = 1 << 20;
/// An address in no region.
pub const HOLE: u64 = 0x4000_0000;

/// Fill byte of memory the daemon must never write.
pub const CANARY: u8 = 0xCC;
/// Canary bytes on each side of every allocated buffer.
pub const GUARD: u64 = 64;

/// Most queues a [`Driver`] sets up (their rings sit at the start of region A).
pub const MAX_QUEUES: usize = 4;
/// Bytes of region A each queue's three rings take.
const RINGS_LEN: u64 = 0x3000;
/// Start of the buffer arena in region A, after the rings of [`MAX_QUEUES`] queues.
const ARENA: u64 = A_BASE + RINGS_LEN * MAX_QUEUES as u64;
const WAIT: Duration = Duration::from_secs(10);

/// One split-ring descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `F_NEXT`, `F_WRITE`, `F_INDIRECT` (or anything else: nothing is checked).
    pub flags: u16,
    /// Index of the next descriptor (with `F_NEXT`).
    pub next: u16,
}

impl Desc {
    /// Device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }
    /// Device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }
    /// Last byte (where a status goes).
    pub fn last(&self) -> u64 {
        self.addr + u64::from(self.len) - 1
    }
    /// The byte range of the buffer, as [`Driver::verify`] takes it.
    pub fn range(&self) -> (u64, u64) {
        (self.addr, u64::from(self.len))
    }
    /// The 16 bytes of the descriptor in a table.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// `descs` chained in table order (index i → i + 1), the last without NEXT.
pub fn linked(descs: &[Desc]) -> Vec<Desc> {
    linked_from(0, descs)
}

/// `descs` chained in table order starting at table index `first` (index `first + i` →
/// `first + i + 1`), the last without NEXT: write them at `first` of the table with
/// [`Driver::write_table_at`] and make `first` available.
pub fn linked_from(first: u16, descs: &[Desc]) -> Vec<Desc> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut d = *d;
            if i + 1 < n {
                d.flags |= F_NEXT;
                d.next = first + (i + 1) as u16;
            }
            d
        })
        .collect()
}

/// Where one queue's rings live (guest addresses).
#[derive(Debug, Clone, Copy)]
pub struct Rings {
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl Rings {
    /// The rings of queue `q` (< [`MAX_QUEUES`]).
    pub const fn of(q: usize) -> Self {
        let base = A_BASE + RINGS_LEN * q as u64;
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }
}

/// The rings of queue 0.
pub const Q0: Rings = Rings::of(0);
/// The rings of queue 1.
pub const Q1: Rings = Rings::of(1);

/// A memfd of `len` bytes (guest memory shared with the daemon).
pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd (or -1), which we
    // own from here on; no memory of ours is handed to the kernel beyond the name.
    let file = unsafe {
        let fd = libc::memfd_create(c"virtiod-testkit".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        File::from_raw_fd(fd)
    };
    file.set_len(len).unwrap();
    file
}

/// How [`Driver::connect_opts`] sets up the connection.
#[derive(Debug, Clone)]
pub struct Options {
    /// Virtio feature bits to acknowledge; each must be offered (the vhost-user
    /// `PROTOCOL_FEATURES` bit is added when offered, as QEMU does). `None`: everything
    /// offered but EVENT_IDX (the driver polls the used ring and always kicks).
    pub features: Option<u64>,
    /// Queues to set up (at most [`MAX_QUEUES`]; fewer if the device has fewer).
    pub queues: usize,
    /// How many of them are enabled, from queue 0; the others get rings and a kick fd but
    /// are never enabled.
    pub enabled: usize,
    /// Negotiate the in-flight region and get it from the daemon before the rings start
    /// (as QEMU does).
    pub inflight: bool,
    /// Negotiate `BACKEND_REQ` (the test then hands its end of a backend channel over with
    /// `fe.set_backend_request_fd`).
    pub backend_req: bool,
}

impl Default for Options {
    /// What virtiod's blk tests use: up to two queues, queue 0 enabled, queue 1 never
    /// enabled, every offered feature but EVENT_IDX, no in-flight region.
    fn default() -> Self {
        Self {
            features: None,
            queues: 2,
            enabled: 1,
            inflight: false,
            backend_req: false,
        }
    }
}

impl Options {
    /// `n` queues, all enabled, every offered feature but EVENT_IDX.
    pub fn queues(n: usize) -> Self {
        Self {
            queues: n,
            enabled: n,
            ..Self::default()
        }
    }

    /// Acknowledge exactly `features` (see [`Self::features`](Options#structfield.features)).
    pub fn features(mut self, features: u64) -> Self {
        self.features = Some(features);
        self
    }

    /// Negotiate the in-flight region.
    pub fn inflight(mut self, on: bool) -> Self {
        self.inflight = on;
        self
    }

    /// Negotiate `BACKEND_REQ`.
    pub fn backend_req(mut self, on: bool) -> Self {
        self.backend_req = on;
        self
    }
}

/// The frontend side of one vhost-user connection, with its guest memory.
pub struct Driver {
    /// The vhost-user connection (for messages the helpers do not cover).
    pub fe: Frontend,
    /// The guest memory (three memfd regions, see the module docs).
    pub mem: GuestMemoryMmap<()>,
    shadow: Vec<(u64, Vec<u8>)>,
    kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
    next_alloc: u64,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    enabled: usize,
    offered: u64,
    acked: u64,
    /// The in-flight region the daemon gave (`GET_INFLIGHT_FD`), kept across reconnects as
    /// QEMU keeps it.
    pub inflight: Option<(VhostUserInflight, File)>,
}

impl Driver {
    /// Connect with [`Options::default`]: set up queue 0 (enabled) and, if the device has a
    /// second queue, queue 1 (started with a kick fd but never enabled).
    pub fn connect(socket: &Path) -> Self {
        Self::connect_opts(socket, &Options::default())
    }

    /// Like [`Self::connect`]; with `inflight`, also negotiate the in-flight region and get
    /// it from the daemon before the rings start (as QEMU does).
    pub fn connect_with(socket: &Path, inflight: bool) -> Self {
        Self::connect_opts(socket, &Options::default().inflight(inflight))
    }

    /// Connect and set up the queues as `opts` says.
    pub fn connect_opts(socket: &Path, opts: &Options) -> Self {
        assert!(
            opts.queues <= MAX_QUEUES,
            "at most {MAX_QUEUES} queues, not {}",
            opts.queues
        );
        let regions = [(A_BASE, A_LEN), (B_BASE, B_LEN), (C_BASE, C_LEN)];
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(base, len)| {
                let file = FileOffset::new(memfd(len), 0);
                (GuestAddress(base), len as usize, Some(file))
            })
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&ranges).unwrap();
        let shadow: Vec<(u64, Vec<u8>)> = regions
            .iter()
            .map(|&(base, len)| (base, vec![CANARY; len as usize]))
            .collect();
        for (base, bytes) in &shadow {
            mem.write_slice(bytes, GuestAddress(*base)).unwrap();
        }
        let hs = Self::handshake(socket, opts.features, opts.inflight, opts.backend_req);
        let num_queues = hs.num_queues.min(opts.queues);
        let mut d = Self {
            fe: hs.fe,
            mem,
            shadow,
            kicks: Vec::new(),
            _calls: Vec::new(),
            next_alloc: ARENA,
            avail_idx: vec![0; num_queues],
            used_seen: vec![0; num_queues],
            enabled: opts.enabled.min(num_queues),
            offered: hs.offered,
            acked: hs.acked,
            inflight: None,
        };
        if opts.inflight {
            let want = VhostUserInflight::new(0, 0, num_queues as u16, QSIZE);
            d.inflight = Some(d.fe.get_inflight_fd(&want).expect("GET_INFLIGHT_FD"));
        }
        d.set_mem_table();
        for q in 0..num_queues {
            d.setup_queue(q, q < d.enabled, true);
        }
        d
    }

    /// What a QEMU frontend does when its backend died and it reconnects (to a new daemon
    /// on the same socket): same memory and rings, the same features, the in-flight region
    /// handed over with `SET_INFLIGHT_FD`, and each ring's base set to its used index (the
    /// only position the frontend knows without the dead backend). Queue 0 only.
    pub fn reconnect(mut self, socket: &Path) -> Self {
        let hs = Self::handshake(socket, Some(self.acked), self.inflight.is_some(), false);
        self.fe = hs.fe;
        if let Some((msg, file)) = self.inflight.as_ref() {
            self.fe
                .set_inflight_fd(msg, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        self.set_mem_table();
        self.kicks.clear();
        self._calls.clear();
        self.setup_queue(0, true, false);
        self
    }

    /// Feature bits the device offered (`GET_FEATURES`).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Feature bits this frontend acknowledged (`SET_FEATURES`).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Queues set up on this connection.
    pub fn num_queues(&self) -> usize {
        self.avail_idx.len()
    }

    fn handshake(
        socket: &Path,
        features: Option<u64>,
        inflight: bool,
        backend_req: bool,
    ) -> Handshake {
        let mut fe = Frontend::connect(socket, MAX_QUEUES as u64).expect("connect to the daemon");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let acked = match features {
            Some(want) => {
                assert_eq!(
                    offered & want,
                    want,
                    "the device offers {offered:#x}, not every feature of {want:#x}"
                );
                want | (offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            }
            None => offered & !F_EVENT_IDX,
        };
        fe.set_features(acked).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        let mut want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if inflight {
            assert!(
                proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
                "the daemon offers INFLIGHT_SHMFD"
            );
            want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if backend_req {
            assert!(
                proto.contains(VhostUserProtocolFeatures::BACKEND_REQ),
                "the daemon offers BACKEND_REQ"
            );
            want |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        fe.set_protocol_features(proto & want).unwrap();
        // Every request from here on is acknowledged: set-up is done before the first kick,
        // and a refused request is an error here.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let num_queues = fe.get_queue_num().unwrap() as usize;
        Handshake {
            fe,
            offered,
            acked,
            num_queues,
        }
    }

    fn set_mem_table(&mut self) {
        let table: Vec<_> = self
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        self.fe.set_mem_table(&table).unwrap();
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    fn setup_queue(&mut self, q: usize, enable: bool, fresh: bool) {
        let rings = Rings::of(q);
        let base = if fresh {
            // Rings start zeroed (flags, idx), unlike the canary-filled arena.
            self.put(rings.avail, &[0; 4 + 2 * QSIZE as usize + 2]);
            self.put(rings.used, &[0; 4 + 8 * QSIZE as usize + 2]);
            0
        } else {
            self.used_idx(q)
        };
        let config = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host(rings.desc),
            used_ring_addr: self.host(rings.used),
            avail_ring_addr: self.host(rings.avail),
            log_addr: None,
        };
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.fe.set_vring_num(q, QSIZE).unwrap();
        self.fe.set_vring_addr(q, &config).unwrap();
        self.fe.set_vring_base(q, base).unwrap();
        self.fe.set_vring_call(q, &call).unwrap();
        self.fe.set_vring_kick(q, &kick).unwrap();
        if enable {
            self.fe.set_vring_enable(q, true).unwrap();
        }
        self.kicks.push(kick);
        self._calls.push(call);
    }

    /// Kick queue `q` without touching guest memory.
    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Truncate the memfd behind the region at `gpa` to `len` bytes: the daemon's mapping of
    /// the pages past `len` is gone (so is ours: this driver must not touch them again).
    pub fn shrink_region(&self, gpa: u64, len: u64) {
        let region = self.mem.find_region(GuestAddress(gpa)).unwrap();
        let file = region.file_offset().unwrap().file();
        file.set_len(len).unwrap();
    }

    fn shadow_mut(&mut self, gpa: u64) -> Option<(&mut Vec<u8>, usize)> {
        self.shadow
            .iter_mut()
            .find(|(base, bytes)| (*base..*base + bytes.len() as u64).contains(&gpa))
            .map(|(base, bytes)| (bytes, (gpa - *base) as usize))
    }

    /// Write driver bytes (any mapped address, also across adjacent regions).
    pub fn put(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
        let mut done = 0;
        while done < bytes.len() {
            let (shadow, off) = self.shadow_mut(gpa + done as u64).unwrap();
            let n = (shadow.len() - off).min(bytes.len() - done);
            shadow[off..off + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
    }

    /// Read guest bytes as the daemon left them.
    pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf
    }

    /// A fresh canary-filled buffer in region A, with canaries on both sides.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = (self.next_alloc + GUARD).next_multiple_of(64);
        self.next_alloc = addr + len + GUARD;
        // The last page of A is left to the cases that straddle into B.
        assert!(self.next_alloc <= B_BASE - 0x1000, "test arena exhausted");
        addr
    }

    /// A device-readable buffer holding `bytes`.
    pub fn readable(&mut self, bytes: &[u8]) -> Desc {
        let addr = self.alloc(bytes.len() as u64);
        self.put(addr, bytes);
        Desc::r(addr, bytes.len() as u32)
    }

    /// A device-writable buffer of `len` canary bytes.
    pub fn writable(&mut self, len: u32) -> Desc {
        Desc::w(self.alloc(u64::from(len)), len)
    }

    /// Write raw descriptors at `table` (a ring's table or an indirect table).
    pub fn write_table(&mut self, table: u64, descs: &[Desc]) {
        let bytes: Vec<u8> = descs.iter().flat_map(|d| d.bytes()).collect();
        self.put(table, &bytes);
    }

    /// Write raw descriptors into queue `q`'s descriptor table from index `first` on.
    pub fn write_table_at(&mut self, q: usize, first: u16, descs: &[Desc]) {
        assert!(
            usize::from(first) + descs.len() <= usize::from(QSIZE),
            "descriptors past the end of the table"
        );
        self.write_table(Rings::of(q).desc + 16 * u64::from(first), descs);
    }

    /// An indirect descriptor whose table holds `descs` verbatim.
    pub fn indirect(&mut self, descs: &[Desc]) -> Desc {
        let table = self.alloc(16 * descs.len() as u64);
        self.write_table(table, descs);
        Desc {
            addr: table,
            len: 16 * descs.len() as u32,
            flags: F_INDIRECT,
            next: 0,
        }
    }

    /// Put `heads` on queue `q`'s avail ring, publish the new avail index and kick.
    pub fn make_available(&mut self, q: usize, heads: &[u16]) {
        let rings = Rings::of(q);
        for &head in heads {
            let slot = rings.avail + 4 + 2 * u64::from(self.avail_idx[q] % QSIZE);
            self.put(slot, &head.to_le_bytes());
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        }
        self.publish_avail_idx(q, self.avail_idx[q]);
    }

    /// Store `idx` as queue `q`'s avail index (whatever it is) and kick.
    pub fn publish_avail_idx(&mut self, q: usize, idx: u16) {
        let addr = Rings::of(q).avail + 2;
        self.mem
            .store(idx.to_le(), GuestAddress(addr), Ordering::Release)
            .unwrap();
        let (shadow, off) = self.shadow_mut(addr).unwrap();
        shadow[off..off + 2].copy_from_slice(&idx.to_le_bytes());
        self.kicks[q].write(1).unwrap();
    }

    /// Queue `q`'s used index as the daemon last published it.
    pub fn used_idx(&self, q: usize) -> u16 {
        let addr = Rings::of(q).used + 2;
        u16::from_le(
            self.mem
                .load(GuestAddress(addr), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Wait for `n` new used entries on queue `q`; returns their (id, len).
    pub fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        let want = self.used_seen[q].wrapping_add(n);
        let deadline = Instant::now() + WAIT;
        while self.used_idx(q) != want {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used index {} after {WAIT:?}, expected {want}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let used = Rings::of(q).used;
        (0..n)
            .map(|_| {
                let slot = used + 4 + 8 * u64::from(self.used_seen[q] % QSIZE);
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
                let e = self.get(slot, 8);
                (
                    u32::from_le_bytes(e[0..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// Give the daemon time to (wrongly) act, then check queue `q` used nothing.
    pub fn assert_nothing_used(&mut self, q: usize, settle: Duration) {
        std::thread::sleep(settle);
        assert_eq!(
            self.used_idx(q),
            self.used_seen[q],
            "queue {q} used an entry"
        );
    }

    /// Check that guest memory equals the shadow everywhere except the used rings of the
    /// enabled queues and the `allowed` (address, length) ranges, then accept what the
    /// daemon wrote there.
    pub fn verify(&mut self, case: &str, allowed: &[(u64, u64)]) {
        let used: Vec<_> = (0..self.enabled)
            .map(|q| Rings::of(q).used..Rings::of(q).used + 0x1000)
            .collect();
        for i in 0..self.shadow.len() {
            let base = self.shadow[i].0;
            let actual = self.get(base, self.shadow[i].1.len());
            let expected = &mut self.shadow[i].1;
            const PAGE: usize = 4096;
            let pages = actual.chunks(PAGE).zip(expected.chunks_mut(PAGE));
            let changed = pages.enumerate().filter(|(_, (a, e))| a != e);
            let bytes = changed.flat_map(|(page, (a, e))| {
                let at = base + (page * PAGE) as u64;
                a.iter()
                    .zip(e.iter_mut())
                    .enumerate()
                    .map(move |(off, b)| (at + off as u64, b))
            });
            for (gpa, (a, e)) in bytes {
                if a == e || used.iter().any(|r| r.contains(&gpa)) {
                    continue;
                }
                let ok = allowed
                    .iter()
                    .any(|&(addr, len)| (addr..addr + len).contains(&gpa));
                assert!(
                    ok,
                    "{case}: the daemon wrote {a:#04x} at guest address {gpa:#x} (expected {e:#04x})"
                );
                *e = *a;
            }
        }
    }

    /// Write `table` into queue 0's descriptor table at index 0, make `head` available,
    /// wait for its completion and check memory. Returns the used length.
    pub fn exec_table(
        &mut self,
        case: &str,
        table: &[Desc],
        head: u16,
        allowed: &[(u64, u64)],
    ) -> u32 {
        self.write_table(Q0.desc, table);
        self.make_available(0, &[head]);
        let used = self.wait_used(0, 1);
        assert_eq!(
            used[0].0,
            u32::from(head),
            "{case}: used id is the head index"
        );
        self.verify(case, allowed);
        used[0].1
    }
}

/// What the handshake settled.
struct Handshake {
    fe: Frontend,
    offered: u64,
    acked: u64,
    num_queues: usize,
}
