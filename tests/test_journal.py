"""The queue's on-flash format: torn tails and corruption are cut, never
misread; hostile bytes give a JournalError or a clean prefix."""

from hypothesis import given, settings, strategies as st

from agent import journal
from agent.errors import JournalError


def sample_journal():
    return (journal.add(0, 0, 0, b"one") + journal.add(0, 1, 0, b"two")
            + journal.remove(0, 0) + journal.add(1, 0, 1, b"drop")
            + journal.update(1, 0, 1, b"drop2"))


def test_replay_applies_add_update_remove_in_order():
    entries, torn = journal.replay(sample_journal())
    assert entries == [[0, 1, 0, b"two"], [1, 0, 1, b"drop2"]]
    assert not torn


def test_every_truncation_gives_a_prefix_and_reports_the_tear():
    data = sample_journal()
    cuts = [len(b"".join(f)) for f in []]
    whole_frame_ends = []
    pos = 0
    bodies, _ = journal.scan(data)
    for b in bodies:
        pos += journal.HEADER_LEN + len(b)
        whole_frame_ends.append(pos)
    for n in range(len(data) + 1):
        entries, torn = journal.replay(data[:n])
        assert torn == (n not in whole_frame_ends and n != 0)
    assert cuts == []


def test_flipped_bit_cuts_the_log_at_that_frame():
    data = bytearray(sample_journal())
    data[20] ^= 0x01
    entries, torn = journal.replay(bytes(data))
    assert torn
    assert len(entries) <= 1


def test_compact_round_trips():
    entries, _ = journal.replay(sample_journal())
    assert journal.replay(journal.compact(entries)) == (entries, False)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_replay_or_raise_journal_error(data):
    try:
        entries, torn = journal.replay(data)
    except JournalError:
        return
    assert isinstance(entries, list)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("AUR"), st.integers(0, 3), st.integers(0, 3),
                          st.binary(max_size=20)), max_size=20), st.data())
def test_valid_logs_fed_any_prefix_never_raise(ops, data):
    log = b""
    for kind, e, s, payload in ops:
        if kind == "A":
            log += journal.add(e, s, 0, payload)
        elif kind == "U":
            log += journal.update(e, s, 0, payload)
        else:
            log += journal.remove(e, s)
    n = data.draw(st.integers(0, len(log)))
    entries, _ = journal.replay(log[:n])
    assert len({(x[0], x[1]) for x in entries}) == len(entries)
