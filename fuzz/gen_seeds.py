#!/usr/bin/env python3
"""Write the seed corpus of fuzz target request_parse (see its layout comment)."""
import struct, os

NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
SIZES = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4}


class Image:
    def __init__(self, size=16, event_idx=False, read_only=False):
        self.size = size
        self.options = SIZES[size] | (8 if event_idx else 0) | (16 if read_only else 0)
        self.mem = bytearray(0x300)
        self.next_desc = 0
        self.avail_idx = 0
        self.buf = 0x300

    def put(self, addr, data):
        if len(self.mem) < addr + len(data):
            self.mem.extend(bytes(addr + len(data) - len(self.mem)))
        self.mem[addr:addr + len(data)] = data

    def alloc(self, data, align=16):
        self.buf = (self.buf + align - 1) // align * align
        addr = self.buf
        self.put(addr, data)
        self.buf += len(data)
        return addr

    def desc(self, table, index, addr, length, flags, nxt):
        self.put(table + 16 * index, struct.pack('<QIHH', addr, length, flags, nxt))

    def chain(self, descs, table=0, indexes=None):
        """descs: (addr, len, flags); returns the head index."""
        if indexes is None:
            indexes = [(self.next_desc + i) % self.size for i in range(len(descs))]
            self.next_desc += len(descs)
        for i, (addr, length, flags) in enumerate(descs):
            last = i + 1 == len(descs)
            self.desc(table, indexes[i], addr, length,
                      flags if last else flags | NEXT, 0 if last else indexes[i + 1])
        return indexes[0]

    def avail(self, head):
        self.put(0x100 + 4 + 2 * (self.avail_idx % self.size), struct.pack('<H', head))
        self.avail_idx += 1
        self.put(0x102, struct.pack('<H', self.avail_idx))

    def used_event(self, value):
        self.put(0x100 + 4 + 2 * self.size, struct.pack('<H', value))

    def r(self, data):
        return (self.alloc(data), len(data), 0)

    def w(self, length):
        return (self.alloc(bytes(length)), length, WRITE)

    def bytes(self):
        return bytes([self.options]) + bytes(self.mem)


def hdr(kind, sector):
    return struct.pack('<IIQ', kind, 0, sector)


def rng(sector, count, flags):
    return struct.pack('<QII', sector, count, flags)


def pattern(n, seed):
    return bytes((seed * 31 + i) & 0xff for i in range(n))


seeds = {}

im = Image()
im.avail(im.chain([im.r(hdr(T_IN, 1)), im.w(1024), im.w(1)]))
seeds['in'] = im

im = Image()
h = hdr(T_OUT, 2)
d = pattern(512, 1)
im.avail(im.chain([im.r(h[:8]), im.r(h[8:]), im.r(d[:100]), im.r(d[100:]), im.w(1)]))
im.avail(im.chain([im.r(hdr(T_IN, 2)), im.w(512), im.w(1)]))
seeds['out-split'] = im

im = Image()
table = im.alloc(bytes(48))
im.chain([im.r(hdr(T_OUT, 3)), im.r(pattern(512, 2)), im.w(1)], table=table, indexes=[0, 1, 2])
im.desc(0, 0, table, 48, INDIRECT, 0)
im.avail(0)
table = im.alloc(bytes(32))
im.chain([im.r(hdr(T_FLUSH, 0)), im.w(1)], table=table, indexes=[0, 1])
im.desc(0, 1, table, 32, INDIRECT, 0)
im.avail(1)
seeds['indirect'] = im

im = Image(event_idx=True)
im.avail(im.chain([im.r(hdr(T_GET_ID, 0)), im.w(20), im.w(1)]))
im.avail(im.chain([im.r(hdr(T_DISCARD, 0)), im.r(rng(4, 8, 0)), im.w(1)]))
im.avail(im.chain([im.r(hdr(T_WRITE_ZEROES, 0) + rng(16, 8, 1)), im.w(1)]))
im.avail(im.chain([im.r(hdr(99, 0)), im.w(1)]))
im.used_event(1)
seeds['multi-event-idx'] = im

im = Image(read_only=True)
im.avail(im.chain([im.r(hdr(T_OUT, 0)), im.r(pattern(512, 3)), im.w(1)]))
im.avail(im.chain([im.r(hdr(T_IN, 0)), im.w(512), im.w(1)]))
seeds['read-only'] = im

# Queue of 2, data straddling the boundary between the first two memory regions.
im = Image(size=2)
im.put(0x7f00, bytes(0x200))
im.desc(0, 0, im.alloc(hdr(T_IN, 5)), 16, NEXT, 1)
im.desc(0, 1, 0x7f00, 0x201, WRITE, 0)
im.avail(0)
seeds['straddle'] = im

# A loop and a bad next index, then a good request.
im = Image(size=4)
im.desc(0, 0, im.alloc(hdr(T_FLUSH, 0)), 16, NEXT, 0)
im.avail(0)
im.desc(0, 1, im.alloc(hdr(T_FLUSH, 0)), 16, NEXT, 9)
im.avail(1)
im.next_desc = 2
im.avail(im.chain([im.r(hdr(T_FLUSH, 0)), im.w(1)]))
seeds['broken-chains'] = im

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus', 'request_parse')
os.makedirs(out, exist_ok=True)
for name, im in seeds.items():
    with open(os.path.join(out, 'seed-' + name), 'wb') as f:
        f.write(im.bytes())
