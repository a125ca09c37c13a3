"""Drivers for the identity core (agent/enroll.py) on any CPython board: the
simulator's virtual devices (board.sim flash and keystores) and a Linux
board (`tether agent enroll`, board/linux_main.py: FileStorage and
FileKeystore). Here, not in simulator/, so a board command does not
import the simulator.

`IdentityBoard` (board/identity_board.py, portable: the ESP32 runs it too)
carries out the core's key and storage actions and hands transport
actions to its caller.

`Enroller` is one device enrolling by claim (or recovering an expired
certificate) over real mTLS MQTT: it connects to the provisioning endpoint
with the batch's claim certificate, asks, retries while pending, and ends
with a proven identity (a connection the device endpoint accepted).
"""

import asyncio
import ssl
import warnings

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent import enroll, mqtt
from agent.actions import Log, Publish, UseIdentity
from agent.events import ConnectionLost, Connected, Message, PubAcked, Refused, Tick
from board.identity_board import IdentityBoard, refusal_reason  # noqa: F401  (here too, where its users import them)

CONNECT_TIMEOUT_S = 10


class Enroller:
    """One device's enrollment (or recovery) against a running cloud.

    endpoints: {"host", "device_port", "prov_port", "cafile", "server_name"};
    claim: (certfile, keyfile) of the batch's claim certificate."""

    def __init__(self, core, board, endpoints, claim, clock_ms, hwid):
        self.core = core
        self.board = board
        self.ep = endpoints
        self.claim = claim
        self.clock_ms = clock_ms
        self.hwid = hwid
        self.use = None          # the UseIdentity in force
        self.reader = None
        self.writer = None
        self.packet_id = 1
        self.tokens = {}         # packet id -> the core's token
        self.log = []            # (code, detail) the core logged
        self.outcome = None      # "proven" | "refused:<reason>" | "timeout"

    def feed(self, event):
        return self.board.run(self.core, self.core.handle(event))

    def proven(self):
        """Enrolled, connected with its own identity, and the cloud told."""
        return self.core.state == enroll.ENROLLED and self.writer is not None \
            and self.use is not None and self.use.name is not None and self.core.record.get("u") is None

    async def run(self, timeout_s=60, boot_blob=None, until=None, actions=None):
        """Drive the core until `until()` (default: its identity is proven).
        A core that is already running (a fleet device that must recover
        through the claim endpoint) is picked up with `actions`, the
        transport actions it just asked for, instead of being booted."""
        until = until or self.proven
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if actions is None:
            todo = self.board.run(self.core, self.core.boot(boot_blob))
        else:
            todo = list(actions)
        try:
            while loop.time() < deadline:
                todo += self.feed(Tick(self.clock_ms()))
                while todo:
                    todo = await self._carry(todo.pop(0)) + todo
                if until():
                    self.outcome = "proven"
                    return True
                todo += await self._read(0.2)
            self.outcome = "timeout"
            return False
        finally:
            await self._close()

    async def _carry(self, action):
        if isinstance(action, Log):
            self.log.append((action.code, action.detail))
            return []
        if isinstance(action, UseIdentity):
            self.use = action
            await self._close()
            return await self._connect()
        if isinstance(action, Publish):
            if self.writer is None:
                return []
            pid = self._pid()
            if action.token is not None:
                self.tokens[pid] = action.token
            self.writer.write(mqtt.publish(action.topic, action.payload, 1, pid))
            return []
        return []

    def _pid(self):
        pid = self.packet_id
        self.packet_id = pid % 65535 + 1
        return pid

    async def _connect(self):
        use = self.use
        if use.name is None:
            port, client_id, answer_topic = self.ep["prov_port"], self.hwid, None
            ctx = claim_context(self.ep["cafile"], self.claim)
            answer_topic = enroll.claim_topics(self.core.config.claim, self.hwid)[1]
        else:
            port = self.ep["device_port"]
            ctx = self.board.keystore.client_context(use.name, use.cert, self.ep["cafile"])
            client_id = cert_identity(use.cert)
            answer_topic = enroll.device_topics(client_id)[1]
        try:
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
                self.ep["host"], port, ssl=ctx, server_hostname=self.ep.get("server_name", "localhost")),
                CONNECT_TIMEOUT_S)
            self.writer.write(mqtt.connect(client_id, 60))
            self.writer.write(mqtt.subscribe(self._pid(), [(answer_topic, 1)]))
            packets = await self._packets(2, CONNECT_TIMEOUT_S)
        except ssl.SSLError as e:
            await self._close()
            return self.feed(Refused(self.clock_ms(), refusal_reason(e)))
        except (OSError, asyncio.TimeoutError, EOFError) as e:
            await self._close()
            if use.name is not None and isinstance(e, (ConnectionResetError, EOFError)):
                # TLS 1.3 tells a refused client certificate only by closing;
                # the core counts it, but does not take it as definite.
                return self.feed(Refused(self.clock_ms(), "closed"))
            return self.feed(ConnectionLost(self.clock_ms(), str(e)))
        if not packets or not isinstance(packets[0], mqtt.ConnAck) or packets[0].return_code != 0:
            await self._close()
            return self.feed(Refused(self.clock_ms(), "not_authorized"))
        return self.feed(Connected(self.clock_ms()))

    async def _packets(self, want, timeout_s):
        self._parser = mqtt.Parser()
        got = []
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while len(got) < want:
            data = await asyncio.wait_for(self.reader.read(4096), max(0.01, end - loop.time()))
            if not data:
                raise EOFError("closed")
            got += self._parser.feed(data)
        return got

    async def _read(self, wait_s):
        if self.reader is None:
            await asyncio.sleep(wait_s)
            return []
        try:
            data = await asyncio.wait_for(self.reader.read(4096), wait_s)
        except asyncio.TimeoutError:
            return []
        except (OSError, ssl.SSLError) as e:
            await self._close()
            return self.feed(ConnectionLost(self.clock_ms(), str(e)))
        if not data:
            await self._close()
            return self.feed(ConnectionLost(self.clock_ms(), "closed"))
        todo = []
        for packet in self._parser.feed(data):
            if isinstance(packet, mqtt.Publish):
                if packet.packet_id is not None:
                    self.writer.write(mqtt.puback(packet.packet_id))
                todo += self.feed(Message(self.clock_ms(), packet.topic, packet.payload))
            elif isinstance(packet, mqtt.PubAck) and packet.packet_id in self.tokens:
                todo += self.feed(PubAcked(self.tokens.pop(packet.packet_id)))
        return todo

    async def _close(self):
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


def claim_context(cafile, claim):
    """An mTLS client context for the batch's claim certificate (files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile)
    ctx.load_cert_chain(claim[0], claim[1])
    return ctx


def cert_identity(cert):
    """The subject CN of a certificate (PEM or DER bytes): its identity."""
    data = bytes(cert)
    c = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") \
        else x509.load_der_x509_certificate(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CNs over 64 characters (cloud/ca.py CN_LEN_X509_MAX)
        names = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise ValueError("certificate must have exactly one subject CN")
    return names[0].value

