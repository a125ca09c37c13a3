# The device's half of the OTA protocol (docs/ota.md) around the update
# machine (agent/updater.py), shared by every board's driver: the hello
# after each connect, repeated until welcomed; reports kept while offline;
# chunk and page requests and resume counting; down messages parsed into updater
# events; the updater's actions executed. Portable (MicroPython subset) and
# without I/O of its own: a board subclasses OtaLink and supplies the part
# that differs, the methods under "the board's part".
#
# The board calls, with its clocks' readings (now_ms: wall clock, for an
# offer's expiry; ticks_ms: monotonic):
#   booted(updater, slot, blob)  after the bootloader chose `slot`
#   link_up(ticks_ms)            after each accepted connection (subscribed)
#   received(payload, now_ms)    for each message on down_topic
#   hello_due(ticks_ms)          often: the hello again if not welcomed
#   step_now()                   when step_later() asked for it
#   feed(event)                  Healthy or Tick during a trial
#   read_now()                   with reads_per_pass set: the next slot reads
#   reset()                      when the board resets (a reboot, a watchdog)

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

try:
    from time import ticks_diff       # MicroPython: ticks wrap around
except ImportError:
    def ticks_diff(a, b):
        return a - b

from agent import updater as up
from agent.errors import LocalError
from agent.ota_wire import DOWN, DOWN_BYTES_MAX, REASON_CHARS_MAX, WireError, encode, parse

HELLO_RETRY_MS = const(3000)     # a hello not welcomed by then is said again ...
HELLO_TRIES_MAX = const(10)      # ... at most this often per connection
OUTBOX_MAX = const(64)           # reports held while offline; past it the oldest go (a boot reports again)
ERROR_CODES_MAX = const(32)      # distinct error codes counted; past it they count as "other"


def _no_log(text):
    pass


