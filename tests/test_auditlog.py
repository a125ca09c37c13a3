"""The console's hash-chained audit log (agent/auditlog.py): the cloud's
check finds edits, gaps, reordering and truncation; a power cut at any
write leaves a log that recovers to an intact chain, and no command runs
without its record on flash."""

import pytest
from hypothesis import given, settings, strategies as st

from agent import auditlog, journal
from board.sim import PowerCut, SimFlash
from cloud.support import SupportDesk, verify_checkpoint
from simulator.console_drill import (T0_S, SimConsoleDevice, Technician, drop_last_records,
                                     edit_record)


def make_log(n, device="d1"):
    chain = auditlog.AuditChain(device)
    return b"".join(chain.record(T0_S + i, "command", {"cmd": "status", "i": i}) for i in range(n))


def problems(data, device="d1", **anchor):
    report = auditlog.check(data, device, **anchor)
    return [p[0] for p in report["problems"]], report["tamper"]


def frames(data):
    return journal.scan(data)[0]


def test_an_untouched_chain_verifies():
    log = make_log(6)
    report = auditlog.check(log, "d1")
    assert (report["records"], report["head_seq"], report["problems"], report["tamper"]) == (6, 5, [], False)
    chain, repair = auditlog.recover("d1", log)
    assert repair is None and chain.seq == 6 and chain.head == report["head"]
    assert auditlog.check(log + chain.record(T0_S, "x", {}), "d1")["problems"] == []


def test_edit_with_checksum_recomputed_breaks_the_chain_at_the_next_record():
    kinds, tamper = problems(edit_record(make_log(6), 2))
    assert kinds == ["edit"] and tamper
    assert auditlog.check(edit_record(make_log(6), 2), "d1")["problems"][0][1] == 2


