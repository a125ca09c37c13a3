"""The device side of firmware updates in the fleet simulator: a component
a VirtualDevice (simulator/device.py) owns when the fleet runs updates.

It runs the real update machine (agent/updater.py) over board.slots.SimSlots
on the device's own SimFlash, speaks the OTA messages (docs/ota.md, with the
shared device half agent/ota_link.py that real boards use too) over
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
from agent.ota_link import OtaLink
from agent.ota_wire import DOWN_BYTES_MAX
from board.slots import BOOT_STATE, SLOT_NAMES, SimSlots
from simulator import firmware_faults as ff

BOOTS_MAX = 3                # a crash on boot costs one boot; the bootloader rolls back on the next
PACKET_BYTES_MAX = DOWN_BYTES_MAX + 512    # the MQTT parser's bound with updates on (topic, header)
REBOOT_DELAY_S = 0.3         # from the updater's Reboot to the reset


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


class OtaDevice(OtaLink):
    """A VirtualDevice's OTA driver: the shared protocol half (agent/ota_link.py)
    over SimSlots and the device's connection, plus what only a simulated
    board has: the bootloader's boots, fault profiles and the reboot timer."""

    def __init__(self, dev, firmware, site):
        OtaLink.__init__(self, dev.identity, firmware.hw_class, site, SimSlots(dev.flash))
        self.dev = dev
        self.fw = firmware
        self.packet_bytes_max = PACKET_BYTES_MAX
        if dev.flash.read(BOOT_STATE) is None:       # the factory image
            payload, sv, _ = firmware.releases[firmware.factory]
            dev.flash.write_atomic(SLOT_NAMES[0], payload)
            dev.flash.write_atomic(BOOT_STATE, up.BootState(active=0, sv=sv, ksv=1).encode())
        self.rebooting = None         # the timer of a pending reboot
        self.fate = ff.OK
        self.online = False           # connected since the last (simulated) reboot
        self.connected_ms = None
        self.acked_at_boot = 0
        self.hung_until_ms = None
        self.bricked = False
        self.boots = 0
        self.crashes = 0
        self.power_on()

    # -- boot -------------------------------------------------------------------

    def power_on(self):
        self.reset()
        for _ in range(BOOTS_MAX):
            slot, blob = self.slots.boot()
            self.boots += 1
            version = self.fw.version_of(self.slots.read_slot(slot))
            if version is None:
                self.bricked = True
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
                self.dev.cut()
                return
            self.hung_until_ms = None
            self.acked_at_boot = len(self.dev.acked)
            self.booted(up.Updater(self.fw.config), slot, blob)
            return
        self.bricked = True

    def reboot(self):
        """The update machine asked for a reboot: the connection goes, the bootloader runs."""
        self.rebooting = None
        self.online = False
        self.reset()
        self.dev.cut()
        self.power_on()

    def hung(self):
        return self.hung_until_ms is not None

    # -- the board's part of agent/ota_link.py ------------------------------------------

    def publish(self, payload):
        if not self.online or self.dev.link is None:
            return None
        self.dev.publish(Publish(self.up_topic, payload, None), count=False)
        return True

    def step_later(self):                            # the next piece after the loop's other work
        self.dev.fleet.loop.call_soon(self._step, self.updater)

    def _step(self, updater):
        if updater is self.updater:                  # not rebooted meanwhile
            self.step_now()

    def reboot_later(self):
        # The driver lets the last report (installed) reach the broker
        # before it resets, as a real one waits for its PUBACK, bounded.
        self.rebooting = self.dev.fleet.loop.call_later(REBOOT_DELAY_S, self.reboot)

    def wrote(self, slot, offset):
        if self.fw.on_chunk_written is not None:
            self.fw.on_chunk_written(self, offset // mf.CHUNK_BYTES)

    def failed(self, error):                         # a driver bug: a failed check at the end
        self.dev.fleet.core_errors.append("%s updater: %s" % (self.dev.identity, error))

    # -- what the VirtualDevice calls ------------------------------------------------

    def connected(self):
        """The broker accepted a connection: hello first, then what waited."""
        self.online = True
        self.connected_ms = self.dev.fleet.now_ms()
        self.link_up(self.connected_ms)

    def on_message(self, payload):
        self.received(payload, self.dev.fleet.now_ms())

    def tick(self):
        """Called with every telemetry sample: the hello, the watchdog, and the trial's health."""
        now = self.dev.fleet.now_ms()
        self.hello_due(now)
        if self.hung_until_ms is not None:
            if now >= self.hung_until_ms:
                self.hung_until_ms = None
                self.power_on()                     # the watchdog resets it
            return
        u = self.updater
        if u is None or u.state != up.TRIAL:
            return
        if self.fate == ff.OK:
            self.feed(up.Healthy(len(self.dev.acked) - self.acked_at_boot, now))
        else:                                       # fails its health check: nothing acknowledged counts
            self.feed(up.Tick(now))

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
