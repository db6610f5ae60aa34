//! `qcow2:PATH`: a qcow2 image, with its backing chain (read-only, raw or qcow2).
//!
//! The format's metadata (L1/L2 tables and their cache, refcounts, cluster allocation,
//! copy-on-write from the backing image, compressed and zero clusters, the write-back order of
//! refcount blocks before the L2 tables that use them) is the `imago` crate's, used through its
//! synchronous build: no async runtime. virtiod keeps the data path: a READ or WRITE whose range
//! is one allocated cluster run of the top image (a WRITE: one that needs no copy-on-write) is
//! sent to the image file on the queue's own `io_uring`, at the host offset the cached mapping
//! gives, exactly like a raw file. Everything else (unallocated clusters, backing reads,
//! compressed clusters, allocation, zeroing, FLUSH) runs in the queue thread through `imago`
//! and completes through the same ring.
//!
//! FLUSH writes the metadata caches back (refcount blocks before the L2 tables that point at
//! new clusters) and then syncs the file: data and metadata are durable. A crash between two
//! FLUSHes leaves leaked clusters at worst, which `qemu-img check -r leaks` reclaims.

mod header;
mod queue;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};

pub use header::{looks_like_qcow2, parse as parse_header, Backing, BackingFormat, Header};

use crate::file::FileQueue;
use crate::{Backend, BackendInfo, BackendQueue, Error, Result};

/// How deep a backing chain may be (QEMU allows more; deeper chains are slow anyway).
const MAX_CHAIN: usize = 16;
/// The most bytes of a header read: the largest cluster.
const MAX_CLUSTER: u64 = 2 << 20;

/// A qcow2 image opened through `imago`.
type Image = FormatAccess<ImagoFile>;

/// Options for [`Qcow2Backend::open`].
#[derive(Debug, Clone, Copy)]
pub struct Qcow2Options {
    /// Open read-only and refuse writes.
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
}

/// A qcow2 image and its backing chain.
pub struct Qcow2Backend {
    /// The metadata. Requests take it shared; a DISCARD that frees clusters takes it
    /// exclusively, so no other request holds a mapping meanwhile (see `queue.rs`).
    image: Arc<RwLock<Image>>,
    /// How many queues exist: clusters are freed only when there is one.
    queues: Arc<AtomicUsize>,
    /// The image file again, for the data path on `io_uring`.
    data: Arc<File>,
    size: u64,
    opts: Qcow2Options,
    /// Set once a FLUSH failed: every later FLUSH fails too (see the file backend).
    flush_failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Qcow2Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Backend")
            .field("size", &self.size)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Qcow2 {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Open `path` as the file of an image, with the hints the file backend gives.
fn open_file(path: &Path, write: bool, direct: bool) -> Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    "; create the image first (e.g. qemu-img create -f qcow2 IMAGE 10G)"
                }
                Some(libc::EINVAL) if direct => {
                    "; the filesystem refuses O_DIRECT: pass --buffered to use the page cache"
                }
                Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) if write => {
                    "; no write access: fix the permissions or pass --read-only"
                }
                Some(libc::EISDIR) => "; give an image file, not a directory",
                _ => "",
            };
            Error::Open {
                path: path.display().to_string(),
                cause: e,
                hint,
            }
        })
}

/// Read and check the header of the qcow2 image at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut file = open_file(path, false, false)?;
    let io_err = |e: std::io::Error| invalid(path, format!("cannot read the header: {e}"));
    // Seek, not metadata: a block device's metadata says 0 bytes.
    let file_size = file.seek(SeekFrom::End(0)).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let mut first = Vec::new();
    file.by_ref()
        .take(file_size.min(MAX_CLUSTER))
        .read_to_end(&mut first)
        .map_err(io_err)?;
    header::parse(&first, file_size).map_err(|e| invalid(path, e))
}

