"""The audit log upload in memory: the device's real console and uploader
(agent/console.py, agent/audit_upload.py on board.sim flash) against the
cloud's real handler (cloud/support_mqtt.SupportHandler on SupportDesk and
SQLite), connected by a function instead of a broker. Chain continuity
across uploads, findings for edits, truncation, gaps and foreign chains,
rotation on checkpoints, the revocation push, power cuts at every write,
every state x event of the uploader, and hostile input on both sides."""

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent import audit_upload as up
from agent import auditlog, cbor, journal
from agent import console as core
from agent.actions import Log, Publish
from board.sim import PowerCut, SimFlash
from cloud.console_tool import gid_of
from cloud.support import SupportDesk
from cloud.support_mqtt import SupportHandler, parse_up
from simulator.console_drill import SimConsoleDevice, Technician, drop_last_records, edit_record

T0_S = 1_800_000_000
IDENTITY = "acme/dev-1"


class Clock:
    def __init__(self):
        self.now_s = T0_S

    def __call__(self):
        return self.now_s


@pytest.fixture
def cloud(tmp_path):
    clock = Clock()
    desk = SupportDesk(str(tmp_path / "cloud"), clock_s=clock, random_bytes=random.Random(1).randbytes)
    handler = SupportHandler(desk, clock)
    handler.clock = clock
    yield handler
    desk.close()


class Peer:
    """A device and its uploader; publishes go straight to the cloud's
    handler and its answers straight back (one broker hop, in memory)."""

    def __init__(self, cloud, device_id=None, identity=IDENTITY, flash=None, seed=1, **kw):
        self.cloud = cloud
        self.identity = identity
        self.device = SimConsoleDevice(device_id or identity, cloud.desk.keys(), seed, flash=flash,
                                       start_ms=T0_S * 1000)
        self.kw = kw
        self.logs = []
        self.inbox = []
        self.boot()

    def boot(self):
        self.device.boot()
        self.uploader = up.Uploader(self.device.console, self.identity,
                                    self.device.flash.read(up.CURSOR_FILE), **self.kw)

    def online(self):
        self.run(self.uploader.feed(up.Online(self._ms())))
        self.pump()

    def pump(self, rounds_max=500):
        """Deliver the cloud's answers and poll, until nothing is in flight."""
        self.poll()
        for _ in range(rounds_max):
            if self.inbox:
                self.deliver(self.inbox.pop(0))
            elif self.uploader.state != up.IDLE or not self.uploader.pending():
                return
            self.poll()         # also: records the last feed wrote (a rotation's) go up
        raise AssertionError("the exchange did not settle")

    def offline(self):
        self.run(self.uploader.feed(up.Offline(self._ms())))

    def poll(self):
        self.run(self.uploader.feed(up.Poll(self.device.audit_log(), self._ms(), self._s())))

    def deliver(self, payload):
        self.run(self.uploader.feed(up.Received(payload, self.device.audit_log(), self._ms(), self._s())))

    def run(self, actions):
        for action in actions:
            if isinstance(action, Publish):
                reply = self.cloud.handle(action.topic, action.payload)
                if reply is not None and reply[0] == self.uploader.down:
                    self.inbox.append(reply[1])
            elif isinstance(action, Log):
                self.logs.append(action.code)
            else:
                self.device.port.run([action])

    def _ms(self):
        return self.device.clock.ticks_ms()

    def _s(self):
        return self.device.clock.now_ms() // 1000


def grant(cloud, tech, device_id, role="technician"):
    return cloud.desk.grant(tech.name, tech.point, role, devices=[device_id], hours=4,
                            requested_by=tech.name, approved_by="lead-bob", reason="test")[1]


def sessions(peer, tech, n=1, commands=("status", "net", "log 2")):
    for _ in range(n):
        s = tech.session(peer.device, grant(peer.cloud, tech, peer.device.device_id))
        s.open()
        for c in commands:
            s.run(c)
        s.close()


