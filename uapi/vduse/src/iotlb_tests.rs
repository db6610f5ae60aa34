//! IOTLB bookkeeping tests: a temporary file stands in for the VDUSE IOTLB fd.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;

const PAGE: u64 = 4096;

/// A fake kernel: a list of entries, all backed by one file.
struct FakeIotlb {
    file: File,
    entries: RefCell<Vec<IotlbEntry>>,
    calls: Cell<usize>,
}

fn temp_file(len: u64) -> File {
    let path = std::env::temp_dir().join(format!(
        "vduse-iotlb-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(len).unwrap();
    file
}

impl FakeIotlb {
    fn new(entries: Vec<IotlbEntry>) -> Self {
        FakeIotlb {
            file: temp_file(64 * PAGE),
            entries: RefCell::new(entries),
            calls: Cell::new(0),
        }
    }
}

impl IotlbSource for FakeIotlb {
    fn iotlb_get_fd(&self, start: u64, last: u64) -> Result<Option<(IotlbEntry, OwnedFd)>> {
        self.calls.set(self.calls.get() + 1);
        let entries = self.entries.borrow();
        let hit = entries
            .iter()
            .filter(|e| e.start <= last && e.last >= start)
            .min_by_key(|e| e.start)
            .copied();
        Ok(hit.map(|e| (e, OwnedFd::from(self.file.try_clone().unwrap()))))
    }
}

fn entry(start: u64, pages: u64, offset: u64, perm: IotlbPerm) -> IotlbEntry {
    IotlbEntry {
        start,
        last: start + (pages * PAGE - 1),
        offset,
        perm,
    }
}

#[test]
fn map_all_places_entries_at_their_iova_and_shares_the_file() {
    let src = FakeIotlb::new(vec![
        entry(0, 4, 0, IotlbPerm::ReadWrite),
        entry(0x10_0000, 2, 8 * PAGE, IotlbPerm::ReadWrite),
    ]);
    let mem = IotlbMemory::map_all(&src).unwrap();
    assert_eq!(mem.num_regions(), 2);
    // A write at IOVA 0x10_0010 reaches file offset 8 pages + 0x10.
    mem.write_slice(b"hello", GuestAddress(0x10_0010)).unwrap();
    let mut back = [0u8; 5];
    src.file.read_exact_at(&mut back, 8 * PAGE + 0x10).unwrap();
    assert_eq!(&back, b"hello");
    // And driver-side writes are visible to the device.
    src.file.write_all_at(b"driver", 100).unwrap();
    let mut seen = [0u8; 6];
    mem.read_slice(&mut seen, GuestAddress(100)).unwrap();
    assert_eq!(&seen, b"driver");
    // Walk: entry 1, entry 2, then one final miss.
    assert_eq!(src.calls.get(), 3);
}

#[test]
fn accesses_outside_entries_fail_instead_of_crashing() {
    let src = FakeIotlb::new(vec![entry(0, 1, 0, IotlbPerm::ReadWrite)]);
    let mem = IotlbMemory::map_all(&src).unwrap();
    assert!(mem.write_slice(&[1, 2], GuestAddress(PAGE - 1)).is_err());
    assert!(mem.read_obj::<u64>(GuestAddress(PAGE * 10)).is_err());
}

#[test]
fn read_only_entry_is_readable_and_writes_never_reach_the_driver() {
    let src = FakeIotlb::new(vec![
        entry(0, 1, 0, IotlbPerm::ReadOnly),
        entry(PAGE, 1, PAGE, IotlbPerm::ReadWrite),
    ]);
    src.file.write_all_at(b"from-driver", 0).unwrap();
    let mut iotlb = IotlbMemory::new();
    iotlb.map_range(&src, 0, u64::MAX).unwrap();
    let mem = iotlb.memory().unwrap();
    let mut seen = [0u8; 11];
    mem.read_slice(&mut seen, GuestAddress(0)).unwrap();
    assert_eq!(&seen, b"from-driver");
    // A device write into the read-only entry does not fault ...
    mem.write_slice(b"DEVICE", GuestAddress(0)).unwrap();
    // ... and the driver's memory is untouched.
    let mut file_bytes = [0u8; 11];
    src.file.read_exact_at(&mut file_bytes, 0).unwrap();
    assert_eq!(&file_bytes, b"from-driver");
    // Engines can check before writing.
    assert!(!iotlb.is_writable(0, 16));
    assert!(!iotlb.is_writable(PAGE - 8, 16));
    assert!(iotlb.is_writable(PAGE, 16));
    assert!(iotlb.is_mapped(0, 2 * PAGE));
    assert!(!iotlb.is_mapped(0, 2 * PAGE + 1));
}

#[test]
fn write_only_entries_are_skipped() {
    let src = FakeIotlb::new(vec![
        entry(0, 1, 0, IotlbPerm::WriteOnly),
        entry(PAGE, 1, PAGE, IotlbPerm::ReadWrite),
    ]);
    let mut iotlb = IotlbMemory::new();
    assert_eq!(iotlb.map_range(&src, 0, u64::MAX).unwrap(), 1);
    let mem = iotlb.memory().unwrap();
    assert!(mem.read_obj::<u32>(GuestAddress(0)).is_err());
    assert!(mem.read_obj::<u32>(GuestAddress(PAGE)).is_ok());
}

#[test]
fn on_demand_mapping_asks_only_for_gaps() {
    let src = FakeIotlb::new(vec![
        entry(0, 2, 0, IotlbPerm::ReadWrite),
        entry(4 * PAGE, 2, 4 * PAGE, IotlbPerm::ReadWrite),
    ]);
    let mut iotlb = IotlbMemory::new();
    assert_eq!(iotlb.map_range(&src, 0x10, 0x20).unwrap(), 1);
    assert_eq!(src.calls.get(), 1);
    // Already mapped: no kernel call.
    assert_eq!(iotlb.map_range(&src, 0, 2 * PAGE - 1).unwrap(), 0);
    assert_eq!(src.calls.get(), 1);
    // The whole space: only the gaps are asked about, the known entry is not remapped.
    assert_eq!(iotlb.map_range(&src, 0, u64::MAX).unwrap(), 1);
    assert_eq!(iotlb.entries().len(), 2);
    let calls = src.calls.get();
    assert_eq!(iotlb.map_range(&src, 0, u64::MAX).unwrap(), 0);
    assert!(src.calls.get() - calls <= 2, "gap queries only");
}

#[test]
fn invalidation_drops_overlaps_and_old_snapshots_stay_usable() {
    let src = FakeIotlb::new(vec![
        entry(0, 1, 0, IotlbPerm::ReadWrite),
        entry(PAGE, 1, PAGE, IotlbPerm::ReadWrite),
        entry(8 * PAGE, 1, 8 * PAGE, IotlbPerm::ReadWrite),
    ]);
    let mut iotlb = IotlbMemory::new();
    iotlb.map_range(&src, 0, u64::MAX).unwrap();
    let old = iotlb.memory().unwrap();
    assert!(
        Arc::ptr_eq(&old, &iotlb.memory().unwrap()),
        "cached until a change"
    );
    // The driver unmaps page 1 and maps a different page there read-only.
    src.entries.borrow_mut()[1] = entry(PAGE, 1, 16 * PAGE, IotlbPerm::ReadOnly);
    assert_eq!(iotlb.invalidate(PAGE + 8, PAGE + 9), 1);
    assert_eq!(iotlb.invalidate(3 * PAGE, 4 * PAGE), 0);
    let mid = iotlb.memory().unwrap();
    assert_eq!(mid.num_regions(), 2);
    assert!(mid.read_obj::<u8>(GuestAddress(PAGE)).is_err());
    // The old snapshot still works (in-flight requests keep their mapping).
    old.write_obj(7u8, GuestAddress(PAGE)).unwrap();
    // Remap on demand picks up the new entry.
    assert_eq!(iotlb.map_range(&src, PAGE, PAGE).unwrap(), 1);
    assert_eq!(iotlb.entries()[1].offset, 16 * PAGE);
    assert!(!iotlb.is_writable(PAGE, 1));
    iotlb.clear();
    assert_eq!(iotlb.memory().unwrap().num_regions(), 0);
}

#[test]
fn entry_ending_at_the_top_of_the_space_stops_the_walk() {
    let top = u64::MAX - PAGE + 1;
    let src = FakeIotlb::new(vec![entry(top, 1, 0, IotlbPerm::ReadWrite)]);
    let mut iotlb = IotlbMemory::new();
    // vm-memory refuses regions whose end overflows; either way no infinite loop.
    let _ = iotlb.map_range(&src, 0, u64::MAX);
    assert_eq!(src.calls.get(), 1);
}

/// Regression (fuzz target vduse_message): an entry ending at u64::MAX was mapped, and
/// every later `memory()` then failed ("region end overflows"), taking the whole IOVA space
/// down with it. It is skipped now; the other entries stay usable.
#[test]
fn entry_ending_at_the_top_of_the_space_does_not_break_the_snapshot() {
    let top = u64::MAX - PAGE + 1;
    for perm in [IotlbPerm::ReadOnly, IotlbPerm::ReadWrite] {
        let src = FakeIotlb::new(vec![
            entry(0, 1, 0, IotlbPerm::ReadWrite),
            entry(top, 1, PAGE, perm),
        ]);
        let mut iotlb = IotlbMemory::new();
        assert_eq!(iotlb.map_range(&src, 0, u64::MAX).unwrap(), 1);
        let mem = iotlb.memory().unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(0)).is_ok());
        assert!(mem.read_obj::<u8>(GuestAddress(top)).is_err());
        assert!(mem.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
        assert!(!iotlb.is_mapped(top, 1));
    }
}

#[test]
fn unaligned_offsets_are_refused() {
    let src = FakeIotlb::new(vec![entry(0, 1, 100, IotlbPerm::ReadWrite)]);
    let err = IotlbMemory::map_all(&src).unwrap_err();
    assert!(err.to_string().contains("page-aligned"), "{err}");
}