def test_edit_without_checksum_is_reported_not_read_as_a_torn_tail():
    log = bytearray(make_log(6))
    log[len(log) // 2] ^= 0x40
    assert problems(bytes(log)) == (["edit"], True)


def test_removed_record_is_a_gap_and_reordered_records_are_caught():
    bodies = frames(make_log(6))
    assert problems(b"".join(journal.frame(b) for b in bodies[:2] + bodies[3:])) == (["gap"], True)
    swapped = bodies[:2] + [bodies[3], bodies[2]] + bodies[4:]
    kinds, tamper = problems(b"".join(journal.frame(b) for b in swapped))
    assert tamper and "gap" in kinds and "reorder" in kinds


def test_head_removed_or_chain_from_another_device():
    bodies = frames(make_log(4))
    assert problems(b"".join(journal.frame(b) for b in bodies[1:])) == (["bad_start"], True)
    assert problems(make_log(4, "d2"), "d1") == (["bad_start"], True)    # as docs/console.md names it


def test_truncation_is_found_only_against_a_checkpoint():
    log = make_log(6)
    head = auditlog.check(log, "d1")["head"]
    short = drop_last_records(log, 2)
    assert problems(short) == ([], False)        # a hash chain alone cannot tell
    assert problems(short, anchor_seq=5, anchor_head=head) == (["truncated"], True)
    assert problems(log, anchor_seq=5, anchor_head=head) == ([], False)
    rewritten = edit_record(log, 5)               # the anchored record rewritten
    assert problems(rewritten, anchor_seq=5, anchor_head=head) == (["edit"], True)


def test_torn_tail_is_not_tampering_and_recovery_cuts_it():
    log = make_log(3)
    extra = make_log(4)[len(log):]
    torn = log + extra[:len(extra) // 2]
    assert problems(torn) == (["torn_tail"], False)
    chain, repair = auditlog.recover("d1", torn)
    assert repair == log and chain.seq == 3


def test_cloud_checkpoints_anchor_later_uploads(tmp_path):
    desk = SupportDesk(str(tmp_path), clock_s=lambda: T0_S)
    log = make_log(5)
    assert desk.verify_log("d1", log)["checkpoint_seq"] == -1
    row = desk._db.execute("SELECT seq, message FROM audit_checkpoints").fetchone()
    assert row[0] == 4 and verify_checkpoint(row[1], desk.keys())["seq"] == 4
    assert desk.verify_log("d1", drop_last_records(log, 1))["tamper"]
    longer = log + auditlog.recover("d1", log)[0].record(T0_S, "x", {})
    report = desk.verify_log("d1", longer)
    assert not report["tamper"] and report["checkpoint_seq"] == 4
    desk.close()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_hostile_logs_never_raise(data):
    report = auditlog.check(data, "d1", anchor_seq=3, anchor_head=b"\0" * 32)
    assert isinstance(report["problems"], list)
    chain, repair = auditlog.recover("d1", data)
    assert chain.seq >= 0


# ---------------------------------------------------------------- power cuts

@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    desk = SupportDesk(str(tmp_path_factory.mktemp("support")), clock_s=lambda: T0_S)
    yield desk
    desk.close()


def script(desk, tech):
    grant = desk.grant(tech.name, tech.point, "technician", ["d1"], requested_by="alice",
                       approved_by="bob", reason="power")[1]
    return [b"status\n", b"hello " + grant.hex().encode() + b"\n", b"auth " + b"00" * 64 + b"\n",
            b"hello " + grant.hex().encode() + b"\n", "ANSWER", b"status\n", b"set mode eco\n",
            b"reboot\n", b"bye\n"]


def run_script(dev, lines, tech, grant_gid):
    from cloud.console_tool import answer
    for line in lines:
        if line == "ANSWER":
            words = dev.outbox[-1].split()
            sig = answer(tech.key, bytes.fromhex(words[1].decode()), grant_gid, words[2].decode())
            line = b"auth " + sig.hex().encode() + b"\n"
        dev.receive(line)


def test_power_cut_at_every_write_leaves_an_intact_recoverable_chain(desk):
    from cloud.console_tool import gid_of
    tech = Technician("alice")
    lines = script(desk, tech)
    gid = gid_of(bytes.fromhex(lines[1].split()[1].decode()))
    whole = SimConsoleDevice("d1", desk.keys(), 5)
    run_script(whole, lines, tech, gid)
    writes = whole.flash.writes
    full_kinds = [r[3] for r in auditlog.records(whole.audit_log())]
    assert writes > 10 and "command" in full_kinds
    for cut in range(1, writes + 1):
        flash = SimFlash(cut_at_write=cut)
        dev = SimConsoleDevice("d1", desk.keys(), 5, flash=flash)
        with pytest.raises(PowerCut):
            run_script(dev, lines, tech, gid)
        ran = list(dev.commands.executed)
        flash.power_on()
        dev.boot()                                   # recovery repairs a torn tail
        log = dev.audit_log()
        report = auditlog.check(log, "d1")
        assert report["problems"] == [], (cut, report)
        kinds = [r[3] for r in auditlog.records(log)]
        assert kinds == full_kinds[:len(kinds)], cut
        # every command that ran has its record on flash (written before it ran)
        assert len(ran) <= kinds.count("command"), cut
        # and the chain continues cleanly after the reboot
        dev.receive(b"status\n")
        assert not auditlog.check(dev.audit_log(), "d1")["problems"], cut


# ---------------------------------------------------------------- rotation

def _session(dev, desk, tech, commands=("status", "net")):
    grant = desk.grant(tech.name, tech.point, "viewer", [dev.device_id], requested_by="alice",
                       approved_by="bob", reason="rotation")[1]
    s = tech.session(dev, grant)
    s.open()
    for command in commands:
        s.run(command)
    s.close()


def _checkpoint(dev, message):
    from agent import console as core
    dev.port.run(dev.console.feed(core.Checkpoint(message, 0, T0_S)))
    dev.port.run(dev.console.feed(core.RotateLog(dev.audit_log(), 0, T0_S)))


def test_a_cloud_checkpoint_lets_the_device_rotate_and_the_chain_still_verifies(desk):
    tech = Technician("alice")
    dev = SimConsoleDevice("rot-1", desk.keys(), 3)
    _session(dev, desk, tech)
    report = desk.verify_log("rot-1", dev.audit_log())
    before = len(dev.audit_log())
    _checkpoint(dev, report["checkpoint"])
    records = auditlog.records(dev.audit_log())
    assert len(dev.audit_log()) < before
    assert records[0][0] == report["head_seq"] and records[-1][3] == "rotated"
    _session(dev, desk, tech)
    dev.boot()                                       # recovery continues a rotated log
    _session(dev, desk, tech)
    again = desk.verify_log("rot-1", dev.audit_log())
    assert again["problems"] == [] and again["head_seq"] > report["head_seq"]
    # dropping records of a rotated log is still caught
    assert desk.verify_log("rot-1", drop_last_records(dev.audit_log(), 1), record=False)["tamper"]
    bodies = frames(dev.audit_log())
    cut_head = b"".join(journal.frame(b) for b in bodies[2:])   # starts at no checkpoint
    assert "bad_start" in [p[0] for p in desk.verify_log("rot-1", cut_head, record=False)["problems"]]


def test_forged_or_foreign_checkpoints_are_refused(desk, tmp_path):
    tech = Technician("alice")
    dev = SimConsoleDevice("rot-2", desk.keys(), 3)
    _session(dev, desk, tech)
    rogue = SupportDesk(str(tmp_path / "rogue"), clock_s=lambda: T0_S)
    forged = rogue.checkpoint("rot-2", 3, auditlog.check(dev.audit_log(), "rot-2")["head"])
    rogue.close()
    foreign = desk.checkpoint("rot-9", 3, b"\0" * 32)
    stale = desk.checkpoint("rot-2", 3, b"\0" * 32)          # hash of no record here
    for message, code in ((forged, "unknown_kid"), (foreign, "wrong_device"), (stale, "mismatch")):
        log = dev.audit_log()
        _checkpoint(dev, message)
        assert dev.audit_log()[:len(log)] == log              # nothing dropped
        assert auditlog.records(dev.audit_log())[-1][4]["code"] == code


def test_a_full_log_opens_again_after_rotation(desk):
    tech = Technician("alice")
    bytes_max = auditlog.RESERVE_RECORDS * (auditlog.RECORD_BYTES_MAX + 6) + 1200
    dev = SimConsoleDevice("rot-3", desk.keys(), 3, bytes_max=bytes_max)
    while not dev.console.chain.full():
        _session(dev, desk, tech, ("status",))
    from cloud.console_tool import Refused
    with pytest.raises(Refused):
        _session(dev, desk, tech)
    _checkpoint(dev, desk.verify_log("rot-3", dev.audit_log())["checkpoint"])
    _session(dev, desk, tech)
    assert not desk.verify_log("rot-3", dev.audit_log())["tamper"]


def test_power_cut_during_rotation_leaves_old_or_new_log(desk):
    tech = Technician("alice")
    for cut in (1, 2):
        dev = SimConsoleDevice("rot-4", desk.keys(), 3)
        _session(dev, desk, tech)
        report = desk.verify_log("rot-4", dev.audit_log(), record=False)
        message = desk.checkpoint("rot-4", report["head_seq"], report["head"])
        dev.flash.power_on(cut_at_write=cut)
        with pytest.raises(PowerCut):
            _checkpoint(dev, message)
        dev.flash.power_on()
        dev.boot()
        first = auditlog.records(dev.audit_log())[0][0]
        assert first in (0, report["head_seq"]), cut
        start = (report["head_seq"], report["head"]) if first else (-1, None)
        assert auditlog.check(dev.audit_log(), "rot-4", -1, None, *start)["problems"] == [], cut
