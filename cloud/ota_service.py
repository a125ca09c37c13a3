"""Firmware updates over MQTT: the rollout engine (cloud/rollout.py) wired
to the devices through the cloud's broker (embedded or Mosquitto, the same
code for both). The message format is in docs/ota.md.

- `OtaCore` turns one device message into engine calls and the messages to
  send back; it never touches the network (so it is fuzzed directly).
- `OtaService` is the client "$cloud/ota" (cloud/ca.py OTA_IDENTITY): it
  subscribes to t/+/+/ota, publishes on t/<tenant>/<device>/update, and
  runs `engine.tick(now)` every `tick_s`, on its own database connections.

The broker's ACL has already checked that a message's topic belongs to the
certificate that sent it (cloud/broker.py SERVICE_TOPICS), so the topic
names the sender. An offer is sent, and a chunk or page served, only
while `Engine.offer_for(device)` still names that release: a pause, abort,
halt or kill made by any process (the CLI) takes effect at the next message.

A device whose manifest is paged (over 512 KiB as the tool builds them, docs/firmware-signing.md)
asks for page p before chunks 128p..: page p is the 4 KiB slice p of the
release's chunk table (cloud/firmware.py chunk_table, every chunk's SHA-256
end to end), computed once per release and cached beside its bundle and
payload.
"""

import collections
import logging
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from agent import manifest as mf
from agent import ota_wire
from agent.ota_wire import REASON_CHARS_MAX, UP, UP_BYTES_MAX, WireError, encode
from cloud.ca import OTA_IDENTITY
from cloud.errors import CloudError
from cloud.firmware import chunk_table
from cloud.rollout import Engine, Policy
from cloud.rollout_actions import Cancel, Offer
from cloud.rollout_plan import RolloutError

log = logging.getLogger("tether.ota")

REPORTS_KEPT_MAX = 10000            # recent reports kept in memory (the engine keeps the record)
REFUSALS_KEPT_MAX = 1000            # recent refusals kept in memory (every one is logged)
RELEASES_CACHED_MAX = 8             # (bundle, payload), and chunk tables, kept in memory for serving ...
CACHE_BYTES_MAX = 512 << 20         # ... and at most this many bytes of each (the newest always kept)
TICK_S_DEFAULT = 1.0
START_TIMEOUT_S = 10.0


class OtaError(CloudError):
    """A message refused, with a machine-readable code."""
    code = "ota"


# ---------------------------------------------------------------- the format

def parse(payload, table, bytes_max):
    """agent/ota_wire.py's parse, refusals as OtaError (the cloud's errors)."""
    try:
        return ota_wire.parse(payload, table, bytes_max)
    except WireError as e:
        raise OtaError(e.message, e.code)


