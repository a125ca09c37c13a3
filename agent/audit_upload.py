# Carrying the console's audit log to the cloud, and the cloud's word back
# to the console. Sans-IO: events in, actions out; the driver publishes,
# writes flash and hands the console's own actions (agent/console.py) on.
#
# Topics (cloud/broker.py SERVICE_TOPICS; the broker's ACL checks that a
# device publishes only on its own): up t/<id>/audit, down t/<id>/support.
# Payloads are deterministic CBOR maps with text keys (docs/console.md):
#
#   up    {"v": 1, "op": "hello", "next": n, "head": h, "rev": r}
#         {"v": 1, "op": "seg", "id": i, "first": s, "frames": f, "next": n, "rev": r}
#   down  {"v": 1, "op": "sync", "time": t, "next": c, ["revocations": L], ["checkpoint": C]}
#         {"v": 1, "op": "ack", "id": i, "time": t, "next": c, "findings": [..], ["checkpoint": C]}
#         {"v": 1, "op": "push", "time": t, "revocations": L}
#         {"v": 1, "op": "refused", "time": t, "code": text, ["id": i]}
#
# n and h: where the device's chain ends (the next seq, the last record's
# hash); r: agent.grant.revocations_digest of the list it applied, so the
# cloud sends a list only when it changed; f: whole journal frames of the
# log from record s on; c: the seq the cloud wants next; L: a signed
# revocation list; C: a signed checkpoint; t: the cloud's time, s.
#
# The cursor (the first record not yet acknowledged) is persisted in
# CURSOR_FILE, atomically, only after an ack: a power cut before the write
# sends the segment again, and the cloud, holding those records already,
# takes the resend as one (identical records are not stored twice). The
# cloud's `next` in sync and ack moves the cursor, clamped to the log.
#
# What arrives is checked before it is used: signed things (revocation
# lists, checkpoints) by the console against the pinned support key; the
# rest is only trusted as far as the broker's ACL goes (only the cloud's
# support identity may publish on t/<id>/support). Anything malformed is
# dropped with a Log action and a code, never raised.
#
# Limits: a segment at most segment_bytes (SEGMENT_BYTES_MAX), a message in
# at most DOWN_BYTES_MAX, one segment in flight, ACK_MS to answer, then
# resent at most RESENDS_MAX times before waiting for the next connection.

import struct
from binascii import crc32

from agent import auditlog, cbor, cose, grant, journal
from agent import console as core
from agent.actions import Log, Publish, WriteAtomic
from agent.errors import RemoteError
from agent.value import Value

VERSION = 1
CURSOR_FILE = "audit.cursor"
SEGMENT_BYTES_MAX = 16 * 1024      # the cloud refuses more
SEGMENT_BYTES = 4 * 1024           # what a device sends per message by default
UP_BYTES_MAX = SEGMENT_BYTES_MAX + 256
DOWN_BYTES_MAX = 16 * 1024
FINDINGS_MAX = 16
ID_MAX = 0xFFFFFFFF
SEQ_MAX = 1 << 40
ACK_MS = 30 * 1000
RESENDS_MAX = 3
TIME_FEED_S = 600                  # acks raise the trusted floor at most this often
ROTATE_BYTES = auditlog.LOG_BYTES_MAX // 4
ROTATE_RECORDS_MIN = 4             # a checkpoint that would drop fewer is not worth a rewrite

OFFLINE = "offline"
SYNCING = "syncing"                # hello sent, waiting for sync
IDLE = "idle"                      # online, nothing in flight
SENDING = "sending"                # a segment is in flight
STALLED = "stalled"                # the cloud refused or never answered: wait for a reconnect


class UploadError(RemoteError):
    code = "audit_upload"


# ---------------------------------------------------------------- events

class Online(Value):
    """The MQTT session is up and subscribed to t/<id>/support."""
    __slots__ = ("now_ms",)

    def __init__(self, now_ms):
        self.now_ms = now_ms


class Offline(Value):
    __slots__ = ("now_ms",)

    def __init__(self, now_ms):
        self.now_ms = now_ms


class Received(Value):
    """A message on t/<id>/support; log is the audit log as on flash now."""
    __slots__ = ("payload", "log", "now_ms", "time_s")

    def __init__(self, payload, log, now_ms, time_s):
        self.payload = payload
        self.log = log
        self.now_ms = now_ms
        self.time_s = time_s


