//! `virtiod ctl resize`: the image grows, the frontend gets `CONFIG_CHANGE_MSG` on its
//! backend channel and reads the new capacity with `GET_CONFIG`, and the new space serves
//! I/O; shrinking needs `--shrink`; a frontend without a backend channel is reported as not
//! notified.

mod common;
mod ops_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::frontend::{Driver, Options};
use common::*;
use ops_common::*;
use vhost::vhost_user::VhostUserFrontend;

const MIB: u64 = 1 << 20;

/// Answer one backend request on `channel`: returns (request, flags, size) of what came.
fn answer_one(mut channel: UnixStream) -> std::thread::JoinHandle<(u32, u32, u32)> {
    std::thread::spawn(move || {
        let mut hdr = [0u8; 12];
        channel.read_exact(&mut hdr).expect("a backend request");
        let word = |at: usize| u32::from_le_bytes(hdr[at..at + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(4), word(8));
        if flags & 0x8 != 0 {
            // NEED_REPLY: acknowledge with status 0, as QEMU does.
            let mut reply = Vec::new();
            reply.extend_from_slice(&request.to_le_bytes());
            reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            channel.write_all(&reply).unwrap();
        }
        (request, flags, size)
    })
}

#[test]
fn resize_grows_the_image_and_tells_the_frontend() {
    let dir = Scratch::new("resize");
    let image = dir.image("disk.img", 8 * MIB);
    let (sock, control) = (dir.path("vu.sock"), dir.path("ctl.sock"));
    let daemon = Daemon::start(
        &sock,
        image.to_str().unwrap(),
        &["--control", control.to_str().unwrap()],
    );
    let mut d = Driver::connect_opts(&sock, &Options::default().backend_req(true));
    let (ours, theirs) = UnixStream::pair().unwrap();
    d.fe.set_backend_request_fd(&theirs)
        .expect("SET_BACKEND_REQ_FD");
    assert_eq!(d.capacity(), 8 * MIB / 512);

    let answered = answer_one(ours.try_clone().unwrap());
    let (code, out, err) = ctl(&control, &["resize", "vu", "16M"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("{} -> {} bytes; driver notified", 8 * MIB, 16 * MIB)
    );
    let (request, flags, size) = answered.join().unwrap();
    assert_eq!(request, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    assert_eq!(
        flags & 0x8,
        0x8,
        "REPLY_ACK was negotiated: it asks for an answer"
    );
    assert_eq!(size, 0);
    assert_eq!(d.capacity(), 16 * MIB / 512);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 16 * MIB);
    // The queue follows at once: past the old end works on the same connection.
    d.round_trip(14 * MIB / 512, &[0x5a; 4096]);

    // Smaller needs --shrink; a size that is not whole sectors is refused.
    let (code, _, err) = ctl(&control, &["resize", "vu", "4M"]);
    assert_eq!(code, 1);
    assert!(err.contains("--shrink"), "{err}");
    let (code, _, err) = ctl(&control, &["resize", "vu", "1000"]);
    assert_eq!(code, 1);
    assert!(err.contains("multiple of 512"), "{err}");
    let (code, _, err) = ctl(&control, &["resize", "vu", "10X"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 16 * MIB);
    let answered = answer_one(ours);
    let (code, out, err) = ctl(&control, &["resize", "vu", "12M", "--shrink"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("driver notified"), "{out}");
    assert_eq!(answered.join().unwrap().0, 2);
    assert_eq!(d.capacity(), 12 * MIB / 512);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 12 * MIB);
    drop(d);

    // libblkio has no backend channel: resized, reported as not notified; it sees the new
    // capacity when it connects, and the new space serves I/O.
    let client = Client::connect(&sock, 1, 4096).unwrap();
    assert_eq!(client.capacity(), 12 * MIB);
    let (code, out, err) = ctl(&control, &["resize", "vu", "32M"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("driver NOT notified") && out.contains("BACKEND_REQ"),
        "{out}"
    );
    drop(client);
    let mut client = Client::connect(&sock, 1, 4096).unwrap();
    assert_eq!(client.capacity(), 32 * MIB);
    fill_pattern(client.buf(), 30 * MIB, 7);
    assert_eq!(client.write(0, 30 * MIB, 0, 4096), 0, "past the old end");
    client.buf().fill(0);
    assert_eq!(client.read(0, 30 * MIB, 0, 4096), 0);
    check_pattern(client.buf(), 30 * MIB, 7).unwrap();
    drop(client);
    assert!(daemon.terminate().success());
}
