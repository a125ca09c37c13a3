"""The ESP32 board's storage, clock and randomness on real MicroPython (the
WebAssembly port): the telemetry core boots, queues, reboots and recovers on
FlashStorage exactly as on the other boards."""

from mpy import require_micropython, run_micropython

SCRIPT = r'''
from board.esp32 import FlashStorage, Clock, Rng
from agent import cbor, events, telemetry
from agent.actions import Append, WriteAtomic

class Codec:
    dumps = staticmethod(cbor.dumps)
    loads = staticmethod(cbor.loads)

store = FlashStorage("/data")
clock = Clock()
rng = Rng()

def run(actions):
    for a in actions:
        if isinstance(a, Append):
            store.append(a.name, a.data)
        elif isinstance(a, WriteAtomic):
            store.write_atomic(a.name, a.data)

def boot():
    core = telemetry.Telemetry("acme", "esp-1", Codec, rng, telemetry.Config(capacity=8))
    run(core.boot(store.read("state"), store.read("queue")))
    return core

core = boot()
for i in range(5):
    run(core.handle(events.Sample(clock.now_ms(), {"i": i})))
print("epoch", core.epoch, "queued", len(core.queue))
core = boot()
print("epoch", core.epoch, "queued", len(core.queue))
store.append("queue", b"\x09\x00torn")
core = boot()
print("epoch", core.epoch, "queued", len(core.queue))
print("clock", clock.now_ms() > 1600000000000, clock.ticks_ms() >= 0)
print("rng", all(0 <= rng.randint(0, 9) <= 9 for _ in range(50)))
print("names", store.read("missing") is None)
try:
    store.read("../etc")
except ValueError:
    print("refused")
import os
print(sorted(os.listdir("/data")))
'''


def test_core_on_esp32_storage_under_micropython():
    require_micropython()
    out = run_micropython(SCRIPT, heap_kb=128, modules=("agent", "board"))
    assert out.splitlines() == [
        "epoch 0 queued 5",
        "epoch 1 queued 5",
        "epoch 2 queued 5",
        "clock True True",
        "rng True",
        "names True",
        "refused",
        "['queue', 'state']",
    ]
