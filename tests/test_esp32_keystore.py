"""The ESP32 keystore (board/esp32_keystore.py): on CPython against
`cryptography`, `ssl` and the cloud CA, and on real MicroPython (the
WebAssembly port) in a 64 KiB heap.

What the tests prove:
- the key file is the ECPrivateKey DER that OpenSSL itself writes for the
  same key, so mbedTLS (MicroPython's tls) and OpenSSL load it; Python's
  ssl accepts it with the certificate the CA issued from the device's CSR
  (OpenSSL checks that key and certificate match);
- signatures verify with cryptography, the CSR is accepted by
  CA.issue_from_csr, export is refused, capabilities say what the build
  gives (nothing is claimed unless the integrator declares flash encryption);
- on MicroPython, keygen, signing and the CSR run in steps of one 4-bit
  window within HEAP_KB, and give the same bytes as CPython for the same
  seed (public key, key file, signature, CSR); the CA accepts the CSR made
  on MicroPython.
"""

import contextlib
import hashlib
import io
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from agent import csr, p256sign
from board.esp32 import FlashStorage
from board.esp32_keystore import Esp32Keystore, KeyExportRefused, KeystoreError, parse_key_der
from cloud.ca import CA
from cloud.errors import CAError
from mpy import require_micropython, run_micropython_report

HEAP_KB = 64
BITS_PER_STEP = 4          # one window: about 12 KB of garbage per step on this port
SEED = b"tether esp32 keystore test seed"
MESSAGE = b"tether esp32"
COMMON_NAME = "acme/esp-1"

# Portable: the same RNG runs on CPython and MicroPython, so one seed gives
# one key on both.
SEEDED = r'''
import hashlib

class SeededRandom:
    """random_bytes(n) from SHA-256 of seed || counter: a test RNG only."""

    def __init__(self, seed):
        self.seed = seed
        self.counter = 0

    def __call__(self, n):
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(4, "big")).digest()
            self.counter += 1
        return out[:n]
'''

# The steps, each a separate top-level run on MicroPython (garbage is
# collected between them); on CPython they run one after another.
STEPS = [
    "import gc, binascii",
    "from agent import csr",
    "from board.esp32 import FlashStorage",
    "from board.esp32_keystore import Esp32Keystore",
    SEEDED,
    "peak = [0]\n"
    "def mark():\n"
    "    if hasattr(gc, 'mem_alloc'):\n"
    "        peak[0] = max(peak[0], gc.mem_alloc())\n"
    "def hexed(data):\n"
    "    return binascii.hexlify(data).decode()\n"
    "store = Esp32Keystore(FlashStorage(KEYS_DIR), SeededRandom(SEED))\n"
    "job = store.generating('identity')\n"
    "mark()",
] + ["job.step(%d)\nmark()" % BITS_PER_STEP] * (256 // BITS_PER_STEP) + [
    "assert job.step(1)\n"
    "print('public', hexed(job.public_key))\n"
    "print('keyfile', hexed(hashlib.sha256(store.tls_key_der('identity')).digest()))\n"
    "job = store.signer('identity', hashlib.sha256(MESSAGE).digest())\n"
    "mark()",
] + ["job.step(%d)\nmark()" % BITS_PER_STEP] * (256 // BITS_PER_STEP) + [
    "assert job.step(1)\n"
    "print('signature', hexed(job.result()))\n"
    "info = csr.request_info(COMMON_NAME, store.public_key('identity'))\n"
    "job = store.signer('identity', hashlib.sha256(info).digest())\n"
    "mark()",
] + ["job.step(%d)\nmark()" % BITS_PER_STEP] * (256 // BITS_PER_STEP) + [
    "assert job.step(1)\n"
    "print('csr', hexed(csr.assemble(info, job.result())))\n"
    "print('peak', peak[0])",
]

# The one-shot methods, on MicroPython with a heap large enough to hold all
# their garbage (this port does not collect inside a run; a board does).
ONE_SHOT = [
    "import binascii",
    "from board.esp32 import FlashStorage",
    "from board.esp32_keystore import Esp32Keystore",
    SEEDED,
    "store = Esp32Keystore(FlashStorage(KEYS_DIR), SeededRandom(SEED))\n"
    "print('public', binascii.hexlify(store.generate('identity')).decode())",
    "print('signature', binascii.hexlify(store.sign('identity', hashlib.sha256(MESSAGE).digest())).decode())",
    "print('csr', binascii.hexlify(store.csr_der('identity', COMMON_NAME)).decode())",
    "print('pem', store.csr('identity', COMMON_NAME) == __import__('agent.csr').csr.pem("
    "store.csr_der('identity', COMMON_NAME)))",
]


def prelude(keys_dir):
    return "KEYS_DIR = %r\nSEED = %r\nMESSAGE = %r\nCOMMON_NAME = %r\n" % (keys_dir, SEED, MESSAGE, COMMON_NAME)


def run_on_cpython(steps, keys_dir):
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for step in [prelude(keys_dir)] + steps:
            exec(step, namespace)
    return out.getvalue()


def lines(stdout):
    """{'public': hex, ...} from the steps' output."""
    return dict(line.split(" ", 1) for line in stdout.splitlines())


def seeded_store(tmp_path, seed=SEED, **kwargs):
    namespace = {}
    exec(SEEDED, namespace)
    return Esp32Keystore(FlashStorage(str(tmp_path / "keys")), namespace["SeededRandom"](seed), **kwargs)


def verifies(public_key, digest, signature):
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    return True


# ------------------------------------------------------------ CPython

