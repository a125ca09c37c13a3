"""Security and delivery contracts of both brokers (docs/design.md, Cloud).

Every test taking `broker` runs against the embedded amqtt broker and
Mosquitto. Where the two differ on purpose the test says so in its name
and asserts what each actually does.
"""

import asyncio

import pytest

from brokers import (  # noqa: F401  (fixtures)
    CLOSED, TLS_FAILED, BrokerUnderTest, Device, broker, broker_kind, device_factory, make_device,
    pki, require_kind, wait_until,
)
from cloud import broker as eb

TELEMETRY = "t/%s/telemetry"
CMD = "t/%s/cmd"
PAHO_IDENTIFIER_REJECTED = 133  # paho's v5 name for the 3.1.1 CONNACK code 2
SUBACK_FAILURE = 128
REFUSED_AT_TLS = (TLS_FAILED, CLOSED)
# "Nothing arrived" is shown with an ordering marker wherever possible: after
# the forbidden packet, an allowed one goes through the same path (same
# connection, or same sender to the same subscriber); both brokers handle one
# connection's packets in order and deliver to a subscriber in order, so once
# the marker is there anything forbidden would already be there too. Where
# no marker can follow an effect, the test watches for LATE_S and says why.
LATE_S = 1.0


def tls_refusals(broker):
    return [r.reason for r in broker.refusals if r.action == eb.TLS]


# -- who may connect -----------------------------------------------------------

async def test_device_telemetry_reaches_ingest_with_certificate_identity(broker, device_factory):
    for identity in ("acme/dev-1", "globex/dev-1"):
        dev = device_factory(identity)
        assert await dev.connect() == 0
        assert await dev.publish(TELEMETRY % identity, identity.encode())
    assert await broker.wait_received(2)
    assert sorted(broker.received) == [
        ("acme/dev-1", "t/acme/dev-1/telemetry", b"acme/dev-1"),
        ("globex/dev-1", "t/globex/dev-1/telemetry", b"globex/dev-1"),
    ]


async def test_connection_without_client_certificate_is_refused(broker):
    dev = Device(broker.host, broker.port, broker.pki.ca_path, None, None, "acme/dev-1")
    assert await dev.connect() in REFUSED_AT_TLS
    if broker.kind == "embedded":
        assert tls_refusals(broker.embedded) == [eb.R_NO_CERT]


async def test_certificate_from_foreign_ca_is_refused(broker, device_factory):
    dev = device_factory("acme/dev-1", creds=broker.pki.foreign("acme/dev-1"))
    assert await dev.connect() in REFUSED_AT_TLS
    if broker.kind == "embedded":
        assert tls_refusals(broker.embedded) == [eb.R_UNKNOWN_CA]


async def test_expired_certificate_is_refused(broker, device_factory):
    dev = device_factory("acme/dev-1", creds=broker.pki.expired("acme/dev-1"))
    assert await dev.connect() in REFUSED_AT_TLS
    if broker.kind == "embedded":
        assert tls_refusals(broker.embedded) == [eb.R_CERT_EXPIRED]


async def test_server_certificate_cannot_be_used_as_client_certificate(broker, device_factory):
    # serverAuth only, no clientAuth: OpenSSL's purpose check refuses it.
    dev = device_factory("localhost", client_id="localhost",
                         creds=(broker.pki.server_cert, broker.pki.server_key))
    assert await dev.connect() in REFUSED_AT_TLS
    if broker.kind == "embedded":
        assert tls_refusals(broker.embedded) == [eb.R_WRONG_PURPOSE]


# -- what a device may publish and subscribe -----------------------------------

FORBIDDEN_TOPICS = [
    "t/acme/dev-2/telemetry",          # another device, same tenant
    "t/globex/dev-1/telemetry",        # another tenant
    "t/acme/dev-1/cmd",                # its own command topic
    "t/acme/dev-1/telemetry/extra",    # below its telemetry topic
    "t/acme/dev-1",
]


