"""The console core (agent/console.py) and its board driver, two peers in
memory: the real device code on board.sim flash, the real technician tool
(cloud.console_tool.Session), grants signed by the real support desk.
Each attack of issue 6 is a test here; the audit log must record it."""

import pytest
from hypothesis import given, settings, strategies as st

from agent import auditlog, cbor
from agent import grant as grant_mod
from agent import console as core
from board.console_port import LineReader
from cloud.console_tool import Refused, answer, gid_of
from cloud.support import SupportDesk
from simulator.console_drill import T0_S, SimConsoleDevice, Technician, edit_grant, run_drill


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    desk = SupportDesk(str(tmp_path_factory.mktemp("support")), clock_s=lambda: T0_S)
    yield desk
    desk.close()


@pytest.fixture(scope="module")
def alice():
    return Technician("alice")


def issue(desk, tech, role, devices=("d1",), **kw):
    kw.setdefault("requested_by", tech.name)
    kw.setdefault("approved_by", "bob")
    kw.setdefault("reason", "test")
    return desk.grant(tech.name, tech.point, role, list(devices), **kw)[1]


def device(desk, name="d1", **kw):
    return SimConsoleDevice(name, desk.keys(), seed=7, **kw)


def kinds(dev):
    return [r[3] for r in auditlog.records(dev.audit_log())]


def refused_code(fn):
    with pytest.raises(Refused) as e:
        fn()
    return e.value.code


# ---------------------------------------------------------------- sessions and roles

def test_viewer_session_runs_viewer_commands_and_is_recorded(desk, alice):
    dev = device(desk)
    s = alice.session(dev, issue(desk, alice, "viewer"))
    assert s.open() == ("viewer", "alice", 3600)
    assert s.run("status")[0] == "device d1"
    assert s.run("telemetry 3") == ["t17", "t18", "t19"]
    s.close()
    assert kinds(dev) == ["challenge", "session_open", "command", "command", "session_close"]
    assert not auditlog.check(dev.audit_log(), "d1")["problems"]


@pytest.mark.parametrize("role,command,allowed", [
    ("viewer", "versions", True), ("viewer", "net", True), ("viewer", "log 2", True),
    ("viewer", "reboot", False), ("viewer", "rollback", False), ("viewer", "set a b", False),
    ("viewer", "rotate-identity", False), ("viewer", "factory-reset d1", False),
    ("technician", "reboot", True), ("technician", "set interval 30", True),
    ("technician", "rotate-identity", True), ("technician", "factory-reset d1", False),
    ("admin", "factory-reset d1", True),
])
def test_commands_by_role_and_refusals_are_recorded(desk, alice, role, command, allowed):
    dev = device(desk)
    s = alice.session(dev, issue(desk, alice, role))
    s.open()
    if allowed:
        s.run(command)
        assert dev.commands.executed == [(command.split()[0], tuple(command.split()[1:]))]
    else:
        assert refused_code(lambda: s.run(command)) == "forbidden"
        assert dev.commands.executed == []
        record = auditlog.records(dev.audit_log())[-1]
        assert record[3] == "refused" and record[4]["code"] == "forbidden"
        assert record[4]["cmd"] == command.split()[0] and record[4]["role"] == role


def test_factory_reset_needs_the_device_id_as_confirmation(desk, alice):
    dev = device(desk)
    s = alice.session(dev, issue(desk, alice, "admin"))
    s.open()
    assert refused_code(lambda: s.run("factory-reset other")) == "bad_args"
    assert refused_code(lambda: s.run("telemetry 0")) == "bad_args"
    assert refused_code(lambda: s.run("frobnicate")) == "unknown_command"
    assert dev.commands.executed == []


def test_command_record_is_on_flash_before_the_command_runs(desk, alice):
    dev = device(desk)
    s = alice.session(dev, issue(desk, alice, "technician"))
    s.open()
    seen = []
    real_run = dev.commands.run

    def run(command, args, role):
        seen.append(kinds(dev)[-1])
        return real_run(command, args, role)
    dev.commands.run = run
    s.run("reboot")
    assert seen == ["command"]


# ---------------------------------------------------------------- the attacks

def test_expired_grant_is_refused(desk, alice):
    dev = device(desk)
    old = issue(desk, alice, "admin", hours=1, not_before=T0_S - 2 * 3600)
    assert refused_code(alice.session(dev, old).open) == "expired"
    assert kinds(dev) == ["auth_fail"]


