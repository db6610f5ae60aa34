//! Provisioning RBD images: create, clone, resize, remove, list, snapshots (with their times), over the same
//! run-time loaded librbd/librados as the backend (`sys.rs`), for callers that manage
//! volumes (the CSI plugin's `rbd` source).
//!
//! ```no_run
//! use virtiod_backend::rbd_admin::{Cluster, ClusterConfig, FEATURES_DEFAULT};
//!
//! let cluster = Cluster::connect(&ClusterConfig {
//!     mon_host: Some("192.0.2.10:6789".into()),
//!     id: Some("virtiod-csi".into()),
//!     key: Some("AQD…==".into()),
//!     ..ClusterConfig::default()
//! })?;
//! cluster.create_image("rbd", "pvc-1", 1 << 30, FEATURES_DEFAULT)?;
//! cluster.resize_image("rbd", "pvc-1", 2 << 30)?;
//! cluster.create_snapshot("rbd", "pvc-1", "snap-1")?;
//! cluster.remove_snapshot("rbd", "pvc-1", "snap-1")?;
//! cluster.remove_image("rbd", "pvc-1")?;
//! # Ok::<(), virtiod_backend::rbd_admin::AdminError>(())
//! ```
//!
//! Every call is synchronous (librbd waits for the OSDs) and may take as long as the
//! cluster does; a [`Cluster`] may be shared between threads.

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr;
use std::time::{Duration, SystemTime};

pub use super::cluster::{Cluster, ClusterConfig};
use super::{errno_text, sys};

/// `layering`: clones of snapshots.
pub const FEATURE_LAYERING: u64 = 1 << 0;
/// `exclusive-lock`: one writer at a time (needed by the object map).
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `object-map`: which objects exist (fast resize, remove, du).
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// `fast-diff`: fast diffs between snapshots (needs the object map).
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `deep-flatten`: flattening a clone also flattens its snapshots.
pub const FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
/// The features of a new image unless the caller says otherwise: Ceph's own default set.
pub const FEATURES_DEFAULT: u64 = FEATURE_LAYERING
    | FEATURE_EXCLUSIVE_LOCK
    | FEATURE_OBJECT_MAP
    | FEATURE_FAST_DIFF
    | FEATURE_DEEP_FLATTEN;

/// Entries of the first `rbd_list2` call; librbd asks for more when a pool holds more (one
/// more call).
const LIST_START: usize = 8;
/// Entries of the first `rbd_snap_list` call (the snapshots and a terminating entry).
const SNAP_LIST_START: c_int = 4;

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its name.
    pub name: String,
    /// Its id (increasing with creation).
    pub id: u64,
    /// The image size when it was taken, in bytes.
    pub size: u64,
    /// When it was taken (the cluster's clock).
    pub created: SystemTime,
}

/// Why a provisioning call failed; the text says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// librbd cannot be loaded; the text says what to install.
    #[error("{0}")]
    Library(String),
    /// A name or option contains a NUL byte.
    #[error("the {what} {value:?} contains a NUL byte: Ceph names cannot")]
    Nul {
        /// Which name.
        what: &'static str,
        /// The name.
        value: String,
    },
    /// Connecting to the cluster failed.
    #[error("Ceph cluster as {client}: {what}: {cause}{hint}")]
    Connect {
        /// `client.ID`.
        client: String,
        /// The step that failed.
        what: &'static str,
        /// The negative errno librados returned.
        errno: i32,
        /// Its text.
        cause: String,
        /// What to do, as `": …"`, may be empty.
        hint: String,
    },
    /// An operation on a pool, image or snapshot failed.
    #[error("{target}: {what}: {cause}{hint}")]
    Op {
        /// `POOL`, `POOL/IMAGE` or `POOL/IMAGE@SNAP`.
        target: String,
        /// The step that failed.
        what: &'static str,
        /// The negative errno librbd returned.
        errno: i32,
        /// Its text.
        cause: String,
        /// What to do, as `": …"`, may be empty.
        hint: String,
    },
}

