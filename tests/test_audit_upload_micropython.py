"""The audit uploader (agent/audit_upload.py) with the console
(agent/console.py) on real MicroPython (the WebAssembly port, tests/mpy.py),
and the same script on CPython: the bytes published and written must be
identical. The script: boot on a log of records, hello, a sync from the
cloud carrying a signed revocation list and a signed checkpoint, segments
and acks, the rotation the checkpoint allows, a push, hostile input."""

import random

from agent import auditlog, cbor
from cloud.support import SupportDesk
from cloud.support_mqtt import down
from mpy import require_micropython, run_micropython_report

HEAP_KB = 128          # the uploader and console without signature checks
SIGNED_HEAP_KB = 2560  # with them, checked whole (bits_per_tick 256): this port collects
                       # garbage only between steps, and a whole check is one step
STEPPED_HEAP_KB = 128  # with them, stepped over Ticks as a small board runs them
BITS_PER_TICK = 8
T0 = 1_800_000_000

IMPORTS = ["import binascii", "from agent import cbor", "from agent import auditlog", "from agent import grant",
           "from agent import console as core", "from agent import audit_upload as up",
           "from agent.actions import Append, WriteAtomic, Publish, Log"]

SETUP = r'''
H = binascii.unhexlify
KEYS = {H(%r): H(%r)}
FLASH = {"audit.log": H(%r)}
chain, repair = auditlog.recover("dev-1", FLASH["audit.log"])
console = core.Console("dev-1", None, KEYS, chain, lambda n: bytes(n))
u = up.Uploader(console, "acme/dev-1", None, 300, 0)
def run(actions):
    for a in actions:
        if isinstance(a, Append):
            FLASH[a.name] = FLASH.get(a.name, b"") + a.data
            print("append", a.name, binascii.hexlify(a.data).decode())
        elif isinstance(a, WriteAtomic):
            FLASH[a.name] = a.data
            print("write", a.name, binascii.hexlify(a.data).decode())
        elif isinstance(a, Publish):
            print("publish", a.topic, binascii.hexlify(a.payload).decode())
        elif isinstance(a, Log):
            print("log", a.code)
        else:
            print("other", type(a).__name__)
def rx(hexed, now=1000):
    run(u.feed(up.Received(H(hexed), FLASH["audit.log"], now, %d)))
    print("state", u.state, u.cursor, console.chain.seq, len(console.revoked), console.floor_s)
def poll(now=2000):
    run(u.feed(up.Poll(FLASH["audit.log"], now, %d)))
    print("state", u.state, u.cursor, console.chain.seq)
'''


STEPPED = r'''
console.bits_per_tick = %d
def tick(now=1500):
    run(console.feed(core.Tick(now, %d)))
def ticked():
    print("ticked", console.busy(), len(console.revoked), console.floor_s, console.checkpoint is not None)
'''


