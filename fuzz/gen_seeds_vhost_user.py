#!/usr/bin/env python3
"""Write the seed corpus of fuzz target vhost_user_messages (see its layout comment).

Guest memory (the guest memfd, 128 KiB) is one region at guest address 0, frontend address UA:
queue 0's rings at 0x0 / 0x1000 / 0x2000 (desc / avail / used), queue 1's at 0x3000.., request
buffers from 0x8000.
"""
import os
import struct

UA = 0x7F00_0000_0000
GUEST = 0x20000

(GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE, SET_VRING_NUM, SET_VRING_ADDR,
 SET_VRING_BASE, GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, GET_PROTOCOL_FEATURES,
 SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE, GET_CONFIG, GET_INFLIGHT_FD,
 SET_INFLIGHT_FD, GET_MAX_MEM_SLOTS, ADD_MEM_REG) = (
    1, 2, 3, 5, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18, 24, 31, 32, 36, 37)

F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
P_MQ, P_REPLY_ACK, P_CONFIG, P_INFLIGHT, P_MEM_SLOTS = 1, 1 << 3, 1 << 9, 1 << 12, 1 << 15
NEED_REPLY = 0x8
NEXT, WRITE = 1, 2
T_IN, T_OUT, T_FLUSH = 0, 1, 4

# Extra bits of a message operation.
NO_SYNC, PAUSE_SPLIT = 1, 2
RINGS = [(0x0, 0x1000, 0x2000), (0x3000, 0x4000, 0x5000)]


class Seed:
    def __init__(self):
        self.ops = bytearray()
        self.avail_idx = [0, 0]
        self.buf = 0x8000

    def msg(self, code, payload=b'', flags=0x1, extra=0, split=0):
        self.ops += bytes([0, code, flags, extra, split]) + struct.pack('<H', len(payload))
        self.ops += payload

    def write(self, offset, data, inflight=False):
        """pwrite, in pieces of at most 255 bytes."""
        assert offset + len(data) <= GUEST
        for at in range(0, len(data), 255):
            piece, where = data[at:at + 255], offset + at
            sel = (1 if inflight else 0) | (2 if where >= 0x10000 else 0)
            self.ops += bytes([3, sel]) + struct.pack('<HB', where & 0xFFFF, len(piece)) + piece

    def truncate(self, size, inflight=False):
        assert size % 16 == 0
        self.ops += bytes([4, 1 if inflight else 0]) + struct.pack('<H', size >> 4)

    def kick(self, q):
        self.ops += bytes([5, q])

    def pause(self, sel=3):
        self.ops += bytes([6, sel])

    # --- set-up sequences -------------------------------------------------------------
    def handshake(self, proto=P_MQ | P_CONFIG):
        self.msg(SET_OWNER)
        self.msg(GET_FEATURES)
        self.msg(SET_FEATURES, struct.pack('<Q', F_VERSION_1 | F_PROTOCOL_FEATURES))
        self.msg(GET_PROTOCOL_FEATURES)
        self.msg(SET_PROTOCOL_FEATURES, struct.pack('<Q', proto))
        self.msg(GET_QUEUE_NUM)

    def mem_table(self, size=GUEST):
        region = struct.pack('<QQQQ', 0, size, UA, 0)
        self.msg(SET_MEM_TABLE, struct.pack('<II', 1, 0) + region)

    def add_mem_reg(self, size=GUEST):
        self.msg(GET_MAX_MEM_SLOTS)
        self.msg(ADD_MEM_REG, struct.pack('<QQQQQ', 0, 0, size, UA, 0))

    def queue(self, q, size=16, flags=0x1):
        desc, avail, used = RINGS[q]
        self.write(avail, bytes(4 + 2 * size + 2))
        self.write(used, bytes(4 + 8 * size + 2))
        self.msg(SET_VRING_NUM, struct.pack('<II', q, size), flags)
        self.msg(SET_VRING_ADDR, struct.pack('<IIQQQQ', q, 0, UA + desc, UA + used, UA + avail, 0),
                 flags)
        self.msg(SET_VRING_BASE, struct.pack('<II', q, 0), flags)
        self.msg(SET_VRING_CALL, struct.pack('<Q', q), flags)
        self.msg(SET_VRING_KICK, struct.pack('<Q', q), flags)
        self.msg(SET_VRING_ENABLE, struct.pack('<II', q, 1), flags)

    # --- requests ---------------------------------------------------------------------
    def alloc(self, data):
        addr = self.buf
        self.buf = (self.buf + len(data) + 63) // 64 * 64
        self.write(addr, data)
        return addr

    def request(self, q, kind, sector, data=None, read_len=0, head=0):
        """A header, an optional data buffer and a status byte at descriptors head.. ."""
        desc, avail, _ = RINGS[q]
        descs = [(self.alloc(struct.pack('<IIQ', kind, 0, sector)), 16, 0)]
        if data is not None:
            descs.append((self.alloc(data), len(data), 0))
        if read_len:
            descs.append((self.alloc(bytes(min(read_len, 255))), read_len, WRITE))
        descs.append((self.alloc(b'\xcc'), 1, WRITE))
        for i, (addr, length, flags) in enumerate(descs):
            last = i + 1 == len(descs)
            self.write(desc + 16 * (head + i), struct.pack(
                '<QIHH', addr, length, flags if last else flags | NEXT, 0 if last else head + i + 1))
        slot = self.avail_idx[q] % 16
        self.avail_idx[q] += 1
        self.write(avail + 4 + 2 * slot, struct.pack('<H', head))
        self.write(avail + 2, struct.pack('<H', self.avail_idx[q]))
        self.kick(q)
        self.pause()

    def save(self, name):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus',
                            'vhost_user_messages', name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(self.ops)


