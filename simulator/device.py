"""One virtual device: the real agent core on a SimFlash, driven by asyncio,
speaking MQTT over its own mTLS connection. Many of these share one loop."""

import asyncio
import re
import ssl
import struct

from agent import enroll, events, mqtt, telemetry
from agent.actions import Append, Connect, Log, Publish, UseIdentity, WriteAtomic
from agent.errors import LocalError, MQTTError
from board.codec import CODEC
from board.sim import SimFlash, SimRng
from board.enroller import Enroller, refusal_reason
from simulator.keys import KeySet

KEEPALIVE_S = 60
CONNECT_TIMEOUT_S = 10
ACK_TIMEOUT_MS = 15000


def _ssl_text(exc):
    """'tlsv1 alert unknown ca' out of '[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1
    alert unknown ca (_ssl.c:2580)'."""
    text = str(exc)
    m = re.search(r"\]\s*(.*?)\s*\(_ssl\.c:\d+\)", text)
    if m and m.group(1):
        return m.group(1)
    reason = getattr(exc, "reason", None)
    return reason.lower().replace("_", " ") if reason else text


def connect_error(exc):
    """(reason, message) of a failed connection attempt. The reason groups
    attempts in the run's tally: short, and the same for every device that
    fails the same way; the message is the error as Python gave it."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out", "no TCP and TLS connection within %d s" % CONNECT_TIMEOUT_S
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or _ssl_text(exc)).rstrip(".")
        return "certificate verify failed: %s" % detail, message
    if isinstance(exc, ssl.SSLError):
        return "TLS refused: %s" % _ssl_text(exc), message
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", message
    if isinstance(exc, OSError):
        return (exc.strerror or type(exc).__name__).lower(), message
    return type(exc).__name__, message


class Link(asyncio.Protocol):
    """The byte pipe of one connection; all decisions are the device's."""

    def __init__(self, device):
        self.device = device
        # Offers and chunks are bigger than telemetry's packets (simulator/ota_device.py).
        self.parser = mqtt.Parser() if device.ota is None else mqtt.Parser(device.ota.packet_bytes_max)
        self.transport = None
        self.timer = None
        self.gave_up = False   # we closed it before its CONNACK (timeout): counted already

    def connection_made(self, transport):
        self.transport = transport
        self.device.pending = self
        # A device publishes every sample; announce a keepalive longer than
        # that interval, so the broker never takes a quiet device for dead.
        keepalive_s = max(KEEPALIVE_S, int(3 * self.device.fleet.sample_interval_s) + 1)
        transport.write(mqtt.connect(self.device.identity, keepalive_s, clean_session=True))
        if self.device.id_core is not None:  # answers to a rotation come here
            transport.write(mqtt.subscribe(1, [(enroll.device_topics(self.device.identity)[1], 1)]))
        if self.device.ota is not None:      # offers and chunks (simulator/ota_device.py)
            transport.write(mqtt.subscribe(2, [(self.device.ota.down_topic, 1)]))
        self.timer = self.device.fleet.loop.call_later(CONNECT_TIMEOUT_S, self.connack_timeout)

    def connack_timeout(self):
        self.timer = None
        if self.device.link is not self and not self.transport.is_closing():
            self.device.note("connack_timeout", "no CONNACK in %d s" % CONNECT_TIMEOUT_S)
            self.device.connect_failed("no CONNACK", "TLS up, but no CONNACK within %d s" % CONNECT_TIMEOUT_S)
            self.gave_up = True
            self.transport.abort()

    def abort(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data):
        try:
            packets = self.parser.feed(data)
        except MQTTError as e:
            self.device.note("bad_packet", str(e))
            self.transport.abort()
            return
        for packet in packets:
            self.device.on_packet(self, packet)

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.device.pending is self and not self.gave_up:
            # Closed before any CONNACK: with TLS 1.3 a broker refusing our
            # certificate says so here, after the handshake seemed to pass.
            if exc is None:
                self.device.connect_failed("closed by the broker before CONNACK",
                                           "the connection closed after the TLS handshake, before any CONNACK")
            else:
                self.device.connect_failed(*connect_error(exc))
        self.device.on_link_lost(self, "connection lost" if exc is None else str(exc))


