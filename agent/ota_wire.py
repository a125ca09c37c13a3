# The firmware-update messages between a device and the cloud's OTA service
# (docs/ota.md): deterministic CBOR maps {v, op, ...fields}, every field of
# an op required and no other allowed, each value of a fixed kind. Portable
# (MicroPython subset, no I/O): the device and the cloud parse with the
# same code.

from agent import cbor
from agent import manifest as mf
from agent.errors import CBORError, RemoteError

VERSION = 1
UP_BYTES_MAX = 512                  # a device message (hello, report, chunk or page request)
DOWN_BYTES_MAX = mf.BUNDLE_BYTES_MAX + 256
TEXT_CHARS_MAX = 64                 # hw class, version, site, ref
REASON_CHARS_MAX = 200
SEQ_END = 1 << 32
_TEXT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-+:/@"
# What a device may report (agent/updater.py's Report statuses).
STATUSES = ("downloading", "verified", "installed", "trial", "confirmed", "rolled_back", "rejected")

# op -> {field: kind}; every field is required and no other is allowed.
UP = {
    "hello": {"hw": "name", "ver": "name", "site": "name"},
    "report": {"st": "status", "why": "reason", "seq": "seq", "ref": "ref"},
    "chunk": {"ref": "name", "i": "index"},
    "page": {"ref": "name", "i": "page"},
}
DOWN = {
    "offer": {"ref": "name", "bundle": "bundle"},
    "chunk": {"ref": "name", "i": "index", "data": "data"},
    "page": {"ref": "name", "i": "page", "data": "data"},
    "cancel": {"ref": "name", "why": "reason"},
    "error": {"why": "name", "ref": "ref"},
    "welcome": {"now": "ms"},
}


class WireError(RemoteError):
    """A message refused, with a machine-readable code."""
    code = "ota"


# ---------------------------------------------------------------- the format

def encode(op, **fields):
    """One message (either direction) as deterministic CBOR."""
    msg = dict(fields, v=VERSION, op=op)
    return cbor.dumps(msg)


def parse(payload, table, bytes_max):
    """(op, fields) of a message, strictly: size first, then CBOR, then the
    op's exact fields and their kinds. WireError(code) otherwise."""
    if not isinstance(payload, (bytes, bytearray)):
        raise WireError("payload must be bytes", "bad_payload")
    if len(payload) > bytes_max:
        raise WireError("%d bytes is over %d" % (len(payload), bytes_max), "too_big")
    try:
        msg = cbor.loads(bytes(payload))
    except CBORError as e:
        raise WireError("not CBOR: %s" % e.message, "not_cbor")
    if not isinstance(msg, dict):
        raise WireError("a message is a CBOR map", "not_a_map")
    if msg.get("v") != VERSION:
        raise WireError("format version %r, expected %d" % (msg.get("v"), VERSION), "bad_version")
    op = msg.get("op")
    if not isinstance(op, str) or op not in table:
        raise WireError("unknown op %r" % (op,), "unknown_op")
    kinds = table[op]
    for name in msg:
        if name not in kinds and name not in ("v", "op"):
            raise WireError("%s has unknown field %r" % (op, name), "unknown_field")
    fields = {}
    for name in sorted(kinds):
        if name not in msg:
            raise WireError("%s has no %r" % (op, name), "missing_field")
        if not _ok(msg[name], kinds[name]):
            raise WireError("%s field %r has a bad value" % (op, name), "bad_field")
        fields[name] = msg[name]
    return op, fields


def _ok(value, kind):
    if kind in ("name", "ref"):
        if not isinstance(value, str) or len(value) > TEXT_CHARS_MAX:
            return False
        if kind == "name" and not value:
            return False
        return all(c in _TEXT_CHARS for c in value)
    if kind == "reason":
        return isinstance(value, str) and len(value) <= REASON_CHARS_MAX and \
            all(32 <= ord(c) < 127 for c in value)
    if kind == "status":
        return value in STATUSES
    if kind == "ms":
        return type(value) is int and 0 <= value < 1 << 53
    if kind == "seq":
        return type(value) is int and 0 <= value < SEQ_END
    if kind == "index":
        return type(value) is int and 0 <= value < mf.PAGED_CHUNKS_MAX
    if kind == "page":
        return type(value) is int and 0 <= value < mf.PAGES_MAX
    if kind == "bundle":
        return isinstance(value, bytes) and 0 < len(value) <= mf.BUNDLE_BYTES_MAX
    if kind == "data":
        return isinstance(value, bytes) and len(value) <= mf.CHUNK_BYTES
    return False


