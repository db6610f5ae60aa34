//! `virtiod doctor --image SPEC`: does the image open, and is it in the format the spec says?
//!
//! Formats are never probed when serving; here the first bytes are only looked at to warn
//! when a file served raw looks like another format (or a `qcow2:` file does not).

use std::path::Path;

use virtiod_backend::{BackingFormat, ImageSpec, OpenOptions};

use super::{check, Check, Status};

/// The check of one image spec (opened read-only, nothing written).
pub fn image(spec: &str) -> Check {
    let name = format!("image {spec}");
    let parsed = match ImageSpec::parse(spec) {
        Ok(p) => p,
        Err(e) => return check(&name, Status::Fail, e.to_string(), ""),
    };
    let opts = OpenOptions {
        read_only: true,
        buffered: true,
    };
    let backend = match virtiod_backend::open(spec, opts) {
        Ok(b) => b,
        Err(e) => return check(&name, Status::Fail, e.to_string(), ""),
    };
    let size = backend.info().capacity;
    match parsed {
        ImageSpec::Path(path) => match virtiod_backend::detect_format(&path) {
            Some("qcow2") => check(
                &name,
                Status::Warn,
                format!("{size} bytes, served raw, but the file starts like a qcow2 image (formats are never probed)"),
                format!("write qcow2:{} to serve it as qcow2", path.display()),
            ),
            Some(format) => check(
                &name,
                Status::Warn,
                format!("{size} bytes, served raw, but the file starts like a {format} image"),
                "convert it with qemu-img convert -O qcow2 and serve qcow2:PATH",
            ),
            None => check(&name, Status::Ok, format!("raw, {size} bytes"), ""),
        },
        ImageSpec::Qcow2(path) => qcow2_detail(&name, &path, size),
        _ => check(&name, Status::Ok, format!("{size} bytes"), ""),
    }
}

fn qcow2_detail(name: &str, path: &Path, size: u64) -> Check {
    let detail = match virtiod_backend::read_qcow2_header(path) {
        Ok(h) => {
            let cluster = 1u64 << h.cluster_bits;
            let mut detail = format!(
                "qcow2 v{}, {size} bytes, {cluster}-byte clusters",
                h.version
            );
            if let Some(b) = h.backing {
                let format = match b.format {
                    BackingFormat::Raw => "raw",
                    BackingFormat::Qcow2 => "qcow2",
                };
                detail += &format!(", backing file {} ({format}, read-only)", b.name);
            }
            detail
        }
        Err(e) => return check(name, Status::Fail, e.to_string(), ""),
    };
    check(name, Status::Ok, detail, "")
}
