"""The whole update flow on real MicroPython (the WebAssembly port) for a
1 MiB image, and for a 2.5 MiB one under a paged manifest (pages of chunk
hashes fetched one at a time), the update's heap at most 64 KiB: the offer's three signatures (key set and two
release signers) checked in Steps, every chunk downloaded, checked and
written, the whole slot read back and checked, the switch, the trial boot
and the confirmation.

This port collects garbage only between top-level runs (tests/mpy.py), so
the driver below feeds the updater one event per run, as a board's loop
hands it one event per pass (and the bootloader runs on its own before the
agent starts again). The update's heap is measured as what each run leaves
allocated, garbage included, above what the compiled agent modules and the
driver hold (on a board those modules are frozen into flash); tests/mpy.py
also fails the test if a run outgrew the whole heap. The slots are files of the port's in-memory filesystem, which
lives outside the MicroPython heap as flash does on a board; so the heap
holds the updater, one chunk and the driver's bookkeeping, whatever the
image size. Chunks come from a generator that reuses one buffer (the image
never exists whole on the device side)."""

import hashlib
import os

import pytest

from agent import manifest as mf, updater as up
from cloud import firmware
from mpy import require_micropython, run_micropython_report
from simulator import firmware_faults as ff
from test_updater import NOW_MS, ROOT_PUB
from test_verify_on_micropython import IMAGE

WORKING_KB = 64      # the update's heap, beside the code and the driver
HEAP_KB = 144        # the whole heap: code and driver (about 54 KiB here), the update, and
                     # room for the fragmentation of 8 KiB records (128 grew at a verification step)
IMAGE_BYTES = 1 << 20
PAGED_IMAGE_BYTES = 5 << 19          # 2.5 MiB: over the 1.75 MiB of a manifest with chunk hashes
BITS_PER_STEP = 4
CHUNK = 4096

# The agent's modules, imported one per run (compiling one is the biggest
# allocation of all); on a board they are frozen into the firmware image.
IMPORTS = ["import gc", "from agent import cbor", "from agent import p256", "from agent import cose",
           "from agent import manifest", "from agent import updater as up",
           "from board.slots import SLOT_NAMES, SimSlots"]

SCENARIO = IMAGE + r'''
import hashlib, os


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class Flash:
    """The boot-state record as a file, replaced by rename (all or nothing)."""
    def read(self, name):
        try:
            with open("/" + name, "rb") as f:
                return f.read()
        except OSError:
            return None
    def write_atomic(self, name, data):
        written["record"] += len(data)
        with open("/" + name + ".tmp", "wb") as f:
            f.write(data)
        os.rename("/" + name + ".tmp", "/" + name)


class FileSlots(SimSlots):
    """Slots as files written in place: only one chunk ever in the heap."""
    def write_slot(self, slot, offset, data):
        written["slot"] += len(data)
        path = "/" + SLOT_NAMES[slot]
        with open(path, "r+b" if _exists(path) else "wb") as f:
            f.seek(offset)
            f.write(data)
    def read_slot(self, slot, offset=0, length=None):
        with open("/" + SLOT_NAMES[slot], "rb") as f:
            f.seek(offset)
            return f.read(-1 if length is None else length)


written = {"slot": 0, "record": 0}       # bytes written to flash, by kind
slots = FileSlots(Flash())
slots.write_slot(0, 0, b"the factory image")
slots.write_boot_state(up.BootState(active=0, sv=1, ksv=1).encode())
config = up.Config("sim-v1", ROOT_PUB, k=2, trial_acks_min=2, trial_ms_max=60000,
                   bits_per_step=BITS_PER_STEP)
reports = []
events = []          # what the board feeds next, one per top-level run
counts = {"steps": 0, "chunks": 0, "reads": 0, "reboots": 0, "pages": 0}
chunks = image_chunks(COUNT)
page_chunks = image_chunks(COUNT)
updater = None


def boot():
    """A reset: the bootloader's run (SimSlots.boot), then, in the next run,
    the agent starts with a new Updater."""
    global updater
    updater = up.Updater(config)
    events.append("bootloader")


def run(actions):
    for a in actions:
        if isinstance(a, up.WriteSlot):
            slots.write_slot(a.slot, a.offset, a.data)
        elif isinstance(a, up.WriteBootState):
            slots.write_boot_state(a.data)
        elif isinstance(a, up.Report):
            reports.append(a.status)
        elif isinstance(a, up.StepLater):
            counts["steps"] += 1
            events.append(up.Step())
        elif isinstance(a, up.RequestChunk):
            counts["chunks"] += 1
            events.append(up.Chunk(a.index, next(chunks)))
        elif isinstance(a, up.RequestPage):
            # The cloud's part: page p is the hashes of chunks 128p.. (asked in order)
            counts["pages"] += 1
            n = min(128, COUNT - 128 * a.index)
            events.append(up.Page(a.index, b"".join(hashlib.sha256(next(page_chunks)).digest()
                                                    for _ in range(n))))
        elif isinstance(a, up.ReadSlot):
            counts["reads"] += 1
            events.append(up.SlotRead(a.offset, slots.read_slot(a.slot, a.offset, a.length)))
        elif isinstance(a, up.Reboot):
            counts["reboots"] += 1
            boot()


peak = [0]


def advance():
    """Feed one event; when none is waiting, the cloud's part: the offer
    while idle (the message is dropped once handed over, as a board frees
    its receive buffer), acknowledged telemetry while on trial. Then note
    the heap: what this run left allocated, garbage included, above BASE."""
    global BUNDLE
    if events and events[0] == "bootloader":
        events[0] = up.Booted(*slots.boot())
    elif events:
        run(updater.handle(events.pop(0)))
    elif updater.state == up.IDLE and BUNDLE is not None:
        offer, BUNDLE = up.Offer(BUNDLE, NOW_MS, "rel-2"), None
        run(updater.handle(offer))
        offer = None
    elif updater.state == up.TRIAL:
        run(updater.handle(up.Healthy(2, NOW_MS + 1000)))
    peak[0] = max(peak[0], gc.mem_alloc() - BASE)


def slot_sha256(slot, size):
    h = hashlib.sha256()
    with open("/" + SLOT_NAMES[slot], "rb") as f:
        buf = bytearray(4096)
        left = size
        while left:
            n = f.readinto(buf)
            h.update(memoryview(buf)[:min(n, left)])
            left -= min(n, left)
    return h.digest()


boot()
'''

