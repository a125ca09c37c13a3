"""Embedded MQTT broker: amqtt with tether's identity, ACL and ingest hook.

What it adds to amqtt.broker.Broker (amqtt 0.12):

- TLS that it does itself (`stream_connected`): client certificate
  required, only our CA trusted, TLS >= 1.2. A failed handshake (no
  certificate, foreign CA, expired, wrong key usage) is a refusal with
  action "tls", so the demo can count those too.
- Identity = the peer certificate's CN, checked at CONNECT: it must be a
  device identity ("tenant/device") or a cloud client ("$cloud/<name>"),
  the client id must equal it, and the optional `authorize(identity)` hook
  must agree. This runs *before* amqtt touches any session, so a client
  using another device's client id cannot delete or take over that
  device's session (amqtt would delete a clean session first and only then
  authenticate).
- The ACL of docs/design.md, in `permits()`.
- `on_publish(identity, topic, payload)`, awaited for every permitted QoS 0/1
  PUBLISH before the PUBACK (`TetherHandler`). If it raises, there is no
  PUBACK and the connection is closed; the device sends again.
- `kick(identity)`, `stop()` that lets in-flight `on_publish` calls finish,
  and `start()` again on the same port.

Telemetry goes to `on_publish`; it is not fanned out to MQTT subscribers
unless `relay=True`. Sessions, subscriptions and queued messages live in
memory and are gone after `stop()`: devices resend what was not
acknowledged from their own journal.
"""

import asyncio
import collections
import logging
import ssl
import time

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker as AmqttBroker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import INCOMING

from cloud.ca import (CLAIMS_IDENTITY, INGEST_IDENTITY, OTA_IDENTITY, PROVISIONER_IDENTITY,
                      SERVICE_IDENTITIES, SUPPORT_IDENTITY, check_id, identity_of, is_claim_identity,
                      is_cloud_identity, parse_identity)
from cloud.errors import BrokerError, CloudError

IDENTITY_KEY = "tether.identity"

HANDSHAKE_TIMEOUT_S = 10.0
CLONE_WINDOW_S = 60.0
CLONE_TAKEOVERS_MAX = 3       # takeovers of one live identity within the window
TAKEOVERS_TRACKED_MAX = 100_000
PACKET_MAX_BYTES = 64 * 1024  # far above the 1 KiB telemetry limit; bounds memory per connection
CONNECT_TIMEOUT_S = 10.0  # from TLS up to a CONNECT packet
DRAIN_TIMEOUT_S = 5.0
REFUSALS_MAX = 10_000
CONNECTIONS_MAX = 10_000

# Refusal actions, and the reasons each can have.
TLS, CONNECT, PUBLISH, SUBSCRIBE = "tls", "connect", "publish", "subscribe"
RECEIVE = "receive"  # amqtt checks this before relaying a message to a subscriber
R_NO_CERT = "no_certificate"          # tls / connect
R_CERT_EXPIRED = "cert_expired"       # tls
R_CERT_NOT_YET_VALID = "cert_not_yet_valid"
R_UNKNOWN_CA = "unknown_ca"           # tls: not signed by our CA
R_WRONG_PURPOSE = "wrong_purpose"     # tls: e.g. a server cert used as a client cert
R_TLS = "tls_failed"                  # tls: anything else (garbage, timeout, old TLS)
R_BAD_IDENTITY = "bad_identity"       # connect: CN is neither device nor cloud identity
R_CLIENT_ID = "client_id_mismatch"    # connect
R_NOT_AUTHORIZED = "not_authorized"   # connect: authorize() said no
R_CERT_REVOKED = "cert_revoked"       # connect: this certificate was retired or revoked (CRL)
R_WRONG_LISTENER = "wrong_listener"   # connect: e.g. a device identity on the provisioning port
R_CLONE = "clone_suspected"           # connect: the identity keeps taking itself over
R_WILL = "will_not_allowed"           # connect: a will would publish unchecked when the link drops
R_NOT_PERMITTED = "not_permitted"     # publish / subscribe: ACL
R_QOS = "qos_unsupported"             # publish: QoS 2

