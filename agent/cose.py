# COSE_Sign1 (RFC 9052 section 4.2) verification with ES256 only.
#
#   payload = verify1(message, keys)        # keys: {kid bytes: public key}
#
# message is COSE_Sign1: [protected: bstr, unprotected: map, payload: bstr,
# signature: bstr], untagged or with tag 18 (byte 0xd2, stripped here
# because agent.cbor refuses tags). The protected header must be a map
# holding alg = ES256 (-7); the kid may be in either header (it only picks
# the key: the signature decides). Without a kid, keys must hold exactly one
# key. The signature is ECDSA P-256 over SHA-256 of the Sig_structure
# ["Signature1", protected bytes as received, external_aad, payload], raw
# r || s (64 bytes).
#
# Errors: CBORError for bytes that are not CBOR, SignatureError (from
# agent.p256) for everything else, each with a code: malformed, bad_alg,
# crit, no_kid, unknown_kid, bad_signature, and agent.p256's codes for a
# malformed key or signature value.

import hashlib
from binascii import hexlify

from agent import cbor
from agent.p256 import SignatureError, Verifier

TAG_SIGN1 = 0xD2            # CBOR tag 18, one byte
LABEL_ALG = 1
LABEL_CRIT = 2
LABEL_KID = 4
ALG_ES256 = -7
CONTEXT = "Signature1"
MESSAGE_BYTES_MAX = 16384   # a manifest, not an image


def verify1(message, keys, external_aad=b""):
    """The payload of a COSE_Sign1 message signed by one of keys."""
    payload, verifier = start1(message, keys, external_aad)
    if not verifier.step(256) or not verifier.result():
        raise SignatureError("COSE_Sign1 signature does not verify", "bad_signature")
    return payload


def start1(message, keys, external_aad=b""):
    """Check everything but the signature: (payload, an agent.p256.Verifier).

    Step the verifier to the end and check result() before trusting the
    payload; verify1 does that in one go.
    """
    protected_bytes, protected, unprotected, payload, signature = decode1(message)
    alg = protected.get(LABEL_ALG)
    if type(alg) is not int or alg != ALG_ES256:
        raise SignatureError("protected alg must be ES256 (-7), not %r" % (alg,), "bad_alg")
    if LABEL_CRIT in protected:
        raise SignatureError("critical headers are not supported", "crit")
    key = _pick_key(protected, unprotected, keys)
    return payload, Verifier(key, _sig_structure_hash(protected_bytes, external_aad, payload),
                             signature)


def _sig_structure_hash(protected_bytes, external_aad, payload):
    """SHA-256 of cbor.dumps(["Signature1", protected, aad, payload]),
    hashed piece by piece: the payload (a manifest of up to 16 KiB) is not
    copied into an encoding of its own on a small heap."""
    h = hashlib.sha256(b"\x84")                     # an array of 4
    h.update(cbor.dumps(CONTEXT))
    h.update(cbor.dumps(bytes(protected_bytes)))
    h.update(cbor.dumps(bytes(external_aad)))
    head = bytearray(cbor.dumps(len(payload)))      # the payload's head: major type 0 ...
    head[0] |= 0x40                                 # ... made 2 (byte string), same length
    h.update(head)
    h.update(payload)
    return h.digest()


def decode1(message):
    """(protected bytes, protected map, unprotected map, payload, signature)."""
    if not isinstance(message, (bytes, bytearray)):
        raise SignatureError("COSE_Sign1 must be bytes", "malformed")
    if len(message) > MESSAGE_BYTES_MAX:
        raise SignatureError("COSE_Sign1 of %d bytes is over %d"
                             % (len(message), MESSAGE_BYTES_MAX), "malformed")
    if message and message[0] == TAG_SIGN1:
        message = memoryview(message)[1:]
    items = cbor.loads(message)
    if not isinstance(items, list) or len(items) != 4:
        raise SignatureError("COSE_Sign1 must be an array of 4 items", "malformed")
    protected_bytes, unprotected, payload, signature = items
    for value, what in ((protected_bytes, "protected header"), (payload, "payload"),
                        (signature, "signature")):
        if not isinstance(value, bytes):
            raise SignatureError("%s must be a byte string" % what, "malformed")
    if not isinstance(unprotected, dict):
        raise SignatureError("unprotected header must be a map", "malformed")
    protected = cbor.loads(protected_bytes) if protected_bytes else {}
    if not isinstance(protected, dict):
        raise SignatureError("protected header must encode a map", "malformed")
    for label in protected:
        if label in unprotected:
            raise SignatureError("header label %r is in both buckets" % (label,), "malformed")
    return protected_bytes, protected, unprotected, payload, signature


def _pick_key(protected, unprotected, keys):
    kid = protected.get(LABEL_KID, unprotected.get(LABEL_KID))
    if kid is None:
        if len(keys) != 1:
            raise SignatureError("no kid, and %d trusted keys to choose from" % len(keys), "no_kid")
        for only in keys:
            return keys[only]
    if not isinstance(kid, bytes):
        raise SignatureError("kid must be a byte string", "malformed")
    if kid not in keys:
        raise SignatureError("unknown kid %s" % kid_text(kid), "unknown_kid")
    return keys[kid]


def kid_text(kid):
    """A key id for a message: hex if it is bytes, else its repr (hostile input)."""
    if isinstance(kid, (bytes, bytearray)):
        return hexlify(kid).decode()
    return repr(kid)[:40]
