//! A descriptor chain as the core hands it to a device: the descriptors collected (indirect
//! tables resolved) with every hostile-input rule applied, and whether the chain ended
//! properly.
//!
//! Chains come from the avail ring (`virtio_queue::DescriptorChain`) or, for requests that a
//! restarted daemon executes again, from a head index ([`HeadChain`]): the same rules either
//! way — at most `size` descriptors per table, an indirect table only at the top level, its
//! length a multiple of 16 and at most 65535 entries, and a chain of at most 4 GiB. A walk
//! that breaks a rule stops early, leaving the chain unterminated.

use std::mem::size_of;
use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainDesc {
    /// Driver address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// The device may write the buffer (VIRTQ_DESC_F_WRITE); otherwise it only reads it.
    pub writable: bool,
}

/// The descriptors of one request. Reused between requests (no allocation on the hot path).
#[derive(Debug, Default, Clone)]
pub struct Chain {
    head: u16,
    descs: Vec<ChainDesc>,
    terminated: bool,
    bad_order: bool,
}

impl Chain {
    /// An empty chain buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Head descriptor index (what the used ring returns).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The descriptors in chain order.
    pub fn descs(&self) -> &[ChainDesc] {
        &self.descs
    }

    /// Whether the walk ended on a descriptor without NEXT (no loop, no index out of range,
    /// no bad indirect table, not too long). A device must refuse an unterminated chain.
    pub fn terminated(&self) -> bool {
        self.terminated
    }

    /// Whether a device-readable descriptor follows a device-writable one (the spec requires
    /// all readable descriptors first).
    pub fn bad_order(&self) -> bool {
        self.bad_order
    }

    /// Collect a chain taken off the avail ring.
    pub fn collect<D>(&mut self, chain: DescriptorChain<D>)
    where
        D: Deref,
        D::Target: GuestMemory,
    {
        self.head = chain.head_index();
        self.fill(chain);
    }

    /// Collect the chain at `head` of the descriptor table at `table` with `size` entries
    /// (for a request no longer on the avail ring: resubmission after a restart).
    pub fn collect_head<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) {
        self.head = head;
        self.fill(HeadChain::new(mem, table, size, head));
    }

    /// A terminated chain of `descs` at `head`, for a device's unit tests (no descriptor
    /// table needed): `Chain::of(0, &[ChainDesc { addr, len, writable: true }])`.
    pub fn of(head: u16, descs: &[ChainDesc]) -> Self {
        let mut chain = Self {
            head,
            descs: descs.to_vec(),
            terminated: !descs.is_empty(),
            bad_order: false,
        };
        let mut seen_writable = false;
        for d in descs {
            chain.bad_order |= seen_writable && !d.writable;
            seen_writable |= d.writable;
        }
        chain
    }

    /// Collect from any descriptor iterator (tests and fuzz targets use this).
    pub fn collect_descriptors(&mut self, head: u16, descs: impl Iterator<Item = Descriptor>) {
        self.head = head;
        self.fill(descs);
    }

    fn fill(&mut self, descs: impl Iterator<Item = Descriptor>) {
        self.descs.clear();
        self.bad_order = false;
        self.terminated = false;
        let mut seen_writable = false;
        for desc in descs {
            let writable = desc.is_write_only();
            self.bad_order |= seen_writable && !writable;
            seen_writable |= writable;
            self.descs.push(ChainDesc {
                addr: desc.addr(),
                len: desc.len(),
                writable,
            });
            self.terminated = !desc.has_next();
        }
    }

    /// Whether this chain looks like it refers to driver memory that is not mapped: it is
    /// empty or cut short (the descriptor table itself may be unmapped), or one of its
    /// buffers is not fully inside `mem` with the access it needs. Transports whose memory
    /// is mapped on demand (VDUSE) re-map and collect the chain again when this is true.
    pub fn faults_in<M: GuestMemory + ?Sized>(&self, mem: &M) -> bool {
        !self.terminated
            || self.descs.iter().any(|d| {
                let perm = if d.writable {
                    Permissions::Write
                } else {
                    Permissions::Read
                };
                d.len > 0 && !mem.check_range(d.addr, d.len as usize, perm)
            })
    }
}

