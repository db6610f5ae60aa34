//! `virtiod-bench`: a load generator for vhost-user-blk servers (virtiod, qemu-storage-daemon).
//!
//! Drives one virtqueue through libblkio's `virtio-blk-vhost-user` driver at a fixed queue depth
//! and prints one line of JSON: IOPS, mean/p50/p99 latency, total I/Os and seconds.
//! The hot loop allocates nothing: a fixed ring of buffers (one per slot), a fixed completion
//! array, a fixed-size histogram and an xorshift PRNG for offsets.

mod hist;

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};

use hist::Histogram;

/// Load generator for a vhost-user-blk socket; prints one JSON line.
#[derive(Debug, Parser)]
#[command(name = "virtiod-bench", version, about)]
struct Args {
    /// The vhost-user-blk unix socket of the server.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1)]
    queue_depth: usize,
    /// Bytes per request (a multiple of 512).
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Run for this many seconds (default 5 unless --ios is given).
    #[arg(long, conflicts_with = "ios")]
    seconds: Option<f64>,
    /// Run until this many requests have completed.
    #[arg(long)]
    ios: Option<u64>,
    /// Use a polling queue (no used-ring notifications; the client spins).
    #[arg(long)]
    poll: bool,
    /// Bytes of the disk addressed, from offset 0 (default: the whole capacity).
    #[arg(long, value_name = "BYTES")]
    span: Option<u64>,
    /// Virtqueue size negotiated by the client (default: 256, or the queue depth if larger).
    #[arg(long)]
    queue_size: Option<u32>,
    /// Fail if no request completes for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    stall_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Rw {
    fn is_write(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write)
    }
    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
}

/// Block-aligned offsets: xorshift64* for random, wrapping for sequential.
struct Offsets {
    state: u64,
    next_block: u64,
    blocks: u64,
    block_size: u64,
    random: bool,
}

impl Offsets {
    fn new(span: u64, block_size: u64, random: bool) -> Self {
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
            next_block: 0,
            blocks: span / block_size,
            block_size,
            random,
        }
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let block = if self.random {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let r = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            // Multiply-high maps r uniformly onto 0..blocks without a division.
            ((r as u128 * self.blocks as u128) >> 64) as u64
        } else {
            let b = self.next_block;
            self.next_block = (b + 1) % self.blocks;
            b
        };
        block * self.block_size
    }
}

/// What one run measured.
struct Report {
    ios: u64,
    seconds: f64,
    hist: Histogram,
    client_cpu_seconds: f64,
}

fn cpu_seconds() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer we pass, which is valid for writes.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded and filled the struct (it was zeroed before anyway).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Connect and start one queue (interrupt-driven or polling).
fn connect(args: &Args) -> Result<(Blkio, Blkioq)> {
    let path = args.socket.to_str().context("socket path is not UTF-8")?;
    let mut blkio = Blkio::new("virtio-blk-vhost-user").context("libblkio driver")?;
    blkio.set_str("path", path)?;
    blkio
        .connect()
        .with_context(|| format!("connecting to {path}"))?;
    let queue_size = args
        .queue_size
        .unwrap_or_else(|| (args.queue_depth as u32).next_power_of_two().max(256));
    blkio.set_i32("queue-size", queue_size as i32)?;
    if args.poll {
        blkio.set_i32("num-queues", 0)?;
        blkio.set_i32("num-poll-queues", 1)?;
    } else {
        blkio.set_i32("num-queues", 1)?;
    }
    let started = blkio.start().context("starting the device")?;
    let queue = if args.poll {
        started.poll_queues.into_iter().next()
    } else {
        started.queues.into_iter().next()
    };
    Ok((blkio, queue.context("libblkio returned no queue")?))
}