# OpenSSL X509_V_ERR_* codes we name; the rest are R_TLS.
_VERIFY_REASONS = {
    9: R_CERT_NOT_YET_VALID,
    10: R_CERT_EXPIRED,
    18: R_UNKNOWN_CA,   # self-signed leaf
    19: R_UNKNOWN_CA,   # self-signed CA in chain
    20: R_UNKNOWN_CA,   # issuer not found
    26: R_WRONG_PURPOSE,
}

# Outcomes of TetherHandler asking the broker about one PUBLISH.
ACCEPTED, REFUSED, FAILED = "accepted", "refused", "failed"

# identity is None when TLS failed; for action "connect", topic holds the
# client id the peer presented.
Refusal = collections.namedtuple("Refusal", "identity action topic reason")

_NULL_LOGGER = logging.Logger("tether.null")
_NULL_LOGGER.addHandler(logging.NullHandler())


def quiet_amqtt(level=logging.ERROR):
    """amqtt logs every connection at INFO and our refusals as WARNING."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(level)


# Device <-> cloud service topics, t/<tenant>/<device>/<kind> (docs/design.md):
# kind -> (device's direction, cloud service identity). "up": the device
# publishes and the service receives; "down": the service publishes and the
# device receives. These are relayed between the two, never ingested.
SERVICE_TOPICS = {
    "enroll": ("up", PROVISIONER_IDENTITY),   # rotation requests, confirmations
    "cert": ("down", PROVISIONER_IDENTITY),   # their answers
    "ota": ("up", OTA_IDENTITY),              # update reports, chunk requests
    "update": ("down", OTA_IDENTITY),         # offers, chunks
    "audit": ("up", SUPPORT_IDENTITY),        # console audit log segments
    "support": ("down", SUPPORT_IDENTITY),    # grant revocations, trusted time, checkpoints
}
# Kinds a quarantined device keeps (besides its telemetry, which is flagged):
# identity upkeep, updates and the field console's audit trail.
QUARANTINE_KEEPS = ("enroll", "cert", "ota", "update", "audit", "support")


def permits(identity, action, topic, quarantined=False, client_id=None):
    """The ACL: may `identity` publish / subscribe / receive `topic`? A
    quarantined device keeps its telemetry topic (the ingest flags what it
    sends), its service topics (QUARANTINE_KEEPS) and gains q/<id>/diag
    (out) and q/<id>/update (in); it loses its command topic. Enrollment
    (docs/identity.md): a claim certificate reaches only
    prov/<claim>/<its client id>/req and resp."""
    if identity == INGEST_IDENTITY:
        return action in (SUBSCRIBE, RECEIVE) and topic.split("/")[0] == "t"
    if identity in SERVICE_IDENTITIES:
        return _service_permits(identity, action, topic)
    if is_claim_identity(identity):
        if client_id is None:
            return False
        if action == PUBLISH:
            return topic == "prov/%s/%s/req" % (identity, client_id)
        return action in (SUBSCRIBE, RECEIVE) and topic == "prov/%s/%s/resp" % (identity, client_id)
    if is_cloud_identity(identity):
        return False
    own = "t/%s/" % identity
    if topic.startswith(own) and topic.count("/") == 3:
        kind = topic[len(own):]
        if kind in SERVICE_TOPICS:
            up = SERVICE_TOPICS[kind][0] == "up"
            return up == (action == PUBLISH)
        if kind == "telemetry":
            return action == PUBLISH
        if kind == "cmd":
            return action in (SUBSCRIBE, RECEIVE) and not quarantined
        return False
    if quarantined:
        if action == PUBLISH:
            return topic == "q/%s/diag" % identity
        return topic == "q/%s/update" % identity
    return False


def _service_permits(identity, action, topic):
    parts = topic.split("/")
    if identity == CLAIMS_IDENTITY:  # on the provisioning listener
        if action == SUBSCRIBE:
            return topic == "prov/+/+/req"
        ok = len(parts) == 4 and parts[0] == "prov" and "+" not in topic and "#" not in topic
        return ok and parts[3] == ("req" if action == RECEIVE else "resp")
    kinds = [k for k, (_, owner) in SERVICE_TOPICS.items() if owner == identity]
    if action == SUBSCRIBE:
        return topic in ["t/+/+/%s" % k for k in kinds if SERVICE_TOPICS[k][0] == "up"]
    if len(parts) != 4 or parts[0] != "t" or "+" in topic or "#" in topic or parts[3] not in kinds:
        return False
    return (SERVICE_TOPICS[parts[3]][0] == "up") == (action == RECEIVE)


def is_service_topic(topic):
    """Topics relayed between devices and the cloud's services, not ingested."""
    parts = topic.split("/")
    return len(parts) == 4 and ((parts[0] == "prov" and parts[3] in ("req", "resp")) or
                                (parts[0] == "t" and parts[3] in SERVICE_TOPICS))



