"""Support access, cloud side: grants with approval, revocation, access
reviews, and verification of devices' console audit logs.

    desk = SupportDesk("tether-cloud")
    gid, message = desk.grant("alice", alice_point, "technician", devices=["d1"],
                              hours=4, requested_by="alice", approved_by="bob",
                              reason="ticket 42")
    desk.revoke(gid, by="bob", reason="visit cancelled")
    desk.review()                        # who holds / held access, who approved
    desk.verify_log("d1", log_bytes)     # chain continuity, gaps, edits, truncation

The support-access key (ECDSA P-256) lives in DATA/support/support.key
(0600), made on first use; devices pin DATA/support/support.pub. Grants are
agent/grant.py's format, signed with cloud.firmware.sign1, and every grant
is checked with the device's own code before it leaves (what we issue is
what a device accepts). Records are in DATA/support.db (SQLite, WAL), apart
from the cloud's other tables.

A verified device log is recorded as a checkpoint (seq, head hash) and a
COSE_Sign1 over {device, seq, head, iat}, signed with the support key, so
the chain up to it is checkable offline by anyone holding the public key;
the next upload must still contain it unchanged or it is reported as
truncated or edited.

Devices online upload their logs in segments instead (cloud/support_mqtt.py
carries them): audit_hello / audit_segment check each against the chain
the cloud already holds, store the records, and record what breaks it as
findings a reviewer queries (audit_findings, audit_status; `tether cloud
support findings`). docs/console.md has the formats and the kinds.
"""

import hashlib
import json
import os
import time

from agent import auditlog, cbor, cose, journal, grant as agrant
from cloud import db, firmware
from cloud.errors import CloudError

CHECKPOINT_AAD = auditlog.CHECKPOINT_AAD
HOURS_MAX = agrant.GRANT_SECONDS_MAX // 3600
TEXT_MAX = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    gid TEXT PRIMARY KEY, technician TEXT NOT NULL, role TEXT NOT NULL,
    devices TEXT NOT NULL, site TEXT, nbf INTEGER NOT NULL, exp INTEGER NOT NULL,
    iat INTEGER NOT NULL, tech_key TEXT NOT NULL, requested_by TEXT NOT NULL,
    approved_by TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS grant_revocations (
    gid TEXT PRIMARY KEY, by TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    device TEXT NOT NULL, seq INTEGER NOT NULL, head TEXT NOT NULL, at INTEGER NOT NULL,
    message BLOB NOT NULL, PRIMARY KEY (device, seq));
