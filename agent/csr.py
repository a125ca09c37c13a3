# A minimal PKCS#10 certificate signing request (RFC 2986) for a P-256 key,
# built in DER by hand, for runtimes without an X.509 library (MicroPython)
# and for keys that sign somewhere we cannot reach into (a PKCS#11 token).
# Runs unchanged on MicroPython and CPython; does no I/O and no signing.
#
#   info = request_info("acme/dev-1", public_key)    # DER to be signed
#   der = assemble(info, signer(sha256(info)))        # signer -> r || s
#   pem(der)                                          # b"-----BEGIN ..."
#
# or in one go: build(common_name, public_key, sign_digest).
#
# What it makes, and nothing more:
#
#   CertificationRequest ::= SEQUENCE {
#     certificationRequestInfo SEQUENCE {
#       version        INTEGER 0,
#       subject        Name: one RDN, commonName as UTF8String,
#       subjectPKInfo  id-ecPublicKey, prime256v1, BIT STRING 04 || x || y,
#       attributes     [0] IMPLICIT SET OF Attribute: empty },
#     signatureAlgorithm  ecdsa-with-SHA256 (no parameters, RFC 5758),
#     signature      BIT STRING holding Ecdsa-Sig-Value SEQUENCE { r, s } }
#
# The subject is only a hint: the cloud decides the identity
# (cloud.ca.CA.issue_from_csr). The public key is taken as given; it must
# be an uncompressed point (agent.p256.parse_public_key checks the curve).

import binascii
import hashlib

from agent.errors import LocalError
from agent.p256 import parse_public_key

COMMON_NAME_BYTES_MAX = 256
LENGTH_MAX = 0xFFFF        # two length bytes cover every CSR we make

# DER of the object identifiers we use, tag and length included.
OID_COMMON_NAME = b"\x06\x03\x55\x04\x03"                              # 2.5.4.3
OID_EC_PUBLIC_KEY = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"            # 1.2.840.10045.2.1
OID_PRIME256V1 = b"\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"           # 1.2.840.10045.3.1.7
OID_ECDSA_WITH_SHA256 = b"\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02"    # 1.2.840.10045.4.3.2

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
UTF8_STRING = 0x0C
CONTEXT_0 = 0xA0           # [0], constructed
CONTEXT_1 = 0xA1           # [1], constructed


class CSRError(LocalError):
    code = "csr"


# ---------------------------------------------------------------- DER

def tlv(tag, content):
    """One DER element: tag, definite length, content."""
    n = len(content)
    if n < 0x80:
        head = bytes([tag, n])
    elif n <= 0xFF:
        head = bytes([tag, 0x81, n])
    elif n <= LENGTH_MAX:
        head = bytes([tag, 0x82, n >> 8, n & 0xFF])
    else:
        raise CSRError("DER element of %d bytes is too long" % n, "too_long")
    return head + content


def integer(value):
    """DER INTEGER of a non-negative int: minimal, a 0x00 before a high bit."""
    if value < 0:
        raise CSRError("negative INTEGER", "bad_value")
    length = 1
    while value >> (8 * length):
        length += 1
    body = value.to_bytes(length, "big")
    if body[0] & 0x80:
        body = b"\x00" + body
    return tlv(INTEGER, body)


def bit_string(data):
    """DER BIT STRING of whole bytes (no unused bits)."""
    return tlv(BIT_STRING, b"\x00" + bytes(data))


def ec_algorithm():
    """AlgorithmIdentifier for a P-256 public key."""
    return tlv(SEQUENCE, OID_EC_PUBLIC_KEY + OID_PRIME256V1)


def subject_public_key_info(public_key):
    """SubjectPublicKeyInfo (RFC 5480) for an uncompressed P-256 point."""
    parse_public_key(public_key)     # 65 bytes, 04 || x || y, on the curve
    return tlv(SEQUENCE, ec_algorithm() + bit_string(public_key))


def name(common_name):
    """Name with one RDN holding one commonName (UTF8String)."""
    if not isinstance(common_name, str):
        raise CSRError("common name must be a str", "bad_name")
    value = common_name.encode("utf-8")
    if not 0 < len(value) <= COMMON_NAME_BYTES_MAX:
        raise CSRError("common name must be 1..%d bytes" % COMMON_NAME_BYTES_MAX, "bad_name")
    attribute = tlv(SEQUENCE, OID_COMMON_NAME + tlv(UTF8_STRING, value))
    return tlv(SEQUENCE, tlv(SET, attribute))


def ecdsa_signature(signature):
    """Ecdsa-Sig-Value DER from 64 bytes r || s."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
        raise CSRError("signature must be 64 bytes r || s", "bad_signature")
    r = int.from_bytes(bytes(signature[:32]), "big")
    s = int.from_bytes(bytes(signature[32:]), "big")
    return tlv(SEQUENCE, integer(r) + integer(s))


# ---------------------------------------------------------------- PKCS#10

def request_info(common_name, public_key):
    """CertificationRequestInfo DER: the bytes the key signs (SHA-256)."""
    return tlv(SEQUENCE, integer(0) + name(common_name)
               + subject_public_key_info(public_key) + tlv(CONTEXT_0, b""))


def assemble(info, signature):
    """CertificationRequest DER from request_info() and its r || s signature."""
    algorithm = tlv(SEQUENCE, OID_ECDSA_WITH_SHA256)
    return tlv(SEQUENCE, bytes(info) + algorithm + bit_string(ecdsa_signature(signature)))


def build(common_name, public_key, sign_digest):
    """CSR DER; sign_digest(sha256 digest) -> r || s is called once."""
    info = request_info(common_name, public_key)
    return assemble(info, sign_digest(hashlib.sha256(info).digest()))


def pem(der, label="CERTIFICATE REQUEST"):
    """PEM text (bytes) of DER: base64 in 64-character lines."""
    b64 = binascii.b2a_base64(der).replace(b"\n", b"")
    lines = [b"-----BEGIN " + label.encode() + b"-----"]
    for i in range(0, len(b64), 64):
        lines.append(b64[i:i + 64])
    lines.append(b"-----END " + label.encode() + b"-----")
    return b"\n".join(lines) + b"\n"