class VirtualDevice:
    def __init__(self, fleet, tenant, device, ssl_context, seed, config=None, epoch_base=0,
                 flash=None, id_core=None, id_board=None):
        self.fleet = fleet
        self.tenant = tenant
        self.device = device
        self.identity = "%s/%s" % (tenant, device)
        self.ssl_context = ssl_context
        self.flash = flash if flash is not None else SimFlash()
        # An enrolled device (board/enroller.py) also runs its identity
        # core: rotation before expiry, over this same connection.
        self.id_core = id_core
        self.id_board = id_board
        self.rotations = 0
        self.recoveries = 0
        self.recovering = None    # the task of a recovery through the claim endpoint
        if epoch_base:
            # A simulated device reusing a real identity must not repeat the
            # (epoch, seq) of an earlier run: start from a later epoch.
            self.flash.write_atomic(telemetry.STATE_FILE, telemetry.encode_state(epoch_base))
        self.rng = SimRng(seed)
        self.config = config
        self.core = None
        self.link = None          # the connection the broker accepted
        self.pending = None       # a connection waiting for its CONNACK
        self.connecting = False
        self.task = None
        self.packet_ids = {}      # MQTT packet id -> token
        self.sent_ms = {}         # token -> when published (ack timeout)
        self.next_pid = 1
        self.generated = {}       # epoch -> seqs made (records incl. drop records)
        self.acked = KeySet()     # (epoch, seq) the broker acknowledged
        self.dropped = KeySet()   # (epoch, seq) dropped from a full queue (and declared)
        self.tick_handle = None
        self.ota = None           # simulator/ota_device.OtaDevice when the fleet runs updates

    # -- life -----------------------------------------------------------------

    def boot(self):
        self.core = telemetry.Telemetry(self.tenant, self.device, CODEC, self.rng, self.config)
        self.execute(self.core.boot(self.flash.read("state"), self.flash.read("queue")))
        self.schedule_tick()

    def feed(self, event):
        try:
            actions = self.core.handle(event)
        except LocalError as e:  # a driver bug: counted, and a failed check at the end
            self.fleet.core_errors.append("%s: %s" % (self.identity, e))
            return
        self.execute(actions)
        self.generated[self.core.epoch] = self.core.next_seq

    def sample(self, readings):
        self.check_ack_timeout()
        self.feed(events.Sample(self.fleet.now_ms(), readings))
        self.feed_identity(events.Tick(self.fleet.now_ms()))
        if self.ota is not None:
            self.ota.tick()

    def schedule_tick(self):
        if self.fleet.closing:
            return
        if self.tick_handle is not None:
            self.tick_handle.cancel()
        delay_s = max(0, self.core.connect_at_ms - self.fleet.now_ms()) / 1000
        self.tick_handle = self.fleet.loop.call_later(delay_s, self.on_tick)

    # -- identity ---------------------------------------------------------------

    def feed_identity(self, event):
        if self.id_core is None or self.recovering is not None:
            return  # a recovery drives the identity core meanwhile
        try:
            actions = self.id_board.run(self.id_core, self.id_core.handle(event))
        except LocalError as e:
            self.fleet.core_errors.append("%s identity: %s" % (self.identity, e))
            return
        for i, action in enumerate(actions):
            if isinstance(action, Publish):
                if self.link is not None:
                    self.publish(action, count=False)
            elif isinstance(action, UseIdentity) and action.name is None:
                self.recover(actions[i:])
                return
            elif isinstance(action, UseIdentity):
                # A new certificate to prove: reconnect with it.
                self.ssl_context = self.id_board.keystore.client_context(action.name, action.cert,
                                                                        self.fleet.cafile)
                self.rotations += 1
                if self.link is not None:
                    self.link.transport.abort()
            elif isinstance(action, Log):
                self.note(action.code, action.detail)

    def recover(self, actions):
        """The certificate expired (or is refused): go to the claim endpoint
        with the identity core (board/enroller.py), prove the key of the
        old certificate, come back with a new one. Telemetry queues meanwhile."""
        if self.fleet.claim is None:
            self.note("identity_recovery_needed", self.id_core.last_reason)
            return
        endpoints, claim_files = self.fleet.claim
        enroller = Enroller(self.id_core, self.id_board, endpoints, claim_files, self.fleet.now_ms,
                            self.id_core.config.hwid)
        self.recovering = self.fleet.loop.create_task(self._recover_when_up(enroller, actions))
        self.recovering.add_done_callback(self._recovered)
        self.note("identity_recovery", self.id_core.last_reason)

    async def _recover_when_up(self, enroller, actions):
        while not self.fleet.network_up:  # the claim endpoint is behind the same network
            await asyncio.sleep(0.2)
        return await enroller.run(timeout_s=120, actions=actions)

    def _recovered(self, task):
        self.recovering = None
        if task.cancelled() or task.exception() is not None or not task.result():
            self.note("identity_recovery_failed", "")
            return
        active = self.id_core.record["a"]
        self.ssl_context = self.id_board.keystore.client_context(active["k"], active["cert"], self.fleet.cafile)
        self.recoveries += 1
        if self.link is not None:
            self.link.transport.abort()

    def on_tick(self):
        self.tick_handle = None
        if self.core.state == telemetry.OFFLINE:
            self.feed(events.Tick(self.fleet.now_ms()))
            if self.core.state == telemetry.OFFLINE:  # the timer fired early
                self.schedule_tick()

    # -- actions --------------------------------------------------------------

    def execute(self, actions):
        for action in actions:
            if isinstance(action, Publish):
                self.publish(action)
            elif isinstance(action, Append):
                self.flash.append(action.name, action.data)
                if action.data[6:7] == b"X":  # a drop frame: note its victim
                    self.dropped.add(struct.unpack_from("<II", action.data, 7))
            elif isinstance(action, WriteAtomic):
                self.flash.write_atomic(action.name, action.data)
            elif isinstance(action, Connect):
                self.connecting = True
                self.task = self.fleet.loop.create_task(self.open_link())
            elif isinstance(action, Log):
                self.note(action.code, action.detail)

    def publish(self, action, count=True):
        pid = self.next_pid
        self.next_pid = pid % 65535 + 1
        if count:  # telemetry: tracked for acks and timeouts
            self.packet_ids[pid] = action.token
            self.sent_ms[action.token] = self.fleet.now_ms()
            self.fleet.metrics.published += 1
        elif action.token is not None:
            self.packet_ids[pid] = ("id", action.token)
        self.link.transport.write(mqtt.publish(action.topic, action.payload, 1, pid))

    async def open_link(self):
        if not self.fleet.network_up or (self.ota is not None and self.ota.hung()):
            self.lost("network down")
            return
        self.fleet.metrics.connect_attempts += 1
        try:
            await asyncio.wait_for(self.fleet.loop.create_connection(
                lambda: Link(self), self.fleet.host, self.fleet.port,
                ssl=self.ssl_context, server_hostname=self.fleet.server_name),
                CONNECT_TIMEOUT_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
            if self.pending is not None:
                self.pending.gave_up = True
                self.pending.abort()  # it may have finished TLS just as we gave up
            self.connect_failed(*connect_error(e))
            self.lost("connect failed: %s" % (e.__class__.__name__,))
            if isinstance(e, ssl.SSLError):  # TLS refused our certificate: the identity core decides
                self.feed_identity(events.Refused(self.fleet.now_ms(), refusal_reason(e)))
            return
        if not self.fleet.network_up and self.pending is not None:
            self.pending.abort()  # the network was cut while we connected

    # -- the link -------------------------------------------------------------

    def on_packet(self, link, packet):
        if isinstance(packet, mqtt.ConnAck):
            self.on_connack(link, packet)
            return
        if link is not self.link:
            return  # a connection we have already given up on
        if isinstance(packet, mqtt.Publish):
            if packet.packet_id is not None:
                link.transport.write(mqtt.puback(packet.packet_id))
            if self.ota is not None and packet.topic == self.ota.down_topic:
                self.ota.on_message(packet.payload)
                return
            self.feed_identity(events.Message(self.fleet.now_ms(), packet.topic, packet.payload))
            return
        if isinstance(packet, mqtt.PubAck):
            token = self.packet_ids.pop(packet.packet_id, None)
            if token is None:
                return
            if token[0] == "id":
                self.feed_identity(events.PubAcked(token[1]))
                return
            self.sent_ms.pop(token, None)
            self.acked.add(token)
            self.fleet.metrics.acked += 1
            self.feed(events.PubAcked(token))

    def on_connack(self, link, packet):
        if link is not self.pending or not self.fleet.network_up or self.core.state != telemetry.CONNECTING:
            # e.g. the connect timed out (the core was told) just as TLS finished
            self.note("unexpected_connack", "CONNACK on a connection not waiting for one")
            link.gave_up = True
            link.abort()
            return
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        self.pending = None
        if packet.return_code != 0:
            self.note("refused", mqtt.connack_reason(packet.return_code))
            self.connect_failed("CONNECT refused: %s" % mqtt.connack_reason(packet.return_code),
                                "CONNACK return code %d" % packet.return_code)
            self.feed_identity(events.Refused(self.fleet.now_ms(), mqtt.connack_reason(packet.return_code)))
            link.abort()
            return
        self.link = link
        self.connecting = False
        self.fleet.metrics.connects += 1
        self.feed(events.Connected(self.fleet.now_ms()))
        self.feed_identity(events.Connected(self.fleet.now_ms()))
        if self.ota is not None:
            self.ota.connected()

    def on_link_lost(self, link, reason):
        if link is self.link or (self.link is None and self.connecting):
            self.lost(reason)

    def lost(self, reason):
        self.link = None          # the connection the broker accepted
        self.pending = None       # a connection waiting for its CONNACK
        self.connecting = False
        self.task = None
        self.packet_ids.clear()
        self.sent_ms.clear()
        self.feed_identity(events.ConnectionLost(self.fleet.now_ms(), reason))
        if self.core.state in (telemetry.ONLINE, telemetry.CONNECTING):
            self.feed(events.ConnectionLost(self.fleet.now_ms(), reason))
            self.schedule_tick()

    def cut(self):
        """The network under this device fails: its connections die at once,
        the accepted one and any still waiting for a CONNACK."""
        for link in (self.link, self.pending):
            if link is not None:
                link.abort()

    def check_ack_timeout(self):
        if self.link is None or not self.sent_ms:
            return
        oldest = min(self.sent_ms.values())
        if self.fleet.now_ms() - oldest > ACK_TIMEOUT_MS:
            self.note("ack_timeout", "no PUBACK in %d ms; reconnecting" % ACK_TIMEOUT_MS)
            self.link.transport.abort()

    def note(self, code, detail):
        self.fleet.metrics.note(code)

    def connect_failed(self, reason, message):
        """A connection attempt failed for a reason of the broker's or the
        network's (not a cut we made, not our own shutdown): tallied."""
        if self.fleet.network_up and not self.fleet.closing:
            self.fleet.metrics.connect_error(reason, message)

    def idle(self):
        return not self.core.queue and self.link is not None

    def queued(self):
        return len(self.core.queue)