def device_of(topic, kind="ota"):
    """(tenant, device) of t/<tenant>/<device>/<kind>, or OtaError."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 4 or parts[0] != "t" or parts[3] != kind or not parts[1] or not parts[2]:
        raise OtaError("not an OTA topic: %r" % (topic,), "bad_topic")
    return parts[1], parts[2]


def update_topic(identity):
    return "t/%s/update" % identity


# ---------------------------------------------------------------- the core

class OtaCore:
    """Device messages in, engine calls, messages out. Not thread-safe: the
    service holds one lock around every call."""

    def __init__(self, engine):
        self.engine = engine
        self.cache = collections.OrderedDict()    # release id -> (bundle, payload)
        self.tables = collections.OrderedDict()   # release id -> chunk table (the pages)
        self.reports = collections.deque(maxlen=REPORTS_KEPT_MAX)
        self.refusals = collections.deque(maxlen=REFUSALS_KEPT_MAX)
        self.counts = {"hello": 0, "report": 0, "chunk_served": 0, "page_served": 0,
                       "offers_sent": 0, "refused": 0}
        self.refused_by_code = {}

    def on_message(self, topic, payload, now_ms):
        """[(topic, payload)] to publish in answer. Never raises for bad input:
        a refusal is recorded, logged and answered with an error message."""
        try:
            tenant, device = device_of(topic)
        except OtaError as e:
            self.refuse(str(topic)[:100], e)
            return []
        identity = "%s/%s" % (tenant, device)
        try:
            op, f = parse(payload, UP, UP_BYTES_MAX)
            return getattr(self, "_" + op)(identity, tenant, f, now_ms)
        except (OtaError, RolloutError) as e:
            self.refuse(identity, e)
            return [(update_topic(identity), encode("error", why=e.code, ref=""))]

    def tick(self, now_ms):
        return self.deliver(self.engine.tick(now_ms))

    def deliver(self, actions):
        """Carry out the engine's actions: an offer only while the engine still
        stands by it; a cancel is pushed."""
        out = []
        for action in actions:
            if isinstance(action, Offer) and self.engine.offer_for(action.device) == action:
                out.append(self._offer(action))
            elif isinstance(action, Cancel):
                out.append((update_topic(action.device),
                            encode("cancel", ref=action.release, why=str(action.reason)[:REASON_CHARS_MAX])))
        return out

    # -- device messages ------------------------------------------------------------

    def _hello(self, identity, tenant, f, now_ms):
        self.counts["hello"] += 1
        self.engine.observe(identity, tenant, f["site"], f["hw"], f["ver"], now_ms)
        # Answered, so a device whose hello was lost (the service reconnecting) says it again;
        # a reconnect gets its offer again.
        out = [(update_topic(identity), encode("welcome", now=now_ms))]
        offer = self.engine.offer_for(identity)
        return out if offer is None else out + [self._offer(offer)]

    def _report(self, identity, tenant, f, now_ms):
        self.counts["report"] += 1
        self.reports.append({"device": identity, "status": f["st"], "reason": f["why"], "seq": f["seq"],
                             "ref": f["ref"], "ms": now_ms})
        actions = self.engine.report(identity, f["st"], f["why"], f["seq"], now_ms, release=f["ref"] or None)
        return self.deliver(actions)

    def _chunk(self, identity, tenant, f, now_ms):
        return self._serve(identity, "chunk", f, lambda release: self.blobs(release)[1], mf.CHUNK_BYTES)

    def _page(self, identity, tenant, f, now_ms):
        return self._serve(identity, "page", f, self.chunk_table, mf.PAGE_BYTES)

    def _serve(self, identity, op, f, source, piece_bytes):
        """Piece f["i"] of source(release) as an `op` message, only while the
        engine offers that release to identity."""
        offer = self.engine.offer_for(identity)
        if offer is None or offer.release != f["ref"]:
            return self._not_offered(identity, f["ref"])
        data = source(offer.release)
        start = f["i"] * piece_bytes
        if start >= len(data):
            raise OtaError("%s %d is past the release's last" % (op, f["i"]), "bad_index")
        self.counts[op + "_served"] += 1
        piece = data[start:start + piece_bytes]
        return [(update_topic(identity), encode(op, ref=offer.release, i=f["i"], data=piece))]

    def _not_offered(self, identity, release):
        self.refuse(identity, OtaError("%s is not offered %s now" % (identity, release), "not_offered"))
        out = [(update_topic(identity), encode("error", why="not_offered", ref=release))]
        if self._known(release):
            # A release of ours, withdrawn: a device that missed the cancel
            # (offline then, sessions are clean) would ask for it forever.
            out.append((update_topic(identity), encode("cancel", ref=release, why="not offered now")))
        return out

    # -- helpers --------------------------------------------------------------------

    def _offer(self, offer):
        self.counts["offers_sent"] += 1
        bundle = self.blobs(offer.release)[0]
        return update_topic(offer.device), encode("offer", ref=offer.release, bundle=bundle)

    def _known(self, release):
        try:
            self.engine.release(release)
        except RolloutError:
            return False
        return True

    def blobs(self, release):
        """(bundle, payload) of a release, from a small cache (cloud/fw_http.py serves from it too)."""
        def load():
            bundle, payload = self.engine.release_blobs(release)
            return bytes(bundle), bytes(payload)
        return _cached(self.cache, release, load)

    def chunk_table(self, release):
        """A release's chunk hashes end to end (page p is slice p), from a small cache."""
        return _cached(self.tables, release, lambda: chunk_table(self.blobs(release)[1]))

    def refuse(self, who, error):
        """Record, count and log a refused message or request."""
        code = getattr(error, "code", "refused")
        self.counts["refused"] += 1
        self.refused_by_code[code] = self.refused_by_code.get(code, 0) + 1
        self.refusals.append({"device": who, "code": code, "detail": str(error)[:200], "ms": _now_ms()})
        log.warning("ota: refused a message from %s: %s (%s)", who, code, error)


