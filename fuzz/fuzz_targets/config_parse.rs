//! Fuzz `devices.toml` parsing and validation (and the one-device form of `virtiod ctl add`).
//!
//! Checked: no panic; an accepted file has unique names, sockets and VDUSE names and values in
//! range; every error points inside the text (line within it, or 0 for JSON input).
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use virtiod_config::{parse, parse_device, ConfigErrors, DeviceSpec, Transport, MAX_QUEUES};

fn check_device(d: &DeviceSpec) {
    assert!(!d.name.is_empty());
    assert!((1..=MAX_QUEUES).contains(&d.queues));
    assert!(d.queue_size.is_power_of_two() && d.queue_size >= 2);
    assert!(d.serial.len() <= virtiod_config::MAX_SERIAL);
}

fn check_errors(text: &str, errors: &ConfigErrors) {
    assert!(!errors.0.is_empty());
    let lines = text.split('\n').count();
    for e in &errors.0 {
        assert!(e.line <= lines, "line {} of {lines}: {e}", e.line);
        assert!(!e.message.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(devices) => {
            let mut names = HashSet::new();
            let mut endpoints = HashSet::new();
            for d in &devices {
                check_device(d);
                assert!(names.insert(d.name.clone()), "duplicate name {}", d.name);
                let endpoint = match &d.transport {
                    Transport::VhostUser(p) => format!("u:{}", p.display()),
                    Transport::Vduse { name, .. } => format!("v:{name}"),
                };
                assert!(endpoints.insert(endpoint), "duplicate endpoint");
            }
        }
        Err(e) => check_errors(text, &e),
    }
    match parse_device(text) {
        Ok(d) => check_device(&d),
        Err(e) => check_errors(text, &e),
    }
});