async def test_publish_outside_own_telemetry_topic_is_not_delivered(broker, device_factory):
    dev = device_factory("acme/dev-1")
    assert await dev.connect() == 0
    for topic in FORBIDDEN_TOPICS:
        assert await dev.publish(topic, b"forbidden")  # acknowledged and dropped (MQTT 3.1.1)
    # Marker: same connection, so the broker has handled the forbidden ones
    # first, and the ingest gets one connection's messages in order
    # (embedded: before each PUBACK; Mosquitto: one subscriber, callbacks run
    # one at a time), so a forbidden one would be in `received` before it.
    assert await dev.publish(TELEMETRY % "acme/dev-1", b"marker")
    assert await wait_until(lambda: b"marker" in broker.payloads())
    assert broker.received == [("acme/dev-1", "t/acme/dev-1/telemetry", b"marker")]
    if broker.kind == "embedded":
        assert [(r.identity, r.action, r.topic, r.reason) for r in broker.refusals] == [
            ("acme/dev-1", eb.PUBLISH, topic, eb.R_NOT_PERMITTED) for topic in FORBIDDEN_TOPICS]


@pytest.mark.parametrize("topic_filter", ["t/acme/dev-2/cmd", "t/globex/dev-1/cmd", "t/acme/+/cmd", "t/#"])
async def test_subscription_to_other_devices_cmd_gets_nothing(broker, device_factory, topic_filter):
    """Embedded: SUBACK 0x80. Mosquitto 2.0 grants the SUBACK; its ACL blocks delivery."""
    victim = device_factory("acme/dev-2")
    snoop = device_factory("acme/dev-1")
    assert await victim.connect() == 0 and await snoop.connect() == 0
    assert await victim.subscribe(CMD % "acme/dev-2") == [1]
    granted = await snoop.subscribe(topic_filter)
    assert granted == ([SUBACK_FAILURE] if broker.kind == "embedded" else [1])
    assert await snoop.subscribe(CMD % "acme/dev-1") == [1]  # its own: the marker's path
    assert await broker.send_cmd("acme/dev-2", b"reboot")
    # Marker: the same sender then commands the snoop itself. The broker
    # queues each command to a subscriber in the order it got them, so a
    # leaked "reboot" would reach the snoop before its own command.
    assert await broker.send_cmd("acme/dev-1", b"marker")
    marker = (CMD % "acme/dev-1", b"marker")
    assert await wait_until(lambda: victim.messages and marker in snoop.messages)
    assert victim.messages == [(CMD % "acme/dev-2", b"reboot")]
    # Mosquitto may send the marker once per matching subscription
    # (t/# matches the snoop's own topic too); only markers are allowed.
    assert [m for m in snoop.messages if m != marker] == []
    if broker.kind == "embedded":
        assert [(r.action, r.topic, r.reason) for r in broker.refusals] == [
            (eb.SUBSCRIBE, topic_filter, eb.R_NOT_PERMITTED)]


async def test_device_receives_its_own_commands(broker, device_factory):
    dev = device_factory("globex/dev-1")
    assert await dev.connect() == 0
    assert await dev.subscribe(CMD % "globex/dev-1") == [1]
    assert await broker.send_cmd("globex/dev-1", b"ping")
    assert await wait_until(lambda: dev.messages)
    assert dev.messages == [("t/globex/dev-1/cmd", b"ping")]


# -- client id == identity -------------------------------------------------------

async def test_embedded_refuses_other_devices_client_id_and_keeps_the_device(pki, tmp_path):
    b = BrokerUnderTest("embedded", pki, tmp_path)
    await b.start()
    victim = make_device(b, "acme/dev-1")
    impostor = make_device(b, "acme/dev-2", client_id="acme/dev-1")
    try:
        assert await victim.connect() == 0
        assert await impostor.connect() == PAHO_IDENTIFIER_REJECTED
        # Marker: a takeover would happen while the broker handles the
        # impostor's CONNECT, before its CONNACK. The victim publishes after
        # that CONNACK; a PUBACK cannot come on a closed connection (paho
        # would count a disconnect and reconnect first), so it shows the
        # victim's first connection outlived the impostor's attempt.
        assert await victim.publish(TELEMETRY % "acme/dev-1", b"still here")
        assert victim.connected and victim.disconnects == 0 and victim.connacks == [0]
        assert await b.wait_received(1)
        assert [(r.identity, r.action, r.topic, r.reason) for r in b.refusals] == [
            ("acme/dev-2", eb.CONNECT, "acme/dev-1", eb.R_CLIENT_ID)]
    finally:
        await victim.close()
        await impostor.close()
        await b.stop()


