"""Review of the change that steps the console's checks of the cloud's
signed messages (revocation lists, audit checkpoints) over Ticks.

Each test is a scenario on the real console (agent/console.py) behind the
real board driver (simulator/console_drill.SimConsoleDevice), with lists and
grants signed by the real support desk (cloud/support.py). Each failed on
the code under review because of the defect it names (they were
xfail(strict=True) until fixed): lists that come during a check now wait
their turn instead of replacing it; the cloud never signs two different
lists with one iat and the device refuses a list as old as the applied one
with other ids; the answer's check is followed by the grant's policy check
again (revocation, expiry) before a session opens.

Checked and found sound (no test): a checkpoint for another device, with a
bad signature or cut short is refused and recorded, and never cuts the log;
an older checkpoint than the one held is ignored; a held checkpoint is only
used at RotateLog, on the log handed then (records appended between its
check and the rotation are kept); the uploader neither loses a checkpoint
nor loops (it feeds one only when none is being checked); pending checks
are stepped in every state (locked, challenged, open) and end, so busy()
falls back; nothing pending is persisted, and a reboot drops it (the cloud
sends the list again at the next sync, the checkpoint with the next sync or
ack); no exception escapes feed() for hostile messages.
"""

import pytest

from agent import auditlog
from agent import console as core
from cloud.console_tool import Refused, answer, gid_of
from cloud.support import SupportDesk
from simulator.console_drill import T0_S, SimConsoleDevice, Technician
from test_audit_upload import Clock      # starts at its T0_S, the same as console_drill's


@pytest.fixture
def desk(tmp_path):
    clock = Clock()
    desk = SupportDesk(str(tmp_path / "support"), clock_s=clock)
    desk.test_clock = clock
    yield desk
    desk.close()


@pytest.fixture(scope="module")
def alice():
    return Technician("alice")


def issue(desk, tech, role="technician", devices=("d1",)):
    return desk.grant(tech.name, tech.point, role, list(devices), requested_by=tech.name,
                      approved_by="bob", reason="review")[1]


def device(desk, **kw):
    return SimConsoleDevice("d1", desk.keys(), seed=7, **kw)


def kinds(dev):
    return [r[3] for r in auditlog.records(dev.audit_log())]


def tick_until_idle(dev, limit=1000):
    for _ in range(limit):
        if not dev.console.busy():
            return
        dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
    raise AssertionError("the console stayed busy")


def refused_code(fn):
    with pytest.raises(Refused) as e:
        fn()
    return e.value.code


def two_lists(desk, grant):
    """(old, new): a list from before `grant` was revoked, and one after."""
    old = desk.revocation_list()
    desk.revoke(gid_of(grant).hex(), "bob", "left the company")
    desk.test_clock.now_s = T0_S + 10
    new = desk.revocation_list()
    return old, new


# ---------------------------------------------------------------- one pending list, replaced blindly

def test_a_replayed_older_list_while_a_newer_is_checked_does_not_unrevoke(desk, alice):
    grant = issue(desk, alice)
    old, new = two_lists(desk, grant)

    # Unstepped (bits_per_tick 256): the newer list wins, the replay is stale.
    whole = device(desk)
    for message in (new, old):
        whole.port.run(whole.console.feed(core.Revocations(message, 0, T0_S)))
    assert gid_of(grant) in whole.console.revoked
    assert kinds(whole) == ["revocations", "revocations_refused"]

    # Stepped as on a small board: the newer list is being checked when an
    # attacker on the path (or a broker redelivering an old QoS 1 push)
    # replays the older one.
    dev = device(desk, bits_per_tick=8)
    dev.port.run(dev.console.feed(core.Revocations(new, 0, T0_S)))
    dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
    dev.port.run(dev.console.feed(core.Revocations(old, 0, T0_S)))
    tick_until_idle(dev)
    assert gid_of(grant) in dev.console.revoked, "the revoked grant is usable again"
    assert dev.console.revocations_iat == T0_S + 10
    assert refused_code(alice.session(dev, grant).open) == "revoked"


def test_a_forged_list_while_a_genuine_one_is_checked_does_not_cancel_it(desk, alice):
    grant = issue(desk, alice)
    _, genuine = two_lists(desk, grant)
    forged = genuine[:-1] + bytes([genuine[-1] ^ 1])        # well-formed, wrong signature

    whole = device(desk)
    for message in (genuine, forged):
        whole.port.run(whole.console.feed(core.Revocations(message, 0, T0_S)))
    assert gid_of(grant) in whole.console.revoked

    dev = device(desk, bits_per_tick=8)
    dev.port.run(dev.console.feed(core.Revocations(genuine, 0, T0_S)))
    dev.port.run(dev.console.feed(core.Tick(0, T0_S)))
    dev.port.run(dev.console.feed(core.Revocations(forged, 0, T0_S)))
    tick_until_idle(dev)
    assert "revocations_refused" in kinds(dev)                # the forgery is recorded...
    assert gid_of(grant) in dev.console.revoked               # ...and the genuine list still applies
    assert refused_code(alice.session(dev, grant).open) == "revoked"


# ---------------------------------------------------------------- anti-replay by iat (left by the change)

def test_a_replayed_list_of_the_same_second_does_not_unrevoke(desk, alice):
    first, second = issue(desk, alice), issue(desk, alice)
    desk.revoke(gid_of(first).hex(), "bob", "x")
    earlier = desk.revocation_list()                 # [first], iat T0
    desk.revoke(gid_of(second).hex(), "bob", "y")
    later = desk.revocation_list()                   # [first, second], iat T0 as well
    for bits in (256, 8):
        dev = device(desk, bits_per_tick=bits)
        for message in (later, earlier):             # the earlier one replayed after
            dev.port.run(dev.console.feed(core.Revocations(message, 0, T0_S)))
            tick_until_idle(dev)
        assert gid_of(second) in dev.console.revoked, "bits %d: the second grant is un-revoked" % bits
        assert refused_code(alice.session(dev, second).open) == "revoked"


# ---------------------------------------------------------------- a list applied during the answer's check

def test_a_grant_revoked_while_its_challenge_is_out_opens_no_session(desk, alice):
    grant = issue(desk, alice)
    _, revoking = two_lists(desk, grant)
    dev = device(desk, bits_per_tick=8)
    s = alice.session(dev, grant)
    nonce, device_id = s.request("hello " + grant.hex())[-1].split()[1:]
    assert dev.console.state == core.CHALLENGED
    dev.port.run(dev.console.feed(core.Revocations(revoking, 0, T0_S)))
    tick_until_idle(dev)                              # the list is applied while challenged
    assert gid_of(grant) in dev.console.revoked and dev.console.state == core.CHALLENGED
    good = answer(alice.key, bytes.fromhex(nonce), gid_of(grant), device_id)
    with pytest.raises(Refused):                     # no "ok session" for a revoked grant
        s.auth(good)
    assert "session_open" not in kinds(dev) and dev.console.state != core.OPEN
