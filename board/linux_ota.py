"""Firmware updates on the Linux board: the update machine (agent/updater.py)
over board/linux_slots.LinuxSlots, speaking the OTA messages (agent/ota_wire.py,
docs/ota.md) over LinuxAgent's paho connection (board/linux.py). The protocol
half (hello, outbox, down messages, the updater's actions) is the shared
agent/ota_link.py; this file is the board's part: paho, the clock, the
reboot once the last report's PUBACK came, and logging.

LinuxAgent owns one LinuxOta when it is given one, and calls it:

- boot() once at start: the bootloader's choice (slots.boot()) goes to the
  updater as Booted;
- connected(client) after each accepted CONNECT: subscribe to
  t/<id>/update, hello, then the reports that waited while offline;
- lost() when the connection goes;
- on_message(payload) for each message on the update topic;
- step(acked) once per pass of its loop, after the network: the hello
  repeated until welcomed, one Step of an offer's verification, one chunk
  or page fetched over HTTPS when the board is given `ranges` (docs/ota.md),
  the trial's health, and the reboot once the last report is acknowledged.

The reboot contract: `reboot()` is called once, when the updater asked for
a reboot and its last report was acknowledged (or REBOOT_WAIT_MS passed).
It must restart the board so that the next start of the agent calls
LinuxAgent.boot() (slots.boot() first) on the same directories; the default
runs `systemctl reboot`. Everything the next boot needs is already in the
boot-state record and the boot environment, so this process does nothing
for updates afterwards. A reboot command that fails is logged; the record
stands, and the next start, whenever it comes, acts on it.

Slot and record writes raise on a disk error: the process stops there as
it would at a power cut, and the next start resumes from the record.
"""

import logging
import subprocess

import paho.mqtt.client as paho

from agent import manifest as mf
from agent import updater as up
from agent.ota_link import ERROR_CODES_MAX, OtaLink
from board.https_ranges import RangeError
from board.linux import SystemClock

REBOOT_WAIT_MS = 5000        # for the last report's PUBACK before the reboot, at most
REBOOT_COMMAND = ("systemctl", "reboot")
REBOOT_TIMEOUT_S = 60


class _Fetch:
    """How one kind of request is fetched over HTTPS: the state the updater
    waits for it in, the resource of the release (board/https_ranges.py),
    bytes per index (the last one may be shorter), the event it is fed as,
    and the MQTT request to fall back to."""

    def __init__(self, state, resource, piece_bytes, event, over_mqtt):
        self.state, self.resource, self.piece_bytes = state, resource, piece_bytes
        self.event, self.over_mqtt = event, over_mqtt


FETCHES = {
    "chunk": _Fetch(up.DOWNLOADING, "payload", mf.CHUNK_BYTES, up.Chunk, OtaLink.request_chunk),
    "page": _Fetch(up.PAGING, "pages", mf.PAGE_BYTES, up.Page, OtaLink.request_page),
}


def command_reboot(argv=REBOOT_COMMAND):
    """A reboot callable that runs `argv` (systemctl reboot by default)."""
    def reboot():
        subprocess.run(list(argv), check=True, timeout=REBOOT_TIMEOUT_S)
    return reboot


