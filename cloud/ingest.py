"""Ingest: validate, dedupe, gap-track and store telemetry records.

`Ingest.accept(identity, topic, payload)` returns "stored", "duplicate" or
"dead_letter:<reason>" (reason codes in docs/design.md). Checks, in order:

1. identity parses as <tenant>/<device>          identity_mismatch
   (cloud.ca.parse_identity: the certificate rules)
2. topic is exactly t/<identity>/telemetry       topic_mismatch
3. len(payload) <= max_payload                   oversized
4. one well-formed CBOR item, definite lengths   malformed_cbor
   (also: invalid UTF-8, duplicate map keys)
5. that item is an untagged map, nothing after   not_a_map
6. schema: keys, types, ranges                   bad_schema, bad_type,
                                                 out_of_range
7. payload `d` == the certificate's device       identity_mismatch
8. (tenant, device, e, s) already stored or      "duplicate" (counted,
   pending, with the same content                not dead-lettered)
   ... with other content: the device reused     conflict
   an (e, s) (lost state file, cloned identity)
9. the stream's open missing ranges stay within  out_of_range
   gaps_per_stream_max (bounded state)
10. device and tenant token buckets              rate_limited

Schema choices beyond the design table: `v` and `k` of the wrong type are
bad_type, of the wrong value out_of_range; a uint field holding a negative
int is out_of_range, holding a float/text/bool bad_type; `ts` < 2^63 (it
is an SQLite INTEGER); readings are ints or *finite* floats (NaN and
infinities are out_of_range), keys 1..32 characters; a drop record needs
de <= e, a <= b, 1 <= n <= b - a + 1, and b < s when de == e (a device
cannot declare its own seq, or a later one, dropped). Well-formed but
non-preferred encodings (e.g. a float64 that fits float16) are accepted.

A drop record's range may have holes: only `n` of the seqs a..b were
dropped, the others are records that are stored or still to arrive (data
records acknowledged earlier or still queued, other drop records). The
cloud cannot tell which seqs are which, so it marks a..b minus what is
stored as declared, and a record arriving later inside the range closes
its seq as usual; once everything has arrived exactly the n dropped seqs
stay declared. `declared_drops` counts n.

Content of a record, for dedupe: k and r and ts (k="t"), or k and
de/a/b/n (k="drop"; its ts is not compared). v, d, e and s are the
envelope. A repeat of a stored (e, s) with the same content is a
retransmission ("duplicate"); with other content it is a conflict, kept
as a dead letter and never stored over the first. The stored row is read
only on this duplicate path, never for a new record.

Dedupe comes before the rate limit on purpose: a retransmission after a
lost PUBACK costs no write, so it spends no token, and it must not turn a
stored record into a dead letter as well.

Gap tracking. Each stream (tenant, device, epoch) has a high-water `top`
(the highest seq known to exist: stored, or declared dropped) and a sorted
list of open missing ranges that cover exactly the seqs in 0..top that are
not stored. A range is 'silent' (nobody told us) or 'declared' (a drop
record said so). Dedupe reads the same state: seq <= top and not inside an
open range means stored. The state lives in the store, written in the
same transaction as the records, and a stream is loaded from the store the
first time it is seen, so a restart forgets nothing.

`accept` buffers into one pending `Batch`; `flush()` commits it, and
`accept` flushes by itself when the batch reaches `batch_max` records. So
"stored" from the synchronous `accept` means "in the batch"; use
`AsyncIngest.submit`, which returns only after commit, before a PUBACK.
"""

import asyncio
import math
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import cbor2

from cloud.ca import parse_identity as parse_certificate_identity
from cloud.errors import CloudError, IngestError
from cloud.store import (
    DEAD_PREFIX, DECLARED, DECLARED_DROPS, DUPLICATES, NO_TENANT, SILENT,
    STORED, Batch, MissingRange)

REASONS = ("malformed_cbor", "not_a_map", "bad_schema", "bad_type",
           "out_of_range", "oversized", "identity_mismatch", "topic_mismatch",
           "rate_limited", "conflict")
STORED_VERDICT = "stored"
DUPLICATE_VERDICT = "duplicate"

