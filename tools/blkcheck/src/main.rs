//! `virtiod-blkcheck DRIVER PATH MIB`: write MIB MiB of a pattern through libblkio's
//! `DRIVER` (virtio-blk-vhost-user or virtio-blk-vhost-vdpa) at `PATH`, read it back and
//! compare. Prints `blkcheck: OK ...` and exits 0 on success. Used by the VM test suites.
//!
//! `virtiod-blkcheck stream ...` and `virtiod-blkcheck now`: a timed write stream on a block
//! device (see `stream.rs`).

mod stream;

use std::mem::MaybeUninit;

use anyhow::{bail, Context};
use blkio::{Blkio, Completion, ReqFlags};

const CHUNK: usize = 1 << 20;

fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (offset >> 20) as u8
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("now") => {
            println!("{}", stream::now_ns());
            return Ok(());
        }
        Some("stream") => {
            let [_, _, device, mib, stop, events] = args.as_slice() else {
                bail!("usage: virtiod-blkcheck stream DEVICE MIB STOP_FILE EVENTS_FILE");
            };
            let mib = mib.parse().context("MIB must be a number")?;
            return stream::run(device, mib, stop.as_ref(), events.as_ref());
        }
        _ => {}
    }
    let [_, driver, path, mib] = args.as_slice() else {
        bail!("usage: virtiod-blkcheck DRIVER PATH MIB");
    };
    let mib: u64 = mib.parse().context("MIB must be a number")?;
    let mut b = Blkio::new(driver).context("unknown libblkio driver")?;
    b.set_str("path", path)?;
    b.connect()
        .with_context(|| format!("connecting to {path}"))?;
    let mut queues = b.start()?.queues;
    let capacity = b.get_u64("capacity")?;
    if capacity < mib << 20 {
        bail!("device has {capacity} bytes, fewer than {mib} MiB");
    }
    let q = queues.first_mut().context("the driver started no queue")?;
    let region = b.alloc_mem_region(CHUNK)?;
    b.map_mem_region(&region)?;
    // SAFETY: the region is CHUNK bytes of memory libblkio allocated for us; it stays
    // allocated while `b` lives and no request is in flight while the slice is used.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, CHUNK) };
    let mut done = [MaybeUninit::<Completion>::uninit()];
    let mut run = |q: &mut blkio::Blkioq, what: &str| -> anyhow::Result<()> {
        let n = q.do_io(&mut done, 1, None, None)?;
        // SAFETY: do_io initialised `n` (= 1) completions.
        let c = unsafe { done[..n][0].assume_init_ref() };
        if c.ret != 0 {
            bail!("{what} failed: {}", c.ret);
        }
        Ok(())
    };
    for chunk in 0..mib {
        let base = chunk * CHUNK as u64;
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = pattern(base + i as u64);
        }
        q.write(base, buf.as_ptr(), CHUNK, 0, ReqFlags::empty());
        run(q, "write")?;
    }
    q.flush(0, ReqFlags::empty());
    run(q, "flush")?;
    for chunk in 0..mib {
        let base = chunk * CHUNK as u64;
        buf.fill(0);
        q.read(base, buf.as_mut_ptr(), CHUNK, 0, ReqFlags::empty());
        run(q, "read")?;
        if let Some(i) = (0..CHUNK).find(|&i| buf[i] != pattern(base + i as u64)) {
            bail!("mismatch at byte {}", base + i as u64);
        }
    }
    println!("blkcheck: OK {mib} MiB written and verified through {driver} {path}");
    Ok(())
}
