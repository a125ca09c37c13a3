"""Mosquitto as the production broker: its config, its process, its ingest.

- `write_config(...)` writes mosquitto.conf and an ACL file into a data dir.
  Identity is the client certificate's CN (`use_identity_as_username`); the
  ACL is the one in docs/design.md.
- `Mosquitto` starts, stops, restarts and reloads one mosquitto process.
- `MosquittoIngest` is the cloud's subscriber: CN "$cloud/ingest", a
  persistent session, QoS 1, and a PUBACK only after the callback returned,
  so a message the broker has handed over is lost only if the ingest
  acknowledged it.

Client-id takeover (measured with mosquitto 2.0.11, see
tests/test_broker_security.py): without `use_username_as_clientid`,
mosquitto accepts a device whose client id names *another* device
(CONNACK 0), closes the real device's connection ("already connected,
closing old connection") and, when both use clean_session=False, hands the
victim's session and queued messages to the impostor. The ACL still uses
the impostor's own CN, so it cannot publish or subscribe as the victim, but
it can kick the victim off over and over. With `use_username_as_clientid
true` (our default, `client_id_from_identity=True`) mosquitto replaces
every client id with the certificate CN before the session lookup, so an
impostor only ever takes over its own session and the victim stays
connected. The impostor is *not* refused at CONNECT, unlike the embedded
broker; refusing it would need an auth plugin.
"""

import asyncio
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

from cloud.ca import CLAIMS_IDENTITY, INGEST_IDENTITY, parse_identity
from cloud.errors import MosquittoError

CONF_FILE = "mosquitto.conf"
ACL_FILE = "acl"
LOG_FILE = "mosquitto.log"
STDERR_FILE = "mosquitto.stderr"
DB_DIR = "db"

INGEST_TOPIC = "t/+/+/telemetry"

# Per-client queue of QoS 1 messages (beyond those in flight). The ingest is
# the one client that can fall behind: 1,000 devices at one record a second
# give it about 100 s of outage before Mosquitto starts dropping.
MAX_QUEUED_MESSAGES = 1_000_000  # beyond this Mosquitto drops (and logs) messages for a lagging ingest
MAX_INFLIGHT_MESSAGES = 100
INGEST_PENDING_MAX = 1000  # records handed to the ingest and not yet acknowledged, at most
PACKET_MAX_BYTES = 64 * 1024
AUTOSAVE_INTERVAL_S = 30

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
LOG_TAIL_BYTES = 2000

_NULL_LOGGER = logging.Logger("tether.null")
_NULL_LOGGER.addHandler(logging.NullHandler())


