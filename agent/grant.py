# Support-access grants: what lets a technician open the device's console.
#
#   g = grant.verify(message, keys, device_id, site, now_s, floor_s, revoked)
#
# A grant is a COSE_Sign1 (agent/cose.py, ES256) signed by the cloud's
# support-access key, external_aad GRANT_AAD, whose payload is a CWT-style
# CBOR map (RFC 8392 labels where one exists):
#
#   1 iss  "tether-support"          6 iat  issued at, s (UNIX)
#   2 sub  technician id (text)      7 cti  grant id (bstr, 8..32 bytes)
#   4 exp  not after, s              8 cnf  {1: COSE_Key} (RFC 8747): the
#   5 nbf  not before, s                    technician's P-256 public key
#   "role"    "viewer" | "technician" | "admin"
#   "devices" [device id, ...]  and/or  "site" site id (at least one)
#
# The device verifies it offline against pinned support keys ({kid: point}),
# then (agent/console.py) challenges the technician to sign a fresh nonce
# with the key in cnf: holding the grant file alone opens nothing.
#
# Time. The device clock may be wrong or set back by whoever holds the
# device, so "now" is max(device clock, floor_s), where floor_s is the
# highest time the device has from a trusted source: the iat of every grant
# or revocation list it verified (signed by the cloud), and the cloud's time
# when it last connected. The caller keeps floor_s on flash and raises it
# with raise_floor(). Setting the clock back therefore cannot revive a grant
# that expired before floor_s; setting it forward only refuses grants early.
# What remains: a device offline since before a grant expired, with its
# clock set back, accepts that grant until exp < floor_s. GRANT_SECONDS_MAX
# bounds how long that can be (grants are short), and the revocation list
# closes it when the device is next online.
#
# Verification is split like agent.cose: start() checks everything but the
# signature and returns (grant, verifier); step the verifier (bounded work
# per step on a small board), then finish() checks the result. verify() does
# all of it at once. Every refusal is a GrantError with a code.

import hashlib

from agent import cbor, cose
from agent.p256 import SignatureError, parse_public_key
from agent.errors import RemoteError

GRANT_AAD = b"tether-support-grant-v1"
REVOCATIONS_AAD = b"tether-support-revocations-v1"
ISSUER = "tether-support"

CLAIM_ISS = 1
CLAIM_SUB = 2
CLAIM_EXP = 4
CLAIM_NBF = 5
CLAIM_IAT = 6
CLAIM_CTI = 7
CLAIM_CNF = 8
CNF_COSE_KEY = 1
KTY_EC2 = 2
CRV_P256 = 1

VIEWER = "viewer"
TECHNICIAN = "technician"
ADMIN = "admin"
ROLE_RANK = {VIEWER: 1, TECHNICIAN: 2, ADMIN: 3}

GRANT_BYTES_MAX = 2048
GRANT_SECONDS_MAX = 7 * 24 * 3600     # a grant is for a visit, not a job
ID_CHARS_MAX = 64
DEVICES_MAX = 64
GID_BYTES_MIN = 8
GID_BYTES_MAX = 32
REVOKED_MAX = 512                     # grant ids a device keeps revoked
TIME_MAX = 1 << 40                    # seconds: far past any real date


class GrantError(RemoteError):
    code = "grant"


class Grant:
    """A parsed grant. Trust it only after finish()/verify() returned it."""
    __slots__ = ("gid", "technician", "role", "devices", "site", "nbf", "exp", "iat", "key")

    def __init__(self, gid, technician, role, devices, site, nbf, exp, iat, key):
        self.gid = gid
        self.technician = technician
        self.role = role
        self.devices = devices
        self.site = site
        self.nbf = nbf
        self.exp = exp
        self.iat = iat
        self.key = key        # the technician's 65-byte P-256 point

    def covers(self, device_id, site):
        if device_id in self.devices:
            return True
        return self.site is not None and site is not None and self.site == site


# ---------------------------------------------------------------- verifying

def verify(message, keys, device_id, site, now_s, floor_s=0, revoked=()):
    """The Grant in message if it is signed by one of keys and lets a
    technician into device_id (at site) now; GrantError otherwise."""
    g, verifier = start(message, keys)
    while not verifier.step(256):
        pass
    return finish(g, verifier, device_id, site, now_s, floor_s, revoked)