class LinuxOta(OtaLink):
    def __init__(self, identity, config, slots, site, version_of, reboot=None, clock=None,
                 logger=None, ranges=None):
        """identity: "tenant/device"; config: agent.updater.Config (its hw_class
        is said in the hello); slots: a LinuxSlots; version_of(slot): the
        version of the image in `slot` (the running one), for the hello;
        ranges: a board.https_ranges.HttpsRanges to fetch chunks and pages
        over HTTPS instead of asking for them over MQTT (one it cannot fetch
        is asked for over MQTT)."""
        self.logger = logger or logging.getLogger("tether.ota")
        OtaLink.__init__(self, identity, config.hw_class, site, slots, self.logger.warning)
        self.config = config
        self.version_of = version_of
        self.reboot = reboot or command_reboot()
        self.clock = clock or SystemClock()
        self.client = None            # the paho client while connected
        self.step_pending = False     # the updater announced StepLater
        self.reboot_by_ms = None      # set by Reboot: the reboot happens by then at the latest
        self.ranges = ranges
        self.fetch_pending = None     # (a FETCHES kind, ref, index) to fetch over HTTPS in the next step()
        self.fetched = 0              # chunks that came over HTTPS
        self.pages_fetched = 0        # pages that came over HTTPS
        self.fetch_errors = {}        # HTTPS failures by code (each then asked over MQTT)

    # -- what LinuxAgent calls ---------------------------------------------------

    def boot(self):
        slot, blob = self.slots.boot()
        self.version = self.version_of(slot)
        self.booted(up.Updater(self.config, self.logger.debug), slot, blob)

    def connected(self, client):
        """The broker accepted a connection: subscribe, hello, then what waited."""
        self.client = client
        client.subscribe(self.down_topic, qos=1)
        self.link_up(self.clock.ticks_ms())

    def lost(self):
        self.client = None

    def on_message(self, payload):
        self.received(payload, self.clock.now_ms())

    def busy(self):
        """Work waits for the next pass (a verification step, a chunk or page to fetch):
        the driver's loop should not sleep."""
        return self.step_pending or self.fetch_pending is not None

    def step(self, acked):
        """One pass of the driver's loop, after the network. acked: telemetry
        records acknowledged since this process started (the trial's health)."""
        self.hello_due(self.clock.ticks_ms())
        if self.reboot_by_ms is not None:
            if self._report_delivered() or self.clock.ticks_ms() >= self.reboot_by_ms:
                self._reboot()
            return
        if self.step_pending:
            self.step_pending = False
            self.step_now()
        if self.fetch_pending is not None:
            self._fetch()
        if self.updater is not None and self.updater.state == up.TRIAL:
            # Below trial_acks_min this is the trial's clock: past trial_ms_max it rolls back.
            self.feed(up.Healthy(acked, self.clock.now_ms()))

    # -- the board's part of agent/ota_link.py ----------------------------------------

    def publish(self, payload):
        """QoS 1 -> paho's message info; offline -> None."""
        if self.client is None:
            return None
        return self.client.publish(self.up_topic, payload, qos=1)

    def request_chunk(self, ref, index):
        self._ask("chunk", ref, index)

    def request_page(self, ref, index):
        self._ask("page", ref, index)

    def step_later(self):                            # fed in step(), after the network
        self.step_pending = True

    def reboot_later(self):
        self.reboot_by_ms = self.clock.ticks_ms() + REBOOT_WAIT_MS

    def reported(self, status, reason, ref):
        self.logger.info("update %s: %s%s", ref or "-", status, " (%s)" % reason if reason else "")

    def failed(self, error):
        self.logger.error("updater failed (%s): %s; updates are off until the next start",
                          error.code, error.message)
        self.step_pending = False

    def _ask(self, kind, ref, index):
        if self.ranges is None:
            FETCHES[kind].over_mqtt(self, ref, index)
        else:                                        # fetched in step(), one per pass
            self.fetch_pending = (kind, ref, index)

    def _fetch(self):
        kind, ref, index = self.fetch_pending
        self.fetch_pending = None
        how = FETCHES[kind]
        u = self.updater
        if u is None or u.state != how.state or u.boot.ref != ref:
            return                                   # cancelled or rebooted meanwhile
        try:
            data = self.ranges.fetch(ref, index * how.piece_bytes, how.piece_bytes, how.resource)
        except RangeError as e:
            code = e.code if e.code in self.fetch_errors or len(self.fetch_errors) < ERROR_CODES_MAX \
                else "other"
            self.fetch_errors[code] = self.fetch_errors.get(code, 0) + 1
            self.logger.warning("%s %d of %s over HTTPS failed (%s): asking over MQTT", kind, index, ref, e)
            how.over_mqtt(self, ref, index)
            return
        if kind == "page":
            self.pages_fetched += 1
        else:
            self.fetched += 1
        self.feed(how.event(index, data))

    def _report_delivered(self):
        info = self.last_report          # rc NO_CONN: that connection was gone; never acknowledged
        return not self.outbox and (info is None or (info.rc == paho.MQTT_ERR_SUCCESS and info.is_published()))

    def _reboot(self):
        self.reboot_by_ms = None
        self.reset()                     # the next start boots again from the record
        self.logger.info("rebooting for the update")
        try:
            self.reboot()
        except (OSError, subprocess.SubprocessError) as e:
            self.logger.error("reboot failed: %s; the boot record stands for the next start", e)
