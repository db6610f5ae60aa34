//! The few functions of librados and librbd's C API the backend calls (`rados/librados.h`,
//! `rbd/librbd.h`), loaded at run time with `dlopen("librbd.so.1")` the first time an `rbd:`
//! image is opened: virtiod does not link librbd, so hosts (and the test VM) without Ceph's
//! libraries run it unchanged, and only `rbd:` needs Debian's `librbd1`.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// A cluster handle (`rados_t`).
pub type rados_t = *mut c_void;
/// A pool I/O context (`rados_ioctx_t`).
pub type rados_ioctx_t = *mut c_void;
/// An open image (`rbd_image_t`).
pub type rbd_image_t = *mut c_void;
/// An asynchronous completion (`rbd_completion_t`).
pub type rbd_completion_t = *mut c_void;
/// Called on a librbd thread when an asynchronous request completes.
pub type rbd_callback_t = unsafe extern "C" fn(c: rbd_completion_t, arg: *mut c_void);

/// Image creation options (`rbd_image_options_t`).
pub type rbd_image_options_t = *mut c_void;
/// `RBD_IMAGE_OPTION_FEATURES` of `rbd_image_options_set_uint64`.
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;

/// One image of `rbd_list2` (`rbd_image_spec_t`), owned by librbd until
/// `rbd_image_spec_list_cleanup`.
#[repr(C)]
pub struct rbd_image_spec_t {
    /// The image id.
    pub id: *mut c_char,
    /// The image name.
    pub name: *mut c_char,
}

/// One snapshot of `rbd_snap_list` (`rbd_snap_info_t`), owned by librbd until
/// `rbd_snap_list_end`.
#[repr(C)]
pub struct rbd_snap_info_t {
    /// The snapshot id.
    pub id: u64,
    /// The image size at the snapshot.
    pub size: u64,
    /// The snapshot name.
    pub name: *const c_char,
}

/// `zero_flags` of `rbd_aio_write_zeroes`: keep the zeroed extent allocated.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// The shared object opened; it pulls in librados, whose symbols `dlsym` finds through it.
const LIBRBD: &CStr = c"librbd.so.1";

/// Declares [`Api`], one function pointer per C function, and its loader.
macro_rules! api {
    ($( fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)?; )*) => {
        /// The C functions, resolved once in [`api`].
        pub struct Api {
            $( pub $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*
        }

        impl Api {
            /// Resolve every function in `handle`, a `dlopen` handle of librbd.
            fn resolve(handle: *mut c_void) -> Result<Self, String> {
                Ok(Self {
                    $( $name: {
                        let symbol = sym(handle, concat!(stringify!($name), "\0"))?;
                        // SAFETY: `symbol` is the non-null address of the C function of that
                        // name in librbd/librados, whose prototype in librbd.h/librados.h is
                        // the one declared here; the library stays loaded for the process
                        // (never dlclose'd), so the pointer stays valid.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(symbol)
                        }
                    }, )*
                })
            }
        }
    };
}

api! {
    fn rados_create2(cluster: *mut rados_t, cluster_name: *const c_char, name: *const c_char, flags: u64) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(cluster: rados_t, option: *const c_char, buf: *mut c_char, len: usize) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_ioctx_create(cluster: rados_t, pool: *const c_char, ioctx: *mut rados_ioctx_t) -> c_int;
    fn rados_ioctx_destroy(ioctx: rados_ioctx_t);
    fn rbd_open(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap: *const c_char) -> c_int;
    fn rbd_open_read_only(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap: *const c_char) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    fn rbd_flush(image: rbd_image_t) -> c_int;
    fn rbd_aio_create_completion(arg: *mut c_void, cb: rbd_callback_t, c: *mut rbd_completion_t) -> c_int;
    fn rbd_aio_readv(image: rbd_image_t, iov: *const libc::iovec, iovcnt: c_int, off: u64, c: rbd_completion_t) -> c_int;
    fn rbd_aio_writev(image: rbd_image_t, iov: *const libc::iovec, iovcnt: c_int, off: u64, c: rbd_completion_t) -> c_int;
    fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    fn rbd_aio_write_zeroes(image: rbd_image_t, off: u64, len: usize, c: rbd_completion_t, zero_flags: c_int, op_flags: c_int) -> c_int;
    fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    fn rbd_aio_release(c: rbd_completion_t);
    // Provisioning (admin.rs).
    fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    fn rbd_image_options_destroy(opts: rbd_image_options_t);
    fn rbd_image_options_set_uint64(opts: rbd_image_options_t, optname: c_int, optval: u64) -> c_int;
    fn rbd_create4(io: rados_ioctx_t, name: *const c_char, size: u64, opts: rbd_image_options_t) -> c_int;
    fn rbd_clone3(p_io: rados_ioctx_t, p_name: *const c_char, p_snap: *const c_char, c_io: rados_ioctx_t, c_name: *const c_char, c_opts: rbd_image_options_t) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    fn rbd_list2(io: rados_ioctx_t, images: *mut rbd_image_spec_t, max_images: *mut usize) -> c_int;
    fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: usize);
    fn rbd_snap_create(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_remove(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max_snaps: *mut c_int) -> c_int;
    fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    fn rbd_snap_protect(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: rbd_image_t, name: *const c_char) -> c_int;
    fn rbd_snap_is_protected(image: rbd_image_t, name: *const c_char, is_protected: *mut c_int) -> c_int;
    fn rbd_snap_get_timestamp(image: rbd_image_t, snap_id: u64, timestamp: *mut libc::timespec) -> c_int;
}

/// The text of the last `dlerror`, or `what` when there is none.
fn dl_error(what: &str) -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call
    // on this thread; it is copied at once.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        what.to_string()
    } else {
        // SAFETY: non-null: a NUL-terminated string, see above.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

fn sym(handle: *mut c_void, name: &'static str) -> Result<*mut c_void, String> {
    let cname = CStr::from_bytes_with_nul(name.as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `handle` is a live dlopen handle; `cname` is NUL-terminated.
    let symbol = unsafe { libc::dlsym(handle, cname.as_ptr()) };
    if symbol.is_null() {
        Err(format!(
            "{} has no {}: librbd is too old (needs Ceph 15 or newer)",
            LIBRBD.to_string_lossy(),
            name.trim_end_matches('\0')
        ))
    } else {
        Ok(symbol)
    }
}

fn load() -> Result<Api, String> {
    // SAFETY: loading librbd runs its initialisers, which only set up its own state; the
    // handle is kept for the life of the process.
    let handle = unsafe { libc::dlopen(LIBRBD.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "{}: install Ceph's client library (Debian: apt install librbd1)",
            dl_error("cannot load librbd.so.1")
        ));
    }
    Api::resolve(handle)
}

/// librbd's functions, loaded on first use; the error says what to install.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}
