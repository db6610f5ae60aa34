//! The `virtiod-rng` binary behind a real transport: the testkit's vhost-user frontend posts
//! requests into shared guest memory and checks what the device wrote, and where.

use std::process::Command;

use virtiod_testkit::frontend::{linked_from, Desc, Driver, Options, CANARY, F_NEXT};
use virtiod_testkit::process::Served;
use virtiod_testkit::scratch::Scratch;
use virtiod_testkit::{F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};

/// Post `chains` on queue 0 (each written into the descriptor table after the previous one)
/// with one kick, and wait for all of them; returns each chain's used length, in `chains`
/// order.
fn exec_all(d: &mut Driver, chains: &[&[Desc]]) -> Vec<u32> {
    let mut heads = Vec::new();
    let mut next = 0u16;
    for chain in chains {
        d.write_table_at(0, next, &linked_from(next, chain));
        heads.push(next);
        next += chain.len() as u16;
    }
    d.make_available(0, &heads);
    let used = d.wait_used(0, heads.len() as u16);
    heads
        .iter()
        .map(|&head| {
            let entries: Vec<_> = used
                .iter()
                .filter(|(id, _)| *id == u32::from(head))
                .collect();
            assert_eq!(entries.len(), 1, "one used entry for head {head}: {used:?}");
            entries[0].1
        })
        .collect()
}

/// Whether the device wrote over the whole canary fill of `buf` (a random buffer of 64 bytes
/// or more keeps at most a few canary bytes; keeping them all has a chance of 2^-512).
fn changed(d: &Driver, buf: Desc) -> bool {
    d.get(buf.addr, buf.len as usize)
        .iter()
        .any(|&b| b != CANARY)
}

#[test]
fn serves_random_bytes_refuses_readable_buffers_and_stops_on_sigterm() {
    let dir = Scratch::new("serve");
    let sock = dir.0.join("rng.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtiod-rng"));
    cmd.arg("--vhost-user").arg(&sock);
    let daemon = Served::start(cmd, &sock);

    // One queue, virtio 1.x only: no EVENT_IDX, no indirect tables.
    let mut d = Driver::connect_opts(&sock, &Options::queues(1).features(F_VERSION_1));
    let offered = d.offered_features();
    let want = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC;
    assert_eq!(offered & want, want, "offered {offered:#x}");
    assert_eq!(d.num_queues(), 1);

    let one = d.writable(4096);
    let (two_a, two_b) = (d.writable(100), d.writable(3000));
    let readable = d.readable(&[0x5A; 16]);
    let after_readable = d.writable(512);
    let other = d.writable(4096);
    let used = exec_all(
        &mut d,
        &[
            &[one],
            &[two_a, two_b],
            &[readable, after_readable],
            &[other],
        ],
    );
    assert_eq!(used, [4096, 3100, 0, 4096], "used lengths");
    for buf in [one, two_a, two_b, other] {
        assert!(changed(&d, buf), "buffer at {:#x} was filled", buf.addr);
    }
    assert_ne!(
        d.get(one.addr, 4096),
        d.get(other.addr, 4096),
        "two requests got the same bytes"
    );
    assert_eq!(
        d.get(readable.addr, 16),
        [0x5A; 16],
        "the readable buffer is untouched"
    );
    assert!(
        !changed(&d, after_readable),
        "a refused chain is not written"
    );
    // Nothing else changed: not the refused chain, not the canaries around every buffer.
    d.verify(
        "random bytes",
        &[one.range(), two_a.range(), two_b.range(), other.range()],
    );

    // An unterminated chain (a descriptor whose NEXT is itself) is refused the same way.
    let looping = d.writable(64);
    let at = 16;
    d.write_table_at(
        0,
        at,
        &[Desc {
            flags: looping.flags | F_NEXT,
            next: at,
            ..looping
        }],
    );
    d.make_available(0, &[at]);
    assert_eq!(d.wait_used(0, 1), [(u32::from(at), 0)]);
    d.verify("a looping chain", &[]);
    drop(d);

    // The next frontend acks the ring features too: an indirect table of two buffers is
    // filled. It stays connected while the daemon is told to stop.
    let features = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC;
    let mut d = Driver::connect_opts(&sock, &Options::queues(1).features(features));
    let (a, b) = (d.writable(256), d.writable(512));
    let table = d.indirect(&linked_from(0, &[a, b]));
    let used = d.exec_table("indirect", &[table], 0, &[a.range(), b.range()]);
    assert_eq!(used, 256 + 512);
    assert!(changed(&d, a) && changed(&d, b));

    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert!(!sock.exists(), "the socket is removed");
}