def kinds(cloud, identity=IDENTITY):
    return [f["kind"] for f in cloud.desk.audit_findings(identity)]


def held(cloud, identity=IDENTITY):
    return cloud.desk.audit_status(identity)


# ---------------------------------------------------------------- the happy path

def test_uploads_in_segments_continue_the_chain_and_checkpoints_rotate_the_log(cloud):
    tech = Technician("alice")
    peer = Peer(cloud, segment_bytes=300, rotate_bytes=0)
    sessions(peer, tech, 3)
    records = peer.device.console.chain.seq
    peer.online()
    assert peer.uploader.state == up.IDLE and not peer.uploader.pending()
    assert peer.uploader.acked > 3                       # several segments of at most 300 bytes
    st = held(cloud)
    assert (st["next"], st["tamper"], st["findings"]) == (peer.device.console.chain.seq, False, [])
    stored = cloud.desk.uploaded_records(IDENTITY)
    assert [r[0] for r in stored] == list(range(st["next"]))
    assert auditlog.records(peer.device.audit_log())[0][0] > 0       # rotated on a checkpoint
    assert records < st["next"]                          # "rotated" records went up too
    # The cursor is on flash: after a reboot nothing is sent twice.
    peer.offline()
    sessions(peer, tech, 1)
    peer.boot()
    peer.online()
    st = held(cloud)
    assert (st["next"], st["tamper"]) == (peer.device.console.chain.seq, False)
    assert auditlog.check(peer.device.audit_log(), IDENTITY, start_seq=auditlog.records(
        peer.device.audit_log())[0][0], start_head=_head_of_first(peer.device.audit_log()))["tamper"] is False


def _head_of_first(log):
    import hashlib
    return hashlib.sha256(journal.scan(log)[0][0]).digest()


