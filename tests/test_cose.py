"""agent.cose: COSE_Sign1 / ES256 verification.

Messages are signed here with `cryptography` (sign1 below, CPython only)
and cross-checked with cbor2, an independent CBOR implementation. The fuzz
invariant: any bytes give a payload, CBORError or SignatureError, nothing
else, whether the bytes are random or a valid message mutated.
"""

import hashlib

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cbor, cose
from agent.errors import CBORError
from agent.p256 import SignatureError


# ------------------------------------------------------------ signing (tests only)

def private_key(d):
    return ec.derive_private_key(d, ec.SECP256R1())


def public_bytes(key):
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def sign1(payload, key, kid=None, protected=None, unprotected=None, external_aad=b"", tag=True):
    """A COSE_Sign1 message: ES256 over payload by a cryptography private key.

    protected/unprotected: header maps; by default {alg: ES256, kid: kid}
    in the protected header. The DER signature becomes raw r || s.
    """
    if protected is None:
        protected = {cose.LABEL_ALG: cose.ALG_ES256}
        if kid is not None:
            protected[cose.LABEL_KID] = kid
    protected_bytes = cbor.dumps(protected) if protected else b""
    to_be_signed = cbor.dumps(["Signature1", protected_bytes, external_aad, payload])
    r, s = decode_dss_signature(key.sign(to_be_signed, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    body = cbor.dumps([protected_bytes, unprotected or {}, payload, signature])
    return (b"\xd2" + body) if tag else body


KEY_A = private_key(0xA11CE)
KEY_B = private_key(0xB0B)
KEYS = {b"release-a": public_bytes(KEY_A), b"release-b": public_bytes(KEY_B)}
MANIFEST = cbor.dumps({"v": 1, "size": 1 << 20, "sha256": hashlib.sha256(b"image").digest()})


def replace_item(message, index, value):
    """The message with one of its four items replaced (tag kept)."""
    items = list(cbor2.loads(message).value)
    items[index] = value
    return cbor2.dumps(cbor2.CBORTag(18, items))


# ------------------------------------------------------------ round trips

def test_round_trip_tagged_and_untagged():
    for tag in (True, False):
        message = sign1(MANIFEST, KEY_A, b"release-a", tag=tag)
        assert cose.verify1(message, KEYS) == MANIFEST


def test_cbor2_agrees_on_the_layout():
    decoded = cbor2.loads(sign1(MANIFEST, KEY_B, b"release-b"))
    assert decoded.tag == 18
    protected, unprotected, payload, signature = decoded.value
    assert cbor2.loads(protected) == {1: -7, 4: b"release-b"}
    assert unprotected == {} and payload == MANIFEST and len(signature) == 64


def test_kid_in_the_unprotected_header():
    message = sign1(MANIFEST, KEY_B, protected={1: -7}, unprotected={4: b"release-b"})
    assert cose.verify1(message, KEYS) == MANIFEST


def test_no_kid_with_a_single_trusted_key():
    message = sign1(MANIFEST, KEY_A)
    assert cose.verify1(message, {b"only": public_bytes(KEY_A)}) == MANIFEST
    with pytest.raises(SignatureError) as caught:
        cose.verify1(message, KEYS)
    assert caught.value.code == "no_kid"


def test_external_aad_is_bound():
    message = sign1(MANIFEST, KEY_A, b"release-a", external_aad=b"class:esp32")
    assert cose.verify1(message, KEYS, b"class:esp32") == MANIFEST
    expect_code("bad_signature", message, KEYS, b"class:linux")


def test_other_protected_labels_are_ignored():
    message = sign1(MANIFEST, KEY_A, protected={1: -7, 4: b"release-a", 3: "application/cbor"})
    assert cose.verify1(message, KEYS) == MANIFEST


def test_start1_steps_like_verify1():
    payload, verifier = cose.start1(sign1(MANIFEST, KEY_A, b"release-a"), KEYS)
    assert payload == MANIFEST
    while not verifier.step(8):
        pass
    assert verifier.result() is True


# ------------------------------------------------------------ refusals

def expect_code(code, message, keys=KEYS, external_aad=b""):
    with pytest.raises(SignatureError) as caught:
        cose.verify1(message, keys, external_aad)
    assert caught.value.code == code, caught.value.message


def test_signed_by_another_key_under_a_trusted_kid():
    expect_code("bad_signature", sign1(MANIFEST, KEY_B, b"release-a"))


def test_unknown_kid():
    expect_code("unknown_kid", sign1(MANIFEST, private_key(5), b"intruder"))


def test_tampered_payload():
    message = sign1(MANIFEST, KEY_A, b"release-a")
    expect_code("bad_signature", replace_item(message, 2, MANIFEST + b"\x00"))
    assert MANIFEST[-1:] != b"\x01"
    expect_code("bad_signature", replace_item(message, 2, MANIFEST[:-1] + b"\x01"))


def test_tampered_protected_header():
    message = sign1(MANIFEST, KEY_A, b"release-a")
    other = cbor.dumps({1: -7, 4: b"release-a", 3: 0})
    expect_code("bad_signature", replace_item(message, 0, other))


def test_tampered_signature_bits():
    message = sign1(MANIFEST, KEY_A, b"release-a")
    signature = cbor2.loads(message).value[3]
    for bit in (0, 100, 255, 256, 511):
        flipped = bytearray(signature)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            cose.verify1(replace_item(message, 3, bytes(flipped)), KEYS)
        except SignatureError as error:  # bad_signature, or r/s pushed out of range
            assert error.code in ("bad_signature", "bad_signature_value")
        else:
            raise AssertionError("flipped bit %d verified" % bit)


def test_moving_the_kid_changes_the_signed_bytes():
    # a kid moved from protected to unprotected is a different message
    message = sign1(MANIFEST, KEY_A, b"release-a")
    moved = replace_item(replace_item(message, 0, cbor.dumps({1: -7})), 1, {4: b"release-a"})
    expect_code("bad_signature", moved)


@pytest.mark.parametrize("protected, unprotected", [
    ({1: -35}, {}),                 # ES384
    ({1: -8}, {}),                  # EdDSA
    ({1: "ES256"}, {}),
    ({1: -7.0}, {}),
    ({1: True}, {}),
    ({}, {1: -7}),                  # alg only unprotected
    ({3: 0}, {}),                   # no alg
])
def test_wrong_or_missing_alg(protected, unprotected):
    message = sign1(MANIFEST, KEY_A, protected=protected, unprotected=unprotected)
    expect_code("bad_alg", message)


def test_critical_headers_refused():
    expect_code("crit", sign1(MANIFEST, KEY_A, protected={1: -7, 2: [99], 4: b"release-a"}))


def test_label_in_both_buckets():
    expect_code("malformed", sign1(MANIFEST, KEY_A, b"release-a", unprotected={4: b"release-b"}))


@pytest.mark.parametrize("item", [
    [],
    [b"", {}, b""],
    [b"", {}, b"", b"", b""],
    {"a": 1},
    b"bytes",
    [cbor.dumps({1: -7}), [], MANIFEST, bytes(64)],       # unprotected not a map
    [{1: -7}, {}, MANIFEST, bytes(64)],                   # protected not a bstr
    [cbor.dumps({1: -7}), {}, None, bytes(64)],           # detached payload
    [cbor.dumps({1: -7}), {}, "text", bytes(64)],
    [cbor.dumps({1: -7}), {}, MANIFEST, "sig"],
    [cbor.dumps([1, -7]), {}, MANIFEST, bytes(64)],       # protected not a map
    [cbor.dumps({1: -7}), {4: "text"}, MANIFEST, bytes(64)],
])
def test_malformed_structures(item):
    expect_code("malformed", cbor.dumps(item))


def test_malformed_signature_values():
    protected = cbor.dumps({1: -7, 4: b"release-a"})
    for signature, code in ((bytes(64), "bad_signature_value"), (bytes(63), "bad_length"),
                            (b"\xff" * 64, "bad_signature_value")):
        expect_code(code, cbor.dumps([protected, {}, MANIFEST, signature]))


def test_not_bytes_and_oversized():
    expect_code("malformed", "text")
    expect_code("malformed", cbor.dumps([b"", {}, bytes(cose.MESSAGE_BYTES_MAX), b""]))


def test_non_cbor_raises_cbor_error():
    for data in (b"", b"\xd2", b"\xd2\xd2\x84", b"\x84\x40", b"\xff", b"\xd8\x12\x84\x40\xa0\x40\x40"):
        with pytest.raises(CBORError):
            cose.verify1(data, KEYS)


def test_protected_header_that_is_not_cbor():
    with pytest.raises(CBORError):
        cose.verify1(cbor.dumps([b"\xa1\x01", {}, MANIFEST, bytes(64)]), KEYS)


# ------------------------------------------------------------ fuzz

GOOD = sign1(MANIFEST, KEY_A, b"release-a")


def outcome(data):
    """The invariant: a payload, CBORError or SignatureError, nothing else."""
    try:
        return cose.verify1(data, KEYS)
    except (CBORError, SignatureError) as error:
        return error


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    assert not isinstance(outcome(data), bytes) or data in (GOOD, GOOD[1:])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(GOOD)))
def test_fuzz_mutated_good_message(edits, cut):
    data = bytearray(GOOD)
    for index, value in edits:
        data[index] = value
    data = bytes(data[:cut]) if cut < len(data) else bytes(data)
    result = outcome(data)
    if isinstance(result, bytes):  # only if the edits left the message intact
        assert data in (GOOD, GOOD[1:]) and result == MANIFEST


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64 - 1) | st.binary(max_size=70)
                    | st.text(max_size=10),
                    lambda children: st.lists(children, max_size=5)
                    | st.dictionaries(st.integers(-10, 10), children, max_size=4),
                    max_leaves=12))
def test_fuzz_structured_values(value):
    assert not isinstance(outcome(cbor.dumps(value)), bytes)
    if isinstance(value, list) and len(value) == 4 and isinstance(value[0], dict):
        value[0] = cbor.dumps(value[0])
        assert not isinstance(outcome(cbor.dumps(value)), bytes)
