//! `rbd:POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT&keyring=PATH]`: an image of a Ceph cluster,
//! through librbd's asynchronous C API (`librbd.so.1`, loaded when the first image is opened:
//! see `sys.rs`).
//!
//! The image is opened once (connecting to the cluster, which starts librbd's and librados'
//! threads) and shared by every queue: librbd handles are thread-safe. A queue submits each
//! request with `rbd_aio_readv`/`rbd_aio_writev`/`rbd_aio_flush`/`rbd_aio_discard`/
//! `rbd_aio_write_zeroes`, handing librbd the request's iovecs into driver memory (no bounce
//! buffer: librbd reads or fills them directly). librbd calls the completion callback on its
//! own thread, which parks the result with the request and signals the queue's eventfd
//! (see `queue.rs`).
//!
//! A snapshot (`@SNAP`) is opened read-only. Durability is librbd's: a completed write is
//! acknowledged by the OSDs (written to their journal/WAL) unless the librbd cache is on in
//! the configuration, in which case only a FLUSH makes it durable — the daemon flushes at
//! shutdown either way.

pub mod admin;
mod cluster;
mod queue;
mod sys;

use std::ffi::{c_char, CString};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{Backend, BackendInfo, BackendQueue, Result, SECTOR_SIZE};

/// Where an RBD image is, and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdAddress {
    /// The pool.
    pub pool: String,
    /// The image name.
    pub image: String,
    /// A snapshot of the image (opened read-only).
    pub snap: Option<String>,
    /// The Ceph configuration file; `None`: librados' default search (`/etc/ceph/ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The client id (`admin` for `client.admin`); `None`: `admin`.
    pub id: Option<String>,
    /// The keyring; `None`: the one the configuration names.
    pub keyring: Option<PathBuf>,
}

impl fmt::Display for RbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

