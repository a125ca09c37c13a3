"""`tether agent run` rotates its certificate before it expires
(board/linux_identity.py: the identity core over LinuxAgent's paho
connection): the real `tether` command in its own process against the
reference cloud in this process, whose certificates live seconds
(Cloud(cert_s=...)), so two thirds of a lifetime come within the test.

- run rotates: a new certificate (another serial, for the key in the other
  slot) in DATA/identity.crt, the old serial retired by the cloud, every
  sample stored or still queued on disk (none lost across the reconnect),
  and no key in clear anywhere under DATA;
- a power cut (SIGKILL) once the cloud issued the new certificate, or once
  the board stored it as its candidate, leaves a working identity: the next
  start connects, rotates (again, or proves the candidate), and the samples
  of both runs reach the store.
"""

import asyncio
import os
import random
import time

import pytest
from cryptography import x509

from agent import enroll as en
from agent import telemetry
from agent.events import Connected, Refused, Tick
from board.codec import CODEC
from board.keystore import FileKeystore
from board.linux import FileStorage, LinuxAgent
from board.linux_main import BoardKeystore
from cloud.service import Cloud

from brokers import wait_until
from test_linux_agent_cli import BATCH, WAIT_S, Agent, enroll

ROTATE_CERT_S = 10      # rotation at two thirds: about 7 s after enrollment
POWER_CUT_CERT_S = 15   # room after the cut for the restart to rotate before expiry


async def start_cloud(tmp_path, cert_s):
    c = Cloud(tmp_path / "cloud", cert_s=cert_s)
    await c.start()
    c.claim = c.add_claim_batch(BATCH, 5, "factory-ops")
    c.provisioning.allow("hw-1", BATCH, "acme", "pi-1", "site-1", "ops")
    return c


def cert_in_force(data):
    return x509.load_pem_x509_certificate((data / "identity.crt").read_bytes())


def record(data):
    return en.decode_record(FileStorage(str(data)).read(en.RECORD_FILE))


def queued(data):
    """(epoch, seq) of the records in the board's queue file."""
    core = telemetry.Telemetry("acme", "pi-1", CODEC, random.Random(0))
    disk = FileStorage(str(data / "telemetry"))
    core.boot(disk.read("state"), disk.read("queue"))
    return {(entry[0], entry[1]) for entry in core.queue}


def stored(cloud):
    return {(row["epoch"], row["seq"]) for row in cloud.store.tenant("acme").telemetry("pi-1")}


def assert_nothing_lost(cloud, data):
    """Each epoch's records, from seq 0 on, are stored or queued on disk."""
    have = stored(cloud) | queued(data)
    for epoch in {e for e, _ in have}:
        seqs = sorted(s for e, s in have if e == epoch)
        assert seqs == list(range(len(seqs))), "epoch %d lost records: %s" % (epoch, seqs)
    return have


def assert_keys_encrypted(data):
    keys = data / "keys"
    key_files = sorted(p.name for p in keys.iterdir() if p.name.endswith(".key"))
    assert key_files, "no key under %s" % keys
    for name in key_files:
        assert (keys / name).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"), name
    for root, _, files in os.walk(data):
        for name in files:
            blob = open(os.path.join(root, name), "rb").read()
            assert b"BEGIN PRIVATE KEY" not in blob and b"BEGIN EC PRIVATE KEY" not in blob, name
    return key_files


def assert_working_identity(cloud, data, first_serial):
    """The certificate in force is a newer one, for the key in its slot, not
    retired; the first one is retired; the record has nothing pending."""
    rec = record(data)
    active = cert_in_force(data)
    assert active.serial_number != first_serial
    assert active.serial_number not in cloud.registry.revoked_serials()
    assert first_serial in cloud.registry.revoked_serials()
    assert rec["c"] is None and rec["u"] is None
    assert FileKeystore(str(data / "keys")).matches(rec["a"]["k"], (data / "identity.crt").read_bytes())
    return rec


