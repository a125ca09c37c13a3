"""The ESP32 update driver (board/esp32_ota.py) over board/esp32_slots.py on
the ESP32 model (board/esp32_model.py), run pass by pass as the board's loop
runs it: on CPython (plain tests, easy to debug) and on real MicroPython
(the WebAssembly port, the model installed as `esp32`, every pass its own
top-level run so the port collects garbage between passes).

The transport is the one part that cannot exist here: a stand-in for the
board's MQTT connection that records what was published and acknowledges
it. The cloud's side is a few lines that answer what the device published
with ota_wire messages: welcome and the offer (a real signed bundle from
firmware-images/) to a hello, each requested chunk. Both classes run
unchanged on MicroPython (their source is sent along)."""

import inspect
import random

from agent import updater as up
from agent.ota_wire import UP, UP_BYTES_MAX, encode, parse
from board import esp32_model as em
from board.esp32_ota import REBOOT_WAIT_MS, Esp32Ota
from board.esp32_slots import BOOT_STATE, Esp32Slots
from board.sim import SimFlash

from mpy import require_micropython, run_micropython_report
from test_updater import NEW_BIN, NEW_BUNDLE, NOW_MS, OLD_BIN, ROOT_PUB

APP_BYTES = 0x4000              # the smallest that holds both images: less flash in the heap
HEAP_KB = 352              # the model's flash and images, the agent compiled from source on the port
BITS_PER_STEP = 16              # of a signature check per pass (the agent's default is 32)
UPDATE = ("rel-2", "1.1.0")     # the cloud's ref and the release's version


class Transport:
    """The board's MQTT connection: publish() -> a handle (its index + 1), None
    while offline; delivered(handle) once the broker's PUBACK came."""

    def __init__(self):
        self.sent = []            # (topic, payload), every boot's
        self.online = False
        self.acked = 0            # PUBACKs came for the handles up to this one

    def publish(self, topic, payload):
        if not self.online:
            return None
        self.sent.append((topic, payload))
        return len(self.sent)

    def delivered(self, handle):
        return handle <= self.acked


