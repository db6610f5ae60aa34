//! Fuzz virtio-net's hostile-input paths: the driver's memory and its chains go to a
//! `TxQueue` on one port of an in-process `Switch` and to an `RxQueue` on another port of the
//! same switch, so good tx frames come back as rx frames written into the rx buffers.
//!
//! Input layout: byte 0: bit 0 acks MRG_RXBUF, bits 1-3 select the rx queue size (1, 2, 4, 8,
//! 16, 64, 256, 256), bit 4 acks the tx offloads (CSUM, HOST_TSO4/6: partial checksums and
//! GSO frames up to 64 KiB are sent), bit 5 the rx ones (GUEST_CSUM, GUEST_TSO4/6: else the
//! switch completes checksums and cuts TCP segments for the rx port); byte 1: the number of chains (at most 32); then per chain a flags byte
//! (bit 0: to tx, bit 1: to rx, bit 2: tell the rx queue the driver features again before
//! it, with MRG_RXBUF from bit 3; bit 4: reap rx completions after it; bit 5: to the control
//! queue of the rx port, whose device has 2 queue pairs), a descriptor count
//! byte (0..8) and 5 bytes per descriptor: address (u16 LE), length (u16 LE), flags (bit 0
//! writable; bits 1-2 where the address is: + 0 (the two adjacent regions 0..0x10000),
//! + 0x10000 (the hole), + 0x20000 (the region after the hole, 0x20000..0x21000, and beyond),
//! u64::MAX - 0xffff + address (the top of the space); bit 3: length u32::MAX - length).
//! The rest of the input is copied to guest address 0 (at most 0x10000 bytes). Chain `i` has
//! head `i`.
//!
//! Checked: no panic; the control queue answers at once with used length 0 or 1 (a status
//! byte in the chain's first writable descriptor, counted as a place it may write); tx completes every chain at once with used length 0 and writes nothing
//! at all (memory compared around each `start`); every used length is at most the chain's
//! writable bytes; rx completes only chains it was given, each once, and after the drain
//! holds nothing; rx writes nothing outside the writable descriptors of the chains it was
//! given (memory compared with the snapshot taken before the run).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtiod_core::{Chain, ChainDesc, Completed, GuestMem, Outcome, QueueHandler};
use virtiod_net::offload::{
    F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6,
};
use virtiod_net::{
    CtrlQueue, RxQueue, Switch, TxQueue, DEFAULT_MTU, ETH_HLEN, F_MRG_RXBUF, VLAN_HLEN,
};
use vm_memory::{Bytes, GuestAddress};

const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)];
const IMAGE_LEN: usize = 0x1_0000;
const MAX_CHAINS: usize = 32;
const MAX_DESCS: usize = 8;
const MAX_FRAME: usize = DEFAULT_MTU as usize + ETH_HLEN + VLAN_HLEN;
const QUEUE_SIZES: [usize; 8] = [1, 2, 4, 8, 16, 64, 256, 256];

/// The driver's memory: `low` is 0..0x10000, `high` the region after the hole.
#[derive(PartialEq, Eq)]
struct Snapshot {
    low: Vec<u8>,
    high: Vec<u8>,
}

impl Snapshot {
    fn take(mem: &GuestMem) -> Self {
        let (high_addr, high_len) = REGIONS[2];
        let mut low = vec![0u8; IMAGE_LEN];
        let mut high = vec![0u8; high_len];
        mem.read_slice(&mut low, GuestAddress(0)).unwrap();
        mem.read_slice(&mut high, GuestAddress(high_addr)).unwrap();
        Self { low, high }
    }
}

/// Panic if a byte of `before` (at guest address `base`) changed outside `allowed`. Compares
/// in chunks: per-byte comparisons are traced by the fuzzer and slow it down.
fn check_writes(base: u64, before: &[u8], after: &[u8], allowed: &[(u64, u64)]) {
    const CHUNK: usize = 256;
    let chunks = before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate();
    for (n, (b, a)) in chunks.filter(|(_, (b, a))| b != a) {
        for (i, (b, a)) in b.iter().zip(a.iter()).enumerate() {
            let addr = base + (n * CHUNK + i) as u64;
            if b != a && !allowed.iter().any(|&(s, e)| s <= addr && addr < e) {
                panic!("rx wrote {a:#x} at {addr:#x} (was {b:#x}), outside every rx buffer");
            }
        }
    }
}

/// One chain of the input and what to do with it.
struct Step {
    chain: Chain,
    tx: bool,
    rx: bool,
    features: Option<bool>,
    reap: bool,
    ctrl: bool,
}

/// Parse the chains; returns them and the rest of the input (the memory image).
fn parse(mut data: &[u8]) -> Option<(Vec<Step>, &[u8])> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = data.split_at_checked(n)?;
        data = rest;
        Some(head)
    };
    let count = usize::from(take(1)?[0]).min(MAX_CHAINS);
    let mut steps = Vec::with_capacity(count);
    for i in 0..count {
        let [flags, ndesc] = take(2)?.try_into().unwrap();
        let mut descs = Vec::new();
        for _ in 0..usize::from(ndesc) % (MAX_DESCS + 1) {
            let raw = take(5)?;
            let addr = u64::from(u16::from_le_bytes([raw[0], raw[1]]));
            let len = u32::from(u16::from_le_bytes([raw[2], raw[3]]));
            let f = raw[4];
            let addr = match (f >> 1) & 3 {
                0 => addr,
                1 => 0x1_0000 + addr,
                2 => 0x2_0000 + addr,
                _ => u64::MAX - 0xffff + addr,
            };
            descs.push(ChainDesc {
                addr: GuestAddress(addr),
                len: if f & 8 != 0 { u32::MAX - len } else { len },
                writable: f & 1 != 0,
            });
        }
        steps.push(Step {
            chain: Chain::of(i as u16, &descs),
            tx: flags & 1 != 0,
            rx: flags & 2 != 0,
            features: (flags & 4 != 0).then_some(flags & 8 != 0),
            reap: flags & 16 != 0,
            ctrl: flags & 32 != 0,
        });
    }
    Some((steps, data))
}

