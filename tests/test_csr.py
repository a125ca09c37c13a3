"""agent.csr, the portable PKCS#10 builder, against `cryptography`.

1. The CertificationRequestInfo we build is byte for byte the one
   cryptography's CertificateSigningRequestBuilder signs, for any key and
   any common name (Hypothesis; names long enough for one- and two-byte
   DER lengths, and non-ASCII).
2. A CSR signed by agent.p256sign loads in cryptography with a valid
   signature, the right subject, key and algorithm, and PEM identical to
   cryptography's own re-encoding; the cloud CA issues from it; one changed
   bit of the signature or of the signed bytes is refused.
3. The DER pieces: INTEGER and Ecdsa-Sig-Value against cryptography's
   encoder, length boundaries, and refusals of what we do not build.
"""

import hashlib
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import csr, p256sign
from agent.csr import CSRError
from agent.p256 import N, SignatureError
from cloud.ca import CA
from cloud.errors import CAError

KEY = p256sign.private_key_from_random(hashlib.sha256(b"test_csr").digest() * 2)
PUBLIC = p256sign.public_key(KEY)


def sign_with_key(digest):
    return p256sign.sign(KEY, digest)


def public_bytes(key):
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


common_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64).filter(
    lambda s: 0 < len(s.encode("utf-8")) <= csr.COMMON_NAME_BYTES_MAX)


@settings(max_examples=60, deadline=None)
@given(common_name=common_names, seed=st.binary(min_size=40, max_size=40))
def test_request_info_is_what_cryptography_signs(common_name, seed):
    key = ec.derive_private_key(p256sign.parse_private_key(p256sign.private_key_from_random(seed)),
                                ec.SECP256R1())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribute = x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)
    theirs = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([attribute])).sign(key, hashes.SHA256())
    assert csr.request_info(common_name, public_bytes(key)) == theirs.tbs_certrequest_bytes


@pytest.mark.parametrize("length", [1, 10, 97, 110, 127, 128, 200, 256])
def test_csr_loads_in_cryptography_with_a_valid_signature(length):
    common_name = ("acme/" + "d" * length)[:length]
    der = csr.build(common_name, PUBLIC, sign_with_key)
    request = x509.load_der_x509_csr(der)
    assert request.is_signature_valid
    assert request.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                           # CNs over X.509's 64 (cloud/ca.py)
        assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
    assert public_bytes_of(request) == PUBLIC
    assert request.public_bytes(serialization.Encoding.DER) == der
    assert request.public_bytes(serialization.Encoding.PEM) == csr.pem(der)


def public_bytes_of(request):
    return request.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)


def test_the_ca_issues_from_it_and_refuses_tampering(tmp_path):
    ca = CA.create(str(tmp_path / "ca"))
    der = csr.build("anything", PUBLIC, sign_with_key)
    cert = x509.load_pem_x509_certificate(ca.issue_from_csr(csr.pem(der), "acme", "dev-1"))
    assert cert.subject.rfc4514_string() == "CN=acme/dev-1"
    assert cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint) == PUBLIC
    for index in (len(der) - 3, 30):          # inside the signature; inside the subject name
        tampered = bytearray(der)
        tampered[index] ^= 1
        with pytest.raises(CAError):
            ca.issue_from_csr(csr.pem(bytes(tampered)), "acme", "dev-1")
    other = csr.assemble(csr.request_info("x", PUBLIC),
                         p256sign.sign(p256sign.private_key_from_random(b"\x07" * 40), b"\x00" * 32))
    with pytest.raises(CAError):
        ca.issue_from_csr(csr.pem(other), "acme", "dev-1")   # someone else's signature


@settings(max_examples=200)
@given(r=st.integers(min_value=1, max_value=N - 1), s=st.integers(min_value=1, max_value=N - 1))
def test_ecdsa_signature_der_matches_cryptography(r, s):
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert csr.ecdsa_signature(raw) == encode_dss_signature(r, s)


@pytest.mark.parametrize("value, der", [
    (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"),
    (256, "02020100"), (2 ** 256 - 1, "022100" + "ff" * 32)])
def test_integer(value, der):
    assert csr.integer(value).hex() == der


@pytest.mark.parametrize("length, head", [(0, "0400"), (127, "047f"), (128, "048180"), (255, "0481ff"),
                                          (256, "04820100"), (65535, "0482ffff")])
def test_lengths(length, head):
    assert csr.tlv(csr.OCTET_STRING, b"\x00" * length)[:len(head) // 2].hex() == head


def test_refusals():
    with pytest.raises(CSRError):
        csr.tlv(csr.OCTET_STRING, b"\x00" * 65536)
    with pytest.raises(CSRError):
        csr.integer(-1)
    for bad_name in ("", "x" * (csr.COMMON_NAME_BYTES_MAX + 1), b"acme", None):
        with pytest.raises(CSRError):
            csr.request_info(bad_name, PUBLIC)
    for bad_signature in (b"", b"\x01" * 63, b"\x01" * 65, None):
        with pytest.raises(CSRError):
            csr.assemble(csr.request_info("x", PUBLIC), bad_signature)
    off_curve = PUBLIC[:-1] + bytes([PUBLIC[-1] ^ 1])
    for bad_key in (off_curve, PUBLIC[:33], b"\x02" + PUBLIC[1:]):
        with pytest.raises(SignatureError):
            csr.request_info("x", bad_key)
