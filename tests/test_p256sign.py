"""agent.p256sign, the portable ECDSA P-256 signer with RFC 6979 nonces,
against known answers and against the `cryptography` package.

1. Known answers typed in from RFC 6979 A.2.5 (P-256, SHA-256): the public
   key of the test private key, the nonces k and the signatures (r, s) for
   "sample" and "test", byte for byte.
2. Hypothesis, differential: for any private key and digest our public key
   equals cryptography's, and our signature equals cryptography's own
   RFC 6979 signature (deterministic_signing=True) exactly, and verifies
   with cryptography and with agent.p256.
3. Edge scalars for k * G (1, the window boundaries, n - 1, keys for which
   k + n is shorter than 257 bits), HMAC-SHA256 against the stdlib `hmac`,
   the nonce loop's later candidates against a straight transcription of
   RFC 6979 3.2 on the stdlib, key derivation from random bytes, the
   stepwise Signer, and every malformed input raising SigningError.
"""

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import p256, p256sign
from agent.p256 import N
from agent.p256sign import SigningError

PREHASHED_RFC6979 = ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True)

# RFC 6979 A.2.5
RFC_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
RFC_UY = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
RFC_CASES = [
    (b"sample",
     0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60,
     0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
     0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8),
    (b"test",
     0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0,
     0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
     0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083),
]


def key_bytes(d):
    return d.to_bytes(32, "big")


