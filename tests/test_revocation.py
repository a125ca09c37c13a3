"""Revocation and clones, tested as attacks on both brokers: a device whose
identity is revoked while it is connected is cut off at once, cannot come
back, and the operation is audited with who, when and why; two devices
holding one identity are detected, locked out (embedded) or flagged
(Mosquitto), and audited."""

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time

from agent import mqtt
from brokers import require_kind
from cloud.errors import CloudError
from cloud.identity import Registry
from cloud.service import Cloud

TETHER = [sys.executable, "-m", "cloud.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def mqtt_connect(cloud, cred):
    """Open an mTLS MQTT connection -> (reader, writer, CONNACK return code)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cloud.ca_path)
    ctx.load_cert_chain(cred.certfile, cred.keyfile)
    reader, writer = await asyncio.open_connection(cloud.host, cloud.port, ssl=ctx, server_hostname="localhost")
    writer.write(mqtt.connect("%s/%s" % (cred.tenant, cred.device), 30))
    await writer.drain()
    packets = mqtt.Parser().feed(await asyncio.wait_for(reader.readexactly(4), 5))
    return reader, writer, packets[0].return_code


async def closed(reader, timeout_s):
    try:
        return await asyncio.wait_for(reader.read(100), timeout_s) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def test_revoked_device_is_cut_off_at_once_and_cannot_return(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    await cloud.start()
    try:
        victim, bystander = cloud.issue_device("acme", "dev-1"), cloud.issue_device("acme", "dev-2")
        reader, writer, rc = await mqtt_connect(cloud, victim)
        r2, w2, rc2 = await mqtt_connect(cloud, bystander)
        assert rc == 0 and rc2 == 0
        cloud.registry.revoke("acme/dev-1", "stolen from site 4", "alice")
        assert await closed(reader, timeout_s=2), "the live session must end"
        status = cloud.registry.status("acme/dev-1")
        assert status["enforced_ms"] is not None and status["note"] == "session ended"
        assert 0 <= status["block_ms"] < 1000
        for _ in range(3):                      # it keeps trying; it is refused each time
            _, w, rc = await mqtt_connect(cloud, victim)
            assert rc == 5  # CONNACK: not authorized
            w.close()
        assert sum(1 for r in cloud.broker.refusals if r.identity == "acme/dev-1") >= 3
        w2.write(mqtt.pingreq())                # the bystander is untouched
        await w2.drain()
        assert await asyncio.wait_for(r2.readexactly(2), 5) == b"\xd0\x00"
        actions = [(a["actor"], a["action"], a["reason"]) for a in cloud.registry.audit_rows(subject="acme/dev-1")]
        assert actions[0] == ("alice", "revoke", "stolen from site 4")
        assert actions[1][1] == "revocation_enforced"
        writer.close()
        w2.close()
    finally:
        await cloud.stop()


async def test_revocation_recorded_while_down_is_enforced_at_start(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    cred = cloud.issue_device("acme", "dev-9")
    await cloud.start()
    await cloud.stop()
    registry = Registry(cloud.store_path)
    registry.revoke("acme/dev-9", "decommissioned", "bob")
    registry.close()
    cloud = Cloud(tmp_path / "cloud", port=cloud.port)
    await cloud.start()
    try:
        _, w, rc = await mqtt_connect(cloud, cred)
        assert rc == 5
        w.close()
    finally:
        await cloud.stop()


def test_revocation_needs_who_and_why_and_a_real_identity(tmp_path):
    registry = Registry(str(tmp_path / "db"))
    import pytest
    for identity, reason, actor in [("acme/dev-1", "", "alice"), ("acme/dev-1", "x", ""),
                                    ("not-an-identity", "x", "alice"), ("acme/dev 1", "x", "alice")]:
        with pytest.raises(CloudError):
            registry.revoke(identity, reason, actor)
    assert registry.audit_rows() == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(data, port, broker="embedded"):
    proc = subprocess.Popen(TETHER + ["cloud", "serve", "--data", str(data), "--port", str(port),
                                      "--broker", broker, "--issue", "2", "--tenants", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    line = ""
    while "mqtts://" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "mqtts://" in line
    return proc


def test_revoke_command_against_a_running_cloud_and_the_audit_listing(tmp_path):
    data, port = tmp_path / "cloud", free_port()
    proc = serve(data, port)
    try:
        out = subprocess.run(TETHER + ["cloud", "revoke", "tenant0/dev-00000", "--reason", "lost", "--by", "carol",
                                       "--data", str(data)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "enforced" in out.stdout and " ms " in out.stdout
        listing = subprocess.run(TETHER + ["cloud", "audit", "--data", str(data), "--device", "tenant0/dev-00000"],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "carol" in listing.stdout and "revoke" in listing.stdout and "lost" in listing.stdout
        bad = subprocess.run(TETHER + ["cloud", "revoke", "nonsense", "--reason", "x", "--data", str(data)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2
    finally:
        proc.terminate()
        proc.wait(20)


async def test_mosquitto_revocation_needs_crl_acl_and_kick_and_gets_all_three(tmp_path):
    require_kind("mosquitto")
    cloud = Cloud(tmp_path / "cloud", broker="mosquitto")
    victim, bystander = cloud.issue_device("acme", "dev-1"), cloud.issue_device("acme", "dev-2")
    await cloud.start()
    try:
        reader, writer, rc = await mqtt_connect(cloud, victim)
        r2, w2, rc2 = await mqtt_connect(cloud, bystander)
        assert rc == 0 and rc2 == 0
        cloud.registry.revoke("acme/dev-1", "cloned", "dave")
        assert await closed(reader, timeout_s=5), "a CRL reload alone would leave this session up"
        for _ in range(50):
            status = cloud.registry.status("acme/dev-1")
            if status["enforced_ms"] is not None:
                break
            await asyncio.sleep(0.1)
        assert status["enforced_ms"] is not None, status
        assert "session taken over and closed" in status["note"] and "reconnect refused" in status["note"]
        try:                                     # its certificate is on the CRL now
            _, w, rc = await mqtt_connect(cloud, victim)
            w.close()
            refused = False
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            refused = True
        assert refused
        acl = (tmp_path / "cloud" / "mosquitto" / "acl").read_text()
        assert "user acme/dev-1\ntopic deny #" in acl  # any other certificate of it: no topic at all
        w2.write(mqtt.pingreq())                 # the bystander is untouched
        await w2.drain()
        assert await asyncio.wait_for(r2.readexactly(2), 5) == b"\xd0\x00"
        assert [a["action"] for a in cloud.registry.audit_rows(subject="acme/dev-1")] == \
            ["revoke", "revocation_enforced"]
        writer.close()
        w2.close()
    finally:
        await cloud.stop()


async def cloned_pair_fights(cloud, cred, rounds=4):
    """Two devices holding one identity take each other over, again and again."""
    results, writers = [], []
    for _ in range(rounds):
        try:
            _, w, rc = await mqtt_connect(cloud, cred)
            writers.append(w)  # keep it open: a clone does not hang up
            results.append(rc)
            await asyncio.sleep(0.05)
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            results.append("closed")
    for w in writers:
        w.close()
    return results


async def test_cloned_identity_is_refused_and_audited_on_the_embedded_broker(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    cred = cloud.issue_device("acme", "dev-1")
    await cloud.start()
    try:
        results = await cloned_pair_fights(cloud, cred, rounds=5)
        assert results[:3] == [0, 0, 0], results      # first connect and two takeovers
        assert results[3:] == [5, 5], results         # then: two devices, one identity: refused
        assert await asyncio.wait_for(_until(lambda: "acme/dev-1" not in [
            k for k, (sess, h) in cloud.broker.sessions.items() if h is not None]), 5)  # incumbent ended too
        audit = [a["action"] for a in cloud.registry.audit_rows(subject="acme/dev-1")]
        assert audit == ["session_takeover", "session_takeover", "clone_suspected"]  # one row, not a flood
        assert "acme/dev-1" in cloud.clones
        assert any(r.reason == "clone_suspected" for r in cloud.broker.refusals)
    finally:
        await cloud.stop()


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.02)
    return True


async def test_a_will_is_refused_so_it_cannot_publish_past_the_acl(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    cred = cloud.issue_device("acme", "dev-1")
    await cloud.start()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cloud.ca_path)
        ctx.load_cert_chain(cred.certfile, cred.keyfile)
        reader, writer = await asyncio.open_connection(cloud.host, cloud.port, ssl=ctx, server_hostname="localhost")
        writer.write(mqtt.connect("acme/dev-1", 30, will=mqtt.Will("t/acme/dev-2/cmd", b"reboot")))
        await writer.drain()
        packets = mqtt.Parser().feed(await asyncio.wait_for(reader.readexactly(4), 5))
        assert packets[0].return_code == 5
        assert any(r.reason == "will_not_allowed" for r in cloud.broker.refusals)
        writer.close()
    finally:
        await cloud.stop()


def test_audit_rows_cannot_be_forged_from_the_command_line(tmp_path):
    registry = Registry(str(tmp_path / "db"))
    for actor, reason in [("cloud", "x"), ("broker", "x"), ("eve", "x\n2026-01-01 alice release acme/dev-1 ok"),
                          ("eve\tx", "x"), ("eve", "y" * 501)]:
        try:
            registry.quarantine("acme/dev-1", reason, actor)
            raise AssertionError("accepted %r %r" % (actor, reason))
        except CloudError:
            pass
    assert registry.audit_rows() == []


def test_identities_cannot_carry_acl_syntax_into_mosquitto():
    from cloud.mosquitto import acl_text
    assert "user acme/dev-1\ntopic deny #" in acl_text(denied=["acme/dev-1"])
    try:
        acl_text(denied=["acme/dev-1\ntopic readwrite #"])
        raise AssertionError("accepted an identity with a newline")
    except CloudError:
        pass


async def test_mosquitto_revocation_covers_certificates_older_than_the_database(tmp_path):
    require_kind("mosquitto")
    data = tmp_path / "cloud"
    first = Cloud(data, broker="mosquitto")
    cred = first.issue_device("acme", "dev-1")
    first.registry.close()
    os.remove(data / "tether.db")                 # as `tether demo` does on every run
    cloud = Cloud(data, broker="mosquitto")
    await cloud.start()
    try:
        cloud.registry.revoke("acme/dev-1", "old certificate", "dave")
        assert await asyncio.wait_for(_until(lambda: cloud.registry.status("acme/dev-1")["enforced_ms"]), 10)
        try:
            _, w, rc = await mqtt_connect(cloud, cred)
            w.close()
            refused = rc != 0
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            refused = True
        assert refused, "the certificate file predates the database, its serial must still be on the CRL"
    finally:
        await cloud.stop()


async def test_cloned_identity_is_flagged_and_audited_on_mosquitto(tmp_path):
    require_kind("mosquitto")
    cloud = Cloud(tmp_path / "cloud", broker="mosquitto")
    cred = cloud.issue_device("acme", "dev-1")
    await cloud.start()
    try:
        await cloned_pair_fights(cloud, cred, rounds=4)
        for _ in range(40):
            if "acme/dev-1" in cloud.clones:
                break
            await asyncio.sleep(0.1)
        assert "acme/dev-1" in cloud.clones
        audit = [a["action"] for a in cloud.registry.audit_rows(subject="acme/dev-1")]
        assert "clone_suspected" in audit and "session_takeover" in audit
    finally:
        await cloud.stop()