@pytest.mark.parametrize("client_id", ["", "dev-1", "acme/dev-1/x", "ACME/dev-1"])
async def test_embedded_refuses_client_id_other_than_identity(pki, tmp_path, client_id):
    b = BrokerUnderTest("embedded", pki, tmp_path)
    await b.start()
    dev = make_device(b, "acme/dev-1", client_id=client_id)
    try:
        assert await dev.connect() == PAHO_IDENTIFIER_REJECTED
    finally:
        await dev.close()
        await b.stop()


@pytest.mark.mosquitto
@pytest.mark.parametrize("clean_session", [True, False])
async def test_mosquitto_rewrites_other_devices_client_id_instead_of_refusing(pki, tmp_path, clean_session):
    """use_username_as_clientid: the impostor is accepted, as itself; the device stays."""
    require_kind("mosquitto")
    b = BrokerUnderTest("mosquitto", pki, tmp_path)
    await b.start()
    victim = make_device(b, "acme/dev-1", clean_session=clean_session)
    impostor = make_device(b, "acme/dev-2", client_id="acme/dev-1", clean_session=clean_session)
    try:
        assert await victim.connect() == 0
        assert await impostor.connect() == 0  # not refused, unlike the embedded broker
        assert await impostor.publish(TELEMETRY % "acme/dev-1", b"as victim")
        # Marker for "as victim": allowed, same connection, so handled after it.
        assert await impostor.publish(TELEMETRY % "acme/dev-2", b"as itself")
        # Marker for the takeover: Mosquitto would end the victim's connection
        # while it handles the impostor's CONNECT, before that CONNACK; a
        # PUBACK on the victim's first connection shows it is still open.
        assert await victim.publish(TELEMETRY % "acme/dev-1", b"victim")
        assert victim.connected and victim.disconnects == 0 and victim.connacks == [0]
        assert await wait_until(lambda: {b"as itself", b"victim"} <= set(b.payloads()))
        assert sorted(b.received) == [
            ("acme/dev-1", "t/acme/dev-1/telemetry", b"victim"),
            ("acme/dev-2", "t/acme/dev-2/telemetry", b"as itself"),
        ]
    finally:
        await victim.close()
        await impostor.close()
        await b.stop()


@pytest.mark.mosquitto
async def test_mosquitto_without_username_as_clientid_lets_impostor_kick_device(pki, tmp_path):
    """Recorded behaviour of plain mosquitto 2.0.11: session takeover by client id."""
    require_kind("mosquitto")
    b = BrokerUnderTest("mosquitto", pki, tmp_path, client_id_from_identity=False)
    await b.start()
    victim = make_device(b, "acme/dev-1", reconnect_delay_s=30)
    impostor = make_device(b, "acme/dev-2", client_id="acme/dev-1")
    try:
        assert await victim.connect() == 0
        assert await impostor.connect() == 0
        assert await wait_until(lambda: victim.disconnects == 1)  # kicked off
        # The ACL still follows the certificate: no publishing as the victim.
        assert await impostor.publish(TELEMETRY % "acme/dev-1", b"as victim")
        # Marker: allowed, same connection, so handled after "as victim".
        assert await impostor.publish(TELEMETRY % "acme/dev-2", b"as itself")
        assert await wait_until(lambda: b"as itself" in b.payloads())
        assert b.received == [("acme/dev-2", "t/acme/dev-2/telemetry", b"as itself")]
    finally:
        await victim.close()
        await impostor.close()
        await b.stop()