impl AdminError {
    /// The negative errno of a failed librados/librbd call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Connect { errno, .. } | Self::Op { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The pool, image or snapshot does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(-libc::ENOENT)
    }

    /// An image or snapshot of that name exists already.
    pub fn is_already_exists(&self) -> bool {
        self.errno() == Some(-libc::EEXIST)
    }
}

/// A result of this module.
pub type Result<T> = std::result::Result<T, AdminError>;

pub(super) fn cstr(what: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| AdminError::Nul {
        what,
        value: value.replace('\0', "\\0"),
    })
}

/// `ret` when it is an error: the [`AdminError::Op`] of `target`, with a hint for the errnos a
/// user can act on.
fn check(ret: c_int, target: &str, what: &'static str) -> Result<c_int> {
    if ret >= 0 {
        return Ok(ret);
    }
    let (pool, rest) = target.split_once('/').unwrap_or((target, ""));
    let hint = match -ret {
        libc::ENOENT if rest.is_empty() => {
            format!(": no pool {pool:?}: check the name (ceph osd pool ls)")
        }
        libc::ENOENT if rest.contains('@') => {
            format!(": no such image or snapshot: check the names (rbd snap ls {})", target.split('@').next().unwrap_or(target))
        }
        libc::ENOENT => format!(": no such image: check the name (rbd ls {pool})"),
        libc::EEXIST => ": it exists already: pick another name or remove it first".into(),
        libc::EACCES | libc::EPERM => {
            ": the client may not do this: check its capabilities (mon 'profile rbd' osd 'profile rbd pool=POOL')".into()
        }
        libc::EBUSY if what == "cannot remove the image" => format!(
            ": a client still has it open: stop it first (rbd status {target})"
        ),
        libc::EBUSY => ": it is in use (clones of a snapshot, or open by a client): remove or flatten the clones first (rbd children)".into(),
        libc::ENOTEMPTY => format!(": it has snapshots: remove them first (rbd snap purge {target})"),
        libc::ENOSPC | libc::EDQUOT => ": the pool is full or over quota: free space or raise the quota".into(),
        libc::ETIMEDOUT => ": the cluster did not answer in time: check its health (ceph -s)".into(),
        _ => String::new(),
    };
    Err(AdminError::Op {
        target: target.to_string(),
        what,
        errno: ret,
        cause: errno_text(ret),
        hint,
    })
}

