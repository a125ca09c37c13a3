"""Runs the real telemetry core on a SimFlash with an in-memory broker peer,
so tests can cut power, cut the network and replay from a seed."""

import struct

from agent import events, telemetry
from agent.actions import Append, Connect, Log, Publish, WriteAtomic
from board.codec import CODEC
from board.sim import PowerCut, SimClock, SimFlash, SimRng


class MemoryBroker:
    """Acknowledges publishes; remembers every payload it acknowledged."""

    def __init__(self):
        self.acked = []
        self.up = True


class Device:
    def __init__(self, seed=1, config=None, flash=None, broker=None, codec=CODEC):
        self.flash = flash or SimFlash(rng=SimRng(seed)._r)
        self.clock = SimClock()
        self.rng = SimRng(seed)
        self.broker = broker or MemoryBroker()
        self.config = config
        self.codec = codec
        self.pending_acks = []
        self.logs = []
        self.core = None
        self.durable = set()      # (epoch, seq) of every record whose append completed
        self.dropped = set()      # (epoch, seq) of every record a completed X frame dropped

    def boot(self):
        self.core = telemetry.Telemetry("acme", "dev-1", self.codec, self.rng, self.config)
        self.pending_acks = []
        actions = self.core.boot(self.flash.read("state"), self.flash.read("queue"))
        self.run(actions)

    def run(self, actions):
        for action in actions:
            if isinstance(action, Append):
                self.flash.append(action.name, action.data)
                self.note_durable(action.data)
            elif isinstance(action, WriteAtomic):
                self.flash.write_atomic(action.name, action.data)
            elif isinstance(action, Connect):
                self.pending_connect = True
            elif isinstance(action, Publish):
                self.pending_acks.append(action)
            elif isinstance(action, Log):
                self.logs.append(action)

    def note_durable(self, frame):
        """The key of the record an A or X frame just made durable."""
        kind = frame[6:7]
        if kind == b"A":
            self.durable.add(struct.unpack_from("<II", frame, 7))
        elif kind == b"X":
            self.dropped.add(struct.unpack_from("<II", frame, 7))
            self.durable.add(struct.unpack_from("<II", frame, 15))

    def feed(self, event):
        self.run(self.core.handle(event))

    def step(self, ms=1000, readings=None):
        """One second of device life: time passes, maybe connect, one sample."""
        self.clock.advance(ms)
        now = self.clock.now_ms()
        self.pending_connect = False
        self.feed(events.Tick(now))
        if self.pending_connect:
            if self.broker.up:
                self.feed(events.Connected(now))
            else:
                self.feed(events.ConnectionLost(now, "network down"))
        self.feed(events.Sample(now, readings or {"temp_mc": 21000 + now % 1000}))

    def deliver_acks(self, limit=None):
        """The broker acknowledges what is in flight (all, or the first `limit`)."""
        n = 0
        while self.pending_acks and (limit is None or n < limit):
            if self.core.state != telemetry.ONLINE:
                break
            pub = self.pending_acks.pop(0)
            self.broker.acked.append(pub.payload)
            self.feed(events.PubAcked(pub.token))
            n += 1

    def drop_connection(self):
        self.pending_acks = []
        if self.core.state in (telemetry.ONLINE, telemetry.CONNECTING):
            self.feed(events.ConnectionLost(self.clock.now_ms(), "cut"))


__all__ = ["Device", "MemoryBroker", "PowerCut"]