def test_clock_set_back_cannot_revive_an_expired_grant(desk, alice):
    dev = device(desk)
    short = issue(desk, alice, "viewer", hours=1)
    s = alice.session(dev, issue(desk, alice, "viewer"))
    s.open()                            # raises the trusted floor to T0
    s.close()
    dev.clock.advance(2 * 3600 * 1000)  # now past the short grant's expiry...
    desk.clock_s = lambda: T0_S + 2 * 3600   # the cloud issues a grant later...
    try:
        later = issue(desk, alice, "viewer")
    finally:
        desk.clock_s = lambda: T0_S
    s = alice.session(dev, later)
    s.open()                            # ...whose iat raises the floor
    s.close()
    dev.clock._now_ms = (T0_S + 60) * 1000   # someone sets the wall clock back
    assert refused_code(alice.session(dev, short).open) == "expired"
    assert dev.console.floor_s == T0_S + 2 * 3600
    assert dev.console.floor_s == T0_S + 2 * 3600


def test_grant_for_another_device_is_refused(desk, alice):
    dev = device(desk)
    assert refused_code(alice.session(dev, issue(desk, alice, "admin", ["d2"])).open) == "wrong_device"


def test_site_grant_covers_devices_at_that_site_only(desk, alice):
    grant = desk.grant("alice", alice.point, "viewer", [], site="site-1", requested_by="alice",
                       approved_by="bob", reason="visit")[1]
    alice.session(device(desk, "d5"), grant).open()
    elsewhere = SimConsoleDevice("d6", desk.keys(), 1, site="site-2")
    assert refused_code(alice.session(elsewhere, grant).open) == "wrong_device"


def test_forged_signature_is_refused(desk, alice, tmp_path):
    dev = device(desk)
    rogue = SupportDesk(str(tmp_path / "rogue"), clock_s=lambda: T0_S)
    forged = issue(rogue, alice, "admin")
    assert refused_code(alice.session(dev, forged).open) == "unknown_kid"
    edited = edit_grant(issue(desk, alice, "viewer"), role="admin")
    assert refused_code(alice.session(dev, edited).open) == "bad_signature"
    widened = edit_grant(issue(desk, alice, "viewer", ["d9"]), devices=["d1"])
    assert refused_code(alice.session(dev, widened).open) == "bad_signature"


def test_stolen_grant_without_the_technicians_key_is_refused(desk, alice):
    dev = device(desk)
    mallory = Technician("mallory")
    assert refused_code(mallory.session(dev, issue(desk, alice, "admin")).open) == "bad_answer"


def test_replayed_answer_is_refused_on_the_same_and_another_device(desk, alice):
    dev, other = device(desk), device(desk, "d2")
    grant = issue(desk, alice, "admin", ["d1", "d2"])
    s = alice.session(dev, grant)
    s.open()
    nonce, device_id = s.last_challenge
    captured = answer(alice.key, nonce, gid_of(grant), device_id)
    s.close()
    again = alice.session(dev, grant)
    again.request("hello " + grant.hex())
    assert refused_code(lambda: again.auth(captured)) == "bad_answer"
    there = alice.session(other, grant)
    there.request("hello " + grant.hex())
    assert refused_code(lambda: there.auth(captured)) == "bad_answer"


def test_an_answer_is_good_for_one_try_only(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "admin")
    s = alice.session(dev, grant)
    nonce, device_id = s.request("hello " + grant.hex())[-1].split()[1:]
    good = answer(alice.key, bytes.fromhex(nonce), gid_of(grant), device_id)
    assert refused_code(lambda: s.auth(bytes(64))) == "bad_answer"
    assert refused_code(lambda: s.auth(good)) == "no_challenge"


def test_brute_force_locks_the_console_even_for_the_right_key(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "admin")
    s = alice.session(dev, grant)
    codes = []
    for _ in range(core.FAILURES_MAX):
        s.request("hello " + grant.hex())
        codes.append(refused_code(lambda: s.auth(bytes(64))))
    assert codes == ["bad_answer"] * core.FAILURES_MAX
    assert dev.console.state == core.LOCKED
    assert refused_code(alice.session(dev, grant).open) == "locked"
    assert kinds(dev)[-1] == "lockout"
    dev.advance(core.LOCKOUT_MS - 1)
    assert refused_code(alice.session(dev, grant).open) == "locked"
    dev.advance(1)
    assert alice.session(dev, grant).open()[0] == "admin"


