"""The identity core on the ESP32 (board/esp32_identity.py inside
board/esp32_agent.py), on CPython against the reference cloud whose
certificates live seconds (Cloud(cert_s=...)): the modules a board freezes,
with the ESP32's own keystore (board/esp32_keystore.py: the key made on
the device by the portable P-256 code, DER on its flash filesystem) and
CPython's ssl where a board has tls (the contexts below load the same DER).

- a fresh board enrolls by claim over its own link to the claim endpoint
  (the key made on the board, the CSR signed by it), proves the new
  certificate on the device endpoint, sends telemetry, then rotates before
  expiry over the agent's link: a new certificate for the key in the other
  slot, the old serial retired by the cloud, the old key erased, every
  record stored (none lost across the reconnects);
- a board off past its certificate's expiry recovers through the claim
  endpoint (the refusals of the expired certificate, then a request signed
  with the old key) and sends what it queued;
- a board without a claim certificate cannot enroll: it says so and sends
  nothing; its telemetry waits on the flash.
"""

import asyncio
import os
import ssl
import tempfile
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import enroll, telemetry
from board.esp32 import FlashStorage
from board.esp32_agent import Esp32Agent
from board import esp32_identity
from board.esp32_identity import Esp32Identity
from board.esp32_keystore import Esp32Keystore
from board.esp32_net import open_tls
from board.linux import SystemClock, SystemRng
from cloud.service import Cloud

from brokers import require_kind

BATCH = "line-7"
HWID = "esp-hw-1"
CERT_S = 12              # rotation at two thirds: about 8 s after enrollment
CONFIG = telemetry.Config(backoff_base_ms=100, backoff_cap_ms=800)


class Contexts:
    """TLS client contexts from DER, as MicroPython's tls loads them; CPython's
    ssl reads keys from files only: each is written to a 0600 temporary file,
    loaded and removed at once."""

    def __init__(self, cafile, keystore, claim_files):
        self.cafile, self.keystore, self.claim_files = cafile, keystore, claim_files

    def device(self, name, cert):
        key = serialization.load_der_private_key(self.keystore.tls_key_der(name), None)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        cert = bytes(cert)
        if not cert.lstrip().startswith(b"-----"):
            cert = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "id.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(cert + key_pem)
            return self._context(path, path)

    def claim(self):
        return None if self.claim_files is None else self._context(*self.claim_files)

    def _context(self, certfile, keyfile):
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.load_cert_chain(certfile, keyfile)
        return ctx


class Board:
    def __init__(self, cloud, root, claim_files):
        clock = SystemClock()
        os.makedirs(root, exist_ok=True)
        self.storage = FlashStorage(os.path.join(root, "id"))
        self.keystore = Esp32Keystore(FlashStorage(os.path.join(root, "keys")), os.urandom)
        core = enroll.Identity(enroll.Config(HWID, "claim:" + BATCH, self.keystore.capabilities,
                                             answer_timeout_ms=10000, backoff_base_ms=500,
                                             backoff_cap_ms=2000), SystemRng())
        self.logged = []
        ep = {"host": cloud.host, "device_port": cloud.port, "prov_port": cloud.prov_port}
        self.identity = Esp32Identity(core, self.storage, self.keystore,
                                      Contexts(cloud.ca_path, self.keystore, claim_files), ep,
                                      clock.ticks_ms, clock.now_ms, log=self.logged.append)
        self.agent = Esp32Agent("acme", "esp-1", FlashStorage(os.path.join(root, "data")), clock, SystemRng(),
                                lambda: open_tls(cloud.host, cloud.port, self.identity.device_context()),
                                config=CONFIG, log=self.logged.append, identity=self.identity)
        self.agent.boot()
        self.samples = 0
        self.busy_passes = 0        # passes with a key or signature being made in steps
        self.acked_while_busy = 0   # telemetry acknowledged on those passes

    def record(self):
        return self.identity.core.record

    def run(self, until, seconds, sample_every_s=0.1):
        end = time.monotonic() + seconds
        next_sample = 0.0
        while time.monotonic() < end:
            if until():
                return True
            if time.monotonic() >= next_sample:
                self.agent.sample({"n": self.samples})
                self.samples += 1
                next_sample = time.monotonic() + sample_every_s
            busy, acked = self.identity.busy(), self.agent.acked
            self.agent.step()
            if busy:
                self.busy_passes += 1
                self.acked_while_busy += self.agent.acked - acked
            time.sleep(0.005)
        return until()


def serial(cert):
    cert = bytes(cert)
    if cert.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(cert).serial_number
    return x509.load_der_x509_certificate(cert).serial_number