/// Why an RBD image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// A librados/librbd call failed while opening; `what` says which step and what to do.
    #[error("{addr}: {what}: {cause}{hint}")]
    Open {
        /// The image's address.
        addr: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error text.
        cause: String,
        /// What to do, as `": …"`, may be empty.
        hint: String,
    },
    /// The image cannot be a virtio-blk disk.
    #[error("{addr}: {reason}")]
    Unusable {
        /// The image's address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// The text of a negative errno from librados/librbd, without "(os error N)".
fn errno_text(ret: i32) -> String {
    let text = io::Error::from_raw_os_error(-ret).to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn cstring(addr: &RbdAddress, what: &str, text: &str) -> std::result::Result<CString, RbdError> {
    CString::new(text).map_err(|_| RbdError::Unusable {
        addr: addr.to_string(),
        reason: format!("the {what} contains a NUL byte"),
    })
}

/// The connected cluster, the pool's I/O context and the open image; closed in that
/// reverse order on drop (the image and pool context here, then the cluster, a field).
pub(crate) struct Image {
    api: &'static sys::Api,
    ioctx: sys::rados_ioctx_t,
    image: sys::rbd_image_t,
    _cluster: admin::Cluster,
}

// SAFETY: librados and librbd handles may be used from any thread and concurrently (librbd
// serialises internally); `Image` only hands them to librbd calls.
unsafe impl Send for Image {}
// SAFETY: as above: every use is a librbd/librados call, which is thread-safe.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: each handle was created by the matching librados/librbd call of `self.api`
        // (a loaded library) and is closed once, image before pool context (the cluster is
        // shut down after, when its field drops); null ones were never created.
        unsafe {
            if !self.image.is_null() {
                (self.api.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
        }
    }
}

/// A connection failure of the shared [`admin::Cluster::connect`] as the backend's error.
fn connect_error(addr: &RbdAddress, e: admin::AdminError) -> RbdError {
    match e {
        admin::AdminError::Connect {
            what, cause, hint, ..
        } => RbdError::Open {
            addr: addr.to_string(),
            what,
            cause,
            hint,
        },
        other => RbdError::Unusable {
            addr: addr.to_string(),
            reason: other.to_string(),
        },
    }
}

impl Image {
    /// Connect to the cluster and open the image (read-only when `read_only` or a snapshot).
    fn open(addr: &RbdAddress, read_only: bool) -> std::result::Result<Self, RbdError> {
        let fail = |what: &'static str, ret: i32, hint: String| RbdError::Open {
            addr: addr.to_string(),
            what,
            cause: errno_text(ret),
            hint,
        };
        let client = format!("client.{}", addr.id.as_deref().unwrap_or("admin"));
        let cluster = admin::Cluster::connect(&admin::ClusterConfig {
            conf: addr.conf.clone(),
            id: addr.id.clone(),
            keyring: addr.keyring.clone(),
            ..admin::ClusterConfig::default()
        })
        .map_err(|e| connect_error(addr, e))?;
        let mut img = Image {
            api: cluster.api,
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
            _cluster: cluster,
        };
        let pool = cstring(addr, "pool name", &addr.pool)?;
        // SAFETY: the cluster is connected; the out-pointer is valid.
        let ret = unsafe {
            (img.api.rados_ioctx_create)(img._cluster.handle, pool.as_ptr(), &mut img.ioctx)
        };
        if ret < 0 {
            img.ioctx = ptr::null_mut();
            let hint = if ret == -libc::ENOENT {
                format!(
                    ": no pool {:?}: check the name (ceph osd pool ls)",
                    addr.pool
                )
            } else {
                String::new()
            };
            return Err(fail("cannot open the pool", ret, hint));
        }
        let image = cstring(addr, "image name", &addr.image)?;
        let snap = match &addr.snap {
            Some(s) => Some(cstring(addr, "snapshot name", s)?),
            None => None,
        };
        let snap_ptr: *const c_char = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: the pool context is live, the names are NUL-terminated, the out-pointer valid.
        let ret = unsafe {
            if read_only || snap.is_some() {
                (img.api.rbd_open_read_only)(img.ioctx, image.as_ptr(), &mut img.image, snap_ptr)
            } else {
                (img.api.rbd_open)(img.ioctx, image.as_ptr(), &mut img.image, snap_ptr)
            }
        };
        if ret < 0 {
            img.image = ptr::null_mut();
            let hint = match (-ret, &addr.snap) {
                (libc::ENOENT, None) => format!(
                    ": no image {:?} in pool {:?}: check the name (rbd ls {})",
                    addr.image, addr.pool, addr.pool
                ),
                (libc::ENOENT, Some(s)) => format!(
                    ": no image {:?} or no snapshot {s:?} of it: check the names (rbd snap ls {}/{})",
                    addr.image, addr.pool, addr.image
                ),
                (libc::EACCES | libc::EPERM, _) => format!(
                    ": {client} may not open it: check its capabilities (ceph auth get {client})"
                ),
                _ => String::new(),
            };
            return Err(fail("cannot open the image", ret, hint));
        }
        Ok(img)
    }

    fn size(&self) -> std::result::Result<u64, i32> {
        let mut size = 0u64;
        // SAFETY: the image is open; the out-pointer is valid.
        let ret = unsafe { (self.api.rbd_get_size)(self.image, &mut size) };
        if ret < 0 {
            Err(ret)
        } else {
            Ok(size)
        }
    }

    fn resize(&self, size: u64) -> std::result::Result<(), i32> {
        // SAFETY: the image is open (read-write: callers refuse read-only images).
        let ret = unsafe { (self.api.rbd_resize)(self.image, size) };
        if ret < 0 {
            Err(ret)
        } else {
            Ok(())
        }
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: the image is open.
        let ret = unsafe { (self.api.rbd_flush)(self.image) };
        if ret < 0 {
            Err(io::Error::from_raw_os_error(-ret))
        } else {
            Ok(())
        }
    }
}

/// An RBD image.
pub struct RbdBackend {
    addr: RbdAddress,
    image: Arc<Image>,
    size: AtomicU64,
    read_only: bool,
}

impl fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdBackend")
            .field("addr", &self.addr)
            .field("size", &self.size.load(Ordering::Relaxed))
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl RbdBackend {
    /// Connect to the cluster and open the image; a snapshot is always read-only.
    pub fn open(addr: RbdAddress, read_only: bool) -> Result<Self> {
        let read_only = read_only || addr.snap.is_some();
        let image = Image::open(&addr, read_only)?;
        let size = image.size().map_err(|ret| RbdError::Open {
            addr: addr.to_string(),
            what: "cannot read the image size",
            cause: errno_text(ret),
            hint: String::new(),
        })?;
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(RbdError::Unusable {
                addr: addr.to_string(),
                reason: format!(
                    "the image is {size} bytes, not a non-zero multiple of 512: resize it (rbd resize --size 64M {}/{})",
                    addr.pool, addr.image
                ),
            }
            .into());
        }
        tracing::info!(image = %addr, size, read_only, "RBD image opened");
        Ok(Self {
            addr,
            image: Arc::new(image),
            size: AtomicU64::new(size),
            read_only,
        })
    }
}

