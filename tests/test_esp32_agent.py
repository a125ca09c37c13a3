"""The ESP32 agent (board/esp32_agent.py) and its network driver
(board/esp32_net.py: MQTT over TLS with agent.mqtt, polled), run on CPython
against the real brokers (embedded and Mosquitto) with real mTLS: the same
module a board freezes, with CPython's socket and ssl where MicroPython has
socket and tls (open_tls works with both). What cannot exist here is the
chip: its flash and esp32.Partition are the model (board/esp32_model.py).

- telemetry delivered, then through a connection that dies under it (the
  socket shut from below): the link goes down, the core backs off,
  reconnects and resends; every record stored once;
- a firmware update end to end through the real cloud and rollout engine:
  a paged release, offered after the hello, downloaded page and chunks
  over the link, the reset, the trial on acknowledged telemetry, confirmed;
- the link's refusals and timers on a real socket pair whose other end
  plays a hostile broker: garbage, a CONNACK refusal, a PUBLISH before the
  session is up, a refused subscription, silence (no CONNACK), no PINGRESP,
  no PUBACK; each takes the link down once with its reason;
- on real MicroPython (the WebAssembly port, no sockets there): the link's
  session over an in-memory stream whose other end speaks agent.mqtt.
"""

import asyncio
import random
import socket
import ssl
import time

import pytest

from agent import mqtt, telemetry
from agent import updater as up
from board import esp32_model as em
from board import esp32_net
from board.esp32 import FlashStorage
from board.esp32_agent import Esp32Agent
from board.esp32_ota import Esp32Ota
from board.esp32_slots import BOOT_STATE, Esp32Slots
from board.linux import SystemClock, SystemRng
from board.sim import SimFlash
from cloud import rollout_plan as rp
from simulator import ota_drill

from brokers import any_cloud, broker_kind  # noqa: F401 (fixtures)
from mpy import require_micropython, run_micropython
from test_ota_service import cloud, start_rollout  # noqa: F401 (a fixture: the cloud with the drill's releases)

CONFIG = telemetry.Config(backoff_base_ms=100, backoff_cap_ms=800)


def opener(cloud, cred):
    ctx = ssl.create_default_context(cafile=cloud.ca_path)
    ctx.load_cert_chain(cred.certfile, cred.keyfile)
    return lambda: esp32_net.open_tls(cloud.host, cloud.port, ctx)


def run(agent, until, seconds, sample_every_s=None, n=None):
    """Passes of the board's loop until until() or seconds; samples if asked.
    agent: an Esp32Agent, or a Board (its agent of the moment: a reset
    makes a new one)."""
    end = time.monotonic() + seconds
    next_sample = 0.0
    n = n if n is not None else [0]
    board = agent if isinstance(agent, Board) else None
    while time.monotonic() < end:
        if until():
            return True
        if board is not None:
            agent = board.agent
        if sample_every_s is not None and time.monotonic() >= next_sample:
            agent.sample({"n": n[0]})
            n[0] += 1
            next_sample = time.monotonic() + sample_every_s
        agent.step()
        time.sleep(0 if agent.busy() else 0.005)
    return until()


# ---------------------------------------------------------------- telemetry

def booted_agent(cloud, device, tmp_path):
    """A new device of tenant acme with its certificate, its flash in tmp_path."""
    cred = cloud.issue_device("acme", device)
    agent = Esp32Agent("acme", device, FlashStorage(str(tmp_path / "flash")), SystemClock(), SystemRng(),
                       opener(cloud, cred), config=CONFIG, log=lambda text: None)
    agent.boot()
    return agent