def test_lockout_survives_a_power_cycle(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "admin")
    s = alice.session(dev, grant)
    for _ in range(core.FAILURES_MAX):
        s.request("hello " + grant.hex())
        refused_code(lambda: s.auth(bytes(64)))
    dev.boot()      # power cycle: the monotonic clock starts over
    assert refused_code(alice.session(dev, grant).open) == "locked"


def test_replayed_hellos_without_answers_lock_the_console(desk, alice):
    """A grant crosses the serial line in the clear; replaying it forever must
    not cost unbounded signature checks and audit records."""
    dev = device(desk)
    hello = b"hello " + issue(desk, alice, "admin").hex().encode() + b"\n"
    for _ in range(core.FAILURES_MAX + 3):
        dev.receive(hello)
    assert dev.console.state == core.LOCKED
    assert kinds(dev).count("challenge") == core.FAILURES_MAX
    assert dev.outbox[-1] == b"err locked console locked; try later\n"


def test_power_cycling_mid_challenge_still_counts(desk, alice):
    dev = device(desk)
    hello = b"hello " + issue(desk, alice, "admin").hex().encode() + b"\n"
    for _ in range(core.FAILURES_MAX):
        dev.receive(hello)
        dev.boot()
    assert dev.console.state == core.LOCKED


def test_unlock_is_persisted_too(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "viewer")
    for _ in range(core.FAILURES_MAX):
        dev.receive(b"auth 00\n")
    dev.advance(core.LOCKOUT_MS)
    assert dev.console.state == core.IDLE
    dev.boot()
    assert alice.session(dev, grant).open()[0] == "viewer"


def test_revocation_list_refuses_the_grant_and_closes_its_session(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "technician")
    s = alice.session(dev, grant)
    s.open()
    desk.revoke(gid_of(grant).hex(), "bob", "left the company")
    dev.port.run(dev.console.feed(core.Revocations(desk.revocation_list(), 0, T0_S)))
    assert refused_code(lambda: s.run("status")) == "revoked"
    assert refused_code(alice.session(dev, grant).open) == "revoked"


def test_old_revocation_list_cannot_be_replayed(desk, alice):
    dev = device(desk)
    old = desk.revocation_list()
    grant = issue(desk, alice, "viewer")
    desk.revoke(gid_of(grant).hex(), "bob", "x")
    later = [T0_S + 10]
    desk.clock_s = lambda: later[0]
    try:
        new = desk.revocation_list()
    finally:
        desk.clock_s = lambda: T0_S
    dev.port.run(dev.console.feed(core.Revocations(new, 0, T0_S)))
    dev.port.run(dev.console.feed(core.Revocations(old, 0, T0_S)))
    assert kinds(dev)[-2:] == ["revocations", "revocations_refused"]
    assert refused_code(alice.session(dev, grant).open) == "revoked"


# ---------------------------------------------------------------- timeouts

def test_idle_timeout_ends_the_session(desk, alice):
    dev = device(desk)
    s = alice.session(dev, issue(desk, alice, "viewer"))
    s.open()
    dev.advance(core.IDLE_MS - 1)
    s.run("status")                 # activity moves the idle deadline
    dev.advance(core.IDLE_MS)
    assert refused_code(lambda: s.run("status")) == "idle"
    assert dev.commands.executed == [("status", ())]


def test_session_ends_when_the_grant_expires(desk, alice):
    dev = device(desk)
    s = alice.session(dev, issue(desk, alice, "viewer", hours=0.05))   # 180 s
    assert s.open()[2] == 180
    for _ in range(4):
        dev.advance(50 * 1000)
        s.run("status") if dev.console.state == core.OPEN else None
    assert dev.console.state == core.IDLE
    assert auditlog.records(dev.audit_log())[-1][4]["reason"] == "expired"


def test_unanswered_challenge_expires(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "viewer")
    s = alice.session(dev, grant)
    nonce, device_id = s.request("hello " + grant.hex())[-1].split()[1:]
    dev.advance(core.CHALLENGE_MS)
    good = answer(alice.key, bytes.fromhex(nonce), gid_of(grant), device_id)
    assert refused_code(lambda: s.auth(good)) == "no_challenge"


