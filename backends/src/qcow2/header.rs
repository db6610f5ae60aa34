//! The qcow2 header, read and checked before the image is opened.
//!
//! The image is hostile input: every field is checked against the file size and the limits
//! of the format before anything else reads the image, and every feature virtiod does not
//! serve (encryption, external data files, extended L2 entries, a compression type other than
//! deflate, a dirty or corrupt image) is refused with one line that says what to do. The
//! backing file's format comes from the header's backing-format extension and is never
//! guessed from the backing file's contents.

/// The first four bytes of a qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: full disk encryption.
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Size of a version 2 header; version 3 headers are at least 104 bytes.
const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
/// The largest virtual disk accepted (QEMU's limit: 32 MiB L1 table entries of 2 MiB clusters).
const MAX_DISK_SIZE: u64 = 1 << 55;
/// The longest backing file name QEMU writes.
const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// The backing image of a qcow2 image, as its header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// File name, relative to the image's directory unless absolute.
    pub name: String,
    /// Its format: `raw` or `qcow2`.
    pub format: BackingFormat,
}

/// Formats a backing image may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A raw image.
    Raw,
    /// Another qcow2 image.
    Qcow2,
}

/// The fields of a checked qcow2 header that the backend uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// The backing image, if any.
    pub backing: Option<Backing>,
}

/// Why a qcow2 header is refused: one line with what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeaderError(pub String);

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `bytes` (the start of a file) look like a qcow2 image.
pub fn looks_like_qcow2(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// Check that `count` bytes at `offset` lie inside a file of `file_size` bytes.
fn inside(what: &str, offset: u64, count: u64, file_size: u64) -> Result<(), HeaderError> {
    match offset.checked_add(count) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(HeaderError(format!(
            "{what} ({count} bytes at offset {offset}) lies beyond the end of the file ({file_size} bytes): the image is truncated or damaged; check it with qemu-img check"
        ))),
    }
}

fn bad(text: impl Into<String>) -> HeaderError {
    HeaderError(text.into())
}

