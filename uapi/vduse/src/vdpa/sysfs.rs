//! Choosing the vdpa bus driver and finding the resulting device node, through sysfs.
//!
//! Netlink only creates and deletes vdpa devices; which driver binds is sysfs's business.
//! With `drivers_autoprobe` on (the default, and we never change it: it is global), a
//! new device binds to the first registered driver (virtio_vdpa when loaded first). To
//! move it: write the driver to `driver_override`, unbind it from its current driver,
//! and write its name to the bus's `drivers_probe`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::VdpaError;

/// A vdpa bus driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `virtio_vdpa`: the host kernel drives the device (a block device, /dev/vdX).
    Virtio,
    /// `vhost_vdpa`: a VM or user-space driver gets `/dev/vhost-vdpa-N`.
    Vhost,
}

impl Driver {
    /// The driver's sysfs name.
    pub fn sysfs_name(self) -> &'static str {
        match self {
            Driver::Virtio => "virtio_vdpa",
            Driver::Vhost => "vhost_vdpa",
        }
    }
}

/// The sysfs and /dev roots to work on (`/sys` and `/dev`, or a fake tree in tests).
#[derive(Clone, Debug)]
pub struct Sysfs {
    sys_root: PathBuf,
    dev_root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/sys", "/dev")
    }
}

fn write_attr(path: &Path, value: &str) -> Result<(), VdpaError> {
    fs::write(path, value).map_err(|source| VdpaError::Sysfs {
        path: path.to_owned(),
        source,
    })
}

impl Sysfs {
    /// Uses `sys_root` instead of `/sys` and `dev_root` instead of `/dev`.
    pub fn new(sys_root: impl Into<PathBuf>, dev_root: impl Into<PathBuf>) -> Self {
        Sysfs {
            sys_root: sys_root.into(),
            dev_root: dev_root.into(),
        }
    }

    fn bus(&self) -> PathBuf {
        self.sys_root.join("bus/vdpa")
    }

