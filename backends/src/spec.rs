//! Image specs: `PATH`, `raw:PATH`, `qcow2:PATH`, `mem:SIZE`, `null:SIZE`,
//! `nbd+unix:///EXPORT?socket=PATH[&reconnect=S]`, `nbd://HOST[:PORT]/EXPORT[?reconnect=S]`,
//! `rbd:POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT&keyring=PATH]`.
//!
//! Formats are never probed: a path is a raw image unless the spec says `qcow2:`, whatever its
//! first bytes (probing untrusted images lets a guest that writes a qcow2 header into its raw
//! disk make the host open files the header names). When a raw image looks like another format,
//! [`open`] logs a warning that says which spec to write.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::nbd::{NbdAddress, NbdOptions, NbdTarget, DEFAULT_PORT};
use crate::{
    Backend, Error, FileBackend, FileOptions, MemBackend, NbdBackend, NullBackend, Qcow2Backend,
    Qcow2Options, RbdAddress, RbdBackend, Result, SECTOR_SIZE,
};

/// A parsed image spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    /// A raw image file or block device (`PATH` or `raw:PATH`).
    Path(std::path::PathBuf),
    /// A qcow2 image (`qcow2:PATH`).
    Qcow2(std::path::PathBuf),
    /// RAM-backed, `size` bytes.
    Mem(u64),
    /// Zeroes on read, writes dropped, `size` bytes.
    Null(u64),
    /// An export of an NBD server, and how to talk to it.
    Nbd(NbdAddress, NbdOptions),
    /// An image of a Ceph cluster.
    Rbd(RbdAddress),
}

/// Options that apply when opening an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Use the page cache instead of `O_DIRECT`.
    pub buffered: bool,
}

impl ImageSpec {
    /// Parse a spec as given on the command line or in a config file.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |reason: String| Error::InvalidSpec {
            spec: spec.to_string(),
            reason,
        };
        if let Some(rest) = spec.strip_prefix("nbd+unix:") {
            let (addr, options) = parse_nbd_unix(rest).map_err(bad)?;
            return Ok(Self::Nbd(addr, options));
        }
        if let Some(rest) = spec.strip_prefix("nbd:") {
            let (addr, options) = parse_nbd_tcp(rest).map_err(bad)?;
            return Ok(Self::Nbd(addr, options));
        }
        if let Some(rest) = spec.strip_prefix("rbd:") {
            return parse_rbd(rest).map(Self::Rbd).map_err(bad);
        }
        for (prefix, qcow2) in [("qcow2:", true), ("raw:", false)] {
            if let Some(path) = spec.strip_prefix(prefix) {
                if path.is_empty() {
                    return Err(bad(format!("no path given: write {prefix}PATH")));
                }
                return Ok(if qcow2 {
                    Self::Qcow2(path.into())
                } else {
                    Self::Path(path.into())
                });
            }
        }
        if let Some((kind, rest)) = spec.split_once(':') {
            let size = match kind {
                "mem" | "null" => parse_size(rest).map_err(|e| bad(e.to_string()))?,
                // A path like "./a:b" or "/x:y" still names a file.
                _ if kind.contains('/') || kind.starts_with('.') => {
                    return Ok(Self::Path(spec.into()))
                }
                _ => {
                    return Err(bad(format!(
                    "unknown kind {kind:?}: use a file path, raw:PATH, qcow2:PATH, mem:SIZE, null:SIZE (e.g. mem:256M), an nbd:// URI or rbd:POOL/IMAGE"
                )))
                }
            };
            if size == 0 || size % SECTOR_SIZE != 0 {
                return Err(bad(format!(
                    "size {size} must be a non-zero multiple of 512 bytes (e.g. {kind}:64M)"
                )));
            }
            return Ok(if kind == "mem" {
                Self::Mem(size)
            } else {
                Self::Null(size)
            });
        }
        if spec.is_empty() {
            return Err(bad("empty: give a file path, mem:SIZE or null:SIZE".into()));
        }
        Ok(Self::Path(spec.into()))
    }
}

const NBD_UNIX_FORM: &str = "write nbd+unix:///EXPORT?socket=PATH[&reconnect=SECONDS]";
const NBD_TCP_FORM: &str = "write nbd://HOST[:PORT]/EXPORT[?reconnect=SECONDS]";
/// The largest `reconnect=` accepted, in seconds (a day).
const MAX_RECONNECT_SECS: u64 = 86_400;