def rotated(cloud, data, first_serial):
    def check():
        rec = record(data)
        return cert_in_force(data).serial_number != first_serial and rec["u"] is None \
            and first_serial in cloud.registry.revoked_serials()
    return check


def audited(cloud, action):
    return lambda: any(r["action"] == action for r in cloud.registry.audit_rows(subject="acme/pi-1"))


async def test_run_rotates_before_expiry_and_loses_nothing(tmp_path):
    cloud = await start_cloud(tmp_path, ROTATE_CERT_S)
    data = tmp_path / "board"
    agent = None
    try:
        rc, out, err = await enroll(cloud, data, "hw-1")
        assert rc == 0, out + err
        first = cert_in_force(data).serial_number
        assert record(data)["a"]["k"] == "id0"
        agent = await Agent(cloud, data, "--sample-interval", "0.1").start()
        assert await wait_until(rotated(cloud, data, first), WAIT_S), agent.err
        after = len(stored(cloud))
        assert await wait_until(lambda: len(stored(cloud)) >= after + 5, WAIT_S), agent.err  # still flowing
        assert await agent.stop() == 0, agent.err
        rec = assert_working_identity(cloud, data, first)
        assert rec["a"]["k"] == "id1"                                   # the new key, in the other slot
        assert assert_keys_encrypted(data) == ["id1.key"]               # the old key erased
        assert rec["a"]["exp"] - rec["a"]["iss"] == ROTATE_CERT_S * 1000
        have = assert_nothing_lost(cloud, data)
        assert len(have) >= after + 5
        assert audited(cloud, "rotate_issued")()
        assert "identity_proven" in agent.err and "identity confirmed" in agent.err
    finally:
        if agent is not None:
            agent.kill()
        await cloud.stop()


@pytest.mark.parametrize("cut", ["issued", "candidate"])
async def test_power_cut_during_rotation_leaves_a_working_identity(tmp_path, cut):
    cloud = await start_cloud(tmp_path, POWER_CUT_CERT_S)
    data = tmp_path / "board"
    agents = []
    try:
        rc, out, err = await enroll(cloud, data, "hw-1")
        assert rc == 0, out + err
        first = cert_in_force(data).serial_number
        agents.append(await Agent(cloud, data, "--sample-interval", "0.1").start())
        if cut == "issued":       # the cloud answered; the board may or may not have stored it
            assert await wait_until(audited(cloud, "rotate_issued"), WAIT_S), agents[0].err
        else:                     # the board stored the candidate, and has not proven it yet
            assert await wait_until(lambda: record(data)["c"] is not None, WAIT_S), agents[0].err
        agents[0].proc.kill()
        await agents[0].wait()
        before_restart = assert_nothing_lost(cloud, data)
        assert before_restart
        if cut == "candidate":
            assert record(data)["c"] is not None

        agents.append(await Agent(cloud, data, "--sample-interval", "0.1").start())
        assert await wait_until(rotated(cloud, data, first), WAIT_S), agents[1].err
        assert await wait_until(lambda: stored(cloud) >= before_restart, WAIT_S), agents[1].err
        after = len(stored(cloud))
        assert await wait_until(lambda: len(stored(cloud)) >= after + 3, WAIT_S), agents[1].err
        assert await agents[1].stop() == 0, agents[1].err
        assert_working_identity(cloud, data, first)
        assert_keys_encrypted(data)
        assert_nothing_lost(cloud, data)
        assert {e for e, _ in stored(cloud)} == {0, 1}                  # both runs' records arrived
    finally:
        for agent in agents:
            agent.kill()
        await cloud.stop()


