# ECDSA P-256 signing (FIPS 186-5, SEC 1) with RFC 6979 deterministic
# nonces, in pure Python, for boards whose runtime has no EC signing
# (MicroPython: hashlib.sha256 yes, hmac and ECDSA no). Runs unchanged on
# MicroPython and CPython; the point arithmetic is agent.p256's.
#
#   private_key = private_key_from_random(os.urandom(40))   # 32 bytes
#   public_key(private_key)        -> 65 bytes, 04 || x || y
#   sign(private_key, digest)      -> 64 bytes, r || s
#
# digest is SHA-256 of the message (32 bytes). Randomness is injected: the
# caller supplies the bytes (a board's hardware RNG, a seeded test), so a
# key made from the same bytes is the same key on every runtime. Signing
# needs no randomness at all: RFC 6979 derives the nonce k from the key and
# the digest with HMAC-SHA256, so a weak RNG at signing time cannot leak
# the key, and the same inputs give the same signature everywhere.
#
# Multiplier and Signer do the work in bounded pieces (step(bits)), like
# agent.p256.Verifier, so a driver can keep its loop turning and a heap
# that only collects between pieces stays small.
#
# NOT CONSTANT TIME. Python integers take time that depends on their
# values (MicroPython's mpz too), pow() for the inversions is a
# square-and-multiply, and a garbage collection can land anywhere. What we
# do: the scalar is padded to a fixed length (k + n or k + 2n, always 257
# bits) and every 4-bit window costs four doublings and one addition, also
# when the window is zero, so the sequence of point operations does not
# depend on the key. What remains is the time of each operation. Someone
# who can time many signatures closely (a shared host, a probe on the
# board) may learn about the nonces and from them the key. docs/keystores.md
# says where that matters.

import hashlib

from agent.errors import LocalError
from agent.p256 import GX, GY, N, _add, _double, _to_affine

PRIVATE_KEY_LEN = 32
RANDOM_LEN_MIN = 40       # FIPS 186-5 A.2.1: 64 bits more than n has
DIGEST_LEN = 32
WINDOW_BITS = 4
WINDOWS = 64              # 256 bits below the fixed top bit of k + n or k + 2n
NONCE_TRIES_MAX = 8       # each retry has probability about 2^-32
HMAC_BLOCK = 64


class SigningError(LocalError):
    code = "signing"


# ---------------------------------------------------------------- keys

def private_key_from_random(random_bytes):
    """A private key (32 bytes) from at least 40 random bytes.

    FIPS 186-5 A.2.1 (extra random bits): d = (c mod (n - 1)) + 1, which
    is never 0 and needs no retry loop; its bias is below 2^-64."""
    if not isinstance(random_bytes, (bytes, bytearray)) or len(random_bytes) < RANDOM_LEN_MIN:
        raise SigningError("need at least %d random bytes" % RANDOM_LEN_MIN, "bad_random")
    d = int.from_bytes(bytes(random_bytes), "big") % (N - 1) + 1
    return d.to_bytes(PRIVATE_KEY_LEN, "big")


