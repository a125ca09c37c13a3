"""Provisioning by claim, rotation and recovery over real mTLS MQTT, on both
brokers, with the real cloud (cloud/service.py) and the agent's identity
core on the simulated board (board/enroller.py). Each control is also
attacked: claim certificates publishing telemetry or reading another
device's answer, claim or device certificates on the wrong endpoint, a
quota overrun, a retired certificate reused."""

import asyncio
import os
import time

import pytest

from agent import enroll, mqtt
from board.keystore import FlashKeystore
from board.sim import SimFlash, SimRng
from cloud import probe
from cloud.service import Cloud
from board.enroller import Enroller, IdentityBoard

from brokers import require_kind, wait_until

pytestmark = pytest.mark.parametrize("kind", ["embedded", "mosquitto"])


def clock_ms():
    return time.time_ns() // 1_000_000


@pytest.fixture
async def cloud(tmp_path, kind):
    require_kind(kind)
    c = Cloud(tmp_path / "cloud", broker=kind, cert_s=3600)
    await c.start()
    claim = c.add_claim_batch("b1", 3, "factory-ops")
    c.claim_files = claim
    yield c
    await c.stop()


def device(cloud, hwid, flash=None, seed=1):
    flash = flash or SimFlash()
    keystore = FlashKeystore(flash)
    core = enroll.Identity(enroll.Config(hwid, "claim:b1", keystore.capabilities, answer_timeout_ms=5000,
                                         backoff_base_ms=200, backoff_cap_ms=1000), SimRng(seed))
    return Enroller(core, IdentityBoard(flash, keystore), cloud.endpoints(), cloud.claim_files, clock_ms, hwid)


def allow(cloud, hwid, dev, approval=False, cert_s=None):
    cloud.provisioning.allow(hwid, "b1", "acme", dev, "plant-1", "ops", approval=approval, cert_s=cert_s)


async def test_a_device_enrolls_by_claim_and_connects_with_its_own_identity(cloud, kind):
    allow(cloud, "hw-1", "dev-1")
    dev = device(cloud, "hw-1")
    assert await dev.run(timeout_s=30), dev.log
    assert dev.core.identity == "acme/dev-1"
    # The device's confirmation (PUBACKed) reaches the provisioning service just after.
    assert await wait_until(lambda: cloud.provisioning.counts()["provisioned"] == 1)
    # The certificate it got works on the device endpoint and nowhere else.
    ctx_ok = dev.board.keystore.client_context(dev.core.record["a"]["k"], dev.core.record["a"]["cert"],
                                               cloud.ca_path)
    assert ctx_ok is not None
    assert [r["action"] for r in cloud.registry.audit_rows(subject="acme/dev-1")][-2:] == \
        ["provision", "provision_proven"]


async def test_approval_then_enrollment(cloud, kind):
    allow(cloud, "hw-2", "dev-2", approval=True)
    dev = device(cloud, "hw-2")
    task = asyncio.ensure_future(dev.run(timeout_s=30))
    assert await wait_until(lambda: cloud.provisioning.pending(), 15)
    assert not task.done()
    cloud.provisioning.approve("hw-2", "alice", "OPS-12")
    assert await task, dev.log
    assert dev.core.identity == "acme/dev-2"


async def test_claim_certificate_cannot_publish_telemetry_or_read_another_answer(cloud, kind):
    import cbor2
    allow(cloud, "hw-1", "dev-1")
    ep = cloud.endpoints()
    reader, writer, rc = await probe.connect(ep["host"], ep["prov_port"], cloud.ca_path,
                                             cloud.claim_files, "hw-evil")
    assert rc == 0
    writer.write(mqtt.subscribe(1, [("prov/claim:b1/hw-1/resp", 1), ("prov/+/+/resp", 1), ("#", 1)]))
    valid = cbor2.dumps({"v": 1, "k": "t", "d": "dev-1", "e": 0, "s": 0, "ts": 1_800_000_000_000,
                         "r": {"x": 1}}, canonical=True)
    for i, topic in enumerate(("t/acme/dev-1/telemetry", "t/claim:b1/telemetry",
                               "prov/claim:b1/hw-1/req", "t/acme/dev-1/enroll"), start=2):
        writer.write(mqtt.publish(topic, valid, 1, i))
    await writer.drain()
    # The real hw-1 enrolls meanwhile; the impostor must not see its answer.
    dev = device(cloud, "hw-1")
    assert await dev.run(timeout_s=30)
    parser, packets = mqtt.Parser(), []
    try:
        while True:
            data = await asyncio.wait_for(reader.read(4096), 1.0)
            if not data:
                break
            packets += parser.feed(data)
    except asyncio.TimeoutError:
        pass
    writer.close()
    assert not [p for p in packets if isinstance(p, mqtt.Publish)], "the impostor received a message"
    await cloud.ingest.stats()
    assert cloud.store.tenant("acme").count_telemetry(include_flagged=True) == 0
    assert cloud.provisioning.claim_usage("b1")["used"] == 1
    if kind == "embedded":  # Mosquitto drops denied publishes silently; its log has no record of them
        refused = {(r.identity, r.action, r.topic) for r in cloud.broker.refusals}
        assert ("claim:b1", "publish", "t/acme/dev-1/telemetry") in refused
        assert ("claim:b1", "subscribe", "#") in refused