REPORT = r'''
print(",".join(reports), updater.state, counts["steps"], counts["chunks"], counts["reads"],
      counts["reboots"], slot_sha256(1, SIZE) == SHA256, BASE, peak[0], written["slot"],
      written["record"], counts["pages"])
'''


def build(image_bytes):
    namespace = {}
    exec(IMAGE, namespace)
    payload = b"".join(bytes(c) for c in namespace["image_chunks"](image_bytes // CHUNK))
    manifest = firmware.build_manifest(payload, "sim-v1", "2.0.0", 2, ff.EXPIRES_AT, "mpy",
                                       pages=image_bytes > mf.INLINE_SIZE_MAX)
    keys_dir = os.path.join(ff.IMAGES, "keys")
    keys = [firmware.load_private_key(os.path.join(keys_dir, n + ".key")) for n in ff.SIGNERS]
    keyset = firmware.read_file(os.path.join(ff.IMAGES, "keyset-v2.cose"), "key set")
    return firmware.sign_bundle(manifest, keys, keyset), payload


@pytest.mark.parametrize("image_bytes", [IMAGE_BYTES, PAGED_IMAGE_BYTES], ids=["1MiB", "2.5MiB-paged"])
def test_an_update_end_to_end_in_a_64_kib_heap(image_bytes):
    """1 MiB lists its chunk hashes in the manifest; 2.5 MiB is over the
    1.75 MiB those fit and signs pages of them, fetched one at a time."""
    require_micropython()
    bundle, payload = build(image_bytes)
    count = len(payload) // CHUNK
    pages = (count + 127) // 128 if image_bytes > mf.INLINE_SIZE_MAX else 0
    verify_steps = 3 * 256 // BITS_PER_STEP          # key set + two release signatures
    runs = 2 + verify_steps + 2 * count + pages + 16  # boot, steps, chunks, pages, read-back, the rest
    setup = ("ROOT_PUB = %r\nNOW_MS = %d\nCOUNT = %d\nSIZE = %d\nSHA256 = %r\n"
             "BITS_PER_STEP = %d\n" % (ROOT_PUB, NOW_MS, count, len(payload),
                                       hashlib.sha256(payload).digest(), BITS_PER_STEP)) + SCENARIO
    steps = IMPORTS[1:] + [setup, "BASE = gc.mem_alloc()", "BUNDLE = %r" % bundle]
    result = run_micropython_report(IMPORTS[0], heap_kb=HEAP_KB, modules=("agent", "board"),
                                    timeout_s=300, steps=steps + ["advance()"] * runs + [REPORT])
    out = result["stdout"].split()
    assert out[0] == "downloading,verified,installed,trial,confirmed"
    assert out[1] == up.CONFIRMED
    steps, chunks, reads, reboots = (int(x) for x in out[2:6])
    assert steps >= verify_steps          # the signatures took many runs, none whole
    assert (chunks, reads, reboots) == (count, count, 1)
    assert int(out[11]) == pages                # one page of 128 chunk hashes before its chunks
    assert out[6] == "True"               # slot 1 holds the image, byte for byte
    base, peak, slot_bytes, record_bytes = (int(x) for x in out[7:11])
    assert 0 < peak <= WORKING_KB * 1024, peak
    # The record (manifest included) is written with every 16th chunk, not
    # each: per chunk it would be about twice the image again.
    assert slot_bytes == len(payload) + len(b"the factory image")
    assert record_bytes < slot_bytes // 5, (record_bytes, slot_bytes)
    print("%d KiB update on MicroPython (%d pages): %d runs, %.0f ms, code and driver %d bytes, "
          "update's peak %d bytes, heap total %d bytes; flash written: slot %d, record %d bytes"
          % (image_bytes // 1024, pages, runs, result["elapsed_ms"], base, peak,
             result["heap_peak_bytes"], slot_bytes, record_bytes))
