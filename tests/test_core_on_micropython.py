"""The telemetry core runs on real MicroPython (WebAssembly port, heap budget
128 KiB) through a seeded scenario: offline spell with a full queue, declared
drops, reboots with a torn journal tail, acknowledgements. Every payload it
publishes and every byte it writes to flash must be identical to CPython's
run of the same scenario, which in turn must match cbor2's encoding."""

import hashlib

import cbor2

from mpy import require_micropython, run_micropython_report

# Portable: runs unchanged on CPython and MicroPython. Prints one line per
# published payload, then a digest of the flash contents.
SCENARIO_SETUP = r'''
import hashlib, binascii
from agent import cbor, events, telemetry
from agent.actions import Append, Connect, Publish, WriteAtomic

class Rng:
    def __init__(self, seed):
        self.x = seed
    def randint(self, a, b):
        self.x = (self.x * 1103515245 + 12345) & 0x7FFFFFFF
        return a + self.x % (b - a + 1)

class Codec:
    dumps = staticmethod(cbor.dumps)
    loads = staticmethod(cbor.loads)

flash = {}
rng = Rng(7)
now = [1800000000000]
inflight = []
online = [False]
core = [None]

def run(actions):
    for a in actions:
        if isinstance(a, Append):
            flash[a.name] = flash.get(a.name, b"") + a.data
        elif isinstance(a, WriteAtomic):
            flash[a.name] = a.data
        elif isinstance(a, Connect):
            if online[0]:
                run(core[0].handle(events.Connected(now[0])))
            else:
                run(core[0].handle(events.ConnectionLost(now[0], "down")))
        elif isinstance(a, Publish):
            print("P", binascii.hexlify(a.payload).decode())
            inflight.append(a.token)

def boot():
    core[0] = telemetry.Telemetry("acme", "dev-7", Codec, rng, telemetry.Config(capacity=6, inflight_max=3))
    del inflight[:]
    run(core[0].boot(flash.get("state"), flash.get("queue")))

def second(k):
    now[0] += 1000 + rng.randint(0, 50)
    run(core[0].handle(events.Tick(now[0])))
    r = {"temp_c": (rng.randint(0, 400) - 100) / 8, "rssi_dbm": -rng.randint(30, 90), "n": k}
    run(core[0].handle(events.Sample(now[0], r)))
    if online[0] and core[0].state == telemetry.ONLINE:
        for _ in range(rng.randint(0, 3)):
            if inflight:
                run(core[0].handle(events.PubAcked(inflight.pop(0))))

def lose():
    del inflight[:]
    if core[0].state != telemetry.OFFLINE:
        run(core[0].handle(events.ConnectionLost(now[0], "cut")))

def digest():
    names = sorted(flash)
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(flash[n])
    print("F", binascii.hexlify(h.digest()).decode())

boot()
'''

STEPS = (
    ["online[0] = True"] + ["second(%d)" % k for k in range(12)]
    + ["online[0] = False", "lose()"] + ["second(%d)" % k for k in range(12, 30)]
    + ["flash['queue'] = flash['queue'] + b'\\x05\\x00\\x01'", "boot()"]
    + ["second(%d)" % k for k in range(30, 36)]
    + ["online[0] = True", "now[0] += 40000"] + ["second(%d)" % k for k in range(36, 70)]
    + ["boot()"] + ["now[0] += 40000"] + ["second(%d)" % k for k in range(70, 90)]
    + ["digest()"]
)


def run_on_cpython():
    import contextlib
    import io
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(SCENARIO_SETUP, scope)
        for step in STEPS:
            exec(step, scope)
    return out.getvalue()


def test_scenario_is_byte_identical_on_micropython_and_cpython():
    require_micropython()
    expected = run_on_cpython()
    report = run_micropython_report(SCENARIO_SETUP, heap_kb=128, steps=STEPS, timeout_s=120)
    got = report["stdout"]
    payloads = [line for line in expected.splitlines() if line.startswith("P ")]
    assert len(payloads) > 60
    drops = [cbor2.loads(bytes.fromhex(p[2:])) for p in payloads]
    assert any(d["k"] == "drop" for d in drops), "the scenario must exercise declared drops"
    assert len({d["e"] for d in drops}) >= 3, "the scenario must span reboots"
    for p in payloads:
        raw = bytes.fromhex(p[2:])
        assert raw == cbor2.dumps(cbor2.loads(raw), canonical=True)
    assert got.splitlines() == expected.splitlines()
    assert hashlib.sha256(got.encode()).hexdigest() == hashlib.sha256(expected.encode()).hexdigest()
