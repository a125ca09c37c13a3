"""The support service over real mTLS MQTT, on both brokers, with the real
cloud (cloud/service.py starts "$cloud/support"): console devices
(agent.console + agent.audit_upload on board.sim flash) upload their audit
logs with their own device certificates, the cloud verifies the chain
across uploads and answers with signed checkpoints, pushes revocations,
reports tampering, and refuses what is malformed or not the sender's."""

import random
import time

import pytest

from agent import audit_upload as up
from agent import auditlog, cbor, journal, mqtt
from agent import console as core
from cloud.console_tool import Refused, gid_of
from cloud.service import Cloud
from cloud.support import SupportDesk
from simulator.console_drill import SimConsoleDevice, Technician, drop_last_records, edit_record
from simulator.console_fleet import AuditClient

from brokers import require_kind, wait_until

pytestmark = pytest.mark.parametrize("kind", ["embedded", "mosquitto"])


@pytest.fixture
async def cloud(tmp_path, kind):
    require_kind(kind)
    c = Cloud(tmp_path / "cloud", broker=kind)
    await c.start()
    c.desk = SupportDesk(c.data_dir, random_bytes=random.Random(1).randbytes)  # as the CLI: own connection
    yield c
    c.desk.close()
    await c.stop()


def device(cloud, name, tenant="acme", seed=1, **kw):
    cred = cloud.issue_device(tenant, name)
    dev = SimConsoleDevice("%s/%s" % (tenant, name), cloud.desk.keys(), seed,   # named by its identity
                           start_ms=int(time.time() * 1000))
    return AuditClient(cloud, cred, dev, **kw)


def catch_up(dev):
    """The device's virtual clock up to just ahead of the cloud's (a grant
    starts at the cloud's now, which may be the next second)."""
    now_ms = int(time.time() * 1000) + 60_000
    if dev.clock.now_ms() < now_ms:
        dev.advance(now_ms - dev.clock.now_ms())


def grant(cloud, tech, dev, role="technician"):
    return cloud.desk.grant(tech.name, tech.point, role, devices=[dev.device_id], hours=2,
                            requested_by=tech.name, approved_by="lead-bob", reason="test")[1]


def sessions(cloud, client, tech, n=1):
    dev = client.device
    for _ in range(n):
        catch_up(dev)
        s = tech.session(dev, grant(cloud, tech, dev))
        s.open()
        for command in ("status", "versions", "log 2"):
            s.run(command)
        s.close()


def findings(cloud, client):
    return [f["kind"] for f in cloud.desk.audit_findings(client.identity)]


async def upload(client):
    await client.connect()
    assert await client.sync(), client.logs
    client.close()


async def test_upload_verify_and_checkpoint_over_the_broker(cloud, kind):
    tech = Technician("alice")
    client = device(cloud, "dev-1", segment_bytes=512, rotate_bytes=0)
    sessions(cloud, client, tech, 3)
    await upload(client)
    st = cloud.desk.audit_status(client.identity)
    assert (st["next"], st["tamper"], st["findings"]) == (client.device.console.chain.seq, False, [])
    assert client.uploader.acked >= 3                    # in several segments
    # the checkpoint came back signed, and the device dropped what it covers
    first = auditlog.records(client.device.audit_log())[0]
    assert first[0] > 0
    assert cloud.desk.last_checkpoint(client.identity) is not None
    sessions(cloud, client, tech, 1)
    await upload(client)
    st = cloud.desk.audit_status(client.identity)
    assert (st["next"], st["tamper"]) == (client.device.console.chain.seq, False)
    assert [r[0] for r in cloud.desk.uploaded_records(client.identity)] == list(range(st["next"]))


async def test_edited_truncated_and_gapped_uploads_are_reported(cloud, kind):
    tech = Technician("alice")
    edited, truncated, gapped = (device(cloud, "dev-%d" % i, seed=i) for i in (1, 2, 3))
    for c in (edited, truncated, gapped):
        sessions(cloud, c, tech, 1)
        await upload(c)
    sessions(cloud, edited, tech, 1)                     # edited on flash before it went up
    log = edited.device.audit_log()
    edited.device.flash.write_atomic(core.AUDIT_FILE, edit_record(log, len(journal.scan(log)[0]) - 3))
    log = truncated.device.audit_log()                   # uploaded records removed on flash
    truncated.device.flash.write_atomic(core.AUDIT_FILE, drop_last_records(log, 2))
    for c in (edited, truncated):
        c.device.boot()
        c.reboot()
        await upload(c)
    sessions(cloud, gapped, tech, 2)                     # a segment that skips records
    bodies = journal.scan(gapped.device.audit_log())[0]
    nxt = cloud.desk.audit_status(gapped.identity)["next"]
    assert len(bodies) > nxt + 3
    await gapped.connect()                               # its hello, then (not its uploader) the gap
    skipped = b"".join(journal.frame(b) for b in bodies[nxt + 3:])
    gapped.writer.write(mqtt.publish(gapped.uploader.up, up.segment(77, nxt + 3, skipped, len(bodies),
                                                                    bytes(8)), 1, 900))
    assert await wait_until(lambda: findings(cloud, gapped) == ["gap"], 10)
    gapped.close()
    assert findings(cloud, edited) == ["edit"]
    assert findings(cloud, truncated) == ["truncated"]
    for c in (edited, truncated, gapped):
        assert cloud.desk.audit_status(c.identity)["tamper"]
    tampered = [r for r in cloud.desk.audit_rows() if r["action"] == "audit_log_tampered"]
    assert {r["subject"] for r in tampered} == {edited.identity, truncated.identity, gapped.identity}