def script(tmp_path, signed=True, bits=256):
    desk = SupportDesk(str(tmp_path / "cloud"), clock_s=lambda: T0 + 100,
                       random_bytes=random.Random(1).randbytes)
    chain = auditlog.AuditChain("dev-1")
    log = b"".join(chain.record(T0 + i, "command", {"i": i}) for i in range(12))
    records = auditlog.records(log)
    import hashlib
    from agent import journal
    head6 = hashlib.sha256(journal.scan(log)[0][6]).digest()
    tech = desk.grant("alice", _point(), "viewer", devices=["dev-1"], requested_by="a",
                      approved_by="b", reason="r")[0]
    desk.revoke(tech, "b", "r")
    revocations = desk.revocation_list()
    checkpoint = desk.checkpoint("dev-1", 6, head6)
    desk.close()
    assert records[6][0] == 6
    if not signed:
        revocations = checkpoint = None
    sync = down("sync", T0 + 100, next=0, revocations=revocations, checkpoint=checkpoint)
    setup = SETUP % (desk.kid.hex(), desk.public_key.hex(), log.hex(), T0, T0)
    steps = ["run(u.feed(up.Online(0)))", "rx(%r)" % sync.hex(), "poll()"]
    for i in range(1, 5):
        ack = down("ack", T0 + 100, id=i, next=[3, 6, 10, 13][i - 1], findings=[])
        steps += ["rx(%r)" % ack.hex(), "poll()"]
    if signed:
        steps.append("rx(%r)" % down("push", T0 + 200, revocations=revocations).hex())
    if bits < 256:      # each cloud message checked over Ticks, one top-level step each
        setup += STEPPED % (bits, T0)
        ticks = ["tick()"] * (256 // bits) + ["ticked()"]
        steps = [x for step in steps for x in ([step] + ticks if step.startswith(("rx", "poll")) else [step])]
    steps += ["rx(%r)" % b"\xff".hex(), "rx(%r)" % cbor.dumps({"v": 1, "op": [1]}).hex(),
              "rx(%r)" % down("ack", T0, id=99, next=0, findings=[]).hex(),
              "print(sorted(FLASH))"]
    return IMPORTS[0], IMPORTS[1:] + [setup] + steps


def _point():
    from cloud import firmware
    return firmware.public_bytes(firmware.generate_key())


def run_cpython(setup, steps):
    import contextlib
    import io
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(setup, scope)             # each import is a step: this port collects between steps
        for step in steps:
            exec(step, scope)
    return out.getvalue()


def test_uploader_on_micropython_matches_cpython_in_a_small_heap(tmp_path):
    require_micropython()
    setup, steps = script(tmp_path, signed=False)
    expected = run_cpython(setup, steps)
    for word in ("publish t/acme/dev-1/audit", "write audit.cursor", "log audit_upload_refused"):
        assert word in expected, word
    report = run_micropython_report(setup, heap_kb=HEAP_KB, modules=("agent",), timeout_s=300, steps=steps)
    assert report["stdout"] == expected
    print("\nMicroPython audit uploader: %d steps, %.0f ms; heap peak %d bytes (budget %d)"
          % (len(steps) + 1, report["elapsed_ms"], report["heap_peak_bytes"], HEAP_KB * 1024))


def test_revocations_and_checkpoints_on_micropython_match_cpython(tmp_path):
    require_micropython()
    setup, steps = script(tmp_path)
    expected = run_cpython(setup, steps)
    for word in ("append audit.log", "write audit.log", "write console.state"):
        assert word in expected, word
    assert "state idle 0 13 1 %d" % (T0 + 100) in expected       # the list applied, floor raised
    assert "state idle 6 14 1" in expected                          # rotated to the checkpoint (seq 6)
    assert "state sending 13 15 1 %d" % (T0 + 200) in expected      # the push applied
    report = run_micropython_report(setup, heap_kb=SIGNED_HEAP_KB, modules=("agent",), timeout_s=300,
                                    steps=steps)
    assert report["stdout"] == expected
    print("\nMicroPython uploader with signed lists and checkpoints: %d steps, %.0f ms; heap peak %d "
          "bytes" % (len(steps) + 1, report["elapsed_ms"], report["heap_peak_bytes"]))


def test_stepped_revocations_and_checkpoints_on_micropython_in_a_small_heap(tmp_path):
    """The same script with the console's checks of the cloud's signed
    messages stepped over Ticks of BITS_PER_TICK bits: the list applies and
    the log rotates on MicroPython as on CPython, in STEPPED_HEAP_KB."""
    require_micropython()
    setup, steps = script(tmp_path, bits=BITS_PER_TICK)
    expected = run_cpython(setup, steps)
    assert "ticked False 1 %d False" % (T0 + 100) in expected      # the sync's list, applied by ticks
    assert "write audit.log" in expected and "append audit.log" in expected   # rotated, recorded
    assert "ticked False 1 %d" % (T0 + 200) in expected            # the push applied
    report = run_micropython_report(setup, heap_kb=STEPPED_HEAP_KB, modules=("agent",), timeout_s=300,
                                    steps=steps)
    assert report["stdout"] == expected
    print("\nMicroPython uploader with stepped signed lists and checkpoints: %d steps, %.0f ms; heap "
          "peak %d bytes (budget %d)" % (len(steps) + 1, report["elapsed_ms"], report["heap_peak_bytes"],
                                         STEPPED_HEAP_KB * 1024))