def start(message, keys):
    """(Grant, agent.p256.Verifier): everything checked but the signature."""
    if not isinstance(message, (bytes, bytearray)) or len(message) > GRANT_BYTES_MAX:
        raise GrantError("a grant is bytes, at most %d of them" % GRANT_BYTES_MAX, "malformed")
    try:
        payload, verifier = cose.start1(message, keys, GRANT_AAD)
        return parse(payload), verifier
    except GrantError:
        raise
    except SignatureError as e:
        raise GrantError("grant: " + e.message, e.code)
    except RemoteError as e:          # CBORError and kin: not a grant at all
        raise GrantError("grant is not well-formed: " + e.message, "malformed")


def finish(g, verifier, device_id, site, now_s, floor_s=0, revoked=()):
    if not verifier.result():
        raise GrantError("grant signature does not verify", "bad_signature")
    check(g, device_id, site, now_s, floor_s, revoked)
    return g


def check(g, device_id, site, now_s, floor_s=0, revoked=()):
    """The policy checks on a grant whose signature is verified."""
    if g.gid in revoked:
        raise GrantError("grant has been revoked", "revoked")
    if not g.covers(device_id, site):
        raise GrantError("grant does not cover device %s" % device_id, "wrong_device")
    now = effective_now(now_s, floor_s)
    if now < g.nbf:
        raise GrantError("grant is not valid before %d (now %d)" % (g.nbf, now), "not_yet_valid")
    if now >= g.exp:
        raise GrantError("grant expired at %d (now %d)" % (g.exp, now), "expired")


def effective_now(now_s, floor_s):
    """The device's idea of the time, never below the trusted floor."""
    return now_s if now_s > floor_s else floor_s


def raise_floor(floor_s, g):
    """The new trusted floor after verifying g (its iat is the cloud's word)."""
    return g.iat if g.iat > floor_s else floor_s


# ---------------------------------------------------------------- parsing

def parse(payload):
    """A Grant from a payload's bytes; GrantError for anything off-profile."""
    claims = cbor.loads(payload)
    if not isinstance(claims, dict):
        raise GrantError("grant payload must be a map", "malformed")
    if claims.get(CLAIM_ISS) != ISSUER:
        raise GrantError("grant issuer must be %r" % ISSUER, "malformed")
    gid = _bytes(claims, CLAIM_CTI, GID_BYTES_MIN, GID_BYTES_MAX, "grant id")
    technician = _ident(claims.get(CLAIM_SUB), "technician id")
    role = claims.get("role")
    if type(role) is not str or role not in ROLE_RANK:
        raise GrantError("grant role must be viewer, technician or admin", "bad_role")
    devices, site = _scope(claims)
    nbf, exp, iat = _time(claims, CLAIM_NBF), _time(claims, CLAIM_EXP), _time(claims, CLAIM_IAT)
    if not nbf < exp or exp - nbf > GRANT_SECONDS_MAX:
        raise GrantError("grant window must be 1 s to %d s" % GRANT_SECONDS_MAX, "malformed")
    return Grant(gid, technician, role, devices, site, nbf, exp, iat, _cnf_key(claims))


def _scope(claims):
    devices = claims.get("devices", [])
    site = claims.get("site")
    if not isinstance(devices, list) or len(devices) > DEVICES_MAX:
        raise GrantError("grant devices must be a list of at most %d" % DEVICES_MAX, "malformed")
    devices = [_ident(d, "device id") for d in devices]
    if site is not None:
        site = _ident(site, "site id")
    if not devices and site is None:
        raise GrantError("grant names no device and no site", "malformed")
    return devices, site