impl Cluster {
    fn pool(&self, pool: &str) -> Result<Pool<'_>> {
        let name = cstr("pool name", pool)?;
        let mut ioctx = ptr::null_mut();
        // SAFETY: the cluster is connected; the name is NUL-terminated; the out-pointer valid.
        let ret = unsafe { (self.api.rados_ioctx_create)(self.handle, name.as_ptr(), &mut ioctx) };
        check(ret, pool, "cannot open the pool")?;
        Ok(Pool {
            cluster: self,
            ioctx,
            name: pool.to_string(),
        })
    }

    /// Create image `pool/name` of `size` bytes with `features` ([`FEATURES_DEFAULT`]).
    pub fn create_image(&self, pool: &str, name: &str, size: u64, features: u64) -> Result<()> {
        let pool = self.pool(pool)?;
        let target = pool.target(name);
        let cname = cstr("image name", name)?;
        let opts = Options::with_features(self.api, features, &target)?;
        // SAFETY: the pool context is live; the name is NUL-terminated; `opts` is live.
        let ret = unsafe { (self.api.rbd_create4)(pool.ioctx, cname.as_ptr(), size, opts.0) };
        check(ret, &target, "cannot create the image")?;
        Ok(())
    }

    /// Create image `pool/child` as a clone of snapshot `pool/parent@snap` (copy-on-write;
    /// the snapshot is protected first when the cluster needs it, clone format 1).
    pub fn clone_image(
        &self,
        pool: &str,
        parent: &str,
        snap: &str,
        child: &str,
        features: u64,
    ) -> Result<()> {
        let p = self.pool(pool)?;
        let snap_target = format!("{}@{snap}", p.target(parent));
        let csnap = cstr("snapshot name", snap)?;
        {
            let image = p.open(parent)?;
            let mut protected: c_int = 0;
            // SAFETY: the image is open; the name is NUL-terminated; the out-pointer valid.
            let ret = unsafe {
                (self.api.rbd_snap_is_protected)(image.handle, csnap.as_ptr(), &mut protected)
            };
            check(ret, &snap_target, "cannot read the snapshot")?;
            if protected == 0 {
                // SAFETY: as above.
                let ret = unsafe { (self.api.rbd_snap_protect)(image.handle, csnap.as_ptr()) };
                check(ret, &snap_target, "cannot protect the snapshot for cloning")?;
            }
        }
        let target = p.target(child);
        let cparent = cstr("image name", parent)?;
        let cchild = cstr("image name", child)?;
        let opts = Options::with_features(self.api, features, &target)?;
        // SAFETY: both pool contexts (the same) are live; the names are NUL-terminated; `opts`
        // is live.
        let ret = unsafe {
            (self.api.rbd_clone3)(
                p.ioctx,
                cparent.as_ptr(),
                csnap.as_ptr(),
                p.ioctx,
                cchild.as_ptr(),
                opts.0,
            )
        };
        check(ret, &target, "cannot clone the snapshot")?;
        Ok(())
    }

    /// Remove image `pool/name` (it must have no snapshots and no client holding it open).
    pub fn remove_image(&self, pool: &str, name: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        let cname = cstr("image name", name)?;
        // SAFETY: the pool context is live; the name is NUL-terminated.
        let ret = unsafe { (self.api.rbd_remove)(pool.ioctx, cname.as_ptr()) };
        check(ret, &pool.target(name), "cannot remove the image")?;
        Ok(())
    }

    /// Resize image `pool/name` to `size` bytes (growing, or shrinking: data past `size` is lost).
    pub fn resize_image(&self, pool: &str, name: &str, size: u64) -> Result<()> {
        let pool = self.pool(pool)?;
        let image = pool.open(name)?;
        // SAFETY: the image is open.
        let ret = unsafe { (self.api.rbd_resize)(image.handle, size) };
        check(ret, &pool.target(name), "cannot resize the image")?;
        Ok(())
    }

    /// The size of image `pool/name`, in bytes.
    pub fn image_size(&self, pool: &str, name: &str) -> Result<u64> {
        let pool = self.pool(pool)?;
        let image = pool.open(name)?;
        let mut size = 0u64;
        // SAFETY: the image is open; the out-pointer is valid.
        let ret = unsafe { (self.api.rbd_get_size)(image.handle, &mut size) };
        check(ret, &pool.target(name), "cannot read the image size")?;
        Ok(size)
    }

    /// The features of image `pool/name` (`FEATURE_*` bits).
    pub fn image_features(&self, pool: &str, name: &str) -> Result<u64> {
        let pool = self.pool(pool)?;
        let image = pool.open(name)?;
        let mut features = 0u64;
        // SAFETY: the image is open; the out-pointer is valid.
        let ret = unsafe { (self.api.rbd_get_features)(image.handle, &mut features) };
        check(ret, &pool.target(name), "cannot read the image features")?;
        Ok(features)
    }

    /// The names of the images of `pool`, sorted.
    pub fn list_images(&self, pool: &str) -> Result<Vec<String>> {
        let pool = self.pool(pool)?;
        let mut capacity = LIST_START;
        loop {
            let mut specs: Vec<sys::rbd_image_spec_t> = (0..capacity)
                .map(|_| sys::rbd_image_spec_t {
                    id: ptr::null_mut(),
                    name: ptr::null_mut(),
                })
                .collect();
            let mut count = capacity;
            // SAFETY: `specs` holds `count` writable entries; librbd fills at most that many
            // (or asks for more with -ERANGE, filling none).
            let ret = unsafe { (self.api.rbd_list2)(pool.ioctx, specs.as_mut_ptr(), &mut count) };
            if ret == -libc::ERANGE && count > capacity {
                capacity = count;
                continue;
            }
            check(ret, &pool.name, "cannot list the images")?;
            let mut names: Vec<String> = specs[..count].iter().map(|s| text(s.name)).collect();
            // SAFETY: the first `count` entries were filled by rbd_list2 and are freed once.
            unsafe { (self.api.rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), count) };
            names.sort();
            return Ok(names);
        }
    }

    /// Take snapshot `pool/image@snap`.
    pub fn create_snapshot(&self, pool: &str, image: &str, snap: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        let open = pool.open(image)?;
        let csnap = cstr("snapshot name", snap)?;
        // SAFETY: the image is open; the name is NUL-terminated.
        let ret = unsafe { (self.api.rbd_snap_create)(open.handle, csnap.as_ptr()) };
        check(
            ret,
            &format!("{}@{snap}", pool.target(image)),
            "cannot create the snapshot",
        )?;
        Ok(())
    }

    /// Remove snapshot `pool/image@snap`, unprotecting it first if it is protected (which
    /// fails while clones of it exist).
    pub fn remove_snapshot(&self, pool: &str, image: &str, snap: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        let open = pool.open(image)?;
        let target = format!("{}@{snap}", pool.target(image));
        let csnap = cstr("snapshot name", snap)?;
        let mut protected: c_int = 0;
        // SAFETY: the image is open; the name is NUL-terminated; the out-pointer valid.
        let ret = unsafe {
            (self.api.rbd_snap_is_protected)(open.handle, csnap.as_ptr(), &mut protected)
        };
        check(ret, &target, "cannot read the snapshot")?;
        if protected != 0 {
            // SAFETY: as above.
            let ret = unsafe { (self.api.rbd_snap_unprotect)(open.handle, csnap.as_ptr()) };
            check(ret, &target, "cannot unprotect the snapshot")?;
        }
        // SAFETY: as above.
        let ret = unsafe { (self.api.rbd_snap_remove)(open.handle, csnap.as_ptr()) };
        check(ret, &target, "cannot remove the snapshot")?;
        Ok(())
    }

    /// The snapshots of `pool/image`, oldest first.
    pub fn list_snapshots(&self, pool: &str, image: &str) -> Result<Vec<Snapshot>> {
        let pool = self.pool(pool)?;
        let open = pool.open(image)?;
        let mut capacity: c_int = SNAP_LIST_START;
        loop {
            let mut snaps: Vec<sys::rbd_snap_info_t> = (0..capacity)
                .map(|_| sys::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            let mut max = capacity;
            // SAFETY: `snaps` holds `max` writable entries; librbd fills the snapshots and a
            // terminating entry (null name) within them, or asks for more with -ERANGE.
            let ret =
                unsafe { (self.api.rbd_snap_list)(open.handle, snaps.as_mut_ptr(), &mut max) };
            if ret == -libc::ERANGE && max > capacity {
                capacity = max;
                continue;
            }
            let count = check(ret, &pool.target(image), "cannot list the snapshots")? as usize;
            let mut list: Vec<Snapshot> = snaps[..count]
                .iter()
                .map(|s| Snapshot {
                    name: text(s.name),
                    id: s.id,
                    size: s.size,
                    created: SystemTime::UNIX_EPOCH,
                })
                .collect();
            // SAFETY: filled by rbd_snap_list (null-name terminated); freed once.
            unsafe { (self.api.rbd_snap_list_end)(snaps.as_mut_ptr()) };
            for snap in &mut list {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: the image is open; the out-pointer is valid. librbd answers from the
                // image header it holds (no round trip).
                let ret =
                    unsafe { (self.api.rbd_snap_get_timestamp)(open.handle, snap.id, &mut ts) };
                check(ret, &pool.target(image), "cannot read a snapshot's time")?;
                snap.created = SystemTime::UNIX_EPOCH
                    + Duration::new(
                        ts.tv_sec.max(0) as u64,
                        ts.tv_nsec.clamp(0, 999_999_999) as u32,
                    );
            }
            list.sort_by_key(|s| s.id);
            return Ok(list);
        }
    }
}