/// Parse the `reconnect=SECONDS` value: whole seconds, 0 to [`MAX_RECONNECT_SECS`].
fn parse_reconnect(value: &str) -> std::result::Result<Duration, String> {
    let secs: u64 = value
        .parse()
        .ok()
        .filter(|s| *s <= MAX_RECONNECT_SECS)
        .ok_or_else(|| {
            format!(
                "bad reconnect timeout {value:?}: give whole seconds from 0 (fail at once) to {MAX_RECONNECT_SECS}, e.g. reconnect=30"
            )
        })?;
    Ok(Duration::from_secs(secs))
}

/// Parse a query's `KEY=VALUE` pairs: `socket` (only when `socket` is given as a slot) and
/// `reconnect`; each at most once.
fn parse_nbd_query(
    query: &str,
    mut socket: Option<&mut Option<std::path::PathBuf>>,
    form: &str,
) -> std::result::Result<NbdOptions, String> {
    let mut options = NbdOptions::default();
    let mut reconnect_seen = false;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("socket", p)) if !p.is_empty() => match socket.as_deref_mut() {
                Some(slot @ None) => *slot = Some(std::path::PathBuf::from(p)),
                Some(Some(_)) => return Err(format!("socket given twice: {form}")),
                None => return Err(format!("no socket allowed in an nbd:// URI: {form}")),
            },
            Some(("reconnect", v)) => {
                if reconnect_seen {
                    return Err(format!("reconnect given twice: {form}"));
                }
                reconnect_seen = true;
                options.reconnect_timeout = parse_reconnect(v)?;
            }
            _ => return Err(format!("unknown or empty query {pair:?}: {form}")),
        }
    }
    Ok(options)
}

/// `//` `/EXPORT?socket=PATH[&reconnect=SECONDS]` after `nbd+unix:`.
fn parse_nbd_unix(rest: &str) -> std::result::Result<(NbdAddress, NbdOptions), String> {
    let path = rest
        .strip_prefix("///")
        .ok_or_else(|| format!("no host allowed in a unix URI: {NBD_UNIX_FORM}"))?;
    let (export, query) = path
        .split_once('?')
        .ok_or_else(|| format!("no socket given: {NBD_UNIX_FORM}"))?;
    let mut socket = None;
    let options = parse_nbd_query(query, Some(&mut socket), NBD_UNIX_FORM)?;
    let socket = socket.ok_or_else(|| format!("no socket given: {NBD_UNIX_FORM}"))?;
    let addr = NbdAddress {
        target: NbdTarget::Unix(socket),
        export: export.to_string(),
    };
    Ok((addr, options))
}

/// `//HOST[:PORT]/EXPORT[?reconnect=SECONDS]` after `nbd:`.
fn parse_nbd_tcp(rest: &str) -> std::result::Result<(NbdAddress, NbdOptions), String> {
    let rest = rest
        .strip_prefix("//")
        .ok_or_else(|| NBD_TCP_FORM.to_string())?;
    let (rest, options) = match rest.split_once('?') {
        Some((rest, query)) => (rest, parse_nbd_query(query, None, NBD_TCP_FORM)?),
        None => (rest, NbdOptions::default()),
    };
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in the host: {NBD_TCP_FORM}"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| NBD_TCP_FORM.to_string())?,
                    ),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(format!("no host given: {NBD_TCP_FORM}"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| format!("bad port {p:?}: {NBD_TCP_FORM}"))?,
    };
    let addr = NbdAddress {
        target: NbdTarget::Tcp {
            host: host.to_string(),
            port,
        },
        export: export.to_string(),
    };
    Ok((addr, options))
}

const RBD_FORM: &str = "write rbd:POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT&keyring=PATH]";

/// `POOL/IMAGE[@SNAP][?conf=PATH&id=CLIENT&keyring=PATH]` after `rbd:`.
fn parse_rbd(rest: &str) -> std::result::Result<RbdAddress, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (pool, image) = path
        .split_once('/')
        .ok_or_else(|| format!("no pool given: {RBD_FORM}"))?;
    let (image, snap) = match image.split_once('@') {
        Some((image, snap)) if !snap.is_empty() => (image, Some(snap.to_string())),
        Some(_) => return Err(format!("empty snapshot name: {RBD_FORM}")),
        None => (image, None),
    };
    if pool.is_empty() || image.is_empty() || image.contains('/') {
        return Err(format!("bad pool or image name {path:?}: {RBD_FORM}"));
    }
    let mut addr = RbdAddress {
        pool: pool.to_string(),
        image: image.to_string(),
        snap,
        conf: None,
        id: None,
        keyring: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (slot, value) = match pair.split_once('=') {
            Some(("conf", v)) if !v.is_empty() => (&mut addr.conf, v),
            Some(("keyring", v)) if !v.is_empty() => (&mut addr.keyring, v),
            Some(("id", v)) if !v.is_empty() => {
                if addr.id.replace(v.to_string()).is_some() {
                    return Err(format!("id given twice: {RBD_FORM}"));
                }
                continue;
            }
            _ => return Err(format!("unknown or empty query {pair:?}: {RBD_FORM}")),
        };
        if slot.replace(value.into()).is_some() {
            return Err(format!("{pair:?} given twice: {RBD_FORM}"));
        }
    }
    Ok(addr)
}