class Rig:
    """One ESP32 (the model, 1.0.0 in ota_0) with its update driver, the
    stand-in transport and the cloud. pass_() is one pass of the board's loop.
    images: {version: bytes}; release: (ref, version, bundle) offered to a
    device that runs another version; tamper: the chunk answered with one
    bit flipped. esp32: None where the model is installed as the module."""

    def __init__(self, flash, chip, config, images, now0_ms, release=None, tamper=None, esp32=None):
        self.flash, self.chip, self.config, self.images = flash, chip, config, images
        self.now0_ms = now0_ms
        self.release, self.tamper, self.esp32 = release, tamper, esp32
        self.transport = Transport()
        self.puback = True        # the broker acknowledges, before each pass, what was published
        self.acked = 2            # telemetry records acknowledged since boot: a healthy image
        self.ticks = 0
        self.passes = 0
        self.resets = 0
        self.read = 0             # published messages the cloud has answered
        self.log = []             # what the cloud saw, in order
        self.offered_at = None    # the pass that offered the release ...
        self.chunk0_at = None     # ... and the one that answered chunk 0's request
        self.found = {}           # label -> the version read back from it
        self.ota = None

    def power_on(self):
        self.chip.reset()         # the bootloader
        self.start()

    def start(self):
        slots = Esp32Slots(self.flash, esp32=self.esp32)
        self.ota = Esp32Ota("acme/dev-1", self.config, slots, "site-0", self.version(self.chip.running),
                            self.transport, self.reset, self.tick_ms, self.now_ms)
        self.ota.boot()

    def version(self, label):
        data = self.chip.app_bytes(label)
        for v in self.images:
            if data.startswith(self.images[v]):
                return v
        return "unknown"

    def check(self, label):
        """Read slot `label` back for summary() (a step of its own on MicroPython)."""
        self.found[label] = self.version(label)

    def reset(self):              # machine.reset(): the bootloader; the app starts at the next pass
        self.resets += 1
        self.transport.online = False
        self.ota = None
        self.chip.reset()

    def tick_ms(self):
        return self.ticks

    def now_ms(self):
        return self.now0_ms + self.ticks

    def pass_(self):
        """After a reset the app starts; then the network (connect, PUBACKs,
        the cloud's answers); then the driver's poll."""
        self.passes += 1
        self.ticks += 10
        if self.ota is None:
            self.start()
        if not self.transport.online:
            self.transport.online = True
            self.ota.connected()
        if self.puback:
            self.transport.acked = len(self.transport.sent)
        self.cloud()
        self.ota.poll(self.acked)

    def cloud(self):
        """The OTA service answers what was published before this pass."""
        sent = self.transport.sent
        start, self.read = self.read, len(sent)
        for topic, payload in sent[start:self.read]:
            if topic != self.ota.up_topic:
                raise ValueError("published on " + topic)
            op, f = parse(payload, UP, UP_BYTES_MAX)
            if op == "hello":
                self.log.append("hello " + f["ver"])
                self.ota.on_message(encode("welcome", now=self.now_ms()))
                if self.release is not None and f["ver"] != self.release[1]:
                    self.offered_at = self.passes
                    self.ota.on_message(encode("offer", ref=self.release[0], bundle=self.release[2]))
            elif op == "report":
                self.log.append("%s %s %d %s" % (f["st"], f["why"] or "-", f["seq"], f["ref"] or "-"))
            else:
                self.answer_chunk(f["ref"], f["i"])

    def answer_chunk(self, ref, i):
        self.log.append("chunk %d" % i)
        if i == 0:
            self.chunk0_at = self.passes
        data = bytearray(self.images[self.release[1]][i * 4096:(i + 1) * 4096])
        if i == self.tamper:
            data[100] ^= 0x01
        self.ota.on_message(encode("chunk", ref=ref, i=i, data=bytes(data)))

    def summary(self):
        """One line: the cloud's log, passes spent verifying, resets, otadata,
        the version booted, each slot's version and the updater's state."""
        for label in ("ota_0", "ota_1"):
            if label not in self.found:
                self.check(label)
        e = self.chip.entries()
        best = self.chip.active(e)
        state = e[best].state if best >= 0 else -1
        verify = self.chunk0_at - self.offered_at if self.chunk0_at is not None else -1
        return "%s # verify_passes=%d resets=%d boot=%s otadata=%d running=%s ota_0=%s ota_1=%s %s" % (
            "|".join(self.log), verify, self.resets, self.chip.boot_label(), state,
            self.found[self.chip.running], self.found["ota_0"], self.found["ota_1"],
            self.ota.updater.state if self.ota is not None and self.ota.updater is not None else "-")


def valid(data):
    return data.startswith(OLD_BIN) or data.startswith(NEW_BIN)


def config():
    return up.Config("sim-v1", ROOT_PUB, k=2, trial_acks_min=2, trial_ms_max=60000,
                     bits_per_step=BITS_PER_STEP)


def cpython_rig(tamper=None):
    flash = SimFlash(rng=random.Random(7))
    chip = em.Esp32Model(flash, APP_BYTES, valid)
    chip.flash_image("ota_0", OLD_BIN)
    flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=1, ksv=1).encode())
    rig = Rig(flash, chip, config(), {"1.0.0": OLD_BIN, "1.1.0": NEW_BIN}, NOW_MS,
              UPDATE + (NEW_BUNDLE,), tamper, esp32=chip.module)
    rig.power_on()
    return rig


def run_until(rig, done, passes_max=200):
    while not done(rig):
        assert rig.passes < passes_max, rig.summary()
        rig.pass_()
    return rig.passes


def settled(rig, state):
    """The updater is in `state` and the cloud has read everything published."""
    return rig.ota is not None and rig.ota.updater is not None and rig.ota.updater.state == state \
        and rig.read == len(rig.transport.sent)


def confirmed(rig):
    return settled(rig, up.CONFIRMED)


