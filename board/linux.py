"""The Linux board (Raspberry-Pi class): files on disk written with fsync and
rename, the system clock, and an MQTT transport on paho-mqtt."""

import os
import random
import time


class FileStorage:
    """The storage interface over a directory. write_atomic writes a temporary
    file, fsyncs it, renames it over the old one and fsyncs the directory, so a
    power cut leaves either the old or the new contents."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _path(self, name):
        if not name or "/" in name or name.startswith("."):
            raise ValueError("bad storage name %r" % (name,))
        return os.path.join(self.root, name)

    def read(self, name):
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def append(self, name, data):
        with open(self._path(name), "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_atomic(self, name, data):
        path = self._path(name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sync_dir()

    def remove(self, name):
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            return
        self._sync_dir()

    def _sync_dir(self):
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SystemClock:
    def now_ms(self):
        return time.time_ns() // 1_000_000

    def ticks_ms(self):
        return time.monotonic_ns() // 1_000_000


class SystemRng:
    def __init__(self):
        self._r = random.SystemRandom()

    def randint(self, a, b):
        return self._r.randint(a, b)