fn run(args: &Args) -> Result<Report> {
    let bs = args.block_size;
    let qd = args.queue_depth;
    ensure!(
        bs >= 512 && bs.is_multiple_of(512),
        "--block-size must be a multiple of 512"
    );
    ensure!(qd >= 1, "--queue-depth must be at least 1");

    let (mut blkio, mut queue) = connect(args)?;
    let capacity = blkio.get_u64("capacity")?;
    let span = args.span.unwrap_or(capacity).min(capacity);
    ensure!(span >= bs as u64, "span {span} is smaller than one block");

    // One buffer per in-flight slot, in one mapped region.
    let align = blkio.get_u64("mem-region-alignment")?.max(4096) as usize;
    let region_len = (qd * bs).div_ceil(align) * align;
    let region = blkio.alloc_mem_region(region_len)?;
    blkio.map_mem_region(&region)?;
    let buf = |slot: usize| (region.addr + slot * bs) as *mut u8;
    if args.rw.is_write() {
        // SAFETY: the region is `region_len` bytes mapped for us; nothing is in flight yet.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region_len) };
    }

    let mut offsets = Offsets::new(span, bs as u64, args.rw.is_random());
    let is_write = args.rw.is_write();
    let submit = |queue: &mut Blkioq, offsets: &mut Offsets, slot: usize| {
        let offset = offsets.next();
        if is_write {
            queue.write(offset, buf(slot), bs, slot, ReqFlags::empty());
        } else {
            queue.read(offset, buf(slot), bs, slot, ReqFlags::empty());
        }
    };

    let ios_limit = args.ios.unwrap_or(u64::MAX);
    let run_for = match (args.seconds, args.ios) {
        (Some(s), _) => Duration::from_secs_f64(s),
        (None, Some(_)) => Duration::MAX,
        (None, None) => Duration::from_secs(5),
    };
    let stall = Duration::from_secs_f64(args.stall_seconds);

    let mut hist = Histogram::new();
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let deadline = start.checked_add(run_for);
    let mut submitted_at = vec![start; qd];
    let mut submitted = 0u64;
    let mut in_flight = 0usize;
    let mut last = start;

    for (slot, at) in submitted_at.iter_mut().enumerate() {
        if submitted == ios_limit {
            break;
        }
        *at = Instant::now();
        submit(&mut queue, &mut offsets, slot);
        submitted += 1;
        in_flight += 1;
    }

    while in_flight > 0 {
        let got = if args.poll {
            queue.do_io(&mut completions, 0, None, None)
        } else {
            let mut timeout = stall;
            queue.do_io(&mut completions, 1, Some(&mut timeout), None)
        };
        let got = match got {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => {
                bail!("no completion for {stall:?} ({in_flight} in flight): server hung or gone")
            }
            Err(e) => return Err(e).context("do_io"),
        };
        let now = Instant::now();
        if got == 0 {
            if now.duration_since(last) > stall {
                bail!("no completion for {stall:?} ({in_flight} in flight): server hung or gone");
            }
            continue;
        }
        last = now;
        let more = submitted < ios_limit && deadline.is_none_or(|d| now < d);
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if c.ret != 0 {
                bail!(
                    "{} request failed: ret {} ({})",
                    args.rw.name(),
                    c.ret,
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            hist.record(now.duration_since(submitted_at[slot]).as_nanos() as u64);
            in_flight -= 1;
            if more && submitted < ios_limit {
                submitted_at[slot] = now;
                submit(&mut queue, &mut offsets, slot);
                submitted += 1;
                in_flight += 1;
            }
        }
    }

    let seconds = last.duration_since(start).as_secs_f64();
    let client_cpu_seconds = cpu_seconds() - cpu_start;
    Ok(Report {
        ios: hist.count(),
        seconds,
        hist,
        client_cpu_seconds,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let r = run(&args)?;
    let iops = if r.seconds > 0.0 {
        r.ios as f64 / r.seconds
    } else {
        0.0
    };
    println!(
        "{{\"rw\":\"{}\",\"block_size\":{},\"queue_depth\":{},\"poll\":{},\"ios\":{},\"seconds\":{:.3},\"iops\":{:.0},\"lat_mean_us\":{:.2},\"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2},\"client_cpu_us_per_io\":{:.3}}}",
        args.rw.name(),
        args.block_size,
        args.queue_depth,
        args.poll,
        r.ios,
        r.seconds,
        iops,
        r.hist.mean_ns() / 1e3,
        r.hist.quantile_ns(0.50) / 1e3,
        r.hist.quantile_ns(0.99) / 1e3,
        if r.ios > 0 { r.client_cpu_seconds * 1e6 / r.ios as f64 } else { 0.0 },
    );
    Ok(())
}