async def test_telemetry_delivered_and_through_a_dead_connection(any_cloud, tmp_path):
    cloud = any_cloud
    agent = booted_agent(cloud, "esp-1", tmp_path)
    n = [0]
    online = lambda: agent.core.state == telemetry.ONLINE and agent.link.state == "up"  # noqa: E731
    assert await asyncio.to_thread(run, agent, online, 15)
    await asyncio.to_thread(run, agent, lambda: n[0] >= 10, 15, 0.05, n)
    # The connection dies under the agent (under its TLS too): a record may be in flight.
    under = socket.fromfd(agent.link.stream.sock.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    under.shutdown(socket.SHUT_RDWR)
    under.close()
    await asyncio.to_thread(run, agent, lambda: n[0] >= 20, 15, 0.05, n)
    drained = lambda: not agent.core.queue and online()  # noqa: E731
    assert await asyncio.to_thread(run, agent, drained, 20)
    assert agent.lost >= 1, "the link must have gone down"
    await cloud.ingest.stats()
    rows = cloud.store.tenant("acme").telemetry(device="esp-1")
    seqs = sorted(r["seq"] for r in rows)
    assert seqs == list(range(n[0])), "every record stored once, none lost"
    assert cloud.store.fleet_counts()["silent_gaps"] == 0


async def test_a_revoked_device_is_refused_and_keeps_its_records(any_cloud, tmp_path):
    cloud = any_cloud
    agent = booted_agent(cloud, "esp-2", tmp_path)
    assert await asyncio.to_thread(run, agent, lambda: agent.link.state == "up", 15)
    cloud.registry.revoke("acme/esp-2", "stolen", "secops")
    await cloud.enforce_revocations()
    n = [0]
    await asyncio.to_thread(run, agent, lambda: n[0] >= 5, 10, 0.1, n)
    assert await asyncio.to_thread(run, agent, lambda: agent.link.state == "down", 10)
    assert agent.core.queue, "records wait on the flash while the device is refused"
    assert not await asyncio.to_thread(run, agent, lambda: agent.link.state == "up", 3)


# ---------------------------------------------------------------- a firmware update

APP_BYTES = 0x8000               # the drill's images are 5 chunks


class Board:
    """One ESP32 (the model, the factory image in ota_0) whose agent is
    built anew at every reset, as main.py would after machine.reset()."""

    def __init__(self, cloud, cred, fw, tmp_path):
        self.cloud, self.cred, self.fw = cloud, cred, fw
        self.images = {v: fw.releases[v][0] for v in fw.releases}
        self.flash = SimFlash(rng=random.Random(3))
        self.chip = em.Esp32Model(self.flash, APP_BYTES, self.valid)
        self.chip.flash_image("ota_0", self.images[ota_drill.FACTORY])
        self.flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=1, ksv=1).encode())
        self.root = str(tmp_path / "esp-flash")
        self.resets = 0
        self.agent = None
        self.chip.reset()                     # power on: the bootloader, then the app
        self.start()

    def valid(self, data):
        return any(data.startswith(image) for image in self.images.values())

    def version(self):
        data = self.chip.app_bytes(self.chip.running)
        return [v for v, image in self.images.items() if data.startswith(image)][0]

    def start(self):
        clock = SystemClock()
        ota = Esp32Ota("acme/esp-ota", self.fw.config, Esp32Slots(self.flash, esp32=self.chip.module),
                       "site-0", self.version(), None, self.reset, clock.ticks_ms, clock.now_ms)
        self.agent = Esp32Agent("acme", "esp-ota", FlashStorage(self.root), clock, SystemRng(),
                                opener(self.cloud, self.cred), config=CONFIG, ota=ota,
                                log=lambda text: None)
        self.agent.boot()

    def reset(self):
        self.resets += 1
        self.agent.link.close("reset")
        self.chip.reset()
        self.start()


async def test_a_paged_update_over_the_link_to_confirmed(cloud, tmp_path):
    """The drill's good release is paged (simulator/ota_drill.py)."""
    ops, fw = cloud.ops, cloud.fw
    board = Board(cloud, cloud.issue_device("acme", "esp-ota"), fw, tmp_path)
    said_hello = lambda: any(d["device"] == "acme/esp-ota" for d in ops.devices())  # noqa: E731
    assert await asyncio.to_thread(run, board, said_hello, 15)
    rid = start_rollout(cloud)

    def confirmed():
        u = board.agent.ota.updater
        return u is not None and u.state == up.CONFIRMED and board.resets == 1

    n = [0]
    assert await asyncio.to_thread(run, board, confirmed, 30, 0.05, n), \
        (board.agent.ota.updater and board.agent.ota.updater.state, board.resets)
    assert board.version() == ota_drill.GOOD and board.chip.running == "ota_1"
    done = lambda: ops.status(rid)["state"] == rp.COMPLETED  # noqa: E731
    for _ in range(40):
        cloud.ota_service.tick_now()
        if await asyncio.to_thread(run, board, done, 0.5, 0.05, n):
            break
    assert ops.status(rid)["state"] == rp.COMPLETED
    core = cloud.ota_service.core
    assert core.counts["page_served"] >= 1 and core.counts["chunk_served"] >= 1
    statuses = [r["status"] for r in core.reports if r["device"] == "acme/esp-ota"]
    assert statuses[:2] == ["downloading", "verified"] and statuses[-1] == "confirmed"


