"""The PKCS#11 keystore against a real SoftHSM2 token (Debian `softhsm2`),
a fresh token per test in the test's own directory.

What the tests prove: the key is generated on the token with the
attributes that make it non-extractable (read back from the token, not
from our template); reading its value, wrapping it out under another key
and switching extractable back on are all refused by the token; signatures
and the CSR are made on the token and verify with the public key alone;
the cloud CA issues a certificate from that CSR (possession checked) and a
tampered CSR is refused; SoftHSM really does encrypt private objects at
rest; the capability flags say what SoftHSM is (software).

Skips when SoftHSM2 or python-pkcs11 is missing; fails instead under
TETHER_REQUIRE_ALL=1, like tests/mpy.py's require_micropython.
"""

import hashlib
import os
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from agent import csr, p256
from cloud.ca import CA
from cloud.errors import CAError

USER_PIN = "4821"
SO_PIN = "97531864"
LABEL = "tether-test"


def softhsm_unavailable_reason():
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is not installed (pip install python-pkcs11)"
    from board.keystore_pkcs11 import find_softhsm_module
    if find_softhsm_module() is None:
        return "libsofthsm2.so not found (apt-get install softhsm2)"
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is not on PATH (apt-get install softhsm2)"
    return None


def require_softhsm():
    """Skip the calling test if SoftHSM2 is unavailable; fail under CI."""
    reason = softhsm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("TETHER_REQUIRE_ALL") == "1":
        pytest.fail("SoftHSM2 required (TETHER_REQUIRE_ALL=1): " + reason)
    pytest.skip("SoftHSM2 unavailable: " + reason)


@pytest.fixture
def token(tmp_path, monkeypatch):
    """A freshly initialised SoftHSM2 token in tmp_path -> (module, token dir)."""
    require_softhsm()
    import pkcs11
    from board.keystore_pkcs11 import find_softhsm_module
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n" % tokens)
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL,
                    "--pin", USER_PIN, "--so-pin", SO_PIN], check=True, capture_output=True)
    module = find_softhsm_module()
    pkcs11.lib(module).reinitialize()    # SoftHSM reads SOFTHSM2_CONF at C_Initialize
    return module, tokens


@pytest.fixture
def store(token):
    from board.keystore_pkcs11 import Pkcs11Keystore
    with Pkcs11Keystore(token[0], LABEL, USER_PIN) as keystore:
        yield keystore


def verifies(public_key, digest, signature):
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))   # raises if not
    return True


def test_key_is_made_on_the_token_non_extractable_and_sensitive(store):
    store.generate("identity")
    assert store.key_attributes("identity") == {
        "SENSITIVE": True, "EXTRACTABLE": False, "TOKEN": True,
        "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True, "LOCAL": True}


def test_every_way_out_is_refused_by_the_token(store):
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from board.keystore import KeyExportRefused
    store.generate("identity")
    private = store.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="identity")
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        private[Attribute.VALUE]                                  # the scalar in clear
    wrapping = store.session.generate_key(KeyType.AES, 256, label="wrap", template={Attribute.WRAP: True})
    with pytest.raises(pkcs11.exceptions.KeyUnextractable):
        wrapping.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)   # encrypted out
    with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
        private[Attribute.EXTRACTABLE] = True                     # switch it back on
    with pytest.raises(KeyExportRefused):
        store.export("identity")
    assert store.key_attributes("identity")["EXTRACTABLE"] is False


def test_signatures_are_made_on_the_token_and_verify_with_the_public_key(store):
    public_key = store.generate("identity")
    digest = hashlib.sha256(b"challenge").digest()
    signature = store.sign("identity", digest)
    assert verifies(public_key, digest, signature)
    assert p256.verify(public_key, digest, signature)           # the device's own verifier too
    assert not p256.verify(public_key, hashlib.sha256(b"other").digest(), signature)
    assert store.public_key("identity") == public_key
    assert store.public_key("missing") is None


