use std::io::Cursor;

use super::*;

/// A server that sends `input` and records what the client writes.
struct Scripted {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server's greeting, then its answer to NBD_OPT_STRUCTURED_REPLY: unsupported.
fn hello(flags: u16) -> Vec<u8> {
    let mut v = greeting(flags);
    option_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
    v
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn opt_reply(v: &mut Vec<u8>, kind: u32, data: &[u8]) {
    option_reply(v, OPT_GO, kind, data);
}

fn option_reply(v: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

fn info_export(v: &mut Vec<u8>, size: u64, flags: u16) {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    opt_reply(v, REP_INFO, &d);
}

fn info_block_size(v: &mut Vec<u8>, min: u32, pref: u32, max: u32) {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [min, pref, max] {
        d.extend_from_slice(&x.to_be_bytes());
    }
    opt_reply(v, REP_INFO, &d);
}

fn run(input: Vec<u8>, export: &str) -> (Result<ExportInfo, HandshakeError>, Vec<u8>) {
    let mut s = Scripted {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    let r = handshake(&mut s, export);
    (r, s.output)
}

#[test]
fn handshake_sends_flags_and_opt_go_and_reads_info() {
    let mut input = hello(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM;
    info_export(&mut input, 1 << 30, flags);
    info_block_size(&mut input, 1, 4096, 1 << 25);
    opt_reply(&mut input, REP_ACK, &[]);
    let (info, out) = run(input, "disk");
    assert_eq!(
        info.unwrap(),
        ExportInfo {
            size: 1 << 30,
            flags,
            min_block: 1,
            preferred_block: 4096,
            max_block: 1 << 25,
            structured: false,
        }
    );
    let want: Vec<u8> = [
        &[0, 0, 0, 3][..], // client flags: FIXED_NEWSTYLE | NO_ZEROES
        b"IHAVEOPT",       // option magic
        &[0, 0, 0, 8],     // NBD_OPT_STRUCTURED_REPLY
        &[0, 0, 0, 0],     // no data
        b"IHAVEOPT",       // option magic
        &[0, 0, 0, 7],     // NBD_OPT_GO
        &[0, 0, 0, 12],    // length: 4 + 4 + 2 + 2
        &[0, 0, 0, 4],     // name length
        b"disk",           // name
        &[0, 1],           // one information request
        &[0, 3],           // NBD_INFO_BLOCK_SIZE
    ]
    .concat();
    assert_eq!(out, want);
}

#[test]
fn no_zeroes_only_when_offered_and_defaults_without_block_size() {
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    info_export(&mut input, 4096, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
    opt_reply(&mut input, 0x1234, b"ignored"); // unknown non-error reply: skipped
    opt_reply(&mut input, REP_ACK, &[]);
    let (info, out) = run(input, "");
    let info = info.unwrap();
    assert_eq!(&out[..4], &[0, 0, 0, 1]);
    assert!(!info.structured);
    assert!(info.has(TFLAG_READ_ONLY));
    assert_eq!((info.min_block, info.max_block), (1, DEFAULT_MAX_BLOCK));
}

#[test]
fn flags_ignored_without_has_flags() {
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    info_export(&mut input, 4096, TFLAG_READ_ONLY);
    opt_reply(&mut input, REP_ACK, &[]);
    assert_eq!(run(input, "").0.unwrap().flags, 0);
}

#[test]
fn refusals_and_bad_servers() {
    // Unknown export, with the server's message on one line.
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    opt_reply(&mut input, REP_ERR_UNKNOWN, b"export 'x' not\npresent");
    match run(input, "x").0 {
        Err(HandshakeError::Refused { code, message }) => {
            assert_eq!(code, REP_ERR_UNKNOWN);
            assert_eq!(message, "export 'x' not present");
        }
        other => panic!("{other:?}"),
    }
    // Newstyle without the fixed bit, and oldstyle.
    let e = run(hello(0), "").0.unwrap_err();
    assert!(matches!(e, HandshakeError::NotFixedNewstyle), "{e:?}");
    let mut old = NBDMAGIC.to_be_bytes().to_vec();
    old.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    old.extend_from_slice(&[0; 2]);
    let e = run(old, "").0.unwrap_err();
    assert!(matches!(e, HandshakeError::NotFixedNewstyle), "{e:?}");
    // Not NBD at all.
    let e = run(b"HTTP/1.1 400 Bad Request\r\n".to_vec(), "")
        .0
        .unwrap_err();
    assert!(matches!(e, HandshakeError::NotNbd), "{e:?}");
    // The server hangs up in the middle.
    let e = run(hello(FLAG_FIXED_NEWSTYLE), "").0.unwrap_err();
    assert!(matches!(e, HandshakeError::Io(_)), "{e:?}");
}

#[test]
fn protocol_errors_in_option_replies() {
    // ACK without export information.
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    opt_reply(&mut input, REP_ACK, &[]);
    assert!(matches!(run(input, "").0, Err(HandshakeError::Protocol(_))));
    // A truncated INFO_EXPORT.
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    opt_reply(&mut input, REP_INFO, &[0, 0, 1, 2]);
    assert!(matches!(run(input, "").0, Err(HandshakeError::Protocol(_))));
    // A huge reply length is refused before allocating.
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    input.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    input.extend_from_slice(&OPT_GO.to_be_bytes());
    input.extend_from_slice(&REP_INFO.to_be_bytes());
    input.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(run(input, "").0, Err(HandshakeError::Protocol(_))));
    // Bad reply magic.
    let mut input = hello(FLAG_FIXED_NEWSTYLE);
    input.extend_from_slice(&[0; 20]);
    assert!(matches!(run(input, "").0, Err(HandshakeError::Protocol(_))));
    // A name longer than the protocol allows is not sent.
    let long = "x".repeat(4097);
    let (r, out) = run(hello(FLAG_FIXED_NEWSTYLE), &long);
    assert!(matches!(r, Err(HandshakeError::Protocol(_))));
    assert!(out.is_empty());
}

#[test]
fn request_encoding() {
    let mut out = Vec::new();
    Request {
        flags: CMD_FLAG_NO_HOLE,
        cmd: CMD_WRITE_ZEROES,
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1000,
        len: 0x200,
    }
    .encode(&mut out);
    let want: Vec<u8> = [
        &[0x25, 0x60, 0x95, 0x13][..],
        &[0, 2],
        &[0, 6],
        &[1, 2, 3, 4, 5, 6, 7, 8],
        &[0, 0, 0, 0, 0, 0, 0x10, 0],
        &[0, 0, 2, 0],
    ]
    .concat();
    assert_eq!(out, want);
    assert_eq!(out.len(), REQUEST_LEN);
}

#[test]
fn reply_decoding() {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&28u32.to_be_bytes());
    b[8..16].copy_from_slice(&42u64.to_be_bytes());
    let r = Reply::decode(&b).unwrap();
    assert_eq!(
        r,
        Reply {
            error: 28,
            cookie: 42
        }
    );
    assert_eq!(r.errno(), libc::ENOSPC);
    assert_eq!(
        Reply {
            error: 0,
            cookie: 0
        }
        .errno(),
        0
    );
    assert_eq!(
        Reply {
            error: 9999,
            cookie: 0
        }
        .errno(),
        libc::EIO
    );
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert!(Reply::decode(&b).unwrap_err().contains("structured"));
    b[0..4].copy_from_slice(&[0; 4]);
    assert!(Reply::decode(&b).unwrap_err().contains("magic"));
}

#[test]
fn structured_replies_are_asked_for_and_used_when_acked() {
    let mut input = greeting(FLAG_FIXED_NEWSTYLE);
    option_reply(&mut input, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    info_export(&mut input, 4096, TFLAG_HAS_FLAGS);
    opt_reply(&mut input, REP_ACK, &[]);
    assert!(run(input, "").0.unwrap().structured);

    // A reply for another option where STRUCTURED_REPLY's is due is a protocol error.
    let mut input = greeting(FLAG_FIXED_NEWSTYLE);
    opt_reply(&mut input, REP_ACK, &[]);
    assert!(matches!(run(input, "").0, Err(HandshakeError::Protocol(_))));
}

fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_LEN] {
    let mut b = [0u8; CHUNK_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

#[test]
fn chunk_headers_decode_only_when_negotiated() {
    let b = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 520);
    let start: &[u8; REPLY_LEN] = b[..REPLY_LEN].try_into().unwrap();
    assert_eq!(ReplyStart::decode(start, true).unwrap(), ReplyStart::Chunk);
    assert!(ReplyStart::decode(start, false)
        .unwrap_err()
        .contains("structured"));
    let c = Chunk::decode(&b);
    assert_eq!(
        (c.flags, c.kind, c.cookie, c.length, c.done()),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 520, true)
    );
}

#[test]
fn chunk_payloads_parse_and_malformed_ones_are_errors() {
    let mut data = 4096u64.to_be_bytes().to_vec();
    data.extend_from_slice(b"abc");
    assert_eq!(
        parse_chunk(REPLY_TYPE_OFFSET_DATA, &data).unwrap(),
        ChunkBody::Data {
            offset: 4096,
            data: b"abc"
        }
    );
    let mut hole = 512u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&1024u32.to_be_bytes());
    assert_eq!(
        parse_chunk(REPLY_TYPE_OFFSET_HOLE, &hole).unwrap(),
        ChunkBody::Hole {
            offset: 512,
            len: 1024
        }
    );
    let mut err = 28u32.to_be_bytes().to_vec();
    err.extend_from_slice(&5u16.to_be_bytes());
    err.extend_from_slice(b"full\n");
    assert_eq!(
        parse_chunk(REPLY_TYPE_ERROR, &err).unwrap(),
        ChunkBody::Error {
            error: 28,
            message: "full".into()
        }
    );
    // An unknown error type still carries an error; error 0 is not success.
    let mut zero = 0u32.to_be_bytes().to_vec();
    zero.extend_from_slice(&0u16.to_be_bytes());
    assert!(matches!(
        parse_chunk(REPLY_TYPE_ERROR_BIT | 9, &zero).unwrap(),
        ChunkBody::Error { error, .. } if errno(error) == libc::EIO
    ));
    assert_eq!(parse_chunk(REPLY_TYPE_NONE, &[]).unwrap(), ChunkBody::None);
    assert_eq!(parse_chunk(77, b"whatever").unwrap(), ChunkBody::Other);
    // Malformed: every one a protocol error, none a panic.
    assert!(parse_chunk(REPLY_TYPE_NONE, b"x").is_err());
    assert!(parse_chunk(REPLY_TYPE_OFFSET_DATA, &data[..8]).is_err());
    assert!(parse_chunk(REPLY_TYPE_OFFSET_HOLE, &hole[..11]).is_err());
    assert!(parse_chunk(REPLY_TYPE_ERROR, &err[..5]).is_err());
    assert!(parse_chunk(REPLY_TYPE_ERROR, &err[..8]).is_err()); // message cut short
    assert!(parse_chunk(REPLY_TYPE_ERROR_OFFSET, &err).is_err()); // no offset
}
