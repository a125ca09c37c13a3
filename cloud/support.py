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
"""

import json
import os
import sqlite3
import time

from agent import auditlog, cbor, cose, journal, grant as agrant
from cloud import firmware
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
        self._db = sqlite3.connect(os.path.join(data_dir, "support.db"), isolation_level=None,
                                   timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
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
        """The signed list devices apply when online (agent.grant.verify_revocations)."""
        now = self.now()
        gids = [bytes.fromhex(row[0]) for row in self._db.execute(
            "SELECT r.gid FROM grant_revocations r JOIN grants g ON g.gid = r.gid "
            "WHERE g.exp > ? ORDER BY r.at, r.gid", (now - 1,))]
        if len(gids) > agrant.REVOKED_MAX:
            raise SupportError("more than %d unexpired revoked grants" % agrant.REVOKED_MAX, "too_many")
        body = cbor.dumps({agrant.CLAIM_IAT: now, "revoked": gids})
        return firmware.sign1(body, self.key, agrant.REVOCATIONS_AAD)

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
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result


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