def _cached(cache, release, make):
    """cache[release], made on a miss; the least recently used go past
    RELEASES_CACHED_MAX entries or CACHE_BYTES_MAX bytes (224 MiB images:
    a count alone would not bound the memory)."""
    if release in cache:
        cache.move_to_end(release)
        return cache[release]
    value = cache[release] = make()
    while len(cache) > 1 and (len(cache) > RELEASES_CACHED_MAX
                              or sum(_bytes_of(v) for v in cache.values()) > CACHE_BYTES_MAX):
        cache.popitem(last=False)
    return value


def _bytes_of(value):
    return sum(len(v) for v in value) if isinstance(value, tuple) else len(value)


def _now_ms():
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- the MQTT client

class OtaService:
    """The client "$cloud/ota" on the device listener, and the tick loop."""

    def __init__(self, db_path, host, port, cafile, cred, policy=None, tick_s=TICK_S_DEFAULT,
                 clock_ms=_now_ms):
        self.engine = Engine(db_path, policy or Policy())
        self.core = OtaCore(self.engine)
        self.lock = threading.Lock()
        self.clock_ms = clock_ms
        self.tick_s = tick_s
        self.subscribed = threading.Event()
        self.stopping = threading.Event()
        self.ticker = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=OTA_IDENTITY,
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=cafile, certfile=cred[0], keyfile=cred[1],
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(0.2, 5)
        self.client.max_queued_messages_set(100000)     # bounded: paho drops past it (logged by paho)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subscribed.set()
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    async def start(self, timeout_s=START_TIMEOUT_S):
        import asyncio
        self.client.connect_async(self.host, self.port, 30)
        self.client.loop_start()
        if not await asyncio.get_running_loop().run_in_executor(None, self.subscribed.wait, timeout_s):
            await self.stop()
            raise OtaError("%s not subscribed within %.0f s" % (OTA_IDENTITY, timeout_s), "ota_service")
        self.ticker = threading.Thread(target=self._tick_loop, name="ota-tick", daemon=True)
        self.ticker.start()

    async def stop(self):
        import asyncio
        self.stopping.set()
        loop = asyncio.get_running_loop()
        if self.ticker is not None:
            await loop.run_in_executor(None, self.ticker.join, 5)
        await loop.run_in_executor(None, self._disconnect)
        with self.lock:
            self.engine.close()

    def _disconnect(self):
        self.client.disconnect()
        self.client.loop_stop()

    def push(self, identity, payload):
        """Publish raw bytes on a device's update topic: what any holder of
        this service's credential can send (the demo's attacks use it)."""
        self.client.publish(update_topic(identity), payload, qos=1)

    def tick_now(self):
        with self.lock:
            out = self.core.tick(self.clock_ms())
        self._send(out)

    def _tick_loop(self):
        while not self.stopping.wait(self.tick_s):
            try:
                self.tick_now()
            except Exception:          # a failing tick is logged and tried again next time
                log.exception("ota: tick failed")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("%s refused by the broker: %s", OTA_IDENTITY, reason_code)
            return
        client.subscribe("t/+/+/ota", qos=1)

    def _on_message(self, client, userdata, msg):
        try:
            with self.lock:
                out = self.core.on_message(msg.topic, msg.payload, self.clock_ms())
        except Exception:  # a bug, not bad input (that is refused above): logged, the service goes on
            log.exception("ota: failed on %s", msg.topic)
            return
        self._send(out)

    def _send(self, out):
        for topic, payload in out:
            self.client.publish(topic, payload, qos=1)