@pytest.mark.parametrize("clean_session", [True, False])
async def test_same_device_reconnecting_replaces_its_old_connection(broker, device_factory, clean_session):
    old = device_factory("acme/dev-1", clean_session=clean_session, reconnect_delay_s=30)
    new = device_factory("acme/dev-1", clean_session=clean_session)
    assert await old.connect() == 0
    assert await new.connect() == 0
    assert await wait_until(lambda: old.disconnects == 1)
    # Marker: a PUBACK on new's first connection shows the takeover (done
    # while handling new's CONNECT) left it open; paho would have counted a
    # disconnect and reconnected before any PUBACK otherwise.
    assert await new.publish(TELEMETRY % "acme/dev-1", b"new")
    assert new.connected and new.disconnects == 0 and new.connacks == [0]
    assert await broker.wait_received(1)
    # No marker can follow what the embedded broker does after the takeover:
    # the old connection's task notices its close and tears down on its own
    # schedule. So watch, generously, that this does not end the new one.
    # (The old one reconnects only after 30 s, outside this window.)
    await asyncio.sleep(LATE_S)
    assert new.connected and new.disconnects == 0 and new.connacks == [0]
    assert old.disconnects == 1 and old.connacks == [0]
    if broker.kind == "embedded":
        assert list(broker.refusals) == []


# -- restarts ---------------------------------------------------------------------

async def test_devices_reconnect_after_broker_restart(broker, device_factory):
    devs = [device_factory(identity) for identity in ("acme/dev-1", "globex/dev-1")]
    for dev in devs:
        assert await dev.connect() == 0
    await broker.restart()
    for dev in devs:
        assert await dev.wait_connects(2, timeout_s=10)
        assert await dev.publish(TELEMETRY % dev.client_id, b"after restart")
    assert await broker.wait_received(2, timeout_s=10)
    assert sorted(i for (i, _, _) in broker.received) == ["acme/dev-1", "globex/dev-1"]


# -- embedded broker: the ingest hook ------------------------------------------------

@pytest.fixture
async def embedded(pki, tmp_path):
    b = BrokerUnderTest("embedded", pki, tmp_path)
    await b.start()
    made = []

    def make(identity, **options):
        dev = make_device(b, identity, **options)
        made.append(dev)
        return dev

    try:
        yield b, make
    finally:
        for dev in made:
            await dev.close()
        await b.stop()


async def test_embedded_puback_only_after_on_publish_returned(embedded):
    b, make = embedded
    timeline = []
    release = asyncio.Event()

    async def slow_ingest(identity, topic, payload):
        timeline.append("ingest entered")
        await release.wait()
        timeline.append("ingest returned")
    b.hook = slow_ingest
    dev = make("acme/dev-1")
    dev.client.on_publish = lambda c, u, mid, rc, p: timeline.append("puback")
    assert await dev.connect() == 0
    info = dev.publish_nowait(TELEMETRY % "acme/dev-1", b"r1")
    assert await wait_until(lambda: timeline)
    # Marker: a SUBSCRIBE on the same connection, sent once the ingest is
    # entered. The broker handles it while r1 waits (amqtt runs each packet
    # in its own task), and a PUBACK for r1 sent before or as the ingest was
    # entered would have been written before that SUBACK, so paho would
    # have seen it first.
    assert await dev.subscribe(CMD % "acme/dev-1") == [1]
    assert timeline == ["ingest entered"]
    assert not info.is_published()
    release.set()
    assert await wait_until(info.is_published)
    assert timeline == ["ingest entered", "ingest returned", "puback"]
    assert b.received == [("acme/dev-1", "t/acme/dev-1/telemetry", b"r1")]


async def test_embedded_failed_on_publish_closes_without_puback_and_device_resends(embedded):
    b, make = embedded
    calls = []

    def flaky_ingest(identity, topic, payload):
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("store unavailable")
    b.hook = flaky_ingest
    dev = make("acme/dev-1")
    assert await dev.connect() == 0
    info = dev.publish_nowait(TELEMETRY % "acme/dev-1", b"r1")
    assert await wait_until(lambda: dev.disconnects == 1)
    assert not info.is_published()
    # paho resends the unacknowledged message after it reconnects.
    assert await wait_until(info.is_published)
    assert calls == [b"r1", b"r1"]
    assert b.received == [("acme/dev-1", "t/acme/dev-1/telemetry", b"r1")]
    assert b.embedded.ingest_failures == 1