impl Backend for RbdBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.size.load(Ordering::Acquire),
            read_only: self.read_only,
            block_size: 512,
            discard: !self.read_only,
            write_zeroes: !self.read_only,
        }
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(queue::RbdQueue::new(
            self.image.clone(),
            self.read_only,
            depth,
        )?))
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.image.flush()
    }

    /// The image takes the new size (`rbd_resize`), unless it has it already: a volume
    /// manager (the CSI plugin's controller) may have grown it through the cluster first.
    fn resize(&self, capacity: u64) -> Result<()> {
        if self.read_only {
            return Err(crate::Error::Resize(format!(
                "{}: the image is served read-only (or is a snapshot)",
                self.addr
            )));
        }
        let current = self.image.size().map_err(|ret| {
            crate::Error::Resize(format!(
                "{}: cannot read the image size: {}",
                self.addr,
                errno_text(ret)
            ))
        })?;
        if current != capacity {
            self.image.resize(capacity).map_err(|ret| {
                crate::Error::Resize(format!(
                    "{}: cannot resize the image to {capacity} bytes: {}",
                    self.addr,
                    errno_text(ret)
                ))
            })?;
        }
        self.size.store(capacity, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ImageSpec;

    fn rbd(spec: &str) -> super::RbdAddress {
        match ImageSpec::parse(spec) {
            Ok(ImageSpec::Rbd(addr)) => addr,
            other => panic!("{spec}: {other:?}"),
        }
    }

    #[test]
    fn specs() {
        let a = rbd("rbd:pool/disk");
        assert_eq!((a.pool.as_str(), a.image.as_str()), ("pool", "disk"));
        assert_eq!((a.snap, a.conf, a.id, a.keyring), (None, None, None, None));
        let a = rbd("rbd:p/d@s1?conf=/c/ceph.conf&id=virtiod&keyring=/k");
        assert_eq!(a.snap.as_deref(), Some("s1"));
        assert_eq!(
            a.conf.as_deref(),
            Some(std::path::Path::new("/c/ceph.conf"))
        );
        assert_eq!(a.id.as_deref(), Some("virtiod"));
        assert_eq!(a.keyring.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(a.to_string(), "rbd:p/d@s1");
    }

    #[test]
    fn bad_specs_say_the_form() {
        for spec in [
            "rbd:disk",
            "rbd:/disk",
            "rbd:pool/",
            "rbd:pool/a/b",
            "rbd:pool/disk@",
            "rbd:pool/disk?conf=",
            "rbd:pool/disk?user=x",
            "rbd:pool/disk?id=a&id=b",
            "rbd:pool/disk?conf=a&conf=b",
        ] {
            let e = ImageSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains("rbd:POOL/IMAGE"), "{spec}: {e}");
        }
    }

    #[test]
    fn a_missing_conf_file_is_one_line_naming_it() {
        let addr = rbd("rbd:p/d?conf=/nonexistent/ceph.conf");
        let e = super::RbdBackend::open(addr, false)
            .unwrap_err()
            .to_string();
        if super::sys::api().is_ok() {
            assert!(
                e.contains("cannot read the Ceph configuration")
                    && e.contains("/nonexistent/ceph.conf"),
                "{e}"
            );
        } else {
            // A host without librbd: the error says what to install instead.
            assert!(e.contains("apt install librbd1"), "{e}");
        }
        assert!(!e.contains('\n'), "{e}");
    }
}
