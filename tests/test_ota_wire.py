"""The firmware-update message format (agent/ota_wire.py) is portable: the
same bytes and the same refusals on real MicroPython as on CPython, and
the statuses it accepts are exactly the ones the rollout engine counts."""

import subprocess
import sys

from cloud import rollout_plan

from mpy import REPO, require_micropython, run_micropython

SCRIPT = r"""
from agent import ota_wire as w
out = []
out.append(w.encode("hello", hw="sim-v1", ver="1.0.0", site="plant-1").hex())
out.append(w.encode("report", st="confirmed", why="", seq=7, ref="rel-2").hex())
out.append(w.encode("chunk", ref="rel-2", i=3).hex())
op, f = w.parse(w.encode("chunk", ref="rel-2", i=3, data=b"x" * 4096), w.DOWN, w.DOWN_BYTES_MAX)
out.append(op + " " + f["ref"] + " %d %d" % (f["i"], len(f["data"])))
for bad in (b"", b"\xff", b"\xa0", w.encode("hello", hw="sim v1", ver="1", site="s"),
            w.encode("report", st="bricked", why="", seq=1, ref=""), w.encode("chunk", ref="r", i=-1),
            w.encode("offer", ref="r", bundle=b"b", extra=1), b"\x00" * 600):
    try:
        w.parse(bad, w.UP, w.UP_BYTES_MAX)
        out.append("accepted")
    except w.WireError as e:
        out.append(e.code)
print("\n".join(out))
"""


def test_statuses_are_the_rollout_engines():
    from agent import ota_wire
    assert set(ota_wire.STATUSES) == set(rollout_plan.REPORTS)


def test_the_format_is_byte_identical_on_micropython():
    require_micropython()
    cpython = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(REPO), capture_output=True, text=True,
                             check=True).stdout
    lines = cpython.strip().splitlines()
    assert lines[3] == "chunk rel-2 3 4096"
    # empty, not CBOR, an empty map (no version), a space in a name, an unknown
    # status, a negative index, an op devices may not send, oversized
    assert lines[4:] == ["not_cbor", "not_cbor", "bad_version", "bad_field", "bad_field", "bad_field",
                         "unknown_op", "too_big"]
    # one step, garbage included (this port collects only between steps), within 128 KiB
    assert run_micropython(SCRIPT, heap_kb=128).strip() == cpython.strip()