def test_csr_signed_on_the_token_is_accepted_by_the_ca(store, tmp_path):
    ca = CA.create(str(tmp_path / "ca"))
    public_key = store.generate("identity")
    pem = store.csr("identity", "whatever-the-device-claims")
    request = x509.load_pem_x509_csr(pem)
    assert request.is_signature_valid
    cert = x509.load_pem_x509_certificate(ca.issue_from_csr(pem, "acme", "dev-1"))
    assert cert.subject.rfc4514_string() == "CN=acme/dev-1"
    assert cert.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == public_key
    assert store.matches("identity", cert.public_bytes(Encoding.DER))
    store.generate("other")
    assert not store.matches("other", cert.public_bytes(Encoding.PEM))
    der = bytearray(store.csr_der("identity", "x"))
    der[-5] ^= 1                                                  # one bit of the signature
    with pytest.raises(CAError):
        ca.issue_from_csr(csr.pem(bytes(der)), "acme", "dev-1")


def test_generate_replaces_and_delete_removes(store):
    first = store.generate("identity")
    second = store.generate("identity")
    assert first != second
    assert store.public_key("identity") == second
    assert len(store._objects("identity")) == 2                   # one private, one public
    assert store.generate("other") not in (first, second)
    store.delete("identity")
    assert store.public_key("identity") is None
    assert store.public_key("other") is not None


def test_the_key_survives_a_new_session_and_needs_the_pin(token):
    import pkcs11
    from board.keystore_pkcs11 import Pkcs11Keystore
    with Pkcs11Keystore(token[0], LABEL, USER_PIN) as first:
        public_key = first.generate("identity")
    with Pkcs11Keystore(token[0], LABEL, USER_PIN) as again:
        digest = hashlib.sha256(b"after restart").digest()
        assert verifies(public_key, digest, again.sign("identity", digest))
    with pytest.raises(pkcs11.exceptions.PinIncorrect):
        Pkcs11Keystore(token[0], LABEL, "0000")


def test_softhsm_encrypts_private_objects_at_rest(token):
    """A private, sensitive EC key with a known scalar is imported, and the
    token's files are searched for that scalar: it must not be there. (The
    generated key cannot be searched for: nobody knows its value.) A public
    data object is the control: its value is found, so the search works."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters
    from board.keystore_pkcs11 import Pkcs11Keystore
    scalar = hashlib.sha256(b"a known test scalar").digest()
    marker = hashlib.sha256(b"a public control value").digest()
    with Pkcs11Keystore(token[0], LABEL, USER_PIN) as store:
        store.session.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC,
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1"),
            Attribute.VALUE: scalar, Attribute.LABEL: "imported"})
        store.session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: False,
            Attribute.VALUE: marker, Attribute.LABEL: "control"})
        capabilities = store.capabilities
    stored = b"".join(open(os.path.join(root, name), "rb").read()
                      for root, _, files in os.walk(token[1]) for name in files)
    assert marker in stored
    assert scalar not in stored
    assert capabilities["encrypted_at_rest"] is True


def test_capabilities_say_softhsm_is_software(token):
    from board.keystore_pkcs11 import Pkcs11Keystore, Pkcs11KeystoreError
    with Pkcs11Keystore(token[0], LABEL, USER_PIN) as store:
        assert store.capabilities == {"non_exportable": True, "encrypted_at_rest": True,
                                      "hardware_backed": False}
        with pytest.raises(Pkcs11KeystoreError):
            store.tls_key("identity")                             # ssl cannot take a token key
        with pytest.raises(Pkcs11KeystoreError):
            store.client_context("identity", b"", "ca.crt")
    with pytest.raises(Pkcs11KeystoreError):
        Pkcs11Keystore(token[0], LABEL, USER_PIN, hardware_backed=True)


def test_missing_softhsm_skips_but_fails_under_require_all(monkeypatch):
    require_softhsm()
    from board import keystore_pkcs11
    monkeypatch.setattr(keystore_pkcs11, "SOFTHSM_MODULE_PATHS", ("/nonexistent/libsofthsm2.so",))
    monkeypatch.setenv("TETHER_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception):
        require_softhsm()
    monkeypatch.setenv("TETHER_REQUIRE_ALL", "0")
    with pytest.raises(pytest.skip.Exception):
        require_softhsm()
