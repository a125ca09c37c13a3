"""SQLite store for the reference cloud.

Durability: WAL journal with ``synchronous=FULL``. In WAL mode NORMAL only
fsyncs the log at checkpoints, so a power cut can roll back transactions
that already committed. The broker sends PUBACK after our commit and the
device then deletes the record from its queue, so a commit that a power cut
can undo is data loss. FULL fsyncs the WAL at every commit; batching
(`write_batch`, group commit in `cloud.ingest.AsyncIngest`) pays that fsync
once per batch, not once per record.

Readings are kept as deterministic CBOR (the same encoding the device
sent): ints up to 64 bits and float16/32/64 values round-trip exactly,
which JSON (and SQLite's JSON functions) do not promise.

Tenant isolation: every read goes through ``store.tenant(tenant_id)``,
whose every query has ``WHERE tenant = ?``. The only cross-tenant read is
``fleet_counts()``, which returns aggregates, never rows.

One writer: one `Store` connection, used by one thread at a time (the
connection is opened with ``check_same_thread=False`` so `AsyncIngest` can
hand it to its single worker thread).
"""

import re
import sqlite3

import cbor2

from cloud.ca import TENANT_LEN_MAX, check_id

SCHEMA_VERSION = 1
SILENT = "silent"
DECLARED = "declared"
ROWS_MAX = 10_000  # upper bound on rows returned by one read

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL, device TEXT NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, device)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS telemetry (
    tenant TEXT NOT NULL, device TEXT NOT NULL,
    epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    readings BLOB NOT NULL,
    PRIMARY KEY (tenant, device, epoch, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS missing (
    id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, device TEXT NOT NULL,
    epoch INTEGER NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('declared', 'silent')),
    opened_ms INTEGER NOT NULL, closed_ms INTEGER);
CREATE INDEX IF NOT EXISTS missing_by_stream
    ON missing (tenant, device, epoch, first_seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, tenant TEXT, identity TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, received_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_by_tenant ON dead_letters (tenant, id);
CREATE TABLE IF NOT EXISTS flagged (
    tenant TEXT NOT NULL, device TEXT NOT NULL, epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL, flag TEXT NOT NULL,
    PRIMARY KEY (tenant, device, epoch, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)) WITHOUT ROWID;
"""

_INSERT_TELEMETRY = "INSERT OR IGNORE INTO telemetry VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_DEVICE = "INSERT OR IGNORE INTO devices VALUES (?, ?, ?)"
_INSERT_FLAGGED = "INSERT OR IGNORE INTO flagged VALUES (?, ?, ?, ?, ?)"
_NOT_FLAGGED = (" AND NOT EXISTS (SELECT 1 FROM flagged f WHERE f.tenant = telemetry.tenant"
                " AND f.device = telemetry.device AND f.epoch = telemetry.epoch"
                " AND f.seq = telemetry.seq)")
_INSERT_DEAD = (
    "INSERT INTO dead_letters (tenant, identity, topic, payload, reason, detail,"
    " received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)")
_INSERT_MISSING = (
    "INSERT INTO missing (tenant, device, epoch, first_seq, last_seq, kind,"
    " opened_ms, closed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_UPDATE_MISSING = (
    "UPDATE missing SET first_seq = ?, last_seq = ?, closed_ms = ? WHERE id = ?")
_ADD_COUNTER = (
    "INSERT INTO counters (tenant, name, value) VALUES (?, ?, ?)"
    " ON CONFLICT (tenant, name) DO UPDATE SET value = value + excluded.value")

# Counter names. Dead letters are counted as DEAD_PREFIX + reason.
STORED = "stored"
DUPLICATES = "duplicates_dropped"
DECLARED_DROPS = "declared_drops"
DEAD_PREFIX = "dead_lettered:"
NO_TENANT = ""  # counters row for dead letters whose identity did not parse


class MissingRange:
    """One missing-data record: seqs first_seq..last_seq of one stream.

    A row's kind never changes; it only shrinks (first/last move inwards)
    or closes (closed_ms set). `id` is None until the row is first written.
    """

    __slots__ = ("id", "tenant", "device", "epoch", "first_seq", "last_seq",
                 "kind", "opened_ms", "closed_ms")

    def __init__(self, tenant, device, epoch, first_seq, last_seq, kind,
                 opened_ms, closed_ms=None, id=None):
        self.id = id
        self.tenant = tenant
        self.device = device
        self.epoch = epoch
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.kind = kind
        self.opened_ms = opened_ms
        self.closed_ms = closed_ms

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class Batch:
    """Everything one transaction writes; built by the ingest, written by
    `Store.write_batch`."""

    def __init__(self):
        self.devices = {}       # (tenant, device) -> created_ms
        self.telemetry = []     # rows in _INSERT_TELEMETRY column order
        self.flagged = []       # rows in _INSERT_FLAGGED column order (quarantine)
        self.dead_letters = []  # rows in _INSERT_DEAD column order
        self.missing = {}       # id(MissingRange) -> MissingRange, touched
        self.counters = {}      # (tenant, name) -> delta

    def __len__(self):
        return len(self.telemetry) + len(self.dead_letters)

    def is_empty(self):
        return not (self.telemetry or self.dead_letters or self.missing
                    or self.counters)

    def count(self, tenant, name, n=1):
        key = (tenant, name)
        self.counters[key] = self.counters.get(key, 0) + n

    def touch(self, missing_range):
        self.missing[id(missing_range)] = missing_range


class Store:
    def __init__(self, path, synchronous="FULL"):
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=" + synchronous)
        self._migrate()

    def _migrate(self):
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError("store schema version %d, this code knows %d"
                               % (version, SCHEMA_VERSION))
        self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def pragma(self, name):
        return self._db.execute("PRAGMA " + _pragma_name(name)).fetchone()[0]

    # -- writes -----------------------------------------------------------

    def write_batch(self, batch):
        """Write `batch` in one transaction: all of it or none of it.

        New MissingRange rows get their `id` here. New ranges that were
        already closed (a hole filled before it was ever committed) are
        not written.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT_DEVICE, [
                (t, d, ms) for (t, d), ms in batch.devices.items()])
            db.executemany(_INSERT_TELEMETRY, batch.telemetry)
            db.executemany(_INSERT_FLAGGED, batch.flagged)
            db.executemany(_INSERT_DEAD, batch.dead_letters)
            self._write_missing(batch.missing.values())
            db.executemany(_ADD_COUNTER, [
                (t, name, n) for (t, name), n in batch.counters.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_missing(self, ranges):
        updates = []
        for m in ranges:
            if m.id is not None:
                updates.append((m.first_seq, m.last_seq, m.closed_ms, m.id))
            elif m.closed_ms is None:
                m.id = self._db.execute(_INSERT_MISSING, (
                    m.tenant, m.device, m.epoch, m.first_seq, m.last_seq,
                    m.kind, m.opened_ms, m.closed_ms)).lastrowid
        self._db.executemany(_UPDATE_MISSING, updates)

    # -- reads --------------------------------------------------------------

    def tenant(self, tenant_id):
        """The read view of one tenant. Raises cloud.errors.IdentityError
        for anything that is not a tenant id."""
        return TenantView(self._db, check_id("tenant", tenant_id, TENANT_LEN_MAX))

    def fleet_counts(self):
        """Operator view: totals over all tenants, aggregates only."""
        db = self._db
        counts = _counts_from(db.execute(
            "SELECT name, SUM(value) FROM counters GROUP BY name"))
        counts.update(_missing_counts(db.execute(
            "SELECT kind, COUNT(*), SUM(last_seq - first_seq + 1) FROM missing"
            " WHERE closed_ms IS NULL GROUP BY kind")))
        counts["tenants"] = db.execute(
            "SELECT COUNT(DISTINCT tenant) FROM devices").fetchone()[0]
        counts["devices"] = db.execute(
            "SELECT COUNT(*) FROM devices").fetchone()[0]
        return counts

    def dead_letter_counts(self, identities, since_ms=0):
        """{reason: count} of the dead letters from these certificate
        identities received at or after since_ms: what one run of the fleet
        simulator caused in a long-lived store. Aggregates only, like
        fleet_counts()."""
        wanted = set(identities)
        counts = {}
        for identity, reason, n in self._db.execute(
                "SELECT identity, reason, COUNT(*) FROM dead_letters"
                " WHERE received_ms >= ? GROUP BY identity, reason", (since_ms,)):
            if identity in wanted:
                counts[reason] = counts.get(reason, 0) + n
        return counts

    def unattributed_dead_letters(self, limit=100):
        """Dead letters whose identity did not parse (tenant unknown)."""
        return _dead_letter_dicts(self._db.execute(
            "SELECT " + _DEAD_COLUMNS + " FROM dead_letters"
            " WHERE tenant IS NULL ORDER BY id LIMIT ?", (_limit(limit),)))


class TenantView:
    """Reads of one tenant's data. Every query is parameterised by tenant."""

    def __init__(self, db, tenant_id):
        self._db = db
        self.tenant_id = tenant_id

    def devices(self):
        return [{"device": d, "created_ms": ms} for d, ms in self._db.execute(
            "SELECT device, created_ms FROM devices WHERE tenant = ?"
            " ORDER BY device", (self.tenant_id,))]

    def telemetry(self, device=None, epoch=None, limit=ROWS_MAX, include_flagged=False):
        """Telemetry rows. Rows flagged at ingest (sent while the device was
        quarantined) are kept apart: left out unless include_flagged."""
        sql = ("SELECT device, epoch, seq, kind, ts_ms, received_ms, readings"
               " FROM telemetry WHERE tenant = ?")
        if not include_flagged:
            sql += _NOT_FLAGGED
        args = [self.tenant_id]
        if device is not None:
            sql += " AND device = ?"
            args.append(device)
        if epoch is not None:
            sql += " AND epoch = ?"
            args.append(epoch)
        sql += " ORDER BY device, epoch, seq LIMIT ?"
        args.append(_limit(limit))
        return [_telemetry_dict(row) for row in self._db.execute(sql, args)]

    def flagged(self, device=None, limit=ROWS_MAX):
        """(epoch, seq, flag) of this tenant's flagged telemetry rows."""
        sql = "SELECT device, epoch, seq, flag FROM flagged WHERE tenant = ?"
        args = [self.tenant_id]
        if device is not None:
            sql += " AND device = ?"
            args.append(device)
        sql += " ORDER BY device, epoch, seq LIMIT ?"
        args.append(_limit(limit))
        return [dict(zip(("device", "epoch", "seq", "flag"), row)) for row in self._db.execute(sql, args)]

    def count_telemetry(self, device=None, include_flagged=False):
        sql = "SELECT COUNT(*) FROM telemetry WHERE tenant = ?"
        if not include_flagged:
            sql += _NOT_FLAGGED
        args = [self.tenant_id]
        if device is not None:
            sql += " AND device = ?"
            args.append(device)
        return self._db.execute(sql, args).fetchone()[0]

    def get(self, device, epoch, seq):
        row = self._db.execute(
            "SELECT device, epoch, seq, kind, ts_ms, received_ms, readings"
            " FROM telemetry WHERE tenant = ? AND device = ? AND epoch = ?"
            " AND seq = ?", (self.tenant_id, device, epoch, seq)).fetchone()
        return None if row is None else _telemetry_dict(row)

    def missing(self, device=None, include_closed=False, limit=ROWS_MAX):
        """Missing-data records, open ones only unless include_closed."""
        return [m.as_dict() for m in self._missing(device, None, include_closed,
                                                    limit)]

    def missing_in_epoch(self, device, epoch, include_closed=False, limit=ROWS_MAX):
        """Missing-data records of one stream (device, epoch), open ones
        only unless include_closed."""
        return [m.as_dict() for m in self._missing(device, epoch, include_closed,
                                                    limit)]

    def dead_letters(self, limit=ROWS_MAX):
        return _dead_letter_dicts(self._db.execute(
            "SELECT " + _DEAD_COLUMNS + " FROM dead_letters WHERE tenant = ?"
            " ORDER BY id LIMIT ?", (self.tenant_id, _limit(limit))))

    def counts(self):
        counts = _counts_from(self._db.execute(
            "SELECT name, value FROM counters WHERE tenant = ?",
            (self.tenant_id,)))
        counts.update(_missing_counts(self._db.execute(
            "SELECT kind, COUNT(*), SUM(last_seq - first_seq + 1) FROM missing"
            " WHERE tenant = ? AND closed_ms IS NULL GROUP BY kind",
            (self.tenant_id,))))
        return counts

    def stream_state(self, device, epoch):
        """(top, open MissingRanges sorted by first_seq) for one (device,
        epoch): what the ingest needs to resume. `top` is the highest seq
        known to exist, stored or inside an open range; -1 if none."""
        top = self._db.execute(
            "SELECT MAX(seq) FROM telemetry WHERE tenant = ? AND device = ?"
            " AND epoch = ?", (self.tenant_id, device, epoch)).fetchone()[0]
        gaps = self._missing(device, epoch, False, None)
        tops = [-1 if top is None else top] + [g.last_seq for g in gaps]
        return max(tops), gaps

    def _missing(self, device, epoch, include_closed, limit):
        sql = ("SELECT id, tenant, device, epoch, first_seq, last_seq, kind,"
               " opened_ms, closed_ms FROM missing WHERE tenant = ?")
        args = [self.tenant_id]
        if device is not None:
            sql += " AND device = ?"
            args.append(device)
        if epoch is not None:
            sql += " AND epoch = ?"
            args.append(epoch)
        if not include_closed:
            sql += " AND closed_ms IS NULL"
        sql += " ORDER BY device, epoch, first_seq, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(_limit(limit))
        return [MissingRange(*row[1:], id=row[0])
                for row in self._db.execute(sql, args)]


_DEAD_COLUMNS = "id, tenant, identity, topic, payload, reason, detail, received_ms"


def _dead_letter_dicts(cursor):
    names = _DEAD_COLUMNS.split(", ")
    return [dict(zip(names, row)) for row in cursor]


def _telemetry_dict(row):
    device, epoch, seq, kind, ts_ms, received_ms, readings = row
    return {"device": device, "epoch": epoch, "seq": seq, "kind": kind,
            "ts_ms": ts_ms, "received_ms": received_ms,
            "readings": cbor2.loads(readings)}


def _counts_from(rows):
    counts = {STORED: 0, DUPLICATES: 0, DECLARED_DROPS: 0, "dead_lettered": 0,
              "dead_lettered_by_reason": {}}
    for name, value in rows:
        if name.startswith(DEAD_PREFIX):
            counts["dead_lettered_by_reason"][name[len(DEAD_PREFIX):]] = value
            counts["dead_lettered"] += value
        else:
            counts[name] = value
    return counts


def _missing_counts(rows):
    counts = {"silent_gaps": 0, "silent_missing": 0,
              "declared_gaps": 0, "declared_missing": 0}
    for kind, n, seqs in rows:
        counts[kind + "_gaps"] = n
        counts[kind + "_missing"] = seqs
    return counts


def _limit(limit):
    if not isinstance(limit, int) or limit < 0:
        raise ValueError("limit must be a non-negative int")
    return min(limit, ROWS_MAX)


def _pragma_name(name):
    if not re.fullmatch(r"[a-z_]+", name):
        raise ValueError("not a pragma name: %r" % (name,))
    return name
