# ECDSA P-256 signature verification (FIPS 186-5, SEC 1) in pure Python.
#
# Verify only: the device holds public keys and never signs. Runs unchanged
# on MicroPython and CPython (both have arbitrary-precision ints and 3-arg
# pow). Not constant-time, and it need not be: every input is public.
#
#   verify(public_key, digest, signature) -> True or False
#
# public_key: 65 bytes, an uncompressed SEC 1 point 04 || x || y.
# digest:     32 bytes, SHA-256 of the message (hashlib.sha256 by the caller).
# signature:  64 bytes, r || s big-endian (the COSE / JWS form, not DER).
#
# A well-formed signature that does not match returns False; malformed input
# (wrong lengths, a point off the curve, r or s outside 1..n-1) raises
# SignatureError. Verifier does the same work in bounded pieces, so a driver
# can keep its loop turning (about a second on a small board) and a heap
# that only collects between pieces stays small.
#
# The point arithmetic is in Jacobian coordinates (x = X/Z^2, y = Y/Z^3,
# Z = 0 is the point at infinity), so there is one field inversion at the
# end. u1*G + u2*Q is computed with Shamir's trick: one doubling per bit,
# then an addition of G, Q or G+Q depending on the two scalars' bits.

from agent.errors import RemoteError


class SignatureError(RemoteError):
    code = "signature"


# Curve parameters (FIPS 186-5 / SEC 2, secp256r1): y^2 = x^3 - 3x + b mod P.
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5

PUBLIC_KEY_LEN = 65
SIGNATURE_LEN = 64
DIGEST_LEN = 32
BITS = 256
INFINITY = (1, 1, 0)


def verify(public_key, digest, signature):
    """True if signature is a valid ECDSA P-256 signature of digest."""
    verifier = Verifier(public_key, digest, signature)
    while not verifier.step(BITS):
        pass
    return verifier.result()


class Verifier:
    """One verification, run as step(bits) calls until one returns True."""

    def __init__(self, public_key, digest, signature):
        qx, qy = parse_public_key(public_key)
        self.r, s = parse_signature(signature)
        e = _parse_digest(digest) % N
        w = pow(s, N - 2, N)
        self.u1 = e * w % N
        self.u2 = self.r * w % N
        # addends indexed by (bit of u1) + 2 * (bit of u2); None adds nothing
        self.table = (None, (GX, GY), (qx, qy), _to_affine(_add(qx, qy, (GX, GY, 1))))
        self.acc = INFINITY
        self.bit = BITS
        self.valid = None

    def step(self, bits):
        """Process up to `bits` bits of the scalars; True once finished."""
        end = max(self.bit - bits, 0)
        acc, u1, u2, table = self.acc, self.u1, self.u2, self.table
        for i in range(self.bit - 1, end - 1, -1):
            acc = _double(acc)
            addend = table[((u1 >> i) & 1) | (((u2 >> i) & 1) << 1)]
            if addend is not None:
                acc = _add(addend[0], addend[1], acc)
        self.acc, self.bit = acc, end
        if end == 0 and self.valid is None:
            self.valid = _x_matches(acc, self.r)
        return end == 0

    def result(self):
        if self.valid is None:
            raise SignatureError("verification is not finished", "unfinished")
        return self.valid


# ---------------------------------------------------------------- parsing

def parse_public_key(data):
    """(x, y) of an uncompressed SEC 1 point that lies on the curve."""
    _check_bytes(data, PUBLIC_KEY_LEN, "public key")
    if data[0] != 4:
        raise SignatureError("public key is not an uncompressed point (04 || x || y)", "bad_key")
    x = int.from_bytes(data[1:33], "big")
    y = int.from_bytes(data[33:65], "big")
    if x >= P or y >= P:
        raise SignatureError("public key coordinate is not below p", "bad_key")
    if (y * y - (x * x * x - 3 * x + B)) % P:
        raise SignatureError("public key is not on the P-256 curve", "bad_key")
    # the cofactor is 1: every point on the curve is in the group of order N
    return x, y


def parse_signature(data):
    """(r, s) from 64 bytes r || s, each in 1..N-1."""
    _check_bytes(data, SIGNATURE_LEN, "signature")
    r = int.from_bytes(data[:32], "big")
    s = int.from_bytes(data[32:], "big")
    if not 0 < r < N or not 0 < s < N:
        raise SignatureError("signature r or s is outside 1..n-1", "bad_signature_value")
    return r, s


def _parse_digest(data):
    _check_bytes(data, DIGEST_LEN, "digest")
    return int.from_bytes(data, "big")


def _check_bytes(data, length, what):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SignatureError("%s must be bytes, not %s" % (what, type(data).__name__), "bad_type")
    if len(data) != length:
        raise SignatureError("%s must be %d bytes, not %d" % (what, length, len(data)), "bad_length")


# ---------------------------------------------------------------- points

def _double(point):
    """2 * point (dbl-2001-b, for a = -3). Infinity stays infinity (Z = 0)."""
    x1, y1, z1 = point
    delta = z1 * z1 % P
    gamma = y1 * y1 % P
    beta = x1 * gamma % P
    alpha = 3 * (x1 - delta) * (x1 + delta) % P
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y1 + z1) * (y1 + z1) - gamma - delta) % P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return x3, y3, z3


def _add(x2, y2, point):
    """point + (x2, y2), the second in affine coordinates (mixed addition)."""
    x1, y1, z1 = point
    if z1 == 0:
        return x2, y2, 1
    zz = z1 * z1 % P
    h = (x2 * zz - x1) % P          # U2 - X1
    r = (y2 * zz * z1 - y1) % P     # S2 - Y1
    if h == 0:
        if r == 0:                  # the same point: this is a doubling
            return _double((x2, y2, 1))
        return INFINITY             # point + (-point)
    hh = h * h % P
    hhh = h * hh % P
    v = x1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    y3 = (r * (v - x3) - y1 * hhh) % P
    return x3, y3, z1 * h % P


def _to_affine(point):
    """(x, y), or None for the point at infinity."""
    x, y, z = point
    if z == 0:
        return None
    zinv = pow(z, P - 2, P)
    zinv2 = zinv * zinv % P
    return x * zinv2 % P, y * zinv2 * zinv % P


def _x_matches(point, r):
    """ECDSA's final check: the affine x of point, reduced mod N, equals r."""
    affine = _to_affine(point)
    return affine is not None and affine[0] % N == r
