# The device's privileged-access audit log: hash-chained, append-only, on
# flash, power-cut safe. Sans-IO: AuditChain makes the bytes, the driver
# appends them (agent.actions.Append) before acting on what they record.
#
# On flash: agent/journal.py's frames (len:u16 | crc32:u32 | body). Each
# body is deterministic CBOR
#
#   [seq, prev, time_s, kind, detail]
#
# seq counts from 0 with no gaps; prev is SHA-256 of the previous body (of
# genesis(device_id) for seq 0); time_s is the device's effective time
# (agent.grant.effective_now); kind is text; detail a small map of text/int/
# bytes. Changing, removing or reordering any record breaks the chain at the
# next one; check() finds where.
#
# Power cuts: an append cut short leaves a torn last frame. recover() keeps
# every whole frame, and when it found a torn tail returns the good prefix
# for the driver to write back atomically before the next append, so a new
# record never lands behind garbage. The record torn was never acted on
# (records are written before the step they describe).
#
# Limits: a record body is at most RECORD_BYTES_MAX; the log at most
# bytes_max (default LOG_BYTES_MAX). When the log is full (full(): less
# than RESERVE_RECORDS records of room) the console refuses new sessions
# and closes an open one (fails closed) until the log has been uploaded and
# rotated; past hard_full() a record is dropped and counted, never written
# beyond the bound. Rotation: rotate() below, on a cloud-signed checkpoint.
#
# What a hash chain with no device secret can and cannot show: anyone who
# can write flash can rewrite the log from some record on with a consistent
# chain. The cloud therefore anchors it: each verified upload is recorded
# as a signed checkpoint (seq, head hash), and a later log that does not
# reach or does not match a checkpoint is reported as truncated or edited.

import hashlib

from agent import cbor, journal
from agent.errors import RemoteError

GENESIS_CONTEXT = b"tether-audit-v1:"
CHECKPOINT_AAD = b"tether-audit-checkpoint-v1"   # cloud-signed {device, seq, head, iat}
RECORD_BYTES_MAX = 1024
LOG_BYTES_MAX = 64 * 1024
RESERVE_RECORDS = 8
HASH_LEN = 32
TAMPER = ("edit", "gap", "reorder", "bad_start", "truncated", "malformed")


class AuditError(RemoteError):
    code = "audit"


def genesis(device_id):
    return hashlib.sha256(GENESIS_CONTEXT + device_id.encode()).digest()


class AuditChain:
    """The writer: where the chain on flash ends, and the next record."""

    def __init__(self, device_id, seq=0, head=None, size=0, bytes_max=LOG_BYTES_MAX):
        self.device_id = device_id
        self.seq = seq                  # the next record's seq
        self.head = genesis(device_id) if head is None else head
        self.size = size                # bytes on flash
        self.bytes_max = bytes_max

    def record(self, time_s, kind, detail):
        """The frame to append for one record; the chain moves past it."""
        body = cbor.dumps([self.seq, self.head, time_s, kind, detail])
        if len(body) > RECORD_BYTES_MAX:
            raise AuditError("audit record of %d bytes is over %d" % (len(body), RECORD_BYTES_MAX),
                             "too_large")
        data = journal.frame(body)
        self.seq += 1
        self.head = hashlib.sha256(body).digest()
        self.size += len(data)
        return data

    def full(self):
        """No room for a new session (RESERVE_RECORDS kept to close one)."""
        return self.size + RESERVE_RECORDS * (RECORD_BYTES_MAX + journal.HEADER_LEN) > self.bytes_max

    def hard_full(self):
        """No room for even one more record."""
        return self.size + RECORD_BYTES_MAX + journal.HEADER_LEN > self.bytes_max


def recover(device_id, data, bytes_max=LOG_BYTES_MAX):
    """(AuditChain continuing the log in data, repair): repair is None, or
    the bytes to write back atomically (a torn tail cut off) first."""
    data = data or b""
    bodies, good_len = journal.scan(data)
    chain = AuditChain(device_id, 0, None, good_len, bytes_max)
    if bodies:
        last = _decode(bodies[-1])
        chain.seq = last[0] + 1 if last is not None else len(bodies)
        chain.head = hashlib.sha256(bodies[-1]).digest()
    repair = bytes(data[:good_len]) if good_len != len(data) else None
    return chain, repair


def records(data):
    """The decoded records of a log ([seq, prev, time_s, kind, detail] each;
    None for a frame that is whole but not a record)."""
    bodies, _ = journal.scan(data)
    return [_decode(b) for b in bodies]


# ---------------------------------------------------------------- checking