class OtaLink:
    # None: a ReadSlot (the resume scan, the read-back) is answered at once,
    # so the whole read-back runs inside one call. A board whose loop must
    # stay responsive (an ESP32 reading back a large image) sets a number:
    # reads wait for read_now(), which answers at most that many.
    reads_per_pass = None

    def __init__(self, identity, hw_class, site, slots, log=None):
        """identity: "tenant/device"; hw_class and site: said in the hello;
        slots: the board's slots (write_slot, write_boot_state, read_slot);
        log(text): for refused messages and the cloud's error answers."""
        self.up_topic = "t/%s/ota" % identity
        self.down_topic = "t/%s/update" % identity
        self.hw_class = hw_class
        self.site = site
        self.slots = slots
        self.log = log or _no_log
        self.updater = None           # None before booted(), after reset() and after a core error
        self.version = None           # the running image's, said in the hello
        self.welcomed = False         # the cloud answered this connection's hello
        self.hellos = 0
        self.hello_ms = 0
        self.outbox = []              # reports that waited while offline, oldest first
        self.last_report = None       # publish()'s handle of the last report sent (None: kept)
        self.last_report_payload = None
        self.reboot_pending = False   # the updater asked for a reboot
        self.read_pending = None      # the ReadSlot waiting for read_now()
        self.resuming = False
        self.resumed = 0              # downloads that went on from their cursor after a (re)connect
        self.restarted = 0            # ... that went back to chunk 0 instead
        self.refused = 0              # update-topic messages refused by the parser
        self.errors = {}              # the cloud's error answers, by code

    # -- the board's part ----------------------------------------------------------

    def publish(self, payload):
        """Send `payload` on up_topic now (QoS 1) -> a handle; offline -> None."""
        raise NotImplementedError

    def step_later(self):
        """Call step_now() once the board has served its network."""
        raise NotImplementedError

    def reboot_later(self):
        """Reset the board soon, once the last report is out (bounded)."""
        raise NotImplementedError

    def request_chunk(self, ref, index):
        """Ask for chunk `index` of release `ref`: over MQTT, unless the board
        fetches it another way (board/linux_ota.py: HTTPS ranges) and feeds
        Chunk itself. Not kept while offline: after a reconnect the offer
        comes again and the updater asks for its cursor."""
        self.send(encode("chunk", ref=ref, i=index), keep=False)

    def request_page(self, ref, index):
        """Ask for page `index` of release `ref`'s chunk hashes (a paged
        manifest): over MQTT, unless the board fetches it another way
        (board/linux_ota.py: HTTPS ranges) and feeds Page itself; like a
        chunk request, never kept while offline."""
        self.send(encode("page", ref=ref, i=index), keep=False)

    def wrote(self, slot, offset):
        """A slot write went through (a hook for the simulator's drills)."""

    def reported(self, status, reason, ref):
        """The updater reported a step (downloading, installed, confirmed,
        rolled_back, ...): a board driver may log it."""

    def failed(self, error):
        """The updater raised (a driver bug or a damaged record); updates are off."""

    # -- what the board calls ------------------------------------------------------

    def booted(self, updater, slot, blob):
        self.updater = updater
        self.reboot_pending = False
        self.read_pending = None
        self.run(self.handle(up.Booted(slot, blob)))

    def reset(self):
        self.updater = None
        self.reboot_pending = False
        self.read_pending = None

    def link_up(self, ticks_ms):
        """A connection was accepted: hello first, then the reports that waited."""
        self.welcomed = False
        self.hellos = 0
        self._hello(ticks_ms)
        waiting, self.outbox = self.outbox, []
        for payload in waiting:
            self.last_report = self.send(payload)
        u = self.updater
        # The cloud answers the hello with the offer again, and the updater
        # asks for its cursor then; it asks at once too (Resend): if the
        # release was withdrawn while the device was away no offer comes, and
        # the cloud's answer to this request is the cancel.
        self.resuming = u is not None and u.state in (up.DOWNLOADING, up.PAGING) and u.boot.cursor > 0
        if u is not None and u.state in (up.DOWNLOADING, up.PAGING) and not self.reboot_pending:
            self.run(self.handle(up.Resend()))

    def hello_due(self, ticks_ms):
        if not self.welcomed and self.hellos < HELLO_TRIES_MAX and \
                ticks_diff(ticks_ms, self.hello_ms) >= HELLO_RETRY_MS:
            self._hello(ticks_ms)

    def received(self, payload, now_ms):
        try:
            op, f = parse(payload, DOWN, DOWN_BYTES_MAX)
        except WireError as e:
            self.refused += 1
            self.log("update message refused: %s" % e.code)
            return
        if op == "welcome":
            self.welcomed = True
        elif op == "error":
            self._count_error(f["why"])
            self.log("the OTA service refused a message: %s %s" % (f["why"], f["ref"]))
        elif self.reboot_pending:
            return      # about to reboot: the next boot says hello and is offered again
        elif op == "offer":
            self.run(self.handle(up.Offer(f["bundle"], now_ms, f["ref"])))
        elif op == "chunk":
            u = self.updater
            if u is not None and u.state == up.DOWNLOADING and u.boot.ref == f["ref"]:
                self.run(self.handle(up.Chunk(f["i"], f["data"])))
        elif op == "page":
            u = self.updater
            if u is not None and u.state == up.PAGING and u.boot.ref == f["ref"]:
                self.run(self.handle(up.Page(f["i"], f["data"])))
        else:
            self.run(self.handle(up.Cancel(f["ref"])))

    def step_now(self):
        self.run(self.handle(up.Step()))

    def read_now(self):
        """Answer at most reads_per_pass slot reads (each answer may ask for the next)."""
        for _ in range(self.reads_per_pass or 0):
            a = self.read_pending
            if a is None:
                return
            self.read_pending = None
            self.run(self.handle(up.SlotRead(a.offset, self.slots.read_slot(a.slot, a.offset, a.length))))

    def feed(self, event):
        self.run(self.handle(event))

    # -- the driver ----------------------------------------------------------------

    def handle(self, event):
        if self.updater is None:
            return []
        try:
            return self.updater.handle(event)
        except LocalError as e:
            self.updater = None
            self.failed(e)
            return []

    def run(self, actions):
        """Execute the updater's actions in order; a Reboot ends the list."""
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            if isinstance(a, up.WriteSlot):
                self.slots.write_slot(a.slot, a.offset, a.data)
                self.wrote(a.slot, a.offset)
            elif isinstance(a, up.WriteBootState):
                self.slots.write_boot_state(a.data)
            elif isinstance(a, up.Report):
                self.last_report_payload = encode("report", st=a.status, why=a.reason[:REASON_CHARS_MAX],
                                                  seq=a.seq, ref=a.ref)
                self.last_report = self.send(self.last_report_payload)
                self.reported(a.status, a.reason, a.ref)
            elif isinstance(a, up.RequestChunk):
                self._request(a.index)
            elif isinstance(a, up.RequestPage):
                self._request(a.index, page=True)
            elif isinstance(a, up.StepLater):
                self.step_later()
            elif isinstance(a, up.ReadSlot):
                if self.reads_per_pass is not None:  # answered by read_now(), in the board's loop
                    self.read_pending = a
                    continue
                data = self.slots.read_slot(a.slot, a.offset, a.length)   # local flash: at once
                todo = self.handle(up.SlotRead(a.offset, data)) + todo
            elif isinstance(a, up.Reboot):
                self.reboot_pending = True
                self.reboot_later()
                return

    def send(self, payload, keep=True):
        """Publish -> its handle; offline, keep it for the next connection
        (or drop it: keep=False) -> None. The outbox drops its oldest when full."""
        handle = self.publish(payload)
        if handle is None and keep:
            if len(self.outbox) >= OUTBOX_MAX:
                self.outbox.pop(0)
            self.outbox.append(payload)
        return handle

    def _request(self, index, page=False):
        if self.resuming:
            self.resuming = False
            # A page request goes on from the cursor too, once the page is in.
            if (self.updater.boot.cursor if page else index) > 0:
                self.resumed += 1
            else:
                self.restarted += 1
        if page:
            self.request_page(self.updater.boot.ref, index)
        else:
            self.request_chunk(self.updater.boot.ref, index)

    def _hello(self, ticks_ms):
        if self.publish(encode("hello", hw=self.hw_class, ver=self.version, site=self.site)) is not None:
            self.hellos += 1
            self.hello_ms = ticks_ms

    def _count_error(self, code):
        if code not in self.errors and len(self.errors) >= ERROR_CODES_MAX:
            code = "other"
        self.errors[code] = self.errors.get(code, 0) + 1