def test_key_file_is_the_der_openssl_writes(tmp_path):
    store = seeded_store(tmp_path)
    public_key = store.generate("identity")
    der = store.tls_key_der("identity")
    key = serialization.load_der_private_key(der, password=None)
    assert key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()) == der
    assert key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint) == public_key
    assert (tmp_path / "keys" / "identity.der").read_bytes() == der
    assert store.public_key("identity") == public_key


def test_signs_and_the_ca_issues_a_certificate_ssl_pairs_with_the_key(tmp_path):
    ca = CA.create(str(tmp_path / "ca"))
    store = seeded_store(tmp_path)
    public_key = store.generate("identity")
    digest = hashlib.sha256(b"challenge").digest()
    assert verifies(public_key, digest, store.sign("identity", digest))
    cert_pem = ca.issue_from_csr(store.csr("identity", "device-claims-this"), "acme", "esp-1")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.rfc4514_string() == "CN=acme/esp-1"
    cert_path, key_path = tmp_path / "device.crt", tmp_path / "device.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(csr.pem(store.tls_key_der("identity"), "EC PRIVATE KEY"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(str(cert_path), str(key_path))        # OpenSSL: key matches certificate
    assert store.matches("identity", cert_pem)
    assert store.matches("identity", cert.public_bytes(serialization.Encoding.DER))
    other = seeded_store(tmp_path, seed=b"another device")
    other.generate("other")
    assert not other.matches("other", cert_pem)
    assert not other.matches("missing", cert_pem)
    key_path.write_bytes(csr.pem(other.tls_key_der("other"), "EC PRIVATE KEY"))
    with pytest.raises(ssl.SSLError):
        context.load_cert_chain(str(cert_path), str(key_path))    # and refuses one that does not


def test_tampered_csr_is_refused(tmp_path):
    ca = CA.create(str(tmp_path / "ca"))
    store = seeded_store(tmp_path)
    store.generate("identity")
    der = bytearray(store.csr_der("identity", "x"))
    der[-4] ^= 1
    with pytest.raises(CAError):
        ca.issue_from_csr(csr.pem(bytes(der)), "acme", "esp-1")


def test_export_refused_and_capabilities_honest(tmp_path):
    store = seeded_store(tmp_path)
    store.generate("identity")
    with pytest.raises(KeyExportRefused):
        store.export("identity")
    assert store.capabilities == {"non_exportable": False, "encrypted_at_rest": False, "hardware_backed": False}
    declared = seeded_store(tmp_path, flash_encrypted=True)
    assert declared.capabilities == {"non_exportable": False, "encrypted_at_rest": True, "hardware_backed": False}


def test_generate_replaces_delete_removes_and_bad_files_are_refused(tmp_path):
    store = seeded_store(tmp_path)
    first = store.generate("identity")
    second = store.generate("identity")
    assert first != second and store.public_key("identity") == second
    store.delete("identity")
    assert store.public_key("identity") is None
    with pytest.raises(KeystoreError):
        store.sign("identity", b"\x00" * 32)
    store.generate("identity")
    data = bytearray((tmp_path / "keys" / "identity.der").read_bytes())
    for index in (0, 5, 40, len(data) - 70):       # header, length, curve, public key tag
        bad = bytearray(data)
        bad[index] ^= 0x40
        with pytest.raises(KeystoreError):
            parse_key_der(bytes(bad))
    with pytest.raises(KeystoreError):
        parse_key_der(bytes(data[:-1]))
    with pytest.raises(p256sign.SigningError):
        parse_key_der(bytes(data[:7]) + bytes(32) + bytes(data[39:]))   # d = 0
    with pytest.raises(ValueError):
        store.generate("../escape")


# ------------------------------------------------------------ MicroPython

def test_keygen_sign_and_csr_on_micropython_match_cpython(tmp_path):
    require_micropython()
    report = run_micropython_report(prelude("/keys"), heap_kb=HEAP_KB, modules=("agent", "board"),
                                    steps=STEPS, timeout_s=120)
    on_mpy = lines(report["stdout"])
    on_cpython = lines(run_on_cpython(STEPS, str(tmp_path / "keys")))
    print("MicroPython: %d steps, %.0f ms, heap peak %d bytes (gc.mem_alloc peak %s) in a %d KiB budget"
          % (len(STEPS) + 1, report["elapsed_ms"], report["heap_peak_bytes"], on_mpy["peak"], HEAP_KB))
    for name in ("public", "keyfile", "signature", "csr"):
        assert on_mpy[name] == on_cpython[name], name
    public_key = bytes.fromhex(on_mpy["public"])
    assert verifies(public_key, hashlib.sha256(MESSAGE).digest(), bytes.fromhex(on_mpy["signature"]))
    ca = CA.create(str(tmp_path / "ca"))
    cert = x509.load_pem_x509_certificate(
        ca.issue_from_csr(csr.pem(bytes.fromhex(on_mpy["csr"])), "acme", "esp-1"))
    assert cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint) == public_key


def test_one_shot_methods_on_micropython_match_the_steps(tmp_path):
    require_micropython()
    out = lines(run_micropython_report(prelude("/keys"), heap_kb=4096, modules=("agent", "board"),
                                       steps=ONE_SHOT, timeout_s=120)["stdout"])
    stepped = lines(run_on_cpython(STEPS, str(tmp_path / "keys")))
    assert out["public"] == stepped["public"]
    assert out["signature"] == stepped["signature"]
    assert out["csr"] == stepped["csr"]
    assert out["pem"] == "True"
