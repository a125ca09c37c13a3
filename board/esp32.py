"""The ESP32 board under MicroPython: what this release has of it.

Here: the storage, clock and randomness the agent core needs, written for
MicroPython and tested on real MicroPython (the WebAssembly port) against
the same interface the sim and linux boards give (docs/design.md).

Elsewhere: the A/B slots over esp32.Partition (board/esp32_slots.py), the
keystore (board/esp32_keystore.py), the console's UART driver
(board/esp32_console.py), the network driver and the agent's loop
(board/esp32_net.py: MQTT over TLS with agent.mqtt, polled;
board/esp32_agent.py). Nothing in this module touches hardware at import
time.

Storage needs LittleFS (MicroPython's default on ESP32): a rename there
replaces the target atomically, so write_atomic is all-or-nothing. On FAT
it is not; do not use a FAT filesystem for the agent's data.
"""

import os
import time

try:
    import random
except ImportError:  # some minimal builds
    random = None


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class FlashStorage:
    def __init__(self, root="/data"):
        self.root = root
        if not _exists(root):
            os.mkdir(root)

    def _path(self, name):
        if not name or "/" in name or name[0] == ".":
            raise ValueError("bad storage name")
        return self.root + "/" + name

    def read(self, name):
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def append(self, name, data):
        with open(self._path(name), "ab") as f:
            f.write(data)
            f.flush()  # LittleFS commits the file on flush/close

    def write_atomic(self, name, data):
        path = self._path(name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
        os.rename(tmp, path)

    def remove(self, name):
        try:
            os.remove(self._path(name))
        except OSError:
            pass


class Clock:
    """Wall clock in ms since the Unix epoch (set by NTP or the cloud), and
    ticks for intervals. Ports whose epoch is 2000 are corrected."""

    def __init__(self):
        self._offset_s = 0
        if time.gmtime(0)[0] == 2000:
            self._offset_s = 946684800

    def now_ms(self):
        return int((time.time() + self._offset_s) * 1000)

    def ticks_ms(self):
        return time.ticks_ms()


class Rng:
    """Backoff jitter; os.urandom is the hardware RNG on ESP32."""

    def randint(self, a, b):
        span = b - a + 1
        if span <= 0:
            raise ValueError("empty range")
        raw = int.from_bytes(os.urandom(4), "little") if hasattr(os, "urandom") else random.getrandbits(32)
        return a + raw % span
