//! Test support: run the real `virtiod` binary and drive it with libblkio's vhost-user driver
//! or with the testkit's hand-written frontend ([`frontend`]).
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
pub use virtiod_testkit::process::Served;

/// The hand-written vhost-user frontend of `virtiod-testkit`, with its virtio-blk helpers.
#[allow(unused_imports)] // not every test binary drives the frontend
pub mod frontend {
    pub use virtiod_testkit::blk::*;
    pub use virtiod_testkit::frontend::*;
}

/// A test that cannot run here (a privilege or kernel feature is missing) calls this and
/// returns. With `VIRTIOD_NO_SKIP=1` (CI) it panics instead, so the test fails with `reason`;
/// otherwise it prints `SKIPPED: reason` to stderr and, when `VIRTIOD_SKIP_LOG` names a file,
/// appends that line to it (`scripts/test.sh` counts them).
#[track_caller]
pub fn skip_or_fail(reason: &str) {
    if std::env::var_os("VIRTIOD_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("VIRTIOD_NO_SKIP=1 but this test would skip: {reason}");
    }
    let line = format!("SKIPPED: {reason}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("VIRTIOD_SKIP_LOG").filter(|p| !p.is_empty()) {
        use std::io::Write;
        let thread = std::thread::current();
        let test = format!(
            "{}::{}",
            env!("CARGO_CRATE_NAME"),
            thread.name().unwrap_or("?")
        );
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(format!("{test}: {line}\n").as_bytes()));
        if let Err(err) = appended {
            eprintln!(
                "cannot append to VIRTIOD_SKIP_LOG={}: {err}",
                log.to_string_lossy()
            );
        }
    }
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("virtiod-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
    /// A zero-filled image of `len` bytes.
    pub fn image(&self, file: &str, len: u64) -> PathBuf {
        let p = self.path(file);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `virtiod`, killed at drop if still running (the testkit's [`Served`], with the
/// daemon's command line).
pub struct Daemon(pub Served);

pub fn virtiod() -> Command {
    Command::new(env!("CARGO_BIN_EXE_virtiod"))
}

impl Daemon {
    /// `virtiod serve --vhost-user SOCKET EXTRA... IMAGE`, waiting until the socket accepts.
    pub fn start(socket: &Path, image: &str, extra: &[&str]) -> Self {
        let mut cmd = virtiod();
        cmd.arg("serve")
            .arg("--vhost-user")
            .arg(socket)
            .args(extra)
            .arg(image);
        Daemon(Served::start(cmd, socket))
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.0.terminate()
    }
}

impl std::ops::Deref for Daemon {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Served {
        &mut self.0
    }
}

/// A libblkio virtio-blk-vhost-user client with one buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, buf_len: usize) -> blkio::Result<Self> {
        Self::connect_with(socket, num_queues, buf_len, false)
    }

    /// libblkio refuses to start on a read-only device unless told `read-only`.
    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        buf_len: usize,
        read_only: bool,
    ) -> blkio::Result<Self> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let queues = blkio.start()?.queues;
        let region = blkio.alloc_mem_region(buf_len)?;
        blkio.map_mem_region(&region)?;
        Ok(Self {
            blkio,
            queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` bytes of memory allocated by libblkio for us and stays
        // mapped while `self` lives; no request is in flight while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn buf_ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    /// Wait for `n` completions on queue `q`; returns their (user_data, ret).
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let want = n - out.len();
            let mut timeout = Duration::from_secs(30);
            let got = self.queues[q]
                .do_io(&mut completions[..want], 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(got > 0, "timed out waiting for completions");
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    /// One synchronous request helper: submit with `f`, wait for it, return ret.
    pub fn sync(&mut self, q: usize, f: impl FnOnce(&mut Blkioq)) -> i32 {
        f(&mut self.queues[q]);
        self.wait(q, 1)[0].1
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.buf_ptr(buf_off);
        self.sync(q, |bq| bq.read(offset, p, len, 0, ReqFlags::empty()))
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.buf_ptr(buf_off);
        self.sync(q, |bq| bq.write(offset, p, len, 0, ReqFlags::empty()))
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.sync(q, |bq| bq.flush(0, ReqFlags::empty()))
    }
}

/// The test pattern: a function of the absolute disk offset, so any range can be checked.
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

pub fn check_pattern(buf: &[u8], disk_offset: u64, seed: u64) -> Result<(), String> {
    for (i, b) in buf.iter().enumerate() {
        let want = pattern_byte(disk_offset + i as u64, seed);
        if *b != want {
            return Err(format!(
                "byte at disk offset {} is {:#x}, expected {:#x}",
                disk_offset + i as u64,
                b,
                want
            ));
        }
    }
    Ok(())
}

/// Submit `count` requests of `chunk` bytes at once on queue `q` (pipelined), wait for all,
/// and check the data of reads against the pattern of `seed`; writes write that pattern.
pub fn pipelined(
    client: &mut Client,
    q: usize,
    (base, chunk, count): (u64, usize, usize),
    write: bool,
    seed: u64,
) {
    assert!(chunk * count <= client.region.len);
    for i in 0..count {
        let off = base + (i * chunk) as u64;
        if write {
            fill_pattern(&mut client.buf()[i * chunk..(i + 1) * chunk], off, seed);
        }
        let p = client.buf_ptr(i * chunk);
        if write {
            client.queues[q].write(off, p, chunk, i, ReqFlags::empty());
        } else {
            client.queues[q].read(off, p, chunk, i, ReqFlags::empty());
        }
    }
    for (i, ret) in client.wait(q, count) {
        assert_eq!(ret, 0, "request {i} on queue {q} failed");
    }
    if !write {
        check_pattern(&client.buf()[..chunk * count], base, seed).unwrap();
    }
}

/// `image` (a whole disk's bytes) holds zeroes in `zeroes` (sorted) and the pattern of `seed`
/// everywhere else.
pub fn check_zeroed_ranges(image: &[u8], zeroes: &[std::ops::Range<u64>], seed: u64) {
    let mut at = 0u64;
    let end = image.len() as u64;
    for z in zeroes.iter().chain(std::iter::once(&(end..end))) {
        check_pattern(&image[at as usize..z.start as usize], at, seed).unwrap();
        assert!(
            image[z.start as usize..z.end as usize]
                .iter()
                .all(|&b| b == 0),
            "{z:?} reads as zeroes in the image"
        );
        at = z.end;
    }
}