def server_context(ca_path, cert_path, key_path):
    """mTLS server context: our CA only, client certificate required, TLS >= 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_path)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def tls_reason(exc):
    code = getattr(exc, "verify_code", None)
    if code in _VERIFY_REASONS:
        return _VERIFY_REASONS[code]
    if getattr(exc, "reason", None) in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
        return R_NO_CERT
    return R_TLS


class BoundedReader(StreamReaderAdapter):
    """amqtt reads a packet's body in one readexactly(remaining length), so an
    authenticated client announcing 256 MB would make it buffer 256 MB. This
    refuses any single read over PACKET_MAX_BYTES and closes the connection."""

    def __init__(self, reader, broker, writer):
        super().__init__(reader)
        self._broker = broker
        self._writer = writer

    async def read(self, n=-1):
        if n < 0 or n > PACKET_MAX_BYTES:
            self._broker.refuse(None, "packet", None, "packet_too_large")
            self._writer.transport.abort()
            raise NoDataError("packet over %d bytes refused" % PACKET_MAX_BYTES)
        return await super().read(n)


class TetherHandler(BrokerProtocolHandler):
    """Asks the broker (`gate`) about each incoming PUBLISH before acknowledging it."""

    gate = None  # the Broker; set right after init_from_connect

    async def _handle_qos0_message_flow(self, app_message):
        if app_message.direction != INCOMING:
            return await super()._handle_qos0_message_flow(app_message)
        verdict = await self.gate.admit(self.session, app_message)
        if verdict == FAILED:
            await self.handle_connection_closed()
        elif verdict == ACCEPTED and self.gate.relays(app_message.topic):
            await super()._handle_qos0_message_flow(app_message)

    async def _handle_qos1_message_flow(self, app_message):
        if app_message.direction != INCOMING:
            return await super()._handle_qos1_message_flow(app_message)
        if app_message.packet_id is None:
            raise MQTTError("QoS 1 PUBLISH without packet id")
        verdict = await self.gate.admit(self.session, app_message)
        if verdict == FAILED:
            # No PUBACK: the device keeps the record and sends it again.
            await self.handle_connection_closed()
            return
        if verdict == ACCEPTED and self.gate.relays(app_message.topic):
            await self.session.delivered_message_queue.put(app_message)
        # A refused publish is acknowledged and dropped, as Mosquitto does
        # for MQTT 3.1.1, so a misbehaving device cannot stall its queue.
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback

    async def _handle_qos2_message_flow(self, app_message):
        if app_message.direction != INCOMING:
            return await super()._handle_qos2_message_flow(app_message)
        self.gate.refuse(self.session.attributes.get(IDENTITY_KEY), PUBLISH, app_message.topic, R_QOS)
        await self.handle_connection_closed()

    def handle_read_timeout(self):
        # Nothing within 1.5 x keepalive: the peer is gone (amqtt ignores this).
        asyncio.ensure_future(self.handle_connection_closed())


class Broker(AmqttBroker):
    """amqtt broker on one mTLS listener. Construct inside a running event loop.

    on_publish: async (identity, topic, payload) -> None; raise to refuse.
    authorize: optional (identity) -> bool or awaitable bool, at CONNECT.
    on_takeover: optional (identity, old_addr, new_addr, count, refused), called
        when an identity connects while it is connected (see _clone_suspected).
    logger: receives refusals and failures as records with extra
        {"event": "broker.refused", "identity", "action", "topic", "reason"}.
    port: 0 picks a free port; `self.port` holds the real one after start()
        and restarts reuse it.
    prov_port, claim_ca_path: a second listener, the provisioning endpoint,
        which trusts only the claim CA (factory claim certificates and the
        cloud's "$cloud/claims" client); None for none.
    """

    def __init__(self, host, port, ca_path, cert_path, key_path, on_publish=None,
                 authorize=None, on_takeover=None, logger=None, relay=False, refusals_max=REFUSALS_MAX,
                 connections_max=CONNECTIONS_MAX, amqtt_log_level=logging.ERROR,
                 prov_port=None, claim_ca_path=None):
        if amqtt_log_level is not None:
            quiet_amqtt(amqtt_log_level)
        self.host = host
        self.port = port
        self.on_publish = on_publish
        self.authorize = authorize
        self.on_takeover = on_takeover  # (identity, old_addr, new_addr, count, refused)
        self.quarantined = frozenset()  # identities confined to quarantine topics
        self._takeovers = {}
        self._clone_blocked = {}        # identity -> monotonic time its lockout ends
        self.revoked = frozenset()      # checked on every publish and subscribe too
        self.revoked_serials = frozenset()  # certificates refused at CONNECT (retired by rotation)
        self.log = logger or _NULL_LOGGER  # amqtt owns self.logger
        self.relay = relay
        self.refusals = collections.deque(maxlen=refusals_max)
        self.refusal_counts = collections.Counter()
        self.ingest_failures = 0
        self._ssl_context = server_context(ca_path, cert_path, key_path)
        self._contexts = {"default": self._ssl_context}
        self.prov_port = prov_port
        if prov_port is not None:
            self._contexts["prov"] = server_context(claim_ca_path, cert_path, key_path)
        self._admitting = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        listeners = {"default": {"type": "tcp", "bind": "%s:%d" % (host, port),
                                 "max_connections": connections_max}}
        if prov_port is not None:
            listeners["prov"] = {"type": "tcp", "bind": "%s:%d" % (host, prov_port),
                                 "max_connections": connections_max}
        config = {"listeners": listeners, "plugins": {}}
        super().__init__(config, plugin_namespace="amqtt.tether")

    # -- lifecycle ---------------------------------------------------------

    async def start(self):
        try:
            await super().start()
        except AMQTTError as exc:
            raise BrokerError("broker cannot start on %s:%d: %s" % (self.host, self.port, exc),
                              code="broker_start") from exc
        self.port = self._servers["default"].instance.sockets[0].getsockname()[1]
        self.listeners_config["default"].bind = "%s:%d" % (self.host, self.port)
        if self.prov_port is not None:
            self.prov_port = self._servers["prov"].instance.sockets[0].getsockname()[1]
            self.listeners_config["prov"].bind = "%s:%d" % (self.host, self.prov_port)
        self._admitting = True
        self.log.info("broker started on %s:%d", self.host, self.port,
                      extra={"event": "broker.started", "port": self.port})

    async def stop(self, drain_timeout_s=DRAIN_TIMEOUT_S):
        """Stop listening, let in-flight on_publish calls finish, close everything."""
        if self.transitions.state != "started":
            return
        self._admitting = False
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        except asyncio.TimeoutError:
            self.log.warning("broker stopping with %d on_publish calls in flight", self._inflight,
                             extra={"event": "broker.drain_timeout", "inflight": self._inflight})
        await self.shutdown()
        self.log.info("broker stopped", extra={"event": "broker.stopped", "port": self.port})

    async def restart(self):
        await self.stop()
        await self.start()

    def kick(self, identity):
        """End `identity`'s live connection. Returns a task (await it or not) -> bool."""
        return asyncio.ensure_future(self._kick(identity))

    async def _kick(self, identity):
        kicked = await self._end_connection(identity)
        if kicked:
            self.log.info("kicked %s", identity, extra={"event": "broker.kicked", "identity": identity})
        return kicked

    # -- refusals ----------------------------------------------------------

    def refuse(self, identity, action, topic, reason):
        self.refusals.append(Refusal(identity, action, topic, reason))
        self.refusal_counts[reason] += 1
        self.log.warning(
            "refused %s %s %s: %s", identity, action, topic, reason,
            extra={"event": "broker.refused", "identity": identity, "action": action,
                   "topic": topic, "reason": reason})

    # -- TLS and CONNECT ---------------------------------------------------

    async def stream_connected(self, reader, writer, listener_name):
        try:
            await writer.start_tls(self._contexts[listener_name], ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            self.refuse(None, TLS, None, tls_reason(exc))
            writer.close()
            return
        adapter = StreamWriterAdapter(writer)
        adapter.tether_listener = listener_name
        await self._client_connected(listener_name, BoundedReader(reader, self, writer), adapter)

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        # Replaces amqtt's: check identity before touching any session.
        try:
            handler, session = await asyncio.wait_for(
                TetherHandler.init_from_connect(reader, writer, self.plugins_manager), CONNECT_TIMEOUT_S)
        except MQTTError:
            await _close_quietly(writer)
            raise
        except (AMQTTError, NoDataError, asyncio.TimeoutError) as exc:
            await _close_quietly(writer)
            raise AMQTTError(exc) from exc
        identity = await self._check_connect(session, writer)
        handler.gate = self
        session.username = identity
        session.password = None
        session.attributes[IDENTITY_KEY] = identity
        if session.keep_alive > 0:
            session.keep_alive += session.keep_alive // 2  # MQTT: 1.5 x keepalive
        await self._end_connection(identity)  # same identity again: the new connection wins
        return handler, await self._adopt_session(session)

    def _clone_suspected(self, identity, session):
        """The same identity connecting while it is connected is either a
        device coming back over a half-open connection, or a clone. Takeovers
        are allowed (and reported) until CLONE_TAKEOVERS_MAX within
        CLONE_WINDOW_S: then two devices hold one identity, and neither may
        stay: the incumbent is ended and every connect of the identity is
        refused for CLONE_WINDOW_S, so the clone cannot keep the session."""
        now = time.monotonic()
        if self._clone_blocked.get(identity, 0) > now:
            return True
        old, handler = self._sessions.get(identity, (None, None))
        if old is None or handler is None or not old.transitions.is_connected():
            return False
        times = self._takeovers.setdefault(identity, collections.deque(maxlen=CLONE_TAKEOVERS_MAX))
        while times and now - times[0] > CLONE_WINDOW_S:
            times.popleft()
        times.append(now)
        if len(self._takeovers) > TAKEOVERS_TRACKED_MAX:
            self._takeovers.pop(next(iter(self._takeovers)))
        suspected = len(times) >= CLONE_TAKEOVERS_MAX
        if suspected:
            self._clone_blocked[identity] = now + CLONE_WINDOW_S
            if len(self._clone_blocked) > TAKEOVERS_TRACKED_MAX:
                self._clone_blocked.pop(next(iter(self._clone_blocked)))
            self.kick(identity)
        if self.on_takeover is not None:
            self.on_takeover(identity, "%s:%s" % (old.remote_address, old.remote_port),
                             "%s:%s" % (session.remote_address, session.remote_port), len(times), suspected)
        return suspected

    async def _check_connect(self, session, writer):
        """The identity from the peer certificate; CONNACK-refuse and raise otherwise."""
        identity, reason, connack = None, None, NOT_AUTHORIZED
        der = session.ssl_object.getpeercert(binary_form=True) if session.ssl_object else None
        if not der:
            reason = R_NO_CERT
        else:
            identity, reason = identity_from_der(der, getattr(writer, "tether_listener", "default"))
        if reason is None and self.revoked_serials and serial_of(der) in self.revoked_serials:
            reason = R_CERT_REVOKED
        if reason is None and not _client_id_ok(identity, session.client_id):
            reason, connack = R_CLIENT_ID, IDENTIFIER_REJECTED
        if reason is None and self.authorize is not None and not await _maybe_await(self.authorize(identity)):
            reason = R_NOT_AUTHORIZED
        if reason is None and session.will_flag:
            reason = R_WILL  # amqtt would publish it on a drop without our ACL
        if reason is None and self._clone_suspected(identity, session):
            reason = R_CLONE
        if reason is None:
            return identity
        self.refuse(identity, CONNECT, session.client_id, reason)
        try:
            await ConnackPacket.build(0, connack).to_stream(writer)
        except OSError:
            pass  # the client may already have gone
        await _close_quietly(writer)
        raise MQTTError("connection refused: %s" % reason)

    async def _adopt_session(self, session):
        """amqtt's clean-session / resume logic, for an identity already checked."""
        identity = session.client_id
        existing = self._sessions.get(identity, (None, None))[0]
        if session.clean_session or existing is None:
            await self._delete_session(identity)
            session.parent = 0
            return session
        for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive",
                     "username", "password", "ssl_object"):
            setattr(existing, name, getattr(session, name))
        existing.attributes[IDENTITY_KEY] = identity
        existing.parent = 1
        return existing

    async def _end_connection(self, identity):
        """Close `identity`'s live connection, if any, and detach it from its session."""
        session, handler = self._sessions.get(identity, (None, None))
        if session is None or handler is None or not session.transitions.is_connected():
            return False
        # With no handler recorded, the old connection's loop leaves the
        # session alone when it notices the close (see _handle_disconnect).
        self._sessions[identity] = (session, None)
        session.transitions.disconnect()
        await handler.handle_connection_closed()
        await handler.stop()
        return True

    async def _handle_disconnect(self, client_session, handler, disconnect_waiter):
        current = self._sessions.get(client_session.client_id, (None, None))[1]
        if current is not handler:
            await self._stop_handler(handler)  # kicked or taken over
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _authenticate(self, session, listener):
        return IDENTITY_KEY in session.attributes  # set by _check_connect

    # -- ACL and ingest ----------------------------------------------------

    async def _topic_filtering(self, session, topic, action):
        identity = session.attributes.get(IDENTITY_KEY)
        allowed = (identity is not None and identity not in self.revoked
                   and permits(identity, action, topic, identity in self.quarantined, session.client_id))
        if not allowed and action == SUBSCRIBE:
            self.refuse(identity, SUBSCRIBE, topic, R_NOT_PERMITTED)
        return allowed

    async def admit(self, session, message):
        """ACL + on_publish for one incoming PUBLISH -> ACCEPTED, REFUSED or FAILED."""
        identity = session.attributes.get(IDENTITY_KEY)
        if not self._admitting:
            return FAILED  # stopping: not acknowledged, sent again after restart
        if identity is None or identity in self.revoked or \
                not permits(identity, PUBLISH, message.topic, identity in self.quarantined, session.client_id):
            self.refuse(identity, PUBLISH, message.topic, R_NOT_PERMITTED)
            return REFUSED
        if self.on_publish is None or is_service_topic(message.topic):
            return ACCEPTED  # service messages are relayed to the cloud's services (SERVICE_TOPICS)
        self._inflight += 1
        self._idle.clear()
        try:
            await self.on_publish(identity, message.topic, bytes(message.data))
        except Exception as exc:
            self.ingest_failures += 1
            self.log.warning(
                "on_publish failed for %s: %r; not acknowledged", identity, exc,
                extra={"event": "broker.ingest_failed", "identity": identity, "topic": message.topic,
                       "code": getattr(exc, "code", type(exc).__name__)})
            return FAILED
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        return ACCEPTED


    def relays(self, topic):
        """Is an accepted PUBLISH on `topic` passed on to subscribers?"""
        return self.relay or is_service_topic(topic)


def identity_from_der(der, listener="default"):
    """-> (identity, None) or (identity_or_None, refusal reason). The
    provisioning listener takes claim identities and "$cloud/claims" only;
    the device listener never takes those (each listener's TLS trusts only
    its own CA, this is the second lock)."""
    try:
        identity = identity_of(der)
    except CloudError:
        return None, R_BAD_IDENTITY
    on_prov = listener == "prov"
    if on_prov != (is_claim_identity(identity) or identity == CLAIMS_IDENTITY):
        return identity, R_WRONG_LISTENER
    if on_prov or is_cloud_identity(identity):
        return identity, None
    try:
        parse_identity(identity)
    except CloudError:
        return identity, R_BAD_IDENTITY
    return identity, None


def serial_of(der):
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


def _client_id_ok(identity, client_id):
    """A claim certificate is shared by a batch: each device connects with
    its hardware id as client id (its topics are keyed on it). Everyone else
    connects with client id = identity."""
    if is_claim_identity(identity):
        try:
            check_id("hardware", client_id, 64)
        except CloudError:
            return False
        return True
    return client_id == identity


async def _close_quietly(writer):
    try:
        await writer.close()
    except OSError:
        pass


async def _maybe_await(value):
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value