def test_stepped_signature_checks_reach_the_same_verdicts(desk, alice):
    grant = issue(desk, alice, "technician")
    dev = device(desk, bits_per_tick=8)
    dev.port.run(dev.console.feed(core.Line(b"hello " + grant.hex().encode(), 0, T0_S)))
    assert dev.console.state == core.CHECKING
    dev.port.run(dev.console.feed(core.Line(b"status", 0, T0_S)))
    assert dev.outbox[-1] == b"err busy still checking a signature\n"
    ticks = 0
    while dev.console.busy():
        dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
        ticks += 1
    # 32 steps of 8 bits: one at hello, one before the refused line, the rest by ticks
    assert ticks == 256 // 8 - 2 and dev.outbox[-1].startswith(b"challenge ")
    s = alice.session(dev, grant)
    nonce, device_id = dev.outbox[-1].decode().split()[1:]
    dev.outbox.clear()
    assert s.auth(answer(alice.key, bytes.fromhex(nonce), gid_of(grant), device_id))[0] == "technician"
    assert refused_code(alice.session(device(desk, bits_per_tick=8), edit_grant(grant, role="admin")).open) \
        == "bad_signature"


def _tick_until_idle(dev):
    ticks = 0
    while dev.console.busy():
        dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
        ticks += 1
    return ticks


def test_a_stepped_revocation_list_applies_after_its_ticks_and_the_session_runs_meanwhile(desk, alice):
    grant = issue(desk, alice, "technician")
    dev = device(desk, bits_per_tick=8)
    s = alice.session(dev, grant)
    s.open()
    desk.revoke(gid_of(grant).hex(), "bob", "stepped")
    dev.port.run(dev.console.feed(core.Revocations(desk.revocation_list(), 0, T0_S)))
    assert dev.console.busy() and dev.console.revoked == [] and "revocations" not in kinds(dev)
    assert dev.console.state == core.OPEN
    dev.outbox.clear()
    dev.port.run(dev.console.feed(core.Line(b"status", 0, T0_S)))     # not "err busy"
    assert dev.outbox[-1] == b"ok\n" and dev.commands.executed[-1] == ("status", ())
    # 32 steps of 8 bits: none as the list arrived, one before the line, the rest by ticks
    assert _tick_until_idle(dev) == 256 // 8 - 1
    assert gid_of(grant) in dev.console.revoked and dev.console.state == core.IDLE
    assert kinds(dev)[-2:] == ["revocations", "session_close"]
    assert refused_code(alice.session(dev, grant).open) == "revoked"


def test_a_stepped_revocation_list_with_a_bad_signature_changes_nothing(desk, alice):
    grant = issue(desk, alice, "viewer")
    dev = device(desk, bits_per_tick=8)
    desk.revoke(gid_of(grant).hex(), "bob", "x")
    good = desk.revocation_list()
    bad = good[:-1] + bytes([good[-1] ^ 1])
    for message in (bad, good[:-4]):     # a wrong signature; a truncated message
        dev.port.run(dev.console.feed(core.Revocations(message, 0, T0_S)))
        _tick_until_idle(dev)
    records = auditlog.records(dev.audit_log())
    assert [(r[3], r[4]["code"]) for r in records] == [("revocations_refused", "bad_signature"),
                                                       ("revocations_refused", "cbor")]
    assert dev.console.revoked == [] and alice.session(dev, grant).open()[0] == "viewer"


def test_lists_that_come_during_a_check_are_checked_in_turn_and_a_flood_is_refused(desk, alice):
    dev = device(desk, bits_per_tick=8)
    grant = issue(desk, alice, "viewer")
    old = desk.revocation_list()
    desk.revoke(gid_of(grant).hex(), "bob", "x")
    desk.clock_s = lambda: T0_S + 10
    try:
        new = desk.revocation_list()
    finally:
        desk.clock_s = lambda: T0_S
    dev.port.run(dev.console.feed(core.Revocations(old, 0, T0_S)))
    dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
    dev.port.run(dev.console.feed(core.Revocations(new, 0, T0_S)))
    _tick_until_idle(dev)
    assert kinds(dev) == ["revocations", "revocations"] and gid_of(grant) in dev.console.revoked
    assert dev.console.revocations_iat == grant_mod.verify_revocations(new, desk.keys())[0] >= T0_S + 10
    # one being checked, CLOUD_WAITING_MAX waiting: the next is refused and recorded
    for _ in range(1 + core.CLOUD_WAITING_MAX + 1):
        dev.port.run(dev.console.feed(core.Revocations(new, 0, T0_S)))
    assert kinds(dev)[-1] == "revocations_refused"
    assert auditlog.records(dev.audit_log())[-1][4]["code"] == "busy"
    _tick_until_idle(dev)
    assert kinds(dev)[-5:] == ["revocations"] * 5 and gid_of(grant) in dev.console.revoked