U32 = 1 << 32
TS_LIMIT = 1 << 63          # SQLite INTEGER is signed 64-bit
READINGS_MAX = 32
READING_KEY_CHARS_MAX = 32
NESTING_MAX = 2             # record map > readings map > values
DETAIL_CHARS_MAX = 200
TEXT_CHARS_MAX = 1024       # identity/topic as kept in a dead letter

_COMMON_KEYS = frozenset(("v", "k", "d", "e", "s", "ts"))
_KEYS = {"t": _COMMON_KEYS | {"r"},
         "drop": _COMMON_KEYS | {"de", "a", "b", "n"}}
_ALL_KEYS = _KEYS["t"] | _KEYS["drop"]


class Rejected(Exception):
    """A record that goes to the dead letters; `reason` is a REASONS code."""

    def __init__(self, reason, detail):
        Exception.__init__(self, reason, detail)
        self.reason = reason
        self.detail = detail[:DETAIL_CHARS_MAX]


class IngestClosed(IngestError):
    code = "ingest_closed"


# -- strict decoding ---------------------------------------------------------

def scan_cbor(buf):
    """Walk the CBOR item at the start of `buf` without building it.

    Raises Rejected unless `buf` is exactly one well-formed, untagged,
    definite-length map nested at most NESTING_MAX deep. Each byte is
    looked at once, so the walk is bounded by len(buf).
    """
    n = len(buf)
    pos = 0
    todo = [1]   # items still to read in each open container
    tagged = False
    depth_max = 0
    while todo:
        if todo[-1] == 0:
            todo.pop()
            continue
        todo[-1] -= 1
        if pos >= n:
            raise Rejected("malformed_cbor", "truncated")
        initial = buf[pos]
        major, arg = initial >> 5, initial & 31
        pos += 1
        if arg > 23:
            arg, pos = _long_argument(buf, pos, n, initial)
        if major < 2 or major == 7:
            continue
        if major < 4:
            if arg > n - pos:
                raise Rejected("malformed_cbor", "truncated string")
            pos += arg
        elif major < 6:
            count = arg if major == 4 else 2 * arg
            if count > n - pos:
                raise Rejected("malformed_cbor", "truncated container")
            todo.append(count)
            depth_max = max(depth_max, len(todo) - 1)
        else:
            tagged = True
            todo.append(1)
    if pos != n:
        raise Rejected("not_a_map", "%d trailing bytes" % (n - pos))
    if tagged:
        raise Rejected("not_a_map", "tags are not allowed")
    if buf[0] >> 5 != 5:
        raise Rejected("not_a_map", "top-level item is not a map")
    if depth_max > NESTING_MAX:
        raise Rejected("bad_type", "containers nested %d deep" % depth_max)


def _long_argument(buf, pos, n, initial):
    """(argument, position after it) for additional info 24..27."""
    info = initial & 31
    if info > 27:
        raise Rejected("malformed_cbor",
                       "indefinite length or reserved value 0x%02x" % initial)
    size = 1 << (info - 24)
    if size > n - pos:
        raise Rejected("malformed_cbor", "truncated head")
    arg = int.from_bytes(buf[pos:pos + size], "big")
    if initial == 0xF8 and arg < 32:
        raise Rejected("malformed_cbor", "invalid simple value")
    return arg, pos + size


