"""The identity core (agent/enroll.py) against the real provisioning
decisions (cloud/provision.py): claim, approval, quota, rotation with a
power cut at every write, recovery of an expired certificate, and the
attacks on each. The transport is in-process (tests/enroll_harness.py);
tests/test_provision_broker.py runs the flows over both real brokers."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cbor, enroll
from agent.errors import LocalError
from agent.events import KeyMade, Message, Tick
from board.sim import SimRng
from cloud.provision import ProvisionError

from enroll_harness import BATCH, CLAIM, Device, InProcessCloud, PowerCut, SimClock, SimFlash, enrolled
from mpy import require_micropython, run_micropython


@pytest.fixture
def cloud(tmp_path):
    return InProcessCloud(tmp_path, SimClock(), cert_s=600)


def audit_actions(cloud, action=None):
    return [r["action"] if action is None else r for r in cloud.registry.audit_rows(action=action)]


# -- claim --------------------------------------------------------------------------

def test_claim_enrolls_an_allowlisted_device_with_its_own_key(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    assert dev.core.identity == "acme/dev-1"
    assert dev.keystore.matches(dev.core.record["a"]["k"], dev.core.record["a"]["cert"])
    assert cloud.prov.counts()["provisioned"] == 1
    assert cloud.prov.claim_usage(BATCH)["used"] == 1
    rows = cloud.registry.audit_rows(action="provision")
    assert rows and rows[0]["subject"] == "acme/dev-1" and "non_exportable" in rows[0]["detail"]


def test_approval_holds_the_device_pending_until_an_operator_approves(cloud):
    cloud.allow("hw-2", "dev-2", approval=True)
    dev = Device(cloud, "hw-2")
    dev.run_until(lambda: False, steps_max=30)
    assert dev.core.state in (enroll.WAITING, enroll.RETRY) and dev.core.identity is None
    assert [p["hwid"] for p in cloud.prov.pending()] == ["hw-2"]
    assert "enroll_retry" in dev.logs  # told "pending", backing off
    assert cloud.prov.approve("hw-2", "alice", "ticket OPS-7") == "acme/dev-2"
    assert dev.run_until(enrolled(dev))
    approved = cloud.registry.audit_rows(action="enroll_approved")
    assert approved[0]["actor"] == "alice" and approved[0]["reason"] == "ticket OPS-7"


def test_approve_needs_a_pending_request_and_a_named_person(cloud):
    cloud.allow("hw-3", "dev-3", approval=True)
    with pytest.raises(ProvisionError):
        cloud.prov.approve("hw-3", "alice", "nothing asked yet")
    Device(cloud, "hw-3").run_until(lambda: bool(cloud.prov.pending()), steps_max=20)
    with pytest.raises(Exception):
        cloud.prov.approve("hw-3", "cloud", "the system actor is reserved")
    with pytest.raises(Exception):
        cloud.prov.approve("hw-3", "", "who?")


def test_claim_refused_off_the_allowlist_wrong_batch_and_over_quota(tmp_path):
    cloud = InProcessCloud(tmp_path, SimClock(), cert_s=600, quota=1)
    cloud.prov.add_claim("other", 5, "ops")
    cloud.allow("hw-a", "dev-a")
    cloud.prov.allow("hw-x", "other", "acme", "dev-x", "site-1", "ops")
    cloud.allow("hw-b", "dev-b")
    first = Device(cloud, "hw-a")
    assert first.run_until(enrolled(first))
    for hwid, reason in (("hw-zz", "not_allowlisted"), ("hw-x", "wrong_batch"), ("hw-b", "quota_exhausted")):
        dev = Device(cloud, hwid)
        dev.run_until(lambda: False, steps_max=10)
        assert dev.core.identity is None
        refusals = [r for r in cloud.registry.audit_rows(action="enroll_refused") if hwid in r["detail"]]
        assert refusals and refusals[-1]["reason"] == reason, hwid
    assert cloud.prov.claim_usage(BATCH) == {"quota": 1, "used": 1, "revoked": 0}


def test_a_claim_for_an_enrolled_hwid_with_another_key_is_refused(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    thief = Device(cloud, "hw-1", seed=99)  # same hardware id, its own key: a clone
    thief.run_until(lambda: False, steps_max=10)
    assert thief.core.identity is None
    assert cloud.registry.audit_rows(action="enroll_refused")[-1]["reason"] == "already_enrolled"


def test_a_revoked_claim_batch_enrolls_nobody(cloud):
    cloud.allow("hw-1", "dev-1")
    cloud.prov.revoke_claim(BATCH, "secops", "claim key leaked")
    dev = Device(cloud, "hw-1")
    dev.run_until(lambda: False, steps_max=10)
    assert dev.core.identity is None
    assert cloud.registry.audit_rows(action="enroll_refused")[-1]["reason"] == "claim_revoked"


def test_answers_to_another_nonce_and_garbage_are_ignored(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    dev.offline = True
    dev.step()  # key made, request waiting for a connection
    assert dev.core.state == enroll.WAITING
    forged = cbor.dumps({"v": 1, "nonce": b"\0" * 8, "status": "issued", "now_ms": 1, "cert": b"x",
                         "identity": "acme/dev-1", "issued_ms": 1, "not_after_ms": 2})
    for payload in (forged, b"", b"\xff\xff", cbor.dumps([1, 2])):
        dev.feed(Message(0, "prov/x/y/resp", payload))
        assert dev.core.state == enroll.WAITING
    dev.offline = False


def test_the_private_key_appears_in_no_request_answer_log_or_audit_row(cloud, caplog):
    import logging
    from cryptography.hazmat.primitives.asymmetric import ec
    caplog.set_level(logging.DEBUG)
    cloud.allow("hw-1", "dev-1", cert_s=30)
    dev = Device(cloud, "hw-1")
    sent = []
    deliver = dev._deliver

    def spy(action):
        sent.append(bytes(action.payload))
        return deliver(action)
    dev._deliver = spy
    assert dev.run_until(enrolled(dev))
    first = dev.core.record["a"]["cert"]
    assert dev.run_until(lambda: dev.core.record["a"]["cert"] != first and enrolled(dev)())  # rotated too
    secrets = []
    for name in ("id0", "id1"):
        key = dev.keystore._key(name, missing_ok=True)
        if key is not None:
            secrets.append(key.private_numbers().private_value.to_bytes(32, "big"))
    assert secrets and len(sent) >= 4
    rows = cloud.registry.audit_rows()
    texts = [repr(r).encode() for r in rows] + [r.getMessage().encode() for r in caplog.records]
    for secret in secrets:
        for blob in sent + texts + [cbor.dumps(dev.core.record)]:
            assert secret not in blob and secret.hex().encode() not in blob
    assert isinstance(dev.keystore._key(dev.core.record["a"]["k"]), ec.EllipticCurvePrivateKey)


def test_no_two_devices_share_a_key(cloud):
    keys = set()
    for i in range(10):  # the batch's quota
        cloud.allow("hw-%d" % i, "dev-%d" % i)
        dev = Device(cloud, "hw-%d" % i, seed=i)
        assert dev.run_until(enrolled(dev))
        keys.add(dev.keystore.public_key(dev.core.record["a"]["k"]))
    assert len(keys) == 10  # the batch shares its claim certificate, never an identity key


# -- rotation ---------------------------------------------------------------------

def test_rotation_at_two_thirds_retires_the_old_certificate_once_the_new_one_works(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    t0 = cloud.clock.now_ms()
    old = dev.core.record["a"]
    assert dev.run_until(lambda: dev.core.record["a"]["cert"] != old["cert"] and enrolled(dev)())
    rotated_after_s = (cloud.clock.now_ms() - t0) / 1000
    assert 380 <= rotated_after_s <= 420, rotated_after_s  # two thirds of 600 s, after enrollment
    assert dev.core.record["a"]["k"] != old["k"] and dev.keystore.public_key(old["k"]) is None
    assert cloud.prov.counts() == {"provisioned": 1, "rotated": 1, "recovered": 0}
    # The old certificate is now refused (on the CRL), the new one works.
    from agent.actions import UseIdentity
    assert cloud.refusal(dev.keystore, UseIdentity(old["k"], old["cert"])) in ("cert_revoked", "key_mismatch")
    old_serial = __import__("cloud.ca", fromlist=["load_cert"]).load_cert(old["cert"]).serial_number
    assert old_serial in cloud.registry.revoked_serials()
    assert "rotate" in audit_actions(cloud)


def rotation_writes(tmp_path):
    """How many flash writes one rotation makes (counted, not assumed)."""
    cloud = InProcessCloud(tmp_path / "count", SimClock(), cert_s=600)
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    before = dev.flash.writes
    old = dev.core.record["a"]["cert"]
    assert dev.run_until(lambda: dev.core.record["a"]["cert"] != old and enrolled(dev)())
    return dev.flash.writes - before


def test_power_cut_at_every_write_of_rotation_leaves_a_working_identity(tmp_path):
    writes = rotation_writes(tmp_path)
    assert writes >= 4  # key, candidate, promotion, old key erased, confirmed
    for cut in range(1, writes + 1):
        cloud = InProcessCloud(tmp_path / ("cut%d" % cut), SimClock(), cert_s=600)
        cloud.allow("hw-1", "dev-1")
        dev = Device(cloud, "hw-1")
        assert dev.run_until(enrolled(dev))
        old = dev.core.record["a"]["cert"]
        dev.flash.power_on(cut_at_write=cut)
        with pytest.raises(PowerCut):
            dev.run_until(lambda: dev.core.record["a"]["cert"] != old and enrolled(dev)(), steps_max=600)
        dev.power_cycle()
        # Right after the reboot, what the flash holds connects.
        assert dev.working(), "cut at write %d of %d: no working identity after reboot" % (cut, writes)
        assert dev.run_until(lambda: dev.core.record["a"]["cert"] != old and enrolled(dev)()), cut
        assert dev.working()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_power_cuts_at_random_points_over_enrollment_and_two_rotations(tmp_path_factory, cuts, seed):
    cloud = InProcessCloud(tmp_path_factory.mktemp("r"), SimClock(), cert_s=300)
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1", seed=seed)
    certs = set()
    pending = list(cuts)
    dev.flash.power_on(cut_at_write=pending.pop(0))
    steps = 0
    while len(certs) < 3 and steps < 3000:
        try:
            dev.step()
        except PowerCut:
            while True:  # the reboot itself may write (a proven candidate) and lose power again
                try:
                    dev.power_cycle(pending.pop(0) if pending else None)
                    break
                except PowerCut:
                    continue
            if dev.core.record.get("a") is not None or dev.core.record.get("c") is not None:
                assert dev.working()
        if enrolled(dev)():
            certs.add(dev.core.record["a"]["cert"])
        steps += 1
    assert len(certs) == 3, "enrolled and rotated twice despite the cuts"


# -- recovery -----------------------------------------------------------------------

def test_a_device_offline_through_its_whole_certificate_lifetime_recovers(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    identity = dev.core.identity
    dev.offline = True
    cloud.clock.advance(2 * 600 * 1000)   # powered off for two lifetimes
    dev.power_cycle()
    dev.offline = False
    dev.power_cycle()                     # boots, connects: refused, expired
    assert dev.run_until(enrolled(dev))
    assert dev.core.identity == identity
    assert cloud.prov.counts()["recovered"] == 1
    assert cloud.prov.claim_usage(BATCH)["used"] == 1  # a recovery is not a new device
    assert cloud.registry.audit_rows(action="recover")


def test_recovery_needs_the_old_key_a_stranger_with_the_old_certificate_is_refused(cloud):
    from board.keystore import MemoryKeystore
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    old_cert = dev.core.record["a"]["cert"]
    thief = MemoryKeystore()
    thief.generate("new")
    thief.generate("wrong")
    csr = thief.csr_der("new", "x")
    nonce = b"n" * 8
    payload = enroll.request(enroll.OP_RECOVER, nonce, csr=csr, hwid="hw-1", old_cert=old_cert,
                             sig=thief.sign("wrong", enroll.recovery_digest(csr, nonce)))
    answer = enroll.parse_answer(cloud.prov.on_claim(CLAIM, "hw-1", payload), nonce)
    assert answer.status == "refused" and answer.reason == "bad_proof"


def test_a_revoked_identity_cannot_rotate_or_recover(cloud):
    cloud.allow("hw-1", "dev-1")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    cloud.registry.revoke("acme/dev-1", "stolen", "secops")
    csr = dev.keystore.csr_der(dev.core.record["a"]["k"], "x")
    answer = enroll.parse_answer(cloud.prov.on_device("acme/dev-1", enroll.request(
        enroll.OP_ROTATE, b"r" * 8, csr=csr)), b"r" * 8)
    assert answer.status == "refused" and answer.reason == "revoked"
    nonce = b"s" * 8
    key = dev.core.record["a"]["k"]
    payload = enroll.request(enroll.OP_RECOVER, nonce, csr=csr, hwid="hw-1",
                             old_cert=dev.core.record["a"]["cert"],
                             sig=dev.keystore.sign(key, enroll.recovery_digest(csr, nonce)))
    assert enroll.parse_answer(cloud.prov.on_claim(CLAIM, "hw-1", payload), nonce).reason == "revoked"


# -- hostile input -------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300))
def test_parse_answer_takes_any_bytes_without_crashing(payload):
    try:
        enroll.parse_answer(payload, b"12345678")
    except enroll.EnrollError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["v", "op", "nonce", "csr", "hwid", "old_cert", "sig", "fp", "caps"]),
                            st.one_of(st.integers(-5, 5), st.binary(max_size=80), st.text(max_size=20),
                                      st.none(), st.dictionaries(st.text(max_size=4), st.booleans())),
                            max_size=9))
def test_the_cloud_answers_hostile_requests_with_a_refusal_never_a_crash(cloud, body):
    cloud.allow("hw-1", "dev-1")
    payload = cbor.dumps(body)
    for answer in (cloud.prov.on_claim(CLAIM, "hw-1", payload), cloud.prov.on_device("acme/dev-1", payload)):
        if answer is not None:
            msg = cbor.loads(answer)
            assert msg["status"] == "refused" or body.get("op") == "claim"
    assert cloud.prov.claim_usage(BATCH)["used"] <= 1


def test_oversized_and_non_cbor_requests_get_no_answer_and_are_audited_without_flooding(cloud):
    assert cloud.prov.on_claim(CLAIM, "hw-1", b"\xa1" * 9000) is None
    for _ in range(50):
        assert cloud.prov.on_claim(CLAIM, "hw-1", b"not cbor") is None
    rows = cloud.registry.audit_rows(action="enroll_refused")
    assert len(rows) == 1  # one row a minute per (sender, reason)...
    cloud.clock.advance(61_000)
    assert cloud.prov.on_claim(CLAIM, "hw-1", b"not cbor") is None
    rows = cloud.registry.audit_rows(action="enroll_refused")
    assert len(rows) == 2 and "50 more" in rows[-1]["detail"]  # ...which says how many it stood for


def test_a_sender_over_its_rate_is_refused_before_any_certificate_is_made(cloud):
    from board.keystore import MemoryKeystore
    for i in range(30):
        cloud.allow("hw-%d" % i, "dev-%d" % i)
    ks = MemoryKeystore()
    reasons = []
    for i in range(30):  # one hardware id asking 30 times in the same instant, each with a new key
        ks.generate("k%d" % i)
        nonce = b"%08d" % i
        answer = enroll.parse_answer(cloud.prov.on_claim(CLAIM, "hw-0", enroll.request(
            enroll.OP_CLAIM, nonce, csr=ks.csr_der("k%d" % i, "x"), hwid="hw-0")), nonce)
        reasons.append(answer.reason if answer.status == "refused" else answer.status)
    assert reasons[0] == "issued" and reasons.count("rate_limited") == 20  # a burst of 10, then refused
    certs = cloud.registry._db.execute("SELECT COUNT(*) FROM device_certs").fetchone()[0]
    assert certs == 1
    cloud.clock.advance(5000)  # tokens come back at one a second
    ks.generate("late")
    answer = enroll.parse_answer(cloud.prov.on_claim(CLAIM, "hw-0", enroll.request(
        enroll.OP_CLAIM, b"later-01", csr=ks.csr_der("late", "x"), hwid="hw-0")), b"later-01")
    assert answer.reason == "already_enrolled"  # judged again, not rate limited


def test_the_machine_refuses_an_unexpected_event_and_stays_refusing():
    core = enroll.Identity(enroll.Config("hw-1", BATCH), SimRng(1))
    with pytest.raises(LocalError):
        core.handle(KeyMade("id0", b"csr"))  # nothing asked for a key
    with pytest.raises(LocalError):
        core.handle(Tick(0))


def test_a_torn_or_foreign_identity_record_means_enroll_again():
    for blob in (b"\x00garbage", cbor.dumps({"v": 2}), cbor.dumps({"v": 1, "a": {"k": "../x", "cert": b""}})):
        core = enroll.Identity(enroll.Config("hw-1", BATCH), SimRng(1))
        core.boot(blob)
        assert core.state == enroll.UNENROLLED


# -- MicroPython ----------------------------------------------------------------------

SCENARIO = r"""
from agent import enroll, cbor
from agent.events import Tick, KeyMade, Connected, Message
class R:
    def __init__(s): s.x = 12345
    def randint(s, a, b):
        s.x = (s.x * 1103515245 + 12345) & 0x7fffffff
        return a + s.x % (b - a + 1)