def find_mosquitto():
    """Path of the mosquitto binary, or None. $TETHER_MOSQUITTO wins."""
    for candidate in (os.environ.get("TETHER_MOSQUITTO"), shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def acl_text(extra=(), denied=(), quarantined=()):
    """The ACL of docs/design.md; `extra` lines are appended (tests add a cmd
    sender); each `denied` identity (revoked) may touch no topic at all,
    whatever certificate it comes with (deny is checked before any grant)."""
    text = (
        "# tether ACL: identity = certificate CN = MQTT username (%u)\n"
        "pattern write t/%u/telemetry\n"
        "pattern read t/%u/cmd\n"
        "\n"
        "user " + INGEST_IDENTITY + "\n"
        "topic read t/#\n"
    ) + _service_acl()
    text += "".join(line + "\n" for line in extra)
    for identity in set(denied) | set(quarantined):
        parse_identity(identity)  # an identity can never carry ACL syntax into this file
    for identity in sorted(denied):
        text += "\n# revoked\nuser %s\ntopic deny #\n" % identity
    for identity in sorted(set(quarantined) - set(denied)):
        text += ("\n# quarantined: telemetry (flagged by the ingest), diagnostics out, updates in\n"
                 "user %s\ntopic deny t/%s/cmd\ntopic write q/%s/diag\ntopic read q/%s/update\n"
                 % (identity, identity, identity, identity))
    return text


def _service_acl():
    """Device <-> service topics from the one table both brokers use
    (cloud/broker.py SERVICE_TOPICS)."""
    from cloud.broker import SERVICE_TOPICS
    lines = ["# device <-> cloud service topics (cloud/broker.py SERVICE_TOPICS)"]
    owners = {}
    for kind, (direction, owner) in sorted(SERVICE_TOPICS.items()):
        lines.append("pattern %s t/%%u/%s" % ("write" if direction == "up" else "read", kind))
        owners.setdefault(owner, []).append("topic %s t/+/+/%s" % ("read" if direction == "up" else "write", kind))
    for owner in sorted(owners):
        lines += ["", "user " + owner] + owners[owner]
    return "\n".join(lines) + "\n"


def config_text(data_dir, host, port, ca_path, cert_path, key_path,
                max_queued_messages=MAX_QUEUED_MESSAGES,
                max_inflight_messages=MAX_INFLIGHT_MESSAGES,
                autosave_interval_s=AUTOSAVE_INTERVAL_S,
                client_id_from_identity=True, crl_path=None):
    lines = [
        "# written by cloud/mosquitto.py; edits are overwritten",
        "per_listener_settings false",
        "allow_anonymous false",
        "acl_file %s" % os.path.join(data_dir, ACL_FILE),
        "persistence true",
        "persistence_location %s/" % os.path.join(data_dir, DB_DIR),
        "autosave_interval %d" % autosave_interval_s,
        "max_queued_messages %d" % max_queued_messages,
        "max_inflight_messages %d" % max_inflight_messages,
        # One packet can never make Mosquitto buffer more than this (the
        # embedded broker has the same bound: cloud/broker.py PACKET_MAX_BYTES).
        "max_packet_size %d" % PACKET_MAX_BYTES,
    ] + _log_and_user(data_dir) + _tls_listener(port, host, ca_path, cert_path, key_path)
    if client_id_from_identity:
        lines.append("use_username_as_clientid true")
    if crl_path is not None:
        lines.append("crlfile %s" % crl_path)  # reread on SIGHUP (reload())
    return "\n".join(lines) + "\n"


def prov_config_text(data_dir, host, port, claim_ca_path, cert_path, key_path):
    """The provisioning endpoint as its own mosquitto process. Its own,
    because Mosquitto keeps one client-id namespace per process: a claim
    certificate (shared by a whole batch, so the client id cannot be the
    certificate's name) on a listener of the main broker could take any
    client id there, a device's or the ingest's, and end that session.
    Here only claim-CA certificates are trusted and only prov/ topics exist."""
    lines = [
        "# written by cloud/mosquitto.py; edits are overwritten",
        "per_listener_settings false",
        "allow_anonymous false",
        "acl_file %s" % os.path.join(data_dir, ACL_FILE),
        "persistence false",
        "max_packet_size %d" % PACKET_MAX_BYTES,
    ] + _log_and_user(data_dir) + _tls_listener(port, host, claim_ca_path, cert_path, key_path)
    return "\n".join(lines) + "\n"


def _log_and_user(data_dir):
    lines = ["log_dest file %s" % os.path.join(data_dir, LOG_FILE)]
    lines += ["log_type %s" % t for t in ("error", "warning", "notice", "information")]
    lines += ["connection_messages true", "log_timestamp true"]
    if os.geteuid() == 0:
        # As root mosquitto would switch to user "mosquitto", which cannot
        # read our 0600 keys or write the data dir.
        lines.append("user root")
    return lines


def _tls_listener(port, host, ca_path, cert_path, key_path):
    """An mTLS listener that trusts only `ca_path`; identity = certificate CN."""
    return ["", "listener %d %s" % (port, host), "cafile %s" % ca_path, "certfile %s" % cert_path,
            "keyfile %s" % key_path, "require_certificate true", "use_identity_as_username true",
            "tls_version tlsv1.2"]


PROV_ACL = (
    "# provisioning endpoint: a claim certificate (client id = hardware id)\n"
    "# only on prov/<claim>/<hwid>/. A client id with / only makes topics\n"
    "# nobody subscribes to; + and # are refused by Mosquitto.\n"
    "pattern write prov/%u/%c/req\n"
    "pattern read prov/%u/%c/resp\n"
    "\n"
    "user " + CLAIMS_IDENTITY + "\n"
    "topic read prov/+/+/req\n"
    "topic write prov/+/+/resp\n"
)


def write_prov_config(data_dir, host, port, claim_ca_path, cert_path, key_path):
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(data_dir, ACL_FILE), "w") as f:
        f.write(PROV_ACL)
    with open(os.path.join(data_dir, CONF_FILE), "w") as f:
        f.write(prov_config_text(data_dir, host, port, claim_ca_path, cert_path, key_path))