async def test_embedded_stop_waits_for_on_publish_in_flight(embedded):
    b, make = embedded

    async def slow_ingest(identity, topic, payload):
        await asyncio.sleep(0.3)
    b.hook = slow_ingest
    dev = make("acme/dev-1", reconnect_delay_s=30)
    assert await dev.connect() == 0
    dev.publish_nowait(TELEMETRY % "acme/dev-1", b"r1")
    assert await wait_until(lambda: b.embedded._inflight == 1)
    await b.embedded.stop()
    assert b.received == [("acme/dev-1", "t/acme/dev-1/telemetry", b"r1")]


async def test_embedded_kick_ends_live_session(embedded):
    b, make = embedded
    dev = make("acme/dev-1", reconnect_delay_s=30)
    assert await dev.connect() == 0
    assert await b.embedded.kick("acme/dev-1") is True
    assert await wait_until(lambda: dev.disconnects == 1)
    assert await b.embedded.kick("acme/dev-1") is False
    assert await b.embedded.kick("acme/nobody") is False


async def test_embedded_refuses_qos2_publish(embedded):
    b, make = embedded
    dev = make("acme/dev-1", reconnect_delay_s=30)
    assert await dev.connect() == 0
    dev.publish_nowait(TELEMETRY % "acme/dev-1", b"q2", qos=2)
    assert await wait_until(lambda: dev.disconnects == 1)
    assert b.received == []
    assert [r.reason for r in b.refusals] == [eb.R_QOS]


async def test_embedded_authorize_hook_refuses_at_connect(pki, tmp_path):
    b = BrokerUnderTest("embedded", pki, tmp_path)
    await b.start()
    b.embedded.authorize = lambda identity: identity != "acme/dev-2"
    ok, revoked = make_device(b, "acme/dev-1"), make_device(b, "acme/dev-2")
    try:
        assert await ok.connect() == 0
        assert await revoked.connect() == 135  # paho's name for 3.1.1 "not authorized"
        assert [(r.identity, r.reason) for r in b.refusals] == [("acme/dev-2", eb.R_NOT_AUTHORIZED)]
    finally:
        await ok.close()
        await revoked.close()
        await b.stop()


async def test_embedded_relay_fans_telemetry_out_to_the_ingest_subscriber(pki, tmp_path):
    b = eb.Broker("127.0.0.1", 0, pki.ca_path, pki.server_cert, pki.server_key, relay=True)
    await b.start()
    ingest = Device("127.0.0.1", b.port, pki.ca_path, *pki.ingest, "$cloud/ingest")
    dev = Device("127.0.0.1", b.port, pki.ca_path, *pki.device("acme/dev-1"), "acme/dev-1")
    try:
        assert await ingest.connect() == 0 and await dev.connect() == 0
        assert await ingest.subscribe("t/+/+/telemetry") == [1]
        assert await dev.publish(TELEMETRY % "acme/dev-1", b"r1")
        assert await wait_until(lambda: ingest.messages)
        assert ingest.messages == [("t/acme/dev-1/telemetry", b"r1")]
    finally:
        await dev.close()
        await ingest.close()
        await b.stop()


