"""The simulated flash is the one fake in the suite, so it is tested for the
failure modes it claims: a cut append leaves a prefix, a cut atomic write
leaves old or new whole, space is accounted exactly, and a dead flash
refuses use until power comes back."""

import pytest
from hypothesis import given, settings, strategies as st

from board.sim import PowerCut, SimFlash

OPS = st.lists(st.tuples(st.sampled_from(["append", "atomic", "remove"]), st.sampled_from(["a", "b"]),
                         st.binary(max_size=40)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 40), st.integers(0, 2 ** 16))
def test_cut_writes_leave_prefix_or_old_or_new_and_space_adds_up(ops, cut, seed):
    import random
    flash = SimFlash(rng=random.Random(seed), cut_at_write=cut)
    model = {}
    for kind, name, data in ops:
        before = model.get(name)
        try:
            if kind == "append":
                flash.append(name, data)
                model[name] = (before or b"") + data
            elif kind == "atomic":
                flash.write_atomic(name, data)
                model[name] = data
            else:
                flash.remove(name)
                model.pop(name, None)
        except PowerCut:
            after = flash.files.get(name)
            after = None if after is None else bytes(after)
            if kind == "append":
                old = before or b""
                got = after or b""
                assert got[:len(old)] == old and got == old + data[:len(got) - len(old)]
            elif kind == "atomic":
                assert after in (before, data)
            else:
                assert after in (before, None)
            with pytest.raises(PowerCut):
                flash.read(name)
            flash.power_on()
            model[name] = after
            if after is None:
                model.pop(name)
        assert flash.used_bytes() == sum(len(v) for v in flash.files.values())
    assert {k: bytes(v) for k, v in flash.files.items()} == model


def test_full_flash_refuses_the_write():
    flash = SimFlash(capacity_bytes=10)
    flash.append("a", b"12345678")
    with pytest.raises(OSError):
        flash.append("a", b"123")
    assert flash.read("a") == b"12345678"