CREATE TABLE IF NOT EXISTS audit_streams (
    identity TEXT PRIMARY KEY, device TEXT NOT NULL, next_seq INTEGER NOT NULL,
    head TEXT NOT NULL, announced INTEGER NOT NULL, rev TEXT NOT NULL, updated INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_records (
    id INTEGER PRIMARY KEY, identity TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL,
    time_s INTEGER, kind TEXT, body BLOB NOT NULL, received INTEGER NOT NULL,
    current INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS audit_records_by_seq ON audit_records (identity, seq, current);
CREATE TABLE IF NOT EXISTS audit_findings (
    id INTEGER PRIMARY KEY, identity TEXT NOT NULL, at INTEGER NOT NULL, kind TEXT NOT NULL,
    seq INTEGER NOT NULL, detail TEXT NOT NULL, tamper INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_refusals (
    id INTEGER PRIMARY KEY, identity TEXT NOT NULL, at INTEGER NOT NULL, code TEXT NOT NULL,
    reason TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revocation_lists (
    id INTEGER PRIMARY KEY CHECK (id = 1), iat INTEGER NOT NULL, content TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS support_audit (
    id INTEGER PRIMARY KEY, at INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, detail TEXT NOT NULL);
"""


class SupportError(CloudError):
    code = "support"


class SupportDesk:
    def __init__(self, data_dir, clock_s=time.time, random_bytes=os.urandom):
        self.clock_s = clock_s
        self.random_bytes = random_bytes
        os.makedirs(data_dir, exist_ok=True)
        self.key = _load_or_make_key(os.path.join(data_dir, "support"))
        self.public_key = firmware.public_bytes(self.key)
        self.kid = firmware.kid_of(self.key)
        self._db = db.connect(os.path.join(data_dir, "support.db"))
        self._db.executescript(_SCHEMA)

    def close(self):
        self._db.close()

    def keys(self):
        """What a device pins: {kid: 65-byte point}."""
        return {self.kid: self.public_key}

    def now(self):
        return int(self.clock_s())

    # -- grants -----------------------------------------------------------

    def grant(self, technician, tech_key, role, devices=(), site=None, hours=4.0,
              requested_by=None, approved_by=None, reason=None, not_before=None):
        """Issue a grant after approval: (gid hex, COSE_Sign1 bytes)."""
        _need_text(requested_by, "requested-by")
        _need_text(approved_by, "approved-by")
        _need_text(reason, "reason")
        if approved_by.strip().lower() == requested_by.strip().lower():
            raise SupportError("a grant needs approval by someone other than the requester "
                               "(%s asked and approved)" % requested_by, "self_approval")
        if approved_by.strip().lower() == technician.strip().lower():
            raise SupportError("the technician cannot approve their own access", "self_approval")
        if not 0 < hours <= HOURS_MAX:
            raise SupportError("--hours must be more than 0 and at most %d" % HOURS_MAX, "bad_window")
        iat = self.now()
        nbf = iat if not_before is None else int(not_before)
        gid = self.random_bytes(16)
        claims = {agrant.CLAIM_ISS: agrant.ISSUER, agrant.CLAIM_SUB: technician,
                  agrant.CLAIM_EXP: nbf + int(hours * 3600), agrant.CLAIM_NBF: nbf,
                  agrant.CLAIM_IAT: iat, agrant.CLAIM_CTI: gid,
                  agrant.CLAIM_CNF: {agrant.CNF_COSE_KEY: cose_key(tech_key)},
                  "role": role, "devices": list(devices)}
        if site is not None:
            claims["site"] = site
        message = sign_grant(claims, self.key)
        try:   # the device's own parser: refuse to issue what a device would refuse
            g, verifier = agrant.start(message, self.keys())
        except agrant.GrantError as e:
            raise SupportError("cannot issue this grant: %s" % e.message, e.code) from None
        self._atomic(lambda: self._record_grant(g, requested_by, approved_by, reason))
        return gid.hex(), message

    def _record_grant(self, g, requested_by, approved_by, reason):
        self._db.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
            g.gid.hex(), g.technician, g.role, json.dumps(g.devices), g.site, g.nbf, g.exp, g.iat,
            g.key.hex(), requested_by, approved_by, reason))
        self._audit(approved_by, "grant_approved", g.gid.hex(), {
            "technician": g.technician, "role": g.role, "devices": g.devices, "site": g.site,
            "requested_by": requested_by, "reason": reason, "nbf": g.nbf, "exp": g.exp})

    def revoke(self, gid, by, reason):
        """Revoke a grant (idempotent): True if newly revoked."""
        _need_text(by, "by")
        _need_text(reason, "reason")
        if self._db.execute("SELECT 1 FROM grants WHERE gid = ?", (gid,)).fetchone() is None:
            raise SupportError("no grant %s" % gid, "unknown_grant")

        def op():
            cur = self._db.execute("INSERT OR IGNORE INTO grant_revocations VALUES (?, ?, ?, ?)",
                                   (gid, by, reason, self.now()))
            if cur.rowcount:
                self._audit(by, "grant_revoked", gid, {"reason": reason})
            return bool(cur.rowcount)
        return self._atomic(op)

    def revocation_list(self):
        """The signed list devices apply when online (agent.grant.verify_revocations).
        Its iat is the time, but never the iat of a list with other grant ids:
        two lists made in the same second differ by a second, so a device,
        which refuses a list older than the one it applied or as old with
        other ids, cannot be made to go back to the first (a replay)."""
        def op():
            now = self.now()
            gids = self._revoked_gids(now)
            content = hashlib.sha256(cbor.dumps(gids)).hexdigest()
            row = self._db.execute("SELECT iat, content FROM revocation_lists WHERE id = 1").fetchone()
            iat = now
            if row is not None and now <= row[0]:
                iat = row[0] if content == row[1] else row[0] + 1
            self._db.execute("INSERT OR REPLACE INTO revocation_lists VALUES (1, ?, ?)", (iat, content))
            return iat, gids
        iat, gids = self._atomic(op)
        body = cbor.dumps({agrant.CLAIM_IAT: iat, "revoked": gids})
        return firmware.sign1(body, self.key, agrant.REVOCATIONS_AAD)

    def revocations_digest(self):
        """What a device that applied the current list reports (agent.grant.revocations_digest)."""
        return agrant.revocations_digest(self._revoked_gids(self.now()))

    def _revoked_gids(self, now):
        gids = [bytes.fromhex(row[0]) for row in self._db.execute(
            "SELECT r.gid FROM grant_revocations r JOIN grants g ON g.gid = r.gid "
            "WHERE g.exp > ? ORDER BY r.at, r.gid", (now - 1,))]
        if len(gids) > agrant.REVOKED_MAX:
            raise SupportError("more than %d unexpired revoked grants" % agrant.REVOKED_MAX, "too_many")
        return gids

    def review(self, include_past=True):
        """Who holds and who held access to what, and who approved it."""
        now = self.now()
        rows = self._db.execute(
            "SELECT g.gid, technician, role, devices, site, nbf, exp, requested_by, approved_by,"
            " g.reason, r.by, r.reason, r.at FROM grants g LEFT JOIN grant_revocations r"
            " ON r.gid = g.gid ORDER BY iat, g.gid").fetchall()
        out = []
        for (gid, tech, role, devices, site, nbf, exp, req, appr, reason, rby, rreason, rat) in rows:
            state = "revoked" if rby else "expired" if exp <= now else "pending" if nbf > now else "active"
            if state != "active" and state != "pending" and not include_past:
                continue
            out.append({"gid": gid, "technician": tech, "role": role, "devices": json.loads(devices),
                        "site": site, "not_before": nbf, "expires": exp, "state": state,
                        "requested_by": req, "approved_by": appr, "reason": reason,
                        "revoked_by": rby, "revoke_reason": rreason, "revoked_at": rat})
        return out

    # -- device audit logs -------------------------------------------------

    def verify_log(self, device_id, data, record=True):
        """Check a device's audit log against its last checkpoint. The report
        of agent.auditlog.check plus "checkpoint_seq"; when the chain is
        sound and record is true, a new signed checkpoint is stored."""
        row = self._db.execute("SELECT seq, head FROM audit_checkpoints WHERE device = ?"
                               " ORDER BY seq DESC LIMIT 1", (device_id,)).fetchone()
        anchor_seq, anchor_head = (row[0], bytes.fromhex(row[1])) if row else (-1, None)
        start_seq, start_head = self._start(device_id, data)
        report = auditlog.check(data, device_id, anchor_seq, anchor_head, start_seq, start_head)
        report["checkpoint_seq"] = anchor_seq
        report["checkpoint"] = None
        self._audit("cloud", "audit_log_verified" if not report["tamper"] else "audit_log_tampered",
                    device_id, {"records": report["records"], "problems": report["problems"]})
        if record and not report["tamper"] and report["head_seq"] > anchor_seq:
            message = self.checkpoint(device_id, report["head_seq"], report["head"])
            self._db.execute("INSERT OR REPLACE INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)",
                             (device_id, report["head_seq"], report["head"].hex(), self.now(), message))
            report["checkpoint"] = message      # for the device: it may rotate its log to here
        return report

    def _start(self, device_id, data):
        """The checkpoint a rotated log claims to start at, if we signed one."""
        records = auditlog.records(data[:journal.HEADER_LEN + auditlog.RECORD_BYTES_MAX])
        if not records or records[0] is None or records[0][0] == 0:
            return -1, None
        row = self._db.execute("SELECT head FROM audit_checkpoints WHERE device = ? AND seq = ?",
                               (device_id, records[0][0])).fetchone()
        return (records[0][0], bytes.fromhex(row[0])) if row else (-1, None)

    def checkpoint(self, device_id, seq, head):
        body = cbor.dumps({"device": device_id, "seq": seq, "head": head, "iat": self.now()})
        return firmware.sign1(body, self.key, CHECKPOINT_AAD)

    # -- audit streams: a device's log uploaded in segments (cloud/support_mqtt.py) --
    #
    # The cloud keeps, per identity, where the chain it holds ends (next seq,
    # head hash) and the highest next seq the device announced. A hello
    # re-anchors that on the device's log after recording what no longer
    # matches; a segment must continue it. Whatever breaks the chain is a
    # finding (audit_findings); records are kept either way (a rewritten
    # branch marks the earlier records not current, never deletes them).

    def audit_hello(self, identity, device_id, next_seq, head, rev=b""):
        """The device's log ends before next_seq at head; -> the stream."""
        return self._atomic(lambda: self._hello(identity, device_id, next_seq, head, rev))

    def _hello(self, identity, device_id, next_seq, head, rev):
        st = self._stream(identity, device_id)
        if next_seq < st["next"]:
            self._finding(identity, "truncated", next_seq, "the device's log ends at %d; the cloud holds "
                          "records up to %d" % (next_seq - 1, st["next"] - 1))
            self._rewind(identity, device_id, st, next_seq, head)
        elif next_seq < st["announced"]:
            self._finding(identity, "truncated", next_seq, "the device's log ends at %d; it announced "
                          "records up to %d before" % (next_seq - 1, st["announced"] - 1))
        if next_seq == st["next"] and head != st["head"]:
            self._finding(identity, "edit", next_seq - 1, "record %d on the device is not the one "
                          "uploaded" % (next_seq - 1))
            st["head"] = head
        st["announced"], st["rev"] = next_seq, rev
        self._save_stream(identity, st)
        return st

    def audit_segment(self, identity, device_id, first, frames, announced, rev=b""):
        """Records from seq `first` (whole journal frames). -> {"next",
        "findings": [kind, ...], "checkpoint": COSE_Sign1 or None}.
        SupportError (nothing stored) if frames are not whole frames
        starting at record `first`."""
        bodies = segment_bodies(frames, first)
        return self._atomic(lambda: self._segment(identity, device_id, first, frames, bodies,
                                                  announced, rev))

    def _segment(self, identity, device_id, first, frames, bodies, announced, rev):
        st = self._stream(identity, device_id)
        before = self._last_finding_id()
        report = auditlog.check(frames, device_id, start_seq=first, start_head=_sha(bodies[0]))
        for kind, seq, detail in report["problems"]:
            self._finding(identity, kind, seq, detail)
        start = self._continuity(identity, device_id, st, first, bodies)
        for i in range(start, len(bodies)):
            self._store_record(identity, first + i, bodies[i])
        if start < len(bodies):
            rec = auditlog.decode(bodies[-1])
            st["next"] = (rec[0] if rec is not None else first + len(bodies) - 1) + 1
            st["head"] = _sha(bodies[-1])
        st["announced"], st["rev"] = max(announced, st["next"]), rev
        self._save_stream(identity, st)
        found = self.audit_findings(identity, since_id=before)
        checkpoint = None
        if not any(f["tamper"] for f in found):
            checkpoint = self._checkpoint_stream(identity, device_id, st)
        return {"next": st["next"], "findings": [f["kind"] for f in found], "checkpoint": checkpoint}

    def _continuity(self, identity, device_id, st, first, bodies):
        """Check where the segment meets the chain the cloud holds; -> the
        index of its first record the cloud does not hold yet."""
        rec = auditlog.decode(bodies[0])
        if first > st["next"]:
            self._finding(identity, "gap", st["next"], "records %d..%d never arrived"
                          % (st["next"], first - 1))
            return 0
        if first == st["next"]:
            if rec is not None and rec[1] != st["head"]:
                kind = "bad_start" if first == 0 else "edit"
                self._finding(identity, kind, first - 1 if first else 0,
                              "record %d does not chain to the record %d the cloud holds: the "
                              "device's log was changed or cut there" % (first, first - 1))
            return 0
        for i in range(len(bodies)):              # overlap: a resend, or a rewritten log
            seq = first + i
            if seq >= st["next"]:
                return i
            held = self._held(identity, seq)
            if held is None or held == _sha(bodies[i]):
                continue
            rec = auditlog.decode(bodies[i])
            prev = self._held(identity, seq - 1) if seq else auditlog.genesis(device_id)
            truncated = rec is not None and rec[1] == prev
            self._finding(identity, "truncated" if truncated else "edit", seq,
                          "the device's record %d is not the one the cloud holds (%s)" % (
                              seq, "its log was cut there and went on" if truncated else "changed"))
            self._rewind(identity, device_id, st, seq, None)
            return i
        return len(bodies)

    def _stream(self, identity, device_id):
        row = self._db.execute("SELECT next_seq, head, announced, rev FROM audit_streams"
                               " WHERE identity = ?", (identity,)).fetchone()
        if row is not None:
            return {"device": device_id, "next": row[0], "head": bytes.fromhex(row[1]),
                    "announced": row[2], "rev": bytes.fromhex(row[3])}
        cp = self._db.execute("SELECT seq, head FROM audit_checkpoints WHERE device = ?"
                              " ORDER BY seq DESC LIMIT 1", (identity,)).fetchone()
        next_seq, head = (cp[0] + 1, bytes.fromhex(cp[1])) if cp else (0, auditlog.genesis(device_id))
        return {"device": device_id, "next": next_seq, "head": head, "announced": next_seq, "rev": b""}

    def _save_stream(self, identity, st):
        self._db.execute("INSERT OR REPLACE INTO audit_streams VALUES (?, ?, ?, ?, ?, ?, ?)", (
            identity, st["device"], st["next"], st["head"].hex(), st["announced"], st["rev"].hex(),
            self.now()))

    def _rewind(self, identity, device_id, st, seq, head):
        """The device's log goes on from `seq` differently: records from
        there on are no longer current; the chain continues from seq - 1."""
        self._db.execute("UPDATE audit_records SET current = 0 WHERE identity = ? AND seq >= ?",
                         (identity, seq))
        held = self._held(identity, seq - 1) if seq else auditlog.genesis(device_id)
        st["next"] = seq
        st["head"] = held if held is not None else (head if head is not None else st["head"])

    def _held(self, identity, seq):
        row = self._db.execute("SELECT hash FROM audit_records WHERE identity = ? AND seq = ?"
                               " AND current = 1", (identity, seq)).fetchone()
        return bytes.fromhex(row[0]) if row else None

    def _store_record(self, identity, seq, body):
        rec = auditlog.decode(body)
        self._db.execute("INSERT INTO audit_records (identity, seq, hash, time_s, kind, body, received,"
                         " current) VALUES (?, ?, ?, ?, ?, ?, ?, 1)", (
                             identity, rec[0] if rec else seq, _sha(body).hex(),
                             rec[2] if rec else None, rec[3] if rec else None, body, self.now()))

    def _checkpoint_stream(self, identity, device_id, st):
        seq = st["next"] - 1
        row = self._db.execute("SELECT MAX(seq) FROM audit_checkpoints WHERE device = ?",
                               (identity,)).fetchone()
        if seq < 0 or (row[0] is not None and row[0] >= seq):
            return None
        message = self.checkpoint(device_id, seq, st["head"])
        self._db.execute("INSERT OR REPLACE INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)",
                         (identity, seq, st["head"].hex(), self.now(), message))
        return message

    def last_checkpoint(self, identity):
        row = self._db.execute("SELECT message FROM audit_checkpoints WHERE device = ?"
                               " ORDER BY seq DESC LIMIT 1", (identity,)).fetchone()
        return bytes(row[0]) if row else None

    def _finding(self, identity, kind, seq, detail):
        tamper = kind in auditlog.TAMPER
        self._db.execute("INSERT INTO audit_findings (identity, at, kind, seq, detail, tamper)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (identity, self.now(), kind, seq, detail, int(tamper)))
        if tamper:
            self._audit("cloud", "audit_log_tampered", identity, {"kind": kind, "seq": seq,
                                                                  "detail": detail})

    def _last_finding_id(self):
        row = self._db.execute("SELECT MAX(id) FROM audit_findings").fetchone()
        return row[0] or 0

    def audit_findings(self, identity=None, since_id=0, limit=1000):
        """What a reviewer queries: gaps, edits, truncation, ... per device."""
        sql = "SELECT id, identity, at, kind, seq, detail, tamper FROM audit_findings WHERE id > ?"
        args = [since_id]
        if identity is not None:
            sql += " AND identity = ?"
            args.append(identity)
        rows = self._db.execute(sql + " ORDER BY id LIMIT ?", args + [limit]).fetchall()
        return [{"id": r[0], "identity": r[1], "at": r[2], "kind": r[3], "seq": r[4], "detail": r[5],
                 "tamper": bool(r[6])} for r in rows]

    def audit_status(self, identity):
        """{"records", "next", "tamper", "findings"} of one device's uploaded log."""
        count = self._db.execute("SELECT COUNT(*) FROM audit_records WHERE identity = ? AND current = 1",
                                 (identity,)).fetchone()[0]
        row = self._db.execute("SELECT next_seq FROM audit_streams WHERE identity = ?",
                               (identity,)).fetchone()
        found = self.audit_findings(identity)
        return {"records": count, "next": row[0] if row else 0,
                "tamper": any(f["tamper"] for f in found), "findings": found}

    def uploaded_records(self, identity, current=True):
        """[seq, prev, time_s, kind, detail] of the records held, in order."""
        rows = self._db.execute("SELECT body FROM audit_records WHERE identity = ? AND current >= ?"
                                " ORDER BY id", (identity, int(current))).fetchall()
        return [auditlog.decode(bytes(r[0])) for r in rows]

    def refused(self, identity, code, reason, size):
        """A message refused before it reached a stream (the dead letters)."""
        self._db.execute("INSERT INTO audit_refusals (identity, at, code, reason, size)"
                         " VALUES (?, ?, ?, ?, ?)", (identity, self.now(), code, reason[:TEXT_MAX], size))

    def audit_refusals(self, identity=None, limit=1000):
        sql, args = "SELECT identity, at, code, reason, size FROM audit_refusals", []
        if identity is not None:
            sql, args = sql + " WHERE identity = ?", [identity]
        rows = self._db.execute(sql + " ORDER BY id LIMIT ?", args + [limit]).fetchall()
        return [dict(zip(("identity", "at", "code", "reason", "size"), r)) for r in rows]

    def streams(self):
        """{identity: reported revocation digest} of every device that uploaded."""
        return {r[0]: bytes.fromhex(r[1]) for r in self._db.execute(
            "SELECT identity, rev FROM audit_streams ORDER BY identity")}

    def audit_rows(self, limit=1000):
        rows = self._db.execute("SELECT at, actor, action, subject, detail FROM support_audit"
                                " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("at", "actor", "action", "subject", "detail"), r)) for r in reversed(rows)]

    # -- helpers -----------------------------------------------------------

    def _audit(self, actor, action, subject, detail):
        self._db.execute("INSERT INTO support_audit (at, actor, action, subject, detail)"
                         " VALUES (?, ?, ?, ?, ?)", (self.now(), actor, action, subject,
                                                    json.dumps(detail, sort_keys=True)))

    def _atomic(self, fn):
        return db.atomic(self._db, fn)


def segment_bodies(frames, first):
    """The record bodies of a segment: whole journal frames, the first one
    record `first`; SupportError with a code otherwise."""
    if not isinstance(frames, bytes) or not frames:
        raise SupportError("a segment holds at least one frame", "empty")
    bodies, good_len = journal.scan(frames)
    if good_len != len(frames):
        raise SupportError("a segment must be whole frames (%d of %d bytes are)" % (good_len, len(frames)),
                           "torn_segment")
    rec = auditlog.decode(bodies[0])
    if rec is None or rec[0] != first:
        raise SupportError("the segment's first record is not record %d" % first, "bad_first")
    return bodies


def _sha(data):
    return hashlib.sha256(data).digest()


def verify_checkpoint(message, keys):
    """{device, seq, head, iat} of a checkpoint signed by the support key."""
    return cbor.loads(cose.verify1(message, keys, CHECKPOINT_AAD))


def sign_grant(claims, key):
    return firmware.sign1(cbor.dumps(claims), key, agrant.GRANT_AAD)


def cose_key(point):
    if not isinstance(point, (bytes, bytearray)) or len(point) != 65 or point[0] != 4:
        raise SupportError("the technician key must be a 65-byte P-256 point", "bad_key")
    return {1: agrant.KTY_EC2, -1: agrant.CRV_P256, -2: bytes(point[1:33]), -3: bytes(point[33:])}


def _need_text(value, what):
    if not value or not isinstance(value, str) or len(value) > TEXT_MAX \
            or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SupportError("--%s is required: one line of at most %d characters" % (what, TEXT_MAX),
                           "missing_" + what.replace("-", "_"))


def _load_or_make_key(directory):
    path = os.path.join(directory, "support.key")
    if not os.path.exists(path):
        firmware.write_keypair(directory, "support")
    return firmware.load_private_key(path)
