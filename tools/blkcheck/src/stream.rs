//! `virtiod-blkcheck stream DEVICE MIB STOP_FILE EVENTS_FILE`: 4 KiB O_DIRECT writes, one at a
//! time, over the first MIB MiB of DEVICE (round and round, each pass a new pattern) until
//! STOP_FILE exists; then every block is read back and compared with what was last written to
//! it. Every completion is timed: for each event in EVENTS_FILE (lines `LABEL T0 T1`, times
//! from `virtiod-blkcheck now`) the pause is the longest gap between two write completions
//! that overlaps [T0, T1]; per label the count, p50 and max are printed. Exits 1 on any I/O
//! error or mismatch.
//!
//! `virtiod-blkcheck now` prints CLOCK_MONOTONIC in nanoseconds (the writer's clock).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const BLOCK: usize = 4096;

/// Nanoseconds of CLOCK_MONOTONIC (`Instant`'s clock on Linux).
pub fn now_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn fill(block: &mut [u8], index: u64, pass: u32) {
    for (i, word) in block.chunks_exact_mut(8).enumerate() {
        let v = (index << 20 | i as u64) ^ (u64::from(pass) << 44) ^ 0x9e37_79b9_7f4a_7c15;
        word.copy_from_slice(&v.wrapping_mul(0x0100_0000_01b3).to_le_bytes());
    }
}

/// A buffer of `len` bytes aligned for O_DIRECT, inside an owned vector.
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + BLOCK];
        let start = bytes.as_ptr().align_offset(BLOCK);
        Self { bytes, start, len }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

pub fn run(device: &str, mib: u64, stop: &Path, events: &Path) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("opening {device} with O_DIRECT"))?;
    let blocks = mib * (1 << 20) / BLOCK as u64;
    anyhow::ensure!(blocks > 0, "MIB must be at least 1");
    let mut pass_of = vec![0u32; blocks as usize];
    let mut buf = Aligned::new(BLOCK);
    let mut completions: Vec<u64> = Vec::with_capacity(1 << 20);
    let (mut writes, mut errors) = (0u64, 0u64);
    let mut next = 0u64;
    let started = Instant::now();
    completions.push(now_ns());
    loop {
        if writes % 32 == 0 && stop.exists() {
            break;
        }
        let pass = pass_of[next as usize] + 1;
        fill(buf.get(), next, pass);
        match file.write_at(buf.get(), next * BLOCK as u64) {
            Ok(BLOCK) => pass_of[next as usize] = pass,
            Ok(n) => {
                errors += 1;
                eprintln!("stream: short write of {n} bytes at block {next}");
            }
            Err(e) => {
                errors += 1;
                eprintln!("stream: write at block {next} failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        completions.push(now_ns());
        writes += 1;
        next = (next + 1) % blocks;
    }
    let secs = started.elapsed().as_secs_f64();
    let mismatches = verify(&file, &pass_of)?;
    println!(
        "stream: {writes} writes of 4 KiB in {secs:.1} s ({:.0}/s), {errors} I/O errors, \
         {mismatches} blocks differ of {blocks} read back",
        writes as f64 / secs
    );
    report_pauses(&completions, events)?;
    if errors != 0 || mismatches != 0 {
        bail!("stream: {errors} I/O errors, {mismatches} blocks differ");
    }
    println!("stream: OK");
    Ok(())
}

/// Read the blocks back 1 MiB at a time and compare each with the pass last written to it.
fn verify(file: &File, pass_of: &[u32]) -> anyhow::Result<u64> {
    const PER_READ: usize = 256;
    let mut chunk = Aligned::new(PER_READ * BLOCK);
    let mut want = vec![0u8; BLOCK];
    let mut mismatches = 0;
    for (first, passes) in pass_of.chunks(PER_READ).enumerate() {
        let first = first * PER_READ;
        if passes.iter().all(|&p| p == 0) {
            continue; // never written
        }
        let got = &mut chunk.get()[..passes.len() * BLOCK];
        file.read_exact_at(got, (first * BLOCK) as u64)
            .with_context(|| format!("reading block {first} and on back"))?;
        for (i, &pass) in passes.iter().enumerate() {
            if pass == 0 {
                continue;
            }
            fill(&mut want, (first + i) as u64, pass);
            if got[i * BLOCK..(i + 1) * BLOCK] != want[..] {
                if mismatches < 5 {
                    eprintln!("stream: block {} differs from pass {pass}", first + i);
                }
                mismatches += 1;
            }
        }
    }
    Ok(mismatches)
}

/// The longest gap between consecutive completions overlapping each event's window.
fn report_pauses(completions: &[u64], events: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(events).unwrap_or_default();
    let mut by_label: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [label, t0, t1] = parts.as_slice() else {
            continue;
        };
        let (t0, t1): (u64, u64) = (t0.parse()?, t1.parse()?);
        let longest = completions
            .windows(2)
            .filter(|w| w[1] >= t0 && w[0] <= t1)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        by_label.entry(label.to_string()).or_default().push(longest);
    }
    for (label, mut gaps) in by_label {
        gaps.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        println!(
            "pause {label}: n={} p50={:.1}ms max={:.1}ms all=[{}]",
            gaps.len(),
            ms(gaps[(gaps.len() - 1) / 2]),
            ms(*gaps.last().unwrap_or(&0)),
            gaps.iter()
                .map(|g| format!("{:.1}", ms(*g)))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
