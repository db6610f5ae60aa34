//! Fuzz the qcow2 header checks and, for headers they accept, opening the image and reading it
//! through `imago`'s metadata (L1/L2 tables, refcounts, compressed clusters).
//!
//! The input is the whole image file (in a memfd). Checked: no panic, no hang; an accepted
//! header has a cluster size and a virtual size within the format's limits; reads of an
//! opened image either succeed or fail with an errno.
//!
//! Seeds (`corpus/qcow2_header/seed-*`) are images made by qemu-img:
//! `create -f qcow2 -o cluster_size=512 seed-empty-512 64K`; `convert -c -O qcow2 -o
//! cluster_size=512` of 32 KiB of runs of one byte per sector then 32 KiB of zeroes
//! (`seed-compressed-512`); `convert -O qcow2 -o cluster_size=4096,compat=0.10` of 64 KiB of
//! random bytes with a zeroed middle (`seed-v2-4k`); `create -f qcow2 -o cluster_size=512 -b
//! r.raw -F raw seed-backing` (its backing file is not followed by the target).
#![no_main]

use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtiod_backend::{
    parse_qcow2_header, Backend, Direction, DriverMemory, IoBuffers, IoRequest, Op, Qcow2Backend,
    Qcow2Options,
};
use vm_memory::GuestAddress;

fn image_file(data: &[u8]) -> std::fs::File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).unwrap();
    file
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_qcow2_header(data, data.len() as u64) else {
        return;
    };
    assert!((9..=21).contains(&header.cluster_bits));
    assert!(header.size > 0 && header.size % 512 == 0);
    // Backing files would be looked up on the host: only self-contained images go further.
    if header.backing.is_some() {
        return;
    }
    let file = image_file(data);
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let opts = Qcow2Options {
        read_only: true,
        direct: false,
    };
    let Ok(backend) = Qcow2Backend::open(Path::new(&path), opts) else {
        return;
    };
    assert_eq!(backend.info().capacity, header.size);
    let mem = Arc::new(DriverMemory::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap());
    let mut queue = backend.queue(2).unwrap();
    let cluster = 1u64 << header.cluster_bits;
    for offset in [0, cluster, header.size.saturating_sub(4096)] {
        if offset >= header.size {
            continue; // a cluster larger than the disk
        }
        let len = 4096.min(header.size - offset) as usize;
        let buffers = IoBuffers::from_segments(
            mem.clone(),
            [(GuestAddress(0), len)],
            Direction::DeviceWrites,
        )
        .unwrap();
        let req = IoRequest {
            op: Op::Read,
            offset,
            len: len as u64,
            buffers,
        };
        queue.submit(req, 0).unwrap();
        queue.commit().unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            queue.wait().unwrap();
            queue.reap(&mut out);
        }
        if let Ok(n) = out[0].result {
            assert_eq!(n as usize, len);
        }
    }
});
