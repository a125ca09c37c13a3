# The telemetry core: sequenced records, a persisted bounded queue, QoS 1
# publishing with an in-flight window, reconnect with backoff. Sans-IO: it
# takes events (agent.events) and returns lists of actions (agent.actions).
#
# Every (state, event) pair the machine accepts is in TRANSITIONS below; any
# other pair is a LocalError and the machine refuses further use. Pairs a
# remote peer's timing can cause (a late PUBACK, a second CONNACK) are in
# the table and only logged: the network must not be able to break us.

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
    (ONLINE, Connected): "_second_connack",
    (OFFLINE, PubAcked): "_stray_ack",
    (CONNECTING, PubAcked): "_stray_ack",
    (OFFLINE, ConnectionLost): "_nothing",
}


class Config:
    """Limits of one agent. Every queue and retry has a bound. Keep
    inflight_max below capacity: records in flight are never dropped, so a
    queue whose every record is in flight, with PUBACKs slow to come, must
    refuse the next sample (counted in `refused`)."""

    def __init__(self, capacity=256, inflight_max=8, backoff_base_ms=500,
                 backoff_cap_ms=30000, compact_bytes_min=8192, drops_max=8):
        if capacity < 2 or inflight_max < 1 or drops_max < 1:
            raise ValueError("capacity >= 2, inflight_max >= 1, drops_max >= 1")
        self.capacity = capacity      # data records queued, at most
        self.drops_max = drops_max    # drop records queued, at most (never dropped themselves)
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
        self.data_count = 0      # data records in the queue (drop records apart)
        self.open_drops = {}     # victims' epoch -> unpublished drop record declaring them
        self.inflight = 0
        self.connect_at_ms = 0   # first Tick connects at once
        self.journal_bytes = 0
        self.live_bytes = 0      # what a compacted journal would hold
        self.generated = 0       # data records made durable this boot
        self.dropped = 0         # records this boot declared dropped
        self.acked = 0
        self.refused = 0         # samples refused: nothing could be dropped or declared

    # -- boot -------------------------------------------------------------

    def boot(self, state_blob, journal_blob):
        """Recover from storage; returns the writes that must happen before
        anything else: the new epoch (state file, and an E frame in the
        compacted journal, so losing one copy cannot repeat an epoch)."""
        entries, damaged, journal_epoch = journal.replay(journal_blob or b"")
        epoch = max(decode_state(state_blob), journal_epoch)
        for e in entries:
            if e[0] > epoch:
                epoch = e[0]
        if epoch >= SEQ_MAX:
            raise LocalError("boot epoch exhausted", "epoch_exhausted")
        self.epoch = epoch + 1
        self.queue = []
        self.data_count = 0
        self.live_bytes = 0
        self.open_drops = {}
        for e in entries:
            entry = [e[0], e[1], e[2], e[3], False]
            self.queue.append(entry)
            self._count(entry, 1)
            if e[2] & journal.FLAG_DROP and not e[2] & journal.FLAG_SENT:
                # Never published, so nobody has seen it: it may still widen.
                self.open_drops[self.codec.loads(e[3])["de"]] = entry
        actions = [WriteAtomic(STATE_FILE, encode_state(self.epoch)), self._compact()]
        if damaged:
            actions.append(Log("journal_damaged", "a torn tail was cut or an unknown frame skipped"))
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
        wait_ms = self.connect_at_ms - event.now_ms
        if 0 < wait_ms <= self.config.backoff_cap_ms:
            return []
        # Due, or the wall clock stepped back past any backoff we set: go now.
        self.state = CONNECTING
        return [Connect()]

    def _connected(self, event):
        self.state = ONLINE
        return self._pump([])

    def _second_connack(self, event):
        return [Log("second_connack", "the broker acknowledged a connection twice")]

    def _stray_ack(self, event):
        return [Log("stray_ack", "PUBACK %r arrived while %s" % (event.token, self.state))]

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
        self._count(entry, -1)
        self.inflight -= 1
        self.acked += 1
        self.backoff.reset()
        actions = [self._append(journal.remove(epoch, seq))]
        self._maybe_compact(actions)
        return self._pump(actions)

    def _sample(self, event):
        actions = []
        if not self._make_room(event.now_ms, actions):
            self.refused += 1
            actions.append(Log("sample_refused", "queue full and no drop can be declared"))
            return actions
        record = {"v": FORMAT_VERSION, "k": "t", "d": self.device, "ts": event.now_ms,
                  "r": event.readings}
        entry = self._new_entry(record, 0)
        actions.append(self._append(journal.add(entry[0], entry[1], 0, entry[3])))
        self.generated += 1
        self._maybe_compact(actions)
        if self.state == ONLINE:
            self._pump(actions)
        return actions

    # -- the queue --------------------------------------------------------

    def _new_entry(self, record, flags):
        if self.next_seq > SEQ_MAX:
            raise LocalError("sequence numbers exhausted in this epoch", "seq_exhausted")
        record["e"] = self.epoch
        record["s"] = self.next_seq
        self.next_seq += 1
        entry = [self.epoch, record["s"], flags, self.codec.dumps(record), False]
        self.queue.append(entry)
        self._count(entry, 1)
        return entry

    def _count(self, entry, sign):
        if not entry[2] & journal.FLAG_DROP:
            self.data_count += sign
        self.live_bytes += sign * (len(entry[3]) + 16)

    def _make_room(self, now_ms, actions):
        """Drop the oldest data records until one more fits, each declared in
        the same journal frame that removes it. False if nothing can go."""
        while self.data_count >= self.config.capacity:
            i = self._oldest_droppable()
            if i < 0:
                return False
            victim = self.queue[i]
            drop = self.open_drops.get(victim[0])
            if drop is None and len(self.queue) - self.data_count >= self.config.drops_max:
                return False  # drop records are bounded too; never drop one
            self.queue.pop(i)
            self._count(victim, -1)
            self.dropped += 1
            drop = self._declare(drop, victim[0], victim[1], now_ms, actions)
            actions.append(self._append(journal.drop(victim[0], victim[1], drop[0], drop[1],
                                                     drop[2], drop[3])))
        return True

    def _oldest_droppable(self):
        for i in range(len(self.queue)):
            entry = self.queue[i]
            if not entry[4] and not entry[2] & journal.FLAG_DROP:
                return i
        return -1

    def _declare(self, drop, epoch, seq, now_ms, actions):
        """The drop record of epoch `epoch` widened to cover `seq`, or a new
        one. Seqs inside its range that were not dropped are records that are
        stored or still queued, so the range never hides a silent loss."""
        if drop is not None:
            record = self.codec.loads(drop[3])
            record["a"] = min(record["a"], seq)
            record["b"] = max(record["b"], seq)
            record["n"] += 1
            self.live_bytes -= len(drop[3])
            drop[3] = self.codec.dumps(record)
            self.live_bytes += len(drop[3])
            return drop
        record = {"v": FORMAT_VERSION, "k": "drop", "d": self.device, "ts": now_ms,
                  "de": epoch, "a": seq, "b": seq, "n": 1}
        drop = self._new_entry(record, journal.FLAG_DROP)
        self.open_drops[epoch] = drop
        actions.append(Log("queue_full", "dropping oldest records from %d/%d" % (epoch, seq)))
        return drop

    def _pump(self, actions):
        """Publish queued records in order while the in-flight window has room.
        A drop record is final once published: it leaves open_drops."""
        for entry in self.queue:
            if self.inflight >= self.config.inflight_max:
                break
            if entry[4]:
                continue
            entry[4] = True
            self.inflight += 1
            if entry[2] & journal.FLAG_DROP and not entry[2] & journal.FLAG_SENT:
                # Final from now on, also after a reboot: say so before sending.
                entry[2] |= journal.FLAG_SENT
                self._close_drop(entry)
                actions.append(self._append(journal.sent(entry[0], entry[1])))
            actions.append(Publish(self.topic, entry[3], (entry[0], entry[1])))
        return actions

    def _close_drop(self, entry):
        for epoch in list(self.open_drops):
            if self.open_drops[epoch] is entry:
                del self.open_drops[epoch]

    def _index(self, epoch, seq):
        for i in range(len(self.queue)):
            if self.queue[i][0] == epoch and self.queue[i][1] == seq:
                return i
        return -1

    def _append(self, data):
        self.journal_bytes += len(data)
        return Append(QUEUE_FILE, data)

    def _maybe_compact(self, actions):
        """Rewrite the journal once it is mostly dead frames, online or not."""
        if self.journal_bytes > self.config.compact_bytes_min and self.journal_bytes > 4 * self.live_bytes:
            actions.append(self._compact())

    def _compact(self):
        data = journal.compact([[e[0], e[1], e[2], e[3]] for e in self.queue], self.epoch)
        self.journal_bytes = len(data)
        return WriteAtomic(QUEUE_FILE, data)