async def test_a_device_cannot_write_into_another_devices_audit_stream(cloud, kind):
    tech = Technician("alice")
    attacker, victim = device(cloud, "dev-1"), device(cloud, "dev-2", seed=2)
    for c in (attacker, victim):
        sessions(cloud, c, tech, 1)
        await upload(c)
    before = cloud.desk.audit_status(victim.identity)
    await attacker.connect()
    assert await attacker.sync()
    forged = up.segment(5, before["next"], attacker.device.audit_log()[:300], before["next"] + 2, bytes(8))
    attacker.writer.write(mqtt.publish(victim.uploader.up, forged, 1, 901))
    attacker.writer.write(mqtt.subscribe(902, [(victim.uploader.down, 1)]))
    # its own hello after: once the cloud answered that, the broker dealt with both before it
    attacker.run(attacker.uploader.feed(up.Online(0)))
    try:
        assert await attacker.sync()
    except ConnectionError:
        assert kind == "embedded"          # a broker may also drop the connection
    attacker.close()
    after = cloud.desk.audit_status(victim.identity)
    assert (after["records"], after["findings"]) == (before["records"], before["findings"])
    assert cloud.desk.audit_refusals(victim.identity) == []
    if kind == "embedded":  # Mosquitto drops a denied publish silently (its log has it at debug level)
        refused = {(r.identity, r.action, r.topic) for r in cloud.broker.refusals}
        assert (attacker.identity, "publish", victim.uploader.up) in refused
        assert (attacker.identity, "subscribe", victim.uploader.down) in refused


async def test_a_revocation_reaches_an_online_device_which_then_refuses_the_grant(cloud, kind):
    tech = Technician("alice")
    client = device(cloud, "dev-1")
    dev = client.device
    catch_up(dev)
    message = grant(cloud, tech, dev)
    s = tech.session(dev, message)
    s.open()
    await client.connect()
    assert await client.sync()
    assert cloud.desk.revoke(gid_of(message).hex(), "lead-bob", "visit cancelled")
    assert await client.sync(until=lambda: dev.console.state != core.OPEN, timeout_s=10)
    assert any(line.startswith(b"end revoked") for line in dev.outbox)
    assert dev.console.revoked == [gid_of(message)]
    assert await client.sync()                           # the "revocations" record goes up
    client.close()
    with pytest.raises(Refused) as e:                    # offline now: refused on the device's own list
        tech.session(dev, message).open()
    assert e.value.code == "revoked"
    kinds = [r[3] for r in cloud.desk.uploaded_records(client.identity)]
    assert "revocations" in kinds and kinds.count("session_open") == 1
    # a device that was offline gets the list at its next hello
    late = device(cloud, "dev-2", seed=2)
    await late.connect()
    assert await late.sync(until=lambda: late.device.console.revoked == [gid_of(message)])
    late.close()


async def test_hostile_messages_are_refused_with_a_reason_and_the_service_goes_on(cloud, kind):
    client = device(cloud, "dev-1")
    await client.connect()
    assert await client.sync()
    cases = [(b"\xff\xfe", "malformed"), (cbor.dumps({"v": 2, "op": "hello"}), "bad_version"),
             (cbor.dumps({"v": 1, "op": "drop"}), "unknown_op"),
             (cbor.dumps({"v": 1, "op": "hello", "next": 0, "head": b"x", "rev": bytes(8)}), "bad_field"),
             (up.segment(1, 0, b"\x05\x00garbage", 0, bytes(8)), "torn_segment"),
             (b"\xa0" * (up.UP_BYTES_MAX + 1), "too_large")]
    for i, (payload, _) in enumerate(cases):
        client.writer.write(mqtt.publish(client.uploader.up, payload, 1, 1000 + i))
    replies = []
    for _ in cases:
        packet = await client._wait(lambda p: isinstance(p, mqtt.Publish), 10)
        replies.append(up.parse_down(packet.payload))
    assert [r["code"] for r in replies] == [code for _, code in cases]
    assert [r["code"] for r in cloud.desk.audit_refusals(client.identity)] == [code for _, code in cases]
    client.close()
    tech = Technician("alice")
    sessions(cloud, client, tech, 1)
    await upload(client)                                 # still answered, still verified
    st = cloud.desk.audit_status(client.identity)
    assert (st["next"], st["tamper"]) == (client.device.console.chain.seq, False)


def test_findings_through_the_cli(tmp_path, capsys, kind):
    """`tether cloud support findings` reads what the service recorded."""
    from cloud.cli import main
    from cloud.support_mqtt import SupportHandler
    data = str(tmp_path / "cloud")
    Cloud(data).registry.close()        # the commands refuse a --data with no cloud (M8 of a walkthrough)
    desk = SupportDesk(data)
    handler = SupportHandler(desk, desk.clock_s)
    handler.handle("t/acme/dev-1/audit", up.hello(5, bytes(32), bytes(8)))
    handler.handle("t/acme/dev-1/audit", up.hello(2, bytes(32), bytes(8)))
    desk.close()
    assert main(["cloud", "support", "findings", "--data", data]) == 1
    assert "acme/dev-1" in capsys.readouterr().out
    assert main(["cloud", "support", "findings", "--data", data, "--device", "acme/dev-2"]) == 0
