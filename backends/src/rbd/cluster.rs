//! Connecting to a Ceph cluster: one [`Cluster::connect`] for the backend (which opens an
//! image on it) and for the provisioning API (`admin.rs`).

use std::ffi::{c_int, CString};
use std::fmt;
use std::path::PathBuf;
use std::ptr;

use super::admin::{cstr, AdminError, Result};
use super::{errno_text, sys};

/// How long connecting to the monitors may take when the configuration does not say
/// (`client_mount_timeout`; Ceph's default is 300 s).
const MOUNT_TIMEOUT_SECS: &str = "10";

/// How to reach a cluster and as whom. Everything is optional: librados' defaults
/// (`/etc/ceph/ceph.conf`, `client.admin`, the keyring the configuration names) fill in.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// A Ceph configuration file; read first, the fields below override it.
    pub conf: Option<PathBuf>,
    /// The monitors (`mon_host`: `192.0.2.10:6789,192.0.2.11:6789` or `[v2:…]`); with this
    /// and no `conf`, no configuration file is read.
    pub mon_host: Option<String>,
    /// The client id without `client.` (`admin`); `None`: `admin`.
    pub id: Option<String>,
    /// The client's cephx key (base64, as `ceph auth get-key` prints it).
    pub key: Option<String>,
    /// A keyring file holding the client's key.
    pub keyring: Option<PathBuf>,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("conf", &self.conf)
            .field("mon_host", &self.mon_host)
            .field("id", &self.id)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("keyring", &self.keyring)
            .finish()
    }
}

/// A connected cluster handle; shut down on drop.
pub struct Cluster {
    pub(super) api: &'static sys::Api,
    pub(super) handle: sys::rados_t,
    client: String,
}

// SAFETY: a connected `rados_t` may be used from any thread and concurrently (librados
// serialises internally); `Cluster` only hands it to librados/librbd calls.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("client", &self.client)
            .finish()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle came from rados_create2 of this api and is shut down once;
            // every pool context and image made from it was closed (they borrow `self`).
            unsafe { (self.api.rados_shutdown)(self.handle) };
        }
    }
}

impl Cluster {
    /// Connect to the cluster `config` describes.
    pub fn connect(config: &ClusterConfig) -> Result<Self> {
        let api = sys::api().map_err(AdminError::Library)?;
        let id = config.id.as_deref().unwrap_or("admin");
        let client = format!("client.{id}");
        let name = cstr("client id", &client)?;
        let mut cluster = Cluster {
            api,
            handle: ptr::null_mut(),
            client: client.clone(),
        };
        let fail = |what: &'static str, ret: c_int, hint: String| AdminError::Connect {
            client: client.clone(),
            what,
            errno: ret,
            cause: errno_text(ret),
            hint,
        };
        // SAFETY: the out-pointer is valid; the strings are NUL-terminated and outlive the call.
        let ret =
            unsafe { (api.rados_create2)(&mut cluster.handle, c"ceph".as_ptr(), name.as_ptr(), 0) };
        if ret < 0 {
            cluster.handle = ptr::null_mut();
            return Err(fail("cannot create the cluster handle", ret, String::new()));
        }
        if config.conf.is_some() || config.mon_host.is_none() {
            let conf = match &config.conf {
                Some(p) => Some(cstr("configuration path", &p.to_string_lossy())?),
                None => None,
            };
            // SAFETY: the handle is live; a null path asks for the default search.
            let ret = unsafe {
                (api.rados_conf_read_file)(
                    cluster.handle,
                    conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                )
            };
            if ret < 0 {
                let hint = match &config.conf {
                    Some(p) => format!(": check that {} exists and is readable", p.display()),
                    None => {
                        ": no /etc/ceph/ceph.conf: give the monitors or a configuration file".into()
                    }
                };
                return Err(fail("cannot read the Ceph configuration", ret, hint));
            }
        }
        let options = [
            ("mon_host", config.mon_host.clone()),
            ("key", config.key.clone()),
            (
                "keyring",
                config
                    .keyring
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
            ),
        ];
        for (option, value) in options {
            if let Some(value) = value {
                cluster
                    .set(option, &value)
                    .map_err(|ret| fail("cannot set an option", ret, format!(": {option}")))?;
            }
        }
        if cluster
            .get("client_mount_timeout")
            .and_then(|v| v.parse::<f64>().ok())
            == Some(300.0)
        {
            cluster
                .set("client_mount_timeout", MOUNT_TIMEOUT_SECS)
                .map_err(|ret| fail("cannot set client_mount_timeout", ret, String::new()))?;
        }
        // SAFETY: the handle is live and configured.
        let ret = unsafe { (api.rados_connect)(cluster.handle) };
        if ret < 0 {
            let hint = match -ret {
                libc::EACCES | libc::EPERM => format!(
                    ": {client} was refused: check its key (`ceph auth get-key {client}`) and the client id"
                ),
                libc::ENOENT => format!(": no key for {client} found: give its key or a keyring (keyring=PATH, or keyring in the configuration)"),
                libc::ETIMEDOUT => ": no monitor answered: is the cluster up, are the monitors' addresses right?".into(),
                _ => ": check the configuration and that the monitors are reachable".into(),
            };
            return Err(fail("cannot connect to the cluster", ret, hint));
        }
        Ok(cluster)
    }

    fn set(&self, option: &str, value: &str) -> std::result::Result<(), c_int> {
        let option = CString::new(option).map_err(|_| -libc::EINVAL)?;
        let value = CString::new(value).map_err(|_| -libc::EINVAL)?;
        // SAFETY: the handle is live; both strings are NUL-terminated.
        let ret =
            unsafe { (self.api.rados_conf_set)(self.handle, option.as_ptr(), value.as_ptr()) };
        if ret < 0 {
            Err(ret)
        } else {
            Ok(())
        }
    }

    fn get(&self, option: &str) -> Option<String> {
        let option = CString::new(option).ok()?;
        let mut buf = [0u8; 64];
        // SAFETY: the handle is live; librados writes at most `buf.len()` bytes, NUL included.
        let ret = unsafe {
            (self.api.rados_conf_get)(
                self.handle,
                option.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if ret < 0 {
            return None;
        }
        let end = buf.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}
