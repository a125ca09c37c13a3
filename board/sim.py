"""The simulated board: in-memory flash that can lose power at any write,
a virtual clock, and seeded randomness. A faithful model of what an ESP32
gives the agent, including the failure modes: an append cut short leaves a
torn tail; an atomic replace is either wholly old or wholly new."""

import random


class PowerCut(Exception):
    """Raised by SimFlash when the injected power cut happens."""


class SimFlash:
    def __init__(self, rng=None, cut_at_write=None, capacity_bytes=1 << 20):
        self.files = {}
        self.used = 0                     # bytes in all files
        self.writes = 0                   # writes attempted so far
        self.cut_at_write = cut_at_write  # 1-based index of the write that loses power
        self.capacity_bytes = capacity_bytes
        self._rng = rng                   # made on first use: most flashes never lose power
        self.dead = False

    @property
    def rng(self):
        if self._rng is None:
            self._rng = random.Random(0)
        return self._rng

    # -- the storage interface (docs/design.md) ---------------------------

    def read(self, name):
        self._alive()
        data = self.files.get(name)
        return None if data is None else bytes(data)

    def append(self, name, data):
        self._alive()
        self._room(len(data))
        if self._cut_now():
            self._extend(name, data[:self.rng.randint(0, len(data))])
            self._die()
        self._extend(name, data)

    def write_atomic(self, name, data):
        self._alive()
        self._room(len(data) - len(self.files.get(name, b"")))
        if self._cut_now():
            if self.rng.randint(0, 1):
                self._replace(name, bytearray(data))
            self._die()
        self._replace(name, bytearray(data))

    def remove(self, name):
        self._alive()
        if self._cut_now():
            if self.rng.randint(0, 1):
                self._replace(name, None)
            self._die()
        self._replace(name, None)

    def _extend(self, name, data):
        self.files.setdefault(name, bytearray()).extend(data)
        self.used += len(data)

    def _replace(self, name, data):
        old = self.files.pop(name, None)
        self.used -= len(old) if old is not None else 0
        if data is not None:
            self.files[name] = data
            self.used += len(data)

    # -- power --------------------------------------------------------------

    def power_on(self, cut_at_write=None):
        """Power comes back: contents are kept, the write counter restarts."""
        self.dead = False
        self.writes = 0
        self.cut_at_write = cut_at_write

    def used_bytes(self):
        return self.used

    def _cut_now(self):
        self.writes += 1
        return self.cut_at_write is not None and self.writes == self.cut_at_write

    def _die(self):
        self.dead = True
        raise PowerCut("power cut at write %d" % self.writes)

    def _alive(self):
        if self.dead:
            raise PowerCut("flash used after a power cut, before power_on()")

    def _room(self, extra):
        if self.used_bytes() + max(extra, 0) > self.capacity_bytes:
            raise OSError(28, "simulated flash is full")


class SimClock:
    """Virtual time: only advance() moves it."""

    def __init__(self, start_ms=1_800_000_000_000):
        self._now_ms = start_ms
        self._ticks_ms = 0

    def now_ms(self):
        return self._now_ms

    def ticks_ms(self):
        return self._ticks_ms

    def advance(self, ms):
        self._now_ms += ms
        self._ticks_ms += ms


class SimRng:
    """Seeded randomness with the one method the agent core uses."""

    def __init__(self, seed):
        self._r = random.Random(seed)

    def randint(self, a, b):
        return self._r.randint(a, b)
