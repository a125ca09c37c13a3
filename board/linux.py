"""The Linux board (Raspberry-Pi class): files on disk written with fsync and
rename, the system clock, and an MQTT transport on paho-mqtt."""

import logging
import os
import random
import ssl
import time

import paho.mqtt.client as paho

from agent import events, telemetry
from agent.actions import Append, Connect, Log, Publish, UseIdentity, WriteAtomic
from board.codec import CODEC
from board.enroller import refusal_reason


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
    each connect, so no clear copy of the key is ever written.

    audit: a board.linux_console.AuditLink carrying the field console's
    audit log to the cloud over this connection, or None.

    id_driver: a board.linux_identity.LinuxIdentity to rotate the
    certificate over this connection (and recover an expired one), or None.
    With it, the TLS context of each connect is the id_driver's (the
    certificate it says is in force), not certfile/keyfile; its link
    events are its own (Refused before a CONNACK, ConnectionLost after)."""

    def __init__(self, root, tenant, device, host, port, cafile, certfile, keyfile,
                 config=None, codec=None, clock=None, rng=None, logger=None, ota=None,
                 key_password=None, id_driver=None, audit=None):
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
        self.id_driver = id_driver
        self.audit = audit
        self.id_inbox = []  # events for the identity core, after the telemetry core's
        self.accepted = False   # the broker sent CONNACK 0 on self.client
        self.sock_error = None  # what paho last logged as a socket error (a TLS alert, say)

    def boot(self):
        if self.ota is not None:
            self.ota.boot()
        if self.id_driver is not None:
            self.carry(self.id_driver.boot())     # a candidate left by a power cut is tried first
        self.execute(self.core.boot(self.storage.read("state"), self.storage.read("queue")))

    def sample(self, readings):
        self.feed(events.Sample(self.clock.now_ms(), readings))

    def feed(self, event):
        self.execute(self.core.handle(event))

    def step(self, timeout_s=0.05):
        """Run the network for a moment and hand what happened to the core."""
        self.feed(events.Tick(self.clock.now_ms()))
        self.feed_identity(events.Tick(self.clock.now_ms()))
        if self.client is not None:
            if self.ota is not None and self.ota.busy():
                timeout_s = 0       # a signature check or a download goes on: serve the network, do not wait
            rc = self.client.loop(timeout=timeout_s)
            if rc != 0 and self.client is not None:
                self._lost("network error %d" % rc)
        if self.sent_ms and self.client is not None:
            if self.clock.ticks_ms() - min(self.sent_ms.values()) > ACK_TIMEOUT_MS:
                self._lost("no PUBACK in %d ms" % ACK_TIMEOUT_MS)
        while self.inbox:
            self.feed(self.inbox.pop(0))
        while self.id_inbox:
            self.feed_identity(self.id_inbox.pop(0))
        if self.ota is not None:
            self.ota.step(self.acked)
        if self.audit is not None:
            self.audit.step()

    def feed_identity(self, event):
        if self.id_driver is not None:
            self.carry(self.id_driver.handle(event))

    def carry(self, actions):
        """The identity core's transport actions."""
        for action in actions:
            if isinstance(action, Publish):
                if self.accepted:
                    self._publish(action)   # not connected: the core asks again (confirm, timeout)
            elif isinstance(action, UseIdentity):
                # What the old connection said (a refusal of the old
                # certificate, queued this pass) is not about this one.
                self.id_inbox = [e for e in self.id_inbox
                                 if not isinstance(e, (events.Connected, events.ConnectionLost, events.Refused))]
                if self.client is not None:
                    # Reconnect with that certificate: the telemetry core's backoff
                    # decides when, and the next connect takes the id_driver's context.
                    self._lost("reconnecting with another certificate", chosen=True)

    def _publish(self, action):
        info = self.client.publish(action.topic, action.payload, qos=1)
        self.mids[info.mid] = action.token
        self.sent_ms[info.mid] = self.clock.ticks_ms()

    def execute(self, actions):
        for action in actions:
            if isinstance(action, Publish):
                if self.client is None:
                    continue  # lost meanwhile: ConnectionLost is queued; the core resends
                self._publish(action)
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
        client.tls_set_context(self._context())
        client.tls_insecure_set(False)
        client.max_inflight_messages_set(self.core.config.inflight_max)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        if self.ota is not None or self.id_driver is not None or self.audit is not None:
            client.on_message = self._on_message
        self.client = client
        self.accepted = False
        self.sock_error = None
        try:
            client.connect(self.host, self.port, keepalive=60)
        except (OSError, ssl.SSLError) as e:
            self.client = None
            self.inbox.append(events.ConnectionLost(self.clock.now_ms(), "connect failed: %s" % e))
            if isinstance(e, ssl.SSLError):       # the handshake refused our certificate (TLS 1.2)
                self.id_inbox.append(events.Refused(self.clock.now_ms(), refusal_reason(e)))
            else:
                self.id_inbox.append(events.ConnectionLost(self.clock.now_ms(), str(e)))

    def _context(self):
        if self.id_driver is not None:
            return self.id_driver.context()
        cafile, certfile, keyfile, password = self.tls
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile, password)
        return ctx

    def _on_log(self, client, userdata, level, text):
        if level == paho.MQTT_LOG_ERR and client is self.client:
            self.sock_error = text

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if client is not self.client:
            return
        if reason_code == 0:
            if not self.accepted:
                self.log.info("connected to %s:%d as %s", self.host, self.port, self.identity)
            self.accepted = True
            self.inbox.append(events.Connected(self.clock.now_ms()))
            if self.ota is not None:
                self.ota.connected(client)
            if self.id_driver is not None:
                client.subscribe(self.id_driver.answer_topic, qos=1)
                self.id_inbox.append(events.Connected(self.clock.now_ms()))
            if self.audit is not None:
                self.audit.connected(client)
        else:
            # "Not authorized" -> not_authorized, as the identity core names refusals
            self._lost("refused: %s" % reason_code, str(reason_code).lower().replace(" ", "_"))

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
        if client is not self.client:
            return
        if self.ota is not None and message.topic == self.ota.down_topic:
            self.ota.on_message(message.payload)
        elif self.id_driver is not None and message.topic == self.id_driver.answer_topic:
            self.id_inbox.append(events.Message(self.clock.now_ms(), message.topic, message.payload))
        elif self.audit is not None and message.topic == self.audit.down_topic:
            self.audit.on_message(message.payload)

    def _lost(self, reason, refused=None, chosen=False):
        """The connection is gone. PUBACKs already received stay queued ahead
        of the loss, so the core removes those records and resends the rest.
        The identity core hears a refusal of its certificate (a CONNACK
        refusal, a TLS alert, or closed before any CONNACK: TLS 1.3 refuses a
        client certificate after the handshake), else a lost connection;
        chosen: we drop it ourselves, which refuses nothing."""
        client, self.client = self.client, None
        if client is not None and self.accepted and not chosen:
            self.log.info("connection lost: %s", reason)
        if client is not None and self.id_driver is not None:
            if refused is None and not self.accepted and not chosen:
                refused = refusal_reason(self.sock_error) if self.sock_error else "closed"
            self.id_inbox.append(events.Refused(self.clock.now_ms(), refused) if refused is not None
                                 else events.ConnectionLost(self.clock.now_ms(), reason))
        self.accepted = False
        self.mids.clear()
        self.sent_ms.clear()
        if self.ota is not None:
            self.ota.lost()
        if self.audit is not None and client is not None:
            self.audit.lost()
        if client is not None:
            try:
                client.disconnect()
            except (OSError, ValueError):
                pass
        if self.core.state != telemetry.OFFLINE:
            self.inbox.append(events.ConnectionLost(self.clock.now_ms(), reason))