core = enroll.Identity(enroll.Config("hw-1", "b1", {"non_exportable": True}), R())
out = []
def note(actions):
    for a in actions:
        out.append(type(a).__name__)
        if hasattr(a, "payload"): out.append(a.payload)
        if hasattr(a, "data"): out.append(a.data)
note(core.boot(None))
note(core.handle(Tick(1000)))
note(core.handle(KeyMade("id0", b"CSR-BYTES")))
note(core.handle(Connected(1100)))
ans = cbor.dumps({"v": 1, "nonce": core.nonce, "status": "issued", "now_ms": 50000, "cert": b"CERT",
                  "identity": "acme/dev-1", "issued_ms": 50000, "not_after_ms": 650000})
note(core.handle(Message(1200, "prov/b1/hw-1/resp", ans)))
note(core.handle(Connected(1300)))
note(core.handle(Message(1400, "t/acme/dev-1/cert", cbor.dumps({"v": 1, "nonce": core.confirm_nonce,
                                                                 "status": "confirmed", "now_ms": 50200}))))
note(core.handle(Tick(450000)))
print(cbor.dumps(out).hex())
print(core.state, core.identity)
"""


def test_identity_core_runs_byte_identical_on_micropython():
    require_micropython()
    import subprocess
    import sys
    import os
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cpython = subprocess.run([sys.executable, "-c", SCENARIO], cwd=here, capture_output=True, text=True,
                             check=True).stdout
    mpy = run_micropython(SCENARIO, heap_kb=64)
    assert mpy.strip() == cpython.strip()
    # enrolled, confirmed, and at two thirds of the lifetime a rotation began (a new key asked for)
    assert cpython.strip().endswith("keygen acme/dev-1")
