"""Firmware updates on the Linux board: the update machine (agent/updater.py)
over board/linux_slots.LinuxSlots, speaking the OTA messages (agent/ota_wire.py,
docs/ota.md) over LinuxAgent's paho connection (board/linux.py).

LinuxAgent owns one LinuxOta when it is given one, and calls it:

- boot() once at start: the bootloader's choice (slots.boot()) goes to the
  updater as Booted;
- connected(client) after each accepted CONNECT: subscribe to
  t/<id>/update, hello, then the reports that waited while offline;
- lost() when the connection goes;
- on_message(payload) for each message on the update topic;
- step(acked) once per pass of its loop, after the network: the hello
  repeated until welcomed, one Step of an offer's verification, the
  trial's health, and the reboot once the last report is acknowledged.

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

from agent import updater as up
from agent.errors import LocalError
from agent.ota_wire import DOWN, DOWN_BYTES_MAX, REASON_CHARS_MAX, WireError, encode, parse
from board.linux import SystemClock

HELLO_RETRY_MS = 3000        # a hello not welcomed by then is said again ...
HELLO_TRIES_MAX = 10         # ... at most this often per connection
OUTBOX_MAX = 64              # reports held while offline; past it the oldest go (a boot reports again)
REBOOT_WAIT_MS = 5000        # for the last report's PUBACK before the reboot, at most
ERROR_CODES_MAX = 32         # distinct error codes counted; past it they count as "other"
REBOOT_COMMAND = ("systemctl", "reboot")
REBOOT_TIMEOUT_S = 60


def command_reboot(argv=REBOOT_COMMAND):
    """A reboot callable that runs `argv` (systemctl reboot by default)."""
    def reboot():
        subprocess.run(list(argv), check=True, timeout=REBOOT_TIMEOUT_S)
    return reboot


class LinuxOta:
    def __init__(self, identity, config, slots, site, version_of, reboot=None, clock=None,
                 logger=None):
        """identity: "tenant/device"; config: agent.updater.Config (its hw_class
        is said in the hello); slots: a LinuxSlots; version_of(slot): the
        version of the image in `slot` (the running one), for the hello."""
        self.config = config
        self.slots = slots
        self.site = site
        self.version_of = version_of
        self.reboot = reboot or command_reboot()
        self.clock = clock or SystemClock()
        self.log = logger or logging.getLogger("tether.ota")
        self.up_topic = "t/%s/ota" % identity
        self.down_topic = "t/%s/update" % identity
        self.updater = None           # None before boot(), after a reboot and after a core error
        self.version = None
        self.client = None            # the paho client while connected
        self.welcomed = False         # the cloud answered this connection's hello
        self.hellos = 0
        self.hello_ms = 0
        self.outbox = []              # reports that waited while offline, oldest first
        self.last_report = None       # paho's MQTTMessageInfo of the last report sent
        self.step_pending = False     # the updater announced StepLater
        self.reboot_by_ms = None      # set by Reboot: the reboot happens by then at the latest
        self.resuming = False
        self.resumed = 0              # downloads that went on from their cursor after a (re)connect
        self.restarted = 0            # ... that went back to chunk 0 instead
        self.refused = 0              # update-topic messages refused by the parser
        self.errors = {}              # the cloud's error answers, by code

    # -- what LinuxAgent calls ---------------------------------------------------

    def boot(self):
        slot, blob = self.slots.boot()
        self.version = self.version_of(slot)
        self.updater = up.Updater(self.config, self.log.debug)
        self.run(self.handle(up.Booted(slot, blob)))

    def connected(self, client):
        """The broker accepted a connection: subscribe, hello, then what waited."""
        self.client = client
        client.subscribe(self.down_topic, qos=1)
        self.welcomed = False
        self.hellos = 0
        self._hello()
        waiting, self.outbox = self.outbox, []
        for payload in waiting:
            self.last_report = self.send(payload)
        u = self.updater
        # The cloud answers the hello with the offer again; the updater asks for its cursor.
        self.resuming = u is not None and u.state == up.DOWNLOADING and u.boot.cursor > 0

    def lost(self):
        self.client = None

    def on_message(self, payload):
        try:
            op, f = parse(payload, DOWN, DOWN_BYTES_MAX)
        except WireError as e:
            self.refused += 1
            self.log.warning("update message refused: %s", e.code)
            return
        if op == "welcome":
            self.welcomed = True
        elif op == "error":
            self._count_error(f["why"])
            self.log.warning("the OTA service refused a message: %s %s", f["why"], f["ref"])
        elif self.reboot_by_ms is not None:
            return      # about to reboot: the next start says hello and is offered again
        elif op == "offer":
            self.run(self.handle(up.Offer(f["bundle"], self.clock.now_ms(), f["ref"])))
        elif op == "chunk":
            u = self.updater
            if u is not None and u.state == up.DOWNLOADING and u.boot.ref == f["ref"]:
                self.run(self.handle(up.Chunk(f["i"], f["data"])))
        else:
            self.run(self.handle(up.Cancel(f["ref"])))

    def step(self, acked):
        """One pass of the driver's loop, after the network. acked: telemetry
        records acknowledged since this process started (the trial's health)."""
        if self.client is not None and not self.welcomed and self.hellos < HELLO_TRIES_MAX and \
                self.clock.ticks_ms() - self.hello_ms >= HELLO_RETRY_MS:
            self._hello()
        if self.reboot_by_ms is not None:
            if self._report_delivered() or self.clock.ticks_ms() >= self.reboot_by_ms:
                self._reboot()
            return
        if self.step_pending:
            self.step_pending = False
            self.run(self.handle(up.Step()))
        if self.updater is not None and self.updater.state == up.TRIAL:
            # Below trial_acks_min this is the trial's clock: past trial_ms_max it rolls back.
            self.run(self.handle(up.Healthy(acked, self.clock.now_ms())))

    # -- the driver ---------------------------------------------------------------

    def handle(self, event):
        if self.updater is None:
            return []
        try:
            return self.updater.handle(event)
        except LocalError as e:
            # A driver bug or a damaged record: the machine refuses further use.
            self.log.error("updater failed (%s): %s; updates are off until the next start",
                           e.code, e.message)
            self.updater = None
            self.step_pending = False
            return []

    def run(self, actions):
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            if isinstance(a, up.WriteSlot):
                self.slots.write_slot(a.slot, a.offset, a.data)
            elif isinstance(a, up.WriteBootState):
                self.slots.write_boot_state(a.data)
            elif isinstance(a, up.Report):
                self.last_report = self.send(encode("report", st=a.status, why=a.reason[:REASON_CHARS_MAX],
                                                    seq=a.seq, ref=a.ref))
            elif isinstance(a, up.RequestChunk):
                self._request(a.index)
            elif isinstance(a, up.StepLater):        # fed in step(), after the network
                self.step_pending = True
            elif isinstance(a, up.ReadSlot):         # a local file: answered at once
                data = self.slots.read_slot(a.slot, a.offset, a.length)
                todo = self.handle(up.SlotRead(a.offset, data)) + todo
            elif isinstance(a, up.Reboot):
                self.reboot_by_ms = self.clock.ticks_ms() + REBOOT_WAIT_MS

    def send(self, payload, keep=True):
        """Publish on the ota topic (QoS 1) -> paho's message info; offline,
        keep it for the next connection (or drop it: keep=False) -> None."""
        if self.client is not None:
            return self.client.publish(self.up_topic, payload, qos=1)
        if keep:
            if len(self.outbox) >= OUTBOX_MAX:
                self.outbox.pop(0)
            self.outbox.append(payload)
        return None

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

    def _hello(self):
        self.hellos += 1
        self.hello_ms = self.clock.ticks_ms()
        self.client.publish(self.up_topic, encode("hello", hw=self.config.hw_class, ver=self.version,
                                                  site=self.site), qos=1)

    def _report_delivered(self):
        info = self.last_report          # rc NO_CONN: that connection was gone; never acknowledged
        return not self.outbox and (info is None or (info.rc == paho.MQTT_ERR_SUCCESS and info.is_published()))

    def _reboot(self):
        self.reboot_by_ms = None
        self.updater = None           # the next start boots again from the record
        self.log.info("rebooting for the update")
        try:
            self.reboot()
        except (OSError, subprocess.SubprocessError) as e:
            self.log.error("reboot failed: %s; the boot record stands for the next start", e)

    def _count_error(self, code):
        if code not in self.errors and len(self.errors) >= ERROR_CODES_MAX:
            code = "other"
        self.errors[code] = self.errors.get(code, 0) + 1
