"""The support service on MQTT: "$cloud/support", one client of the cloud's
broker on the device listener (embedded or Mosquitto, the same code).

- subscribes t/+/+/audit: devices' hellos and audit log segments
  (agent/audit_upload.py has the formats; docs/console.md documents them);
- answers on t/<tenant>/<device>/support: sync (trusted time, the signed
  revocation list if the device's differs, where the cloud's copy of its
  chain ends, the last checkpoint), ack (what the segment showed and a new
  signed checkpoint), refused (why);
- pushes the signed revocation list to every device that uploaded before
  whenever the list changes (a grant revoked by `tether cloud support
  revoke` in any process, or one expiring off it).

The broker's ACL has already checked that a message's topic belongs to the
certificate that sent it, so the topic names the sender; a device cannot
write into another's stream. Decisions are cloud/support.py's
(SupportDesk.audit_hello / audit_segment); this parses strictly, refuses
with a code (recorded in audit_refusals, answered), bounds the rate per
device, and carries bytes, on its own database connection (paho's thread,
one lock).
"""

import logging
import ssl
import threading

import paho.mqtt.client as mqtt

from agent import audit_upload as wire
from agent import cbor
from agent.errors import RemoteError
from cloud.ca import SUPPORT_IDENTITY
from cloud.errors import CloudError
from cloud.support import SupportDesk

log = logging.getLogger("tether.support")

START_TIMEOUT_S = 10.0
REVOCATIONS_POLL_S = 0.5
PUSH_DEVICES_MAX = 10_000        # per change of the list; the rest get it at their next hello
RATE_PER_S = 20                  # messages per device, sustained
RATE_BURST = 200
RATE_IDENTITIES_MAX = 100_000    # buckets kept; the oldest is forgotten past this
HASH_LEN = 32

UP_FIELDS = {
    "hello": {"next": int, "head": bytes, "rev": bytes},
    "seg": {"id": int, "first": int, "frames": bytes, "next": int, "rev": bytes},
}


class SupportServiceError(CloudError):
    code = "support_service"


class Refusal(CloudError):
    code = "refused"


def parse_up(payload):
    """A device's message as a dict; Refusal with a code if it is anything
    but exactly one of UP_FIELDS' shapes within the bounds."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > wire.UP_BYTES_MAX:
        raise Refusal("an audit message is at most %d bytes" % wire.UP_BYTES_MAX, "too_large")
    try:
        msg = cbor.loads(bytes(payload))
    except RemoteError as e:
        raise Refusal("not CBOR: %s" % e.message, "malformed") from None
    if not isinstance(msg, dict) or msg.get("v") != wire.VERSION:
        raise Refusal("not a version %d audit message" % wire.VERSION, "bad_version")
    fields = UP_FIELDS.get(msg.get("op")) if isinstance(msg.get("op"), str) else None
    if fields is None:
        raise Refusal("op must be hello or seg", "unknown_op")
    if set(msg) != set(fields) | {"v", "op"}:
        raise Refusal("fields must be exactly %s" % ", ".join(sorted(fields)), "bad_field")
    for key, kind in fields.items():
        if type(msg[key]) is not kind:
            raise Refusal("%s must be %s" % (key, kind.__name__), "bad_field")
    return _check_bounds(msg)


def _check_bounds(msg):
    for key in ("next", "first", "id"):
        if key in msg and not 0 <= msg[key] < wire.SEQ_MAX:
            raise Refusal("%s out of range" % key, "bad_field")
    if len(msg["rev"]) != 8 or ("head" in msg and len(msg["head"]) != HASH_LEN):
        raise Refusal("head is 32 bytes, rev 8", "bad_field")
    if "frames" in msg and not 0 < len(msg["frames"]) <= wire.SEGMENT_BYTES_MAX:
        raise Refusal("frames are 1..%d bytes" % wire.SEGMENT_BYTES_MAX, "too_large")
    return msg


def down(op, time_s, **fields):
    msg = {"v": wire.VERSION, "op": op, "time": time_s}
    msg.update({k: v for k, v in fields.items() if v is not None})
    return cbor.dumps(msg)


class _Bucket:
    __slots__ = ("tokens", "at", "told")

    def __init__(self, now):
        self.tokens, self.at, self.told = float(RATE_BURST), now, False


class SupportHandler:
    """The decisions, without MQTT: what to answer to one message, and what
    to push when the revocation list changed. Not thread-safe (the service
    holds its lock around every call)."""

    def __init__(self, desk, clock_s):
        self.desk = desk
        self.clock_s = clock_s
        self.messages = 0
        self.refused = 0
        self.limited = 0
        self._buckets = {}
        self._digest = desk.revocations_digest()

    # -- decisions ------------------------------------------------------------

    def handle(self, topic, payload):
        """(reply topic, payload) or None for one message on t/<id>/audit."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "t" or parts[3] != "audit":
            return None                 # the broker's ACL lets nothing else reach us
        # The console names a device by its identity (tenant/device): grants,
        # chains and checkpoints are per tenant, as the device's certificate is.
        identity = device_id = "%s/%s" % (parts[1], parts[2])
        reply_topic = "t/%s/support" % identity
        self.messages += 1
        if not self._allowed(identity):
            return None
        try:
            msg = parse_up(payload)
        except Refusal as e:
            return reply_topic, self._refuse(identity, e, payload, None)
        try:
            if msg["op"] == "hello":
                return reply_topic, self._hello(identity, device_id, msg)
            return reply_topic, self._segment(identity, device_id, msg)
        except CloudError as e:          # the desk refused the segment: nothing stored
            return reply_topic, self._refuse(identity, e, payload, msg.get("id"))

    def _hello(self, identity, device_id, msg):
        st = self.desk.audit_hello(identity, device_id, msg["next"], msg["head"], msg["rev"])
        revocations = None
        if msg["rev"] != self.desk.revocations_digest():
            revocations = self.desk.revocation_list()
        return down("sync", self.desk.now(), next=st["next"], revocations=revocations,
                    checkpoint=self.desk.last_checkpoint(identity))

    def _segment(self, identity, device_id, msg):
        result = self.desk.audit_segment(identity, device_id, msg["first"], msg["frames"],
                                         msg["next"], msg["rev"])
        return down("ack", self.desk.now(), id=msg["id"], next=result["next"],
                    findings=result["findings"][:wire.FINDINGS_MAX], checkpoint=result["checkpoint"])

    def _refuse(self, identity, error, payload, seg_id):
        self.refused += 1
        size = len(payload) if isinstance(payload, (bytes, bytearray)) else 0
        self.desk.refused(identity, error.code, error.message, size)
        return down("refused", self.desk.now(), code=error.code[:32], id=seg_id)

    def _allowed(self, identity):
        """A token bucket per device; past it a message is counted, recorded
        once per episode, and not answered."""
        now = self.clock_s()
        b = self._buckets.get(identity)
        if b is None:
            if len(self._buckets) >= RATE_IDENTITIES_MAX:
                self._buckets.pop(next(iter(self._buckets)))
            b = self._buckets[identity] = _Bucket(now)
        b.tokens = min(float(RATE_BURST), b.tokens + (now - b.at) * RATE_PER_S)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            b.told = False
            return True
        self.limited += 1
        if not b.told:
            b.told = True
            self.desk.refused(identity, "rate_limited", "over %d messages/s" % RATE_PER_S, 0)
        return False

    # -- the revocation list ------------------------------------------------------

    def pushes(self):
        """[(topic, payload)] once the list changed: the signed list for every
        device whose reported list differs (at most PUSH_DEVICES_MAX)."""
        digest = self.desk.revocations_digest()
        if digest == self._digest:
            return []
        self._digest = digest
        payload = down("push", self.desk.now(), revocations=self.desk.revocation_list())
        targets = [i for i, rev in self.desk.streams().items() if rev != digest][:PUSH_DEVICES_MAX]
        return [("t/%s/support" % identity, payload) for identity in targets]


