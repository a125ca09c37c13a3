# The telemetry core: sequenced records, a persisted bounded queue, QoS 1
# publishing with an in-flight window, reconnect with backoff. Sans-IO: it
# takes events (agent.events) and returns lists of actions (agent.actions).
#
# Every (state, event) pair the machine accepts is in TRANSITIONS below; any
# other pair is a LocalError and the machine refuses further use.

import struct
from binascii import crc32

from agent import journal
from agent.actions import Append, Connect, Log, Publish, WriteAtomic
from agent.backoff import Backoff
from agent.errors import LocalError
from agent.events import ConnectionLost, Connected, PubAcked, Sample, Tick

OFFLINE = "offline"        # waiting for the backoff to expire
CONNECTING = "connecting"  # asked the driver to Connect, no answer yet
ONLINE = "online"          # publishing
ERROR = "error"            # misused; refuses everything

QUEUE_FILE = "queue"
STATE_FILE = "state"
STATE_MAGIC = b"TQS1"
SEQ_MAX = 0xFFFFFFFF
FORMAT_VERSION = 1

TRANSITIONS = {
    (OFFLINE, Tick): "_tick",
    (OFFLINE, Sample): "_sample",
    (CONNECTING, Tick): "_nothing",
    (CONNECTING, Sample): "_sample",
    (CONNECTING, Connected): "_connected",
    (CONNECTING, ConnectionLost): "_lost",
    (ONLINE, Tick): "_nothing",
    (ONLINE, Sample): "_sample",
    (ONLINE, PubAcked): "_acked",
    (ONLINE, ConnectionLost): "_lost",
}


class Config:
    """Limits of one agent. Every queue and retry has a bound."""

    def __init__(self, capacity=256, inflight_max=8, backoff_base_ms=500,
                 backoff_cap_ms=30000, compact_bytes_min=8192):
        if capacity < 2 or inflight_max < 1:
            raise ValueError("capacity must be >= 2 and inflight_max >= 1")
        self.capacity = capacity
        self.inflight_max = inflight_max
        self.backoff_base_ms = backoff_base_ms
        self.backoff_cap_ms = backoff_cap_ms
        self.compact_bytes_min = compact_bytes_min


def encode_state(epoch):
    body = STATE_MAGIC + struct.pack("<I", epoch)
    return body + struct.pack("<I", crc32(body) & 0xFFFFFFFF)


def decode_state(blob):
    """The boot epoch stored in the state file, or -1 if absent or damaged."""
    if blob is None or len(blob) != 12 or blob[:4] != STATE_MAGIC:
        return -1
    if struct.unpack("<I", blob[8:12])[0] != crc32(blob[:8]) & 0xFFFFFFFF:
        return -1
    return struct.unpack("<I", blob[4:8])[0]