# ---------------------------------------------------------------- hostile brokers

class PairStream:
    """esp32_net's stream interface over one end of a socket pair (no TLS:
    what is tested here is the link's handling of what a broker sends)."""

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)

    def send(self, data):
        self.sock.sendall(data)

    def recv(self, n):
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            return None

    def close(self):
        self.sock.close()


class Ticks:
    def __init__(self):
        self.ms = 0

    def __call__(self):
        return self.ms


def hostile_link(subscriptions=("t/acme/d/update",), keepalive_s=60):
    mine, broker = socket.socketpair()
    broker.settimeout(2)
    ticks = Ticks()
    link = esp32_net.MqttLink("acme/d", list(subscriptions), lambda: PairStream(mine), ticks,
                              keepalive_s=keepalive_s)
    link.open()
    first = broker.recv(1024)
    assert first[0] >> 4 == mqtt.CONNECT
    return link, broker, ticks


def down_reasons(link):
    return [e for e in link.poll() if e[0] == "down"]


def come_up(link, broker):
    broker.sendall(b"\x20\x02\x00\x00")                  # CONNACK accepted
    assert link.poll() == []                             # up only once subscribed
    sub = broker.recv(1024)
    assert sub[0] >> 4 == mqtt.SUBSCRIBE
    broker.sendall(b"\x90\x03\x00\x01\x01")              # SUBACK, QoS 1 granted
    assert link.poll() == [("up",)]


@pytest.mark.parametrize("send, reason", [
    (b"\xff\xff\xff\xff\xff", "bad packet"),             # garbage
    (b"\x20\x02\x00\x05", "refused: not authorized"),    # CONNACK refused
    (b"\x30\x05\x00\x01t\x00\x00", "a PUBLISH before the CONNACK"),
    (b"\x90\x03\x00\x01\x01", "a SUBACK out of turn"),   # before the CONNACK
    (b"", "closed by the broker"),                       # the broker hangs up
])
def test_what_a_hostile_broker_sends_takes_the_link_down_with_a_reason(send, reason):
    link, broker, _ = hostile_link()
    if send:
        broker.sendall(send)
    else:
        broker.close()
    events = down_reasons(link)
    assert len(events) == 1 and events[0][1].startswith(reason), events
    assert link.state == "down" and link.poll() == []    # said once
    assert link.publish("t/x", b"1", "tok") is None


def test_a_refused_subscription_and_a_connack_refusal_name_their_cause():
    link, broker, _ = hostile_link()
    broker.sendall(b"\x20\x02\x00\x00")
    assert link.poll() == []
    broker.recv(1024)
    broker.sendall(b"\x90\x03\x00\x01\x80")              # SUBACK failure
    assert down_reasons(link) == [("down", "subscription refused", None)]
    link, broker, _ = hostile_link()
    broker.sendall(b"\x20\x02\x00\x05")
    assert down_reasons(link) == [("down", "refused: not authorized", "not_authorized")]   # as the identity core names it


def test_the_link_times_out_silence_a_missing_pingresp_and_a_missing_puback():
    link, broker, ticks = hostile_link()
    ticks.ms = esp32_net.CONNECT_TIMEOUT_MS
    assert down_reasons(link)[0][1].startswith("no CONNACK")

    link, broker, ticks = hostile_link(keepalive_s=10)
    come_up(link, broker)
    ticks.ms = 5000                                      # half the keepalive: PINGREQ
    assert link.poll() == []
    assert broker.recv(1024) == mqtt.pingreq()
    broker.sendall(b"\xd0\x00")                          # PINGRESP
    assert link.poll() == []
    ticks.ms = 10000
    link.poll()
    assert broker.recv(1024) == mqtt.pingreq()
    ticks.ms = 20000                                     # no PINGRESP within the keepalive
    assert down_reasons(link)[0][1].startswith("no PINGRESP")

    link, broker, ticks = hostile_link()
    come_up(link, broker)
    handle = link.publish("t/acme/d/telemetry", b"x", "rec-1")
    assert broker.recv(1024)[0] >> 4 == mqtt.PUBLISH and not link.delivered(handle)
    broker.sendall(mqtt.puback(handle[0]))
    assert link.poll() == [("acked", "rec-1")] and link.delivered(handle)
    link.publish("t/acme/d/telemetry", b"y", "rec-2")
    ticks.ms = esp32_net.ACK_TIMEOUT_MS
    assert down_reasons(link)[0][1].startswith("no PUBACK")


