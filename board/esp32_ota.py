"""Firmware updates on the ESP32 under MicroPython: the update machine
(agent/updater.py) over board/esp32_slots.Esp32Slots, speaking the OTA
messages (agent/ota_wire.py, docs/ota.md) over the board's MQTT connection.
The protocol half (hello, outbox, down messages, the updater's actions) is
the shared agent/ota_link.py; this file is the board's part: the
transport, the step flag, the reset once the last report's PUBACK came.

The board's network driver (board/esp32_agent.py over board/esp32_net.py,
MQTT over TLS; its MqttLink is the `transport`) calls:

- boot() once at start, after the bootloader chose the slot;
- connected() after each accepted CONNECT, once subscribed (QoS 1) to
  `down_topic`: hello, then the reports that waited while offline;
- on_message(payload) for each message on `down_topic`;
- poll(acked) once per pass of its loop, after the network: the hello
  repeated until welcomed, at most one Step of an offer's verification,
  at most reads_per_pass chunks of the resume scan or the read-back, the
  trial's health, and the reset once the last report is acknowledged
  (or REBOOT_WAIT_MS passed).

transport.publish(topic, payload) sends at QoS 1 and returns a truthy
handle, or None when offline; transport.delivered(handle) is True once that
message's PUBACK came. reset() restarts the chip (machine.reset): the
bootloader picks the slot from otadata and the next start calls boot()
again; everything it needs is in the boot-state record and otadata.
"""

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

import time

from agent import updater as up
from agent.ota_link import OtaLink

REBOOT_WAIT_MS = const(5000)     # for the last report's PUBACK before the reset, at most

try:
    ticks_diff = time.ticks_diff
except AttributeError:           # CPython, for the tests: ticks that do not wrap
    def ticks_diff(a, b):
        return a - b


class Esp32Ota(OtaLink):
    reads_per_pass = 8                # the read-back spread over passes: 32 KiB of flash each
    def __init__(self, identity, config, slots, site, version, transport, reset, ticks_ms, now_ms,
                 log=None):
        """identity: "tenant/device"; config: agent.updater.Config (its
        hw_class is said in the hello); slots: an Esp32Slots; version: the
        running image's; ticks_ms: time.ticks_ms; now_ms: the wall clock in
        ms since the Unix epoch (board.esp32.Clock.now_ms); log(text)."""
        OtaLink.__init__(self, identity, config.hw_class, site, slots, log)
        self.config = config
        self.version = version
        self.transport = transport
        self.reset_chip = reset
        self.ticks_ms = ticks_ms
        self.now_ms = now_ms
        self.step_pending = False     # the updater announced StepLater
        self.reboot_asked_ms = None   # ticks when the updater asked for a reboot

    # -- what the board calls ----------------------------------------------------------

    def boot(self):
        slot, blob = self.slots.boot()
        self.booted(up.Updater(self.config), slot, blob)

    def connected(self):
        # A report sent on a connection that died before its PUBACK is sent
        # again (the cloud keeps one per seq): the reset waits for it.
        lost = self.last_report_payload if self.last_report is not None and \
            not self.transport.delivered(self.last_report) else None
        self.link_up(self.ticks_ms())
        if lost is not None:
            self.last_report = self.send(lost)

    def on_message(self, payload):
        self.received(payload, self.now_ms())

    def busy(self):
        """A verification step or slot reads wait: the loop should not sleep."""
        return self.step_pending or self.read_pending is not None

    def poll(self, acked):
        """One pass of the loop. acked: telemetry records acknowledged since this boot."""
        ticks = self.ticks_ms()
        self.hello_due(ticks)
        if self.reboot_asked_ms is not None:
            if self._report_delivered() or ticks_diff(ticks, self.reboot_asked_ms) >= REBOOT_WAIT_MS:
                self._reset()
            return
        if self.step_pending:
            self.step_pending = False
            self.step_now()
        if self.read_pending is not None:
            self.read_now()
        u = self.updater
        if u is not None and u.state == up.TRIAL:
            # Below trial_acks_min this is the trial's clock: past trial_ms_max it rolls back.
            self.feed(up.Healthy(acked, self.now_ms()))

    # -- the board's part of agent/ota_link.py -------------------------------------------

    def publish(self, payload):
        return self.transport.publish(self.up_topic, payload)

    def step_later(self):
        self.step_pending = True

    def reboot_later(self):
        self.reboot_asked_ms = self.ticks_ms()

    def failed(self, error):
        self.log("updater failed (%s): %s; updates are off until the next start"
                 % (error.code, error.message))
        self.step_pending = False

    def _report_delivered(self):
        handle = self.last_report
        return not self.outbox and (handle is None or self.transport.delivered(handle))

    def _reset(self):
        self.reboot_asked_ms = None
        self.reset()                  # OtaLink's: the updater is done with this boot
        self.log("resetting for the update")
        self.reset_chip()