def test_a_checkpoint_is_held_once_verified_and_only_a_rotation_uses_it(desk, alice):
    dev = device(desk, bits_per_tick=8)
    for _ in range(2):
        s = alice.session(dev, issue(desk, alice, "viewer"))
        s.open()
        s.close()
    report = desk.verify_log("d1", dev.audit_log(), record=False)
    message = desk.checkpoint("d1", report["head_seq"], report["head"])
    log = dev.audit_log()
    dev.port.run(dev.console.feed(core.RotateLog(log, 0, T0_S)))    # nothing held: nothing happens
    assert dev.audit_log() == log
    dev.port.run(dev.console.feed(core.Checkpoint(message, 0, T0_S)))
    assert dev.console.checkpoint is None and dev.console.busy()
    _tick_until_idle(dev)
    assert dev.console.checkpoint == (report["head_seq"], report["head"]) and dev.audit_log() == log
    dev.port.run(dev.console.feed(core.RotateLog(dev.audit_log(), 0, T0_S)))
    records = auditlog.records(dev.audit_log())
    assert records[0][0] == report["head_seq"] and records[-1][3] == "rotated"
    assert dev.console.checkpoint is None


def test_cloud_time_raises_the_floor_and_is_persisted(desk, alice):
    dev = device(desk)
    grant = issue(desk, alice, "viewer", hours=1)
    dev.port.run(dev.console.feed(core.TrustedTime(0, T0_S + 3600)))
    dev.port.run(dev.console.feed(core.TrustedTime(0, T0_S)))      # never lowers it
    dev.boot()
    assert dev.console.floor_s == T0_S + 3600
    assert refused_code(alice.session(dev, grant).open) == "expired"


def test_full_audit_log_refuses_new_sessions(desk, alice):
    bytes_max = auditlog.RESERVE_RECORDS * (auditlog.RECORD_BYTES_MAX + 6) + 1000
    dev = device(desk, bytes_max=bytes_max)
    grant = issue(desk, alice, "viewer")
    s = alice.session(dev, grant)
    s.open()
    for _ in range(100):
        try:
            s.run("status")
        except Refused as e:
            assert e.code == "audit_full"
            break
    assert kinds(dev)[-1] == "session_close"
    assert refused_code(alice.session(dev, grant).open) == "audit_full"
    for _ in range(20):             # failures past the bound are not written
        dev.receive(b"auth 00\n")
    assert len(dev.audit_log()) <= bytes_max


# ---------------------------------------------------------------- every state x input

FINAL = (b"ok", b"err", b"challenge", b"end")
LINES = [b"hello 00", b"auth 00", b"status", b"reboot", b"bye", b"", b"\xff", b"x" * 5000]


def _drive(desk, alice, state):
    dev = device(desk, bits_per_tick=64 if state == core.CHECKING else 256)
    grant = issue(desk, alice, "technician")
    s = alice.session(dev, grant)
    if state == core.CHECKING:
        dev.port.run(dev.console.feed(core.Line(b"hello " + grant.hex().encode(), 0, T0_S)))
    elif state == core.CHALLENGED:
        s.request("hello " + grant.hex())
    elif state == core.OPEN:
        s.open()
    elif state == core.LOCKED:
        for _ in range(core.FAILURES_MAX):
            dev.receive(b"auth 00\n")
    dev.outbox.clear()
    assert dev.console.state == state
    return dev


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([core.IDLE, core.CHALLENGED, core.CHECKING, core.OPEN, core.LOCKED]),
       st.lists(st.one_of(st.sampled_from(LINES), st.binary(max_size=80)), max_size=6),
       st.integers(0, 2 * core.LOCKOUT_MS))
