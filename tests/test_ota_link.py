"""The device's shared half of the OTA protocol (agent/ota_link.py) on its
own: a board in memory (publishes recorded, online or not) around a stub
update machine that records its events, so each bound and each counter is
checked without a broker, a flash or a signed release. The last test
imports and drives the module on real MicroPython."""

from agent import updater as up
from agent.ota_link import ERROR_CODES_MAX, HELLO_RETRY_MS, HELLO_TRIES_MAX, OUTBOX_MAX, OtaLink
from agent.ota_wire import DOWN_BYTES_MAX, UP, UP_BYTES_MAX, encode, parse

from mpy import require_micropython, run_micropython


class Boot:
    def __init__(self, ref, cursor):
        self.ref, self.cursor = ref, cursor


class StubUpdater:
    """Records the events it is given; answers each with `answer` (a list of actions)."""

    def __init__(self, state=up.IDLE, ref="", cursor=0):
        self.state, self.boot = state, Boot(ref, cursor)
        self.events, self.answer = [], []

    def handle(self, event):
        self.events.append(event)
        return list(self.answer)


class MemSlots:
    def __init__(self):
        self.writes = []

    def write_slot(self, slot, offset, data):
        self.writes.append((slot, offset, bytes(data)))

    def write_boot_state(self, data):
        self.writes.append(("record", bytes(data)))

    def read_slot(self, slot, offset=0, length=None):
        return b"\x00" * length


class MemLink(OtaLink):
    def __init__(self):
        self.lines = []
        OtaLink.__init__(self, "acme/dev-1", "sim-v1", "site-0", MemSlots(), self.lines.append)
        self.version = "1.0.0"
        self.online = False
        self.sent = []               # (op, fields) of what was published
        self.steps_asked = self.reboots_asked = 0

    def publish(self, payload):
        if not self.online:
            return None
        self.sent.append(parse(payload, UP, UP_BYTES_MAX))
        return len(self.sent)

    def step_later(self):
        self.steps_asked += 1

    def reboot_later(self):
        self.reboots_asked += 1

    def connect(self, ms=0):
        self.online = True
        self.link_up(ms)

    def ops(self):
        return [op for op, _ in self.sent]


def report(seq):
    return up.Report("downloading", "", seq, "r")


# ---------------------------------------------------------------- hello

def test_the_hello_is_repeated_until_welcomed_at_most_hello_tries_max_times():
    link = MemLink()
    link.connect(0)
    assert link.sent == [("hello", {"hw": "sim-v1", "ver": "1.0.0", "site": "site-0"})]
    link.hello_due(HELLO_RETRY_MS - 1)
    assert link.ops() == ["hello"]
    ms = 0
    for _ in range(3 * HELLO_TRIES_MAX):
        ms += HELLO_RETRY_MS
        link.hello_due(ms)
    assert link.ops() == ["hello"] * HELLO_TRIES_MAX and link.hellos == HELLO_TRIES_MAX
    link.connect(ms)                                   # a new connection: the count starts again
    link.received(encode("welcome", now=1), 0)
    link.hello_due(ms + 10 * HELLO_RETRY_MS)
    assert link.welcomed and link.ops() == ["hello"] * (HELLO_TRIES_MAX + 1)


def test_no_hello_is_counted_while_offline():
    link = MemLink()
    link.hello_due(HELLO_RETRY_MS)
    assert (link.sent, link.hellos) == ([], 0)


# ---------------------------------------------------------------- offline

def test_reports_wait_offline_in_a_bounded_outbox_oldest_dropped_then_go_in_order():
    link = MemLink()
    link.run([report(seq) for seq in range(OUTBOX_MAX + 3)])
    assert len(link.outbox) == OUTBOX_MAX and link.last_report is None
    link.connect()
    assert link.ops() == ["hello"] + ["report"] * OUTBOX_MAX
    assert [f["seq"] for _, f in link.sent[1:]] == list(range(3, OUTBOX_MAX + 3))
    assert link.outbox == [] and link.last_report == len(link.sent)


