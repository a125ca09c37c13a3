"""A PKCS#11 keystore for the linux board: the P-256 key is generated on a
token, marked non-extractable and sensitive, and every signature (the CSR's
included) is made on the token. Same interface as board/keystore.py:

    store = Pkcs11Keystore(find_softhsm_module(), "tether", user_pin)
    store.generate("identity")              -> public key, 04 || x || y
    store.sign("identity", sha256_digest)   -> r || s (64 bytes, CKM_ECDSA)
    store.csr("identity", "acme/dev-1")     -> PEM CSR, signed on the token

`cryptography`'s CSR builder signs only with a key object it holds, so the
CSR is built by agent.csr (the CertificationRequestInfo in DER), its SHA-256
signed on the token, and the two assembled.

Tested against SoftHSM2 (Debian `softhsm2`), which is software: its token
lives in files under its token directory, with private objects encrypted
under a key derived from the user PIN. So for SoftHSM the capabilities are
non_exportable True (the token refuses to reveal or wrap the key: tests
read the attributes back and try), encrypted_at_rest True (by the PIN,
which this process must hold), hardware_backed False. A hardware module (a
TPM through tpm2-pkcs11, a secure element, an HSM) is the same code with
hardware_backed=True declared by whoever configures it; we refuse that
claim for SoftHSM.

What it cannot do: give the key to Python's ssl (so paho-mqtt) for mutual
TLS. ssl loads keys only from files. docs/keystores.md lists the ways round
that and what each backend protects.

One Pkcs11Keystore holds one logged-in session; use it from one thread at
a time and close() it when done.
"""

import hashlib
import os

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import MultipleObjectsReturned, NoSuchKey
from pkcs11.util.ec import encode_named_curve_parameters

from agent import csr
from board.keystore import KeyExportRefused

SOFTHSM_MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",                    # Debian, Ubuntu
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
NO_TLS = "Python's ssl (so paho-mqtt) cannot use a PKCS#11 key for TLS; see docs/keystores.md"
KEY_ID_BYTES = 16
PUBLIC_KEY_LEN = 65

# Attributes the private key must have after generation; generate() reads
# them back from the token and refuses a token that did not honour them.
PRIVATE_TEMPLATE = {
    Attribute.TOKEN: True,          # kept on the token, not a session object
    Attribute.PRIVATE: True,        # usable only after login
    Attribute.SENSITIVE: True,      # its value is never revealed in clear
    Attribute.EXTRACTABLE: False,   # cannot be wrapped out, even encrypted
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
PUBLIC_TEMPLATE = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.PRIVATE: False}
CHECKED = {
    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TOKEN: True,
    Attribute.ALWAYS_SENSITIVE: True, Attribute.NEVER_EXTRACTABLE: True, Attribute.LOCAL: True,
}


class Pkcs11KeystoreError(Exception):
    code = "pkcs11_keystore"


def find_softhsm_module():
    """Path of the SoftHSM2 PKCS#11 module, or None."""
    for path in SOFTHSM_MODULE_PATHS:
        if os.path.isfile(path):
            return path
    return None


class Pkcs11Keystore:
    def __init__(self, module_path, token_label, user_pin, hardware_backed=False):
        lib = pkcs11.lib(module_path)
        self.token = lib.get_token(token_label=token_label)
        if hardware_backed and "softhsm" in (self.token.manufacturer_id + self.token.model).lower():
            raise Pkcs11KeystoreError("SoftHSM is software: it is not hardware-backed")
        self.capabilities = {"non_exportable": True, "encrypted_at_rest": True,
                             "hardware_backed": bool(hardware_backed)}
        self.session = self.token.open(rw=True, user_pin=user_pin)

    def close(self):
        if self.session is not None:
            self.session.close()
            self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ keys

    def generate(self, name):
        """A new key on the token under label `name`, replacing any there
        (the old objects are destroyed only once the new key exists)."""
        old = self._objects(name)
        key_id = os.urandom(KEY_ID_BYTES)
        params = self.session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        public, private = params.generate_keypair(
            store=True, label=name, id=key_id,
            public_template=PUBLIC_TEMPLATE, private_template=PRIVATE_TEMPLATE)
        for attribute, want in CHECKED.items():
            if private[attribute] != want:
                private.destroy()
                public.destroy()
                raise Pkcs11KeystoreError("token did not keep %s = %s" % (attribute.name, want))
        for obj in old:
            obj.destroy()
        return _point(public[Attribute.EC_POINT])

    def public_key(self, name):
        try:
            key = self.session.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=name)
        except NoSuchKey:
            return None
        return _point(key[Attribute.EC_POINT])

    def delete(self, name):
        for obj in self._objects(name):
            obj.destroy()

    def export(self, name):
        raise KeyExportRefused("the key is non-extractable on the token")

    def tls_key(self, name):
        raise Pkcs11KeystoreError(NO_TLS)

    def client_context(self, name, cert, cafile):
        raise Pkcs11KeystoreError(NO_TLS)

    def matches(self, name, cert):
        """True if the certificate (DER or PEM) is for the key in slot `name`."""
        data = bytes(cert)
        loaded = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(data)
        return self.public_key(name) == loaded.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    def key_attributes(self, name):
        """What the token says about the private key (for reports and tests)."""
        key = self._private(name)
        return {attribute.name: key[attribute] for attribute in CHECKED}

    # ------------------------------------------------------------ signing

    def sign(self, name, digest):
        """r || s (64 bytes) of a SHA-256 digest, made on the token."""
        if len(digest) != 32:
            raise ValueError("sign takes a SHA-256 digest (32 bytes)")
        signature = self._private(name).sign(bytes(digest), mechanism=Mechanism.ECDSA)
        if len(signature) != 64:
            raise Pkcs11KeystoreError("token returned a %d-byte ECDSA signature" % len(signature))
        return signature

    def csr_der(self, name, common_name):
        """PKCS#10 CSR (DER): agent.csr builds it, the token signs it."""
        public_key = self.public_key(name)
        if public_key is None:
            raise Pkcs11KeystoreError("no key %r on the token" % (name,))
        info = csr.request_info(common_name, public_key)
        return csr.assemble(info, self.sign(name, hashlib.sha256(info).digest()))

    def csr(self, name, common_name):
        return csr.pem(self.csr_der(name, common_name))

    # ------------------------------------------------------------ lookup

    def _private(self, name):
        try:
            return self.session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=name)
        except NoSuchKey:
            raise Pkcs11KeystoreError("no key %r on the token" % (name,)) from None
        except MultipleObjectsReturned:
            raise Pkcs11KeystoreError("more than one key %r on the token" % (name,)) from None

    def _objects(self, name):
        found = []
        for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            found.extend(self.session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: name}))
        return found


def _point(ec_point):
    """04 || x || y from CKA_EC_POINT, which PKCS#11 wraps in a DER OCTET STRING."""
    data = bytes(ec_point)
    if len(data) == PUBLIC_KEY_LEN + 2 and data[:2] == b"\x04\x41":
        data = data[2:]
    if len(data) != PUBLIC_KEY_LEN or data[0] != 4:
        raise Pkcs11KeystoreError("unexpected CKA_EC_POINT from the token")
    return data