/// A C string librbd owns, copied; empty for null.
fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null: a NUL-terminated string librbd filled in and keeps until the list is
    // freed, which happens after this copy.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A pool's I/O context, destroyed on drop.
struct Pool<'a> {
    cluster: &'a Cluster,
    ioctx: sys::rados_ioctx_t,
    name: String,
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, destroyed once, after every image opened in it.
        unsafe { (self.cluster.api.rados_ioctx_destroy)(self.ioctx) };
    }
}

impl Pool<'_> {
    fn target(&self, image: &str) -> String {
        format!("{}/{image}", self.name)
    }

    fn open(&self, image: &str) -> Result<OpenImage<'_>> {
        let name = cstr("image name", image)?;
        let mut handle = ptr::null_mut();
        // SAFETY: the pool context is live; the name is NUL-terminated; no snapshot (null).
        let ret = unsafe {
            (self.cluster.api.rbd_open)(self.ioctx, name.as_ptr(), &mut handle, ptr::null())
        };
        check(ret, &self.target(image), "cannot open the image")?;
        Ok(OpenImage {
            api: self.cluster.api,
            handle,
            _pool: self,
        })
    }
}

/// An open image, closed on drop (before its pool context: it borrows it).
struct OpenImage<'a> {
    api: &'static sys::Api,
    handle: sys::rbd_image_t,
    _pool: &'a Pool<'a>,
}