def write_acl(data_dir, extra=(), denied=(), quarantined=()):
    """(Re)write the ACL file; a running Mosquitto rereads it on reload()."""
    path = os.path.join(os.path.abspath(data_dir), ACL_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(acl_text(extra, denied, quarantined))
    os.replace(tmp, path)


def write_config(data_dir, host, port, ca_path, cert_path, key_path, acl_extra=(), **options):
    """Write mosquitto.conf and acl into `data_dir` -> path of mosquitto.conf.

    Options: max_queued_messages, max_inflight_messages, autosave_interval_s,
    client_id_from_identity (see the module docstring).
    """
    data_dir = os.path.abspath(data_dir)
    os.makedirs(os.path.join(data_dir, DB_DIR), exist_ok=True)
    write_acl(data_dir, acl_extra, options.pop("denied", ()), options.pop("quarantined", ()))
    conf_path = os.path.join(data_dir, CONF_FILE)
    with open(conf_path, "w") as f:
        f.write(config_text(data_dir, host, port, ca_path, cert_path, key_path, **options))
    return conf_path


def _port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Mosquitto:
    """One mosquitto process serving the config in `data_dir`."""

    def __init__(self, data_dir, host, port, binary=None, logger=None):
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.port = port
        self.binary = binary or find_mosquitto()
        self.logger = logger or _NULL_LOGGER
        self._proc = None

    @classmethod
    def configure(cls, data_dir, host, port, ca_path, cert_path, key_path, binary=None, logger=None, **options):
        """write_config(...) and return a Mosquitto for it (not started)."""
        write_config(data_dir, host, port, ca_path, cert_path, key_path, **options)
        return cls(data_dir, host, port, binary=binary, logger=logger)

    @property
    def conf_path(self):
        return os.path.join(self.data_dir, CONF_FILE)

    @property
    def log_path(self):
        return os.path.join(self.data_dir, LOG_FILE)

    @property
    def running(self):
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self):
        return self._proc.pid if self.running else None

    async def start(self, timeout_s=START_TIMEOUT_S):
        """Start mosquitto and return once its port accepts connections."""
        if self.running:
            raise MosquittoError("mosquitto is already running", code="mosquitto_running")
        if self.binary is None:
            raise MosquittoError("mosquitto binary not found", code="mosquitto_missing")
        if _port_open(self.host, self.port):
            raise MosquittoError("%s:%d is already in use" % (self.host, self.port), code="mosquitto_port_busy")
        with open(os.path.join(self.data_dir, STDERR_FILE), "ab") as err:
            self._proc = subprocess.Popen(
                [self.binary, "-c", self.conf_path],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.host, self.port):
            if self._proc.poll() is not None:
                raise self._failed("mosquitto exited with %s" % self._proc.returncode)
            if time.monotonic() > deadline:
                await self.stop()
                raise self._failed("mosquitto did not open %s:%d in %.1f s" % (self.host, self.port, timeout_s))
            await asyncio.sleep(POLL_S)
        self.logger.info("mosquitto started pid=%d port=%d", self._proc.pid, self.port,
                         extra={"event": "mosquitto.started", "pid": self._proc.pid, "port": self.port})

    def _failed(self, message):
        detail = _tail(os.path.join(self.data_dir, STDERR_FILE)) + _tail(self.log_path)
        return MosquittoError("%s\n%s" % (message, detail), code="mosquitto_start")

    async def stop(self, timeout_s=STOP_TIMEOUT_S):
        """SIGTERM (mosquitto saves its database), wait; SIGKILL after timeout_s."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if proc.poll() is None:
            self.logger.warning("mosquitto ignored SIGTERM; killing", extra={"event": "mosquitto.killed"})
            proc.kill()
            proc.wait()
        self.logger.info("mosquitto stopped rc=%s", proc.returncode,
                         extra={"event": "mosquitto.stopped", "rc": proc.returncode})

    async def restart(self):
        await self.stop()
        await self.start()

    def reload(self):
        """SIGHUP: mosquitto rereads its config and ACL file."""
        if not self.running:
            raise MosquittoError("mosquitto is not running", code="mosquitto_not_running")
        self._proc.send_signal(signal.SIGHUP)


class MosquittoIngest:
    """The cloud's subscriber on Mosquitto, acknowledging only after the callback.

    `callback(identity, topic, payload)` may be a plain function or return an
    awaitable. It runs on the event loop that called `start()` (so an
    ingest holding an SQLite connection stays on one thread); paho's network
    thread waits for it, then sends the PUBACK. If the callback raises or
    takes longer than `callback_timeout_s`, no PUBACK is sent and the
    connection is dropped: Mosquitto keeps the message in our persistent
    session and sends it again after paho reconnects.
    """

    def __init__(self, host, port, ca_path, cert_path, key_path, callback,
                 client_id=INGEST_IDENTITY, logger=None, keepalive_s=30,
                 callback_timeout_s=30.0, reconnect_delay_s_max=30):
        self.host = host
        self.port = port
        self.callback = callback
        self.logger = logger or _NULL_LOGGER
        self.keepalive_s = keepalive_s
        self.callback_timeout_s = callback_timeout_s
        self.received = 0
        self.acked = 0
        self.failures = 0
        self._loop = None
        self._subscribed = threading.Event()
        # Mosquitto's max_inflight_messages should bound what it sends us
        # unacknowledged, but 2.0.11 was measured to exceed it under load
        # (docs/benchmarks.md); this bound is ours and does not depend on it.
        self._room = threading.BoundedSemaphore(INGEST_PENDING_MAX)
        self._stopping = False
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
            clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True,
        )
        self._client.tls_set(ca_certs=ca_path, certfile=cert_path, keyfile=key_path,
                             cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._client.reconnect_delay_set(1, reconnect_delay_s_max)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    async def start(self, timeout_s=START_TIMEOUT_S):
        """Connect and return once the subscription is granted."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._subscribed.clear()
        self._client.connect_async(self.host, self.port, self.keepalive_s)
        self._client.loop_start()
        granted = await self._loop.run_in_executor(None, self._subscribed.wait, timeout_s)
        if not granted:
            await self.stop()
            raise MosquittoError("ingest not subscribed within %.1f s" % timeout_s, code="ingest_subscribe")

    async def stop(self):
        self._stopping = True
        # In an executor: paho's thread may be waiting for a callback that
        # needs this event loop.
        await asyncio.get_running_loop().run_in_executor(None, self._stop_blocking)

    def _stop_blocking(self):
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.logger.warning("ingest connect refused: %s", reason_code,
                                extra={"event": "ingest.connect_refused", "reason": str(reason_code)})
            return
        client.subscribe(INGEST_TOPIC, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if all(not rc.is_failure for rc in reason_codes):
            self._subscribed.set()
        else:
            self.logger.error("ingest subscription refused", extra={"event": "ingest.subscribe_refused"})

    def _on_message(self, client, userdata, msg):
        """Hand the record to the ingest and return at once, so paho keeps
        reading and the ingest can commit many records in one group; the
        PUBACK goes out when this record's commit is done. Mosquitto's
        max_inflight_messages bounds how many wait unacknowledged."""
        self.received += 1
        identity = identity_from_topic(msg.topic)
        if identity is None:
            # The subscription filter makes this impossible; ack and drop.
            self.logger.warning("ingest dropped topic %r", msg.topic,
                                extra={"event": "ingest.bad_topic", "topic": msg.topic})
            client.ack(msg.mid, msg.qos)
            return
        # Back-pressure: paho stops reading until the ingest catches up. When
        # stopping, leave the record unacknowledged: Mosquitto keeps it.
        while not self._room.acquire(timeout=0.2):
            if self._stopping:
                return
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(_call(self.callback, identity, msg.topic, msg.payload),
                             self.callback_timeout_s), self._loop)
        future.add_done_callback(lambda f, mid=msg.mid, qos=msg.qos, topic=msg.topic:
                                 self._finish(client, f, mid, qos, topic))

    def _finish(self, client, future, mid, qos, topic):
        self._room.release()
        if future.cancelled() or future.exception() is not None:
            self.failures += 1
            self.logger.warning("ingest callback failed: %r; not acknowledged",
                                None if future.cancelled() else future.exception(),
                                extra={"event": "ingest.callback_failed", "topic": topic})
            self._drop_connection()
            return
        client.ack(mid, qos)
        self.acked += 1

    def _drop_connection(self):
        # Shutting the socket makes paho's next read see a closed connection;
        # its loop then reconnects (with backoff) and Mosquitto resends.
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


async def _call(callback, *args):
    result = callback(*args)
    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
        result = await result
    return result


def identity_from_topic(topic):
    """'t/<tenant>/<device>/telemetry' -> '<tenant>/<device>', else None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "t" or parts[3] != "telemetry":
        return None
    return parts[1] + "/" + parts[2]
