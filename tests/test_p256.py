"""agent.p256, the portable ECDSA P-256 verifier, against known answers and
against the `cryptography` package.

1. Known answers typed in from RFC 6979 A.2.5 (P-256, SHA-256, "sample" and
   "test").
2. Wycheproof-style edge cases built reproducibly here: s and n - s, the
   x-coordinate of R at or above n (r = x - n), a sum that is the point at
   infinity, scalars that make the ladder double inside an addition or pass
   through infinity, digests of 0, n and 2^256 - 1, coordinates >= p,
   points off the curve, every wrong length.
3. Hypothesis, differential: on every well-formed input our answer equals
   cryptography's; on malformed input we raise SignatureError, nothing else.

A tiny affine reference (REF_*) builds points cryptography will not: it
exists only to construct inputs, which cryptography then judges.
"""

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed, decode_dss_signature, encode_dss_signature)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import p256
from agent.p256 import B, GX, GY, N, P, SignatureError

G = (GX, GY)
PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


# ------------------------------------------------------------ helpers

def public_bytes(d):
    key = ec.derive_private_key(d, ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def point_bytes(x, y):
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def raw(r, s):
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign(d, digest):
    """Raw r || s signature of digest by private scalar d (RFC 6979 nonce)."""
    key = ec.derive_private_key(d, ec.SECP256R1())
    der = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True))
    return raw(*decode_dss_signature(der))


def theirs(public_key, digest, signature):
    """cryptography's verdict on well-formed input."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), digest, PREHASHED)
    except InvalidSignature:
        return False
    return True


def well_formed(public_key, digest, signature):
    """The spec's rules, written independently of agent.p256."""
    if len(public_key) != 65 or public_key[0] != 4 or len(digest) != 32 or len(signature) != 64:
        return False
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    except ValueError:
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    return 0 < r < N and 0 < s < N


def check_agrees(public_key, digest, signature):
    """The invariant. Returns the verdict (None for malformed)."""
    if not well_formed(public_key, digest, signature):
        with pytest.raises(SignatureError):
            p256.verify(public_key, digest, signature)
        return None
    ours = p256.verify(public_key, digest, signature)
    assert ours is theirs(public_key, digest, signature)
    return ours


def ref_add(a, b):
    """Affine addition on P-256; None is the point at infinity."""
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        slope = (3 * a[0] * a[0] - 3) * pow(2 * a[1], -1, P) % P
    else:
        slope = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (slope * slope - a[0] - b[0]) % P
    return x, (slope * (a[0] - x) - a[1]) % P


def ref_mul(k, point):
    result = None
    for bit in bin(k % N)[2:]:
        result = ref_add(result, result)
        if bit == "1":
            result = ref_add(result, point)
    return result


