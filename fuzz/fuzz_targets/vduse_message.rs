//! Fuzz what the VDUSE kernel side (and, through it, the driver) hands the daemon: the
//! message protocol and the IOTLB.
//!
//! Input layout: the first `REQUEST_SIZE` bytes are one `vduse_dev_request` and the next
//! `RESPONSE_SIZE` bytes one `vduse_dev_response` (zero-padded when the input is shorter);
//! the rest is a program of IOTLB operations, 8 bytes each (an opcode byte and arguments),
//! run against an [`IotlbMemory`] fed by a fake kernel whose entries the program adds and
//! removes. Byte 0 of the program's first operation also picks the mode: *faithful* (the
//! fake behaves like the kernel: entries never overlap and every change is followed by the
//! UPDATE_IOTLB invalidation) or *hostile* (overlapping entries, missing invalidations).
//!
//! Checked: no panic, no hang; a decoded message re-encodes to itself; after every
//! operation the snapshot from [`IotlbMemory::memory`] allows exactly the accesses inside
//! the entries [`IotlbMemory::entries`] lists (reads, writes, `get_slices`), never one
//! outside; writes through a read-write entry reach the fake kernel's file at the entry's
//! offset and writes into a read-only entry never do; in faithful mode every mapped entry is
//! one the fake kernel currently holds, and after `map_range` every kernel entry overlapping
//! the range is mapped (except write-only ones, which cannot be mmapped, and one ending at
//! 2^64, which vm-memory cannot hold).
#![no_main]

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vduse::message::{REQUEST_SIZE, RESPONSE_SIZE};
use vduse::{IotlbEntry, IotlbMemory, IotlbPerm, IotlbSource, Message, Response};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

const PAGE: u64 = 4096;
/// Size of the fake kernel's file, in pages; every entry lies inside it.
const FILE_PAGES: u64 = 64;
const MAX_ENTRY_PAGES: u64 = 8;
const MAX_ENTRIES: usize = 16;
const MAX_OPS: usize = 64;

/// The fake kernel's backing file (one per process; its contents do not matter).
fn backing_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vduse-fuzz-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(FILE_PAGES * PAGE).unwrap();
        file
    })
}

/// A fake `VDUSE_IOTLB_GET_FD`: the first entry (lowest start) overlapping the range.
struct FakeKernel {
    entries: RefCell<Vec<IotlbEntry>>,
}

impl IotlbSource for FakeKernel {
    fn iotlb_get_fd(&self, start: u64, last: u64) -> vduse::Result<Option<(IotlbEntry, OwnedFd)>> {
        let hit = self
            .entries
            .borrow()
            .iter()
            .filter(|e| e.start <= last && e.last >= start)
            .min_by_key(|e| e.start)
            .copied();
        Ok(hit.map(|e| (e, OwnedFd::from(backing_file().try_clone().unwrap()))))
    }
}

fn overlaps(a: &IotlbEntry, start: u64, last: u64) -> bool {
    a.start <= last && a.last >= start
}

/// Reads little-endian fields out of one 8-byte operation.
struct Op<'a>(&'a [u8]);

impl Op<'_> {
    fn u8(&self, i: usize) -> u8 {
        self.0[i]
    }
    fn u16(&self, i: usize) -> u16 {
        u16::from_le_bytes([self.0[i], self.0[i + 1]])
    }
    fn u32(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.0[i..i + 4].try_into().unwrap())
    }
}

/// An IOVA near interesting places: low pages, the top of the 64-bit space, or raw bits.
fn iova(selector: u8, bits: u32) -> u64 {
    match selector % 4 {
        0 | 1 => u64::from(bits % 256) * PAGE + u64::from(bits >> 24) % 3 * 0x800,
        2 => u64::MAX - u64::from(bits % (16 * PAGE as u32)),
        _ => u64::from(bits) << (selector >> 2 & 31),
    }
}

struct Run {
    kernel: FakeKernel,
    iotlb: IotlbMemory,
    faithful: bool,
}

