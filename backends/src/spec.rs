//! Image specs: `PATH`, `mem:SIZE`, `null:SIZE`, `nbd+unix:///EXPORT?socket=PATH`,
//! `nbd://HOST[:PORT]/EXPORT`. Formats are never probed: a path is always a raw image.

use std::sync::Arc;

use crate::nbd::{NbdAddress, NbdTarget, DEFAULT_PORT};
use crate::{
    Backend, Error, FileBackend, FileOptions, MemBackend, NbdBackend, NullBackend, Result,
    SECTOR_SIZE,
};

/// A parsed image spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    /// A raw image file or block device.
    Path(std::path::PathBuf),
    /// RAM-backed, `size` bytes.
    Mem(u64),
    /// Zeroes on read, writes dropped, `size` bytes.
    Null(u64),
    /// An export of an NBD server.
    Nbd(NbdAddress),
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
            return parse_nbd_unix(rest).map(Self::Nbd).map_err(bad);
        }
        if let Some(rest) = spec.strip_prefix("nbd:") {
            return parse_nbd_tcp(rest).map(Self::Nbd).map_err(bad);
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
                    "unknown kind {kind:?}: use a file path, mem:SIZE, null:SIZE (e.g. mem:256M) or an nbd:// URI"
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

const NBD_UNIX_FORM: &str = "write nbd+unix:///EXPORT?socket=PATH";
const NBD_TCP_FORM: &str = "write nbd://HOST[:PORT]/EXPORT";

/// `//` `/EXPORT?socket=PATH` after `nbd+unix:`.
fn parse_nbd_unix(rest: &str) -> std::result::Result<NbdAddress, String> {
    let path = rest
        .strip_prefix("///")
        .ok_or_else(|| format!("no host allowed in a unix URI: {NBD_UNIX_FORM}"))?;
    let (export, query) = path
        .split_once('?')
        .ok_or_else(|| format!("no socket given: {NBD_UNIX_FORM}"))?;
    let mut socket = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("socket", p)) if !p.is_empty() => socket = Some(std::path::PathBuf::from(p)),
            _ => return Err(format!("unknown or empty query {pair:?}: {NBD_UNIX_FORM}")),
        }
    }
    let socket = socket.ok_or_else(|| format!("no socket given: {NBD_UNIX_FORM}"))?;
    Ok(NbdAddress {
        target: NbdTarget::Unix(socket),
        export: export.to_string(),
    })
}

/// `//HOST[:PORT]/EXPORT` after `nbd:`.
fn parse_nbd_tcp(rest: &str) -> std::result::Result<NbdAddress, String> {
    let rest = rest
        .strip_prefix("//")
        .ok_or_else(|| NBD_TCP_FORM.to_string())?;
    if rest.contains('?') {
        return Err(format!("no query allowed in an nbd:// URI: {NBD_TCP_FORM}"));
    }
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
    Ok(NbdAddress {
        target: NbdTarget::Tcp {
            host: host.to_string(),
            port,
        },
        export: export.to_string(),
    })
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

/// Open the backend an image spec names.
pub fn open(spec: &str, opts: OpenOptions) -> Result<Arc<dyn Backend>> {
    Ok(match ImageSpec::parse(spec)? {
        ImageSpec::Path(path) => Arc::new(FileBackend::open(
            &path,
            FileOptions {
                read_only: opts.read_only,
                direct: !opts.buffered,
            },
        )?),
        ImageSpec::Mem(size) => Arc::new(MemBackend::new(size, opts.read_only)),
        ImageSpec::Null(size) => Arc::new(NullBackend::new(size, opts.read_only)),
        ImageSpec::Nbd(addr) => Arc::new(NbdBackend::open(addr, opts.read_only)?),
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
            ImageSpec::Nbd(NbdAddress {
                target: NbdTarget::Unix(socket.into()),
                export: export.into(),
            })
        };
        let tcp = |host: &str, port: u16, export: &str| {
            ImageSpec::Nbd(NbdAddress {
                target: NbdTarget::Tcp {
                    host: host.into(),
                    port,
                },
                export: export.into(),
            })
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
        let ImageSpec::Nbd(a) = p("nbd+unix:///x?socket=/p") else {
            unreachable!()
        };
        assert_eq!(a.to_string(), "nbd+unix:///x?socket=/p");
        let ImageSpec::Nbd(a) = p("nbd://[::1]/x") else {
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
            "nbd:h",
        ] {
            let e = ImageSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("nbd"), "{bad}: {e}");
        }
        // Paths are still paths.
        assert_eq!(p("./nbd:x"), ImageSpec::Path("./nbd:x".into()));
    }
}