def _cnf_key(claims):
    cnf = claims.get(CLAIM_CNF)
    key = cnf.get(CNF_COSE_KEY) if isinstance(cnf, dict) else None
    if not isinstance(key, dict) or key.get(1) != KTY_EC2 or key.get(-1) != CRV_P256:
        raise GrantError("grant cnf must hold an EC2 P-256 COSE_Key", "malformed")
    x, y = key.get(-2), key.get(-3)
    if not isinstance(x, bytes) or not isinstance(y, bytes) or len(x) != 32 or len(y) != 32:
        raise GrantError("grant cnf key x and y must be 32 bytes each", "malformed")
    point = b"\x04" + x + y
    try:
        parse_public_key(point)
    except SignatureError:
        raise GrantError("grant cnf key is not on P-256", "malformed")
    return point


def _bytes(claims, label, low, high, what):
    value = claims.get(label)
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise GrantError("%s must be %d..%d bytes" % (what, low, high), "malformed")
    return value


def _ident(value, what):
    if type(value) is not str or not 0 < len(value) <= ID_CHARS_MAX:
        raise GrantError("%s must be text of 1..%d characters" % (what, ID_CHARS_MAX), "malformed")
    for ch in value:
        if ch <= " " or ch > "~":
            raise GrantError("%s must be printable ASCII without spaces" % what, "malformed")
    return value


def _time(claims, label):
    value = claims.get(label)
    if type(value) is not int or not 0 <= value < TIME_MAX:
        raise GrantError("grant time claim %d must be an integer of seconds" % label, "malformed")
    return value


# ---------------------------------------------------------------- revocations

REVOCATIONS_DIGEST_BYTES = 8


def revocations_digest(revoked):
    """A short digest of a revocation list's grant ids, in its order: what a
    device reports so the cloud sends the list only when it changed."""
    return hashlib.sha256(cbor.dumps(list(revoked))).digest()[:REVOCATIONS_DIGEST_BYTES]


def verify_revocations(message, keys, last_iat_s=0, applied=None):
    """(issued_at_s, [grant id, ...]) from a revocation list the support key
    signed: payload {6: iat, "revoked": [bstr, ...]}. The list replaces the
    device's; one older than the last applied (last_iat_s) is refused, since
    a replayed old list would un-revoke grants. In one go: a small board
    steps start_revocations' verifier and then calls revocations_body."""
    payload, verifier = start_revocations(message, keys)
    if not verifier.step(256) or not verifier.result():
        raise GrantError("revocation list: COSE_Sign1 signature does not verify", "bad_signature")
    return revocations_body(payload, last_iat_s, applied)


def start_revocations(message, keys):
    """(payload, agent.p256.Verifier): the list checked but for its signature.
    Trust nothing in payload until the verifier is stepped to a true result()."""
    if not isinstance(message, (bytes, bytearray)) or len(message) > cose.MESSAGE_BYTES_MAX:
        raise GrantError("a revocation list is bytes, at most %d" % cose.MESSAGE_BYTES_MAX, "malformed")
    try:
        return cose.start1(message, keys, REVOCATIONS_AAD)
    except RemoteError as e:
        raise GrantError("revocation list: " + e.message, e.code)


def revocations_body(payload, last_iat_s=0, applied=None):
    """(issued_at_s, [grant id, ...]) from a verified revocation list's payload.
    Refused as stale: older than the list applied (last_iat_s), or as old
    with other grant ids than the applied ones (the cloud never signs two
    different lists with one iat: cloud/support.py)."""
    try:
        body = cbor.loads(payload)
    except RemoteError as e:
        raise GrantError("revocation list: " + e.message, e.code)
    if not isinstance(body, dict):
        raise GrantError("revocation list must be a map", "malformed")
    iat = _time(body, CLAIM_IAT)
    revoked = body.get("revoked")
    if not isinstance(revoked, list) or len(revoked) > REVOKED_MAX:
        raise GrantError("revoked must be a list of at most %d" % REVOKED_MAX, "malformed")
    for gid in revoked:
        if not isinstance(gid, bytes) or not GID_BYTES_MIN <= len(gid) <= GID_BYTES_MAX:
            raise GrantError("a revoked grant id is malformed", "malformed")
    if iat < last_iat_s:
        raise GrantError("revocation list is older than the one applied", "stale")
    if iat == last_iat_s and applied is not None and list(revoked) != list(applied):
        raise GrantError("revocation list is as old as the one applied, with other ids", "stale")
    return iat, revoked