def test_a_message_is_acknowledged_and_handed_on_and_a_stray_puback_ignored():
    link, broker, _ = hostile_link()
    come_up(link, broker)
    broker.sendall(mqtt.publish("t/acme/d/update", b"offer", 1, 7) + mqtt.puback(999))
    assert link.poll() == [("message", "t/acme/d/update", b"offer")]
    assert broker.recv(1024) == mqtt.puback(7)
    # A packet larger than the link takes is refused, not buffered.
    broker.sendall(mqtt.publish("t/acme/d/update", b"x" * (esp32_net.PACKET_BYTES_MAX + 1), 0))
    assert down_reasons(link)[0][1].startswith("bad packet")


def test_a_connect_that_fails_is_a_down_event_not_an_exception():
    def refuse():
        raise OSError(111, "connection refused")
    link = esp32_net.MqttLink("acme/d", [], refuse, Ticks())
    link.open()
    assert link.poll() == [("down", "connect failed: ConnectionRefusedError [Errno 111] connection refused", None)]


# ---------------------------------------------------------------- MicroPython

MPY_SESSION = r'''
from agent import mqtt
from board import esp32_net
from board import esp32_identity          # the identity driver imports on the port too

class Pipe:
    """Both ends in memory: what the link sends, what the broker answers."""
    def __init__(self):
        self.to_broker = bytearray()
        self.to_link = bytearray()
    def send(self, data):
        self.to_broker += data
    def recv(self, n):
        if not self.to_link:
            return None
        data = bytes(self.to_link[:n])
        self.to_link[:n] = b""
        return data
    def close(self):
        pass

t = [0]
pipe = Pipe()
link = esp32_net.MqttLink("acme/d", ["t/acme/d/update"], lambda: pipe, lambda: t[0])
link.open()
print("connect", pipe.to_broker[0] == 0x10)              # CONNECT
pipe.to_broker[:] = b""
pipe.to_link += b"\x20\x02\x00\x00"
print("after connack", link.poll())
pipe.to_broker[:] = b""
pipe.to_link += b"\x90\x03\x00\x01\x01"
print("after suback", link.poll())
handle = link.publish("t/acme/d/telemetry", b"hello", "rec-1")
pipe.to_link += mqtt.puback(handle[0]) + mqtt.publish("t/acme/d/update", b"offer", 1, 9)
print("events", link.poll())
print("puback sent", bytes(pipe.to_broker[-4:]) == mqtt.puback(9))
t[0] = 30000
print("ping", link.poll(), bytes(pipe.to_broker[-2:]) == mqtt.pingreq())
t[0] = 100000
print("down", link.poll())

# The agent: the telemetry core on the flash filesystem over the link.
from board.esp32 import FlashStorage, Rng
from board.esp32_agent import Esp32Agent

class Clock:
    def now_ms(self):
        return 1800000000000 + t[0]
    def ticks_ms(self):
        return t[0]

pipe = Pipe()
agent = Esp32Agent("acme", "d", FlashStorage("/data"), Clock(), Rng(), lambda: pipe,
                   log=lambda text: None)
agent.boot()
agent.step()                                    # the core connects at once
print("agent connect", pipe.to_broker[:1] == b"\x10", agent.core.state)
pipe.to_broker[:] = b""
pipe.to_link += b"\x20\x02\x00\x00"
agent.step()
agent.sample({"temp_c": 21})
print("agent up", agent.link.state, agent.core.state, len(agent.core.queue))
print("agent published", pipe.to_broker[0] == 0x32)     # PUBLISH, QoS 1
pipe.to_link += mqtt.puback(list(agent.link.inflight)[0])
agent.step()
print("agent acked", agent.acked, len(agent.core.queue))
'''


def test_the_link_session_runs_on_micropython():
    require_micropython()
    out = run_micropython(MPY_SESSION, heap_kb=256, modules=("agent", "board")).split("\n")
    assert out[0] == "connect True"
    assert out[1] == "after connack []"
    assert out[2] == "after suback [('up',)]"
    assert out[3] == "events [('acked', 'rec-1'), ('message', 't/acme/d/update', b'offer')]"
    assert out[4] == "puback sent True"
    assert out[5] == "ping [] True"
    assert out[6].startswith("down [('down', 'no PINGRESP")
    assert out[7] == "agent connect True connecting"
    assert out[8] == "agent up up online 1"
    assert out[9] == "agent published True"
    assert out[10] == "agent acked 1 0"
