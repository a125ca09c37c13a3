"""Quarantine, tested as an attack on the boundary: a quarantined device stays
connected, but what it sends is flagged and kept out of normal reads, it
loses its command topic, and quarantine and release are audited. Both brokers."""

import asyncio
import ssl

import cbor2
import pytest

from agent import mqtt
from brokers import require_kind
from cloud.service import Cloud


def record(seq):
    return cbor2.dumps({"v": 1, "k": "t", "d": "dev-1", "e": 0, "s": seq, "ts": 1_800_000_000_000 + seq,
                        "r": {"x": seq}}, canonical=True)


class Client:
    """A raw MQTT client on our codec: every packet it gets is kept."""

    def __init__(self, reader, writer):
        self.reader, self.writer, self.parser, self.packets = reader, writer, mqtt.Parser(), []

    @classmethod
    async def connect(cls, cloud, cred):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cloud.ca_path)
        ctx.load_cert_chain(cred.certfile, cred.keyfile)
        reader, writer = await asyncio.open_connection(cloud.host, cloud.port, ssl=ctx, server_hostname="localhost")
        client = cls(reader, writer)
        writer.write(mqtt.connect("acme/dev-1", 30))
        assert (await client.next(mqtt.ConnAck)).return_code == 0
        return client

    async def next(self, kind, timeout_s=5):
        while True:
            for p in self.packets:
                if isinstance(p, kind):
                    self.packets.remove(p)
                    return p
            data = await asyncio.wait_for(self.reader.read(4096), timeout_s)
            assert data, "connection closed"
            self.packets.extend(self.parser.feed(data))

    async def publish(self, topic, payload, pid):
        self.writer.write(mqtt.publish(topic, payload, 1, pid))
        return (await self.next(mqtt.PubAck)).packet_id == pid


async def wait_for(predicate, timeout_s=5):
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
async def test_quarantined_device_is_confined_flagged_and_released(tmp_path, kind):
    require_kind(kind)
    cloud = Cloud(tmp_path / "cloud", broker=kind)
    cred = cloud.issue_device("acme", "dev-1")
    await cloud.start()
    try:
        dev = await Client.connect(cloud, cred)
        view = cloud.store.tenant("acme")
        assert await dev.publish("t/acme/dev-1/telemetry", record(0), 1)
        # On Mosquitto the PUBACK comes before the ingest stores; the flag is
        # decided when it stores (docs/security.md, known gaps), so wait.
        assert await wait_for(lambda: len(view.telemetry(device="dev-1", include_flagged=True)) == 1)
        if kind == "embedded":
            assert await dev.publish("q/acme/dev-1/diag", b"early", 9)  # not yet in quarantine: refused
            assert [r.topic for r in cloud.broker.refusals] == ["q/acme/dev-1/diag"]
        cloud.registry.quarantine("acme/dev-1", "odd readings from site 9", "erin")
        assert await wait_for(lambda: "acme/dev-1" in cloud.quarantined)
        assert await dev.publish("t/acme/dev-1/telemetry", record(1), 2)   # still connected
        assert await dev.publish("q/acme/dev-1/diag", b"diagnostics", 3)  # quarantine topic
        if kind == "embedded":
            assert [r.topic for r in cloud.broker.refusals] == ["q/acme/dev-1/diag"]  # now allowed
        dev.writer.write(mqtt.subscribe(4, [("t/acme/dev-1/cmd", 1)]))
        granted = (await dev.next(mqtt.SubAck)).return_codes[0]
        if kind == "embedded":
            assert granted == mqtt.SUBACK_FAILURE, "a quarantined device loses its command topic"
        else:
            acl = (tmp_path / "cloud" / "mosquitto" / "acl").read_text()
            assert "user acme/dev-1\ntopic deny t/acme/dev-1/cmd" in acl  # Mosquitto grants, never delivers
        assert await wait_for(lambda: len(view.telemetry(device="dev-1", include_flagged=True)) == 2)
        normal = [(r["epoch"], r["seq"]) for r in view.telemetry(device="dev-1")]
        flagged = [(r["epoch"], r["seq"], r["flag"]) for r in view.flagged(device="dev-1")]
        assert normal == [(0, 0)], "quarantined data must not mix with normal data"
        assert flagged == [(0, 1, "quarantine")]
        cloud.registry.release("acme/dev-1", "readings explained: sensor swap", "frank")
        assert await wait_for(lambda: "acme/dev-1" not in cloud.quarantined)
        assert await dev.publish("t/acme/dev-1/telemetry", record(2), 5)
        assert await wait_for(lambda: len(view.telemetry(device="dev-1")) == 2)
        assert [a["action"] for a in cloud.registry.audit_rows(subject="acme/dev-1")] == ["quarantine", "release"]
        assert cloud.store.fleet_counts().get("silent_gaps", 0) == 0  # flagged rows still count as present
        dev.writer.close()
    finally:
        await cloud.stop()


def test_quarantine_acl_table():
    from cloud import broker as eb
    me = "acme/dev-1"
    assert eb.permits(me, eb.PUBLISH, "t/acme/dev-1/telemetry", quarantined=True)
    assert eb.permits(me, eb.PUBLISH, "q/acme/dev-1/diag", quarantined=True)
    assert eb.permits(me, eb.SUBSCRIBE, "q/acme/dev-1/update", quarantined=True)
    assert not eb.permits(me, eb.SUBSCRIBE, "t/acme/dev-1/cmd", quarantined=True)
    assert not eb.permits(me, eb.RECEIVE, "t/acme/dev-1/cmd", quarantined=True)
    assert not eb.permits(me, eb.PUBLISH, "q/acme/dev-1/diag")            # only in quarantine
    assert not eb.permits(me, eb.PUBLISH, "q/acme/dev-2/diag", quarantined=True)
