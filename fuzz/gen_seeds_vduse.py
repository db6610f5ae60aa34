#!/usr/bin/env python3
"""Write the seed corpus of fuzz target vduse_message (see its layout comment)."""
import os, struct

REQUEST_SIZE = RESPONSE_SIZE = 24 + 128
GET_VQ_STATE, SET_STATUS, UPDATE_IOTLB = 0, 1, 2
RO, WO, RW = 0, 1, 2
ADD, REMOVE, MAP, INVALIDATE, CLEAR, CHECK = 0, 2, 3, 5, 6, 7


def request(kind, rid, payload=b''):
    b = struct.pack('<II16x', kind, rid) + payload
    return b + bytes(REQUEST_SIZE - len(b))


def response(rid, result, payload=b''):
    b = struct.pack('<II16x', rid, result) + payload
    return b + bytes(RESPONSE_SIZE - len(b))


def add(pages, start_page, file_page, perm, where=3, misalign=0):
    # where % 8: 0 = top of the space, 1-2 = start_page * 0x200, else start_page * 4096
    return struct.pack('<BBBBHBB', ADD, pages - 1, where, file_page, start_page,
                       0xff if misalign else 0, perm)


def op(code, *args):
    b = bytes([code]) + bytes(args)
    return b + bytes(8 - len(b))


def map_all():
    return op(MAP, 2)  # range selector: bit 0 set, bit 1 clear = 0..=u64::MAX


def map_entry(i, lo=0, hi=0):
    return op(MAP, 0, i, lo & 0xff, hi & 0xff)


def seeds():
    msg = request(SET_STATUS, 1, b'\x0f') + response(1, 0)
    yield 'basic', msg + add(2, 0, 0, RW) + add(1, 4, 8, RO) + add(1, 6, 9, WO) + map_all() \
        + op(CHECK, 0, 0, 0, 0, 0, 7)
    msg = request(UPDATE_IOTLB, 2, struct.pack('<QQ', 0x1000, 0x1fff)) + response(2, 0)
    yield 'update', msg + add(1, 0, 0, RW) + add(1, 1, 1, RW) + map_all() + op(REMOVE, 0) \
        + op(INVALIDATE, 0, 0) + map_entry(0) + add(4, 2, 10, RO) + map_entry(1, -1, 1)
    msg = request(GET_VQ_STATE, 3, struct.pack('<I', 1)) \
        + response(3, 0, struct.pack('<IH', 1, 0x1234))
    yield 'on-demand', msg + add(2, 16, 0, RW) + add(2, 18, 2, RW) + map_entry(0, 0x10, 0) \
        + map_entry(1) + op(CHECK, 0, 0, 0, 0, 0, 63) + op(CLEAR, 0) + map_all()
    # Regression: an entry ending at u64::MAX used to break every later snapshot.
    yield 'top', request(SET_STATUS, 5, b'\x04') + response(5, 0) + add(1, 0, 0, RW) \
        + add(1, 0, 1, RO, where=0) + map_all() + op(CHECK, 2, 0, 0, 0, 0, 9)
    # Hostile mode (bit 7 of the first program byte): overlapping entries, no invalidations.
    msg = request(42, 4) + response(4, 1)
    yield 'hostile', msg + bytes([0x80]) + add(2, 0, 0, RW)[1:] + add(2, 2, 4, RO, where=1) \
        + map_all() + op(REMOVE, 0) + map_all() + add(1, 0, 3, RW, misalign=1) + map_all()


if __name__ == '__main__':
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus', 'vduse_message')
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, 'seed-' + name), 'wb') as f:
            f.write(data)