def decode(payload, max_payload):
    """The record map of `payload`, or Rejected."""
    if len(payload) > max_payload:
        raise Rejected("oversized", "%d bytes > %d" % (len(payload), max_payload))
    scan_cbor(payload)
    try:
        return cbor2.loads(payload, allow_indefinite=False,
                           allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types; all mean malformed
        raise Rejected("malformed_cbor", str(exc)) from None


# -- schema ------------------------------------------------------------------

class Record:
    """A validated record. `drop` is (de, a, b, n) for k="drop", else None."""

    __slots__ = ("kind", "device", "epoch", "seq", "ts_ms", "body", "drop")

    def __init__(self, kind, device, epoch, seq, ts_ms, body, drop):
        self.kind = kind
        self.device = device
        self.epoch = epoch
        self.seq = seq
        self.ts_ms = ts_ms
        self.body = body
        self.drop = drop


def validate(m):
    """Record from a decoded map, or Rejected (see docs/design.md)."""
    for key in m:
        if not isinstance(key, str) or key not in _ALL_KEYS:
            raise Rejected("bad_schema", "unknown key %s" % _show(key))
    if _uint(m, "v", U32) != 1:
        raise Rejected("out_of_range", "v must be 1")
    kind = _text(m, "k")
    if kind not in _KEYS:
        raise Rejected("out_of_range", "k must be 't' or 'drop'")
    _check_keys(m, _KEYS[kind])
    device = _text(m, "d")
    epoch, seq = _uint(m, "e", U32), _uint(m, "s", U32)
    ts_ms = _uint(m, "ts", TS_LIMIT)
    if kind == "t":
        return Record(kind, device, epoch, seq, ts_ms, _readings(m["r"]), None)
    drop = _drop_fields(m, epoch, seq)
    body = dict(zip(("de", "a", "b", "n"), drop))
    return Record(kind, device, epoch, seq, ts_ms, body, drop)


def _check_keys(m, allowed):
    missing = allowed.difference(m)
    if missing:
        raise Rejected("bad_schema", "missing keys %s" % sorted(missing))
    extra = set(m).difference(allowed)
    if extra:
        raise Rejected("bad_schema", "keys not allowed here %s" % sorted(extra))


def _uint(m, key, limit):
    if key not in m:
        raise Rejected("bad_schema", "missing key %r" % key)
    x = m[key]
    if isinstance(x, bool) or not isinstance(x, int):
        raise Rejected("bad_type", "%s: expected uint, got %s" % (key, _show(x)))
    if not 0 <= x < limit:
        raise Rejected("out_of_range", "%s: %d not in 0..%d" % (key, x, limit - 1))
    return x


def _text(m, key):
    if key not in m:
        raise Rejected("bad_schema", "missing key %r" % key)
    x = m[key]
    if not isinstance(x, str):
        raise Rejected("bad_type", "%s: expected text, got %s" % (key, _show(x)))
    return x


def _readings(r):
    if not isinstance(r, dict):
        raise Rejected("bad_type", "r: expected map, got %s" % _show(r))
    if len(r) > READINGS_MAX:
        raise Rejected("out_of_range", "r: %d readings > %d" % (len(r), READINGS_MAX))
    for key, value in r.items():
        if not isinstance(key, str):
            raise Rejected("bad_type", "r: key %s is not text" % _show(key))
        if not 1 <= len(key) <= READING_KEY_CHARS_MAX:
            raise Rejected("out_of_range", "r: key length %d" % len(key))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Rejected("bad_type", "r[%r]: %s" % (key, _show(value)))
        if isinstance(value, float) and not math.isfinite(value):
            raise Rejected("out_of_range", "r[%r]: %r is not finite" % (key, value))
    return r


def _drop_fields(m, epoch, seq):
    de, a, b, n = (_uint(m, key, U32) for key in ("de", "a", "b", "n"))
    # The device widens an unpublished drop record as it drops more of the
    # same epoch, so in its own epoch the range may reach past its own seq;
    # its own seq is never one of the n it declares.
    own = 1 if de == epoch and a <= seq <= b else 0
    if a > b or not 1 <= n <= b - a + 1 - own:
        raise Rejected("out_of_range", "drop: need a <= b and 1 <= n <= b - a + 1 (less its own seq)")
    if de > epoch:
        raise Rejected("out_of_range", "drop: de %d is after e %d" % (de, epoch))
    return de, a, b, n


def _show(x):
    return "%s %.40r" % (type(x).__name__, x)


def parse_identity(identity):
    """(tenant, device) of a certificate identity, or Rejected."""
    try:
        return parse_certificate_identity(identity)
    except CloudError:
        raise Rejected("identity_mismatch", "identity is not <tenant>/<device>") from None


# -- gap tracking ------------------------------------------------------------

class Stream:
    """Gap state of one (tenant, device, epoch); see the module docstring."""

    def __init__(self, tenant, device, epoch, top, gaps):
        self.tenant = tenant
        self.device = device
        self.epoch = epoch
        self.top = top                               # -1: nothing yet
        self.gaps = list(gaps)                       # open, by first_seq
        self.starts = [g.first_seq for g in self.gaps]

    def has(self, seq):
        return seq <= self.top and self._find(seq) is None

    def gaps_added_by_place(self, seq):
        if seq > self.top:
            return 1 if seq > self.top + 1 else 0
        g = self.gaps[self._find(seq)]
        return 1 if g.first_seq < seq < g.last_seq else 0

    def place(self, seq, now_ms, batch):
        """Record that `seq` is stored (it must not be stored already)."""
        if seq > self.top:
            if seq > self.top + 1:
                self._open(self.top + 1, seq - 1, SILENT, now_ms, batch)
            self.top = seq
            return
        i = self._find(seq)
        g = self.gaps[i]
        pieces = [(g.first_seq, seq - 1, g.kind), (seq + 1, g.last_seq, g.kind)]
        self._replace(i, pieces, now_ms, batch)

    def declare(self, a, b, now_ms, batch):
        """Mark a..b declared dropped, except seqs that are stored."""
        if b > self.top:
            low = max(a, self.top + 1)
            if low > self.top + 1:
                self._open(self.top + 1, low - 1, SILENT, now_ms, batch)
            old_top, self.top = self.top, b
            self._open(low, b, DECLARED, now_ms, batch)
            b = old_top
        i = bisect_right(self.starts, a) - 1
        if i < 0 or self.gaps[i].last_seq < a:
            i += 1
        while i < len(self.gaps) and self.gaps[i].first_seq <= b:
            g = self.gaps[i]
            if g.kind == DECLARED:
                i += 1
                continue
            x, y = max(g.first_seq, a), min(g.last_seq, b)
            pieces = [(g.first_seq, x - 1, SILENT), (x, y, DECLARED),
                      (y + 1, g.last_seq, SILENT)]
            i += self._replace(i, pieces, now_ms, batch)

    def _find(self, seq):
        """Index of the open range holding seq, or None."""
        i = bisect_right(self.starts, seq) - 1
        if i >= 0 and self.gaps[i].last_seq >= seq:
            return i
        return None

    def _open(self, first, last, kind, now_ms, batch):
        g = MissingRange(self.tenant, self.device, self.epoch, first, last,
                         kind, now_ms)
        self.gaps.append(g)
        self.starts.append(first)
        batch.touch(g)

    def _replace(self, i, pieces, now_ms, batch):
        """Replace open range i by the non-empty `pieces` (first, last, kind),
        which lie inside it, in order. The old row shrinks into the first
        piece of its own kind, or closes. Returns the number of pieces."""
        old = self.gaps[i]
        pieces = [p for p in pieces if p[0] <= p[1]]
        kept = next((p for p in pieces if p[2] == old.kind), None)
        new = []
        for first, last, kind in pieces:
            if (first, last, kind) == kept:
                old.first_seq, old.last_seq = first, last
                g = old
            else:
                opened_ms = old.opened_ms if kind == old.kind else now_ms
                g = MissingRange(self.tenant, self.device, self.epoch,
                                 first, last, kind, opened_ms)
            new.append(g)
            batch.touch(g)
        if kept is None:
            old.closed_ms = now_ms
            batch.touch(old)
        self.gaps[i:i + 1] = new
        self.starts[i:i + 1] = [g.first_seq for g in new]
        return len(new)


# -- ingest ------------------------------------------------------------------

class Ingest:
    """Synchronous ingest over one `Store`. Single-threaded, single writer."""

    def __init__(self, store, clock_ms, limits=None, max_payload=1024,
                 batch_max=512, streams_max=100_000, gaps_per_stream_max=4096, flag_of=None):
        self.store = store
        self._flag_of = flag_of  # (tenant, device) -> flag text or None (quarantine)
        self._clock_ms = clock_ms
        self._limits = limits                   # None: no rate limits
        self._max_payload = max_payload
        self._batch_max = batch_max
        self._streams_max = streams_max         # cached streams, LRU beyond
        self._gaps_max = gaps_per_stream_max    # beyond: dead letter
        self._streams = OrderedDict()           # (tenant, device, epoch) -> Stream
        self._batch = Batch()

    def accept(self, identity, topic, payload, received_ms=None):
        """Verdict for one PUBLISH: "stored", "duplicate" or
        "dead_letter:<reason>". No payload bytes make it raise; only a
        failing commit (the automatic flush) does, as `flush()` would."""
        now_ms = self._clock_ms()
        received_ms = now_ms if received_ms is None else received_ms
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")
        payload = bytes(payload)
        tenant = None
        try:
            tenant, device = parse_identity(identity)
            if topic != "t/%s/telemetry" % identity:
                raise Rejected("topic_mismatch", "topic is not t/<identity>/telemetry")
            record = validate(decode(payload, self._max_payload))
            if record.device != device:
                raise Rejected("identity_mismatch", "d is not the certificate's device")
            verdict = self._admit(tenant, record, now_ms, received_ms)
        except Rejected as r:
            self._dead_letter(tenant, identity, topic, payload, r, received_ms)
            verdict = "dead_letter:" + r.reason
        if len(self._batch) >= self._batch_max:
            self.flush()
        return verdict

    def flush(self):
        """Commit the pending batch. On failure the batch is lost (nothing of
        it was committed), cached state is dropped so it reloads from the
        store, and the error is raised."""
        batch, self._batch = self._batch, Batch()
        if batch.is_empty():
            return
        try:
            self.store.write_batch(batch)
        except BaseException:
            self._streams.clear()
            raise
        while len(self._streams) > self._streams_max:
            self._streams.popitem(last=False)

    def stats(self):
        """Durable totals (commits the pending batch first): stored,
        duplicates_dropped, dead_lettered, dead_lettered_by_reason,
        declared_drops, silent_gaps, silent_missing, declared_gaps,
        declared_missing, devices, tenants."""
        self.flush()
        return self.store.fleet_counts()

    def _admit(self, tenant, record, now_ms, received_ms):
        stream = self._stream(tenant, record.device, record.epoch)
        if stream.has(record.seq):
            self._check_same_content(tenant, record)
            self._batch.count(tenant, DUPLICATES)
            return DUPLICATE_VERDICT
        self._check_room(tenant, record, stream)
        if self._limits is not None:
            refused = self._limits.check(tenant, record.device, now_ms)
            if refused is not None:
                raise Rejected("rate_limited", "%s token bucket empty" % refused)
        self._store_record(tenant, record, stream, now_ms, received_ms)
        return STORED_VERDICT

    def _check_same_content(self, tenant, record):
        """Rejected("conflict") unless `record` has the content of the row
        already stored (or pending) under its key. Duplicate path only."""
        key = (tenant, record.device, record.epoch, record.seq)
        first = self._first_content(key)
        if first is None:   # cannot happen while stream state matches the rows
            return
        body = cbor2.dumps(record.body, canonical=True)
        kind, ts_ms, first_body = first
        if kind != record.kind:
            differs = "k"
        elif kind == "t":
            differs = ", ".join(name for name, same in (
                ("ts", ts_ms == record.ts_ms), ("r", first_body == body))
                if not same)
        else:
            differs = "" if first_body == body else "de/a/b/n"
        if differs:
            raise Rejected("conflict", "e %d s %d is already stored with other"
                           " content (%s differs): (e, s) reused"
                           % (record.epoch, record.seq, differs))

    def _first_content(self, key):
        """(kind, ts_ms, canonical body) stored or pending under key, or None."""
        tenant, device, epoch, seq = key
        for row in reversed(self._batch.telemetry):
            if row[3] == seq and row[2] == epoch and row[1] == device and row[0] == tenant:
                return row[4], row[5], row[7]
        row = self.store.tenant(tenant).get(device, epoch, seq)
        if row is None:
            return None
        return row["kind"], row["ts_ms"], cbor2.dumps(row["readings"], canonical=True)

    def _check_room(self, tenant, record, stream):
        """Bound the open ranges per stream: a record that would go past it
        is dead-lettered (kept, not lost) instead of growing state."""
        full = len(stream.gaps) + stream.gaps_added_by_place(record.seq) > self._gaps_max
        if record.drop is not None and not full:
            target = self._stream(tenant, record.device, record.drop[0])
            full = len(target.gaps) + 3 > self._gaps_max
        if full:
            raise Rejected("out_of_range", "too many open missing ranges")

    def _store_record(self, tenant, record, stream, now_ms, received_ms):
        batch = self._batch
        stream.place(record.seq, now_ms, batch)
        if record.drop is not None:
            de, a, b, n = record.drop
            self._stream(tenant, record.device, de).declare(a, b, now_ms, batch)
            batch.count(tenant, DECLARED_DROPS, n)
        batch.telemetry.append((
            tenant, record.device, record.epoch, record.seq, record.kind,
            record.ts_ms, received_ms, cbor2.dumps(record.body, canonical=True)))
        batch.devices.setdefault((tenant, record.device), received_ms)
        batch.count(tenant, STORED)
        flag = self._flag_of(tenant, record.device) if self._flag_of is not None else None
        if flag:
            batch.flagged.append((tenant, record.device, record.epoch, record.seq, flag))
            batch.count(tenant, "flagged")

    def _stream(self, tenant, device, epoch):
        key = (tenant, device, epoch)
        stream = self._streams.get(key)
        if stream is None:
            top, gaps = self.store.tenant(tenant).stream_state(device, epoch)
            stream = self._streams[key] = Stream(tenant, device, epoch, top, gaps)
        else:
            self._streams.move_to_end(key)
        return stream

    def _dead_letter(self, tenant, identity, topic, payload, rejected, received_ms):
        self._batch.dead_letters.append((
            tenant, _kept_text(identity), _kept_text(topic), payload,
            rejected.reason, _kept_text(rejected.detail), received_ms))
        self._batch.count(NO_TENANT if tenant is None else tenant,
                          DEAD_PREFIX + rejected.reason)


def _kept_text(x):
    """A str SQLite can store (no lone surrogates), bounded in length."""
    if isinstance(x, (bytes, bytearray)):
        x = bytes(x).decode("utf-8", "backslashreplace")
    elif not isinstance(x, str):
        x = repr(x)
    x = x.encode("utf-8", "backslashreplace").decode("utf-8")
    return x[:TEXT_CHARS_MAX]


# -- group commit ------------------------------------------------------------

_STOP = object()


class AsyncIngest:
    """Group commit over an `Ingest` for an asyncio broker.

    `await submit(...)` returns the verdict only once the record's batch is
    committed, so the broker can PUBACK then. A worker takes up to
    `batch_max` queued records (waiting `linger_ms` for more when fewer are
    queued), runs accept+flush for them on one worker thread (the SQLite
    fsync does not block the event loop), and resolves all their waiters.
    The queue holds at most `queue_max` records; when full, `submit` waits.
    If a commit fails, every waiter of that batch gets IngestError with code
    "commit_failed" (no PUBACK, the device retransmits, dedupe absorbs any
    repeat).
    """

    def __init__(self, ingest, batch_max=256, linger_ms=2, queue_max=4096):
        self.ingest = ingest
        self._batch_max = batch_max
        self._linger_s = linger_ms / 1000.0
        self._queue = asyncio.Queue(queue_max)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tether-ingest")
        self._worker = None
        self._putting = 0
        self._closed = False

    async def submit(self, identity, topic, payload, received_ms=None):
        if self._closed:
            raise IngestClosed("submit after close")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")  # before it joins a batch
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        done = asyncio.get_running_loop().create_future()
        self._putting += 1
        try:
            await self._queue.put((identity, topic, payload, received_ms, done))
        finally:
            self._putting -= 1
        return await done

    async def stats(self):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.ingest.stats)

    async def close(self):
        """Commit everything submitted so far, then stop."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            await self._queue.put(_STOP)
            await self._worker
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.ingest.flush)
        self._executor.shutdown(wait=True)

    async def _run(self):
        stopping = False
        while True:
            if stopping and self._queue.empty():
                if not self._putting:
                    return
                await asyncio.sleep(0)  # a put with room is about to land
                continue
            items = [] if stopping else [await self._queue.get()]
            if not stopping and self._queue.qsize() < self._batch_max - 1:
                await asyncio.sleep(self._linger_s)
            while len(items) < self._batch_max and not self._queue.empty():
                items.append(self._queue.get_nowait())
            if _STOP in items:
                items.remove(_STOP)
                stopping = True
            if items:
                await self._commit(items)

    async def _commit(self, items):
        loop = asyncio.get_running_loop()
        try:
            verdicts = await loop.run_in_executor(self._executor, self._process, items)
        except Exception as exc:
            for item in items:
                if not item[4].done():
                    item[4].set_exception(IngestError(
                        "commit failed: %r" % (exc,), code="commit_failed"))
            return
        for item, verdict in zip(items, verdicts):
            if not item[4].done():
                item[4].set_result(verdict)

    def _process(self, items):
        verdicts = [self.ingest.accept(identity, topic, payload, received_ms)
                    for identity, topic, payload, received_ms, _ in items]
        self.ingest.flush()
        return verdicts