/// Parse and check a qcow2 header. `first_cluster` holds at least the file's first cluster
/// (or the whole file if shorter; 2 MiB covers every cluster size), `file_size` is the file's
/// size.
pub fn parse(first_cluster: &[u8], file_size: u64) -> Result<Header, HeaderError> {
    let b = first_cluster;
    if b.len() < V2_HEADER_LEN as usize || !looks_like_qcow2(b) {
        return Err(bad(
            "not a qcow2 image (no QFI\\xfb magic): serve a raw image without the qcow2: prefix",
        ));
    }
    let version = be32(b, 4);
    if version != 2 && version != 3 {
        return Err(bad(format!(
            "qcow2 version {version} is not supported (only 2 and 3): convert it with qemu-img convert -O qcow2"
        )));
    }
    let cluster_bits = be32(b, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!(
            "cluster_bits {cluster_bits} is outside 9..=21: the header is damaged"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    if (b.len() as u64) < cluster_size.min(file_size) {
        return Err(bad("the first cluster could not be read in full"));
    }
    let size = be64(b, 24);
    if size > MAX_DISK_SIZE {
        return Err(bad(format!(
            "virtual size {size} is larger than {MAX_DISK_SIZE} bytes: the header is damaged"
        )));
    }
    if size == 0 || !size.is_multiple_of(crate::SECTOR_SIZE) {
        return Err(bad(format!(
            "virtual size {size} is not a non-zero multiple of 512: resize it with qemu-img resize"
        )));
    }
    if be32(b, 32) != 0 {
        return Err(bad(
            "the image is encrypted, which virtiod does not serve: decrypt it with qemu-img convert -O qcow2 (with --object secret,... and --image-opts)",
        ));
    }
    let l1_entries = u64::from(be32(b, 36));
    let l1_offset = be64(b, 40);
    // Each L2 table maps cluster_size / 8 clusters.
    let l2_span = cluster_size * (cluster_size / 8);
    if l1_entries < size.div_ceil(l2_span) {
        return Err(bad(format!(
            "the L1 table has {l1_entries} entries, too few for {size} bytes: the header is damaged"
        )));
    }
    if !l1_offset.is_multiple_of(cluster_size) {
        return Err(bad(
            "the L1 table is not cluster aligned: the header is damaged",
        ));
    }
    inside("the L1 table", l1_offset, l1_entries * 8, file_size)?;
    let refcount_offset = be64(b, 48);
    let refcount_clusters = u64::from(be32(b, 56));
    if !refcount_offset.is_multiple_of(cluster_size) || refcount_clusters == 0 {
        return Err(bad(
            "the refcount table is misplaced: the header is damaged",
        ));
    }
    inside(
        "the refcount table",
        refcount_offset,
        refcount_clusters * cluster_size,
        file_size,
    )?;
    let header_len;
    let mut compression_type = 0u8;
    if version == 3 {
        if b.len() < V3_MIN_HEADER_LEN as usize {
            return Err(bad("the version 3 header is cut short"));
        }
        let incompatible = be64(b, 72);
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(bad(
                "the image is marked corrupt: repair it with qemu-img check -r all IMAGE",
            ));
        }
        if incompatible & INCOMPAT_DIRTY != 0 {
            return Err(bad(
                "the image is marked dirty (lazy refcounts, not closed cleanly): repair it with qemu-img check -r all IMAGE",
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(bad(
                "the image keeps its data in an external data file, which virtiod does not serve: convert it with qemu-img convert -O qcow2",
            ));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(bad(
                "the image uses extended L2 entries (subclusters), which virtiod does not serve: convert it with qemu-img convert -O qcow2",
            ));
        }
        let unknown = incompatible & !(INCOMPAT_COMPRESSION);
        if unknown != 0 {
            return Err(bad(format!(
                "the image uses unknown incompatible features (bits {unknown:#x}): convert it with qemu-img convert -O qcow2"
            )));
        }
        let refcount_order = be32(b, 96);
        if refcount_order > 6 {
            return Err(bad(format!(
                "refcount_order {refcount_order} is above 6: the header is damaged"
            )));
        }
        header_len = be32(b, 100);
        if header_len < V3_MIN_HEADER_LEN || u64::from(header_len) > cluster_size {
            return Err(bad(format!(
                "header length {header_len} is outside 104..={cluster_size}: the header is damaged"
            )));
        }
        if header_len > 104 {
            compression_type = b[104];
        }
        if (incompatible & INCOMPAT_COMPRESSION != 0) != (compression_type != 0) {
            return Err(bad(
                "the compression type and its feature bit disagree: the header is damaged",
            ));
        }
        if compression_type != 0 {
            return Err(bad(format!(
                "compression type {compression_type} (zstd) is not supported, only deflate: convert it with qemu-img convert -O qcow2 -o compression_type=zlib"
            )));
        }
    } else {
        header_len = V2_HEADER_LEN;
    }
    let data_len = (cluster_size.min(b.len() as u64)) as usize;
    let backing_format = read_extensions(&b[..data_len], header_len as usize)?;
    let backing = read_backing(b, data_len, backing_format)?;
    Ok(Header {
        version,
        cluster_bits,
        size,
        backing,
    })
}

/// Walk the header extensions (inside the first cluster); return the backing format, if named.
fn read_extensions(b: &[u8], mut at: usize) -> Result<Option<BackingFormat>, HeaderError> {
    let mut format = None;
    loop {
        if at + 8 > b.len() {
            return Err(bad(
                "the header extensions run past the first cluster: the header is damaged",
            ));
        }
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|end| *end <= b.len())
            .ok_or_else(|| {
                bad("a header extension runs past the first cluster: the header is damaged")
            })?;
        let data = &b[data_start..data_end];
        match kind {
            0 => return Ok(format),
            EXT_BACKING_FORMAT => {
                format = Some(match data {
                    b"raw" | b"file" => BackingFormat::Raw,
                    b"qcow2" => BackingFormat::Qcow2,
                    other => {
                        return Err(bad(format!(
                            "the backing file's format {:?} is not served (only raw and qcow2): convert the backing file",
                            String::from_utf8_lossy(other)
                        )))
                    }
                })
            }
            EXT_CRYPTO => {
                return Err(bad(
                    "the image is encrypted, which virtiod does not serve: decrypt it with qemu-img convert",
                ))
            }
            EXT_DATA_FILE => {} // refused by the feature bit when in use
            _ => {}             // feature names, bitmaps, ...: not needed to serve the disk
        }
        at = data_start + len.div_ceil(8) * 8;
    }
}

/// The backing file name, with its format; refused when the format is not named.
fn read_backing(
    b: &[u8],
    data_len: usize,
    format: Option<BackingFormat>,
) -> Result<Option<Backing>, HeaderError> {
    let offset = be64(b, 8);
    let len = be32(b, 16);
    if offset == 0 {
        return Ok(None);
    }
    if len == 0 || len > MAX_BACKING_NAME {
        return Err(bad(format!(
            "the backing file name is {len} bytes long (1..=1023): the header is damaged"
        )));
    }
    let end = offset
        .checked_add(u64::from(len))
        .filter(|end| *end <= data_len as u64)
        .ok_or_else(|| {
            bad("the backing file name lies outside the first cluster: the header is damaged")
        })?;
    let name = std::str::from_utf8(&b[offset as usize..end as usize]).map_err(|_| {
        bad("the backing file name is not UTF-8: rebase the image with qemu-img rebase -u")
    })?;
    if name.contains('\0') || name.contains(':') && !name.starts_with('/') && !name.starts_with('.')
    {
        return Err(bad(format!(
            "the backing file {name:?} is not a plain file name (protocols such as nbd: or json: are not followed): rebase the image with qemu-img rebase -u -b FILE -F FORMAT"
        )));
    }
    let format = format.ok_or_else(|| {
        bad(format!(
            "the backing file {name:?} has no format in the header, and formats are never guessed: name it with qemu-img rebase -u -b {name} -F raw (or -F qcow2) IMAGE"
        ))
    })?;
    Ok(Some(Backing {
        name: name.to_string(),
        format,
    }))
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
