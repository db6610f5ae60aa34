//! `virtiod run` with two devices from one TOML file, one of them read-only: the read-write one
//! takes writes (libblkio), the read-only one refuses a write sent straight to its queue (a
//! raw vhost-user frontend, since a well-behaved driver never sends one) and its image stays
//! unchanged; SIGTERM exits 0 and removes both sockets.

mod common;
mod ops_common;

use common::frontend::*;
use common::*;
use ops_common::*;

const MIB: u64 = 1 << 20;

#[test]
fn two_devices_one_read_only_refuses_writes() {
    let dir = Scratch::new("run-ro");
    let rw_img = dir.image("rw.img", 4 * MIB);
    let ro_img = dir.path("ro.img");
    let ro_content: Vec<u8> = (0..(4 * MIB as u32)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&ro_img, &ro_content).unwrap();
    let (rw_sock, ro_sock) = (dir.path("rw.sock"), dir.path("ro.sock"));
    let config = dir.path("devices.toml");
    let text = format!(
        "{}{}\nread-only = true\nserial = \"ro-disk\"\n",
        vhost_user_device("rw", rw_img.to_str().unwrap(), &rw_sock),
        vhost_user_device("ro", ro_img.to_str().unwrap(), &ro_sock).trim_end()
    );
    std::fs::write(&config, format!("{text}\n")).unwrap();
    let daemon = RunDaemon::start(&config, &[], &[rw_sock.clone(), ro_sock.clone()]);

    // The read-write device stores a pattern.
    let mut client = Client::connect(&rw_sock, 1, MIB as usize).unwrap();
    fill_pattern(&mut client.buf()[..MIB as usize], 0, 42);
    assert_eq!(client.write(0, 0, 0, MIB as usize), 0);
    assert_eq!(client.flush(0), 0);
    drop(client);

    // The read-only device: the driver sees VIRTIO_BLK_F_RO (libblkio refuses a read-write
    // start), and a write sent anyway gets IOERR.
    let e = Client::connect(&ro_sock, 1, MIB as usize)
        .err()
        .expect("RO device");
    assert_eq!(e.errno().raw_os_error(), libc::EROFS);
    let mut d = Driver::connect(&ro_sock);
    let h = d.readable(&header(T_OUT, 8));
    let payload = d.readable(&[0xEE; 4096]);
    let s = d.writable(1);
    let used = d.exec_table(
        "OUT on the read-only device",
        &linked(&[h, payload, s]),
        0,
        &[(s.addr, 1)],
    );
    assert_eq!(
        (used, d.get(s.addr, 1)[0]),
        (1, S_IOERR),
        "the write is refused"
    );
    drop(d);

    let (status, _stdout) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(!rw_sock.exists() && !ro_sock.exists(), "sockets removed");
    check_pattern(&std::fs::read(&rw_img).unwrap()[..MIB as usize], 0, 42).unwrap();
    assert!(
        std::fs::read(&ro_img).unwrap() == ro_content,
        "read-only image unchanged"
    );
}
