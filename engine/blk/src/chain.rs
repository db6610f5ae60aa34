//! Walking a descriptor chain from a known head index, for requests that must be resubmitted
//! after a daemon restart (they are no longer on the avail ring).
//!
//! `virtio_queue::DescriptorChain` cannot be built from a head index outside that crate, so
//! this is a small equivalent with the same hostile-input rules: at most `size` descriptors
//! per table, an indirect table only at the top level, its length a multiple of 16 and at
//! most 65535 entries, and a chain of at most 4 GiB. Like `DescriptorChain`, it stops early
//! on any violation, leaving the last descriptor with NEXT set so `parse` rejects it.

use std::mem::size_of;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Iterator over the descriptors of the chain starting at `head`.
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
