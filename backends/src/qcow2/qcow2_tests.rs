//! The backend on images made by `qemu-img` (qemu-utils), checked by `qemu-img check` and
//! `qemu-img compare`.

use super::*;
use crate::{Direction, DriverMemory, IoBuffers, IoRequest, Op};
use std::process::Command;
use vm_memory::{Bytes, GuestAddress};

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) must be installed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// 4 MiB of a pattern that differs in every 512-byte sector.
fn pattern(seed: u8) -> Vec<u8> {
    (0..4u32 << 20)
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8 ^ seed)
        .collect()
}

fn memory() -> Arc<DriverMemory> {
    Arc::new(DriverMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
}

/// Run one request on `q` with its data at address 0 of `mem`.
fn run(
    q: &mut Box<dyn BackendQueue>,
    mem: &Arc<DriverMemory>,
    op: Op,
    offset: u64,
    len: usize,
) -> std::result::Result<u32, i32> {
    let direction = if op == Op::Read {
        Direction::DeviceWrites
    } else {
        Direction::DeviceReads
    };
    let buffers = if matches!(op, Op::Read | Op::Write) {
        IoBuffers::from_segments(mem.clone(), [(GuestAddress(0), len)], direction).unwrap()
    } else {
        IoBuffers::new()
    };
    let req = IoRequest {
        op,
        offset,
        len: len as u64,
        buffers,
    };
    q.submit(req, 1).unwrap();
    q.commit().unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        q.wait().unwrap();
        q.reap(&mut out);
    }
    assert_eq!(out[0].tag, 1);
    out[0].result
}

fn read(
    q: &mut Box<dyn BackendQueue>,
    mem: &Arc<DriverMemory>,
    offset: u64,
    len: usize,
) -> Vec<u8> {
    assert_eq!(run(q, mem, Op::Read, offset, len), Ok(len as u32));
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    buf
}

fn write(q: &mut Box<dyn BackendQueue>, mem: &Arc<DriverMemory>, offset: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(0)).unwrap();
    assert_eq!(
        run(q, mem, Op::Write, offset, data.len()),
        Ok(data.len() as u32)
    );
}

const BUFFERED: Qcow2Options = Qcow2Options {
    read_only: false,
    direct: false,
};

/// Reads of qemu-img's images: plain, compressed clusters, a raw backing file under a qcow2
/// overlay with some clusters of its own; then writes everywhere, checked by qemu-img.
#[test]
fn qemu_img_images_read_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let data = pattern(7);
    std::fs::write(&raw, &data).unwrap();
    let plain = dir.path().join("plain.qcow2");
    let packed = dir.path().join("packed.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&raw), p(&plain)]);
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&raw),
        p(&packed),
    ]);
    let over = dir.path().join("over.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&over),
    ]);
    let mem = memory();
    for (image, direct) in [(&plain, true), (&packed, false), (&over, true)] {
        let backend = Qcow2Backend::open(
            image,
            Qcow2Options {
                read_only: false,
                direct,
            },
        )
        .unwrap();
        assert_eq!(backend.info().capacity, 4 << 20);
        let mut q = backend.queue(8).unwrap();
        assert_eq!(read(&mut q, &mem, 0, 4 << 20), data, "{image:?}");
        assert_eq!(read(&mut q, &mem, 590_336, 4096), data[590_336..594_432]);
        // Writes: inside a cluster, across clusters, unaligned to clusters.
        let new = pattern(99);
        write(&mut q, &mem, 512, &new[..1024]);
        write(&mut q, &mem, 65536 - 4096, &new[..8192]);
        write(&mut q, &mem, 1 << 20, &new[..1 << 20]);
        assert_eq!(run(&mut q, &mem, Op::Flush, 0, 0), Ok(0));
        let mut want = data.clone();
        want[512..1536].copy_from_slice(&new[..1024]);
        want[65536 - 4096..65536 + 4096].copy_from_slice(&new[..8192]);
        want[1 << 20..2 << 20].copy_from_slice(&new[..1 << 20]);
        assert_eq!(read(&mut q, &mem, 0, 4 << 20), want, "{image:?}");
        // Zeroes and discards read back as zeroes.
        assert_eq!(
            run(&mut q, &mem, Op::WriteZeroes { unmap: false }, 4096, 8192),
            Ok(0)
        );
        assert_eq!(run(&mut q, &mem, Op::Discard, 3 << 20, 1 << 20), Ok(0));
        want[4096..12288].fill(0);
        want[3 << 20..4 << 20].fill(0);
        assert_eq!(read(&mut q, &mem, 0, 4 << 20), want, "{image:?}");
        drop(q);
        backend.flush().unwrap();
        drop(backend);
        qemu_img(&["check", p(image)]);
        let expect = dir.path().join("expect.raw");
        std::fs::write(&expect, &want).unwrap();
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(image), p(&expect)]);
    }
    // The backing file was only read.
    assert_eq!(std::fs::read(&raw).unwrap(), data);
}

