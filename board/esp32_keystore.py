"""The ESP32 keystore under MicroPython: the device makes its own P-256 key
with the portable signer (agent.p256sign), keeps it in a file on the flash
filesystem, signs and builds its CSR with it (agent.csr), and hands the key
to the TLS stack as DER.

    store = Esp32Keystore(FlashStorage("/keys"), os.urandom)
    store.generate("identity")              -> public key, 04 || x || y
    store.sign("identity", sha256_digest)   -> r || s (64 bytes)
    store.csr("identity", "acme/dev-1")     -> PEM CSR (csr_der: DER)
    ctx.load_cert_chain(cert_der, store.tls_key_der("identity"))

The same interface as board/keystore.py (MemoryKeystore, FileKeystore), in
the MicroPython subset; it also runs on CPython (tests). Long work comes in
pieces too, for a driver that must keep its loop turning: generating(name)
and signer(name, digest) return objects with step(bits).

What protects the key, honestly (`capabilities`, docs/keystores.md):

- The key file is plain DER in the filesystem (LittleFS). It is encrypted
  at rest only if the firmware was built and the chip provisioned with
  flash encryption in release mode, together with secure boot v2 (without
  secure boot, new firmware can be flashed that reads the key through the
  transparent decryption). This module cannot tell from MicroPython, so the
  integrator states it: Esp32Keystore(..., flash_encrypted=True). Default
  False. NVS encryption (esp32.NVS on an encrypted NVS partition) is the
  alternative store for a key; this module uses the filesystem.
- Any code running on the device (the REPL over USB, if left enabled) can
  read the file: non_exportable is False. export() is refused, which only
  keeps the key out of our own code paths.
- Nothing is hardware-backed: the ESP32 has no key slot that mbedTLS could
  sign with here; the key is in RAM while signing or in the TLS context.
- Signing is pure Python and not constant time (agent/p256sign.py).
- os.urandom is the ESP32 hardware RNG, which is truly random only while
  Wi-Fi or Bluetooth is on (or the bootloader's entropy source is
  enabled): generate the key with the radio up.

Nothing here touches hardware at import time.
"""

import binascii
import hashlib

from agent import csr
from agent.p256sign import Multiplier, Signer, encode_point, parse_private_key, private_key_from_random

RANDOM_BYTES = 40
KEY_SUFFIX = ".der"

# ECPrivateKey (RFC 5915) for P-256, exactly as key_der() writes it:
# SEQUENCE { INTEGER 1, OCTET STRING d, [0] prime256v1, [1] BIT STRING Q }
_KEY_HEAD = b"\x30\x77\x02\x01\x01\x04\x20"
_KEY_MIDDLE = b"\xa0\x0a" + csr.OID_PRIME256V1 + b"\xa1\x44\x03\x42\x00"
KEY_DER_LEN = len(_KEY_HEAD) + 32 + len(_KEY_MIDDLE) + 65


class KeyExportRefused(Exception):
    code = "key_export_refused"


class KeystoreError(Exception):
    code = "keystore"


def key_der(private_key, public_key):
    """ECPrivateKey DER (RFC 5915) with curve and public key: what mbedTLS
    (MicroPython's tls) and OpenSSL load as an EC private key."""
    return csr.tlv(csr.SEQUENCE, csr.integer(1)
                   + csr.tlv(csr.OCTET_STRING, bytes(private_key))
                   + csr.tlv(csr.CONTEXT_0, csr.OID_PRIME256V1)
                   + csr.tlv(csr.CONTEXT_1, csr.bit_string(public_key)))