def served():
    """A well-formed set-up; a write, a read and a flush served; the ring stopped."""
    s = Seed()
    s.handshake()
    s.mem_table()
    s.queue(0)
    s.request(0, T_OUT, 0, data=bytes(range(256)) * 2, head=0)
    s.request(0, T_IN, 0, read_len=512, head=3)
    s.request(0, T_FLUSH, 0, head=6)
    s.msg(GET_VRING_BASE, struct.pack('<II', 0, 0))
    return s


def shrink_rings():
    """Served, then the memory with the rings is truncated away and the ring kicked."""
    s = Seed()
    s.handshake()
    s.mem_table()
    s.queue(0)
    s.request(0, T_OUT, 0, data=b'\x5a' * 512, head=0)
    s.truncate(0)
    s.kick(0)
    s.pause()
    s.msg(GET_FEATURES)
    return s


def shrink_buffers():
    """Served, then only the buffers are truncated away and a request uses them."""
    s = Seed()
    s.handshake()
    s.mem_table()
    s.queue(0)
    s.request(0, T_IN, 1, read_len=512, head=0)
    s.truncate(0x8000)
    s.request(0, T_OUT, 1, data=b'\xa5' * 512, head=3)
    s.msg(GET_FEATURES)
    return s


def inflight_two_queues():
    """In-flight region from the daemon, then the frontend's own (shrunk later); ADD_MEM_REG;
    both queues with REPLY_ACK; requests on both; the in-flight memfd shrunk and kicked."""
    s = Seed()
    s.handshake(P_MQ | P_REPLY_ACK | P_CONFIG | P_INFLIGHT | P_MEM_SLOTS)
    s.msg(GET_INFLIGHT_FD, struct.pack('<QQHHI', 0, 0, 2, 16, 0), NEED_REPLY | 1)
    s.msg(SET_INFLIGHT_FD, struct.pack('<QQHHI', 0x4000, 0, 2, 16, 0), NEED_REPLY | 1)
    s.add_mem_reg()
    s.queue(0, flags=NEED_REPLY | 1)
    s.queue(1, flags=NEED_REPLY | 1)
    s.request(0, T_OUT, 8, data=b'\x11' * 512, head=0)
    s.request(1, T_IN, 8, read_len=512, head=0)
    s.truncate(0, inflight=True)
    s.request(0, T_OUT, 9, data=b'\x22' * 512, head=3)
    s.msg(GET_VRING_BASE, struct.pack('<II', 1, 0))
    return s


def split_messages():
    """Messages cut in two (with a pause), GET_CONFIG, a queue set up without syncs."""
    s = Seed()
    s.msg(SET_OWNER, split=5, extra=PAUSE_SPLIT)
    s.msg(GET_FEATURES, split=11, extra=PAUSE_SPLIT)
    s.msg(SET_FEATURES, struct.pack('<Q', F_VERSION_1 | F_PROTOCOL_FEATURES), split=15,
          extra=PAUSE_SPLIT)
    s.msg(GET_PROTOCOL_FEATURES, split=1)
    s.msg(SET_PROTOCOL_FEATURES, struct.pack('<Q', P_MQ | P_CONFIG | P_REPLY_ACK), split=7)
    s.msg(GET_CONFIG, struct.pack('<III', 0, 8, 0) + bytes(8), split=13, extra=PAUSE_SPLIT)
    s.msg(SET_MEM_TABLE, struct.pack('<II', 1, 0) + struct.pack('<QQQQ', 0, GUEST, UA, 0),
          split=20, extra=PAUSE_SPLIT)
    s.queue(0)
    s.request(0, T_OUT, 2, data=b'\x33' * 512, head=0)
    return s


if __name__ == '__main__':
    served().save('seed-served')
    shrink_rings().save('seed-shrink-rings')
    shrink_buffers().save('seed-shrink-buffers')
    inflight_two_queues().save('seed-inflight')
    split_messages().save('seed-split')