/// Iterator over the descriptors of the chain starting at `head` (see the module docs).
///
/// `virtio_queue::DescriptorChain` cannot be built from a head index outside that crate, so
/// this is a small equivalent with the same rules.
pub struct HeadChain<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemory + ?Sized> HeadChain<'a, M> {
    /// The chain at `head` of the descriptor table at `table` with `size` entries.
    pub fn new(mem: &'a M, table: GuestAddress, size: u16, head: u16) -> Self {
        Self {
            mem,
            table,
            size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemory + ?Sized> Iterator for HeadChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let addr = self
            .table
            .checked_add(u64::from(self.next) * size_of::<Descriptor>() as u64)?;
        let desc: Descriptor = self.mem.read_obj(addr).ok()?;
        if desc.refers_to_indirect_table() {
            if self.indirect
                || !desc.len().is_multiple_of(16)
                || desc.len() / 16 > u32::from(u16::MAX)
            {
                return None;
            }
            self.table = desc.addr();
            self.size = (desc.len() / 16) as u16;
            self.next = 0;
            self.ttl = self.size;
            self.indirect = true;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(
        mem: &GuestMemoryMmap<()>,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u32,
        next: u16,
    ) {
        let d = Descriptor::new(addr, len, flags as u16, next);
        mem.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn collects_a_chain_in_order_and_flags_writable_descriptors() {
        let m = mem();
        put(&m, TABLE, 0, 0x4000, 16, VRING_DESC_F_NEXT, 1);
        put(
            &m,
            TABLE,
            1,
            0x5000,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        );
        put(&m, TABLE, 2, 0x6000, 1, VRING_DESC_F_WRITE, 0);
        let mut c = Chain::new();
        c.collect_head(&m, GuestAddress(TABLE), 8, 0);
        assert!(c.terminated() && !c.bad_order());
        assert_eq!(c.descs().len(), 3);
        assert!(!c.descs()[0].writable && c.descs()[2].writable);
        assert!(!c.faults_in(&m));
    }

    #[test]
    fn loops_bad_indexes_and_nested_indirect_tables_leave_the_chain_unterminated() {
        let m = mem();
        // A loop: 0 -> 1 -> 0.
        put(&m, TABLE, 0, 0x4000, 16, VRING_DESC_F_NEXT, 1);
        put(&m, TABLE, 1, 0x4000, 16, VRING_DESC_F_NEXT, 0);
        let mut c = Chain::new();
        c.collect_head(&m, GuestAddress(TABLE), 8, 0);
        assert!(!c.terminated());
        assert!(
            c.faults_in(&m),
            "a cut-short chain may be an unmapped table"
        );
        // NEXT out of range.
        put(&m, TABLE, 0, 0x4000, 16, VRING_DESC_F_NEXT, 9);
        c.collect_head(&m, GuestAddress(TABLE), 8, 0);
        assert!(!c.terminated());
        // An indirect table inside an indirect table.
        put(&m, TABLE, 0, 0x8000, 32, VRING_DESC_F_INDIRECT, 0);
        put(&m, 0x8000, 0, 0x9000, 16, VRING_DESC_F_INDIRECT, 0);
        c.collect_head(&m, GuestAddress(TABLE), 8, 0);
        assert!(!c.terminated());
        // A head outside the table.
        c.collect_head(&m, GuestAddress(TABLE), 8, 8);
        assert!(c.descs().is_empty() && !c.terminated());
    }

    #[test]
    fn a_chain_built_for_a_test_has_the_same_properties() {
        let w = |addr| ChainDesc {
            addr: GuestAddress(addr),
            len: 8,
            writable: true,
        };
        let r = ChainDesc {
            writable: false,
            ..w(0x4000)
        };
        let c = Chain::of(3, &[r, w(0x5000)]);
        assert!(c.terminated() && !c.bad_order() && c.head() == 3);
        assert!(Chain::of(0, &[w(0x5000), r]).bad_order());
        assert!(!Chain::of(0, &[]).terminated());
    }

    #[test]
    fn a_buffer_outside_memory_is_a_fault_and_readable_after_writable_is_bad_order() {
        let m = mem();
        put(
            &m,
            TABLE,
            0,
            0x5000,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            1,
        );
        put(&m, TABLE, 1, 0xfff0, 32, 0, 0);
        let mut c = Chain::new();
        c.collect_head(&m, GuestAddress(TABLE), 8, 0);
        assert!(c.terminated() && c.bad_order());
        assert!(
            c.faults_in(&m),
            "the second buffer straddles the end of memory"
        );
    }
}