def test_chunk_requests_are_not_kept_offline():
    link = MemLink()
    link.updater = StubUpdater(up.DOWNLOADING, "r", 2)
    link.run([up.RequestChunk(2)])
    assert link.outbox == []
    link.connect()
    link.run([up.RequestChunk(2)])
    assert link.sent[-1] == ("chunk", {"ref": "r", "i": 2})


# ---------------------------------------------------------------- down messages

def test_refused_messages_are_counted_and_error_answers_bounded():
    link = MemLink()
    link.updater = StubUpdater()
    for bad in (b"", b"\xff", encode("hello", hw="x", ver="1", site="s"), b"\x00" * (DOWN_BYTES_MAX + 1),
                encode("chunk", ref="r", i=-1, data=b"")):
        link.received(bad, 0)
    assert link.refused == 5 and link.updater.events == []
    assert link.lines[0] == "update message refused: not_cbor"
    for n in range(ERROR_CODES_MAX + 5):
        link.received(encode("error", why="code-%d" % n, ref=""), 0)
    link.received(encode("error", why="code-0", ref=""), 0)
    assert len(link.errors) == ERROR_CODES_MAX + 1 and link.errors["other"] == 5 and link.errors["code-0"] == 2


def test_a_chunk_for_another_ref_or_outside_a_download_is_ignored():
    link = MemLink()
    link.updater = StubUpdater(up.DOWNLOADING, "rel-2", 1)
    link.received(encode("chunk", ref="rel-1", i=1, data=b"x"), 0)
    assert link.updater.events == []
    link.received(encode("chunk", ref="rel-2", i=1, data=b"x"), 0)
    assert link.updater.events == [up.Chunk(1, b"x")]
    link.updater.state = up.CHECKING
    link.received(encode("chunk", ref="rel-2", i=2, data=b"x"), 0)
    assert len(link.updater.events) == 1


def test_offers_and_cancels_become_events_except_while_a_reboot_is_pending():
    link = MemLink()
    link.updater = StubUpdater()
    link.received(encode("offer", ref="r", bundle=b"b"), 42)
    link.received(encode("cancel", ref="r", why="paused"), 43)
    assert link.updater.events == [up.Offer(b"b", 42, "r"), up.Cancel("r")]
    link.run([up.Reboot(), report(1)])                  # a Reboot ends the list
    assert (link.reboot_pending, link.reboots_asked, link.outbox) == (True, 1, [])
    link.received(encode("offer", ref="r2", bundle=b"b"), 44)
    link.received(encode("welcome", now=1), 45)
    assert len(link.updater.events) == 2 and link.welcomed


# ---------------------------------------------------------------- resuming

def test_a_reconnect_mid_download_asks_again_at_once():
    """Resend after the hello: the request of the old connection may be lost,
    and a release the cloud gave up on is offered no more."""
    for state in (up.DOWNLOADING, up.PAGING):
        link = MemLink()
        link.updater = StubUpdater(state, "r", 5)
        link.connect()
        assert link.updater.events == [up.Resend()]
    link = MemLink()
    link.updater = StubUpdater(up.IDLE)
    link.connect()
    assert link.updater.events == []


def test_a_download_resumed_after_a_reconnect_is_counted_once():
    link = MemLink()
    link.updater = StubUpdater(up.DOWNLOADING, "r", 5)
    link.connect()
    link.run([up.RequestChunk(5), up.RequestChunk(6)])
    assert (link.resumed, link.restarted) == (1, 0)
    link.connect()
    link.run([up.RequestChunk(0)])                      # back to chunk 0: the bug the drill watches for
    assert (link.resumed, link.restarted) == (1, 1)
    link.updater.boot.cursor = 0                        # nothing downloaded yet: not a resume
    link.connect()
    link.run([up.RequestChunk(0)])
    assert (link.resumed, link.restarted) == (1, 1)