def ref_lift(x):
    """A point with this x, or None if x^3 - 3x + b is not a square mod p."""
    rhs = (x * x * x - 3 * x + B) % P
    y = pow(rhs, (P + 1) // 4, P)  # p = 3 mod 4
    return (x, y) if y * y % P == rhs else None


def crafted(u1, u2, d):
    """(public key, digest, signature) whose verification computes exactly
    u1*G + u2*Q with Q = d*G: choose r from R, then s = r/u2 and e = u1*s."""
    assert 0 < u2 < N and 0 <= u1 < N and 0 < d < N
    target = ref_mul(u1 + u2 * d, G)
    r = 1 if target is None else target[0] % N
    s = r * pow(u2, -1, N) % N
    e = u1 * s % N
    return public_bytes(d), e.to_bytes(32, "big"), raw(r, s)


# ------------------------------------------------------------ known answers

RFC6979_D = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_Q = point_bytes(0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6,
                        0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299)
RFC6979_SAMPLE = raw(0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
                     0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8)
RFC6979_TEST = raw(0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
                   0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083)
SAMPLE = hashlib.sha256(b"sample").digest()
TEST = hashlib.sha256(b"test").digest()


def test_rfc6979_key_matches_its_private_scalar():
    assert public_bytes(RFC6979_D) == RFC6979_Q


def test_rfc6979_signatures_verify():
    assert p256.verify(RFC6979_Q, SAMPLE, RFC6979_SAMPLE) is True
    assert p256.verify(RFC6979_Q, TEST, RFC6979_TEST) is True
    # and cryptography's RFC 6979 signer reproduces them
    assert sign(RFC6979_D, SAMPLE) == RFC6979_SAMPLE
    assert sign(RFC6979_D, TEST) == RFC6979_TEST


def test_rfc6979_signatures_do_not_cross():
    assert p256.verify(RFC6979_Q, TEST, RFC6979_SAMPLE) is False
    assert p256.verify(RFC6979_Q, SAMPLE, RFC6979_TEST) is False
    assert p256.verify(public_bytes(RFC6979_D + 1), SAMPLE, RFC6979_SAMPLE) is False


def test_generator_and_order():
    assert p256.parse_public_key(point_bytes(GX, GY)) == G
    assert ref_mul(N - 1, G) == (GX, P - GY)  # (n - 1) G = -G, so n G = infinity


def test_stepping_gives_the_same_answer_at_any_step_size():
    for bits in (1, 7, 8, 64, 255, 256, 1000):
        verifier = p256.Verifier(RFC6979_Q, SAMPLE, RFC6979_SAMPLE)
        steps = 1
        while not verifier.step(bits):
            steps += 1
        assert verifier.result() is True
        assert steps == -(-256 // bits)
        assert verifier.step(bits) is True and verifier.result() is True


def test_result_before_the_end_is_refused():
    verifier = p256.Verifier(RFC6979_Q, SAMPLE, RFC6979_SAMPLE)
    verifier.step(100)
    with pytest.raises(SignatureError) as caught:
        verifier.result()
    assert caught.value.code == "unfinished"


# ------------------------------------------------------------ edge cases

def test_s_and_n_minus_s_both_verify():
    r, s = int.from_bytes(RFC6979_SAMPLE[:32], "big"), int.from_bytes(RFC6979_SAMPLE[32:], "big")
    assert check_agrees(RFC6979_Q, SAMPLE, raw(r, N - s)) is True


def _x_at_or_above_n():
    x = N
    while ref_lift(x) is None:
        x += 1
    return ref_lift(x)


def test_r_is_x_minus_n_when_x_of_r_is_at_least_n():
    # R with n <= x < p; Q = R - G; s = r, e = s, so u1 = u2 = 1 and u1 G + u2 Q = R
    point = _x_at_or_above_n()
    q = ref_add(point, (GX, P - GY))
    r = point[0] - N
    key, digest = point_bytes(*q), r.to_bytes(32, "big")
    assert check_agrees(key, digest, raw(r, r)) is True
    assert check_agrees(key, digest, raw(r + 1, r)) is False
    with pytest.raises(SignatureError):  # r = x itself is >= n, so out of range
        p256.verify(key, digest, raw(point[0], r))


def test_sum_at_infinity_is_false():
    # Q = d G with u1 + u2 d = 0 mod n
    d = 7
    u2 = 5
    u1 = (-u2 * d) % N
    assert ref_mul(u1 + u2 * d, G) is None
    assert check_agrees(*crafted(u1, u2, d)) is False


@pytest.mark.parametrize("d", [1, 2, 3, N - 1, N - 2])
def test_small_keys_and_their_negations(d):
    for u1, u2 in ((1, 1), (N - 1, 1), (5, 7), (N - 8, 10), (2 ** 255, 2 ** 255), (3, N - 1)):
        assert check_agrees(*crafted(u1, u2, d)) in (True, False)


def test_ladder_doubles_inside_an_addition():
    # Q = G; prefixes of u1, u2 sum to (n + 1) / 2, so after the last doubling
    # the accumulator is G and adding G is a doubling
    u1, u2 = N - 8, 10
    assert check_agrees(*crafted(u1, u2, 1)) is True


def test_ladder_passes_through_infinity():
    # choose Q so that the top halves of the scalars sum to 0 mod n: the
    # accumulator is infinity after bit 128, and the low halves carry on
    high1, high2 = 0x1234567890ABCDEF1234567890ABCDEF, 0xFEDCBA0987654321FEDCBA0987654321
    d = -high1 * pow(high2, -1, N) % N
    u1, u2 = (high1 << 128) | 0xBEEF, (high2 << 128) | 0xCAFE
    assert ref_mul(high1 + high2 * d, G) is None
    assert check_agrees(*crafted(u1, u2, d)) is True
    # and when the whole sum is infinity: Q = G, u1 + u2 = n
    assert check_agrees(*crafted(N - 10, 10, 1)) is False


@pytest.mark.parametrize("e", [0, 1, N - 1, N, N + 1, 2 ** 256 - 1])
def test_digest_extremes(e):
    digest = e.to_bytes(32, "big")
    assert check_agrees(RFC6979_Q, digest, sign(RFC6979_D, digest)) is True


@pytest.mark.parametrize("r, s", [(0, 1), (1, 0), (0, 0), (N, 1), (1, N), (2 ** 256 - 1, 1), (1, 2 ** 256 - 1)])
def test_r_or_s_out_of_range_is_malformed(r, s):
    with pytest.raises(SignatureError) as caught:
        p256.verify(RFC6979_Q, SAMPLE, raw(r, s))
    assert caught.value.code == "bad_signature_value"


def test_r_and_s_at_their_limits_are_well_formed():
    for r, s in ((1, 1), (N - 1, N - 1), (1, N - 1)):
        assert check_agrees(RFC6979_Q, SAMPLE, raw(r, s)) is False


def _bad_keys():
    x, y = int.from_bytes(RFC6979_Q[1:33], "big"), int.from_bytes(RFC6979_Q[33:], "big")
    small = 0
    while ref_lift(small) is None:
        small += 1
    sx, sy = ref_lift(small)
    return [
        ("y + 1", point_bytes(x, (y + 1) % P), "bad_key"),
        ("x + 1", point_bytes((x + 1) % P, y), "bad_key"),
        ("zero", point_bytes(0, 0), "bad_key"),
        ("x + p", point_bytes(sx + P, sy), "bad_key"),
        ("y = p", point_bytes(x, P), "bad_key"),
        ("compressed prefix", b"\x02" + RFC6979_Q[1:], "bad_key"),
        ("hybrid prefix", b"\x06" + RFC6979_Q[1:], "bad_key"),
        ("compressed", b"\x03" + RFC6979_Q[1:33], "bad_length"),
        ("infinity", b"\x00", "bad_length"),
        ("short", RFC6979_Q[:-1], "bad_length"),
        ("long", RFC6979_Q + b"\x00", "bad_length"),
        ("empty", b"", "bad_length"),
        ("text", RFC6979_Q.hex(), "bad_type"),
    ]


@pytest.mark.parametrize("name, key, code", _bad_keys(), ids=[case[0] for case in _bad_keys()])
def test_bad_public_keys(name, key, code):
    with pytest.raises(SignatureError) as caught:
        p256.verify(key, SAMPLE, RFC6979_SAMPLE)
    assert caught.value.code == code


@pytest.mark.parametrize("digest, signature", [
    (SAMPLE[:31], RFC6979_SAMPLE), (SAMPLE + b"\x00", RFC6979_SAMPLE), (b"", RFC6979_SAMPLE),
    (hashlib.sha512(b"sample").digest(), RFC6979_SAMPLE),
    (SAMPLE, RFC6979_SAMPLE[:63]), (SAMPLE, RFC6979_SAMPLE + b"\x00"), (SAMPLE, b""),
    (SAMPLE, encode_dss_signature(int.from_bytes(RFC6979_SAMPLE[:32], "big"),
                                  int.from_bytes(RFC6979_SAMPLE[32:], "big"))),
    (None, RFC6979_SAMPLE), (SAMPLE, 12),
])
def test_wrong_lengths_and_types(digest, signature):
    with pytest.raises(SignatureError) as caught:
        p256.verify(RFC6979_Q, digest, signature)
    assert caught.value.code in ("bad_length", "bad_type")


def test_accepts_bytearray_and_memoryview():
    assert p256.verify(bytearray(RFC6979_Q), memoryview(SAMPLE), bytearray(RFC6979_SAMPLE)) is True


# ------------------------------------------------------------ differential

scalars = st.integers(min_value=1, max_value=N - 1)
special_scalars = st.one_of(
    scalars,
    st.sampled_from([1, 2, 3, N - 1, N - 2, (N + 1) // 2, 2 ** 128, 2 ** 255]),
    st.integers(min_value=1, max_value=2 ** 16),
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(d=special_scalars, message=st.binary(max_size=64),
       tamper=st.sampled_from(["none", "r", "s", "digest", "key", "neg_s", "swap"]),
       bit=st.integers(0, 255))
def test_differential_signed_then_tampered(d, message, tamper, bit):
    digest = hashlib.sha256(message).digest()
    key, signature = public_bytes(d), sign(d, digest)
    flip = (1 << bit).to_bytes(32, "big")
    r, s = signature[:32], signature[32:]
    if tamper == "r":
        signature = xor(r, flip) + s
    elif tamper == "s":
        signature = r + xor(s, flip)
    elif tamper == "digest":
        digest = xor(digest, flip)
    elif tamper == "key":
        key = key[:1] + xor(key[1:33], flip) + key[33:] if bit % 2 else key[:33] + xor(key[33:], flip)
    elif tamper == "neg_s":
        signature = r + (N - int.from_bytes(s, "big")).to_bytes(32, "big")
    elif tamper == "swap":
        signature = s + r
    verdict = check_agrees(key, digest, signature)
    if tamper in ("none", "neg_s"):
        assert verdict is True


@FAST
@given(u1=st.one_of(st.just(0), special_scalars), u2=special_scalars, d=special_scalars)
def test_differential_crafted_scalars(u1, u2, d):
    check_agrees(*crafted(u1, u2, d))


@FAST
@given(d=special_scalars, digest=st.binary(min_size=32, max_size=32),
       r=st.integers(0, 2 ** 256 - 1), s=st.integers(0, 2 ** 256 - 1))
def test_differential_random_signatures(d, digest, r, s):
    check_agrees(public_bytes(d), digest, raw(r, s))


@FAST
@given(key=st.one_of(st.binary(max_size=70), st.binary(min_size=64, max_size=64).map(lambda b: b"\x04" + b)),
       digest=st.binary(max_size=40), signature=st.binary(max_size=70))
def test_arbitrary_bytes_give_a_verdict_or_signature_error(key, digest, signature):
    check_agrees(key, digest, signature)


def xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))