def test_acl_table():
    assert eb.permits("acme/dev-1", eb.PUBLISH, "t/acme/dev-1/telemetry")
    assert eb.permits("acme/dev-1", eb.SUBSCRIBE, "t/acme/dev-1/cmd")
    assert eb.permits("acme/dev-1", eb.RECEIVE, "t/acme/dev-1/cmd")
    assert not eb.permits("acme/dev-1", eb.PUBLISH, "t/acme/dev-1/cmd")
    assert not eb.permits("acme/dev-1", eb.SUBSCRIBE, "t/acme/dev-1/telemetry")
    assert not eb.permits("acme/dev-1", eb.SUBSCRIBE, "t/acme/dev-1/#")
    assert eb.permits("$cloud/ingest", eb.SUBSCRIBE, "t/+/+/telemetry")
    assert eb.permits("$cloud/ingest", eb.SUBSCRIBE, "t/#")
    assert eb.permits("$cloud/ingest", eb.RECEIVE, "t/acme/dev-1/telemetry")
    assert not eb.permits("$cloud/ingest", eb.SUBSCRIBE, "#")
    assert not eb.permits("$cloud/ingest", eb.PUBLISH, "t/acme/dev-1/cmd")
    assert not eb.permits("$cloud/other", eb.SUBSCRIBE, "t/#")


# -- Mosquitto: the ingest's acknowledgements ------------------------------------------

@pytest.fixture
async def mosquitto(pki, tmp_path):
    require_kind("mosquitto")
    b = BrokerUnderTest("mosquitto", pki, tmp_path)
    await b.start()
    made = []

    def make(identity, **options):
        dev = make_device(b, identity, **options)
        made.append(dev)
        return dev

    try:
        yield b, make
    finally:
        for dev in made:
            await dev.close()
        await b.stop()


@pytest.mark.mosquitto
async def test_mosquitto_ingest_acks_only_after_callback_so_failure_is_redelivered(mosquitto):
    b, make = mosquitto
    calls = []

    async def flaky_ingest(identity, topic, payload):
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("store unavailable")
    b.hook = flaky_ingest
    dev = make("acme/dev-1")
    assert await dev.connect() == 0
    assert await dev.publish(TELEMETRY % "acme/dev-1", b"r1")
    assert await b.wait_received(1, timeout_s=10)
    assert calls == [b"r1", b"r1"]
    assert b.received == [("acme/dev-1", "t/acme/dev-1/telemetry", b"r1")]
    # The ack is counted on paho's thread just after the callback returns.
    assert await wait_until(lambda: b.ingest.acked == 1)
    assert b.ingest.failures == 1


@pytest.mark.mosquitto
async def test_mosquitto_keeps_ingest_queue_across_restart(mosquitto):
    b, make = mosquitto
    await b.ingest.stop()  # ingest offline; its persistent session stays
    b.ingest = None
    dev = make("acme/dev-1", reconnect_delay_s=30)
    assert await dev.connect() == 0
    for i in range(3):
        assert await dev.publish(TELEMETRY % "acme/dev-1", b"r%d" % i)
    await b.mosquitto.restart()  # SIGTERM: mosquitto saves its database
    await b.start()              # mosquitto is up: only starts a new ingest, same client id
    assert await b.wait_received(3)
    assert b.payloads() == [b"r0", b"r1", b"r2"]


@pytest.mark.mosquitto
async def test_mosquitto_ingest_bounds_what_it_holds_unacknowledged(pki, tmp_path, monkeypatch):
    """Mosquitto 2.0.11 was measured sending the ingest far more than its
    max_inflight_messages under load; the ingest's own bound holds."""
    require_kind("mosquitto")
    import cloud.mosquitto as cm
    monkeypatch.setattr(cm, "INGEST_PENDING_MAX", 5)
    b = BrokerUnderTest("mosquitto", pki, tmp_path)
    await b.start()
    dev = None
    try:
        inside, most = [0], [0]
        gate = asyncio.Event()

        async def slow_ingest(identity, topic, payload):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            await gate.wait()
            inside[0] -= 1
        b.hook = slow_ingest
        dev = make_device(b, "acme/dev-1")
        assert await dev.connect() == 0
        for i in range(20):
            dev.client.publish(TELEMETRY % "acme/dev-1", b"r%d" % i, qos=1)
        assert await wait_until(lambda: inside[0] == 5)
        # At most one more is taken off the wire, and it waits at the bound.
        assert b.ingest.received <= 6 and most[0] == 5
        gate.set()
        assert await wait_until(lambda: b.ingest.acked == 20, timeout_s=10)
        assert most[0] == 5
    finally:
        if dev is not None:
            await dev.close()
        await b.stop()