#[test]
fn qcow2_backing_chain_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&base), "4M"]);
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&mid),
    ]);
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    let mem = memory();
    let data = pattern(3);
    {
        let b = Qcow2Backend::open(&base, BUFFERED).unwrap();
        let mut q = b.queue(4).unwrap();
        write(&mut q, &mem, 0, &data[..1 << 20]);
    }
    {
        let b = Qcow2Backend::open(&mid, BUFFERED).unwrap();
        let mut q = b.queue(4).unwrap();
        write(&mut q, &mem, 65536, &data[..65536]);
    }
    let ro = Qcow2Options {
        read_only: true,
        direct: false,
    };
    let b = Qcow2Backend::open(&top, ro).unwrap();
    assert!(b.info().read_only);
    let mut q = b.queue(4).unwrap();
    let got = read(&mut q, &mem, 0, 1 << 20);
    assert_eq!(got[..65536], data[..65536]);
    assert_eq!(got[65536..131072], data[..65536]);
    assert_eq!(got[131072..], data[131072..1 << 20]);
    assert!(run(&mut q, &mem, Op::Write, 0, 512).is_err(), "read-only");
    for image in [&base, &mid, &top] {
        qemu_img(&["check", p(image)]);
    }
}

/// Turn the backing-format extension of the image at `path` into an unknown one, as in an
/// image written by an old QEMU (qemu-img no longer makes such images).
fn drop_backing_format(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing format extension");
    bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn refused_images() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.qcow2");
    let e = Qcow2Backend::open(&missing, BUFFERED)
        .unwrap_err()
        .to_string();
    assert!(e.contains("qemu-img create -f qcow2"), "{e}");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let e = Qcow2Backend::open(&raw, BUFFERED).unwrap_err().to_string();
    assert!(e.contains("not a qcow2 image"), "{e}");
    // A backing file without a format in the header is refused, not probed.
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-b", p(&raw), "-F", "raw", p(&top)]);
    drop_backing_format(&top);
    let e = Qcow2Backend::open(&top, BUFFERED).unwrap_err().to_string();
    assert!(e.contains("never guessed") && e.contains("-F raw"), "{e}");
    // A missing backing file says which.
    let lost = dir.path().join("lost.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        "-u",
        p(&lost),
        "1M",
    ]);
    let e = Qcow2Backend::open(&lost, BUFFERED).unwrap_err().to_string();
    assert!(
        e.contains("backing file") && e.contains("gone.raw") && e.contains("does not exist"),
        "{e}"
    );
    // Unsupported features.
    let ext = dir.path().join("ext.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        p(&ext),
        "1M",
    ]);
    let e = Qcow2Backend::open(&ext, BUFFERED).unwrap_err().to_string();
    assert!(e.contains("extended L2"), "{e}");
    let zstd = dir.path().join("zstd.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        p(&zstd),
        "1M",
    ]);
    let e = Qcow2Backend::open(&zstd, BUFFERED).unwrap_err().to_string();
    assert!(e.contains("zstd"), "{e}");
    // A raw image that starts like qcow2 is what detect_format names (for the warning).
    assert_eq!(crate::detect_format(&top), Some("qcow2"));
    assert_eq!(crate::detect_format(&raw), None);
}

#[test]
fn cluster_sizes_and_preallocation() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    let data = pattern(11);
    for (i, opts) in [
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=65536,preallocation=metadata",
        "cluster_size=65536,preallocation=falloc",
        "cluster_size=65536,refcount_bits=1",
        "compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("{i}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, p(&img), "4M"]);
        let b = Qcow2Backend::open(
            &img,
            Qcow2Options {
                read_only: false,
                direct: true,
            },
        )
        .unwrap();
        let mut q = b.queue(4).unwrap();
        assert_eq!(read(&mut q, &mem, 0, 65536), vec![0u8; 65536], "{opts}");
        write(&mut q, &mem, 4096, &data[..3 << 20]);
        assert_eq!(read(&mut q, &mem, 4096, 3 << 20), data[..3 << 20], "{opts}");
        assert_eq!(run(&mut q, &mem, Op::Flush, 0, 0), Ok(0));
        drop(q);
        drop(b);
        qemu_img(&["check", p(&img)]);
    }
}

/// The host file size in use: `qemu-img info`'s allocated clusters, from `qemu-img check`.
fn allocated_clusters(path: &Path) -> u64 {
    let out = qemu_img(&["check", "--output=json", p(path)]);
    let at = out
        .find("\"allocated-clusters\": ")
        .expect("allocated-clusters")
        + 22;
    out[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// With one queue, DISCARD frees the clusters (qemu-img check sees fewer allocated and no
/// leak); with two, it only marks them as reading zeroes. Either way they read back as zeroes.
#[test]
fn discard_frees_clusters_with_one_queue_only() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    let data = pattern(5);
    for queues in [1, 2] {
        let img = dir.path().join(format!("d{queues}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", p(&img), "4M"]);
        let b = Qcow2Backend::open(&img, BUFFERED).unwrap();
        let mut q = b.queue(4).unwrap();
        let _other = (queues == 2).then(|| b.queue(4).unwrap());
        write(&mut q, &mem, 0, &data);
        assert_eq!(run(&mut q, &mem, Op::Flush, 0, 0), Ok(0));
        let before = allocated_clusters(&img);
        assert_eq!(run(&mut q, &mem, Op::Discard, 1 << 20, 2 << 20), Ok(0));
        assert_eq!(
            run(&mut q, &mem, Op::WriteZeroes { unmap: true }, 0, 65536),
            Ok(0)
        );
        let mut want = data.clone();
        want[1 << 20..3 << 20].fill(0);
        want[..65536].fill(0);
        assert_eq!(read(&mut q, &mem, 0, 4 << 20), want);
        drop(q);
        drop(_other);
        drop(b);
        let after = allocated_clusters(&img);
        if queues == 1 {
            assert_eq!(
                after,
                before - 33,
                "32 data clusters and the first one freed"
            );
        } else {
            assert_eq!(after, before, "clusters stay allocated with two queues");
        }
    }
}
