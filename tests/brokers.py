"""Test helpers: a throwaway PKI, either broker on a free port, paho devices.

Use from a test module (tests/ is on sys.path when pytest runs):

    from brokers import broker, broker_kind, pki, device_factory  # fixtures

    async def test_x(broker, device_factory):
        dev = device_factory("acme/dev-1")
        assert await dev.connect() == 0
        assert await dev.publish("t/acme/dev-1/telemetry", b"x")
        assert await broker.wait_received(1)

`broker_kind` is parametrized over "embedded" and "mosquitto"; mosquitto
cases skip when the binary is missing, and fail instead when
TETHER_REQUIRE_ALL=1.

Devices are real paho clients on their own network thread (so a blocking
paho call never stalls the event loop the embedded broker runs on); the
async methods poll for what that thread recorded.
"""

import asyncio
import datetime
import os
import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker
from cloud.ca import CA, write_private, write_public
from cloud.mosquitto import Mosquitto, MosquittoIngest, find_mosquitto

HOST = "127.0.0.1"
KINDS = ("embedded", "mosquitto")
DEVICES = ("acme/dev-1", "acme/dev-2", "globex/dev-1")
# Mosquitto's ACL has no writer for cmd topics yet; tests add this one so
# they can check who receives a command.
CMD_SENDER = "$cloud/test-cmd"
TEST_ACL_EXTRA = ("", "user " + CMD_SENDER, "topic write t/+/+/cmd")
WAIT_S = 5.0
POLL_S = 0.01

# Outcomes of Device.connect() other than a CONNACK return code.
TLS_FAILED = "tls_failed"      # the handshake raised on the client side
CLOSED = "closed"              # connection closed before any CONNACK (TLS 1.3 cert refusal)
NO_CONNACK = "no_connack"      # nothing within the timeout


def free_port(host=HOST):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def wait_until(predicate, timeout_s=WAIT_S):
    """Poll `predicate` until true -> True, or False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def require_kind(kind):
    if kind == "mosquitto" and find_mosquitto() is None:
        if os.environ.get("TETHER_REQUIRE_ALL") == "1":
            pytest.fail("mosquitto not found and TETHER_REQUIRE_ALL=1")
        pytest.skip("mosquitto not installed")


# -- PKI ---------------------------------------------------------------------

class Pki:
    """A CA, a server cert, the ingest's cert and device certs, all in `dirpath`."""

    def __init__(self, dirpath, identities=DEVICES):
        self.dir = str(dirpath)
        self.ca = CA.create(os.path.join(self.dir, "ca"))
        self.ca_path = self.ca.cert_path
        self.server_cert, self.server_key = self.ca.issue_server(os.path.join(self.dir, "server"))
        self.ingest = self._write("ingest", *self.ca.issue_client())
        self.cmd_sender = self._write("cmd-sender", *self.ca.issue_client(CMD_SENDER))
        self._foreign_ca = None
        self.devices = {}
        for identity in identities:
            self.device(identity)

    def _write(self, name, cert_pem, key_pem):
        base = os.path.join(self.dir, "clients", name.replace("/", "__"))
        os.makedirs(os.path.dirname(base), exist_ok=True)
        write_public(base + ".crt", cert_pem)
        write_private(base + ".key", key_pem)
        return base + ".crt", base + ".key"

    def device(self, identity, **issue):
        """(cert_path, key_path) for `identity`, issued on first use."""
        if identity not in self.devices:
            tenant, device = identity.split("/")
            self.devices[identity] = self._write(identity, *self.ca.issue_device(tenant, device, **issue))
        return self.devices[identity]

    def expired(self, identity):
        """A cert for `identity` that expired yesterday (not cached)."""
        tenant, device = identity.split("/")
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
        return self._write("expired-" + identity, *self.ca.issue_device(tenant, device, days=2, now=past))

    def foreign(self, identity):
        """A cert for `identity` signed by some other CA."""
        if self._foreign_ca is None:
            self._foreign_ca = CA.create(os.path.join(self.dir, "foreign-ca"), name="foreign CA")
        tenant, device = identity.split("/")
        return self._write("foreign-" + identity, *self._foreign_ca.issue_device(tenant, device))


# -- brokers -----------------------------------------------------------------

