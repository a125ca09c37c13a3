"""Security review of the device identity implementation (agent/enroll.py,
cloud/provision.py, cloud/provision_mqtt.py, the two brokers).

Each test here demonstrated one finding of a review (each failed before its
fix, see the commit that fixed them) and now guards against its return.
In-process tests use the real CA, Registry and Provisioning
(tests/enroll_harness.py); broker tests use the real Cloud on both brokers
(tests/test_provision_broker.py's fixture pattern)."""

import asyncio
import hashlib
import time

import pytest

from agent import cbor, enroll, mqtt
from agent.actions import UseIdentity
from board.keystore import MemoryKeystore
from cloud import probe
from cloud.ca import load_cert

from brokers import require_kind, wait_until
from enroll_harness import BATCH, CLAIM, Device, InProcessCloud, SimClock, enrolled


@pytest.fixture
def cloud(tmp_path):
    return InProcessCloud(tmp_path, SimClock(), cert_s=600)


def _ask(prov_call, payload, nonce):
    return enroll.parse_answer(prov_call(payload), nonce)


# -- 1. agent: one lost answer or one refused first connection bricks a device -------

class LossyDevice(Device):
    """The harness device, but the first claim answer the cloud sends is lost
    on the way (network drop, or the device reset before it arrived)."""

    drop_answers = 1

    def _deliver(self, action):
        if self.use is not None and self.use.name is None and self.drop_answers:
            self.drop_answers -= 1
            self.cloud.prov.on_claim(CLAIM, self.hwid, action.payload)  # the cloud issues...
            return                                                     # ...the answer never arrives
        return Device._deliver(self, action)


