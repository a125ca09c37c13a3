# The store-and-forward queue's on-flash format: an append-only log of
# frames, each `len:u16 | crc32:u32 | body`. A power cut can tear the last
# frame; recovery keeps every whole frame before the first bad one.
#
# Bodies: b"A" + epoch:u32 + seq:u32 + flags:u8 + payload   (add)
#         b"U" + epoch:u32 + seq:u32 + flags:u8 + payload   (replace payload)
#         b"R" + epoch:u32 + seq:u32                        (remove: acked)
#         b"X" + epoch:u32 + seq:u32 + <an A/U body without its letter>
#               (drop: remove that record and upsert the drop record that
#               declares it, in one frame, so a cut cannot do one alone)

import struct
from binascii import crc32

from agent.errors import JournalError

HEADER = "<HI"
HEADER_LEN = 6
BODY_MAX = 65535
KEY = "<II"
FLAG_DROP = 1


def frame(body):
    if len(body) > BODY_MAX:
        raise JournalError("journal frame of %d bytes is over the limit" % len(body), "too_large")
    return struct.pack(HEADER, len(body), crc32(body) & 0xFFFFFFFF) + body


def add(epoch, seq, flags, payload):
    return frame(b"A" + struct.pack(KEY, epoch, seq) + bytes((flags,)) + payload)


def update(epoch, seq, flags, payload):
    return frame(b"U" + struct.pack(KEY, epoch, seq) + bytes((flags,)) + payload)


def remove(epoch, seq):
    return frame(b"R" + struct.pack(KEY, epoch, seq))


def drop(victim_epoch, victim_seq, epoch, seq, flags, payload):
    return frame(b"X" + struct.pack(KEY, victim_epoch, victim_seq)
                 + struct.pack(KEY, epoch, seq) + bytes((flags,)) + payload)


def scan(data):
    """Return (bodies, good_len): every whole, checksummed frame in order, and
    where the last one ends. Anything after good_len is a torn or corrupt tail."""
    bodies = []
    pos = 0
    end = len(data)
    mv = memoryview(data)
    while pos + HEADER_LEN <= end:
        size, crc = struct.unpack_from(HEADER, data, pos)
        stop = pos + HEADER_LEN + size
        if stop > end:
            break
        body = bytes(mv[pos + HEADER_LEN:stop])
        if crc32(body) & 0xFFFFFFFF != crc:
            break
        bodies.append(body)
        pos = stop
    return bodies, pos


def replay(data):
    """Rebuild the live queue from a journal: a list of [epoch, seq, flags,
    payload] in queue order, and whether a torn/corrupt tail was cut."""
    bodies, good_len = scan(data)
    entries = []
    for body in bodies:
        if len(body) < 9 or body[0:1] not in (b"A", b"U", b"R", b"X"):
            raise JournalError("unknown journal frame", "bad_frame")
        kind = body[0:1]
        epoch, seq = struct.unpack_from(KEY, body, 1)
        i = _find(entries, epoch, seq)
        if kind == b"R" or kind == b"X":
            if i >= 0:
                entries.pop(i)
            if kind == b"R":
                continue
            body = body[8:]
            epoch, seq = struct.unpack_from(KEY, body, 1)
            i = _find(entries, epoch, seq)
        if len(body) < 10:
            raise JournalError("short journal frame", "bad_frame")
        entry = [epoch, seq, body[9], body[10:]]
        if i >= 0 and kind != b"A":
            entries[i] = entry
        elif i < 0 and kind != b"U":
            entries.append(entry)
    return entries, good_len != len(data)


def _find(entries, epoch, seq):
    for i in range(len(entries)):
        e = entries[i]
        if e[0] == epoch and e[1] == seq:
            return i
    return -1


def compact(entries):
    """One journal holding exactly these live entries."""
    return b"".join([add(e[0], e[1], e[2], e[3]) for e in entries])