def rejected(rig):
    return settled(rig, up.REJECTED)


UPDATED = ("hello 1.0.0|downloading - 1 rel-2|chunk 0|chunk 1|chunk 2|chunk 3|verified - 2 rel-2|"
           "installed - 3 rel-2|hello 1.1.0|trial - 4 rel-2|confirmed - 5 rel-2 # verify_passes=%d "
           "resets=1 boot=ota_1 otadata=%d running=1.1.0 ota_0=1.0.0 ota_1=1.1.0 confirmed")
TAMPERED = ("hello 1.0.0|downloading - 1 rel-2|chunk 0|chunk 1|rejected tampered_chunk 2 rel-2 "
            "# verify_passes=%d resets=0 boot=ota_0 otadata=%d running=1.0.0 ota_0=1.0.0 ota_1=unknown "
            "rejected")


# ------------------------------------------------------------ on CPython

def test_an_update_end_to_end_through_the_driver_and_the_model():
    rig = cpython_rig()
    assert rig.transport.sent == [] and rig.ota.updater.state == up.IDLE      # offline until the first pass
    run_until(rig, confirmed)
    verify = rig.chunk0_at - rig.offered_at
    assert verify >= 2 * 256 // BITS_PER_STEP          # two signatures checked a Step per poll
    assert rig.summary() == UPDATED % (verify, em.IMG_VALID)
    assert rig.chip.app_bytes("ota_1")[:len(NEW_BIN)] == NEW_BIN
    e = rig.chip.entries()
    assert rig.chip.slot_of_seq(e[rig.chip.active(e)].seq) == 1
    rig.chip.reset()                                   # it stays
    assert rig.chip.running == "ota_1"


def test_the_reset_waits_for_the_installed_reports_puback_at_most_reboot_wait_ms():
    rig = cpython_rig()
    run_until(rig, lambda r: r.ota.reboot_asked_ms is not None)
    assert parse(rig.transport.sent[-1][1], UP, UP_BYTES_MAX)[1]["st"] == "installed"
    rig.puback = False                                 # the broker is slow to acknowledge
    for _ in range(5):
        rig.pass_()
    assert rig.resets == 0 and rig.ota.updater.state == up.INSTALLED
    rig.puback = True
    rig.pass_()
    assert rig.resets == 1 and rig.chip.running == "ota_1"

    rig = cpython_rig()
    run_until(rig, lambda r: r.ota.reboot_asked_ms is not None)
    rig.puback = False
    rig.ticks += REBOOT_WAIT_MS                        # no PUBACK: the bound
    rig.pass_()
    assert rig.resets == 1
    rig.puback = True
    run_until(rig, confirmed)                          # the next boot goes on


def test_an_installed_report_lost_with_its_connection_is_sent_again():
    """The connection dies before the installed report's PUBACK: the next
    connection sends it again (same seq) and the reset waits for that one."""
    rig = cpython_rig()
    run_until(rig, lambda r: r.ota.reboot_asked_ms is not None)
    rig.puback = False
    installed = rig.transport.sent[-1]
    rig.transport.online = False                       # gone before its PUBACK
    rig.pass_()                                        # reconnects: hello, then the report again
    assert rig.transport.sent.count(installed) == 2 and rig.resets == 0
    rig.puback = True
    rig.pass_()
    assert rig.resets == 1 and rig.chip.running == "ota_1"


def test_a_tampered_chunk_is_rejected_and_the_running_slot_untouched():
    rig = cpython_rig(tamper=1)
    before = bytes(rig.chip.app_bytes("ota_0"))
    run_until(rig, rejected)
    for _ in range(5):                                 # nothing more happens
        rig.pass_()
    verify = rig.chunk0_at - rig.offered_at
    assert rig.summary() == TAMPERED % (verify, em.IMG_VALID)
    assert rig.chip.app_bytes("ota_0") == before
    rig.power_on()
    assert rig.chip.running == "ota_0" and rig.ota.updater.state == up.REJECTED