def parse_private_key(data):
    """The scalar d of a 32-byte private key, checked to be in 1..n-1."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != PRIVATE_KEY_LEN:
        raise SigningError("private key must be %d bytes" % PRIVATE_KEY_LEN, "bad_key")
    d = int.from_bytes(bytes(data), "big")
    if not 0 < d < N:
        raise SigningError("private key is outside 1..n-1", "bad_key")
    return d


def public_key(private_key):
    """65 bytes 04 || x || y: d * G for the private key."""
    mult = Multiplier(parse_private_key(private_key))
    while not mult.step(256):
        pass
    return encode_point(mult.result())


def encode_point(point):
    x, y = point
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


# ---------------------------------------------------------------- k * G

# i * G in affine coordinates for i = 1..15 (the window's addends), as
# constants: building them at run time costs 15 field inversions and, on a
# MicroPython heap that only collects between steps, more garbage than a
# whole signing step. tests/test_p256sign.py checks every one against
# cryptography and against agent.p256's own additions.
G_MULTIPLES = (
    None,
    (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
     0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5),
    (0x7CF27B188D034F7E8A52380304B51AC3C08969E277F21B35A60B48FC47669978,
     0x07775510DB8ED040293D9AC69F7430DBBA7DADE63CE982299E04B79D227873D1),
    (0x5ECBE4D1A6330A44C8F7EF951D4BF165E6C6B721EFADA985FB41661BC6E7FD6C,
     0x8734640C4998FF7E374B06CE1A64A2ECD82AB036384FB83D9A79B127A27D5032),
    (0xE2534A3532D08FBBA02DDE659EE62BD0031FE2DB785596EF509302446B030852,
     0xE0F1575A4C633CC719DFEE5FDA862D764EFC96C3F30EE0055C42C23F184ED8C6),
    (0x51590B7A515140D2D784C85608668FDFEF8C82FD1F5BE52421554A0DC3D033ED,
     0xE0C17DA8904A727D8AE1BF36BF8A79260D012F00D4D80888D1D0BB44FDA16DA4),
    (0xB01A172A76A4602C92D3242CB897DDE3024C740DEBB215B4C6B0AAE93C2291A9,
     0xE85C10743237DAD56FEC0E2DFBA703791C00F7701C7E16BDFD7C48538FC77FE2),
    (0x8E533B6FA0BF7B4625BB30667C01FB607EF9F8B8A80FEF5B300628703187B2A3,
     0x73EB1DBDE03318366D069F83A6F5900053C73633CB041B21C55E1A86C1F400B4),
    (0x62D9779DBEE9B0534042742D3AB54CADC1D238980FCE97DBB4DD9DC1DB6FB393,
     0xAD5ACCBD91E9D8244FF15D771167CEE0A2ED51F6BBE76A78DA540A6A0F09957E),
    (0xEA68D7B6FEDF0B71878938D51D71F8729E0ACB8C2C6DF8B3D79E8A4B90949EE0,
     0x2A2744C972C9FCE787014A964A8EA0C84D714FEAA4DE823FE85A224A4DD048FA),
    (0xCEF66D6B2A3A993E591214D1EA223FB545CA6C471C48306E4C36069404C5723F,
     0x878662A229AAAE906E123CDD9D3B4C10590DED29FE751EEECA34BBAA44AF0773),
    (0x3ED113B7883B4C590638379DB0C21CDA16742ED0255048BF433391D374BC21D1,
     0x9099209ACCC4C8A224C843AFA4F4C68A090D04DA5E9889DAE2F8EEFCE82A3740),
    (0x741DD5BDA817D95E4626537320E5D55179983028B2F82C99D500C5EE8624E3C4,
     0x0770B46A9C385FDC567383554887B1548EEB912C35BA5CA71995FF22CD4481D3),
    (0x177C837AE0AC495A61805DF2D85EE2FC792E284B65EAD58A98E15D9D46072C01,
     0x63BB58CD4EBEA558A24091ADB40F4E7226EE14C3A1FB4DF39C43BBE2EFC7BFD8),
    (0x54E77A001C3862B97A76647F4336DF3CF126ACBE7A069C5E5709277324D2920B,
     0xF599F1BB29F4317542121F8C05A2E7C37171EA77735090081BA7C82F60D0B375),
    (0xF0454DC6971ABAE7ADFB378999888265AE03AF92DE3A0EF163668C63E59B9D5F,
     0xB5B93EE3592E2D1F4E6594E51F9643E62A3B21CE75B5FA3F47E59CDE0D034F36),
)


class Multiplier:
    """k * G for 1 <= k < n, run as step(bits) calls until one returns True.

    Fixed 4-bit windows over k + n or k + 2n (whichever is 257 bits long):
    the top bit starts the accumulator at G, then 64 windows of four
    doublings and one addition; a zero window adds G to a throwaway point
    so that it costs the same."""

    def __init__(self, k):
        if not 0 < k < N:
            raise SigningError("scalar is outside 1..n-1", "bad_scalar")
        padded = k + N
        if not padded >> 256:
            padded += N
        self.k = padded
        self.table = G_MULTIPLES
        self.acc = (GX, GY, 1)
        self.window = WINDOWS
        self.point = None

    def step(self, bits):
        """Process about `bits` bits (whole windows); True once finished."""
        count = (bits + WINDOW_BITS - 1) // WINDOW_BITS
        end = max(self.window - count, 0)
        acc, k, table = self.acc, self.k, self.table
        for w in range(self.window - 1, end - 1, -1):
            acc = _double(_double(_double(_double(acc))))
            nibble = (k >> (w * WINDOW_BITS)) & 0xF
            addend = table[nibble] if nibble else table[1]
            added = _add(addend[0], addend[1], acc)
            if nibble:
                acc = added
        self.acc, self.window = acc, end
        if end == 0 and self.point is None:
            self.point = _to_affine(acc)
        return end == 0

    def result(self):
        """(x, y) of k * G."""
        if self.point is None:
            raise SigningError("multiplication is not finished", "unfinished")
        return self.point


# ---------------------------------------------------------------- signing

def sign(private_key, digest):
    """64 bytes r || s: the RFC 6979 ECDSA signature of a SHA-256 digest."""
    signer = Signer(private_key, digest)
    while not signer.step(256):
        pass
    return signer.result()


class Signer:
    """One signature, run as step(bits) calls until one returns True."""

    def __init__(self, private_key, digest):
        self.d = parse_private_key(private_key)
        if not isinstance(digest, (bytes, bytearray)) or len(digest) != DIGEST_LEN:
            raise SigningError("digest must be %d bytes (SHA-256)" % DIGEST_LEN, "bad_digest")
        self.e = int.from_bytes(bytes(digest), "big") % N
        self.nonces = Nonces(private_key, digest)
        self.signature = None
        self._next_nonce()

    def _next_nonce(self):
        self.k = self.nonces.next()
        self.mult = Multiplier(self.k)

    def step(self, bits):
        if self.signature is not None:
            return True
        if not self.mult.step(bits):
            return False
        r = self.mult.result()[0] % N
        s = pow(self.k, N - 2, N) * (self.e + r * self.d) % N
        if r == 0 or s == 0:          # RFC 6979 3.4: try the next k
            self._next_nonce()
            return False
        self.signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        self.k = self.d = None
        return True

    def result(self):
        if self.signature is None:
            raise SigningError("signing is not finished", "unfinished")
        return self.signature


class Nonces:
    """RFC 6979 section 3.2 nonces for P-256 with HMAC-SHA256 (qlen = hlen =
    256, so bits2int is plain big-endian and one HMAC block makes one
    candidate). At most NONCE_TRIES_MAX candidates, then SigningError."""

    def __init__(self, private_key, digest):
        x = bytes(private_key)
        h = (int.from_bytes(bytes(digest), "big") % N).to_bytes(32, "big")   # bits2octets
        v = b"\x01" * 32
        k = b"\x00" * 32
        k = hmac_sha256(k, v + b"\x00" + x + h)
        v = hmac_sha256(k, v)
        k = hmac_sha256(k, v + b"\x01" + x + h)
        self.v = hmac_sha256(k, v)
        self.key = k
        self.tries = 0

    def next(self):
        while self.tries < NONCE_TRIES_MAX:
            if self.tries:
                self.key = hmac_sha256(self.key, self.v + b"\x00")
                self.v = hmac_sha256(self.key, self.v)
            self.tries += 1
            self.v = hmac_sha256(self.key, self.v)
            candidate = int.from_bytes(self.v, "big")
            if 0 < candidate < N:
                return candidate
        raise SigningError("no usable nonce in %d tries" % NONCE_TRIES_MAX, "nonce")


def hmac_sha256(key, message):
    """HMAC-SHA256 (RFC 2104); MicroPython has no hmac module."""
    key = bytes(key)
    if len(key) > HMAC_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key + b"\x00" * (HMAC_BLOCK - len(key))
    inner = hashlib.sha256(bytes([b ^ 0x36 for b in key]))
    inner.update(message)
    outer = hashlib.sha256(bytes([b ^ 0x5C for b in key]))
    outer.update(inner.digest())
    return outer.digest()