class Telemetry:
    def __init__(self, tenant, device, codec, rng, config=None):
        self.device = device
        self.topic = "t/%s/%s/telemetry" % (tenant, device)
        self.codec = codec
        self.config = config or Config()
        self.backoff = Backoff(rng, self.config.backoff_base_ms, self.config.backoff_cap_ms)
        self.state = OFFLINE
        self.epoch = -1
        self.next_seq = 0
        self.queue = []          # [epoch, seq, flags, payload, inflight] in order
        self.inflight = 0
        self.connect_at_ms = 0   # first Tick connects at once
        self.open_drop = None    # the queued drop record we may still extend
        self.journal_bytes = 0
        self.generated = 0       # records made durable this boot
        self.dropped = 0         # records this boot declared dropped
        self.acked = 0
        self.refused = 0         # samples refused: queue full of undroppable records

    # -- boot -------------------------------------------------------------

    def boot(self, state_blob, journal_blob):
        """Recover from storage; returns the writes that must happen before
        anything else (new epoch, compacted queue)."""
        entries, torn = journal.replay(journal_blob or b"")
        epoch = decode_state(state_blob)
        for e in entries:
            if e[0] > epoch:
                epoch = e[0]
        if epoch >= SEQ_MAX:
            raise LocalError("boot epoch exhausted", "epoch_exhausted")
        self.epoch = epoch + 1
        self.queue = [[e[0], e[1], e[2], e[3], False] for e in entries]
        actions = [WriteAtomic(STATE_FILE, encode_state(self.epoch))]
        if torn or entries or journal_blob:
            actions.append(self._compact())
        if torn:
            actions.append(Log("journal_tail_cut", "a torn or corrupt journal tail was cut"))
        return actions

    # -- events -----------------------------------------------------------

    def handle(self, event):
        if self.epoch < 0:
            raise LocalError("boot() must come first", "not_booted")
        name = TRANSITIONS.get((self.state, type(event)))
        if name is None:
            prior = self.state
            self.state = ERROR
            raise LocalError("%s is not allowed in state %s" % (
                type(event).__name__, prior), "bad_transition")
        return getattr(self, name)(event)

    def _nothing(self, event):
        return []

    def _tick(self, event):
        if event.now_ms < self.connect_at_ms:
            return []
        self.state = CONNECTING
        return [Connect()]

    def _connected(self, event):
        self.state = ONLINE
        return self._pump([])

    def _lost(self, event):
        for entry in self.queue:
            entry[4] = False
        self.inflight = 0
        self.state = OFFLINE
        delay = self.backoff.next_delay_ms()
        self.connect_at_ms = event.now_ms + delay
        return [Log("offline", "%s; retry in %d ms" % (event.reason, delay))]

    def _acked(self, event):
        epoch, seq = event.token
        i = self._index(epoch, seq)
        if i < 0 or not self.queue[i][4]:
            return [Log("stray_ack", "PUBACK for %d/%d not in flight" % (epoch, seq))]
        entry = self.queue.pop(i)
        self.inflight -= 1
        self.acked += 1
        self.backoff.reset()
        if self.open_drop is entry:
            self.open_drop = None
        data = journal.remove(epoch, seq)
        self.journal_bytes += len(data)
        actions = [Append(QUEUE_FILE, data)]
        if self.journal_bytes > self.config.compact_bytes_min and self.journal_bytes > 4 * self._live_bytes():
            actions.append(self._compact())
        return self._pump(actions)

    def _sample(self, event):
        actions = []
        if not self._make_room(event.now_ms, actions):
            self.refused += 1
            actions.append(Log("sample_refused", "queue full of records that cannot be dropped"))
            return actions
        record = {"v": FORMAT_VERSION, "k": "t", "d": self.device, "ts": event.now_ms,
                  "r": event.readings}
        self._enqueue(record, 0, actions)
        self.generated += 1
        if self.state == ONLINE:
            self._pump(actions)
        return actions

    # -- the queue --------------------------------------------------------

    def _enqueue(self, record, flags, actions):
        entry = self._new_entry(record, flags)
        data = journal.add(entry[0], entry[1], flags, entry[3])
        self.journal_bytes += len(data)
        actions.append(Append(QUEUE_FILE, data))
        return entry

    def _new_entry(self, record, flags):
        if self.next_seq > SEQ_MAX:
            raise LocalError("sequence numbers exhausted in this epoch", "seq_exhausted")
        record["e"] = self.epoch
        record["s"] = self.next_seq
        self.next_seq += 1
        entry = [self.epoch, record["s"], flags, self.codec.dumps(record), False]
        self.queue.append(entry)
        return entry

    def _make_room(self, now_ms, actions):
        """Drop the oldest data records until one more fits, declaring them in
        a drop record. False if nothing can be dropped."""
        while len(self.queue) >= self.config.capacity:
            i = self._oldest_droppable()
            if i < 0:
                return False
            victim = self.queue.pop(i)
            self.dropped += 1
            drop = self._declare_drop(victim[0], victim[1], now_ms, actions)
            # One frame removes the victim and writes its declaration.
            data = journal.drop(victim[0], victim[1], drop[0], drop[1], drop[2], drop[3])
            self.journal_bytes += len(data)
            actions.append(Append(QUEUE_FILE, data))
        return True

    def _oldest_droppable(self):
        for i in range(len(self.queue)):
            entry = self.queue[i]
            if not entry[4] and not entry[2] & journal.FLAG_DROP:
                return i
        return -1

    def _declare_drop(self, epoch, seq, now_ms, actions):
        """The drop record that declares (epoch, seq): the open one extended,
        or a new one queued in the victim's place."""
        drop = self.open_drop
        if drop is not None and not drop[4]:
            record = self.codec.loads(drop[3])
            if record["de"] == epoch and record["b"] + 1 == seq:
                record["b"] = seq
                record["n"] += 1
                drop[3] = self.codec.dumps(record)
                return drop
        record = {"v": FORMAT_VERSION, "k": "drop", "d": self.device, "ts": now_ms,
                  "de": epoch, "a": seq, "b": seq, "n": 1}
        self.open_drop = self._new_entry(record, journal.FLAG_DROP)
        actions.append(Log("queue_full", "dropping oldest records from %d/%d" % (epoch, seq)))
        return self.open_drop

    def _pump(self, actions):
        """Publish queued records in order while the in-flight window has room."""
        for entry in self.queue:
            if self.inflight >= self.config.inflight_max:
                break
            if entry[4]:
                continue
            entry[4] = True
            self.inflight += 1
            if self.open_drop is entry:
                self.open_drop = None
            actions.append(Publish(self.topic, entry[3], (entry[0], entry[1])))
        return actions

    def _index(self, epoch, seq):
        for i in range(len(self.queue)):
            if self.queue[i][0] == epoch and self.queue[i][1] == seq:
                return i
        return -1

    def _live_bytes(self):
        total = 0
        for entry in self.queue:
            total += len(entry[3]) + 16
        return total

    def _compact(self):
        data = journal.compact([[e[0], e[1], e[2], e[3]] for e in self.queue])
        self.journal_bytes = len(data)
        return WriteAtomic(QUEUE_FILE, data)