/// Open one layer of the chain: `path` in `format`, its own backing chain under it.
fn open_layer(
    path: &Path,
    format: BackingFormat,
    write: bool,
    direct: bool,
    depth: usize,
) -> Result<Image> {
    if depth > MAX_CHAIN {
        return Err(invalid(
            path,
            format!("the backing chain is deeper than {MAX_CHAIN} images (or loops): flatten it with qemu-img convert"),
        ));
    }
    let storage_opts = StorageOpenOptions::new()
        .filename(path)
        .write(write)
        .direct(direct);
    // Check access (and say what to do) before imago opens the file itself.
    drop(open_file(path, write, direct)?);
    let storage = ImagoFile::open(storage_opts.clone()).map_err(|e| invalid(path, e))?;
    match format {
        BackingFormat::Raw => {
            let raw = Raw::builder(storage)
                .write(write)
                .storage_open_options(storage_opts)
                .open(DenyImplicitOpenGate::default())
                .map_err(|e| invalid(path, e))?;
            Ok(FormatAccess::new(raw))
        }
        BackingFormat::Qcow2 => {
            let header = read_header(path)?;
            let backing = match &header.backing {
                None => None,
                Some(b) => {
                    let backing_path = resolve(path, &b.name);
                    let layer = open_layer(&backing_path, b.format, false, direct, depth + 1)
                        .map_err(|e| match e {
                            Error::Open { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
                                invalid(path, format!(
                                    "its backing file {} does not exist: restore it, or name the right one with qemu-img rebase -u -b BACKING -F {} IMAGE",
                                    backing_path.display(),
                                    if b.format == BackingFormat::Raw { "raw" } else { "qcow2" }
                                ))
                            }
                            Error::Open { .. } | Error::Qcow2 { .. } => {
                                invalid(path, format!("its backing file cannot be opened: {e}"))
                            }
                            other => other,
                        })?;
                    Some(layer)
                }
            };
            let qcow2 = Qcow2::<ImagoFile>::builder(storage)
                .write(write)
                .storage_open_options(storage_opts)
                .backing(backing)
                .data_file(None)
                .open(DenyImplicitOpenGate::default())
                .map_err(|e| invalid(path, e))?;
            Ok(FormatAccess::new(qcow2))
        }
    }
}

/// A backing file name resolved against the directory of the image that names it.
fn resolve(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image
        .parent()
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| name.to_path_buf())
}

impl Qcow2Backend {
    /// Open the qcow2 image at `path` and its backing chain (read-only, with the formats the
    /// headers name). Never creates or resizes anything.
    pub fn open(path: &Path, opts: Qcow2Options) -> Result<Self> {
        let header = read_header(path)?;
        let write = !opts.read_only;
        let image = open_layer(path, BackingFormat::Qcow2, write, opts.direct, 0)?;
        let data = open_file(path, write, opts.direct)?;
        tracing::debug!(
            path = %path.display(),
            version = header.version,
            cluster_size = 1u64 << header.cluster_bits,
            size = header.size,
            backing = ?header.backing,
            "opened qcow2 image"
        );
        Ok(Self {
            image: Arc::new(RwLock::new(image)),
            queues: Arc::new(AtomicUsize::new(0)),
            data: Arc::new(data),
            size: header.size,
            opts,
            flush_failed: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// The image, shared. A panic while another thread held it cannot leave `imago`'s state
/// half-changed in a way a lock would protect against (its own locks guard its caches), so a
/// poisoned lock is used as it is.
fn shared(image: &RwLock<Image>) -> std::sync::RwLockReadGuard<'_, Image> {
    image.read().unwrap_or_else(|e| e.into_inner())
}

/// Write the metadata caches back, then sync the file; a failure sticks.
fn flush_image(image: &Image, failed: &AtomicBool) -> std::io::Result<()> {
    let result = image.flush().and_then(|()| image.sync());
    if let Err(e) = &result {
        if !failed.swap(true, Ordering::AcqRel) {
            tracing::error!(%e, "qcow2 FLUSH failed: data may be lost; every later FLUSH fails too");
        }
    }
    if failed.load(Ordering::Acquire) {
        return Err(std::io::Error::other(
            "an earlier FLUSH failed: data may have been lost",
        ));
    }
    result
}

impl Backend for Qcow2Backend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.size,
            read_only: self.opts.read_only,
            block_size: 512,
            discard: true,
            write_zeroes: true,
        }
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        let io = FileQueue::new(
            self.data.clone(),
            self.opts.direct,
            false,
            self.flush_failed.clone(),
            depth,
        )?;
        Ok(Box::new(queue::Qcow2Queue::new(
            io,
            self.image.clone(),
            self.queues.clone(),
            self.flush_failed.clone(),
        )))
    }

    fn flush(&self) -> std::io::Result<()> {
        flush_image(&shared(&self.image), &self.flush_failed)
    }
}

#[cfg(test)]
#[path = "qcow2_tests.rs"]
mod tests;