async def test_endpoints_take_only_their_own_certificates(cloud, kind):
    allow(cloud, "hw-1", "dev-1")
    dev = device(cloud, "hw-1")
    assert await dev.run(timeout_s=30)
    ep = cloud.endpoints()
    # the claim certificate on the device endpoint, and a device's on the provisioning one
    assert await probe.accepted(ep["host"], ep["device_port"], cloud.ca_path, cloud.claim_files, "hw-1") is False
    cred_dir = os.path.join(cloud.data_dir, "devices")
    own = cloud.issue_device("acme", "dev-9")
    assert await probe.accepted(ep["host"], ep["prov_port"], cloud.ca_path,
                                (own.certfile, own.keyfile), "hw-9") is False
    assert os.path.isdir(cred_dir)


async def test_quota_caps_new_identities_per_claim_certificate(cloud, kind):
    for i in range(4):
        allow(cloud, "hw-%d" % i, "dev-%d" % i)
    results = []
    for i in range(4):
        dev = device(cloud, "hw-%d" % i, seed=i)
        results.append(await dev.run(timeout_s=8 if i == 3 else 30))
    assert results == [True, True, True, False]
    assert cloud.provisioning.claim_usage("b1") == {"quota": 3, "used": 3, "revoked": 0}
    assert cloud.registry.audit_rows(action="enroll_refused")[-1]["reason"] == "quota_exhausted"


async def test_rotation_over_the_broker_retires_the_old_certificate(cloud, kind):
    allow(cloud, "hw-1", "dev-1", cert_s=12)   # rotation due at 8 s
    flash = SimFlash()
    dev = device(cloud, "hw-1", flash=flash)
    assert await dev.run(timeout_s=30)
    old = dict(dev.core.record["a"])
    stolen = SimFlash()
    stolen.files.update({name: bytearray(data) for name, data in flash.files.items()})
    dev2 = device(cloud, "hw-1", flash=flash)
    assert await dev2.run(timeout_s=30, boot_blob=flash.read(enroll.RECORD_FILE),
                          until=lambda: dev2.proven() and dev2.core.record["a"]["cert"] != old["cert"]), dev2.log
    assert await wait_until(lambda: cloud.provisioning.counts()["rotated"] == 1)
    # The old certificate is refused from now on (embedded: serial check; Mosquitto: CRL + reload).
    from cryptography import x509
    assert dev2.board.keystore.public_key(old["k"]) is None  # the old key is erased on the device
    serial = x509.load_der_x509_certificate(old["cert"]).serial_number
    assert await wait_until(lambda: serial in cloud._serials, 5)
    # Someone who copied the old key and certificate before the rotation is refused.
    assert await wait_until_refused(cloud, FlashKeystore(stolen), old)
    assert cloud.registry.audit_rows(action="rotate")


async def wait_until_refused(cloud, keystore, slot, timeout_s=5):
    import tempfile
    from cryptography.hazmat.primitives import serialization
    from cryptography import x509
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = os.path.join(tmp, "k"), os.path.join(tmp, "c")
        with open(key, "wb") as f:
            f.write(keystore._key(slot["k"]).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        with open(cert, "wb") as f:
            f.write(x509.load_der_x509_certificate(slot["cert"]).public_bytes(serialization.Encoding.PEM))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await probe.accepted(cloud.host, cloud.port, cloud.ca_path, (cert, key), slot["id"]) is False:
                return True
            await asyncio.sleep(0.1)
    return False


async def test_a_certificate_that_expired_while_offline_is_recovered(cloud, kind):
    allow(cloud, "hw-1", "dev-1", cert_s=10)
    flash = SimFlash()
    dev = device(cloud, "hw-1", flash=flash)
    assert await dev.run(timeout_s=30)
    old = dev.core.record["a"]["cert"]
    await asyncio.sleep(10.5)  # switched off for its whole certificate lifetime
    dev2 = device(cloud, "hw-1", flash=flash)
    assert await dev2.run(timeout_s=40, boot_blob=flash.read(enroll.RECORD_FILE),
                          until=lambda: dev2.proven() and dev2.core.record["a"]["cert"] != old), dev2.log
    assert dev2.core.identity == "acme/dev-1"
    assert cloud.registry.audit_rows(action="recover_issued")
    assert await wait_until(lambda: cloud.provisioning.counts()["recovered"] == 1)
    assert cloud.provisioning.claim_usage("b1")["used"] == 1