def test_a_resent_segment_is_taken_once(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    sessions(peer, tech)
    log = peer.device.audit_log()
    payload = up.segment(9, 0, log, peer.device.console.chain.seq, up.grant.revocations_digest([]))
    for _ in range(3):
        topic, reply = cloud.handle("t/%s/audit" % IDENTITY, payload)
        assert up.parse_down(reply)["findings"] == []
    assert held(cloud)["records"] == peer.device.console.chain.seq and kinds(cloud) == []


# ---------------------------------------------------------------- tampering

def test_an_edit_before_upload_is_found(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    sessions(peer, tech, 2)
    log = peer.device.audit_log()
    peer.device.flash.write_atomic(core.AUDIT_FILE, edit_record(log, 3))
    peer.boot()
    peer.online()
    assert kinds(cloud) == ["edit"] and held(cloud)["tamper"]
    assert "audit_findings" in peer.logs                 # the device is told too


def test_records_dropped_after_upload_are_truncation(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    sessions(peer, tech, 2)
    peer.online()
    peer.offline()
    assert kinds(cloud) == []
    log = peer.device.audit_log()
    peer.device.flash.write_atomic(core.AUDIT_FILE, drop_last_records(log, 3))
    peer.boot()
    peer.online()
    assert kinds(cloud) == ["truncated"]
    st = held(cloud)
    assert st["next"] == peer.device.console.chain.seq and st["tamper"]
    # the records the device dropped are kept by the cloud, marked not current
    assert len(cloud.desk.uploaded_records(IDENTITY, current=False)) == st["records"] + 3
    sessions(peer, tech, 1)                  # it goes on from there without a new finding
    peer.pump()
    assert kinds(cloud) == ["truncated"]


def test_records_dropped_and_written_over_before_the_next_upload_break_the_chain(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    sessions(peer, tech, 2)
    peer.online()
    peer.offline()
    peer.device.flash.write_atomic(core.AUDIT_FILE, drop_last_records(peer.device.audit_log(), 3))
    peer.boot()
    sessions(peer, tech, 1)                  # the log is longer again than what was uploaded
    peer.online()
    assert kinds(cloud) == ["edit"] and held(cloud)["tamper"]
    assert "does not chain" in cloud.desk.audit_findings(IDENTITY)[0]["detail"]


def test_the_last_uploaded_record_edited_is_found_at_hello(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    sessions(peer, tech, 1)
    peer.online()
    peer.offline()
    log = peer.device.audit_log()
    peer.device.flash.write_atomic(core.AUDIT_FILE, edit_record(log, len(journal.scan(log)[0]) - 1))
    peer.boot()
    peer.online()
    assert kinds(cloud) == ["edit"]


def test_gaps_foreign_chains_and_announced_records_that_vanish(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    sessions(peer, tech, 2)
    bodies = journal.scan(peer.device.audit_log())[0]
    rev = up.grant.revocations_digest([])
    topic = "t/%s/audit" % IDENTITY
    cloud.handle(topic, up.segment(1, 0, journal.frame(bodies[0]) + journal.frame(bodies[1]), 2, rev))
    cloud.handle(topic, up.segment(2, 4, b"".join(journal.frame(b) for b in bodies[4:6]), 6, rev))
    assert kinds(cloud) == ["gap"]
    # dev-1's chain uploaded as dev-2's: it does not start at dev-2's genesis
    cloud.handle("t/acme/dev-2/audit", up.segment(1, 0, journal.frame(bodies[0]), 1, rev))
    assert kinds(cloud, "acme/dev-2") == ["bad_start"]
    # a device that announced 20 records and later has fewer
    cloud.handle("t/acme/dev-3/audit", up.hello(20, bytes(32), rev))
    cloud.handle("t/acme/dev-3/audit", up.hello(15, bytes(32), rev))
    assert kinds(cloud, "acme/dev-3") == ["truncated"]


# ---------------------------------------------------------------- revocation and time

def test_a_revocation_is_pushed_once_and_ends_the_session(cloud):
    tech = Technician("alice")
    peer = Peer(cloud)
    message = grant(cloud, tech, IDENTITY)
    peer.online()
    s = tech.session(peer.device, message)
    s.open()
    assert cloud.pushes() == []
    cloud.desk.revoke(gid_of(message).hex(), "lead-bob", "cancelled")
    pushes = cloud.pushes()
    assert [t for t, _ in pushes] == ["t/%s/support" % IDENTITY]
    peer.deliver(pushes[0][1])
    peer.pump()
    assert peer.device.console.state == core.IDLE
    assert any(line.startswith(b"end revoked") for line in peer.device.outbox)
    assert cloud.pushes() == []                          # nothing new to push
    assert held(cloud)["next"] == peer.device.console.chain.seq
    peer.offline()                                       # and offline it stays refused
    from cloud.console_tool import Refused
    with pytest.raises(Refused) as e:
        tech.session(peer.device, message).open()
    assert e.value.code == "revoked"
    # a device that missed the push gets the list at its next hello
    late = Peer(cloud, device_id=IDENTITY, identity="acme/dev-9", seed=3)
    late.online()
    assert late.device.console.revoked == [gid_of(message)]


def test_cloud_time_raises_the_trusted_floor(cloud):
    peer = Peer(cloud)
    cloud.clock.now_s = T0_S + 5000
    peer.online()
    assert peer.device.console.floor_s == T0_S + 5000


# ---------------------------------------------------------------- power cuts

def scenario(cloud, peer, tech, rng):
    """Sessions, uploads, a revocation and rotations, resumable after a cut."""
    for step in range(4):
        sessions(peer, tech, 1, commands=("status",))
        peer.online()
        if step == 1:
            message = grant(cloud, tech, IDENTITY)
            cloud.desk.revoke(gid_of(message).hex(), "lead-bob", "x")
            for _, payload in cloud.pushes():
                peer.deliver(payload)
            peer.pump()
        peer.offline()


def count_writes(tmp_path):
    desk_dir = tmp_path / "count"
    clock = Clock()
    desk = SupportDesk(str(desk_dir), clock_s=clock, random_bytes=random.Random(1).randbytes)
    cloud = SupportHandler(desk, clock)
    flash = SimFlash()
    peer = Peer(cloud, flash=flash, segment_bytes=400, rotate_bytes=0)
    scenario(cloud, peer, Technician("alice"), random.Random(1))
    kinds_written = [r[3] for r in desk.uploaded_records(IDENTITY)]
    assert "rotated" in kinds_written and "revocations" in kinds_written
    assert auditlog.records(flash.read(core.AUDIT_FILE))[0][0] > 0
    assert flash.read(up.CURSOR_FILE) is not None
    desk.close()
    return flash.writes


def test_power_cut_at_every_write_keeps_the_cloud_copy_sound(tmp_path):
    total = count_writes(tmp_path)
    assert total > 40
    for cut in range(1, total + 1):
        clock = Clock()
        desk = SupportDesk(str(tmp_path / ("c%d" % cut)), clock_s=clock,
                           random_bytes=random.Random(1).randbytes)
        cloud = SupportHandler(desk, clock)
        flash = SimFlash(rng=random.Random(cut), cut_at_write=cut)
        tech = Technician("alice")
        peer = Peer(cloud, flash=flash, segment_bytes=400, rotate_bytes=0)
        with pytest.raises(PowerCut):
            scenario(cloud, peer, tech, random.Random(1))
        flash.power_on()
        peer.boot()                                      # recovers the log, reads the cursor
        sessions(peer, tech, 1, commands=("status",))
        peer.online()
        st = desk.audit_status(IDENTITY)
        assert st["findings"] == [], (cut, st["findings"])
        assert st["next"] == peer.device.console.chain.seq, cut
        assert peer.uploader.state == up.IDLE and not peer.uploader.pending()
        desk.close()


# ---------------------------------------------------------------- state machine and hostile input

EVENTS = st.sampled_from(["online", "offline", "poll", "sync", "ack", "push", "refused", "junk"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(EVENTS, max_size=25), st.integers(0, 50))
def test_every_state_and_event_is_handled(cloud, names, n):
    peer = Peer(cloud)
    peer.device.console.chain.record(T0_S, "x", {})
    u = peer.uploader
    payloads = {
        "sync": cbor.dumps({"v": 1, "op": "sync", "time": T0_S, "next": n}),
        "ack": cbor.dumps({"v": 1, "op": "ack", "id": u.seg_id, "time": T0_S, "next": n, "findings": []}),
        "push": cbor.dumps({"v": 1, "op": "push", "time": T0_S, "revocations": b"\x00"}),
        "refused": cbor.dumps({"v": 1, "op": "refused", "time": T0_S, "code": "x", "id": u.seg_id}),
        "junk": b"\xff\x00",
    }
    for name in names:
        log = peer.device.audit_log()
        if name == "online":
            event = up.Online(0)
        elif name == "offline":
            event = up.Offline(0)
        elif name == "poll":
            event = up.Poll(log, 10 ** 6, T0_S)
        else:
            event = up.Received(payloads[name], log, 0, T0_S)
        for action in u.feed(event):
            assert isinstance(action, (Publish, Log)) or type(action).__name__ in (
                "WriteAtomic", "Append", "Send", "EndSession")
        assert u.state in (up.OFFLINE, up.SYNCING, up.IDLE, up.SENDING, up.STALLED)
        assert 0 <= u.cursor <= max(n, peer.device.console.chain.seq)


def test_every_pair_is_in_the_table():
    states = (up.OFFLINE, up.SYNCING, up.IDLE, up.SENDING, up.STALLED)
    for s in states:
        for e in (up.Online, up.Offline, up.Poll, up.Received):
            assert (s, e) in up.TRANSITIONS


VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64 - 1) | st.binary(max_size=40)
                      | st.text(max_size=10), lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
UP_KEYS = ["v", "op", "next", "head", "rev", "id", "first", "frames"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), st.dictionaries(st.sampled_from(UP_KEYS), VALUES | st.sampled_from(
    [1, "hello", "seg", bytes(32), bytes(8), 0]), max_size=8).map(cbor.dumps)))
def test_hostile_uploads_get_a_reason_never_a_crash(cloud, payload):
    cloud.clock.now_s += 1                              # under the rate limit
    reply = cloud.handle("t/%s/audit" % IDENTITY, payload)
    assert reply is not None and reply[0] == "t/%s/support" % IDENTITY
    msg = up.parse_down(reply[1])                       # every answer is well-formed
    assert msg["op"] in ("refused", "sync", "ack")
    if msg["op"] == "refused":
        assert msg["code"]


def test_hostile_uploads_are_recorded_with_their_reason(cloud):
    topic = "t/%s/audit" % IDENTITY
    cases = [(b"\xff", "malformed"), (cbor.dumps([1]), "bad_version"),
             (cbor.dumps({"v": 1, "op": "rm"}), "unknown_op"),
             (cbor.dumps({"v": 1, "op": "hello", "next": 0, "head": bytes(32)}), "bad_field"),
             (cbor.dumps({"v": 1, "op": "hello", "next": -1, "head": bytes(32), "rev": bytes(8)}), "bad_field"),
             (up.segment(1, 0, b"\x01\x02", 0, bytes(8)), "torn_segment"),
             (up.segment(1, 5, journal.frame(cbor.dumps([0, bytes(32), 0, "x", {}])), 0, bytes(8)), "bad_first"),
             (b"\x00" * (up.UP_BYTES_MAX + 1), "too_large")]
    for payload, code in cases:
        assert up.parse_down(cloud.handle(topic, payload)[1])["code"] == code, code
    assert [r["code"] for r in cloud.desk.audit_refusals(IDENTITY)] == [c for _, c in cases]
    assert cloud.handle("t/acme/dev-1/telemetry", b"x") is None


def test_a_flood_is_cut_by_the_rate_limit(cloud):
    topic = "t/%s/audit" % IDENTITY
    answered = sum(cloud.handle(topic, b"\xff") is not None for _ in range(400))
    assert answered < 400 and cloud.limited == 400 - answered
    assert [r["code"] for r in cloud.desk.audit_refusals(IDENTITY)].count("rate_limited") == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), st.dictionaries(st.sampled_from(
    ["v", "op", "time", "next", "id", "findings", "checkpoint", "revocations", "code"]),
    VALUES | st.sampled_from([1, "sync", "ack", "push", "refused", b"x"]), max_size=8).map(cbor.dumps)))
def test_hostile_support_messages_are_logged_never_raised(cloud, payload):
    cloud.clock.now_s += 1                              # under the rate limit
    peer = Peer(cloud)
    peer.online()
    before = peer.device.console.chain.seq
    peer.deliver(payload)
    peer.deliver(payload)
    peer.pump()
    assert peer.uploader.state in (up.IDLE, up.SENDING, up.STALLED)
    assert peer.device.console.chain.seq >= before


def test_parse_up_takes_only_the_exact_shapes():
    good = up.hello(3, bytes(32), bytes(8))
    assert parse_up(good)["next"] == 3
    assert parse_up(up.segment(1, 0, b"x", 1, bytes(8)))["frames"] == b"x"
    for bad in (cbor.dumps({"v": 1, "op": "hello", "next": 3, "head": bytes(31), "rev": bytes(8)}),
                cbor.dumps({"v": 1, "op": "hello", "next": True, "head": bytes(32), "rev": bytes(8)}),
                cbor.dumps({"v": 1, "op": "hello", "next": 3, "head": bytes(32), "rev": bytes(8), "x": 1}),
                up.segment(1, 0, b"", 1, bytes(8)),
                up.segment(1, 0, b"x" * (up.SEGMENT_BYTES_MAX + 1), 1, bytes(8))):
        with pytest.raises(Exception) as e:
            parse_up(bad)
        assert e.value.code in ("bad_field", "too_large")
