"""Device identity operations the cloud records and enforces: revocation,
with an audit trail of who did what, when and why.

This is the first increment of issue 3. The running cloud (cloud/service.py)
enforces each revocation on its broker: the identity is refused from then on
and its live session is ended, and the time from the revocation being
recorded to that is stored (`block_ms`). Certificates the cloud issued are
recorded here so revoking an identity puts all its serials on the CRL.

Uses its own SQLite connection to the cloud's database file (WAL), so it
never shares a transaction with the ingest's writer.
"""

import time

from cloud import db
from cloud.ca import parse_identity
from cloud.errors import IdentityError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revocations (
    identity TEXT PRIMARY KEY, reason TEXT NOT NULL, actor TEXT NOT NULL,
    revoked_ms INTEGER NOT NULL, enforced_ms INTEGER, block_ms REAL, note TEXT);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_subject ON audit (subject, id);
CREATE TABLE IF NOT EXISTS quarantine (
    identity TEXT PRIMARY KEY, reason TEXT NOT NULL, actor TEXT NOT NULL, since_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, identity TEXT NOT NULL, issued_ms INTEGER NOT NULL,
    purpose TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS certificates_by_identity ON certificates (identity);
CREATE TABLE IF NOT EXISTS retired_certs (
    serial TEXT PRIMARY KEY, identity TEXT NOT NULL, reason TEXT NOT NULL, retired_ms INTEGER NOT NULL);
"""

AUDIT_ROWS_MAX = 10_000
TEXT_MAX = 500
SYSTEM_ACTORS = ("cloud", "broker")  # written by the running cloud, never by an operator


def now_ms():
    return time.time_ns() // 1_000_000


class Registry:
    def __init__(self, db_path, clock_ms=now_ms):
        self.clock_ms = clock_ms
        self._db = db.connect(db_path)
        self._db.executescript(_SCHEMA)

    def close(self):
        self._db.close()

    def _atomic(self, fn):
        return db.atomic(self._db, fn)

    # -- audit ------------------------------------------------------------------

    def audit(self, actor, action, subject, reason, detail=""):
        if not actor or not reason:
            raise IdentityError("an audited operation needs who (actor) and why (reason)")
        self._db.execute("INSERT INTO audit (ts_ms, actor, action, subject, reason, detail)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (self.clock_ms(), actor, action, subject, reason, detail))

    def audit_rows(self, action=None, subject=None, limit=AUDIT_ROWS_MAX):
        sql = "SELECT id, ts_ms, actor, action, subject, reason, detail FROM audit WHERE 1 = 1"
        args = []
        if action:
            sql += " AND action = ?"
            args.append(action)
        if subject:
            sql += " AND subject = ?"
            args.append(subject)
        sql += " ORDER BY id DESC LIMIT ?"  # the newest rows, oldest first below
        args.append(max(1, min(int(limit), AUDIT_ROWS_MAX)))
        names = ("id", "ts_ms", "actor", "action", "subject", "reason", "detail")
        return [dict(zip(names, row)) for row in reversed(self._db.execute(sql, args).fetchall())]

    # -- quarantine -------------------------------------------------------------

    def quarantine(self, identity, reason, actor):
        """Confine the device: it stays connected, its telemetry is flagged
        and kept apart, it may only use the quarantine topics. Audited."""
        self._require(identity, reason, actor)

        def op():
            cur = self._db.execute("INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?, ?)",
                                   (identity, reason, actor, self.clock_ms()))
            if cur.rowcount:
                self.audit(actor, "quarantine", identity, reason)
            return bool(cur.rowcount)
        return self._atomic(op)

    def release(self, identity, reason, actor):
        self._require(identity, reason, actor)

        def op():
            cur = self._db.execute("DELETE FROM quarantine WHERE identity = ?", (identity,))
            if cur.rowcount:
                self.audit(actor, "release", identity, reason)
            return bool(cur.rowcount)
        return self._atomic(op)

    def quarantined(self):
        return frozenset(row[0] for row in self._db.execute("SELECT identity FROM quarantine"))

    def _require(self, identity, reason, actor):
        parse_identity(identity)
        self._require_actor(actor, reason)

    def _require_actor(self, actor, reason):
        if not reason or not actor:
            raise IdentityError("an audited operation needs who (actor) and why (reason)")
        for text in (reason, actor):
            if len(text) > TEXT_MAX or any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise IdentityError("actor and reason must be one line of at most %d characters" % TEXT_MAX)
        if actor in SYSTEM_ACTORS:
            raise IdentityError("%r is reserved for the cloud's own audit rows" % actor)

    # -- certificates -----------------------------------------------------------

    def issued(self, identity, serial, purpose="device"):
        """Remember a certificate the cloud issued, so revoking its identity
        can put every one of its serials on the CRL."""
        self._db.execute("INSERT OR IGNORE INTO certificates VALUES (?, ?, ?, ?)",
                         (format(serial, "x"), identity, self.clock_ms(), purpose))

    def revoked_serials(self):
        """Every serial of a revoked identity, and every certificate retired
        by a rotation (cloud/provision.py): what the CRL lists."""
        return [int(row[0], 16) for row in self._db.execute(
            "SELECT serial FROM certificates WHERE identity IN (SELECT identity FROM revocations)"
            " UNION SELECT serial FROM retired_certs")]

    # -- revocation -------------------------------------------------------------

    def revoke(self, identity, reason, actor):
        """Record the revocation (idempotent) and audit it. Enforcement is
        the running cloud's job (`pending()` / `enforced()`)."""
        self._require(identity, reason, actor)

        def op():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO revocations (identity, reason, actor, revoked_ms)"
                " VALUES (?, ?, ?, ?)", (identity, reason, actor, self.clock_ms()))
            if cur.rowcount:
                self.audit(actor, "revoke", identity, reason)
            return bool(cur.rowcount)
        return self._atomic(op)

    def revoked(self):
        return {row[0] for row in self._db.execute("SELECT identity FROM revocations")}

    def pending(self):
        """Revocations not yet enforced nor found unenforceable: [(identity, revoked_ms)]."""
        return list(self._db.execute(
            "SELECT identity, revoked_ms FROM revocations WHERE enforced_ms IS NULL AND note IS NULL"))

    def retry_unenforced(self):
        """A cloud that can enforce starts: look again at what another could not."""
        self._db.execute("UPDATE revocations SET note = NULL WHERE enforced_ms IS NULL")

    def not_enforced(self, identity, note):
        def op():
            self._db.execute("UPDATE revocations SET note = ? WHERE identity = ?", (note, identity))
            self.audit("cloud", "revocation_not_enforced", identity, "revoked", note)
        self._atomic(op)

    def enforced(self, identity, block_ms, note):
        def op():
            self._db.execute("UPDATE revocations SET enforced_ms = ?, block_ms = ?, note = ?"
                             " WHERE identity = ?", (self.clock_ms(), block_ms, note, identity))
            self.audit("cloud", "revocation_enforced", identity, "revoked",
                       "%s; %.1f ms from revocation to session closed and reconnects refused"
                       % (note, block_ms))
        self._atomic(op)

    def status(self, identity):
        row = self._db.execute(
            "SELECT reason, actor, revoked_ms, enforced_ms, block_ms, note FROM revocations"
            " WHERE identity = ?", (identity,)).fetchone()
        if row is None:
            return None
        return dict(zip(("reason", "actor", "revoked_ms", "enforced_ms", "block_ms", "note"), row))