class SupportService:
    """SupportHandler on a paho client of the broker, and a thread that
    watches the revocation list."""

    def __init__(self, data_dir, host, device_port, cafile, cred, clock_s=None):
        import time
        self.clock_s = clock_s or time.time
        self.desk = SupportDesk(data_dir, clock_s=self.clock_s)
        self.handler = SupportHandler(self.desk, self.clock_s)
        self.lock = threading.Lock()
        self.pushed = 0
        self._stop = threading.Event()
        self._watcher = None
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=SUPPORT_IDENTITY,
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=cafile, certfile=cred[0], keyfile=cred[1],
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(0.2, 5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subscribed.set()
        self.client.on_message = self._on_message
        self.host, self.port = host, device_port

    async def start(self, timeout_s=START_TIMEOUT_S):
        import asyncio
        self.client.connect_async(self.host, self.port, 30)
        self.client.loop_start()
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.subscribed.wait, timeout_s):
            await self.stop()
            raise SupportServiceError("%s not subscribed within %.0f s" % (SUPPORT_IDENTITY, timeout_s))
        self._watcher = threading.Thread(target=self._watch, name="support-revocations", daemon=True)
        self._watcher.start()

    async def stop(self):
        import asyncio
        self._stop.set()
        loop = asyncio.get_running_loop()
        if self._watcher is not None:
            await loop.run_in_executor(None, self._watcher.join, 5)
        self.client.disconnect()
        await loop.run_in_executor(None, self.client.loop_stop)
        with self.lock:
            self.desk.close()

    @property
    def messages(self):
        return self.handler.messages

    @property
    def refused(self):
        return self.handler.refused

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("%s refused by the broker: %s", SUPPORT_IDENTITY, reason_code)
            return
        client.subscribe("t/+/+/audit", qos=1)

    def _on_message(self, client, userdata, msg):
        try:
            with self.lock:
                reply = self.handler.handle(msg.topic, msg.payload)
        except Exception:  # one bad message must not stop the service
            log.exception("support service failed on %s", msg.topic)
            return
        if reply is not None:
            client.publish(reply[0], reply[1], qos=1)

    def _watch(self):
        while not self._stop.wait(REVOCATIONS_POLL_S):
            try:
                self.push_if_changed()
            except Exception:
                log.exception("pushing the revocation list failed; retrying")

    def push_if_changed(self):
        """-> how many devices were sent the changed list."""
        with self.lock:
            pushes = self.handler.pushes()
        for topic, payload in pushes:
            self.client.publish(topic, payload, qos=1)
        self.pushed += len(pushes)
        if pushes:
            log.info("revocation list changed: pushed to %d devices", len(pushes))
        return len(pushes)