def their_public(d):
    key = ec.derive_private_key(d, ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def their_signature(d, digest):
    der = ec.derive_private_key(d, ec.SECP256R1()).sign(digest, PREHASHED_RFC6979)
    r, s = decode_dss_signature(der)
    return key_bytes(r) + key_bytes(s)


# ------------------------------------------------------------ known answers

def test_rfc6979_public_key():
    assert p256sign.public_key(key_bytes(RFC_X)) == b"\x04" + key_bytes(RFC_UX) + key_bytes(RFC_UY)


@pytest.mark.parametrize("message, k, r, s", RFC_CASES, ids=["sample", "test"])
def test_rfc6979_nonce_and_signature(message, k, r, s):
    digest = hashlib.sha256(message).digest()
    assert p256sign.Nonces(key_bytes(RFC_X), digest).next() == k
    assert p256sign.sign(key_bytes(RFC_X), digest) == key_bytes(r) + key_bytes(s)


# ------------------------------------------------------------ differential

scalars = st.integers(min_value=1, max_value=N - 1)
digests = st.binary(min_size=32, max_size=32)


@settings(max_examples=150, deadline=None)
@given(d=scalars, digest=digests)
def test_same_public_key_and_signature_as_cryptography(d, digest):
    public_key = p256sign.public_key(key_bytes(d))
    assert public_key == their_public(d)
    signature = p256sign.sign(key_bytes(d), digest)
    assert signature == their_signature(d, digest)               # exact: same RFC 6979 nonce
    assert p256.verify(public_key, digest, signature)


@settings(max_examples=100, deadline=None)
@given(key=st.binary(max_size=200), message=st.binary(max_size=300))
def test_hmac_sha256_matches_the_stdlib(key, message):
    assert p256sign.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()


EDGE_SCALARS = [1, 2, 3, 14, 15, 16, 17, 255, 256, 2 ** 224 - 1, 2 ** 224, 2 ** 255, 2 ** 256 - N - 1,
                2 ** 256 - N, 2 ** 256 - N + 1, N - 16, N - 15, N - 2, N - 1]


@pytest.mark.parametrize("d", EDGE_SCALARS)
def test_edge_scalars(d):
    assert p256sign.public_key(key_bytes(d)) == their_public(d)
    digest = hashlib.sha256(key_bytes(d)).digest()
    assert p256sign.sign(key_bytes(d), digest) == their_signature(d, digest)


@pytest.mark.parametrize("digest", [b"\x00" * 32, key_bytes(N), key_bytes(N - 1), b"\xff" * 32])
def test_edge_digests(digest):
    # digests at and above n are reduced mod n (bits2octets), as RFC 6979 says
    assert p256sign.sign(key_bytes(RFC_X), digest) == their_signature(RFC_X, digest)


def reference_nonces(x, digest, count):
    """RFC 6979 3.2 b-h for qlen = hlen = 256, transcribed on the stdlib."""
    def mac(key, data):
        return hmac.new(key, data, hashlib.sha256).digest()
    h1 = key_bytes(int.from_bytes(digest, "big") % N)
    v, k = b"\x01" * 32, b"\x00" * 32
    k = mac(k, v + b"\x00" + x + h1)
    v = mac(k, v)
    k = mac(k, v + b"\x01" + x + h1)
    v = mac(k, v)
    out = []
    while len(out) < count:
        v = mac(k, v)
        candidate = int.from_bytes(v, "big")
        if 0 < candidate < N:
            out.append(candidate)
        k = mac(k, v + b"\x00")
        v = mac(k, v)
    return out


@settings(max_examples=30, deadline=None)
@given(d=scalars, digest=digests)
def test_later_nonce_candidates_follow_rfc6979(d, digest):
    nonces = p256sign.Nonces(key_bytes(d), digest)
    assert [nonces.next() for _ in range(4)] == reference_nonces(key_bytes(d), digest, 4)


def test_nonce_candidates_are_bounded():
    nonces = p256sign.Nonces(key_bytes(RFC_X), b"\x00" * 32)
    for _ in range(p256sign.NONCE_TRIES_MAX):
        nonces.next()
    with pytest.raises(SigningError) as e:
        nonces.next()
    assert e.value.code == "nonce"


# ------------------------------------------------------------ keys from random bytes

def test_private_key_from_random_bytes():
    assert p256sign.private_key_from_random(b"\x00" * 40) == key_bytes(1)
    assert p256sign.private_key_from_random(key_bytes(N - 2).rjust(40, b"\x00")) == key_bytes(N - 1)
    assert p256sign.private_key_from_random(key_bytes(N - 1).rjust(40, b"\x00")) == key_bytes(1)
    assert p256sign.private_key_from_random(b"\xff" * 48) == key_bytes(int.from_bytes(b"\xff" * 48, "big") % (N - 1) + 1)
    with pytest.raises(SigningError):
        p256sign.private_key_from_random(b"\x01" * 39)
    with pytest.raises(SigningError):
        p256sign.private_key_from_random("x" * 40)


@settings(max_examples=50, deadline=None)
@given(random_bytes=st.binary(min_size=40, max_size=64))
def test_any_random_bytes_give_a_valid_key(random_bytes):
    private_key = p256sign.private_key_from_random(random_bytes)
    d = p256sign.parse_private_key(private_key)
    assert 0 < d < N
    assert p256sign.public_key(private_key) == their_public(d)


# ------------------------------------------------------------ steps and errors

@pytest.mark.parametrize("bits", [1, 4, 7, 16, 64, 256])
def test_signer_in_steps_gives_the_one_shot_signature(bits):
    digest = hashlib.sha256(b"steps").digest()
    signer = p256sign.Signer(key_bytes(RFC_X), digest)
    with pytest.raises(SigningError):
        signer.result()
    steps = 1
    while not signer.step(bits):
        steps += 1
    windows_per_step = -(-bits // 4)                              # whole 4-bit windows
    assert steps == -(-64 // windows_per_step)
    assert signer.result() == p256sign.sign(key_bytes(RFC_X), digest)
    assert signer.step(bits) is True                              # finished stays finished


@pytest.mark.parametrize("private_key", [b"", key_bytes(0), key_bytes(N), b"\xff" * 32, b"\x01" * 31,
                                         b"\x01" * 33, "x" * 32, None])
def test_malformed_private_keys_are_refused(private_key):
    with pytest.raises(SigningError):
        p256sign.sign(private_key, b"\x00" * 32)
    with pytest.raises(SigningError):
        p256sign.public_key(private_key)


@pytest.mark.parametrize("digest", [b"", b"\x00" * 31, b"\x00" * 33, "x" * 32, None])
def test_malformed_digests_are_refused(digest):
    with pytest.raises(SigningError):
        p256sign.sign(key_bytes(RFC_X), digest)


def test_multiplier_refuses_scalars_outside_the_group():
    for k in (0, N, N + 1, -1):
        with pytest.raises(SigningError):
            p256sign.Multiplier(k)


def test_the_window_table_holds_the_first_fifteen_multiples_of_g():
    from agent.p256 import GX, GY, _add, _to_affine
    assert p256sign.G_MULTIPLES[0] is None and len(p256sign.G_MULTIPLES) == 16
    acc = None
    for i in range(1, 16):
        acc = (GX, GY, 1) if acc is None else _add(GX, GY, acc)   # agent.p256's own additions
        assert p256sign.G_MULTIPLES[i] == _to_affine(acc)
        assert p256sign.encode_point(p256sign.G_MULTIPLES[i]) == their_public(i)