class BrokerUnderTest:
    """Either broker plus its ingest; everything accepted lands in `received`.

    `hook`, if set, is called (and awaited if it returns an awaitable) with
    (identity, topic, payload) before a message is recorded; raise in it to
    make the ingest refuse. `refusals` is the embedded broker's list, None
    for Mosquitto (which keeps no such list).
    """

    def __init__(self, kind, pki, data_dir, host=HOST, logger=None, **mosquitto_options):
        self.kind = kind
        self.pki = pki
        self.host = host
        self.port = free_port(host)
        self.received = []
        self.hook = None
        self.embedded = None
        self.mosquitto = None
        self.ingest = None
        self._cmd_sender = None
        if kind == "mosquitto":
            mosquitto_options.setdefault("acl_extra", TEST_ACL_EXTRA)
            self.mosquitto = Mosquitto.configure(
                str(data_dir), host, self.port, pki.ca_path, pki.server_cert, pki.server_key,
                logger=logger, **mosquitto_options)
        elif kind != "embedded":
            raise ValueError("unknown broker kind %r" % kind)
        self._logger = logger

    @property
    def refusals(self):
        return self.embedded.refusals if self.embedded else None

    async def _accept(self, identity, topic, payload):
        if self.hook is not None:
            result = self.hook(identity, topic, payload)
            if asyncio.iscoroutine(result):
                await result
        self.received.append((identity, topic, payload))

    async def start(self):
        if self.kind == "embedded":
            if self.embedded is None:
                self.embedded = Broker(self.host, self.port, self.pki.ca_path, self.pki.server_cert,
                                       self.pki.server_key, on_publish=self._accept, logger=self._logger)
            await self.embedded.start()
            return
        if not self.mosquitto.running:
            await self.mosquitto.start()
        if self.ingest is None:
            self.ingest = MosquittoIngest(self.host, self.port, self.pki.ca_path, *self.pki.ingest,
                                          callback=self._accept, logger=self._logger)
            await self.ingest.start()

    async def send_cmd(self, identity, payload):
        """Publish QoS 1 to t/<identity>/cmd as the cloud -> True once the broker has it."""
        topic = "t/%s/cmd" % identity
        if self.kind == "embedded":
            await self.embedded.internal_message_broadcast(topic, payload, 1)
            return True
        if self._cmd_sender is None:
            self._cmd_sender = Device(self.host, self.port, self.pki.ca_path, *self.pki.cmd_sender, CMD_SENDER)
            if await self._cmd_sender.connect() != 0:
                raise AssertionError("cmd sender refused")
        return await self._cmd_sender.publish(topic, payload)

    async def stop(self):
        if self._cmd_sender is not None:
            await self._cmd_sender.close()
            self._cmd_sender = None
        if self.embedded is not None:
            await self.embedded.stop()
        if self.ingest is not None:
            await self.ingest.stop()
            self.ingest = None
        if self.mosquitto is not None:
            await self.mosquitto.stop()

    async def restart(self):
        """Stop the broker process/listener and start it on the same port."""
        if self.kind == "embedded":
            await self.embedded.restart()
        else:
            await self.mosquitto.restart()  # the ingest reconnects by itself

    async def wait_received(self, n, timeout_s=WAIT_S):
        return await wait_until(lambda: len(self.received) >= n, timeout_s)

    def payloads(self, identity=None):
        return [p for (i, _, p) in self.received if identity is None or i == identity]


# -- devices -----------------------------------------------------------------

class Device:
    """A paho MQTT 3.1.1 client with a client certificate, for tests."""

    def __init__(self, host, port, ca_path, cert_path, key_path, client_id,
                 clean_session=True, keepalive_s=30, reconnect_delay_s=0.2):
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self.connacks = []      # CONNACK return codes, in order
        self.disconnects = 0
        self.messages = []      # (topic, payload)
        self.acked = []         # mids whose PUBACK arrived, in order
        self._subacks = {}
        self._running = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=ca_path, certfile=cert_path, keyfile=key_path,
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(reconnect_delay_s, 1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.append(mid)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.append(reason_code.value)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects += 1

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._subacks[mid] = [rc.value for rc in reason_codes]

    @property
    def connected(self):
        return self.client.is_connected()

    async def connect(self, timeout_s=WAIT_S):
        """-> CONNACK return code (0 = accepted) or TLS_FAILED / CLOSED / NO_CONNACK.

        On anything but 0 the client is shut down, so it does not retry.
        """
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.client.connect, self.host, self.port, self.keepalive_s)
        except (ssl.SSLError, OSError):
            return TLS_FAILED
        self._running = True
        self.client.loop_start()
        got = await wait_until(lambda: self.connacks or self.disconnects, timeout_s)
        outcome = self.connacks[0] if self.connacks else (CLOSED if got else NO_CONNACK)
        if outcome != 0:
            await self.close()
        return outcome

    async def publish(self, topic, payload, qos=1, timeout_s=WAIT_S):
        """-> True once acknowledged (QoS 1) or sent (QoS 0) within timeout_s."""
        info = self.client.publish(topic, payload, qos=qos)
        return await wait_until(info.is_published, timeout_s)

    def publish_nowait(self, topic, payload, qos=1):
        return self.client.publish(topic, payload, qos=qos)

    async def subscribe(self, topic, qos=1, timeout_s=WAIT_S):
        """-> granted codes from the SUBACK (128 = refused), or None on timeout."""
        _, mid = self.client.subscribe(topic, qos)
        if not await wait_until(lambda: mid in self._subacks, timeout_s):
            return None
        return self._subacks[mid]

    async def wait_connects(self, n, timeout_s=WAIT_S):
        return await wait_until(lambda: len(self.connacks) >= n and self.connected, timeout_s)

    async def close(self):
        if self._running:
            self._running = False
            self.client.disconnect()
            await asyncio.get_running_loop().run_in_executor(None, self.client.loop_stop)


def make_device(broker, identity, client_id=None, creds=None, **options):
    """A Device for `identity` (its own cert unless `creds` given) on `broker`."""
    cert, key = creds or broker.pki.device(identity)
    return Device(broker.host, broker.port, broker.pki.ca_path, cert, key,
                  client_id if client_id is not None else identity, **options)


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(params=[pytest.param("embedded"), pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker_kind(request):
    require_kind(request.param)
    return request.param


@pytest.fixture
async def any_cloud(broker_kind, tmp_path):
    """The reference cloud (cloud/service.py) on each broker in turn."""
    from cloud.service import Cloud
    c = Cloud(tmp_path / "cloud", broker=broker_kind)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


@pytest.fixture
async def broker(broker_kind, pki, tmp_path):
    b = BrokerUnderTest(broker_kind, pki, tmp_path / broker_kind)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def device_factory(broker):
    """make(identity, client_id=None, creds=None, **Device options) -> Device; all closed after."""
    made = []

    def make(identity, client_id=None, creds=None, **options):
        dev = make_device(broker, identity, client_id, creds, **options)
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in made:
            await dev.close()
