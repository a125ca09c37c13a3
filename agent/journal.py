# The store-and-forward queue's on-flash format: an append-only log of
# frames, each `len:u16 | crc32:u32 | body`. A power cut can tear the last
# frame; recovery keeps every whole frame before the first bad one.
#
# Bodies: b"A" + epoch:u32 + seq:u32 + flags:u8 + payload   (add)
#         b"U" + epoch:u32 + seq:u32 + flags:u8 + payload   (replace payload)
#         b"R" + epoch:u32 + seq:u32                        (remove: acked)
#         b"P" + epoch:u32 + seq:u32                        (a drop record was
#               published: after a reboot it is final, never widened again)
#         b"E" + epoch:u32 + seq:u32 (0)                    (the boot epoch, a
#               second copy beside the state file)
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
FLAG_SENT = 2
KINDS = (b"A", b"U", b"R", b"X", b"E", b"P")


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


def sent(epoch, seq):
    return frame(b"P" + struct.pack(KEY, epoch, seq))


def epoch_mark(epoch):
    return frame(b"E" + struct.pack(KEY, epoch, 0))


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
    """Rebuild the live queue from a journal. Returns (entries, damaged,
    epoch): entries as [epoch, seq, flags, payload] in queue order; damaged
    is true if a torn or corrupt tail was cut or a frame was not understood
    (skipped: a newer firmware may write kinds this one does not know);
    epoch is the highest boot epoch an E frame names, or -1."""
    bodies, good_len = scan(data)
    entries = []
    damaged = good_len != len(data)
    epoch_seen = -1
    for body in bodies:
        kind = body[0:1]
        if len(body) < 9 or kind not in KINDS or (kind in b"AUX" and len(body) < 10) \
                or (kind == b"X" and len(body) < 18):
            damaged = True
            continue
        epoch, seq = struct.unpack_from(KEY, body, 1)
        if kind == b"E":
            if epoch > epoch_seen:
                epoch_seen = epoch
            continue
        i = _find(entries, epoch, seq)
        if kind == b"P":
            if i >= 0:
                entries[i][2] |= FLAG_SENT
            continue
        if kind == b"R" or kind == b"X":
            if i >= 0:
                entries.pop(i)
            if kind == b"R":
                continue
            body = body[8:]
            epoch, seq = struct.unpack_from(KEY, body, 1)
            i = _find(entries, epoch, seq)
        entry = [epoch, seq, body[9], body[10:]]
        if i >= 0 and kind != b"A":
            entries[i] = entry
        elif i < 0 and kind != b"U":
            entries.append(entry)
    return entries, damaged, epoch_seen


def _find(entries, epoch, seq):
    for i in range(len(entries)):
        e = entries[i]
        if e[0] == epoch and e[1] == seq:
            return i
    return -1


def compact(entries, epoch):
    """One journal holding the boot epoch and exactly these live entries."""
    return epoch_mark(epoch) + b"".join([add(e[0], e[1], e[2], e[3]) for e in entries])
