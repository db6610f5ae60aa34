//! Online resize of a [`BlkDevice`] over a RAM disk, with a recording notifier.

use std::sync::Mutex;

use virtiod_backend::MemBackend;

use super::*;

const MIB: u64 = 1 << 20;

/// Records every notification; fails when told to.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Vec<u8>>>,
    fail: bool,
}

impl ConfigNotifier for Recorder {
    fn config_changed(&self, config: &[u8]) -> Result<(), String> {
        self.seen.lock().unwrap().push(config.to_vec());
        if self.fail {
            Err("no driver".into())
        } else {
            Ok(())
        }
    }
}

fn device(size: u64) -> (BlkDevice, Arc<dyn Backend>) {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(size, false));
    let cfg = BlkConfig::new(&backend.info(), 1, 16, "s");
    (BlkDevice::new(cfg, backend.clone()), backend)
}

fn capacity_in(config: &[u8]) -> u64 {
    u64::from_le_bytes(config[0..8].try_into().unwrap())
}

#[test]
fn growing_resizes_the_backend_updates_the_config_and_notifies() {
    let (dev, backend) = device(MIB);
    let rec = Arc::new(Recorder::default());
    dev.set_config_notifier(Some(rec.clone()));
    let r = dev.resize(4 * MIB, false).unwrap();
    assert_eq!((r.old, r.new), (MIB, 4 * MIB));
    assert_eq!(r.notified, Ok(()));
    assert_eq!(backend.info().capacity, 4 * MIB);
    assert_eq!(dev.capacity(), 4 * MIB);
    assert_eq!(capacity_in(&dev.config_space()), 4 * MIB / 512);
    assert_eq!(capacity_in(&dev.read_config(0, 8)), 4 * MIB / 512);
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        capacity_in(&seen[0]),
        4 * MIB / 512,
        "the notifier gets the new space"
    );
    assert_eq!(seen[0], dev.config_space());
}

#[test]
fn shrinking_needs_permission_and_bad_sizes_are_refused() {
    let (dev, backend) = device(4 * MIB);
    let e = dev.resize(MIB, false).unwrap_err();
    assert!(matches!(e, ResizeError::WouldShrink { .. }), "{e}");
    assert!(e.to_string().contains("--shrink"), "{e}");
    assert_eq!(dev.capacity(), 4 * MIB, "nothing changed");
    assert!(matches!(
        dev.resize(1000, true),
        Err(ResizeError::BadSize(1000))
    ));
    assert!(matches!(dev.resize(0, true), Err(ResizeError::BadSize(0))));
    let r = dev.resize(MIB, true).unwrap();
    assert_eq!((r.old, r.new), (4 * MIB, MIB));
    assert_eq!(backend.info().capacity, MIB);
    assert_eq!(capacity_in(&dev.config_space()), MIB / 512);
}

#[test]
fn a_notification_that_fails_is_reported_and_the_resize_stays() {
    let (dev, _) = device(MIB);
    let r = dev.resize(2 * MIB, false).unwrap();
    assert!(r.notified.is_err(), "no transport registered");
    dev.set_config_notifier(Some(Arc::new(Recorder {
        fail: true,
        ..Recorder::default()
    })));
    let r = dev.resize(3 * MIB, false).unwrap();
    assert_eq!(r.notified, Err("no driver".to_string()));
    assert_eq!(dev.capacity(), 3 * MIB);
    dev.set_config_notifier(None);
    assert!(dev.resize(3 * MIB, false).unwrap().notified.is_err());
}

/// A backend that cannot be resized (the trait's default).
struct Fixed;

impl Backend for Fixed {
    fn info(&self) -> virtiod_backend::BackendInfo {
        virtiod_backend::BackendInfo {
            capacity: MIB,
            read_only: false,
            block_size: 512,
            discard: false,
            write_zeroes: false,
        }
    }
    fn queue(
        &self,
        _depth: u32,
    ) -> virtiod_backend::Result<Box<dyn virtiod_backend::BackendQueue>> {
        unreachable!("not served in this test")
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_backend_that_cannot_resize_leaves_the_device_as_it_was() {
    let backend: Arc<dyn Backend> = Arc::new(Fixed);
    let dev = BlkDevice::new(BlkConfig::new(&backend.info(), 1, 16, "s"), backend);
    let e = dev.resize(2 * MIB, false).unwrap_err();
    assert!(e.to_string().contains("cannot be resized"), "{e}");
    let e = dev.resize(MIB / 2, true).unwrap_err();
    assert!(e.to_string().contains("cannot be resized"), "{e}");
    assert_eq!(dev.capacity(), MIB, "a failed shrink restores the capacity");
}
