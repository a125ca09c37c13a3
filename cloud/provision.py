"""Provisioning by claim, rotation and recovery: the cloud's decisions.

No MQTT here (cloud/provision_mqtt.py carries the messages): `on_claim`
takes a request that arrived on the provisioning endpoint from a claim
certificate, `on_device` one from a device's own identity, and each returns
the answer to send (CBOR, agent/enroll.py's format) or None.

The rules, each refused with a reason that is answered and audited:

- A claim certificate (one per factory batch, CN "claim:<batch>") may
  enroll only hardware ids on the allowlist *for its batch*, at most
  `quota` new identities, and only while the batch is not revoked.
- The allowlist binds a hardware id to a tenant, a device id and a site;
  the identity comes from there, never from the request. An entry may
  require operator approval: the device is told "pending" and retries.
- A hardware id already enrolled gets its certificate again only for the
  same key (a retry after a lost answer); a new key needs the recovery
  proof (a signature by the key of its last certificate) or an operator.
- Revoked identities get nothing.
- Rotation: a device asks with its current identity; the new certificate
  stays beside the old one until the device confirms it connected with
  it; then every other certificate of that identity is retired (on the
  CRL).
"""

import hashlib
import json
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from agent import cbor, enroll
from agent.errors import CBORError
from cloud.ca import claim_batch, csr_public_key, identity_of, load_cert, make_identity, parse_identity, check_id
from cloud.errors import CloudError, IdentityError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    batch TEXT PRIMARY KEY, quota INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, actor TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allowlist (
    hwid TEXT PRIMARY KEY, batch TEXT NOT NULL, tenant TEXT NOT NULL, device TEXT NOT NULL,
    site TEXT NOT NULL, approval INTEGER NOT NULL, cert_s INTEGER, added_ms INTEGER NOT NULL,
    actor TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enrollments (
    hwid TEXT PRIMARY KEY, identity TEXT NOT NULL, state TEXT NOT NULL,
    requested_ms INTEGER NOT NULL, approved_by TEXT, approved_ms INTEGER, caps TEXT,
    key_sha256 TEXT);
CREATE TABLE IF NOT EXISTS device_certs (
    fingerprint TEXT PRIMARY KEY, identity TEXT NOT NULL, serial TEXT NOT NULL,
    key_sha256 TEXT NOT NULL, issued_ms INTEGER NOT NULL, not_after_ms INTEGER NOT NULL,
    how TEXT NOT NULL, state TEXT NOT NULL, der BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS device_certs_by_identity ON device_certs (identity);
"""

SYSTEM = "cloud"               # audit actor of decisions the provisioning service makes
CERT_S_DEFAULT = 30 * 86400    # short-lived: rotated at two thirds, so every 20 days
PENDING_RETRY_MS = 5000
REFUSED_RETRY_MS = 60_000
REQUEST_BYTES_MAX = 8192
# Requests per sender: a hardware id (or device) may ask about once a second
# with a burst of 10; a whole claim batch 100/s with a burst of 1,000.
SENDER_RATE_PER_S, SENDER_BURST = 1.0, 10
BATCH_RATE_PER_S, BATCH_BURST = 100.0, 1000
RATE_LIMITED_RETRY_MS = 10_000
REFUSAL_WINDOW_MS = 60_000     # one audit row per (who, reason) a minute, with a count of the rest
REFUSAL_KEYS_MAX = 10_000
HWID_LEN_MAX = 64
SITE_LEN_MAX = 64

# states of an enrollment
PENDING, APPROVED, ISSUED = "pending", "approved", "issued"
# states of a device certificate
CERT_ISSUED, CERT_ACTIVE, CERT_RETIRED = "issued", "active", "retired"


class ProvisionError(CloudError):
    code = "provision"


def now_ms():
    return time.time_ns() // 1_000_000


def key_sha256(public_key):
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)).hexdigest()


class Refusal(Exception):
    def __init__(self, reason, retry_ms=REFUSED_RETRY_MS):
        Exception.__init__(self, reason)
        self.reason = reason
        self.retry_ms = retry_ms


class Provisioning:
    """registry: cloud.identity.Registry (its database, audit and revocations);
    ca: the device CA that signs identities."""

    def __init__(self, registry, ca, clock_ms=now_ms, cert_s=CERT_S_DEFAULT):
        self.registry = registry
        self.ca = ca
        self.clock_ms = clock_ms
        self.cert_s = cert_s
        self.db = registry._db
        self.db.executescript(_SCHEMA)
        self._refusals = {}  # (who, hwid, reason) -> [window start ms, refusals not audited]
        from cloud.limits import TokenBuckets
        self._senders = TokenBuckets(SENDER_RATE_PER_S, SENDER_BURST, 100_000)
        self._batches = TokenBuckets(BATCH_RATE_PER_S, BATCH_BURST, 10_000)
        if "key_sha256" not in [r[1] for r in self.db.execute("PRAGMA table_info(enrollments)")]:
            self.db.execute("ALTER TABLE enrollments ADD COLUMN key_sha256 TEXT")

    # -- operator side ----------------------------------------------------------

    def add_claim(self, batch, quota, actor, reason="new factory batch"):
        check_id("claim batch", batch, 32)
        if not isinstance(quota, int) or quota < 1:
            raise ProvisionError("quota must be a positive number of devices", "bad_quota")
        self.registry._require_actor(actor, reason)

        def op():
            self.db.execute("INSERT INTO claims (batch, quota, created_ms, actor) VALUES (?, ?, ?, ?)"
                            " ON CONFLICT (batch) DO UPDATE SET quota = excluded.quota",
                            (batch, quota, self.clock_ms(), actor))
            self.registry.audit(actor, "claim_batch", "claim:" + batch, reason, "quota %d" % quota)
        self.registry._atomic(op)

    def revoke_claim(self, batch, actor, reason):
        self.registry._require_actor(actor, reason)

        def op():
            cur = self.db.execute("UPDATE claims SET revoked = 1 WHERE batch = ?", (batch,))
            if not cur.rowcount:
                raise ProvisionError("no claim batch %r" % batch, "no_batch")
            self.registry.audit(actor, "claim_revoked", "claim:" + batch, reason)
        self.registry._atomic(op)

    def allow(self, hwid, batch, tenant, device, site, actor, approval=False, cert_s=None,
              reason="allowlisted", replace=False):
        """Put a hardware id on the allowlist of a batch, bound to an identity
        and site. An identity allowlisted for another hardware id is refused
        (its enrollment would retire the working board's certificate) unless
        replace: a board swap, the other hardware id taken off the list."""
        _check_hwid(hwid)
        check_id("site", site, SITE_LEN_MAX)
        make_identity(tenant, device)
        self.registry._require_actor(actor, reason)
        if cert_s is not None and (not isinstance(cert_s, int) or cert_s < 10):
            raise ProvisionError("certificate lifetime must be at least 10 s", "bad_lifetime")

        def op():
            others = self.check_allow(hwid, tenant, device, replace)
            for other in others:
                self.db.execute("DELETE FROM allowlist WHERE hwid = ?", (other,))
                self.registry.audit(actor, "allowlist_replaced", "%s/%s" % (tenant, device), reason,
                                    "hwid %s taken off for %s" % (other, hwid))
            self.db.execute("INSERT OR REPLACE INTO allowlist VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (hwid, batch, tenant, device, site, int(bool(approval)), cert_s,
                             self.clock_ms(), actor))
            self.registry.audit(actor, "allowlist", "%s/%s" % (tenant, device), reason,
                                "hwid %s batch %s site %s%s" % (hwid, batch, site,
                                                                 " approval required" if approval else ""))
        self.registry._atomic(op)

    def check_allow(self, hwid, tenant, device, replace=False):
        """Refuse (ProvisionError) what would give one identity to two boards:
        tenant/device allowlisted for, or enrolled by, another hardware id
        (identity_taken), or this hardware id allowlisted as another identity
        (hwid_taken); with replace, a board swap -> the other hardware ids
        allowlisted for the identity, to take off the list."""
        identity = "%s/%s" % (tenant, device)
        others = [row[0] for row in self.db.execute(
            "SELECT hwid FROM allowlist WHERE tenant = ? AND device = ? AND hwid != ?", (tenant, device, hwid))]
        if replace:
            return others
        holders = [row[0] for row in self.db.execute(
            "SELECT hwid FROM enrollments WHERE identity = ? AND state = ? AND hwid != ?",
            (identity, ISSUED, hwid))]
        if others or holders:
            raise ProvisionError("%s is already %s hardware id %s: one identity is one board (the new "
                                 "one's enrollment would retire the working board's certificate)"
                                 % (identity, "allowlisted for" if others else "enrolled by",
                                    (others or holders)[0]), "identity_taken")
        row = self.db.execute("SELECT tenant, device FROM allowlist WHERE hwid = ?", (hwid,)).fetchone()
        if row is not None and (row[0], row[1]) != (tenant, device):
            raise ProvisionError("hardware id %s is allowlisted as %s/%s: moving it to %s is a board "
                                 "swap" % (hwid, row[0], row[1], identity), "hwid_taken")
        return others

    def approve(self, hwid, actor, reason):
        """An operator approves a pending enrollment (critical fleets)."""
        self.registry._require_actor(actor, reason)

        def op():
            row = self.db.execute("SELECT identity, state FROM enrollments WHERE hwid = ?", (hwid,)).fetchone()
            if row is None or row[1] != PENDING:
                raise ProvisionError("no pending enrollment for %r" % hwid, "not_pending")
            self.db.execute("UPDATE enrollments SET state = ?, approved_by = ?, approved_ms = ?"
                            " WHERE hwid = ?", (APPROVED, actor, self.clock_ms(), hwid))
            self.registry.audit(actor, "enroll_approved", row[0], reason, "hwid %s" % hwid)
            return row[0]
        return self.registry._atomic(op)

    def pending(self):
        """Enrollments waiting for an operator, with the SHA-256 of the key
        that asked: approval is for that key only, so check it against the
        device (its console or label shows the same fingerprint)."""
        return [dict(zip(("hwid", "identity", "requested_ms", "key_sha256"), row)) for row in self.db.execute(
            "SELECT hwid, identity, requested_ms, key_sha256 FROM enrollments WHERE state = ?"
            " ORDER BY requested_ms", (PENDING,))]

    def claim_usage(self, batch):
        row = self.db.execute("SELECT quota, used, revoked FROM claims WHERE batch = ?", (batch,)).fetchone()
        return None if row is None else dict(zip(("quota", "used", "revoked"), row))

    def counts(self):
        """How many identities were provisioned, rotated and recovered."""
        rows = self.db.execute("SELECT how, COUNT(*) FROM device_certs WHERE state != ?"
                               " GROUP BY how", (CERT_ISSUED,)).fetchall()
        got = dict(rows)
        return {"provisioned": got.get("claim", 0), "rotated": got.get("rotate", 0),
                "recovered": got.get("recover", 0)}

    # -- device side --------------------------------------------------------------

    def on_claim(self, claim_identity, hwid, payload):
        """A request on prov/<claim>/<hwid>/req -> answer bytes, or None when
        the request carries no usable nonce to answer to."""
        try:
            _check_hwid(hwid)
        except Refusal:
            self._refused(claim_identity, "bad_hwid", "")  # never echo an unchecked client id
            return None
        msg, nonce = _parse(payload)
        if nonce is None:
            self._refused(claim_identity, "request without a nonce", hwid)
            return None
        try:
            self._rate(("claim", claim_identity, hwid), claim_identity)
            batch = claim_batch(claim_identity)
            if msg.get("hwid") != hwid:
                raise Refusal("hwid_mismatch")
            op = msg.get("op")
            if op == enroll.OP_CLAIM:
                return self._answer(nonce, self._claim(batch, hwid, msg))
            if op == enroll.OP_RECOVER:
                return self._answer(nonce, self._recover(batch, hwid, msg))
            raise Refusal("bad_op")
        except (Refusal, IdentityError, CloudError) as e:
            return self._refuse_answer(nonce, e, claim_identity, hwid)

    def on_device(self, identity, payload):
        """A request on t/<identity>/enroll -> answer bytes or None (confirm)."""
        msg, nonce = _parse(payload)
        if nonce is None:
            self._refused(identity, "request without a nonce", "")
            return None
        try:
            parse_identity(identity)
            self._rate(("device", identity), None)
            op = msg.get("op")
            if op == enroll.OP_CONFIRM:
                self._confirm(identity, msg.get("fp"))
                return self._answer(nonce, ("confirmed",))
            if op == enroll.OP_ROTATE:
                return self._answer(nonce, self._rotate(identity, msg))
            raise Refusal("bad_op")
        except (Refusal, IdentityError, CloudError) as e:
            return self._refuse_answer(nonce, e, identity, "")

    # -- the decisions ------------------------------------------------------------

    def _claim(self, batch, hwid, msg):
        entry = self._allowed(batch, hwid)
        tenant, device, site, approval, cert_s = entry
        identity = make_identity(tenant, device)
        self._not_revoked(identity)
        public_key = csr_public_key(_bytes(msg, "csr", enroll.CSR_BYTES_MAX))
        key_hash = key_sha256(public_key)
        row = self.db.execute("SELECT state FROM enrollments WHERE hwid = ?", (hwid,)).fetchone()
        if row is not None and row[0] == ISSUED:
            again = self.db.execute(
                "SELECT der, issued_ms, not_after_ms FROM device_certs WHERE identity = ? AND key_sha256 = ?"
                " ORDER BY issued_ms DESC LIMIT 1", (identity, key_hash)).fetchone()
            if again is None:
                raise Refusal("already_enrolled")  # a new key needs the recovery proof
            return ("issued", identity, bytes(again[0]), again[1], again[2])
        if approval:
            approved = self.db.execute("SELECT state, key_sha256 FROM enrollments WHERE hwid = ?",
                                       (hwid,)).fetchone()
            if approved is None:
                self._record_pending(hwid, identity, msg, key_hash)
                return ("pending", identity)
            if approved[1] != key_hash:
                raise Refusal("not_the_key_that_asked")  # approval is for one key, not the hardware id
            if approved[0] != APPROVED:
                return ("pending", identity)
        usage = self.claim_usage(batch)
        if usage["used"] >= usage["quota"]:
            raise Refusal("quota_exhausted")
        return self._issue(identity, public_key, key_hash, cert_s, "claim", hwid=hwid, batch=batch,
                           site=site, caps=msg.get("caps"))

    def _recover(self, batch, hwid, msg):
        cert_s = self._allowed(batch, hwid)[4]
        row = self.db.execute("SELECT identity, state FROM enrollments WHERE hwid = ?", (hwid,)).fetchone()
        if row is None or row[1] != ISSUED:
            raise Refusal("not_enrolled")
        identity = row[0]
        self._not_revoked(identity)
        old = load_cert(_bytes(msg, "old_cert", enroll.CERT_BYTES_MAX))
        if not self.ca.signed(old) or identity_of(old) != identity:
            raise Refusal("old_cert_not_ours")
        known = self.db.execute("SELECT state FROM device_certs WHERE fingerprint = ?",
                                (_fingerprint(old),)).fetchone()
        if known is None or known[0] == CERT_RETIRED:
            raise Refusal("old_cert_retired")
        csr = _bytes(msg, "csr", enroll.CSR_BYTES_MAX)
        public_key = csr_public_key(csr)
        sig = _bytes(msg, "sig", 64)
        if len(sig) != 64:
            raise Refusal("bad_proof")
        digest = enroll.recovery_digest(csr, msg["nonce"])
        der_sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            old.public_key().verify(der_sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except Exception:
            raise Refusal("bad_proof") from None
        key_hash = key_sha256(public_key)
        again = self.db.execute(
            "SELECT der, issued_ms, not_after_ms FROM device_certs WHERE identity = ? AND key_sha256 = ?",
            (identity, key_hash)).fetchone()
        if again is not None:  # a retry (or a replay): the same certificate, not a new one
            return ("issued", identity, bytes(again[0]), again[1], again[2])
        return self._issue(identity, public_key, key_hash, cert_s, "recover", hwid=hwid)

    def _rotate(self, identity, msg):
        self._not_revoked(identity)
        public_key = csr_public_key(_bytes(msg, "csr", enroll.CSR_BYTES_MAX))
        key_hash = key_sha256(public_key)
        again = self.db.execute(
            "SELECT der, issued_ms, not_after_ms FROM device_certs WHERE identity = ? AND key_sha256 = ?",
            (identity, key_hash)).fetchone()
        if again is not None:
            return ("issued", identity, bytes(again[0]), again[1], again[2])
        row = self.db.execute("SELECT cert_s FROM allowlist WHERE tenant || '/' || device = ?",
                              (identity,)).fetchone()
        return self._issue(identity, public_key, key_hash, row[0] if row else None, "rotate")

    def _confirm(self, identity, fp):
        if not isinstance(fp, bytes) or len(fp) != 32:
            raise Refusal("bad_confirm")
        fp_hex = fp.hex()
        row = self.db.execute("SELECT identity, state, how FROM device_certs WHERE fingerprint = ?",
                              (fp_hex,)).fetchone()
        if row is None or row[0] != identity:
            raise Refusal("unknown_cert")
        if row[1] == CERT_RETIRED:
            raise Refusal("cert_retired")

        def op():
            self.db.execute("UPDATE device_certs SET state = ? WHERE fingerprint = ?", (CERT_ACTIVE, fp_hex))
            serial_in_use = self.db.execute("SELECT serial FROM device_certs WHERE fingerprint = ?",
                                            (fp_hex,)).fetchone()[0]
            self.db.execute("UPDATE device_certs SET state = ? WHERE identity = ? AND fingerprint != ?",
                            (CERT_RETIRED, identity, fp_hex))
            # Every other certificate the cloud issued to this identity, by
            # any route (fleet credentials, takeover kicks, earlier rotations).
            olds = self.db.execute("SELECT serial FROM certificates WHERE identity = ? AND serial != ?"
                                   " AND serial NOT IN (SELECT serial FROM retired_certs)",
                                   (identity, serial_in_use)).fetchall()
            for (serial,) in olds:
                self._retire(serial, identity, "superseded by %s" % row[2])
            if row[1] != CERT_ACTIVE:
                self.registry.audit(SYSTEM, row[2] if row[2] != "claim" else "provision_proven", identity,
                                    "device connected with its new certificate",
                                    "%d older certificate(s) retired (CRL)" % len(olds))
        self.registry._atomic(op)

    # -- helpers ------------------------------------------------------------------

    def _rate(self, sender, batch):
        """Refuse (before any CA or disk work) a sender over its rate."""
        now = self.clock_ms()
        if self._senders.tokens(sender, now) < 1 or \
                (batch is not None and self._batches.tokens(batch, now) < 1):
            raise Refusal("rate_limited", RATE_LIMITED_RETRY_MS)
        self._senders.spend(sender)
        if batch is not None:
            self._batches.spend(batch)

    def _allowed(self, batch, hwid):
        claim = self.claim_usage(batch)
        if claim is None:
            raise Refusal("unknown_claim")
        if claim["revoked"]:
            raise Refusal("claim_revoked")
        row = self.db.execute("SELECT batch, tenant, device, site, approval, cert_s FROM allowlist"
                              " WHERE hwid = ?", (hwid,)).fetchone()
        if row is None:
            raise Refusal("not_allowlisted")
        if row[0] != batch:
            raise Refusal("wrong_batch")
        return row[1], row[2], row[3], bool(row[4]), row[5]

    def _retire(self, serial, identity, reason):
        """Put a certificate on the CRL (cloud/identity.py revoked_serials)."""
        self.db.execute("INSERT OR IGNORE INTO retired_certs VALUES (?, ?, ?, ?)",
                        (serial, identity, reason, self.clock_ms()))

    def _not_revoked(self, identity):
        if identity in self.registry.revoked():
            raise Refusal("revoked")

    def _record_pending(self, hwid, identity, msg, key_hash):
        def op():
            self.db.execute("INSERT OR IGNORE INTO enrollments (hwid, identity, state, requested_ms, caps,"
                            " key_sha256) VALUES (?, ?, ?, ?, ?, ?)",
                            (hwid, identity, PENDING, self.clock_ms(), _caps_text(msg.get("caps")), key_hash))
            self.registry.audit(SYSTEM, "enroll_pending", identity, "approval required",
                                "hwid %s waits for an operator; key sha256 %s" % (hwid, key_hash[:16]))
        self.registry._atomic(op)

    def _issue(self, identity, public_key, key_hash, cert_s, how, hwid=None, batch=None, site=None, caps=None):
        tenant, device = parse_identity(identity)
        lifetime_s = cert_s or self.cert_s
        issued_ms = self.clock_ms()
        cert_pem = self.ca.issue_for_key(public_key, tenant, device, seconds=lifetime_s)
        cert = load_cert(cert_pem)
        der = cert.public_bytes(serialization.Encoding.DER)
        not_after_ms = issued_ms + lifetime_s * 1000

        def op():
            if how == "claim":
                cur = self.db.execute("UPDATE claims SET used = used + 1 WHERE batch = ? AND used < quota",
                                      (batch,))
                if not cur.rowcount:
                    raise Refusal("quota_exhausted")
            else:
                # A new request means an earlier unproven certificate was
                # abandoned (its answer lost): it is retired, so unproven
                # certificates stay one per identity.
                for (old_fp, serial) in self.db.execute(
                        "SELECT fingerprint, serial FROM device_certs WHERE identity = ? AND state = ?",
                        (identity, CERT_ISSUED)).fetchall():
                    self.db.execute("UPDATE device_certs SET state = ? WHERE fingerprint = ?",
                                    (CERT_RETIRED, old_fp))
                    self._retire(serial, identity, "abandoned before it was proven")
            self.db.execute("INSERT INTO device_certs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (_fingerprint(cert), identity, format(cert.serial_number, "x"), key_hash,
                             issued_ms, not_after_ms, how, CERT_ISSUED, der))
            self.registry.issued(identity, cert.serial_number, purpose=how)
            if how == "claim":
                self.db.execute("INSERT INTO enrollments (hwid, identity, state, requested_ms, caps, key_sha256)"
                                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hwid) DO UPDATE SET state = ?",
                                (hwid, identity, ISSUED, issued_ms, _caps_text(caps), key_hash, ISSUED))
            self.registry.audit(SYSTEM, {"claim": "provision", "rotate": "rotate_issued",
                                         "recover": "recover_issued"}[how], identity,
                                "enrolled by claim" if how == "claim" else
                                ("rotation before expiry" if how == "rotate" else
                                 "expired certificate recovered with proof of its key"),
                                "serial %x, %d s%s%s" % (cert.serial_number, lifetime_s,
                                                         ", site %s" % site if site else "",
                                                         ", caps %s" % _caps_text(caps) if caps else ""))
        self.registry._atomic(op)
        return ("issued", identity, der, issued_ms, not_after_ms)

    def _answer(self, nonce, outcome):
        msg = {"v": enroll.VERSION, "nonce": nonce, "now_ms": self.clock_ms(), "status": outcome[0]}
        if outcome[0] == "confirmed":
            return cbor.dumps(msg)
        if outcome[0] == "issued":
            _, identity, der, issued_ms, not_after_ms = outcome
            msg.update(cert=der, identity=identity, issued_ms=issued_ms, not_after_ms=not_after_ms)
        else:
            msg.update(reason="approval required", retry_ms=PENDING_RETRY_MS)
        return cbor.dumps(msg)

    def _refuse_answer(self, nonce, exc, who, hwid):
        reason = exc.reason if isinstance(exc, Refusal) else getattr(exc, "code", "refused")
        self._refused(who, reason, hwid)
        retry_ms = exc.retry_ms if isinstance(exc, Refusal) else REFUSED_RETRY_MS
        return cbor.dumps({"v": enroll.VERSION, "nonce": nonce, "now_ms": self.clock_ms(),
                           "status": "refused", "reason": reason, "retry_ms": retry_ms})

    def _refused(self, who, reason, hwid):
        """Audited, but at most one row per (who, hwid, reason) a minute,
        carrying how many more came: a claim certificate's holder cannot grow
        the trail (or stall the service on disk writes) by sending garbage."""
        now = self.clock_ms()
        key = (who, hwid, reason)
        window = self._refusals.get(key)
        if window is not None and now - window[0] < REFUSAL_WINDOW_MS:
            window[1] += 1
            return
        more = window[1] if window is not None else 0
        self._refusals.pop(key, None)
        self._refusals[key] = [now, 0]
        if len(self._refusals) > REFUSAL_KEYS_MAX:
            self._refusals.pop(next(iter(self._refusals)))
        detail = "hwid %s" % hwid if hwid else ""
        if more:
            detail += "%s%d more in the minute before" % ("; " if detail else "", more)
        self.registry.audit(SYSTEM, "enroll_refused", who, reason, detail)


def _parse(payload):
    """-> (message map, nonce or None)."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > REQUEST_BYTES_MAX:
        return {}, None
    try:
        msg = cbor.loads(bytes(payload))
    except CBORError:
        return {}, None
    if not isinstance(msg, dict) or msg.get("v") != enroll.VERSION:
        return {}, None
    nonce = msg.get("nonce")
    if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 32:
        return msg, None
    return msg, nonce


def _bytes(msg, key, len_max):
    value = msg.get(key)
    if not isinstance(value, bytes) or not 0 < len(value) <= len_max:
        raise Refusal("bad_" + key)
    return value


def _check_hwid(hwid):
    try:
        return check_id("hardware", hwid, HWID_LEN_MAX)
    except IdentityError:
        raise Refusal("bad_hwid") from None


def _caps_text(caps):
    if not isinstance(caps, dict):
        return ""
    clean = {k: v for k, v in caps.items() if isinstance(k, str) and len(k) <= 32 and isinstance(v, bool)}
    return json.dumps(dict(sorted(clean.items())[:16]), sort_keys=True)


def _fingerprint(cert):
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