def test_the_unplanned_reset_in_the_trial_rolls_back():
    rig = cpython_rig()
    rig.acked = 0                                      # the new image's telemetry never arrives
    run_until(rig, lambda r: r.resets == 1)
    rig.pass_()
    assert rig.ota.updater.state == up.TRIAL
    rig.release = None                                 # the campaign offers it no more
    rig.reset()                                        # a watchdog, a crash
    rig.pass_()
    assert rig.chip.running == "ota_0" and rig.ota.updater.state == up.ROLLED_BACK
    assert rig.log[-1] == "rolled_back unplanned_reboot 5 rel-2"


# ------------------------------------------------------------ on MicroPython

MPY_SETUP = ("""
import sys
from agent import updater as up
from agent.ota_wire import UP, UP_BYTES_MAX, encode, parse
from board.sim import SimFlash
from board import esp32_model as em
""", """
def valid(data):
    return data.startswith(OLD) or data.startswith(NEW)

flash = SimFlash()
erased = flash.files[em.FLASH_KEY] = bytearray(0x10000 + 2 * %d)   # the model's own erases at 2x the size
for i in range(len(erased)):
    erased[i] = 0xFF
chip = em.Esp32Model(flash, %d, valid)
sys.modules["esp32"] = chip.module      # what the firmware's own esp32 module would be
""" % (APP_BYTES, APP_BYTES), """
chip.flash_image("ota_0", OLD)
flash.files["bootstate"] = up.BootState(active=0, sv=1, ksv=1).encode()
""", """
from board.esp32_slots import Esp32Slots
from board.esp32_ota import Esp32Ota
""")

MPY_RIG = ("""
config = up.Config("sim-v1", ROOT_PUB, k=2, trial_acks_min=2, trial_ms_max=60000, bits_per_step=%d)
rig = Rig(flash, chip, config, {"1.0.0": OLD, "1.1.0": NEW}, NOW_MS, (%r, %r, BUNDLE), %r)
""", "chip.reset()", "rig.start()")   # power on: the bootloader, then the app


def on_micropython(passes, tamper=None):
    """The same rig on MicroPython, `passes` passes, one top-level run each -> (summary, report)."""
    steps = ["OLD = %r" % OLD_BIN, "NEW = %r" % NEW_BIN,
             "ROOT_PUB = %r\nBUNDLE = %r\nNOW_MS = %d\n" % (ROOT_PUB, NEW_BUNDLE, NOW_MS),
             *MPY_SETUP, inspect.getsource(Transport), inspect.getsource(Rig),
             MPY_RIG[0] % ((BITS_PER_STEP,) + UPDATE + (tamper,))] + list(MPY_RIG[1:])
    steps += ["rig.pass_()"] * passes + ["rig.check('ota_0')", "rig.check('ota_1')", "print(rig.summary())"]
    report = run_micropython_report(steps[0], heap_kb=HEAP_KB, modules=("agent", "board"), timeout_s=300,
                                    steps=steps[1:])
    return report["stdout"].strip().split("\n")[-1], report


def test_the_driver_on_micropython_with_the_model_as_esp32():
    require_micropython()
    rig = cpython_rig()
    passes = run_until(rig, confirmed)
    updated, report = on_micropython(passes + 3)
    assert updated == rig.summary(), updated         # the same passes, the same outcome
    print("\nESP32 update driver on MicroPython: %d passes, %.1f s, heap peak %d bytes (budget %d)"
          % (passes + 3, report["elapsed_ms"] / 1000, report["heap_peak_bytes"], HEAP_KB * 1024))

    rig = cpython_rig(tamper=1)
    passes = run_until(rig, rejected)
    tampered, report = on_micropython(passes + 3, tamper=1)
    assert tampered == rig.summary(), tampered
    assert " boot=ota_0 " in tampered and "rejected tampered_chunk" in tampered
    print("tampered chunk on MicroPython: %d passes, %.1f s, heap peak %d bytes"
          % (passes + 3, report["elapsed_ms"] / 1000, report["heap_peak_bytes"]))
