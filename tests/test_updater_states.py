"""agent.updater, every state x every event kind, with Hypothesis (the h2
habit): well-formed events, events with garbage fields, and things that are
not events at all, alone and in sequences. The one invariant: handle()
returns a list of the updater's actions and leaves a known state, or raises
the updater's own error (a TetherError) and then sits in "error", refusing
every further call. Never another exception.

Each state is entered the way a device enters it: a Booted event carrying a
boot-state record (no I/O, no signatures), so building one is cheap."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import manifest as mf
from agent import updater as up
from agent.errors import LocalError, TetherError
from cloud import firmware
from test_updater import CONFIG, NEW_BIN, NEW_BUNDLE, NOW_MS, OLD_BUNDLE, ROOT_PUB, chunks

MANIFEST = mf.verify_release(NEW_BUNDLE, ROOT_PUB, 2)
PARTS = chunks(NEW_BIN)
COUNT = MANIFEST.chunk_count()
# The same payload under a paged manifest (one page): the record of a
# download of it enters "paging" at boot.
PAGED = firmware.build_manifest(NEW_BIN, "sim-v1", "1.1.0", 2, MANIFEST.expires_s, "r", pages=True)
PAGE = firmware.chunk_table(NEW_BIN)
ACTIONS = (up.WriteSlot, up.WriteBootState, up.Reboot, up.Report, up.RequestChunk, up.ReadSlot,
           up.StepLater, up.RequestPage)
KNOWN = (up.OFF, up.IDLE, up.VERIFYING, up.RESUMING, up.DOWNLOADING, up.CHECKING, up.INSTALLED, up.TRIAL,
         up.CONFIRMED, up.ROLLED_BACK, up.REJECTED, up.REBOOTING, up.PAGING)


def record(phase, **fields):
    values = dict(active=0, sv=1, ksv=1, phase=phase, target=1, seq=5)
    if phase in (up.DOWNLOADING, up.VERIFIED, up.TRIAL):
        values.update(manifest=MANIFEST.encode(), trial_sv=2, trial_ksv=2)
    values.update(fields)
    return up.BootState(**values).encode()


# state -> (slot booted, record): the Booted event that enters it
ENTRIES = {
    up.IDLE: (0, record(up.IDLE)),
    up.RESUMING: (0, record(up.DOWNLOADING, cursor=0)),
    up.CHECKING: (0, record(up.DOWNLOADING, cursor=COUNT)),
    up.INSTALLED: (0, record(up.VERIFIED, cursor=COUNT)),
    up.TRIAL: (1, record(up.TRIAL)),
    up.CONFIRMED: (1, record(up.CONFIRMED, active=1)),
    up.ROLLED_BACK: (0, record(up.ROLLED_BACK, reason="trial_timeout")),
    up.REJECTED: (0, record(up.REJECTED, reason="expired")),
    up.REBOOTING: (1, record(up.IDLE)),
    up.PAGING: (0, record(up.DOWNLOADING, cursor=1, manifest=PAGED)),
}
STATES = [up.OFF, up.ERROR, up.VERIFYING, up.DOWNLOADING] + sorted(ENTRIES)


def machine(state):
    u = up.Updater(CONFIG)
    if state == up.ERROR:
        with pytest.raises(LocalError):
            u.handle(up.Tick(0))                     # nothing but Booted before boot
    elif state == up.VERIFYING:                      # in memory only: an offer being checked
        u.handle(up.Booted(*ENTRIES[up.IDLE]))
        assert u.handle(up.Offer(NEW_BUNDLE, NOW_MS, "rel-1")) == [up.StepLater()]
        u.handle(up.Step())
    elif state == up.DOWNLOADING:                    # resumed at 1: chunk 1 is not in the slot
        u.handle(up.Booted(0, record(up.DOWNLOADING, cursor=1)))
        assert u.handle(up.SlotRead(4096, b"")) == [up.RequestChunk(1)]
    elif state != up.OFF:
        slot, blob = ENTRIES[state]
        u.handle(up.Booted(slot, blob))
    assert u.state == state
    return u


garbage = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=5),
                    st.binary(max_size=8), st.floats(allow_nan=True), st.lists(st.integers(), max_size=2))
now_ms = st.one_of(st.sampled_from([0, NOW_MS, NOW_MS + 61000]), st.integers(0, 2 ** 64), garbage)
index = st.one_of(st.integers(-1, COUNT + 1), garbage)
chunk_data = st.one_of(st.sampled_from(PARTS), st.binary(max_size=64),
                       st.sampled_from(PARTS).map(lambda d: d[:-1] + bytes([d[-1] ^ 1])),
                       st.sampled_from(PARTS).map(memoryview), garbage)
blob = st.one_of(st.none(), st.sampled_from([b for _, b in ENTRIES.values()]), st.binary(max_size=40),
                 st.sampled_from([b for _, b in ENTRIES.values()]).map(lambda b: b[:-3]), garbage)

events = st.one_of(
    st.builds(up.Booted, st.one_of(st.integers(-1, 2), garbage), blob),
    st.builds(up.Offer, st.one_of(st.sampled_from([NEW_BUNDLE, OLD_BUNDLE]), st.binary(max_size=40),
                                  garbage), now_ms),
    st.builds(up.Chunk, index, chunk_data),
    st.builds(up.SlotRead, st.one_of(index.map(lambda i: i * 4096 if type(i) is int else i),
                                     garbage), chunk_data),
    st.builds(up.Page, st.one_of(st.integers(-1, 2), garbage),
              st.one_of(st.just(PAGE), st.binary(max_size=40), st.just(PAGE[:-1] + b"\0"), garbage)),
    st.builds(up.Healthy, st.one_of(st.integers(-1, 10), garbage), now_ms),
    st.builds(up.Tick, now_ms),
    st.builds(up.Cancel, st.one_of(st.sampled_from(["", "rel-1"]), garbage)),
    st.just(up.Step()),
    st.just(up.Resend()),
    garbage,                                          # not an event at all
    st.sampled_from([up.Reboot(), up.RequestChunk(0), up.RequestPage(0), up.StepLater(), object()]),
)


def check_step(u, event):
    """One handle() under the invariant; True while the machine is usable."""
    before = u.state
    try:
        actions = u.handle(event)
    except TetherError:
        assert u.state == up.ERROR, (before, event)
        with pytest.raises(LocalError) as info:
            u.handle(up.Tick(NOW_MS))
        assert info.value.code == "failed"
        return False
    assert before != up.ERROR
    assert isinstance(actions, list) and all(isinstance(a, ACTIONS) for a in actions)
    assert u.state in KNOWN, u.state
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(STATES), event=events)
def test_every_state_with_every_event(state, event):
    check_step(machine(state), event)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(STATES), sequence=st.lists(events, min_size=1, max_size=6))
def test_event_sequences_keep_the_invariant(state, sequence):
    u = machine(state)
    for event in sequence:
        if not check_step(u, event):
            break


@pytest.mark.parametrize("state", STATES)
def test_each_state_with_each_well_formed_event_kind(state):
    """The table, exhaustively: for each pair, which outcome (no Hypothesis)."""
    kinds = [up.Booted(0, None), up.Offer(b"x", NOW_MS), up.Chunk(1, PARTS[1]),
             up.SlotRead(0, PARTS[0]), up.Healthy(3, NOW_MS), up.Tick(NOW_MS), up.Cancel(""),
             up.Step(), up.Page(0, PAGE), up.Resend()]
    for event in kinds:
        u = machine(state)
        accepted = (state, type(event)) in up.TRANSITIONS
        ignored = state not in (up.OFF, up.ERROR) and type(event) in up._IGNORED
        if accepted or ignored:
            assert check_step(u, event), (state, event)
        else:
            with pytest.raises(LocalError):
                u.handle(event)
            assert u.state == up.ERROR


def test_bad_event_fields_are_the_drivers_bug_not_a_crash():
    u = machine(up.DOWNLOADING)
    with pytest.raises(LocalError) as info:
        u.handle(up.Chunk("1", PARTS[1]))
    assert info.value.code == "bad_event" and u.state == up.ERROR
    u = machine(up.OFF)
    with pytest.raises(LocalError) as info:
        u.handle(up.Booted(0, record(up.IDLE)[:-1]))
    assert info.value.code == "bad_boot_state" and u.state == up.ERROR