impl Drop for OpenImage<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open, closed once.
        unsafe { (self.api.rbd_close)(self.handle) };
    }
}

/// Image creation options, destroyed on drop.
struct Options(sys::rbd_image_options_t, &'static sys::Api);

impl Options {
    fn with_features(api: &'static sys::Api, features: u64, target: &str) -> Result<Self> {
        let mut opts = ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        unsafe { (api.rbd_image_options_create)(&mut opts) };
        let opts = Options(opts, api);
        // SAFETY: `opts` is live.
        let ret = unsafe {
            (api.rbd_image_options_set_uint64)(opts.0, sys::RBD_IMAGE_OPTION_FEATURES, features)
        };
        check(ret, target, "cannot set the image features")?;
        Ok(opts)
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { (self.1.rbd_image_options_destroy)(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_do() {
        let e = check(-libc::ENOENT, "rbd", "cannot open the pool").unwrap_err();
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "rbd: cannot open the pool: No such file or directory: no pool \"rbd\": check the name (ceph osd pool ls)");
        let e = check(-libc::ENOENT, "rbd/disk", "cannot open the image").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("no such image: check the name (rbd ls rbd)"),
            "{e}"
        );
        let e = check(-libc::EEXIST, "rbd/disk", "cannot create the image").unwrap_err();
        assert!(
            e.is_already_exists() && e.to_string().contains("pick another name"),
            "{e}"
        );
        let e = check(-libc::ENOTEMPTY, "rbd/disk", "cannot remove the image").unwrap_err();
        assert!(e.to_string().contains("rbd snap purge rbd/disk"), "{e}");
        assert_eq!(check(3, "rbd", "x").unwrap(), 3);
    }

    #[test]
    fn names_with_nul_are_refused_before_any_call() {
        let e = cstr("image name", "a\0b").unwrap_err().to_string();
        assert_eq!(
            e,
            "the image name \"a\\\\0b\" contains a NUL byte: Ceph names cannot"
        );
    }

    #[test]
    fn the_key_is_not_printed() {
        let config = ClusterConfig {
            key: Some("AQsecret==".into()),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("AQsecret"));
    }
}