async def start_cloud(tmp_path, kind):
    require_kind(kind)
    c = Cloud(tmp_path / "cloud", cert_s=CERT_S, broker=kind)
    await c.start()
    c.claim = c.add_claim_batch(BATCH, 5, "factory-ops")
    c.provisioning.allow(HWID, BATCH, "acme", "esp-1", "site-1", "ops")
    return c


@pytest.fixture(params=["embedded", "mosquitto"])
async def cloud(tmp_path, request):
    c = await start_cloud(tmp_path, request.param)
    yield c
    await c.stop()


@pytest.fixture
async def embedded_cloud(tmp_path):
    """One broker is enough for a test that waits out a certificate's life."""
    c = await start_cloud(tmp_path, "embedded")
    yield c
    await c.stop()


async def test_a_fresh_esp32_enrolls_by_claim_then_rotates_and_loses_nothing(cloud, tmp_path):
    board = Board(cloud, str(tmp_path / "esp"), cloud.claim)
    enrolled = lambda: board.record().get("a") is not None and board.record().get("u") is None  # noqa: E731
    assert await asyncio.to_thread(board.run, enrolled, 30), board.logged[-10:]
    first = board.record()["a"]
    assert first["id"] == "acme/esp-1" and first["k"] == "id0"
    assert board.keystore.matches("id0", first["cert"])
    online = lambda: board.agent.link.state == "up" and board.agent.core.state == telemetry.ONLINE  # noqa: E731
    assert await asyncio.to_thread(board.run, online, 15), board.logged[-10:]

    def rotated():
        a = board.record()["a"]
        return a["k"] == "id1" and board.record().get("u") is None and \
            str(serial(first["cert"])) in {str(s) for s in cloud.registry.revoked_serials()}

    busy_before = board.busy_passes
    assert await asyncio.to_thread(board.run, rotated, 3 * CERT_S), board.logged[-10:]
    # the new key and its CSR were made in steps (a 4-bit window a pass: 64 + 1 + 64 passes)
    # while the loop went on and telemetry was acknowledged over the link
    assert board.busy_passes - busy_before >= 2 * (256 // esp32_identity.BITS_PER_PASS)
    assert board.acked_while_busy > 0
    assert board.keystore.public_key("id0") is None, "the old key is erased"
    assert board.keystore.matches("id1", board.record()["a"]["cert"])
    drained = lambda: not board.agent.core.queue and online()  # noqa: E731
    assert await asyncio.to_thread(board.run, drained, 15, 1.0)
    await cloud.ingest.stats()
    seqs = sorted(r["seq"] for r in cloud.store.tenant("acme").telemetry(device="esp-1")
                  if r["epoch"] == board.agent.core.epoch)
    assert seqs == list(range(len(seqs))) and len(seqs) >= board.samples - 1, "none lost"
    assert any("identity_proven" in line for line in board.logged)


async def test_without_a_claim_certificate_a_fresh_board_cannot_enroll_and_says_so(cloud, tmp_path):
    board = Board(cloud, str(tmp_path / "esp"), None)
    await asyncio.to_thread(board.run, lambda: False, 2)
    assert board.record().get("a") is None and board.agent.link.state == "down"
    assert any("no claim certificate" in line for line in board.logged)
    assert board.agent.core.queue, "telemetry waits on the flash"


async def test_an_esp32_off_past_its_certificate_recovers_through_the_claim_endpoint(embedded_cloud, tmp_path):
    """Off for the certificate's whole lifetime: the broker refuses the
    expired certificate, and the board re-enrolls over the claim endpoint,
    proving it holds the old certificate's key (a signature over the new
    CSR); its queued telemetry then goes out."""
    cloud = embedded_cloud
    root = str(tmp_path / "esp")
    board = Board(cloud, root, cloud.claim)
    assert await asyncio.to_thread(board.run, lambda: board.record().get("a") is not None
                                   and board.record().get("u") is None, 30), board.logged[-10:]
    first = board.record()["a"]
    board.agent.link.close("power off")
    board.agent.link.poll()
    await asyncio.sleep((first["exp"] - time.time() * 1000) / 1000 + 1.5)   # off past the expiry
    board = Board(cloud, root, cloud.claim)                                 # power on
    recovered = lambda: board.record()["a"]["cert"] != first["cert"] and board.record().get("u") is None  # noqa: E731
    assert await asyncio.to_thread(board.run, recovered, 40), board.logged[-15:]
    assert board.record()["a"]["id"] == "acme/esp-1"
    assert any(r["action"].startswith("recover") for r in cloud.registry.audit_rows(subject="acme/esp-1")), \
        [r["action"] for r in cloud.registry.audit_rows(subject="acme/esp-1")]
    online = lambda: board.agent.link.state == "up" and not board.agent.core.queue  # noqa: E731
    assert await asyncio.to_thread(board.run, online, 15, 1.0)