def test_every_state_and_input_is_answered_by_one_line_never_a_crash(desk, alice, state, lines, ms):
    dev = _drive(desk, alice, state)
    for line in lines:
        if b"\n" in line:
            continue
        before = len(dev.outbox)
        checking = dev.console.busy()     # the driver finishes the check: one more reply
        dev.receive(line + b"\n")
        final = [x for x in dev.outbox[before:] if x.split(b" ")[0].strip() in FINAL]
        expected = (0 if core.parse_line(line)[1] == "empty" else 1) + (1 if checking else 0)
        assert len(final) == expected, (line, final)
        assert dev.console.state in core.STATES
    dev.advance(ms)
    assert not auditlog.check(dev.audit_log(), "d1")["tamper"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["rev", "cp", "rotate", "tick"]), st.integers(0, 400),
                          st.integers(0, 255)), max_size=8),
       st.sampled_from([8, 256]))
def test_hostile_cloud_messages_are_refused_and_recorded_never_raised(desk, alice, ops, bits):
    """Mutated revocation lists and checkpoints (a byte flipped, cut short),
    stepped or not, mixed with rotations and ticks: every one is refused and
    recorded, nothing is revoked, the log is never cut and stays sound."""
    good_list, good_cp = desk.revocation_list(), desk.checkpoint("d1", 0, b"\0" * 32)
    dev = device(desk, bits_per_tick=bits)
    log = dev.audit_log()
    for op, at, flip in ops:
        base = good_list if op == "rev" else good_cp
        at = at % len(base)
        message = base[:at] + bytes([base[at] ^ (flip or 1)]) + base[at + 1:] if flip else base[:at]
        if op == "rev":
            dev.port.run(dev.console.feed(core.Revocations(message, 0, T0_S)))
        elif op == "cp":
            dev.port.run(dev.console.feed(core.Checkpoint(message, 0, T0_S)))
        elif op == "rotate":
            dev.port.run(dev.console.feed(core.RotateLog(dev.audit_log(), 0, T0_S)))
        else:
            dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
    _tick_until_idle(dev)
    dev.port.run(dev.console.feed(core.RotateLog(dev.audit_log(), 0, T0_S)))
    assert dev.console.revoked == [] and dev.console.checkpoint is None
    assert dev.audit_log()[:len(log)] == log
    assert set(kinds(dev)) <= {"revocations_refused", "checkpoint_refused"}
    assert not auditlog.check(dev.audit_log(), "d1")["tamper"]


# ---------------------------------------------------------------- the line parser

@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_parse_line_never_raises(data):
    kind, verb, args = core.parse_line(data)
    assert kind in (core.HELLO, core.AUTH, core.COMMAND, core.BYE, core.BAD)


def test_parse_line_refuses_oversized_and_control_characters():
    assert core.parse_line(b"a" * (core.LINE_CHARS_MAX + 1))[:2] == (core.BAD, "too_long")
    assert core.parse_line(b"status\x1b[2J")[:2] == (core.BAD, "not_ascii")
    assert core.parse_line(b"set a b;rm")[:2] == (core.BAD, "bad_args")
    assert core.parse_line(b"status\r") == (core.COMMAND, "status", [])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=8), st.data())
def test_line_reader_gives_the_same_lines_whole_or_byte_at_a_time(chunks, data):
    stream = b"".join(chunks) + b"\n"
    whole = LineReader(limit=40).feed(stream)
    reader = LineReader(limit=40)
    split = []
    for i in range(len(stream)):
        split += reader.feed(stream[i:i + 1])
    assert whole == split
    assert all(len(line) <= 41 for line in whole)


def test_hostile_persisted_state_fails_closed(desk):
    dev = device(desk)
    dev.flash.write_atomic(core.STATE_FILE, b"\xa1\x61x\x01")
    dev.boot()
    assert dev.console.state == core.LOCKED
    dev.flash.write_atomic(core.STATE_FILE, cbor.dumps({"floor": 1, "rev_iat": 0, "revoked": [],
                                                        "failures": 0, "lockouts": 0, "locked": False}))
    dev.boot()
    assert dev.console.state == core.IDLE


def test_drill_refuses_every_attack_and_detects_tampering():
    result = run_drill(devices=4, seed=3, details=True)
    assert result["attacks_tried"] == 11 and result["attacks_refused"] == 11, result["attacks"]
    assert result["audit_chain_verified"] and result["tamper_detected"]
    assert result["sessions"] >= 8 and result["commands"] >= 28
