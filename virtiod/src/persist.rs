//! Devices added with `virtiod ctl add` outlive the daemon: each is recorded as
//! `STATE_DIR/devices/NAME.json` (`{"name":..,"device":"<the text given to add>"}`, written
//! atomically) until `ctl remove`, and `virtiod run` starts the recorded devices again. A
//! VDUSE device the kernel kept is re-attached, exactly as for a device of devices.toml, so a
//! killed and restarted daemon serves the same devices and their drivers only see a pause.
//!
//! A record that cannot be read or parsed is reported (naming the file and what to do) and
//! skipped; it never stops the daemon.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::registry::Registry;

/// The directory of records under the state dir.
const DIR: &str = "devices";

/// One recorded device.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    name: String,
    /// The device as given to `ctl add` (TOML or JSON).
    device: String,
}

fn record_path(state_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    // Device names are letters, digits, '.', '_' and '-' (checked by the parser); a leading
    // dot would make a hidden (or `..`) file.
    anyhow::ensure!(
        !name.is_empty() && !name.starts_with('.') && !name.contains('/'),
        "device name {name:?} cannot be recorded: it must not start with '.'"
    );
    Ok(state_dir.join(DIR).join(format!("{name}.json")))
}

/// Record `device` (the text given to `ctl add`) under `name`, replacing an earlier record:
/// written to a temporary file, synced, renamed over the record, and the directory synced.
pub fn record(state_dir: &Path, name: &str, device: &str) -> anyhow::Result<()> {
    let path = record_path(state_dir, name)?;
    let dir = state_dir.join(DIR);
    let fail = || {
        format!(
            "cannot record device {name} in {}: it would not survive a restart of the daemon; \
             check that the state dir is writable",
            dir.display()
        )
    };
    std::fs::create_dir_all(&dir).with_context(fail)?;
    let text = serde_json::to_vec_pretty(&Record {
        name: name.to_string(),
        device: device.to_string(),
    })?;
    let tmp = dir.join(format!(".{name}.json.tmp"));
    let mut file = std::fs::File::create(&tmp).with_context(fail)?;
    file.write_all(&text).with_context(fail)?;
    file.sync_all().with_context(fail)?;
    std::fs::rename(&tmp, &path).with_context(fail)?;
    sync_dir(&dir).with_context(fail)
}

/// Forget the record of `name` (absent already: nothing to do).
pub fn forget(state_dir: &Path, name: &str) -> anyhow::Result<()> {
    let path = record_path(state_dir, name)?;
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&state_dir.join(DIR)).with_context(|| {
            format!(
                "cannot sync {} after forgetting {name}",
                state_dir.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot delete {}: the device would come back when the daemon restarts; \
                 delete the file by hand",
                path.display()
            )
        }),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The recorded devices, by file name order; unreadable records are reported and skipped.
fn load(state_dir: &Path) -> Vec<(String, virtiod_config::DeviceSpec, String)> {
    let dir = state_dir.join(DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::error!(dir = %dir.display(), "cannot read the recorded devices: {e}; none restored");
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        match read_record(&path) {
            Ok((spec, text)) => out.push((spec.name.clone(), spec, text)),
            Err(e) => tracing::error!(
                record = %path.display(),
                "skipping a recorded device: {e:#}; fix the file or delete it and add the device again"
            ),
        }
    }
    out
}

fn read_record(path: &Path) -> anyhow::Result<(virtiod_config::DeviceSpec, String)> {
    let bytes = std::fs::read(path).context("cannot read it")?;
    let record: Record = serde_json::from_slice(&bytes).context("not a device record")?;
    let spec = virtiod_config::parse_device(&record.device)
        .map_err(|e| anyhow::anyhow!("its device does not parse: {e}"))?;
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    anyhow::ensure!(
        spec.name == record.name && record.name == stem,
        "it names device {:?} but is the record of {stem:?}",
        spec.name
    );
    Ok((spec, record.device))
}

/// Start every recorded device (after those of devices.toml); a device that fails to start
/// keeps its record (it is listed as failed and retried at the next start).
pub fn restore(registry: &Registry) {
    for (name, spec, _text) in load(registry.state_dir()) {
        match registry.add(spec) {
            Ok(endpoint) => {
                tracing::info!(device = %name, endpoint = %endpoint.display(), "restored a device added with ctl add");
                println!("{name} {}", endpoint.display());
            }
            Err(e) => {
                tracing::error!(device = %name, "cannot restore a device added with ctl add: {e:#}")
            }
        }
    }
}