impl Run {
    fn add_entry(&mut self, op: &Op) {
        let pages = 1 + u64::from(op.u8(1)) % MAX_ENTRY_PAGES;
        let start = match op.u8(2) % 8 {
            // The top of the space, ending exactly at u64::MAX.
            0 => u64::MAX - pages * PAGE + 1,
            1 | 2 => u64::from(op.u16(4)) * 0x200,
            _ => u64::from(op.u16(4) % 512) * PAGE,
        };
        let Some(last) = start.checked_add(pages * PAGE - 1) else {
            return;
        };
        let file_page = u64::from(op.u8(3)) % (FILE_PAGES - pages + 1);
        // Rarely an unaligned mmap offset (map_range must refuse it, not crash).
        let misalign = if op.u8(6) == 0xff { 16 } else { 0 };
        let perm = match op.u8(7) % 3 {
            0 => IotlbPerm::ReadOnly,
            1 => IotlbPerm::WriteOnly,
            _ => IotlbPerm::ReadWrite,
        };
        let entry = IotlbEntry {
            start,
            last,
            offset: file_page * PAGE + misalign,
            perm,
        };
        let mut entries = self.kernel.entries.borrow_mut();
        if entries.len() >= MAX_ENTRIES {
            return;
        }
        if self.faithful && entries.iter().any(|e| overlaps(e, start, last)) {
            return; // the kernel never holds overlapping entries
        }
        entries.push(entry);
        drop(entries);
        if self.faithful {
            self.iotlb.invalidate(start, last);
        }
    }

    fn remove_entry(&mut self, op: &Op) {
        let mut entries = self.kernel.entries.borrow_mut();
        if entries.is_empty() {
            return;
        }
        let index = usize::from(op.u8(1)) % entries.len();
        let gone = entries.remove(index);
        drop(entries);
        if self.faithful {
            self.iotlb.invalidate(gone.start, gone.last);
        }
    }

    fn map_range(&mut self, op: &Op) {
        let (start, last) = self.range(op);
        let before = self.iotlb.entries();
        let result = self.iotlb.map_range(&self.kernel, start, last);
        if !self.faithful {
            return;
        }
        // Every kernel entry overlapping the range is mapped now, unless mapping failed.
        let after = self.iotlb.entries();
        if let Ok(added) = result {
            assert!(after.len() >= before.len());
            assert!(added <= after.len());
            for e in self.kernel.entries.borrow().iter() {
                // Write-only entries cannot be mmapped; vm-memory cannot hold one ending at 2^64.
                let mappable = e.perm != IotlbPerm::WriteOnly && e.last != u64::MAX;
                if overlaps(e, start, last) && mappable {
                    assert!(
                        after.contains(e),
                        "{e:?} not mapped by map_range({start:#x}, {last:#x})"
                    );
                }
            }
        }
    }

    /// A range around a kernel entry or anywhere.
    fn range(&self, op: &Op) -> (u64, u64) {
        let entries = self.kernel.entries.borrow();
        if op.u8(1) & 1 == 0 && !entries.is_empty() {
            let e = entries[usize::from(op.u8(2)) % entries.len()];
            let start = e.start.wrapping_add(op.u8(3) as i8 as u64);
            let last = e.last.wrapping_add(op.u8(4) as i8 as u64);
            (start, last)
        } else if op.u8(1) & 2 == 0 {
            (0, u64::MAX)
        } else {
            let start = iova(op.u8(2), op.u32(3));
            (start, start.saturating_add(u64::from(op.u16(6)) * 64))
        }
    }

    fn invalidate(&mut self, op: &Op) {
        let (start, last) = self.range(op);
        let before = self.iotlb.entries().len();
        let dropped = self.iotlb.invalidate(start, last);
        assert_eq!(self.iotlb.entries().len(), before - dropped);
        assert!(self
            .iotlb
            .entries()
            .iter()
            .all(|e| !overlaps(e, start, last)));
    }

    /// The core promise: accesses succeed exactly inside mapped entries.
    fn check(&mut self, op: &Op) {
        let entries = self.iotlb.entries();
        for pair in entries.windows(2) {
            assert!(
                pair[0].last < pair[1].start,
                "mapped entries overlap: {pair:?}"
            );
        }
        if self.faithful {
            let kernel = self.kernel.entries.borrow();
            for e in &entries {
                assert!(kernel.contains(e), "stale entry {e:?} still mapped");
            }
        }
        // One odd entry must not make the whole IOVA space unusable.
        let mem = self
            .iotlb
            .memory()
            .unwrap_or_else(|err| panic!("memory() failed: {err} with {entries:?}"));
        assert_eq!(mem.num_regions(), entries.len());
        let mut probes: Vec<u64> = vec![iova(op.u8(1), op.u32(2))];
        for e in entries.iter().chain(self.kernel.entries.borrow().iter()) {
            probes.extend([
                e.start,
                e.last,
                e.start.wrapping_sub(1),
                e.last.wrapping_add(1),
            ]);
        }
        let len = 1 + usize::from(op.u8(6)) % 64;
        for &addr in &probes {
            for (addr, len) in [
                (addr, 1),
                (addr, len),
                (addr.wrapping_sub(len as u64 / 2), len),
            ] {
                self.probe(&mem, &entries, addr, len);
            }
        }
    }