def check(data, device_id, anchor_seq=-1, anchor_head=None, start_seq=-1, start_head=None):
    """A report on a whole log: {"records", "head_seq", "head", "problems",
    "tamper"}. problems is a list of [kind, seq, detail]; tamper is true if
    any is in TAMPER. anchor_seq/anchor_head: a checkpoint the log must
    still contain unchanged (the cloud's last verified upload).
    start_seq/start_head: the checkpoint a rotated log starts at (its first
    record must be exactly that one); without it a log starts at seq 0."""
    bodies, good_len = journal.scan(data)
    problems = []
    prev_hash = genesis(device_id)
    prev_seq = -1
    for body in bodies:
        rec = _decode(body)
        if rec is None:
            problems.append(["malformed", prev_seq + 1, "frame is not an audit record"])
        else:
            if prev_seq < 0 and start_head is not None and rec[0] == start_seq \
                    and hashlib.sha256(body).digest() == start_head:
                prev_seq, prev_hash = start_seq - 1, rec[1]     # rotated: starts at a checkpoint
            _link(rec, prev_seq, prev_hash, problems)
            prev_seq = rec[0]
            if prev_seq == anchor_seq and anchor_head is not None \
                    and hashlib.sha256(body).digest() != anchor_head:
                problems.append(["edit", prev_seq, "differs from the checkpoint"])
        prev_hash = hashlib.sha256(body).digest()
    _tail(data, good_len, prev_seq, problems)
    if anchor_seq > prev_seq:
        problems.append(["truncated", prev_seq + 1,
                         "log ends before checkpoint seq %d" % anchor_seq])
    tamper = False
    for p in problems:
        if p[0] in TAMPER:
            tamper = True
    head = prev_hash if bodies else None
    return {"records": len(bodies), "head_seq": prev_seq, "head": head,
            "problems": problems, "tamper": tamper}


def rotate(data, seq, head):
    """The log from the record `seq` (whose hash must be `head`: a checkpoint
    the cloud signed) on; the driver writes it back atomically. Keeping the
    checkpointed record itself lets recover() and check() continue the chain."""
    bodies, good_len = journal.scan(data)
    pos = 0
    for body in bodies:
        rec = _decode(body)
        if rec is not None and rec[0] == seq:
            if hashlib.sha256(body).digest() != head:
                raise AuditError("record %d does not match the checkpoint" % seq, "mismatch")
            return bytes(data[pos:good_len])
        pos += journal.HEADER_LEN + len(body)
    raise AuditError("no record %d in the log" % seq, "not_found")


def _link(rec, prev_seq, prev_hash, problems):
    seq, prev = rec[0], rec[1]
    if prev_seq < 0 and seq != prev_seq + 1:
        problems.append(["bad_start", seq, "log does not start at seq 0"])
    elif seq > prev_seq + 1 and prev_seq >= 0:
        problems.append(["gap", prev_seq + 1, "records %d..%d missing" % (prev_seq + 1, seq - 1)])
    elif seq <= prev_seq:
        problems.append(["reorder", seq, "seq %d after %d" % (seq, prev_seq)])
    elif prev != prev_hash and seq == 0:
        problems.append(["bad_start", 0, "record 0 does not chain to this device's start "
                                         "(another device's log?)"])
    elif prev != prev_hash:
        problems.append(["edit", seq - 1, "record %d does not chain to %d" % (seq, seq - 1)])


def _tail(data, good_len, last_seq, problems):
    """A tail that is not whole frames: torn (a power cut) or corrupt."""
    rest = len(data) - good_len
    if rest == 0:
        return
    if rest >= journal.HEADER_LEN:
        size = data[good_len] | (data[good_len + 1] << 8)
        if journal.HEADER_LEN + size <= rest:
            # a frame that is all there but fails its checksum was changed
            problems.append(["edit", last_seq + 1, "frame checksum fails; %d bytes unreadable" % rest])
            return
    problems.append(["torn_tail", last_seq + 1, "%d bytes of a frame cut short" % rest])


def decode(body):
    """[seq, prev, time_s, kind, detail] of one record body, or None."""
    return _decode(body)


def _decode(body):
    try:
        rec = cbor.loads(body)
    except RemoteError:
        return None
    if not isinstance(rec, list) or len(rec) != 5 or type(rec[0]) is not int or rec[0] < 0 \
            or not isinstance(rec[1], bytes) or len(rec[1]) != HASH_LEN \
            or type(rec[2]) is not int or type(rec[3]) is not str or not isinstance(rec[4], dict):
        return None
    return rec