class Poll(Value):
    """Time passed or the log grew: send what is pending, resend what is late."""
    __slots__ = ("log", "now_ms", "time_s")

    def __init__(self, log, now_ms, time_s):
        self.log = log
        self.now_ms = now_ms
        self.time_s = time_s


# ---------------------------------------------------------------- wire

def hello(next_seq, head, rev):
    return cbor.dumps({"v": VERSION, "op": "hello", "next": next_seq, "head": head, "rev": rev})


def segment(seg_id, first, frames, next_seq, rev):
    return cbor.dumps({"v": VERSION, "op": "seg", "id": seg_id, "first": first, "frames": frames,
                       "next": next_seq, "rev": rev})


# what each down message must (True) or may (False) hold, and of which type
DOWN_FIELDS = {
    "sync": {"time": (int, True), "next": (int, True), "revocations": (bytes, False),
             "checkpoint": (bytes, False)},
    "ack": {"id": (int, True), "time": (int, True), "next": (int, True), "findings": (list, True),
            "checkpoint": (bytes, False)},
    "push": {"time": (int, True), "revocations": (bytes, True)},
    "refused": {"time": (int, True), "code": (str, True), "id": (int, False)},
}


def parse_down(payload):
    """The cloud's message as a dict; UploadError with a code if off-format."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > DOWN_BYTES_MAX:
        raise UploadError("a support message is bytes, at most %d" % DOWN_BYTES_MAX, "too_large")
    msg = cbor.loads(payload)
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise UploadError("not a version %d support message" % VERSION, "bad_version")
    op = msg.get("op")
    fields = DOWN_FIELDS.get(op) if type(op) is str else None
    if fields is None:
        raise UploadError("unknown op", "unknown_op")
    for key in msg:
        if key != "v" and key != "op" and key not in fields:
            raise UploadError("unknown field", "bad_field")
    for key in fields:
        kind, required = fields[key]
        if key not in msg:
            if required:
                raise UploadError("%s is missing" % key, "bad_field")
        elif type(msg[key]) is not kind:
            raise UploadError("%s has the wrong type" % key, "bad_field")
    return _check_values(msg)


def _check_values(msg):
    for key in ("time", "next", "id"):
        if key in msg and not 0 <= msg[key] < SEQ_MAX:
            raise UploadError("%s out of range" % key, "bad_field")
    findings = msg.get("findings", [])
    if len(findings) > FINDINGS_MAX:
        raise UploadError("too many findings", "bad_field")
    for f in findings:
        if type(f) is not str or len(f) > 32:
            raise UploadError("a finding is a short text", "bad_field")
    return msg


def load_cursor(blob):
    """The persisted cursor (first record not yet acknowledged), or 0."""
    try:
        value = cbor.loads(blob) if blob else None
    except RemoteError:
        return 0
    if isinstance(value, list) and len(value) == 2 and value[0] == VERSION \
            and type(value[1]) is int and 0 <= value[1] < SEQ_MAX:
        return value[1]
    return 0


# ---------------------------------------------------------------- the machine

TRANSITIONS = {
    (OFFLINE, Online): "_online",
    (SYNCING, Online): "_online",
    (IDLE, Online): "_online",
    (SENDING, Online): "_online",
    (STALLED, Online): "_online",
    (OFFLINE, Offline): "_offline",
    (SYNCING, Offline): "_offline",
    (IDLE, Offline): "_offline",
    (SENDING, Offline): "_offline",
    (STALLED, Offline): "_offline",
    (OFFLINE, Poll): "_nothing",
    (SYNCING, Poll): "_late_sync",
    (IDLE, Poll): "_poll",
    (SENDING, Poll): "_late_ack",
    (STALLED, Poll): "_nothing",
    (OFFLINE, Received): "_stray",
    (SYNCING, Received): "_received",
    (IDLE, Received): "_received",
    (SENDING, Received): "_received",
    (STALLED, Received): "_received",
}


class Uploader:
    def __init__(self, console, identity, cursor_blob=None, segment_bytes=SEGMENT_BYTES,
                 rotate_bytes=ROTATE_BYTES):
        if not 0 < segment_bytes <= SEGMENT_BYTES_MAX:
            raise ValueError("segment_bytes must be 1..%d" % SEGMENT_BYTES_MAX)
        self.console = console
        self.up = "t/%s/audit" % identity
        self.down = "t/%s/support" % identity
        self.cursor = load_cursor(cursor_blob)
        self.segment_bytes = segment_bytes
        self.rotate_bytes = rotate_bytes
        self.state = OFFLINE
        self.seg_id = 0
        self.inflight = None            # (id, first, end seq, payload)
        self.sent_ms = 0
        self.resends = 0
        self.time_fed_s = 0
        self.checkpoint = None          # the cloud's latest, applied at the next Poll
        self.acked = 0                  # segments acknowledged (for drivers and tests)
        self.findings = []              # what the cloud reported about our log, last FINDINGS_MAX

    def feed(self, event):
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise UploadError("no transition for %s in %s" % (type(event).__name__, self.state),
                              "bad_event")
        return getattr(self, handler)(event)

    def pending(self):
        """True if the log holds records the cloud has not acknowledged."""
        return self.cursor < self.console.chain.seq

    # -- connection ---------------------------------------------------------

    def _online(self, event):
        self.state, self.inflight, self.resends = SYNCING, None, 0
        self.sent_ms = event.now_ms
        return [self._publish(hello(self.console.chain.seq, self.console.chain.head, self._rev()))]

    def _offline(self, event):
        self.state, self.inflight = OFFLINE, None
        return []

    def _nothing(self, event):
        return []

    def _late_sync(self, event):
        if event.now_ms - self.sent_ms < ACK_MS:
            return []
        return self._retry(event, self._publish(hello(self.console.chain.seq, self.console.chain.head,
                                                      self._rev())))

    def _late_ack(self, event):
        if event.now_ms - self.sent_ms < ACK_MS:
            return []
        return self._retry(event, self._publish(self.inflight[3]))

    def _retry(self, event, publish):
        if self.resends >= RESENDS_MAX:
            self.state, self.inflight = STALLED, None
            return [Log("audit_upload_stalled", "no answer from the cloud after %d resends" % RESENDS_MAX)]
        self.resends += 1
        self.sent_ms = event.now_ms
        return [publish]

    # -- sending --------------------------------------------------------------

    def _poll(self, event):
        return self._rotate(event) + self._send(event)

    def _send(self, event):
        """The next segment from the log as on flash (event.log). It may lag
        the console's chain (records of this same feed not yet written):
        what is announced is what the log holds, so a record a power cut
        tears before it is written is never announced."""
        if not self.pending():
            return []
        first, frames, end, log_end = pick_segment(event.log, self.cursor, self.segment_bytes)
        if frames is None:
            return []                   # the records pending are not on flash yet
        self.seg_id = self.seg_id + 1 if self.seg_id < ID_MAX else 1
        payload = segment(self.seg_id, first, frames, log_end, self._rev())
        self.inflight = (self.seg_id, first, end, payload)
        self.state, self.sent_ms, self.resends = SENDING, event.now_ms, 0
        return [self._publish(payload)]

    def _publish(self, payload):
        return Publish(self.up, payload, None)

    def _rev(self):
        return grant.revocations_digest(self.console.revoked)

    # -- receiving -------------------------------------------------------------

    def _stray(self, event):
        return [Log("audit_upload_stray", "a support message while offline")]

    def _received(self, event):
        try:
            msg = parse_down(event.payload)
        except RemoteError as e:
            return [Log("audit_upload_refused", "%s: %s" % (e.code, e.message))]
        return getattr(self, "_on_" + msg["op"])(msg, event)

    def _on_sync(self, msg, event):
        if self.state != SYNCING:
            return [Log("audit_upload_stray", "a sync that was not asked for")]
        self.state = IDLE
        actions = self._time(msg, event, True) + self._revocations(msg, event)
        actions += self._move_cursor(msg["next"], event.log)
        self._keep_checkpoint(msg)
        return actions

    def _on_ack(self, msg, event):
        if self.state != SENDING or self.inflight[0] != msg["id"]:
            return [Log("audit_upload_stray", "an ack for segment %d" % msg["id"])]
        self.state, self.inflight = IDLE, None
        self.acked += 1
        self.findings = (self.findings + msg["findings"])[-FINDINGS_MAX:]
        actions = self._time(msg, event, False) + self._move_cursor(msg["next"], event.log)
        if msg["findings"]:
            actions.append(Log("audit_findings", ",".join(msg["findings"])))
        self._keep_checkpoint(msg)
        return actions

    def _on_push(self, msg, event):
        return self._time(msg, event, True) + self._revocations(msg, event)

    def _on_refused(self, msg, event):
        actions = [Log("audit_upload_refused_by_cloud", msg["code"])]
        if self.state == SENDING and msg.get("id") == self.inflight[0]:
            self.state, self.inflight = STALLED, None     # resending the same bytes cannot help
        elif self.state == SYNCING:
            self.state = STALLED
        return actions

    def _time(self, msg, event, always):
        if not always and msg["time"] < self.time_fed_s + TIME_FEED_S:
            return []
        self.time_fed_s = msg["time"]
        return self.console.feed(core.TrustedTime(event.now_ms, msg["time"]))

    def _revocations(self, msg, event):
        if "revocations" not in msg:
            return []
        return self.console.feed(core.Revocations(msg["revocations"], event.now_ms, event.time_s))

    def _keep_checkpoint(self, msg):
        if "checkpoint" in msg:
            self.checkpoint = msg["checkpoint"]

    def _rotate(self, event):
        """Hand the console the cloud's checkpoint to verify once the log is
        over rotate_bytes and the checkpoint drops enough records; once it is
        verified (at once, or over the console's Ticks on a small board), the
        console rewrites the log to it. Only at a Poll: the log the console
        rewrites must be the whole log, not one missing records of the feed
        in progress."""
        if self.console.checkpoint is not None:
            return self.console.feed(core.RotateLog(event.log, event.now_ms, event.time_s))
        if (self.checkpoint is None or self.console.chain.size < self.rotate_bytes
                or core.CHECKPOINT in self.console.cloud_checks):
            return []
        seq, first = checkpoint_seq(self.checkpoint), first_seq(event.log)
        if seq is None or first is None or seq - first < ROTATE_RECORDS_MIN:
            return []
        message, self.checkpoint = self.checkpoint, None
        actions = self.console.feed(core.Checkpoint(message, event.now_ms, event.time_s))
        if self.console.checkpoint is None:
            return actions      # refused (recorded), or still being checked
        # Verified at once, and a verified checkpoint adds no record: event.log is current.
        return actions + self.console.feed(core.RotateLog(event.log, event.now_ms, event.time_s))

    def _move_cursor(self, next_seq, log):
        first = first_seq(log)
        cursor = next_seq if next_seq < self.console.chain.seq else self.console.chain.seq
        if first is not None and cursor < first:
            cursor = first
        if cursor == self.cursor:
            return []
        self.cursor = cursor
        return [WriteAtomic(CURSOR_FILE, cbor.dumps([VERSION, cursor]))]


# ---------------------------------------------------------------- the log

def frames_of(log):
    """(offset, end, seq or None) of each whole frame in the log, in order;
    reads the log in place (no copy of its bodies: a small board's heap)."""
    out = []
    if not log:
        return out
    view = memoryview(log)
    pos = 0
    while pos + journal.HEADER_LEN <= len(log):
        size, crc = struct.unpack_from(journal.HEADER, log, pos)
        end = pos + journal.HEADER_LEN + size
        if end > len(log):
            break
        body = view[pos + journal.HEADER_LEN:end]
        if crc32(body) & 0xFFFFFFFF != crc:
            break
        rec = auditlog.decode(body)
        out.append((pos, end, rec[0] if rec is not None else None))
        pos = end
    return out


def first_seq(log):
    for _, _, seq in frames_of(log):
        if seq is not None:
            return seq
    return None


def pick_segment(log, cursor, bytes_max):
    """(first seq, frames, end seq, log end seq) of whole records from the
    first with seq >= cursor, at most bytes_max bytes (at least one
    record); frames None if there is none. log end: after the log's last."""
    start = None
    first = end = stop = 0
    log_end = cursor
    full = False
    for pos, frame_end, seq in frames_of(log):
        log_end = seq + 1 if seq is not None else log_end + 1
        if start is None:
            if seq is None or seq < cursor:
                continue
            start, first = pos, seq
        elif full or frame_end - start > bytes_max:
            full = True
            continue
        stop = frame_end
        end = log_end
    if start is None:
        return cursor, None, cursor, log_end
    return first, bytes(log[start:stop]), end, log_end


def checkpoint_seq(message):
    """The seq a checkpoint names, read without verifying it (the console
    verifies before it acts); None if it cannot be read."""
    try:
        body = cbor.loads(cose.decode1(message)[3])
    except (RemoteError, TypeError, IndexError):
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if type(seq) is int else None