    fn device_dir(&self, name: &str) -> Result<PathBuf, VdpaError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(VdpaError::NoSuchDevice(name.to_owned()));
        }
        let dir = self.bus().join("devices").join(name);
        if !dir.exists() {
            return Err(VdpaError::NoSuchDevice(name.to_owned()));
        }
        Ok(dir)
    }

    /// The driver the device is bound to now, if any.
    pub fn current_driver(&self, name: &str) -> Result<Option<String>, VdpaError> {
        let link = self.device_dir(name)?.join("driver");
        match fs::read_link(&link) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(VdpaError::Sysfs { path: link, source }),
        }
    }

    /// Binds vdpa device `name` to `driver` (no-op if already bound to it). The device
    /// node appears asynchronously: poll [`Self::find_device_node`].
    pub fn bind_driver(&self, name: &str, driver: Driver) -> Result<(), VdpaError> {
        let dir = self.device_dir(name)?;
        let target = driver.sysfs_name();
        write_attr(&dir.join("driver_override"), target)?;
        let current = self.current_driver(name)?;
        if current.as_deref() == Some(target) {
            return Ok(());
        }
        if let Some(current) = current {
            write_attr(
                &self.bus().join("drivers").join(current).join("unbind"),
                name,
            )?;
        }
        write_attr(&self.bus().join("drivers_probe"), name)
    }

    /// The node the bound driver created: `/dev/vdX` (virtio_vdpa + virtio_blk) or
    /// `/dev/vhost-vdpa-N` (vhost_vdpa); `None` while there is none (yet).
    pub fn find_device_node(&self, name: &str) -> Result<Option<PathBuf>, VdpaError> {
        let (dir, names) = self.children(name)?;
        for child in &names {
            if let Some(n) = child.strip_prefix("vhost-vdpa-") {
                if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                    return Ok(Some(self.dev_root.join(child)));
                }
            }
        }
        Ok(first_under_virtio(&dir, &names, "block").map(|disk| self.dev_root.join(disk)))
    }

    /// The network interface virtio_vdpa + virtio_net created for a net device
    /// (`devices/NAME/virtioN/net/IFNAME`); `None` while there is none (yet).
    pub fn find_net_interface(&self, name: &str) -> Result<Option<String>, VdpaError> {
        let (dir, names) = self.children(name)?;
        Ok(first_under_virtio(&dir, &names, "net"))
    }

    /// The driver bound to the virtio device that `virtio_vdpa` made of `name` (e.g.
    /// `virtio_net`); `None` when there is no such device or no driver bound to it. Unlike
    /// [`Self::find_net_interface`] this also sees a net device whose interface was moved to
    /// another network namespace (sysfs lists only the interfaces of the reader's namespace).
    pub fn virtio_driver(&self, name: &str) -> Result<Option<String>, VdpaError> {
        let (dir, names) = self.children(name)?;
        for child in &names {
            let Some(n) = child.strip_prefix("virtio") else {
                continue;
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(target) = fs::read_link(dir.join(child).join("driver")) {
                return Ok(target.file_name().map(|n| n.to_string_lossy().into_owned()));
            }
        }
        Ok(None)
    }

    /// The device's sysfs directory and the names in it, sorted.
    fn children(&self, name: &str) -> Result<(PathBuf, Vec<String>), VdpaError> {
        let dir = self.device_dir(name)?;
        let entries = fs::read_dir(&dir).map_err(|source| VdpaError::Sysfs {
            path: dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok((dir, names))
    }
}

/// The first entry (by name) of `dir/virtioN/class` for the first `virtioN` child that has
/// one: the disk (`block`) or interface (`net`) the virtio driver created.
fn first_under_virtio(dir: &Path, names: &[String], class: &str) -> Option<String> {
    for child in names {
        let Some(n) = child.strip_prefix("virtio") else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(entries) = fs::read_dir(dir.join(child).join(class)) else {
            continue;
        };
        let mut entries: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        if let Some(first) = entries.into_iter().next() {
            return Some(first);
        }
    }
    None
}

/// [`Sysfs::find_net_interface`] on the real `/sys`.
pub fn find_net_interface(name: &str) -> Result<Option<String>, VdpaError> {
    Sysfs::default().find_net_interface(name)
}

/// [`Sysfs::bind_driver`] on the real `/sys`.
pub fn bind_driver(name: &str, driver: Driver) -> Result<(), VdpaError> {
    Sysfs::default().bind_driver(name, driver)
}

/// [`Sysfs::virtio_driver`] on the real `/sys`.
pub fn virtio_driver(name: &str) -> Result<Option<String>, VdpaError> {
    Sysfs::default().virtio_driver(name)
}

/// [`Sysfs::find_device_node`] on the real `/sys` and `/dev`.
pub fn find_device_node(name: &str) -> Result<Option<PathBuf>, VdpaError> {
    Sysfs::default().find_device_node(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct FakeTree(PathBuf);

    impl FakeTree {
        fn new(tag: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("vduse-sysfs-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            let bus = root.join("sys/bus/vdpa");
            for d in [
                "devices/vduse0",
                "drivers/virtio_vdpa",
                "drivers/vhost_vdpa",
            ] {
                fs::create_dir_all(bus.join(d)).unwrap();
            }
            for f in [
                "drivers_probe",
                "drivers_autoprobe",
                "devices/vduse0/driver_override",
            ] {
                fs::write(bus.join(f), "").unwrap();
            }
            fs::write(bus.join("drivers_autoprobe"), "1").unwrap();
            for d in ["virtio_vdpa", "vhost_vdpa"] {
                fs::write(bus.join("drivers").join(d).join("unbind"), "").unwrap();
            }
            FakeTree(root)
        }
        fn sysfs(&self) -> Sysfs {
            Sysfs::new(self.0.join("sys"), "/dev")
        }
        fn bus(&self, rel: &str) -> PathBuf {
            self.0.join("sys/bus/vdpa").join(rel)
        }
        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.bus(rel)).unwrap()
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn rebinding_from_virtio_to_vhost_follows_the_sysfs_steps() {
        let t = FakeTree::new("rebind");
        symlink("../../drivers/virtio_vdpa", t.bus("devices/vduse0/driver")).unwrap();
        let s = t.sysfs();
        assert_eq!(
            s.current_driver("vduse0").unwrap().as_deref(),
            Some("virtio_vdpa")
        );
        s.bind_driver("vduse0", Driver::Vhost).unwrap();
        assert_eq!(t.read("devices/vduse0/driver_override"), "vhost_vdpa");
        assert_eq!(t.read("drivers/virtio_vdpa/unbind"), "vduse0");
        assert_eq!(t.read("drivers/vhost_vdpa/unbind"), "");
        assert_eq!(t.read("drivers_probe"), "vduse0");
        assert_eq!(t.read("drivers_autoprobe"), "1", "never touched");
    }

    #[test]
    fn virtio_driver_sees_a_bound_net_device_without_its_interface() {
        let t = FakeTree::new("virtio-driver");
        let s = t.sysfs();
        assert_eq!(
            s.virtio_driver("vduse0").unwrap(),
            None,
            "no virtio device yet"
        );
        fs::create_dir_all(t.bus("devices/vduse0/virtio3/net")).unwrap();
        assert_eq!(
            s.virtio_driver("vduse0").unwrap(),
            None,
            "no driver bound yet"
        );
        fs::create_dir_all(t.0.join("sys/bus/virtio/drivers/virtio_net")).unwrap();
        symlink(
            t.0.join("sys/bus/virtio/drivers/virtio_net"),
            t.bus("devices/vduse0/virtio3/driver"),
        )
        .unwrap();
        // The interface is in another network namespace: sysfs shows an empty net/ here.
        assert_eq!(s.find_net_interface("vduse0").unwrap(), None);
        assert_eq!(
            s.virtio_driver("vduse0").unwrap().as_deref(),
            Some("virtio_net")
        );
        assert!(s.virtio_driver("nothere").is_err());
    }

    #[test]
    fn binding_to_the_current_driver_only_sets_the_override() {
        let t = FakeTree::new("same");
        symlink("../../drivers/virtio_vdpa", t.bus("devices/vduse0/driver")).unwrap();
        t.sysfs().bind_driver("vduse0", Driver::Virtio).unwrap();
        assert_eq!(t.read("devices/vduse0/driver_override"), "virtio_vdpa");
        assert_eq!(t.read("drivers/virtio_vdpa/unbind"), "");
        assert_eq!(t.read("drivers_probe"), "");
    }

    #[test]
    fn unbound_device_is_probed_without_unbind() {
        let t = FakeTree::new("unbound");
        t.sysfs().bind_driver("vduse0", Driver::Vhost).unwrap();
        assert_eq!(t.read("drivers/virtio_vdpa/unbind"), "");
        assert_eq!(t.read("drivers_probe"), "vduse0");
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let t = FakeTree::new("missing");
        let err = t.sysfs().bind_driver("nope", Driver::Virtio).unwrap_err();
        assert!(matches!(err, VdpaError::NoSuchDevice(_)));
        assert!(t.sysfs().find_device_node("../x").is_err());
    }

    #[test]
    fn finds_block_and_vhost_nodes() {
        let t = FakeTree::new("nodes");
        let s = t.sysfs();
        assert_eq!(s.find_device_node("vduse0").unwrap(), None);
        fs::create_dir_all(t.bus("devices/vduse0/virtio3")).unwrap();
        assert_eq!(s.find_device_node("vduse0").unwrap(), None, "no disk yet");
        fs::create_dir_all(t.bus("devices/vduse0/virtio3/block/vdb")).unwrap();
        assert_eq!(
            s.find_device_node("vduse0").unwrap(),
            Some(PathBuf::from("/dev/vdb"))
        );
        fs::remove_dir_all(t.bus("devices/vduse0/virtio3")).unwrap();
        fs::create_dir_all(t.bus("devices/vduse0/vhost-vdpa-12")).unwrap();
        fs::create_dir_all(t.bus("devices/vduse0/virtio_extra")).unwrap();
        assert_eq!(
            s.find_device_node("vduse0").unwrap(),
            Some(PathBuf::from("/dev/vhost-vdpa-12"))
        );
    }

    #[test]
    fn finds_the_network_interface_of_a_net_device() {
        let t = FakeTree::new("net");
        let s = t.sysfs();
        assert_eq!(s.find_net_interface("vduse0").unwrap(), None);
        fs::create_dir_all(t.bus("devices/vduse0/virtio4")).unwrap();
        assert_eq!(
            s.find_net_interface("vduse0").unwrap(),
            None,
            "no interface yet"
        );
        fs::create_dir_all(t.bus("devices/vduse0/virtio4/net/eth1")).unwrap();
        assert_eq!(s.find_net_interface("vduse0").unwrap(), Some("eth1".into()));
        assert_eq!(s.find_device_node("vduse0").unwrap(), None, "not a disk");
        assert!(s.find_net_interface("missing").is_err());
    }
}