def parse_key_der(data):
    """(private key 32 bytes, public key 65 bytes) from key_der()'s layout."""
    if data is None or len(data) != KEY_DER_LEN or data[:len(_KEY_HEAD)] != _KEY_HEAD:
        raise KeystoreError("not a key this keystore wrote")
    d_end = len(_KEY_HEAD) + 32
    if data[d_end:d_end + len(_KEY_MIDDLE)] != _KEY_MIDDLE:
        raise KeystoreError("not a P-256 key this keystore wrote")
    private_key = bytes(data[len(_KEY_HEAD):d_end])
    parse_private_key(private_key)
    return private_key, bytes(data[d_end + len(_KEY_MIDDLE):])


class Esp32Keystore:
    """Keys as ECPrivateKey DER files in a storage (board.esp32.FlashStorage:
    read, write_atomic, remove); random_bytes(n) is the RNG."""

    def __init__(self, storage, random_bytes, flash_encrypted=False):
        self.storage = storage
        self.random_bytes = random_bytes
        self.capabilities = {"non_exportable": False, "encrypted_at_rest": bool(flash_encrypted),
                             "hardware_backed": False}

    # ------------------------------------------------------------ keys

    def generating(self, name):
        """A key generation to run with step(bits); writes the key when done."""
        return Generation(self, name, private_key_from_random(self.random_bytes(RANDOM_BYTES)))

    def generate(self, name):
        """Make a new key in slot `name` (replacing any) -> public key."""
        generation = self.generating(name)
        while not generation.step(256):
            pass
        return generation.public_key

    def public_key(self, name):
        data = self.storage.read(name + KEY_SUFFIX)
        return None if data is None else parse_key_der(data)[1]

    def delete(self, name):
        self.storage.remove(name + KEY_SUFFIX)

    def export(self, name):
        raise KeyExportRefused("private keys never leave this keystore")

    def matches(self, name, cert):
        """True if the certificate (DER or PEM) is for the key in slot `name`:
        its DER holds this key's SubjectPublicKeyInfo (no X.509 parser here)."""
        public_key = self.public_key(name)
        if public_key is None:
            return False
        data = bytes(cert)
        if data.lstrip().startswith(b"-----"):
            body = [line for line in data.split(b"\n") if line and not line.startswith(b"-----")]
            data = binascii.a2b_base64(b"".join(body))
        return csr.subject_public_key_info(public_key) in data

    def tls_key_der(self, name):
        """The key as DER for tls.SSLContext.load_cert_chain(cert, key): the
        one place it leaves this module, into mbedTLS on the same device."""
        data = self.storage.read(name + KEY_SUFFIX)
        parse_key_der(data)
        return data

    # ------------------------------------------------------------ signing

    def signer(self, name, digest):
        """An agent.p256sign.Signer for the key in slot `name` (step(bits))."""
        return Signer(self._private_key(name), digest)

    def sign(self, name, digest):
        """r || s (64 bytes), RFC 6979, of a SHA-256 digest."""
        signer = self.signer(name, digest)
        while not signer.step(256):
            pass
        return signer.result()

    def csr_der(self, name, common_name):
        """A PKCS#10 CSR (DER) signed by the key; the cloud decides the identity."""
        info = csr.request_info(common_name, self.public_key(name))
        return csr.assemble(info, self.sign(name, hashlib.sha256(info).digest()))

    def csr(self, name, common_name):
        return csr.pem(self.csr_der(name, common_name))

    def _private_key(self, name):
        data = self.storage.read(name + KEY_SUFFIX)
        if data is None:
            raise KeystoreError("no key %r" % (name,))
        return parse_key_der(data)[0]


class Generation:
    """d * G in pieces; the key file is written (atomically) at the end."""

    def __init__(self, store, name, private_key):
        self.store = store
        self.name = name
        self.private_key = private_key
        self.mult = Multiplier(parse_private_key(private_key))
        self.public_key = None

    def step(self, bits):
        if self.public_key is not None:
            return True
        if not self.mult.step(bits):
            return False
        public_key = encode_point(self.mult.result())
        self.store.storage.write_atomic(self.name + KEY_SUFFIX, key_der(self.private_key, public_key))
        self.private_key = None
        self.public_key = public_key
        return True