fn writable_bytes(chain: &Chain) -> u64 {
    chain
        .descs()
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum()
}

fn features(mergeable: bool, guest_offloads: bool) -> u64 {
    let offloads = if guest_offloads {
        F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
    } else {
        0
    };
    virtiod_core::F_VERSION_1 | offloads | if mergeable { F_MRG_RXBUF } else { 0 }
}

/// Check rx completions: chains given to rx and still held, each once, used length at most
/// its writable bytes.
fn check_completions(out: &mut Vec<Completed>, steps: &[Step], held: &mut [bool]) {
    if debug() && !out.is_empty() {
        eprintln!("rx completed {out:?}");
    }
    for c in out.drain(..) {
        let i = usize::from(c.head);
        assert!(
            held.get(i).copied().unwrap_or(false),
            "rx completed head {} it does not hold",
            c.head
        );
        held[i] = false;
        let writable = writable_bytes(&steps[i].chain);
        assert!(
            u64::from(c.used_len) <= writable,
            "rx used length {} > {writable} writable bytes (head {})",
            c.used_len,
            c.head
        );
    }
}

/// `FUZZ_DEBUG=1 cargo fuzz run net_queues INPUT` prints the rx completions.
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let Some((steps, image)) = parse(rest) else {
        return;
    };
    let mergeable = options & 1 != 0;
    let queue_size = QUEUE_SIZES[usize::from(options >> 1) & 7];
    let tx_offloads = options & 0x10 != 0;
    let guest_offloads = options & 0x20 != 0;

    let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = Arc::new(GuestMem::from_ranges(&ranges).unwrap());
    let image = &image[..image.len().min(IMAGE_LEN)];
    mem.write_slice(image, GuestAddress(0)).unwrap();

    let switch = Switch::new("fuzz");
    let (tx_port, rx_port) = (switch.port().unwrap(), switch.port_with_pairs(2).unwrap());
    let mac = Arc::new(std::sync::Mutex::new([0x52, 0x54, 0, 0, 0, 1]));
    let mut ctrl = CtrlQueue::new(rx_port.clone(), 2, mac);
    let mut tx = TxQueue::new(tx_port, MAX_FRAME);
    if tx_offloads {
        tx.driver_features(F_CSUM | F_HOST_TSO4 | F_HOST_TSO6);
    }
    let mut rx = RxQueue::new(rx_port, mergeable, queue_size);
    rx.driver_features(features(mergeable, guest_offloads));

    let before = Snapshot::take(&mem);
    // Writable descriptors of the chains the rx queue was given: where rx may write.
    let mut allowed = Vec::new();
    let mut held = vec![false; steps.len()];
    let mut out = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let writable = writable_bytes(&step.chain);
        if step.tx {
            let pre = Snapshot::take(&mem);
            let outcome = tx.start(&step.chain, &mem);
            assert_eq!(
                outcome,
                Outcome::Done { used_len: 0 },
                "tx chain {i}: not done at once with used length 0"
            );
            tx.submit().unwrap();
            tx.reap(&mut out);
            assert!(out.is_empty(), "tx reaped {out:?}");
            assert!(Snapshot::take(&mem) == pre, "tx chain {i} wrote memory");
        }
        if step.ctrl {
            let Outcome::Done { used_len } = ctrl.start(&step.chain, &mem) else {
                panic!("control chain {i}: not done at once");
            };
            assert!(used_len <= 1, "control chain {i}: used length {used_len}");
            if used_len == 1 {
                let status = step.chain.descs().iter().find(|d| d.writable).unwrap();
                allowed.push((status.addr.0, status.addr.0 + 1));
            }
        }
        if let Some(m) = step.features {
            rx.driver_features(features(m, guest_offloads));
        }
        if step.rx && rx.can_start() {
            match rx.start(&step.chain, &mem) {
                Outcome::Done { used_len } => assert!(
                    u64::from(used_len) <= writable,
                    "rx refused chain {i} with used length {used_len} > {writable}"
                ),
                Outcome::Started => {
                    held[i] = true;
                    for d in step.chain.descs().iter().filter(|d| d.writable) {
                        let s = d.addr.0;
                        allowed.push((s, s.saturating_add(u64::from(d.len))));
                    }
                }
            }
            rx.submit().unwrap();
        }
        if step.reap {
            rx.ack_completion_event();
            rx.reap(&mut out);
            check_completions(&mut out, &steps, &mut held);
        }
    }
    rx.reap(&mut out);
    check_completions(&mut out, &steps, &mut held);
    // Drain, as the core does on reset: the buffers held come back unused.
    rx.wait().unwrap();
    rx.reap(&mut out);
    check_completions(&mut out, &steps, &mut held);
    assert_eq!(rx.in_flight(), 0, "rx holds buffers after the drain");
    assert!(held.iter().all(|h| !h), "rx lost a buffer: {held:?}");

    let after = Snapshot::take(&mem);
    check_writes(0, &before.low, &after.low, &allowed);
    check_writes(REGIONS[2].0, &before.high, &after.high, &allowed);
});
