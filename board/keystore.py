"""Device keystores for the CPython boards: the device makes its own ECDSA
P-256 key, signs with it, builds a CSR with it, and says honestly what
protects it (`capabilities`, reported to the cloud at enrollment).

    key = store.generate("identity")        -> public key, SEC1 uncompressed
    store.sign("identity", sha256_digest)   -> raw r || s (64 bytes)
    store.csr("identity", "acme/dev-1")     -> PEM CSR, signed on the device

`MemoryKeystore` (board.sim): the key object lives in memory and export is
refused. `FileKeystore` (board.linux): the key is encrypted at rest (PKCS#8,
AES-256 via the best encryption `cryptography` offers) in a 0600 file, and
is only ever decrypted inside the process: `tls_key()` gives paho/ssl the
encrypted file and its password, which ssl uses to decrypt it into the TLS
context. What it does not protect against: anyone who can read both the key
file and the key-encryption secret (kept in a separate 0600 file, ideally on
another partition or in a TPM); a PKCS#11 backend that keeps the key on a
token is the next step (docs/security.md).

`FlashKeystore` (board.sim, persistent): keys on the simulated flash, so
they survive power cuts like an ESP32's NVS. The ESP32 keystore
(board/esp32_keystore.py) signs with the portable agent/p256sign.py; the
PKCS#11 one (board/keystore_pkcs11.py) keeps the key on a token. What each
protects and what it does not: docs/keystores.md.
"""

import os
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


class KeyExportRefused(Exception):
    code = "key_export_refused"


def _public_bytes(key):
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def _raw_signature(der):
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class _Keystore:
    capabilities = {}

    def sign(self, name, digest):
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
        if len(digest) != 32:
            raise ValueError("sign takes a SHA-256 digest (32 bytes)")
        return _raw_signature(self._key(name).sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))

    def public_key(self, name):
        key = self._key(name, missing_ok=True)
        return None if key is None else _public_bytes(key)

    def csr(self, name, common_name):
        """A CSR signed by the device key; the cloud decides the identity."""
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        return builder.sign(self._key(name), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def csr_der(self, name, common_name):
        """The CSR as DER, the form the agent core sends (agent/enroll.py)."""
        csr = x509.load_pem_x509_csr(self.csr(name, common_name))
        return csr.public_bytes(serialization.Encoding.DER)

    def client_context(self, name, cert, cafile):
        """An mTLS client context (ssl) for the key in slot `name` and its
        certificate (DER or PEM). Python's ssl loads keys only from files: the
        key is written to a 0600 temporary file, loaded, and the file removed
        at once (sim and tests; a real board's TLS stack takes the key where
        it lives, see docs/keystores.md)."""
        import ssl
        import tempfile
        if not bytes(cert).lstrip().startswith(b"-----"):
            cert = x509.load_der_x509_certificate(bytes(cert)).public_bytes(serialization.Encoding.PEM)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile)
        with tempfile.TemporaryDirectory() as tmp:
            keyfile, certfile = os.path.join(tmp, "k.pem"), os.path.join(tmp, "c.pem")
            _write_private(keyfile, self._key(name).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            _write_private(certfile, bytes(cert))
            ctx.load_cert_chain(certfile, keyfile)
        return ctx

    def matches(self, name, cert):
        """True if the certificate (DER or PEM) is for the key in slot `name`."""
        data = bytes(cert)
        c = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(data)
        return self.public_key(name) == c.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    def export(self, name):
        raise KeyExportRefused("private keys never leave this keystore")


class MemoryKeystore(_Keystore):
    capabilities = {"non_exportable": True, "encrypted_at_rest": False, "hardware_backed": False}

    def __init__(self):
        self._keys = {}

    def generate(self, name):
        self._keys[name] = ec.generate_private_key(ec.SECP256R1())
        return _public_bytes(self._keys[name])

    def _key(self, name, missing_ok=False):
        if name not in self._keys and missing_ok:
            return None
        return self._keys[name]

    def delete(self, name):
        self._keys.pop(name, None)


class FlashKeystore(_Keystore):
    """board.sim with persistence: keys live on the simulated flash (so they
    survive reboots and power cuts, as in an ESP32's NVS), one atomic write
    per key; export refused. The flash is the model of secure storage."""
    capabilities = {"non_exportable": True, "encrypted_at_rest": False, "hardware_backed": False}
    PREFIX = "key-"

    def __init__(self, flash):
        self.flash = flash

    def generate(self, name):
        key = ec.generate_private_key(ec.SECP256R1())
        self.flash.write_atomic(self.PREFIX + name, key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return _public_bytes(key)

    def _key(self, name, missing_ok=False):
        blob = self.flash.read(self.PREFIX + name)
        if blob is None:
            if missing_ok:
                return None
            raise KeyError(name)
        return serialization.load_der_private_key(blob, password=None)

    def delete(self, name):
        if self.flash.read(self.PREFIX + name) is not None:
            self.flash.remove(self.PREFIX + name)


class FileKeystore(_Keystore):
    capabilities = {"non_exportable": False, "encrypted_at_rest": True, "hardware_backed": False}

    def __init__(self, root, kek_path=None):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.kek_path = kek_path or os.path.join(self.root, "kek")

    def _password(self):
        if not os.path.exists(self.kek_path):
            _write_private(self.kek_path, secrets.token_hex(32).encode())
        with open(self.kek_path, "rb") as f:
            return f.read().strip()

    def path(self, name):
        if not name or "/" in name or name.startswith("."):
            raise ValueError("bad key name %r" % (name,))
        return os.path.join(self.root, name + ".key")

    def generate(self, name):
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(self._password()))
        _write_private(self.path(name), pem)
        return _public_bytes(key)

    def _key(self, name, missing_ok=False):
        try:
            with open(self.path(name), "rb") as f:
                pem = f.read()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise
        return serialization.load_pem_private_key(pem, password=self._password())

    def tls_key(self, name):
        """(encrypted key file, password) for ssl.SSLContext.load_cert_chain."""
        return self.path(name), self._password()

    def delete(self, name):
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            pass


def _write_private(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
