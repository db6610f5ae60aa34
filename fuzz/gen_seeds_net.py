#!/usr/bin/env python3
"""Write the seed corpus of fuzz target net_queues (see its layout comment)."""
import os
import struct

TX, RX, FEATURES, MRG, REAP = 1, 2, 4, 8, 16
W, HOLE, HIGH, TOP, BIG = 1, 1 << 1, 2 << 1, 3 << 1, 8
SIZES = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4, 64: 5, 256: 6}


def frame(length, tag, dst=b"\xff" * 6, src=bytes([0x52, 0x54, 0, 0, 0, 0xA])):
    body = bytes(((i ^ tag) & 0xFF) for i in range(length - 14))
    return dst + src + b"\x08\x00" + body


class Input:
    def __init__(self, mergeable, size):
        self.options = (1 if mergeable else 0) | (SIZES[size] << 1)
        self.chains = []
        self.mem = bytearray()

    def chain(self, flags, *descs):
        """descs: (addr, len, desc flags)."""
        rec = bytes([flags, len(descs)])
        for addr, length, f in descs:
            rec += struct.pack("<HHB", addr, length, f)
        self.chains.append(rec)

    def put(self, addr, data):
        if len(self.mem) < addr + len(data):
            self.mem.extend(bytes(addr + len(data) - len(self.mem)))
        self.mem[addr:addr + len(data)] = data

    def bytes(self):
        return bytes([self.options, len(self.chains)]) + b"".join(self.chains) + bytes(self.mem)


HDR = bytes(12)
out = os.path.join(os.path.dirname(__file__), "corpus", "net_queues")
os.makedirs(out, exist_ok=True)

# One broadcast frame from tx into one big rx buffer, no MRG_RXBUF.
i = Input(mergeable=False, size=16)
i.put(0x1000, HDR + frame(60, 1))
i.chain(RX | REAP, (0x4000, 1526, W))
i.chain(TX | REAP, (0x1000, 72, 0))
open(os.path.join(out, "seed-one-frame"), "wb").write(i.bytes())

# MRG_RXBUF: a frame spread over three small buffers (one straddling the two adjacent
# regions), then malformed chains on both sides and MRG_RXBUF switched off mid-way.
i = Input(mergeable=True, size=16)
i.put(0x1000, HDR)
i.put(0x1010, frame(90, 2))
i.put(0x1100, HDR + frame(60, 3))
i.chain(RX, (0x2000, 40, W))
i.chain(RX, (0x2100, 24, W), (0x7FF0, 32, W))
i.chain(RX, (0x3000, 64, W))
i.chain(TX | REAP, (0x1000, 12, 0), (0x1010, 90, 0))
i.chain(TX, (0x0100, 64, HOLE))
i.chain(RX, (0x0FF0, 0x100, HIGH | W))
i.chain(RX, (0x2000, 0, W | BIG))
i.chain(RX | FEATURES | REAP, (0x5000, 2000, W))
i.chain(TX | REAP, (0x1100, 72, 0))
i.chain(TX | RX, (0x1100, 72, W))
i.chain(TX | REAP, (0xFF00, 72, TOP))
open(os.path.join(out, "seed-mrg-hostile"), "wb").write(i.bytes())

# Offloads: a TCP/IPv4 GSO frame (NEEDS_CSUM, gso_size 500) sent with the tx offloads
# accepted, to an rx port whose driver takes none: the switch cuts it into 3 segments.
TX_OFFLOADS, GUEST_OFFLOADS = 0x10, 0x20


def tcp_gso_frame(payload, mss):
    ip_len = 20 + 20 + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, ip_len, 0x1234, 0x4000, 64, 6, 0,
                     bytes([198, 51, 100, 2]), bytes([198, 51, 100, 1]))
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, 1000, 1, 0x50, 0x18, 0xFFFF, 0, 0)
    eth = b"\xff" * 6 + bytes([0x52, 0x54, 0, 0, 0, 0xA]) + b"\x08\x00"
    hdr = struct.pack("<BBHHHHH", 1, 1, 54, mss, 34, 16, 0)
    return hdr + eth + ip + tcp + bytes((i * 7) & 0xFF for i in range(payload))


for name, options in (("seed-gso-segmented", TX_OFFLOADS), ("seed-gso-as-is", TX_OFFLOADS | GUEST_OFFLOADS)):
    i = Input(mergeable=True, size=64)
    i.options |= options
    gso = tcp_gso_frame(1200, 500)
    i.put(0x1000, gso)
    for n in range(4):
        i.chain(RX, (0x3000 + n * 0x800, 0x800, W))
    i.chain(TX | REAP, (0x1000, len(gso), 0))
    open(os.path.join(out, name), "wb").write(i.bytes())

# The control queue: VQ_PAIRS_SET 2, an rx-mode command, a malformed chain, then a frame.
CTRL = 32
i = Input(mergeable=True, size=16)
i.put(0x1000, bytes([4, 0, 2, 0]))
i.put(0x1010, bytes([0, 0, 1]))
i.put(0x1100, HDR + frame(60, 5))
i.chain(CTRL, (0x1000, 4, 0), (0x6000, 1, W))
i.chain(CTRL, (0x1010, 3, 0), (0x6001, 1, W))
i.chain(CTRL, (0x6002, 1, W), (0x1010, 3, 0))
i.chain(RX, (0x4000, 1526, W))
i.chain(TX | REAP, (0x1100, 72, 0))
open(os.path.join(out, "seed-control"), "wb").write(i.bytes())
