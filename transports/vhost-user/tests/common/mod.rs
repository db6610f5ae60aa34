//! Test support for the vhost-user transport: a virtio-blk device over an image file, served
//! in this process, and a libblkio client that writes a verified stream to it.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use virtiod_backend::OpenOptions;
use virtiod_blk::{BlkConfig, BlkDevice};
use virtiod_core::Device;
use virtiod_vhost_user::{bind_socket, Server, VhostUserDevice};

pub use virtiod_testkit::scratch::Scratch;

pub const MIB: u64 = 1 << 20;

/// Images in a [`Scratch`] directory.
pub trait ScratchImage {
    /// A zero-filled (sparse) image of `len` bytes called `file`.
    fn image(&self, file: &str, len: u64) -> PathBuf;
}

impl ScratchImage for Scratch {
    fn image(&self, file: &str, len: u64) -> PathBuf {
        let p = self.path(file);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(len))
            .unwrap_or_else(|e| panic!("cannot create the image {}: {e}", p.display()));
        p
    }
}

/// A virtio-blk device (two queues of 256) over `image`, as `virtiod` builds it.
pub fn blk(image: &Path) -> Arc<dyn Device> {
    blk_device(image)
}

/// [`blk`], as its own type (to resize it).
pub fn blk_device(image: &Path) -> Arc<BlkDevice> {
    let backend = virtiod_backend::open(
        image.to_str().unwrap(),
        OpenOptions {
            read_only: false,
            buffered: true,
        },
    )
    .unwrap();
    let cfg = BlkConfig::new(&backend.info(), 2, 256, "handover");
    Arc::new(BlkDevice::new(cfg, backend))
}

/// A new vhost-user device over `image`, not served.
pub fn device(image: &Path) -> Arc<VhostUserDevice> {
    VhostUserDevice::new(blk(image), Duration::ZERO).unwrap()
}

/// A device over `image` served on `socket`.
pub fn serve(image: &Path, socket: &Path, name: &str) -> Server {
    let dev = device(image);
    let listener = bind_socket(socket).unwrap();
    dev.spawn(listener, socket, name, |r| panic!("serving ended: {r:?}"))
        .unwrap()
}

/// A libblkio virtio-blk-vhost-user client with one buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, buf_len: usize) -> Self {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.connect().unwrap();
        blkio.set_i32("num-queues", 1).unwrap();
        let queues = blkio.start().unwrap().queues;
        let region = blkio.alloc_mem_region(buf_len).unwrap();
        blkio.map_mem_region(&region).unwrap();
        Self {
            blkio,
            queues,
            region,
        }
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` bytes of memory allocated by libblkio for us and stays
        // mapped while `self` lives; no request uses the bytes while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn buf_ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    /// Wait for at least one completion; returns (user_data, ret) of each.
    pub fn wait_some(&mut self) -> Vec<(usize, i32)> {
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..16).map(|_| MaybeUninit::uninit()).collect();
        let mut timeout = Duration::from_secs(30);
        let got = self.queues[0]
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert!(got > 0, "timed out waiting for completions");
        completions[..got]
            .iter()
            // SAFETY: do_io initialised the first `got` entries.
            .map(|c| unsafe { c.assume_init_ref() })
            .map(|c| (c.user_data, c.ret))
            .collect()
    }

    /// Read `len` bytes at `offset` into the buffer at 0; returns ret.
    pub fn read(&mut self, offset: u64, len: usize) -> i32 {
        let p = self.buf_ptr(0);
        self.queues[0].read(offset, p, len, 0, ReqFlags::empty());
        self.wait_some()[0].1
    }

    /// Write the pattern of `seed` at `offset` (`len` bytes from the buffer at 0).
    pub fn write(&mut self, offset: u64, len: usize, seed: u64) -> i32 {
        fill_pattern(&mut self.buf()[..len], offset, seed);
        let p = self.buf_ptr(0);
        self.queues[0].write(offset, p, len, 0, ReqFlags::empty());
        self.wait_some()[0].1
    }
}

/// The test pattern: a function of the absolute disk offset and a seed.
pub fn pattern_byte(offset: u64, seed: u64) -> u8 {
    let x = (offset / 8)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seed);
    (x >> ((offset % 8) * 8)) as u8 ^ (x >> 56) as u8
}

pub fn fill_pattern(buf: &mut [u8], disk_offset: u64, seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(disk_offset + i as u64, seed);
    }
}

/// A stream of writes, `depth` in flight, each chunk of the disk written in turn (lap after
/// lap, each lap with its own seed), paced so that it runs while the test hands the device
/// over. It remembers what each chunk must hold.
pub struct Stream {
    pub chunk: usize,
    pub depth: usize,
    pub disk: u64,
    /// The seed last written to each chunk (0: never written, reads as zeroes).
    pub seeds: Vec<u64>,
    /// Requests completed so far (shared with the thread that hands over).
    pub done: Arc<AtomicU64>,
}

impl Stream {
    pub fn new(disk: u64, chunk: usize, depth: usize) -> Self {
        Self {
            chunk,
            depth,
            disk,
            seeds: vec![0; (disk / chunk as u64) as usize],
            done: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Write until `until` says so and at least `after` more requests completed then. Every
    /// request must succeed.
    pub fn run(&mut self, client: &mut Client, until: impl Fn() -> bool, after: u64) {
        assert!(self.chunk * self.depth <= client.region.len);
        let chunks = self.seeds.len() as u64;
        let mut next = 0u64;
        let mut free: Vec<usize> = (0..self.depth).collect();
        let mut in_flight = 0;
        let mut stop_at: Option<u64> = None;
        loop {
            let done = self.done.load(Ordering::Acquire);
            if stop_at.is_none() && until() {
                stop_at = Some(done + after);
            }
            let stopping = stop_at.is_some_and(|s| done >= s);
            while !stopping && in_flight < self.depth {
                let slot = free.pop().unwrap();
                let index = next % chunks;
                let seed = next / chunks + 1;
                let off = index * self.chunk as u64;
                let buf_off = slot * self.chunk;
                fill_pattern(&mut client.buf()[buf_off..buf_off + self.chunk], off, seed);
                self.seeds[index as usize] = seed;
                let p = client.buf_ptr(buf_off);
                client.queues[0].write(off, p, self.chunk, slot, ReqFlags::empty());
                in_flight += 1;
                next += 1;
            }
            if in_flight == 0 {
                return;
            }
            for (slot, ret) in client.wait_some() {
                assert_eq!(ret, 0, "write request {slot} failed: {ret}");
                free.push(slot);
                in_flight -= 1;
                self.done.fetch_add(1, Ordering::AcqRel);
            }
            std::thread::sleep(Duration::from_micros(300));
        }
    }

    /// Read the whole disk back through `client` and check every chunk.
    pub fn verify(&self, client: &mut Client) {
        for (index, &seed) in self.seeds.iter().enumerate() {
            let off = index as u64 * self.chunk as u64;
            assert_eq!(client.read(off, self.chunk), 0, "read at {off}");
            let got = &client.buf()[..self.chunk];
            for (i, &b) in got.iter().enumerate() {
                let want = if seed == 0 {
                    0
                } else {
                    pattern_byte(off + i as u64, seed)
                };
                assert_eq!(b, want, "byte {} of chunk {index} (seed {seed})", i);
            }
        }
    }
}

/// Wait until `done` reaches `n` (at most 60 s).
pub fn wait_for(done: &AtomicU64, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Acquire) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream did not reach {n} requests"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
