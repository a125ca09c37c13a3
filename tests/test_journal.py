"""The queue's on-flash format: torn tails and corruption are cut, never
misread; unknown frames are skipped; hostile bytes never raise."""

from hypothesis import given, settings, strategies as st

from agent import journal

OPS = [journal.add(0, 0, 0, b"one"), journal.add(0, 1, 0, b"two"), journal.remove(0, 0),
       journal.add(1, 0, 1, b"drop"), journal.update(1, 0, 1, b"drop2"),
       journal.drop(0, 1, 1, 0, 1, b"drop3"), journal.epoch_mark(7), journal.sent(1, 0)]
STATES = [  # live entries after each prefix of OPS
    [],
    [[0, 0, 0, b"one"]],
    [[0, 0, 0, b"one"], [0, 1, 0, b"two"]],
    [[0, 1, 0, b"two"]],
    [[0, 1, 0, b"two"], [1, 0, 1, b"drop"]],
    [[0, 1, 0, b"two"], [1, 0, 1, b"drop2"]],
    [[1, 0, 1, b"drop3"]],
    [[1, 0, 1, b"drop3"]],
    [[1, 0, 3, b"drop3"]],
]


def test_replay_applies_every_frame_kind_in_order():
    entries, damaged, epoch = journal.replay(b"".join(OPS))
    assert entries == STATES[-1] and not damaged and epoch == 7


def test_every_truncation_replays_the_last_whole_frame_and_says_so():
    data = b"".join(OPS)
    ends = [len(b"".join(OPS[:k])) for k in range(len(OPS) + 1)]
    for n in range(len(data) + 1):
        whole = max(k for k in range(len(ends)) if ends[k] <= n)
        entries, damaged, _ = journal.replay(data[:n])
        assert entries == STATES[whole], n
        assert damaged == (n != ends[whole]), n


def test_flipped_bit_cuts_the_log_at_that_frame():
    data = bytearray(b"".join(OPS))
    at = len(OPS[0]) + 8  # inside the second frame
    data[at] ^= 0x01
    entries, damaged, _ = journal.replay(bytes(data))
    assert damaged and entries == STATES[1]


def test_unknown_frame_kind_is_skipped_not_fatal():
    future = journal.frame(b"Z" + b"\0" * 12)
    entries, damaged, _ = journal.replay(OPS[0] + future + OPS[1])
    assert damaged and entries == STATES[2]


def test_compact_round_trips_with_the_epoch():
    entries, _, _ = journal.replay(b"".join(OPS))
    assert journal.replay(journal.compact(entries, 9)) == (entries, False, 9)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_never_raise(data):
    entries, damaged, epoch = journal.replay(data)
    assert isinstance(entries, list) and epoch >= -1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("AURX"), st.integers(0, 3), st.integers(0, 3),
                          st.binary(max_size=20)), max_size=20), st.data())
def test_valid_logs_fed_any_prefix_keep_keys_unique(ops, data):
    log = b""
    for kind, e, s, payload in ops:
        if kind == "A":
            log += journal.add(e, s, 0, payload)
        elif kind == "U":
            log += journal.update(e, s, 0, payload)
        elif kind == "X":
            log += journal.drop(e, s, e + 1, s, 1, payload)
        else:
            log += journal.remove(e, s)
    n = data.draw(st.integers(0, len(log)))
    entries, _, _ = journal.replay(log[:n])
    assert len({(x[0], x[1]) for x in entries}) == len(entries)