def test_actions_are_executed_in_order_and_a_slot_read_is_answered_at_once():
    link = MemLink()
    link.updater = StubUpdater(up.CHECKING)
    link.run([up.WriteSlot(1, 0, b"ab"), up.WriteBootState(b"rec"), up.StepLater(), up.ReadSlot(1, 0, 4)])
    assert link.slots.writes == [(1, 0, b"ab"), ("record", b"rec")] and link.steps_asked == 1
    assert link.updater.events == [up.SlotRead(0, b"\x00" * 4)]


def test_a_board_that_spreads_reads_answers_them_in_read_now_a_few_per_call():
    link = MemLink()
    link.reads_per_pass = 2
    link.updater = StubUpdater(up.CHECKING)
    link.updater.answer = [up.ReadSlot(1, 4096, 4)]        # each answer asks for the next read
    link.run([up.ReadSlot(1, 0, 4)])
    assert link.updater.events == [] and link.read_pending == up.ReadSlot(1, 0, 4)
    link.read_now()
    assert link.updater.events == [up.SlotRead(0, b"\x00" * 4), up.SlotRead(4096, b"\x00" * 4)]
    assert link.read_pending == up.ReadSlot(1, 4096, 4)      # the third waits for the next pass
    link.reset()
    assert link.read_pending is None


def test_an_updater_error_turns_updates_off():
    failures = []

    class Failing(MemLink):
        def failed(self, error):
            failures.append(error.code)

    link = Failing()
    record = up.BootState(active=0, sv=1, ksv=1).encode()
    link.booted(up.Updater(up.Config("sim-v1", b"\x04" + b"\x00" * 64)), 0, record)
    assert link.updater.state == up.IDLE and failures == []
    link.booted(link.updater, 0, record)                # Booted twice: a driver bug
    assert link.updater is None and failures == ["bad_transition"]
    link.received(encode("offer", ref="r", bundle=b"b"), 0)     # dropped, no error
    assert failures == ["bad_transition"]


# ---------------------------------------------------------------- MicroPython

MPY_SCRIPT = r"""
from agent import ota_link as ol
from agent import updater as up
from agent.ota_wire import encode

class Link(ol.OtaLink):
    def __init__(self):
        ol.OtaLink.__init__(self, "acme/dev-1", "sim-v1", "site-0", None)
        self.version = "1.0.0"
        self.online = False
        self.sent = []
    def publish(self, payload):
        if self.online:
            self.sent.append(bytes(payload))
            return len(self.sent)

link = Link()
link.run([up.Report("downloading", "", seq, "r") for seq in range(ol.OUTBOX_MAX + 2)])
link.online = True
link.link_up(0)
for ms in range(0, 100 * ol.HELLO_RETRY_MS, ol.HELLO_RETRY_MS):
    link.hello_due(ms)
link.received(b"\xff", 0)
link.received(encode("error", why="not_offered", ref="r"), 0)
link.received(encode("welcome", now=1), 0)
print(len(link.sent), link.hellos, link.refused, link.errors["not_offered"], link.welcomed, len(link.outbox))
print(link.sent[0].hex(), link.sent[1].hex())
"""


def test_the_link_runs_on_micropython():
    require_micropython()
    # one run, compiling agent.updater and its imports (frozen into flash on a
    # board) beside the link: 192 KiB pass, 128 do not
    out = run_micropython(MPY_SCRIPT, heap_kb=256).strip().splitlines()
    assert out[0] == "%d %d 1 1 True 0" % (OUTBOX_MAX + HELLO_TRIES_MAX, HELLO_TRIES_MAX)
    hello, first = out[1].split()
    assert bytes.fromhex(hello) == encode("hello", hw="sim-v1", ver="1.0.0", site="site-0")
    assert bytes.fromhex(first) == encode("report", st="downloading", why="", seq=2, ref="r")