    fn probe(
        &self,
        mem: &vm_memory::GuestMemoryMmap<()>,
        entries: &[IotlbEntry],
        addr: u64,
        len: usize,
    ) {
        let expected = covered(entries, addr, len as u64);
        assert_eq!(
            self.iotlb.is_mapped(addr, len as u64),
            expected,
            "is_mapped({addr:#x}, {len})"
        );
        let mut buf = [0u8; 64];
        let read = mem.read_slice(&mut buf[..len], GuestAddress(addr));
        assert_eq!(
            read.is_ok(),
            expected,
            "read_slice({addr:#x}, {len}): {read:?}"
        );
        // The engine's path to driver buffers (GuestMemory::get_slices, as in worker.rs).
        let slices =
            GuestMemory::get_slices(mem, GuestAddress(addr), len, vm_memory::Permissions::Read);
        let slices_ok = slices.is_ok_and(|mut it| it.all(|s| s.is_ok()));
        assert_eq!(slices_ok, expected, "get_slices({addr:#x}, {len})");
        if !expected {
            assert!(mem.write_slice(&buf[..len], GuestAddress(addr)).is_err());
            return;
        }
        // A one-byte write: reaches the kernel's file for read-write entries, never for
        // read-only ones (they are private copies).
        let e = entries
            .iter()
            .find(|e| e.start <= addr && addr <= e.last)
            .unwrap();
        let file_off = e.offset + (addr - e.start);
        let mut old = [0u8];
        backing_file().read_exact_at(&mut old, file_off).unwrap();
        let new = buf[0] ^ 0x5a;
        mem.write_obj(new, GuestAddress(addr)).unwrap();
        let mut now = [0u8];
        backing_file().read_exact_at(&mut now, file_off).unwrap();
        match e.perm {
            IotlbPerm::ReadWrite => assert_eq!(now[0], new, "write lost at {addr:#x}"),
            _ => assert_eq!(
                now[0], old[0],
                "write into a read-only entry reached the driver"
            ),
        }
    }
}

/// Whether `addr..addr+len` lies inside `entries` (sorted, non-overlapping) without gaps.
fn covered(entries: &[IotlbEntry], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len - 1) else {
        return false;
    };
    let mut cursor = addr;
    for e in entries {
        if e.last < cursor {
            continue;
        }
        if e.start > cursor {
            return false;
        }
        if e.last >= end {
            return true;
        }
        cursor = e.last + 1;
    }
    false
}

fn messages(data: &[u8]) {
    let mut req = [0u8; REQUEST_SIZE];
    let n = data.len().min(REQUEST_SIZE);
    req[..n].copy_from_slice(&data[..n]);
    let m = Message::decode(&req);
    assert_eq!(
        Message::decode(&m.encode()),
        m,
        "request does not round-trip"
    );
    assert_eq!(m.request_id.to_ne_bytes(), req[4..8]);

    let mut resp = [0u8; RESPONSE_SIZE];
    let rest = &data[n..];
    let k = rest.len().min(RESPONSE_SIZE);
    resp[..k].copy_from_slice(&rest[..k]);
    let r = Response::decode(&resp);
    assert_eq!(
        Response::decode(&r.encode()),
        r,
        "response does not round-trip"
    );
}

fuzz_target!(|data: &[u8]| {
    messages(data);
    let program = data.get(REQUEST_SIZE + RESPONSE_SIZE..).unwrap_or(&[]);
    let mut run = Run {
        kernel: FakeKernel {
            entries: RefCell::new(Vec::new()),
        },
        iotlb: IotlbMemory::new(),
        faithful: program.first().is_none_or(|b| b & 0x80 == 0),
    };
    for chunk in program.chunks_exact(8).take(MAX_OPS) {
        let op = Op(chunk);
        match op.u8(0) % 8 {
            0 | 1 => run.add_entry(&op),
            2 => run.remove_entry(&op),
            3 | 4 => run.map_range(&op),
            5 => run.invalidate(&op),
            6 if op.u8(1) == 0 => run.iotlb.clear(),
            _ => {}
        }
        run.check(&op);
    }
});
