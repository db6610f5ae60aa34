//! A writeback error is never forgotten: once a FLUSH failed, every later FLUSH and the final
//! flush at shutdown fail too (docs/reliability.md, "a failed FLUSH stays failed").
//!
//! Linux reports a writeback error to the first fsync on an open file that looks (errseq); a
//! second fsync returns 0 although the data never reached the disk. The fault is real here: the
//! image is a loop device whose backing file lives on a 2 MiB tmpfs, served `--buffered`, so
//! writes land in the page cache and fail (ENOSPC) when the FLUSH writes them back.
//!
//! Needs root and loop devices; skipped with a message otherwise (a failure under
//! `VIRTIOD_NO_SKIP=1`, as in CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: usize = 1 << 20;

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A loop device over a sparse file on a tiny tmpfs; torn down at drop.
struct FullDisk {
    mnt: PathBuf,
    dev: String,
}

impl FullDisk {
    fn new(dir: &Path) -> Result<Self, String> {
        let mnt = dir.join("small");
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2M", "virtiod-test"])
            .arg(&mnt))?;
        let backing = mnt.join("backing.img");
        let made = std::fs::File::create(&backing).and_then(|f| f.set_len(32 * MIB as u64));
        let dev = made.map_err(|e| e.to_string()).and_then(|()| {
            run(Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&backing))
        });
        match dev {
            Ok(dev) => Ok(Self { mnt, dev }),
            Err(err) => {
                let _ = run(Command::new("umount").arg(&mnt));
                Err(err)
            }
        }
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").args(["-d", &self.dev]));
        // Detaching is asynchronous: the backing file stays busy for a moment.
        for _ in 0..100 {
            if run(Command::new("umount").arg(&self.mnt)).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
    }
}

#[test]
fn a_failed_flush_stays_failed_until_restart() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        skip_or_fail("needs root and loop devices (/dev/loop-control)");
        return;
    }
    let dir = Scratch::new("flush-error");
    let disk = match FullDisk::new(&dir.0) {
        Ok(disk) => disk,
        Err(err) => {
            skip_or_fail(&format!(
                "cannot make a loop device on a small tmpfs: {err}"
            ));
            return;
        }
    };
    let sock = dir.path("vu.sock");
    let mut daemon = Daemon::start(&sock, &disk.dev, &["--buffered"]);
    let mut c = Client::connect(&sock, 1, MIB).unwrap();
    assert_eq!(c.capacity(), 32 * MIB as u64);
    c.buf().fill(0x5A);
    // 8 MiB into the page cache: every write completes (the tmpfs holds 2 MiB).
    for i in 0..8 {
        assert_eq!(c.write(0, (i * MIB) as u64, 0, MIB), 0, "write {i}");
    }
    let first = c.flush(0);
    assert!(
        first < 0,
        "the FLUSH writes back into a full backing file: it must fail (got {first})"
    );
    // The kernel has reported the error once; a second fsync would now return 0.
    let second = c.flush(0);
    assert!(
        second < 0,
        "a FLUSH after a failed one must fail too (got {second}): the data is not on disk"
    );
    // New writes do not clear it either.
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    assert!(c.flush(0) < 0, "still failed after another write");
    drop(c);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_timeout(std::time::Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(1),
        "the final flush fails, so the exit status says so: {status}"
    );
}