/// Parse a size such as `4096`, `512K`, `256M`, `1G`, `2T` (binary units; an optional `iB`/`B`).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "unknown size unit {c:?} in {text:?}: use K, M, G or T"
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("cannot read size {text:?}: write e.g. 4096, 64M or 1G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// The format the first bytes of the file at `path` announce, if they announce one: `qcow2`,
/// `vmdk`, `vdi`, `vhdx`, `vpc` or `luks`. Used only to warn: formats are never probed.
pub fn detect_format(path: &Path) -> Option<&'static str> {
    let mut head = [0u8; 512];
    let mut file = std::fs::File::open(path).ok()?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    let head = &head[..filled];
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if crate::looks_like_qcow2(head) {
        Some("qcow2")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if at(64, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("vdi")
    } else if at(0, b"vhdxfile") {
        Some("vhdx")
    } else if at(0, b"conectix") {
        Some("vpc")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("luks")
    } else {
        None
    }
}

/// Warn when a raw image looks like another format: the spec may have forgotten `qcow2:`.
fn warn_if_not_raw(path: &Path) {
    if let Some(format) = detect_format(path) {
        let advice = if format == "qcow2" {
            format!("if it is a qcow2 image, write qcow2:{}", path.display())
        } else {
            format!("virtiod does not serve {format}: convert it with qemu-img convert -O qcow2")
        };
        tracing::warn!(
            image = %path.display(),
            "the image starts like a {format} image but is served raw (formats are never probed): the driver sees the {format} file as it is; {advice}"
        );
    }
}

/// Open the backend an image spec names.
pub fn open(spec: &str, opts: OpenOptions) -> Result<Arc<dyn Backend>> {
    Ok(match ImageSpec::parse(spec)? {
        ImageSpec::Path(path) => {
            let backend = FileBackend::open(
                &path,
                FileOptions {
                    read_only: opts.read_only,
                    direct: !opts.buffered,
                },
            )
            .map_err(|e| match (e, detect_format(&path)) {
                // A qcow2 file is seldom a multiple of 512 bytes: say what it is.
                (Error::BadSize { size, .. }, Some("qcow2")) => Error::InvalidSpec {
                    spec: spec.to_string(),
                    reason: format!(
                        "the file is {size} bytes (not a multiple of 512) and starts like a qcow2 image; formats are never probed: write qcow2:{} to serve it as qcow2",
                        path.display()
                    ),
                },
                (e, _) => e,
            })?;
            warn_if_not_raw(&path);
            Arc::new(backend)
        }
        ImageSpec::Qcow2(path) => Arc::new(Qcow2Backend::open(
            &path,
            Qcow2Options {
                read_only: opts.read_only,
                direct: !opts.buffered,
            },
        )?),
        ImageSpec::Mem(size) => Arc::new(MemBackend::new(size, opts.read_only)),
        ImageSpec::Null(size) => Arc::new(NullBackend::new(size, opts.read_only)),
        ImageSpec::Nbd(addr, options) => Arc::new(NbdBackend::open(addr, options, opts.read_only)?),
        ImageSpec::Rbd(addr) => Arc::new(RbdBackend::open(addr, opts.read_only)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn specs() {
        assert_eq!(ImageSpec::parse("mem:1M").unwrap(), ImageSpec::Mem(1 << 20));
        assert_eq!(
            ImageSpec::parse("null:1G").unwrap(),
            ImageSpec::Null(1 << 30)
        );
        assert_eq!(
            ImageSpec::parse("/tmp/a.img").unwrap(),
            ImageSpec::Path("/tmp/a.img".into())
        );
        assert_eq!(
            ImageSpec::parse("./a:b").unwrap(),
            ImageSpec::Path("./a:b".into())
        );
        let e = ImageSpec::parse("nbdx:foo").unwrap_err().to_string();
        assert!(e.contains("unknown kind"), "{e}");
        let e = ImageSpec::parse("nbd:foo").unwrap_err().to_string();
        assert!(e.contains("nbd://HOST"), "{e}");
        assert!(
            ImageSpec::parse("mem:100").is_err(),
            "not a multiple of 512"
        );
        assert!(ImageSpec::parse("mem:0").is_err());
        assert!(ImageSpec::parse("mem:lots").is_err());
        assert!(ImageSpec::parse("").is_err());
    }

    #[test]
    fn nbd_specs() {
        let unix = |export: &str, socket: &str| {
            ImageSpec::Nbd(
                NbdAddress {
                    target: NbdTarget::Unix(socket.into()),
                    export: export.into(),
                },
                NbdOptions::default(),
            )
        };
        let tcp = |host: &str, port: u16, export: &str| {
            ImageSpec::Nbd(
                NbdAddress {
                    target: NbdTarget::Tcp {
                        host: host.into(),
                        port,
                    },
                    export: export.into(),
                },
                NbdOptions::default(),
            )
        };
        let p = |s: &str| ImageSpec::parse(s).unwrap();
        assert_eq!(
            p("nbd+unix:///?socket=/run/n.sock"),
            unix("", "/run/n.sock")
        );
        assert_eq!(p("nbd+unix:///disk?socket=rel/s"), unix("disk", "rel/s"));
        assert_eq!(
            p("nbd://localhost/disk"),
            tcp("localhost", DEFAULT_PORT, "disk")
        );
        assert_eq!(p("nbd://127.0.0.1:10900/"), tcp("127.0.0.1", 10900, ""));
        assert_eq!(p("nbd://host"), tcp("host", DEFAULT_PORT, ""));
        assert_eq!(p("nbd://[::1]:10810/a/b"), tcp("::1", 10810, "a/b"));
        assert_eq!(p("nbd://[::1]/x"), tcp("::1", DEFAULT_PORT, "x"));
        // Shown back as a URI in errors.
        let ImageSpec::Nbd(a, _) = p("nbd+unix:///x?socket=/p") else {
            unreachable!()
        };
        assert_eq!(a.to_string(), "nbd+unix:///x?socket=/p");
        let ImageSpec::Nbd(a, _) = p("nbd://[::1]/x") else {
            unreachable!()
        };
        assert_eq!(a.to_string(), "nbd://[::1]:10809/x");
        for bad in [
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix://host/x?socket=/p",
            "nbd+unix:///x?sock=/p",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:port/x",
            "nbd://h:99999/x",
            "nbd://[::1/x",
            "nbd://h/x?tls=on",
            "nbd://h/x?socket=/p",
            "nbd+unix:///x?socket=/p&socket=/q",
            "nbd:h",
        ] {
            let e = ImageSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("nbd"), "{bad}: {e}");
        }
        // Paths are still paths.
        assert_eq!(p("./nbd:x"), ImageSpec::Path("./nbd:x".into()));
    }

    #[test]
    fn nbd_reconnect_option() {
        let timeout = |s: &str| match ImageSpec::parse(s) {
            Ok(ImageSpec::Nbd(_, o)) => o.reconnect_timeout,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            timeout("nbd+unix:///?socket=/s"),
            crate::nbd::DEFAULT_RECONNECT_TIMEOUT
        );
        assert_eq!(timeout("nbd://h/e"), Duration::from_secs(30));
        assert_eq!(
            timeout("nbd+unix:///e?socket=/s&reconnect=5"),
            Duration::from_secs(5)
        );
        assert_eq!(
            timeout("nbd+unix:///e?reconnect=0&socket=/s"),
            Duration::ZERO
        );
        assert_eq!(timeout("nbd://h/e?reconnect=30"), Duration::from_secs(30));
        assert_eq!(timeout("nbd://h:10900?reconnect=7"), Duration::from_secs(7));
        assert_eq!(
            timeout("nbd://h/e?reconnect=86400"),
            Duration::from_secs(86_400)
        );
        // The query is not part of the export name or the address.
        let ImageSpec::Nbd(a, _) = ImageSpec::parse("nbd://[::1]:1/x?reconnect=3").unwrap() else {
            unreachable!()
        };
        assert_eq!(a.export, "x");
        assert_eq!(a.to_string(), "nbd://[::1]:1/x");
        for (bad, needle) in [
            ("nbd://h/e?reconnect=", "bad reconnect timeout"),
            ("nbd://h/e?reconnect=-1", "bad reconnect timeout"),
            ("nbd://h/e?reconnect=1.5", "bad reconnect timeout"),
            ("nbd://h/e?reconnect=30s", "bad reconnect timeout"),
            ("nbd://h/e?reconnect=86401", "bad reconnect timeout"),
            (
                "nbd://h/e?reconnect=99999999999999999999",
                "bad reconnect timeout",
            ),
            (
                "nbd+unix:///e?socket=/s&reconnect=x",
                "bad reconnect timeout",
            ),
            ("nbd://h/e?reconnect=1&reconnect=2", "reconnect given twice"),
            ("nbd://h/e?reconnect", "unknown or empty query"),
            ("nbd://h/e?", "unknown or empty query"),
            ("nbd+unix:///e?reconnect=5", "no socket given"),
        ] {
            let e = ImageSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
