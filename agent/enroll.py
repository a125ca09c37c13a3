# The device's identity: enrollment by claim, rotation before expiry, and
# recovery of an expired certificate. Sans-IO, like agent.telemetry: events
# in (agent.events), actions out (agent.actions); the board's keystore makes
# keys and CSRs (MakeKey -> KeyMade) and signs (Sign -> Signed).
#
# What is persisted, and why every power cut leaves a working identity:
#
#   "identity" file (WriteAtomic, all or nothing), a CBOR map:
#     a: the active identity   {k: key slot, cert, id, iss, exp}
#     c: a candidate           (same shape) issued but not yet proven
#     u: fingerprint of a certificate whose proof the cloud has not heard
#     t: the latest cloud time known, off: cloud minus device clock
#
# Keys live in two keystore slots, "id0" and "id1"; a new key always goes
# into the slot the active identity does not use, so making one never
# touches the key in use. A certificate for the new key is first stored as
# the candidate; after a reboot the candidate is tried first; only a
# connection the broker accepted promotes it; a refused one is dropped and
# the active identity used again. The cloud revokes the old certificate only
# when the device says the new one works (the confirm message).
#
# Time: the device's clock need not be right. Each cloud answer carries the
# cloud's time; the device keeps the offset and never lets its idea of
# cloud time go backwards (a board without a clock that reboots assumes no
# time passed). A certificate that expired anyway (the device was off for
# its whole lifetime) shows as a refusal at connect: the device then
# re-enrolls over the claim endpoint, proving it holds the expired
# certificate's key (a signature over the new CSR); see docs/identity.md.

import hashlib

from agent import cbor
from agent.actions import DeleteKey, Log, MakeKey, Publish, Sign, UseIdentity, WriteAtomic
from agent.backoff import Backoff
from agent.errors import CBORError, LocalError, RemoteError
from agent.events import (ConnectionLost, Connected, KeyMade, Message, PubAcked, Refused, RotateNow, Signed,
                          Tick)

RECORD_FILE = "identity"
SLOTS = ("id0", "id1")
VERSION = 1
NONCE_BYTES = 8
CERT_BYTES_MAX = 4096
CSR_BYTES_MAX = 2048
TEXT_MAX = 128
RECOVER_CONTEXT = b"tether-recover-v1"

OP_CLAIM, OP_ROTATE, OP_RECOVER, OP_CONFIRM = "claim", "rotate", "recover", "confirm"
ISSUED, PENDING, REFUSED_, CONFIRMED = "issued", "pending", "refused", "confirmed"
# Refusals that say the certificate itself is bad (not a network hiccup):
# one is enough to drop a candidate. Others count toward refusals_to_recover.
DEFINITE_REFUSALS = ("cert_revoked", "cert_refused", "cert_expired", "unknown_ca", "not_authorized",
                     "key_mismatch")

UNENROLLED = "unenrolled"  # no identity yet: will claim
KEYGEN = "keygen"          # asked the board for a key and CSR
SIGNING = "signing"        # recovery: asked the old key to sign the new CSR
WAITING = "waiting"        # a request is out (or will go when connected)
RETRY = "retry"            # backing off before asking again (pending, refused, no answer)
PROVING = "proving"        # connecting with a new certificate
ENROLLED = "enrolled"
ERROR = "error"

TRANSITIONS = {
    (UNENROLLED, Tick): "_claim",
    (KEYGEN, KeyMade): "_key_made",
    (SIGNING, Signed): "_signed",
    (WAITING, Message): "_answer",
    (WAITING, Tick): "_waiting_tick",
    (WAITING, Connected): "_send",
    (RETRY, Tick): "_retry_tick",
    (PROVING, Connected): "_proven",
    (PROVING, Refused): "_disproven",
    (ENROLLED, Tick): "_enrolled_tick",
    (ENROLLED, Connected): "_enrolled_connected",
    (ENROLLED, Refused): "_enrolled_refused",
    (ENROLLED, Message): "_confirm_answer",
    (ENROLLED, RotateNow): "_rotate_now",
}
# Link events any state takes in its stride (they only track connectivity);
# messages other than an awaited answer (late, replayed) are ignored.
_LINK_EVENTS = (Connected, ConnectionLost, Refused)


class EnrollError(RemoteError):
    code = "enroll"


