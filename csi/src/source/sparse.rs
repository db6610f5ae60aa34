//! Copying a sparse image file so that it stays sparse.
//!
//! `std::fs::copy` uses `copy_file_range`, which on ext4 (and any filesystem without reflinks)
//! reads a hole as zeros and writes them: a 1 GiB volume holding 10 MiB of data would cost
//! 1 GiB on disk as a snapshot. Here only the data extents (`SEEK_DATA`/`SEEK_HOLE`) are
//! copied, with `copy_file_range` (in the kernel, a reflink where the filesystem has them);
//! the holes stay holes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;

/// Copy every data extent of `src` to the same offset of `dst` and give `dst` the length of
/// `src`. `dst` should be new and empty (what it held is not cleared).
pub fn copy(src: &File, dst: &File) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut offset = 0;
    while offset < len {
        let start = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // No data past `offset`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(src, SeekFrom::Hole(start))?.min(len);
        copy_range(src, dst, start, end)?;
        offset = end;
    }
    dst.set_len(len)?;
    Ok(len)
}

/// Copy bytes `start..end` of `src` to the same offsets of `dst`.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let (mut from, mut to) = (start, start);
    while from < end {
        let chunk = (end - from).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            // A filesystem that cannot: copy through a buffer.
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::NOSYS,
            ) => return copy_buffered(src, dst, from, end),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_buffered(src: &File, dst: &File, mut from: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while from < end {
        let want = (end - from).min(buf.len() as u64) as usize;
        let got = src.read_at(&mut buf[..want], from)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        dst.write_all_at(&buf[..got], from)?;
        from += got as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn data_is_copied_and_holes_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let src = File::create_new(&a).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(&[0xa5; 8192], 1 << 20).unwrap();
        src.write_all_at(b"end", (64 << 20) - 3).unwrap();
        src.sync_all().unwrap();
        let src = File::open(&a).unwrap();
        let dst = File::create_new(&b).unwrap();
        assert_eq!(copy(&src, &dst).unwrap(), 64 << 20);
        let copied = std::fs::read(&b).unwrap();
        assert_eq!(copied, std::fs::read(&a).unwrap());
        let blocks = std::fs::metadata(&b).unwrap().blocks() * 512;
        eprintln!("64 MiB with 8 KiB + 3 bytes of data: {blocks} bytes allocated in the copy");
        assert!(blocks < 1 << 20, "the copy is not sparse: {blocks} bytes");
        // Empty and all-hole files.
        let (c, d) = (dir.path().join("c"), dir.path().join("d"));
        File::create_new(&c).unwrap().set_len(4 << 20).unwrap();
        let dst = File::create_new(&d).unwrap();
        copy(&File::open(&c).unwrap(), &dst).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().len(), 4 << 20);
        assert_eq!(std::fs::metadata(&d).unwrap().blocks(), 0);
    }
}
