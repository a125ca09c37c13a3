"""The device side of firmware updates in the fleet simulator: a component
a VirtualDevice (simulator/device.py) owns when the fleet runs updates.

It runs the real update machine (agent/updater.py) over board.slots.SimSlots
on the device's own SimFlash, speaks the OTA messages (docs/ota.md) over
the device's own mTLS connection (hello with its version after every
connect, reports and chunk requests on t/<id>/ota; offers and chunks on
t/<id>/update), turns the device's acknowledged telemetry into Healthy
events during a trial, and simulates a reboot: the connection drops, the
sim bootloader picks the slot, and the image's fault profile
(simulator/firmware_faults.py) decides what the new image does: crash on
boot (the bootloader boots again and rolls back), fail its health check
(no Healthy: the trial times out), or hang silent with its network down
until the watchdog resets it.

The telemetry core keeps running across a simulated reboot (its flash-backed
queue makes that a reconnect for the cloud); only the connection, the
update machine and the image change.
"""

import hashlib

from agent import manifest as mf
from agent import updater as up
from agent.actions import Publish
from agent.errors import LocalError
from board.slots import BOOT_STATE, SLOT_NAMES, SimSlots
from agent.ota_wire import DOWN, DOWN_BYTES_MAX, REASON_CHARS_MAX, encode, parse
from agent.ota_wire import WireError as OtaError  # the device parses with the portable code
from simulator import firmware_faults as ff

BOOTS_MAX = 3                # a crash on boot costs one boot; the bootloader rolls back on the next
PACKET_BYTES_MAX = DOWN_BYTES_MAX + 512    # the MQTT parser's bound with updates on (topic, header)
HELLO_RETRY_MS = 3000        # a hello not welcomed by then is said again ...
HELLO_TRIES_MAX = 10         # ... at most this often per connection
REBOOT_DELAY_S = 0.3         # from the updater's Reboot to the reset
OUTBOX_MAX = 64              # messages held while offline; past it the oldest go (reports repeat on boot)


class Firmware:
    """What the fleet's images are and do: the releases' payloads (an image
    is known by its SHA-256), their fault profiles, the updater's config."""

    def __init__(self, hw_class, factory, releases, config, seed):
        """releases: {version: (payload, security_version, FaultProfile)}."""
        self.hw_class, self.factory, self.config, self.seed = hw_class, factory, config, seed
        self.releases = releases
        self.by_hash = {hashlib.sha256(p).digest(): v for v, (p, _, _) in releases.items()}
        self.on_chunk_written = None      # hook(ota_device, index): the drill's network cut

    def version_of(self, image):
        return self.by_hash.get(hashlib.sha256(bytes(image)).digest())

    def fate(self, version, device):
        return self.releases[version][2].fate(self.seed, version, device)

    def watchdog_s(self, version):
        return self.releases[version][2].watchdog_s


