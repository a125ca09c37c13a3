"""The Linux board (Raspberry-Pi class): files on disk written with fsync and
rename, the system clock, and an MQTT transport on paho-mqtt."""

import logging
import os
import random
import ssl
import time

import paho.mqtt.client as paho

from agent import events, telemetry
from agent.actions import Append, Connect, Log, Publish, WriteAtomic
from board.codec import CODEC


class FileStorage:
    """The storage interface over a directory. write_atomic writes a temporary
    file, fsyncs it, renames it over the old one and fsyncs the directory, so a
    power cut leaves either the old or the new contents."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _path(self, name):
        if not name or "/" in name or name.startswith("."):
            raise ValueError("bad storage name %r" % (name,))
        return os.path.join(self.root, name)

    def read(self, name):
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def append(self, name, data):
        with open(self._path(name), "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_atomic(self, name, data):
        path = self._path(name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sync_dir()

    def remove(self, name):
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            return
        self._sync_dir()

    def _sync_dir(self):
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SystemClock:
    def now_ms(self):
        return time.time_ns() // 1_000_000

    def ticks_ms(self):
        return time.monotonic_ns() // 1_000_000


class SystemRng:
    def __init__(self):
        self._r = random.SystemRandom()

    def randint(self, a, b):
        return self._r.randint(a, b)


ACK_TIMEOUT_MS = 15000  # a broker that stops acknowledging is treated as gone


class LinuxAgent:
    """Drives the telemetry core on a Linux board: FileStorage, the system
    clock, and paho-mqtt as the transport. Single-threaded: paho's network
    loop is stepped by hand (client.loop) so paho never reconnects on its own;
    the core's backoff decides when to try again.

    ota: a board.linux_ota.LinuxOta to run firmware updates over the same
    connection (docs/firmware-boards.md), or None. key_password: of an
    encrypted keyfile (board/keystore.py FileKeystore): ssl decrypts it at
    each connect, so no clear copy of the key is ever written."""

    def __init__(self, root, tenant, device, host, port, cafile, certfile, keyfile,
                 config=None, codec=None, clock=None, rng=None, logger=None, ota=None,
                 key_password=None):
        self.storage = FileStorage(root)
        self.clock = clock or SystemClock()
        self.core = telemetry.Telemetry(tenant, device, codec or CODEC, rng or SystemRng(), config)
        self.identity = "%s/%s" % (tenant, device)
        self.host, self.port = host, port
        self.log = logger or logging.getLogger("tether.agent")
        self.tls = (cafile, certfile, keyfile, key_password)
        self.client = None
        self.mids = {}
        self.sent_ms = {}   # mid -> when published, for the PUBACK timeout
        self.inbox = []
        self.ota = ota
        self.acked = 0      # telemetry records acknowledged since this process started

    def boot(self):
        if self.ota is not None:
            self.ota.boot()
        self.execute(self.core.boot(self.storage.read("state"), self.storage.read("queue")))

    def sample(self, readings):
        self.feed(events.Sample(self.clock.now_ms(), readings))

    def feed(self, event):
        self.execute(self.core.handle(event))

    def step(self, timeout_s=0.05):
        """Run the network for a moment and hand what happened to the core."""
        self.feed(events.Tick(self.clock.now_ms()))
        if self.client is not None:
            if self.ota is not None and self.ota.step_pending:
                timeout_s = 0       # a signature check goes on: serve the network, do not wait
            rc = self.client.loop(timeout=timeout_s)
            if rc != 0 and self.client is not None:
                self._lost("network error %d" % rc)
        if self.sent_ms and self.client is not None:
            if self.clock.ticks_ms() - min(self.sent_ms.values()) > ACK_TIMEOUT_MS:
                self._lost("no PUBACK in %d ms" % ACK_TIMEOUT_MS)
        while self.inbox:
            self.feed(self.inbox.pop(0))
        if self.ota is not None:
            self.ota.step(self.acked)

    def execute(self, actions):
        for action in actions:
            if isinstance(action, Publish):
                if self.client is None:
                    continue  # lost meanwhile: ConnectionLost is queued; the core resends
                info = self.client.publish(action.topic, action.payload, qos=1)
                self.mids[info.mid] = action.token
                self.sent_ms[info.mid] = self.clock.ticks_ms()
            elif isinstance(action, Append):
                self.storage.append(action.name, action.data)
            elif isinstance(action, WriteAtomic):
                self.storage.write_atomic(action.name, action.data)
            elif isinstance(action, Connect):
                self._connect()
            elif isinstance(action, Log):
                self.log.info("%s: %s", action.code, action.detail)

    def _connect(self):
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.identity,
                             clean_session=True)
        cafile, certfile, keyfile, password = self.tls
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile, password)
        client.tls_set_context(ctx)
        client.tls_insecure_set(False)
        client.max_inflight_messages_set(self.core.config.inflight_max)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        if self.ota is not None:
            client.on_message = self._on_message
        self.client = client
        try:
            client.connect(self.host, self.port, keepalive=60)
        except (OSError, ssl.SSLError) as e:
            self.client = None
            self.inbox.append(events.ConnectionLost(self.clock.now_ms(), "connect failed: %s" % e))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code == 0:
            self.inbox.append(events.Connected(self.clock.now_ms()))
            if self.ota is not None:
                self.ota.connected(client)
        else:
            self._lost("refused: %s" % reason_code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if client is self.client:
            self._lost("disconnected: %s" % reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        token = self.mids.pop(mid, None)
        self.sent_ms.pop(mid, None)
        if token is not None and client is self.client:
            self.inbox.append(events.PubAcked(token))
            self.acked += 1

    def _on_message(self, client, userdata, message):
        if client is self.client and message.topic == self.ota.down_topic:
            self.ota.on_message(message.payload)

    def _lost(self, reason):
        """The connection is gone. PUBACKs already received stay queued ahead
        of the loss, so the core removes those records and resends the rest."""
        client, self.client = self.client, None
        self.mids.clear()
        self.sent_ms.clear()
        if self.ota is not None:
            self.ota.lost()
        if client is not None:
            try:
                client.disconnect()
            except (OSError, ValueError):
                pass
        if self.core.state != telemetry.OFFLINE:
            self.inbox.append(events.ConnectionLost(self.clock.now_ms(), reason))
