use super::*;

const CLUSTER: usize = 65536;

/// A valid version 3 header of a 1 GiB image with 64 KiB clusters: L1 at cluster 3, refcount
/// table at cluster 1, in a 4-cluster file.
fn header() -> Vec<u8> {
    let mut b = vec![0u8; CLUSTER];
    b[..4].copy_from_slice(&MAGIC);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    b[36..40].copy_from_slice(&8u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3 * CLUSTER as u64).to_be_bytes());
    b[48..56].copy_from_slice(&(CLUSTER as u64).to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&104u32.to_be_bytes());
    b
}

const FILE: u64 = 4 * CLUSTER as u64;

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn refused(b: &[u8], file: u64, needle: &str) {
    let e = parse(b, file).unwrap_err().to_string();
    assert!(e.contains(needle), "wanted {needle:?} in: {e}");
}

/// Add an extension at `at`; returns the next position.
fn ext(b: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    set32(b, at, kind);
    set32(b, at + 4, data.len() as u32);
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at + 8 + data.len().div_ceil(8) * 8
}

/// A header whose backing file is `name`, with `format` in the extension if given.
fn with_backing(name: &str, format: Option<&[u8]>) -> Vec<u8> {
    let mut b = header();
    let mut at = 104;
    if let Some(f) = format {
        at = ext(&mut b, at, EXT_BACKING_FORMAT, f);
    }
    let _ = ext(&mut b, at, 0, &[]);
    set64(&mut b, 8, 512);
    set32(&mut b, 16, name.len() as u32);
    b[512..512 + name.len()].copy_from_slice(name.as_bytes());
    b
}

#[test]
fn valid_header() {
    let h = parse(&header(), FILE).unwrap();
    assert_eq!(
        h,
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            backing: None
        }
    );
    // Version 2: no v3 fields, extensions right after 72 bytes.
    let mut b = header();
    set32(&mut b, 4, 2);
    b[72..104].fill(0);
    assert_eq!(parse(&b, FILE).unwrap().version, 2);
}

#[test]
fn backing_needs_a_named_format() {
    let h = parse(&with_backing("base.raw", Some(b"raw")), FILE).unwrap();
    assert_eq!(
        h.backing,
        Some(Backing {
            name: "base.raw".into(),
            format: BackingFormat::Raw
        })
    );
    let h = parse(&with_backing("/b/base.qcow2", Some(b"qcow2")), FILE).unwrap();
    assert_eq!(h.backing.unwrap().format, BackingFormat::Qcow2);
    refused(&with_backing("base.img", None), FILE, "-F raw");
    refused(
        &with_backing("base.vmdk", Some(b"vmdk")),
        FILE,
        "not served",
    );
    refused(
        &with_backing("nbd:localhost:10809", Some(b"raw")),
        FILE,
        "not a plain file name",
    );
    refused(
        &with_backing("json:{}", Some(b"raw")),
        FILE,
        "not a plain file name",
    );
    // The name must lie in the first cluster and be of a sane length.
    let mut b = with_backing("base.raw", Some(b"raw"));
    set64(&mut b, 8, CLUSTER as u64 - 4);
    refused(&b, FILE, "outside the first cluster");
    set64(&mut b, 8, u64::MAX - 2);
    refused(&b, FILE, "outside the first cluster");
    let mut b = with_backing("base.raw", Some(b"raw"));
    set32(&mut b, 16, 5000);
    refused(&b, FILE, "1..=1023");
}

#[test]
fn hostile_fields() {
    refused(b"QFI", FILE, "not a qcow2 image");
    refused(&[0u8; 512], FILE, "not a qcow2 image");
    type Mutation = fn(&mut Vec<u8>);
    let cases: Vec<(Mutation, &str)> = vec![
        (|b| set32(b, 4, 4), "version 4"),
        (|b| set32(b, 4, 1), "version 1"),
        (|b| set32(b, 20, 8), "cluster_bits 8"),
        (|b| set32(b, 20, 40), "cluster_bits 40"),
        (|b| set64(b, 24, 0), "not a non-zero multiple"),
        (|b| set64(b, 24, 1000), "not a non-zero multiple"),
        (|b| set64(b, 24, !511), "larger than"),
        (|b| set32(b, 32, 1), "encrypted"),
        (|b| set32(b, 36, 1), "too few"),
        (|b| set64(b, 40, 5 * CLUSTER as u64), "L1 table"),
        (|b| set64(b, 40, !65535), "L1 table"),
        (|b| set64(b, 40, 100), "not cluster aligned"),
        (|b| set64(b, 48, 7 * CLUSTER as u64), "refcount table"),
        (|b| set32(b, 56, 0), "misplaced"),
        (|b| set32(b, 56, u32::MAX), "refcount table"),
        (|b| set64(b, 72, 1), "dirty"),
        (|b| set64(b, 72, 2), "corrupt"),
        (|b| set64(b, 72, 4), "external data file"),
        (|b| set64(b, 72, 16), "extended L2"),
        (|b| set64(b, 72, 1 << 40), "unknown incompatible"),
        (|b| set64(b, 72, 8), "disagree"),
        (|b| set32(b, 96, 7), "refcount_order 7"),
        (|b| set32(b, 100, 50), "header length 50"),
        (|b| set32(b, 100, 1 << 20), "header length"),
        (
            |b| {
                set32(b, 100, 112);
                set64(b, 72, 8);
                b[104] = 1;
            },
            "zstd",
        ),
        (
            |b| {
                set32(b, 104, 0x1234);
                set32(b, 108, u32::MAX);
            },
            "runs past the first cluster",
        ),
        (
            |b| {
                let _ = ext(b, 104, EXT_CRYPTO, &[0; 16]);
            },
            "encrypted",
        ),
    ];
    for (mutate, needle) in cases {
        let mut b = header();
        mutate(&mut b);
        refused(&b, FILE, needle);
    }
    // A file cut short after the header.
    refused(&header(), 2 * CLUSTER as u64, "beyond the end of the file");
    // A first cluster that was not read in full.
    refused(&header()[..1024], FILE, "could not be read in full");
    // Extensions that never end run into the end of the cluster.
    let mut b = header();
    let mut at = 104;
    while at + 16 <= CLUSTER {
        at = ext(&mut b, at, 0x1234, &[1; 8]);
    }
    let _ = ext(&mut b, at, 0x1234, &[]);
    refused(&b, FILE, "past the first cluster");
}

#[test]
fn magic() {
    assert!(looks_like_qcow2(&header()));
    assert!(!looks_like_qcow2(b"QFI"));
    assert!(!looks_like_qcow2(&[0; 512]));
}