class Config:
    """hwid: the board's hardware id; claim: the claim certificate's
    identity (its CN, "claim:<batch>"); caps: the keystore's capability
    flags, reported to the cloud."""

    def __init__(self, hwid, claim, caps=None, answer_timeout_ms=30000, backoff_base_ms=1000,
                 backoff_cap_ms=300000, rotate_num=2, rotate_den=3, refusals_to_recover=3):
        if not 0 < rotate_num < rotate_den:
            raise ValueError("rotation must fall inside the lifetime: 0 < num < den")
        self.hwid = _text(hwid, "hwid")
        self.claim = _text(claim, "claim")
        self.caps = caps or {}
        self.answer_timeout_ms = answer_timeout_ms
        self.backoff_base_ms = backoff_base_ms
        self.backoff_cap_ms = backoff_cap_ms
        self.rotate_num = rotate_num
        self.rotate_den = rotate_den
        self.refusals_to_recover = refusals_to_recover


# -- topics and messages --------------------------------------------------------

def claim_topics(claim, hwid):
    """(request, answer) topics on the provisioning endpoint."""
    base = "prov/%s/%s/" % (claim, hwid)
    return base + "req", base + "resp"


def device_topics(identity):
    """(request, answer) topics on the device's own endpoint."""
    return "t/%s/enroll" % identity, "t/%s/cert" % identity


def request(op, nonce, csr=None, hwid=None, caps=None, old_cert=None, sig=None, fingerprint=None):
    msg = {"v": VERSION, "op": op, "nonce": nonce}
    for key, value in (("csr", csr), ("hwid", hwid), ("caps", caps), ("old_cert", old_cert),
                       ("sig", sig), ("fp", fingerprint)):
        if value is not None:
            msg[key] = value
    return cbor.dumps(msg)


def recovery_digest(csr, nonce):
    """What the expired certificate's key signs to ask for a new one."""
    return hashlib.sha256(RECOVER_CONTEXT + nonce + csr).digest()


def fingerprint(cert):
    return hashlib.sha256(cert).digest()


class Answer:
    """A checked answer from the cloud."""

    def __init__(self, status, reason, retry_ms, cert, identity, now_ms, issued_ms, not_after_ms):
        self.status = status
        self.reason = reason
        self.retry_ms = retry_ms
        self.cert = cert
        self.identity = identity
        self.now_ms = now_ms
        self.issued_ms = issued_ms
        self.not_after_ms = not_after_ms


def parse_answer(payload, nonce):
    """-> Answer; EnrollError if malformed or not the answer to `nonce`."""
    try:
        msg = cbor.loads(payload)
    except CBORError as e:
        raise EnrollError("answer is not CBOR: %s" % e.message, "bad_answer")
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise EnrollError("answer is not a version %d map" % VERSION, "bad_answer")
    if msg.get("nonce") != nonce:
        raise EnrollError("answer to another request (nonce)", "stale_answer")
    status = msg.get("status")
    now_ms = _int(msg, "now_ms")
    if status == ISSUED:
        cert = msg.get("cert")
        if not isinstance(cert, bytes) or not 0 < len(cert) <= CERT_BYTES_MAX:
            raise EnrollError("issued without a certificate", "bad_answer")
        issued, expires = _int(msg, "issued_ms"), _int(msg, "not_after_ms")
        if expires <= issued:
            raise EnrollError("certificate expires before it is issued", "bad_answer")
        return Answer(status, "", 0, cert, _text(msg.get("identity"), "identity"), now_ms, issued, expires)
    if status == CONFIRMED:
        return Answer(status, "", 0, None, None, now_ms, 0, 0)
    if status in (PENDING, REFUSED_):
        retry_ms = msg.get("retry_ms", 0)
        if not isinstance(retry_ms, int) or retry_ms < 0:
            raise EnrollError("bad retry_ms", "bad_answer")
        return Answer(status, _text(msg.get("reason", status), "reason"), retry_ms, None, None, now_ms, 0, 0)
    raise EnrollError("unknown status %r" % (status,), "bad_answer")


def _int(msg, key):
    value = msg.get(key)
    if not isinstance(value, int) or value < 0:
        raise EnrollError("%s must be a non-negative integer" % key, "bad_answer")
    return value


