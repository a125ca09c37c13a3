"""Grant verification on real MicroPython (the WebAssembly port, tests/mpy.py)
in a HEAP_KB heap: a good grant is accepted with its fields, and an expired
one, one for another device, and one whose role was edited under the
signature are refused with their codes. The signature runs as
agent.p256.Verifier steps of BITS_PER_STEP bits (this port collects garbage
only between top-level runs), so every step must fit the budget.

A second test runs the whole console (agent/console.py with its audit
chain, agent/auditlog.py) on MicroPython: hello, the answer, a viewer
command, a refused technician command, bye, and the chain checked, with
both signature checks stepped by Ticks. Its budget is CONSOLE_HEAP_KB:
importing these modules from source (MicroPython compiles them on the
device) needs more than 64 KiB; frozen or .mpy modules would need less
(not measured here)."""

from cloud import firmware
from cloud.console_tool import answer
from cloud.support import cose_key, sign_grant
from mpy import require_micropython, run_micropython_report
from simulator.console_drill import edit_grant

HEAP_KB = 64
BITS_PER_STEP = 4
CONSOLE_HEAP_KB = 128     # compiling console.py's source on the device needs more than 64
NOW = 1_800_000_000

SUPPORT = firmware.generate_key()
TECH = firmware.generate_key()
KID = firmware.kid_of(SUPPORT)


def make(changes=None):
    claims = {1: "tether-support", 2: "alice", 4: NOW + 3600, 5: NOW - 60, 6: NOW - 60,
              7: bytes(range(16)), 8: {1: cose_key(firmware.public_bytes(TECH))},
              "role": "viewer", "devices": ["dev-1"]}
    claims.update(changes or {})
    return sign_grant(claims, SUPPORT)


SETUP = r'''
import binascii
from agent import grant
KEYS = {binascii.unhexlify(%r): binascii.unhexlify(%r)}
MESSAGES = [binascii.unhexlify(x) for x in %r]
'''

CHECK = r'''
try:
    g = grant.finish(g, verifier, %r, None, %d)
    print("ok", g.technician, g.role, g.exp)
except grant.GrantError as e:
    print("refused", e.code)
g = verifier = None
'''


def steps_for(index, device, now):
    return (["g, verifier = grant.start(MESSAGES[%d], KEYS)" % index]
            + ["verifier.step(%d)" % BITS_PER_STEP] * (256 // BITS_PER_STEP)
            + [CHECK % (device, now)])


def test_grant_verification_on_micropython_within_64_kib():
    require_micropython()
    messages = [make(), make({4: NOW - 1, 5: NOW - 3600}), make({"devices": ["dev-2"]}),
                edit_grant(make(), role="admin")]
    setup = SETUP % (KID.hex(), firmware.public_bytes(SUPPORT).hex(), [m.hex() for m in messages])
    steps = []
    for index in range(len(messages)):
        steps += steps_for(index, "dev-1", NOW)
    report = run_micropython_report(setup, heap_kb=HEAP_KB, modules=("agent",), timeout_s=180,
                                    steps=steps)
    assert report["stdout"].split("\n")[:4] == [
        "ok alice viewer %d" % (NOW + 3600), "refused expired", "refused wrong_device",
        "refused bad_signature"], report["stdout"]
    print("\nMicroPython grant verification: 4 grants, %d steps, %.0f ms; heap peak %d bytes "
          "(budget %d)" % (len(steps) + 1, report["elapsed_ms"], report["heap_peak_bytes"],
                           HEAP_KB * 1024))


CONSOLE = r"""
import binascii
from agent import console, auditlog
KEYS = {binascii.unhexlify(%r): binascii.unhexlify(%r)}
GRANT = %r
chain = auditlog.AuditChain("dev-1")
c = console.Console("dev-1", None, KEYS, chain, lambda n: bytes(range(n)), None, %d)
log = bytearray()
out = []
def run(actions):
    for a in actions:
        name = type(a).__name__
        if name == "Append":
            log.extend(a.data)
        elif name == "Send":
            out.append(a.line)
        elif name == "Execute":
            run(c.finished(a.command, ["ran " + a.command]))
def feed(line):
    run(c.feed(console.Line(line, 1000, %d)))
def tick():
    run(c.feed(console.Tick(1000, %d)))
def show():
    global out
    print("|".join(out))
    out = []
"""


def test_console_handshake_runs_on_micropython_within_128_kib():
    """The whole console (agent/console.py, agent/auditlog.py) on MicroPython:
    both signature checks stepped by Ticks of BITS_PER_STEP bits."""
    require_micropython()
    message = make()
    nonce = bytes(range(16))
    signature = answer(TECH, nonce, bytes(range(16)), "dev-1")
    setup = CONSOLE % (KID.hex(), firmware.public_bytes(SUPPORT).hex(), "hello " + message.hex(),
                       BITS_PER_STEP, NOW, NOW)
    ticks = ["tick()"] * (256 // BITS_PER_STEP - 1)
    steps = (["feed(GRANT.encode())"] + ticks + ["show()", "feed(b'auth %s')" % signature.hex()]
             + ticks + ["show()", "feed(b'status')\nshow()", "feed(b'reboot')\nshow()",
                        "feed(b'bye')\nshow()",
                        "r = auditlog.check(bytes(log), 'dev-1')\nprint(r['records'], r['tamper'])"])
    report = run_micropython_report(setup, heap_kb=CONSOLE_HEAP_KB, modules=("agent",),
                                    timeout_s=180, steps=steps)
    lines = report["stdout"].strip().split("\n")
    assert lines == ["challenge %s dev-1" % nonce.hex(), "ok session viewer alice 3600",
                     "- ran status|ok", "err forbidden reboot needs role technician, grant has viewer",
                     "ok bye", "5 False"], report["stdout"]
    print("\nMicroPython console handshake: %d steps, %.0f ms; heap peak %d bytes (budget %d)"
          % (len(steps) + 1, report["elapsed_ms"], report["heap_peak_bytes"], CONSOLE_HEAP_KB * 1024))
