//! Image specs: `PATH`, `mem:SIZE`, `null:SIZE`.

use std::sync::Arc;

use crate::{
    Backend, Error, FileBackend, FileOptions, MemBackend, NullBackend, Result, SECTOR_SIZE,
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
        if let Some((kind, rest)) = spec.split_once(':') {
            let size = match kind {
                "mem" | "null" => parse_size(rest).map_err(|e| bad(e.to_string()))?,
                // A path like "./a:b" or "/x:y" still names a file.
                _ if kind.contains('/') || kind.starts_with('.') => {
                    return Ok(Self::Path(spec.into()))
                }
                _ => {
                    return Err(bad(format!(
                    "unknown kind {kind:?}: use a file path, mem:SIZE or null:SIZE (e.g. mem:256M)"
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
        let e = ImageSpec::parse("nbd:foo").unwrap_err().to_string();
        assert!(e.contains("unknown kind"), "{e}");
        assert!(
            ImageSpec::parse("mem:100").is_err(),
            "not a multiple of 512"
        );
        assert!(ImageSpec::parse("mem:0").is_err());
        assert!(ImageSpec::parse("mem:lots").is_err());
        assert!(ImageSpec::parse("").is_err());
    }
}