def _text(value, what):
    if not isinstance(value, str) or not 0 < len(value) <= TEXT_MAX:
        raise EnrollError("%s must be 1..%d characters" % (what, TEXT_MAX), "bad_answer")
    return value


# -- the persisted record ---------------------------------------------------------

def _slot_map(slot, cert, identity, issued_ms, not_after_ms):
    return {"k": slot, "cert": cert, "id": identity, "iss": issued_ms, "exp": not_after_ms}


def encode_record(record):
    return cbor.dumps(record)


def decode_record(blob):
    """-> the record map, or None for no (or an unreadable) record."""
    if not blob:
        return None
    try:
        record = cbor.loads(blob)
    except CBORError:
        return None
    if not isinstance(record, dict) or record.get("v") != VERSION:
        return None
    for key in ("a", "c"):
        slot = record.get(key)
        if slot is not None and not (isinstance(slot, dict) and slot.get("k") in SLOTS
                                     and isinstance(slot.get("cert"), bytes)):
            return None
    return record


# -- the machine ------------------------------------------------------------------

class Identity:
    def __init__(self, config, rng):
        self.config = config
        self.rng = rng
        self.backoff = Backoff(rng, config.backoff_base_ms, config.backoff_cap_ms)
        self.state = UNENROLLED
        self.record = {"v": VERSION, "a": None, "c": None, "u": None, "t": 0, "off": 0}
        self.online = False
        self.now_ms = 0          # device clock, from the latest event that carried it
        self.purpose = None      # OP_CLAIM, OP_ROTATE or OP_RECOVER while one is under way
        self.slot = None         # the slot the new key went into
        self.csr = None
        self.sig = None
        self.nonce = None
        self.sent_ms = -1        # when the request went out; -1: not yet
        self.retry_at_ms = 0     # RETRY: when to ask again; ENROLLED: when to try rotating again
        self.refusals = 0        # refusals of the identity being tried, in a row
        self.last_reason = ""
        self.rotate_asked = False  # RotateNow: rotate before the certificate's time
        self.confirm_nonce = None  # the confirm out, waiting for the cloud's answer
        self.confirm_ms = -1

    # -- boot ---------------------------------------------------------------

    def boot(self, record_blob):
        record = decode_record(record_blob)
        if record is None:
            return [Log("unenrolled", "unreadable identity record: enrolling by claim")] if record_blob else []
        self.record = record
        if record.get("c") is not None:
            self.state = PROVING
            return [UseIdentity(record["c"]["k"], record["c"]["cert"])]
        if record.get("a") is not None:
            self.state = ENROLLED
            return [UseIdentity(record["a"]["k"], record["a"]["cert"])]
        return []

    @property
    def identity(self):
        active = self.record.get("a")
        return None if active is None else active["id"]

    def cloud_ms(self, now_ms):
        """Our best idea of the cloud's clock: never behind the last answer's."""
        t = now_ms + self.record.get("off", 0)
        return t if t > self.record.get("t", 0) else self.record.get("t", 0)

    def rotate_at_ms(self):
        a = self.record["a"]
        span = a["exp"] - a["iss"]
        return a["iss"] + span * self.config.rotate_num // self.config.rotate_den

    # -- events -------------------------------------------------------------

    def handle(self, event):
        if self.state == ERROR:
            raise LocalError("the identity machine failed earlier", "bad_transition")
        now_ms = getattr(event, "now_ms", None)
        if now_ms is not None:
            self.now_ms = now_ms
        if isinstance(event, _LINK_EVENTS):
            self.online = isinstance(event, Connected)
        name = TRANSITIONS.get((self.state, type(event)))
        if name is not None:
            return getattr(self, name)(event)
        if isinstance(event, (Connected, ConnectionLost, Message, Tick, PubAcked)):
            return []
        if isinstance(event, RotateNow):
            return [Log("rotate_refused", "no identity to rotate, or a change already under way")]
        if isinstance(event, Refused):
            return self._refused_while_busy(event)
        prior = self.state
        self.state = ERROR
        raise LocalError("%s is not allowed in state %s" % (type(event).__name__, prior), "bad_transition")

    def _begin(self, purpose, reuse=False):
        self.purpose = purpose
        active = self.record.get("a")
        self.slot = SLOTS[1] if active is not None and active["k"] == SLOTS[0] else SLOTS[0]
        self.state = KEYGEN
        return [MakeKey(self.slot, reuse)]

    def _claim(self, event):
        if event.now_ms < self.retry_at_ms:
            return []
        return self._begin(OP_CLAIM, reuse=True)  # the cloud may have certified this key already

    def _key_made(self, event):
        if event.name != self.slot or not isinstance(event.csr, bytes) or not 0 < len(event.csr) <= CSR_BYTES_MAX:
            self.state = ERROR
            raise LocalError("KeyMade does not answer MakeKey(%s)" % self.slot, "bad_key")
        self.csr = event.csr
        self.nonce = self._nonce()
        if self.purpose == OP_RECOVER:
            self.state = SIGNING
            return [Sign(self.record["a"]["k"], recovery_digest(self.csr, self.nonce))]
        return self._ask()

    def _signed(self, event):
        if event.name != self.record["a"]["k"] or not isinstance(event.signature, bytes) \
                or len(event.signature) != 64:
            self.state = ERROR
            raise LocalError("Signed does not answer Sign(%s)" % self.record["a"]["k"], "bad_signature")
        self.sig = event.signature
        return self._ask()

    def _ask(self):
        """Send the request now if connected to the right endpoint, else on Connected."""
        self.state = WAITING
        self.sent_ms = -1
        actions = []
        if self.purpose != OP_ROTATE:
            actions.append(UseIdentity(None, None))  # the claim endpoint
            self.online = False
        return actions + (self._send(None) if self.online else [])

    def _send(self, event):
        cfg = self.config
        if self.purpose == OP_ROTATE:
            topic = device_topics(self.identity)[0]
            payload = request(OP_ROTATE, self.nonce, csr=self.csr, caps=cfg.caps)
        elif self.purpose == OP_CLAIM:
            topic = claim_topics(cfg.claim, cfg.hwid)[0]
            payload = request(OP_CLAIM, self.nonce, csr=self.csr, hwid=cfg.hwid, caps=cfg.caps)
        else:
            topic = claim_topics(cfg.claim, cfg.hwid)[0]
            payload = request(OP_RECOVER, self.nonce, csr=self.csr, hwid=cfg.hwid, caps=cfg.caps,
                              old_cert=self.record["a"]["cert"], sig=self.sig)
        self.sent_ms = self.now_ms
        return [Publish(topic, payload, None)]

    def _waiting_tick(self, event):
        if not self.online:
            return []
        if self.sent_ms < 0:
            return self._send(event)
        if event.now_ms - self.sent_ms > self.config.answer_timeout_ms:
            return self._back_off(0, "no answer in %d ms" % self.config.answer_timeout_ms)
        return []

    def _retry_tick(self, event):
        if event.now_ms < self.retry_at_ms:
            return []
        return self._ask()

    def _back_off(self, retry_ms, why):
        delay = self.backoff.next_delay_ms()
        self.state = RETRY
        self.retry_at_ms = self.now_ms + (retry_ms if retry_ms > delay else delay)
        self.last_reason = why
        return [Log("enroll_retry", why)]

    def _answer(self, event):
        try:
            answer = parse_answer(event.payload, self.nonce)
        except EnrollError as e:
            return [Log(e.code, e.message)]  # not ours, or garbage: keep waiting
        self._learn_time(event.now_ms, answer.now_ms)
        if answer.status != ISSUED:
            return self._back_off(answer.retry_ms, "%s: %s" % (answer.status, answer.reason))
        self.backoff.reset()
        self.record["c"] = _slot_map(self.slot, answer.cert, answer.identity, answer.issued_ms,
                                     answer.not_after_ms)
        self.state = PROVING
        return [WriteAtomic(RECORD_FILE, encode_record(self.record)),
                UseIdentity(self.slot, answer.cert)]

    def _learn_time(self, now_ms, cloud_ms):
        """A fresh answer to our own request sets our idea of cloud time,
        also downwards: one wrong clock in the cloud must not stay forever."""
        self.record["off"] = cloud_ms - now_ms
        self.record["t"] = cloud_ms

    def _proven(self, event):
        old = self.record.get("a")
        self.record["a"] = self.record["c"]
        self.record["c"] = None
        self.record["u"] = fingerprint(self.record["a"]["cert"])  # the cloud hears it works
        self.state = ENROLLED
        self.purpose = None
        self.rotate_asked = False
        actions = [WriteAtomic(RECORD_FILE, encode_record(self.record)),
                   Log("identity_proven", self.record["a"]["id"])]
        if old is not None and old["k"] != self.record["a"]["k"]:
            actions.append(DeleteKey(old["k"]))
        return actions + self._enrolled_connected(event)

    def _disproven(self, event):
        self.refusals += 1
        if event.reason not in DEFINITE_REFUSALS and self.refusals < self.config.refusals_to_recover:
            # Maybe only the network: try the same certificate again.
            return [Log("candidate_refused", event.reason), UseIdentity(self.slot_of_candidate(),
                                                                        self.record["c"]["cert"])]
        self.refusals = 0
        self.record["c"] = None
        actions = [WriteAtomic(RECORD_FILE, encode_record(self.record)),
                   Log("candidate_refused", event.reason)]
        self.purpose = None
        if self.record.get("a") is None:
            self.state = UNENROLLED
            self.retry_at_ms = self.now_ms + self.backoff.next_delay_ms()
            return actions
        self.state = ENROLLED
        self.retry_at_ms = self.now_ms + self.backoff.next_delay_ms()  # rotation tried again then
        return actions + [UseIdentity(self.record["a"]["k"], self.record["a"]["cert"])]

    def slot_of_candidate(self):
        return self.record["c"]["k"]

    def _enrolled_connected(self, event):
        self.refusals = 0
        return self._send_confirm()

    def _send_confirm(self):
        """Tell the cloud the certificate in use works, until it answers (a
        PUBACK only says the broker has it): then it retires the others."""
        unconfirmed = self.record.get("u")
        if unconfirmed is None or not self.online:
            return []
        self.confirm_nonce = self._nonce()
        self.confirm_ms = self.now_ms
        topic = device_topics(self.identity)[0]
        return [Publish(topic, request(OP_CONFIRM, self.confirm_nonce, fingerprint=unconfirmed), None)]

    def _confirm_answer(self, event):
        if self.confirm_nonce is None:
            return []
        try:
            answer = parse_answer(event.payload, self.confirm_nonce)
        except EnrollError as e:
            return [Log(e.code, e.message)]
        self.confirm_nonce = None
        self.record["u"] = None
        why = "" if answer.status == CONFIRMED else " (%s: %s)" % (answer.status, answer.reason)
        return [WriteAtomic(RECORD_FILE, encode_record(self.record)), Log("confirmed", self.identity + why)]

    def _enrolled_tick(self, event):
        now = self.cloud_ms(event.now_ms)
        if self.confirm_nonce is not None and event.now_ms - self.confirm_ms > self.config.answer_timeout_ms:
            return self._send_confirm()
        if event.now_ms < self.retry_at_ms:
            return []
        if now >= self.record["a"]["exp"]:
            self.retry_at_ms = event.now_ms + self.backoff.next_delay_ms()
            return self._begin(OP_RECOVER)
        if (now >= self.rotate_at_ms() or self.rotate_asked) and self.online:
            return self._begin(OP_ROTATE)
        return []

    def _rotate_now(self, event):
        """Ask at once if connected; otherwise as soon as the device is."""
        self.rotate_asked = True
        self.retry_at_ms = 0
        return [Log("rotate_requested", self.identity)] + (self._begin(OP_ROTATE) if self.online else [])

    def _enrolled_refused(self, event):
        self.refusals += 1
        if event.now_ms < self.retry_at_ms:
            return []
        if event.reason == "cert_expired" or self.refusals >= self.config.refusals_to_recover:
            self.retry_at_ms = event.now_ms + self.backoff.next_delay_ms()
            self.refusals = 0
            return [Log("identity_refused", event.reason)] + self._begin(OP_RECOVER)
        return []

    def _refused_while_busy(self, event):
        """A rotation under way whose active identity gets refused turns into
        a recovery; refusals of the claim endpoint just wait for the retry."""
        if self.purpose == OP_ROTATE and self.state in (WAITING, RETRY):
            return self._enrolled_refused(event)
        return []

    def _nonce(self):
        a, b = self.rng.randint(0, 0xFFFFFFFF), self.rng.randint(0, 0xFFFFFFFF)
        return bytes([(a >> s) & 0xFF for s in (24, 16, 8, 0)] + [(b >> s) & 0xFF for s in (24, 16, 8, 0)])