async def test_run_recovers_an_expired_certificate_through_the_claim_endpoint(tmp_path):
    """A board off for its certificate's whole lifetime: with the claim
    options, run goes to the provisioning endpoint, proves the expired
    certificate's key, and sends again with the new certificate."""
    cloud = await start_cloud(tmp_path, 4)
    data = tmp_path / "board"
    agent = None
    try:
        rc, out, err = await enroll(cloud, data, "hw-1")
        assert rc == 0, out + err
        first = cert_in_force(data).serial_number
        first_cert = record(data)["a"]["cert"]
        cloud.provision_service.prov.cert_s = 600     # the recovered certificate lives longer
        expires_s = record(data)["a"]["exp"] / 1000
        assert await wait_until(lambda: time.time() > expires_s + 1, WAIT_S)  # the board is off meanwhile
        agent = await Agent(cloud, data, "--sample-interval", "0.1", "--prov-url", "127.0.0.1:%d" % cloud.prov_port,
                            "--claim-cert", cloud.claim[0], "--claim-key", cloud.claim[1], "--hwid", "hw-1").start()
        assert await wait_until(audited(cloud, "recover_issued"), WAIT_S), agent.err
        assert await wait_until(lambda: len(stored(cloud)) >= 3, WAIT_S), agent.err
        # The loop samples on during the recovery (it no longer waits for it),
        # so the queue floods in at once: wait for the cloud to hear the new
        # certificate works (the record's "u" cleared), not only for samples.
        assert await wait_until(lambda: record(data)["u"] is None and record(data)["a"]["cert"] != first_cert,
                                WAIT_S), agent.err
        assert await agent.stop() == 0, agent.err
        rec = record(data)
        assert cert_in_force(data).serial_number != first and rec["u"] is None and rec["c"] is None
        assert rec["a"]["exp"] - rec["a"]["iss"] == 600 * 1000
        assert FileKeystore(str(data / "keys")).matches(rec["a"]["k"], (data / "identity.crt").read_bytes())
        assert_keys_encrypted(data)
        assert_nothing_lost(cloud, data)
        assert not audited(cloud, "rotate_issued")()                   # recovered, not rotated
    finally:
        if agent is not None:
            agent.kill()
        await cloud.stop()


class Recorder:
    """An id_driver that presents a given certificate and keeps the link
    events LinuxAgent feeds it."""

    answer_topic = "t/acme/pi-1/cert"

    def __init__(self, context):
        self.context = context
        self.events = []

    def boot(self):
        return []

    def handle(self, event):
        if not isinstance(event, Tick):
            self.events.append(event)
        return []


async def test_an_expired_certificate_is_heard_as_a_refusal_not_a_lost_connection(tmp_path):
    """What LinuxAgent tells the identity core when the broker refuses the
    certificate in the TLS handshake: Refused, not ConnectionLost. Over TLS
    1.3 the embedded broker's refusal reaches paho as a close before any
    CONNACK ("closed", which the core counts: refusals_to_recover in a row
    start a recovery, as board/enroller.py's Enroller does); a TLS alert
    paho logs would be named (cert_expired: recover at once)."""
    cloud = await start_cloud(tmp_path, 4)
    data = tmp_path / "board"
    try:
        rc, out, err = await enroll(cloud, data, "hw-1")
        assert rc == 0, out + err
        active = record(data)["a"]
        assert await wait_until(lambda: time.time() > active["exp"] / 1000 + 1, WAIT_S)
        store = BoardKeystore(str(data / "keys"))
        driver = Recorder(lambda: store.client_context(active["k"], active["cert"], cloud.ca_path))
        agent = LinuxAgent(str(tmp_path / "telemetry"), "acme", "pi-1", "127.0.0.1", cloud.port, cloud.ca_path,
                           None, None, id_driver=driver)
        agent.boot()

        async def refused():
            await asyncio.to_thread(agent.step, 0.05)
            return any(isinstance(e, (Refused, Connected)) for e in driver.events)
        deadline = time.monotonic() + WAIT_S
        while not await refused() and time.monotonic() < deadline:
            pass
        assert [type(e).__name__ for e in driver.events][:1] == ["Refused"], driver.events
        assert driver.events[0].reason in ("closed", "cert_expired"), driver.events[0].reason
    finally:
        await cloud.stop()