class OtaDevice:
    def __init__(self, dev, firmware, site):
        self.dev = dev
        self.fw = firmware
        self.site = site
        self.up_topic = "t/%s/ota" % dev.identity
        self.down_topic = "t/%s/update" % dev.identity
        self.packet_bytes_max = PACKET_BYTES_MAX
        self.slots = SimSlots(dev.flash)
        if dev.flash.read(BOOT_STATE) is None:       # the factory image
            payload, sv, _ = firmware.releases[firmware.factory]
            dev.flash.write_atomic(SLOT_NAMES[0], payload)
            dev.flash.write_atomic(BOOT_STATE, up.BootState(active=0, sv=sv, ksv=1).encode())
        self.updater = None
        self.rebooting = None         # the timer of a pending reboot
        self.version = None
        self.fate = ff.OK
        self.online = False           # connected since the last (simulated) reboot
        self.connected_ms = None
        self.welcomed = False         # the cloud answered this connection's hello
        self.hellos = 0
        self.hello_ms = 0
        self.outbox = []
        self.acked_at_boot = 0
        self.hung_until_ms = None
        self.resuming = False
        self.bricked = False
        self.boots = 0
        self.crashes = 0
        self.resumed = 0              # downloads that went on from their cursor after a reconnect
        self.restarted = 0            # ... that went back to chunk 0 instead (must stay 0)
        self.refused = 0              # update-topic messages this device refused to parse
        self.errors = {}              # the cloud's error answers, by code
        self.power_on()

    # -- boot -------------------------------------------------------------------

    def power_on(self):
        for _ in range(BOOTS_MAX):
            slot, blob = self.slots.boot()
            self.boots += 1
            version = self.fw.version_of(self.slots.read_slot(slot))
            if version is None:
                self.bricked = True
                self.updater = None
                return
            state = up.decode_boot_state(blob)
            trial = state.phase == up.TRIAL and slot == state.target
            fate = self.fw.fate(version, self.dev.identity) if trial else ff.OK
            if fate == ff.CRASH_ON_BOOT:
                self.crashes += 1
                continue
            self.version, self.fate = version, fate
            if fate == ff.SILENT:                       # hangs, network down, until the watchdog
                self.hung_until_ms = self.dev.fleet.now_ms() + self.fw.watchdog_s(version) * 1000
                self.updater = None
                self.dev.cut()
                return
            self.hung_until_ms = None
            self.acked_at_boot = len(self.dev.acked)
            self.updater = up.Updater(self.fw.config)
            self.run(self.handle(up.Booted(slot, blob)))
            return
        self.bricked = True

    def reboot(self):
        """The update machine asked for a reboot: the connection goes, the bootloader runs."""
        self.rebooting = None
        self.online = False
        self.updater = None
        self.dev.cut()
        self.power_on()

    def hung(self):
        return self.hung_until_ms is not None

    # -- the driver -----------------------------------------------------------------

    def handle(self, event):
        if self.updater is None:
            return []
        try:
            return self.updater.handle(event)
        except LocalError as e:       # a driver bug: counted, and a failed check at the end
            self.dev.fleet.core_errors.append("%s updater: %s" % (self.dev.identity, e))
            return []

    def run(self, actions):
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            if isinstance(a, up.WriteSlot):
                self.slots.write_slot(a.slot, a.offset, a.data)
                if self.fw.on_chunk_written is not None:
                    self.fw.on_chunk_written(self, a.offset // mf.CHUNK_BYTES)
            elif isinstance(a, up.WriteBootState):
                self.slots.write_boot_state(a.data)
            elif isinstance(a, up.Report):
                self.send(encode("report", st=a.status, why=a.reason[:REASON_CHARS_MAX], seq=a.seq, ref=a.ref))
            elif isinstance(a, up.RequestChunk):
                self._request(a.index)
            elif isinstance(a, up.StepLater):        # the next piece after the loop's other work
                self.dev.fleet.loop.call_soon(self._step, self.updater)
            elif isinstance(a, up.ReadSlot):         # local flash: answered at once
                data = self.slots.read_slot(a.slot, a.offset, a.length)
                todo = self.handle(up.SlotRead(a.offset, data)) + todo
            elif isinstance(a, up.Reboot):
                # The driver lets the last report (installed) reach the broker
                # before it resets, as a real one waits for its PUBACK, bounded.
                self.rebooting = self.dev.fleet.loop.call_later(REBOOT_DELAY_S, self.reboot)
                return

    def _step(self, updater):
        if updater is self.updater:                  # not rebooted meanwhile
            self.run(self.handle(up.Step()))

    def _request(self, index):
        if self.resuming:
            self.resuming = False
            if index > 0:
                self.resumed += 1
            else:
                self.restarted += 1
        # Not kept while offline: after a reconnect the offer comes again and
        # the updater asks for its cursor.
        self.send(encode("chunk", ref=self.updater.boot.ref, i=index), keep=False)

    def send(self, payload, keep=True):
        if self.online and self.dev.link is not None:
            self.dev.publish(Publish(self.up_topic, payload, None), count=False)
            return
        if not keep:
            return
        if len(self.outbox) >= OUTBOX_MAX:
            self.outbox.pop(0)
        self.outbox.append(payload)

    # -- what the VirtualDevice calls ------------------------------------------------

    def connected(self):
        """The broker accepted a connection: hello first, then what waited."""
        self.online = True
        self.connected_ms = self.dev.fleet.now_ms()
        self.welcomed = False
        self.hellos = 0
        self._hello()
        waiting, self.outbox = self.outbox, []
        for payload in waiting:
            self.send(payload)
        u = self.updater
        # The cloud answers the hello with the offer again; the updater asks for its cursor.
        self.resuming = u is not None and u.state == up.DOWNLOADING and u.boot.cursor > 0

    def _hello(self):
        self.hellos += 1
        self.hello_ms = self.dev.fleet.now_ms()
        self.dev.publish(Publish(self.up_topic, encode("hello", hw=self.fw.hw_class, ver=self.version,
                                                       site=self.site), None), count=False)

    def on_message(self, payload):
        try:
            op, f = parse(payload, DOWN, DOWN_BYTES_MAX)
        except OtaError:
            self.refused += 1
            return
        now = self.dev.fleet.now_ms()
        if op == "offer":
            self.run(self.handle(up.Offer(f["bundle"], now, f["ref"])))
        elif op == "chunk":
            u = self.updater
            if u is not None and u.state == up.DOWNLOADING and u.boot.ref == f["ref"]:
                self.run(self.handle(up.Chunk(f["i"], f["data"])))
        elif op == "welcome":
            self.welcomed = True
        elif op == "error":
            self.errors[f["why"]] = self.errors.get(f["why"], 0) + 1
        elif op == "cancel":
            if self.updater is not None:
                self.run(self.handle(up.Cancel(f["ref"])))

    def tick(self):
        """Called with every telemetry sample: the watchdog, and the trial's health."""
        now = self.dev.fleet.now_ms()
        if self.online and self.dev.link is not None and not self.welcomed and \
                now - self.hello_ms >= HELLO_RETRY_MS and self.hellos < HELLO_TRIES_MAX:
            self._hello()
        if self.hung_until_ms is not None:
            if now >= self.hung_until_ms:
                self.hung_until_ms = None
                self.power_on()                     # the watchdog resets it
            return
        u = self.updater
        if u is None or u.state != up.TRIAL:
            return
        if self.fate == ff.OK:
            self.run(self.handle(up.Healthy(len(self.dev.acked) - self.acked_at_boot, now)))
        else:                                       # fails its health check: nothing acknowledged counts
            self.run(self.handle(up.Tick(now)))

    # -- what the drill reads -----------------------------------------------------------

    def state(self):
        if self.hung_until_ms is not None:
            return "silent"
        if self.rebooting is not None:
            return up.REBOOTING
        return "off" if self.updater is None else self.updater.state

    def running_version(self):
        """The confirmed slot's image version (None: not a known image)."""
        state = up.decode_boot_state(self.slots.read_boot_state())
        return self.fw.version_of(self.slots.read_slot(state.active))
