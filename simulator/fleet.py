"""A fleet of virtual devices on one asyncio loop, with fault injection
(network cuts, broker restarts), live metrics and a drain at the end."""

import asyncio
import random
import ssl
import time

from agent import events, telemetry
from cloud import probe
from cloud.service import DeviceCredential as Credential  # noqa: F401  (re-exported)
from simulator.device import VirtualDevice


TLS_READ_BUFFER_BYTES = 16 * 1024


def small_tls_buffers():
    """asyncio gives every TLS connection a 256 KiB read buffer
    (asyncio.sslproto.SSLProtocol.max_size), which is most of a virtual
    device's memory. 16 KiB holds a whole TLS record, so reads stay whole.
    This is process-wide and touches a private attribute: it is guarded, and
    benchmarks/fleet_bench.py measures its effect."""
    try:
        from asyncio import sslproto
    except ImportError:
        return
    if getattr(sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER_BYTES:
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES


class Metrics:
    def __init__(self):
        self.published = 0
        self.acked = 0
        self.connects = 0
        self.connect_attempts = 0
        self.notes = {}
        self.timeline = []   # one row a second: see Fleet.sample_timeline
        self.connect_errors = {}  # reason -> {"reason", "count", "first"}: why connects failed

    def note(self, code):
        self.notes[code] = self.notes.get(code, 0) + 1

    def connect_error(self, reason, message):
        """One failed connection attempt (no CONNACK accepted), grouped by
        reason; the first message of each reason is kept."""
        entry = self.connect_errors.get(reason)
        if entry is None:
            entry = self.connect_errors[reason] = {"reason": reason, "count": 0, "first": message}
        entry["count"] += 1

    def connect_error_tally(self):
        """[{"reason", "count", "first"}], the most frequent first."""
        return sorted((dict(e) for e in self.connect_errors.values()), key=lambda e: (-e["count"], e["reason"]))


class CredentialError(ValueError):
    """A device credential (or the CA bundle) could not be loaded."""


def client_context(cafile, certfile, keyfile):
    """One device's mTLS context (the same one the cloud's probes use)."""
    return probe.client_context(cafile, (certfile, keyfile))


class Fleet:
    def __init__(self, credentials, cafile, host, port, seed=1, server_name="localhost",
                 config=None, sample_interval_s=1.0, progress=None, fresh_epochs=False):
        small_tls_buffers()
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.server_name = server_name
        self.sample_interval_s = sample_interval_s
        self.metrics = Metrics()
        self.network_up = True
        self.closing = False
        self.sample_failures = 0
        self.core_errors = []   # the agent core refused an event: a driver bug
        self.epoch_base = int(time.time()) - 1_700_000_000 if fresh_epochs else 0
        self.progress = progress or (lambda fleet, phase: None)
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()
        self.sampling = False
        self.cafile = cafile
        self.claim = None  # (endpoints, claim files): lets enrolled devices recover an expired identity
        self.devices = []
        for i, cred in enumerate(credentials):
            dev_config = config(i) if callable(config) else config
            enrolled = getattr(cred, "enroller", None)
            if enrolled is not None:  # enrolled by claim: its key, flash and identity core
                self.devices.append(VirtualDevice(
                    self, cred.tenant, cred.device, cred.context, seed * 1_000_003 + i, dev_config,
                    self.epoch_base, flash=enrolled.board.flash, id_core=enrolled.core, id_board=enrolled.board))
                continue
            try:
                ctx = client_context(cafile, cred.certfile, cred.keyfile)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise CredentialError("cannot load the credential of %s/%s (%s, %s): %s" % (
                    cred.tenant, cred.device, cred.certfile, cred.keyfile,
                    getattr(e, "strerror", None) or e)) from None
            self.devices.append(VirtualDevice(self, cred.tenant, cred.device, ctx,
                                              seed * 1_000_003 + i, dev_config, self.epoch_base))

    def now_ms(self):
        return time.time_ns() // 1_000_000

    def elapsed_s(self):
        return time.monotonic() - self.t0

    # -- phases -----------------------------------------------------------------

    def start(self):
        self.t0 = time.monotonic()
        self.sampling = True
        n = len(self.devices)
        for i, dev in enumerate(self.devices):
            dev.boot()
            offset = self.sample_interval_s * i / max(n, 1)
            self.loop.call_later(offset, self._sample_loop, dev)

    def _sample_loop(self, dev):
        if not self.sampling:
            return
        self.loop.call_later(self.sample_interval_s, self._sample_loop, dev)
        r = dev.rng
        try:
            dev.sample({"temp_c": 15 + r.randint(0, 150) / 10, "rssi_dbm": -40 - r.randint(0, 50),
                        "battery_mv": 3000 + r.randint(0, 1200)})
        except Exception as e:  # counted and checked: a run with failures fails
            self.sample_failures += 1
            self.metrics.note("sample_failed:%s" % type(e).__name__)

    def cut_network(self):
        self.network_up = False
        for dev in self.devices:
            dev.cut()

    def restore_network(self):
        self.network_up = True

    async def run_for(self, seconds, events=()):
        """Sample for `seconds`, firing (at_s, callable) events on the way."""
        pending = sorted(events, key=lambda e: e[0])
        end = self.t0 + seconds
        while time.monotonic() < end:
            now = self.elapsed_s()
            while pending and pending[0][0] <= now:
                _, fire = pending.pop(0)
                result = fire()
                if asyncio.iscoroutine(result):
                    await result
            self.sample_timeline()
            self.progress(self, "run")
            await asyncio.sleep(min(1.0, max(0.05, end - time.monotonic())))

    async def drain(self, timeout_s=60):
        """Stop sampling; wait until every queue is empty and acknowledged."""
        self.sampling = False
        self.network_up = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = [d for d in self.devices if not d.idle()]
            self.sample_timeline()
            self.progress(self, "drain")
            if not busy:
                return True
            for dev in busy:
                if dev.core.state == telemetry.OFFLINE and dev.tick_handle is None:
                    dev.schedule_tick()
            for dev in self.devices:  # identity cores keep their clocks while draining
                dev.feed_identity(events.Tick(self.now_ms()))
            await asyncio.sleep(0.5)
        return False

    async def close(self):
        self.sampling = False
        self.closing = True
        for dev in self.devices:
            if dev.tick_handle is not None:
                dev.tick_handle.cancel()
            for link in (dev.link, dev.pending):
                if link is not None:
                    link.abort()
            if dev.task is not None and not dev.task.done():
                dev.task.cancel()
            if dev.recovering is not None:
                dev.recovering.cancel()
        await asyncio.sleep(0.1)

    # -- numbers ----------------------------------------------------------------

    def connected(self):
        return sum(1 for d in self.devices if d.link is not None)

    def queued(self):
        return sum(d.queued() for d in self.devices)

    def generated(self):
        return sum(sum(d.generated.values()) for d in self.devices)

    def declared_drops(self):
        return sum(len(d.dropped) for d in self.devices)

    def refused(self):
        return sum(d.core.refused for d in self.devices)

    def sample_timeline(self):
        self.metrics.timeline.append({
            "t_s": round(self.elapsed_s(), 2), "connected": self.connected(),
            "queued": self.queued(), "published": self.metrics.published,
            "acked": self.metrics.acked, "network_up": self.network_up})