def test_reboot_between_claim_issued_and_answer_stored_strands_the_device(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = LossyDevice(cloud, "hw-1")
    dev.step()                                   # key made, claim sent, cloud issued, answer lost
    assert cloud.prov.claim_usage(BATCH)["used"] == 1
    dev.power_cycle()                            # e.g. a watchdog reset while waiting for it
    dev.run_until(enrolled(dev), steps_max=300)
    reasons = [r["reason"] for r in cloud.registry.audit_rows(action="enroll_refused")]
    assert enrolled(dev)(), "device stranded; the cloud answered %s" % reasons[-3:]


def test_one_refused_first_connection_after_claim_strands_the_device(cloud):
    cloud.allow("hw-1", "dev-1")
    real_refusal = cloud.refusal
    first = []

    def flaky(keystore, use):
        # One transient refusal of the brand-new certificate (TCP reset during
        # the handshake, broker reloading its CRL, clone lockout, ...).
        if use.name is not None and not first:
            first.append(use)
            return "closed"
        return real_refusal(keystore, use)
    cloud.refusal = flaky
    dev = Device(cloud, "hw-1")
    dev.run_until(enrolled(dev), steps_max=300)
    reasons = [r["reason"] for r in cloud.registry.audit_rows(action="enroll_refused")]
    assert enrolled(dev)(), "device stranded; the cloud answered %s" % reasons[-3:]


# -- 2. agent: one wrong cloud timestamp puts the device in a recovery loop forever ---

def test_one_far_future_cloud_timestamp_does_not_loop_recovery_forever(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    real_clock = cloud.prov.clock_ms
    glitch = {"on": True}
    # The cloud's clock is wrong (ten years ahead) for exactly one answer:
    # the claim answer. Everything after is correct again.
    cloud.prov.clock_ms = lambda: real_clock() + (10 * 365 * 86400 * 1000 if glitch["on"] else 0)
    dev.step()
    glitch["on"] = False
    dev.run_until(lambda: False, steps_max=900)  # 15 minutes of normal operation (one rotation due)
    counts = cloud.prov.counts()
    assert counts["recovered"] <= 1, "device recovered %d times in 15 minutes (%d certificates)" % (
        counts["recovered"], cloud.registry._db.execute("SELECT COUNT(*) FROM device_certs").fetchone()[0])


# -- 3. cloud: approval is bound to the hardware id, not to the requesting key -----

def test_approval_is_for_the_key_that_asked_not_anyone_with_the_claim_certificate(cloud):
    cloud.allow("hw-2", "dev-2", approval=True)
    legit, thief = MemoryKeystore(), MemoryKeystore()
    legit.generate("k")
    thief.generate("k")
    csr_l, csr_t = legit.csr_der("k", "x"), thief.csr_der("k", "x")
    n1, n2 = b"L" * 8, b"T" * 8
    # The real device asks; the operator sees "hw-2 pending" and approves it.
    a = _ask(lambda p: cloud.prov.on_claim(CLAIM, "hw-2", p),
             enroll.request(enroll.OP_CLAIM, n1, csr=csr_l, hwid="hw-2"), n1)
    assert a.status == "pending"
    cloud.prov.approve("hw-2", "alice", "OPS-1: device installed at site-1")
    # Anyone holding the batch's claim certificate (it is in every device
    # image of the batch) and knowing the hardware id claims first.
    b = _ask(lambda p: cloud.prov.on_claim(CLAIM, "hw-2", p),
             enroll.request(enroll.OP_CLAIM, n2, csr=csr_t, hwid="hw-2"), n2)
    assert b.status != "issued", "the approved identity was issued to another key"


# -- 4. cloud: rotation does not retire certificates the cloud issued otherwise ----

def test_rotation_retires_every_other_certificate_of_the_identity(cloud):
    cert_pem, _key_pem = cloud.ca.issue_device("acme", "dev-1")      # a fleet credential
    legacy = load_cert(cert_pem).serial_number
    cloud.registry.issued("acme/dev-1", legacy)
    ks = MemoryKeystore()
    ks.generate("id1")
    nonce = b"r" * 8
    ans = _ask(lambda p: cloud.prov.on_device("acme/dev-1", p),
               enroll.request(enroll.OP_ROTATE, nonce, csr=ks.csr_der("id1", "x")), nonce)
    assert ans.status == "issued"
    cloud.prov.on_device("acme/dev-1", enroll.request(enroll.OP_CONFIRM, b"c" * 8,
                                                      fingerprint=enroll.fingerprint(ans.cert)))
    assert cloud.registry.audit_rows(action="rotate")  # the cloud says it retired the others
    assert legacy in cloud.registry.revoked_serials(), "the pre-rotation certificate is still valid"


# -- 5. cloud: confirmation is fire-and-forget; a lost confirm leaves the old certificate valid

class DroppingConfirm(Device):
    """The broker PUBACKs the confirm but the provisioning service never
    processes it (its client was reconnecting: clean session, QoS 1 lost;
    on Mosquitto the PUBACK never meant delivery to the service anyway)."""

    drop_confirms = 1

    def _deliver(self, action):
        if action.token is not None and action.token[0] == "confirm" and self.drop_confirms:
            self.drop_confirms -= 1
            from agent.events import PubAcked
            self.feed(PubAcked(action.token))
            return
        return Device._deliver(self, action)


def test_a_lost_confirm_is_sent_again_until_the_cloud_retired_the_old_certificate(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    dev.__class__ = DroppingConfirm
    old = dev.core.record["a"]
    assert dev.run_until(lambda: dev.core.record["a"]["cert"] != old["cert"] and enrolled(dev)())
    dev.run_until(lambda: False, steps_max=60)
    old_serial = load_cert(old["cert"]).serial_number
    assert old_serial in cloud.registry.revoked_serials(), "the rotated-away certificate is still valid"


# -- 6. cloud: recovery is not idempotent; a replayed request mints a certificate each time

def test_a_replayed_recovery_request_does_not_mint_a_certificate_each_time(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    ks, a = dev.keystore, dev.core.record["a"]
    ks.generate("spare")
    csr, nonce = ks.csr_der("spare", "x"), b"n" * 8
    payload = enroll.request(enroll.OP_RECOVER, nonce, csr=csr, hwid="hw-1", old_cert=a["cert"],
                             sig=ks.sign(a["k"], enroll.recovery_digest(csr, nonce)))
    serials = set()
    for _ in range(5):
        ans = _ask(lambda p: cloud.prov.on_claim(CLAIM, "hw-1", p), payload, nonce)
        assert ans.status == "issued"
        serials.add(load_cert(ans.cert).serial_number)
    assert len(serials) == 1, "5 identical recovery requests minted %d certificates" % len(serials)


# -- 7. cloud: the provisioning endpoint has no bound; every refusal is an fsync'd audit row

def test_hostile_requests_cannot_grow_the_audit_trail_without_bound(cloud):
    before = cloud.registry._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    for i in range(2000):
        cloud.prov.on_claim(CLAIM, "hw-%d" % (i % 7), b"not cbor")
    rows = cloud.registry._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0] - before
    assert rows <= 100, "%d audit rows from one claim certificate's garbage" % rows


def test_an_unvalidated_client_id_does_not_reach_the_audit_trail(cloud):
    forged = "hw-1 approved by alice (OPS-9), identity acme/dev-1 provisioned " + "x" * 20000
    cloud.prov.on_claim(CLAIM, forged, b"garbage")
    detail = cloud.registry.audit_rows(action="enroll_refused")[-1]["detail"]
    assert "approved by alice" not in detail and len(detail) < 200, detail[:120]


# -- 8. Mosquitto: a claim certificate's client id is global, it kicks anyone -------

@pytest.fixture
async def real_cloud(tmp_path, kind):
    from cloud.service import Cloud
    require_kind(kind)
    c = Cloud(tmp_path / "cloud", broker=kind, cert_s=3600)
    await c.start()
    c.claim_files = c.add_claim_batch("b1", 3, "factory-ops")
    yield c
    await c.stop()


async def _closed_within(reader, timeout_s):
    try:
        while True:
            data = await asyncio.wait_for(reader.read(4096), timeout_s)
            if not data:
                return True
    except asyncio.TimeoutError:
        return False
    except (OSError, ConnectionError):
        return True


@pytest.mark.parametrize("kind", [
    "embedded",
    "mosquitto",
])
async def test_claim_certificate_cannot_take_over_a_device_session(real_cloud, kind):
    ep = real_cloud.endpoints()
    dev = real_cloud.issue_device("acme", "dev-1")
    vr, vw, rc = await probe.connect(ep["host"], ep["device_port"], real_cloud.ca_path,
                                     (dev.certfile, dev.keyfile), "acme/dev-1")
    assert rc == 0
    try:
        try:
            ar, aw, arc = await probe.connect(ep["host"], ep["prov_port"], real_cloud.ca_path,
                                              real_cloud.claim_files, "acme/dev-1")
        except probe.Refused:
            arc, aw = None, None
        assert not await _closed_within(vr, 1.5), "the device was kicked by a claim certificate"
        if aw is not None:
            aw.close()
    finally:
        vw.close()


@pytest.mark.parametrize("kind", [
    "embedded",
    "mosquitto",
])
async def test_claim_certificate_cannot_wipe_the_ingest_session_and_lose_acked_telemetry(real_cloud, kind):
    import cbor2
    ep = real_cloud.endpoints()
    dev = real_cloud.issue_device("acme", "dev-1")
    vr, vw, rc = await probe.connect(ep["host"], ep["device_port"], real_cloud.ca_path,
                                     (dev.certfile, dev.keyfile), "acme/dev-1")
    assert rc == 0
    aw = None
    try:
        try:
            _ar, aw, _ = await probe.connect(ep["host"], ep["prov_port"], real_cloud.ca_path,
                                             real_cloud.claim_files, "$cloud/ingest")
        except probe.Refused:
            pass
        record = cbor2.dumps({"v": 1, "k": "t", "d": "dev-1", "e": 0, "s": 0,
                              "ts": int(time.time() * 1000), "r": {"x": 1}}, canonical=True)
        vw.write(mqtt.publish("t/acme/dev-1/telemetry", record, 1, 7))
        await vw.drain()
        acked = mqtt.Parser().feed(await asyncio.wait_for(vr.read(64), 5))
        assert any(isinstance(p, mqtt.PubAck) and p.packet_id == 7 for p in acked)

        def stored():
            return real_cloud.store.tenant("acme").count_telemetry(include_flagged=True) == 1
        for _ in range(50):
            await real_cloud.ingest.stats()
            if stored():
                break
            await asyncio.sleep(0.1)
        assert stored(), "a record the broker acknowledged was never stored"
    finally:
        if aw is not None:
            aw.close()
        vw.close()
