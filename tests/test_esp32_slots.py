"""board.esp32_slots on board.esp32_model: the model of MicroPython's
esp32.Partition and ESP-IDF's otadata/bootloader checked against what
ESP-IDF does (entry layout and CRC, NEW -> PENDING_VERIFY -> ABORTED,
the higher sequence number wins, NOR programming), then agent.updater
driving the ESP32 slot board through it: happy path, rollback on a trial
timeout and on an unplanned reboot, a power cut at every flash write of the
flow (each erase and each program, the boot record, the bootloader's own
otadata writes), seeded random cuts, and the board code on real
MicroPython with the model injected as its `esp32` module."""

import random
import struct
import zlib

import pytest

from agent import updater as up
from board import esp32_model as em
from board.esp32_slots import BOOT_STATE, Esp32Slots, SlotError
from board.sim import PowerCut, SimFlash
from test_updater import (CONFIGS, PER_CHUNK, NEW_BIN, NEW_BUNDLE, NOW_MS, OLD_BIN, ROOT_PUB, Device, converged,
                          cut_everywhere, drive, image_version, statuses)

APP_BYTES = 0x8000


def valid_image(data):
    return image_version(data) is not None


class Esp32Rig:
    """A chip (the model on a SimFlash) with 1.0.0 in ota_0 and blank otadata,
    as esptool leaves it; start() is a reset: the bootloader, then the app's
    Esp32Slots.boot()."""

    def __init__(self, sv=1, seed=7, rollback=True):
        self.flash = SimFlash(rng=random.Random(seed), capacity_bytes=1 << 22)
        self.chip = em.Esp32Model(self.flash, APP_BYTES, valid_image, rollback)
        self.chip.flash_image("ota_0", OLD_BIN)
        self.flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=sv, ksv=1).encode())
        self.slots = None

    @property
    def writes(self):
        return self.flash.writes

    def power_on(self, cut_at_write):
        self.flash.power_on(cut_at_write)

    def start(self):
        self.chip.reset()
        self.slots = Esp32Slots(self.flash, esp32=self.chip.module)
        return self.slots.boot()

    def version(self, slot):
        return image_version(self.chip.app_bytes(em.Esp32Model.apps(self.chip)[slot][0]))


# ------------------------------------------------------------ the model against ESP-IDF

def test_otadata_entry_layout_and_crc_match_esp_idf():
    entry = em.pack_entry(1, em.IMG_VALID)
    assert len(entry) == 32
    seq, label, state, crc = struct.unpack("<I20sII", entry)
    assert (seq, label, state) == (1, b"\xff" * 20, 2)
    assert crc == 0x4743989A            # crc32_le(UINT32_MAX, seq=1): ESP-IDF's otadata for ota_0
    for seq in (0, 1, 2, 7, 0x12345678, 0xFFFFFFFE):
        data = struct.pack("<I", seq)
        assert em.crc32_le(0xFFFFFFFF, data) == zlib.crc32(data, 0xFFFFFFFF)


def test_blank_otadata_boots_ota_0_and_records_it():
    rig = Esp32Rig()
    assert rig.chip.reset() == "ota_0"
    e = rig.chip.entries()
    assert (e[0].seq, e[0].state, e[0].crc_ok()) == (1, em.IMG_VALID, True)
    assert e[1].seq == em.ERASED_SEQ


def test_new_image_gets_one_boot_then_the_bootloader_aborts_it():
    rig = Esp32Rig()
    rig.chip.reset()
    rig.chip.flash_image("ota_1", NEW_BIN)
    P = rig.chip.module.Partition
    assert P(P.RUNNING).get_next_update().info()[4] == "ota_1"
    P("ota_1").set_boot()
    e = rig.chip.entries()
    assert (e[1].seq, e[1].state) == (2, em.IMG_NEW)          # the other sector, seq + 1
    assert P(P.BOOT).info()[4] == "ota_1"
    assert rig.chip.reset() == "ota_1"
    assert rig.chip.entries()[1].state == em.IMG_PENDING_VERIFY
    assert rig.chip.reset() == "ota_0"                         # not marked valid: rolled back
    e = rig.chip.entries()
    assert e[1].state == em.IMG_ABORTED and P(P.BOOT).info()[4] == "ota_0"


def test_marked_valid_image_stays_and_the_next_update_takes_the_other_sector():
    rig = Esp32Rig()
    rig.chip.reset()
    rig.chip.flash_image("ota_1", NEW_BIN)
    P = rig.chip.module.Partition
    P("ota_1").set_boot()
    rig.chip.reset()
    P.mark_app_valid_cancel_rollback()
    assert rig.chip.entries()[1].state == em.IMG_VALID
    assert rig.chip.reset() == "ota_1" and rig.chip.reset() == "ota_1"
    P("ota_0").set_boot()
    e = rig.chip.entries()
    assert (e[0].seq, e[0].state) == (3, em.IMG_NEW)           # (3 - 1) % 2 == 0


def test_set_boot_refuses_an_invalid_image_and_mark_valid_needs_rollback_support():
    rig = Esp32Rig()
    rig.chip.reset()
    P = rig.chip.module.Partition
    with pytest.raises(OSError):
        P("ota_1").set_boot()                                  # erased: no image
    plain = Esp32Rig(rollback=False)
    plain.chip.reset()
    with pytest.raises(OSError):
        plain.chip.module.Partition.mark_app_valid_cancel_rollback()


def test_nor_flash_program_without_erase_only_clears_bits():
    rig = Esp32Rig()
    rig.chip.reset()
    p = rig.chip.module.Partition("ota_1")
    p.writeblocks(0, b"\x0f" * 4096)                           # erase + program
    p.writeblocks(0, b"\xf0" * 16, 0)                          # program only
    buf = bytearray(32)
    p.readblocks(0, buf)
    assert buf == b"\x00" * 16 + b"\x0f" * 16
    with pytest.raises(OSError):
        p.writeblocks(0, b"\x00" * 100)                        # an erase must be whole sectors
    with pytest.raises(OSError):
        p.readblocks(APP_BYTES // 4096, bytearray(1))          # past the partition
    assert p.ioctl(4, 0) == APP_BYTES // 4096 and p.ioctl(5, 0) == 4096
    p.ioctl(6, 0)
    p.readblocks(0, buf)
    assert buf == b"\xff" * 32


def test_partition_api_shape():
    rig = Esp32Rig()
    rig.chip.reset()
    P = rig.chip.module.Partition
    labels = [p.info()[4] for p in P.find(P.TYPE_APP)]
    assert labels == ["ota_0", "ota_1"]
    assert [p.info()[4] for p in P.find(P.TYPE_DATA)] == ["otadata"]
    t, subtype, addr, size, label, encrypted = P("ota_1").info()
    assert (t, subtype, size, label, encrypted) == (0, 0x11, APP_BYTES, "ota_1", False)
    with pytest.raises(OSError):
        P("nvs")


def test_a_cut_while_marking_valid_loses_that_entry_and_boots_the_older_one():
    """ESP-IDF rewrites the winning entry in place (erase, then program)."""
    rig = Esp32Rig()
    rig.chip.reset()
    rig.chip.flash_image("ota_1", NEW_BIN)
    P = rig.chip.module.Partition
    P("ota_1").set_boot()
    rig.chip.reset()
    rig.flash.power_on(1)                                      # the erase is cut
    with pytest.raises(PowerCut):
        P.mark_app_valid_cancel_rollback()
    rig.flash.power_on()
    assert rig.chip.reset() == "ota_0"


# ------------------------------------------------------------ the updater on the esp32 board

def test_happy_path_through_the_model():
    rig = Esp32Rig()
    device = Device(rig=rig)
    device.power_on()
    drive(device)
    assert device.state == up.CONFIRMED
    assert statuses(device) == ["downloading", "verified", "installed", "trial", "confirmed"]
    assert device.boots == [(0, "1.0.0"), (1, "1.1.0")]
    e = rig.chip.entries()
    best = rig.chip.active(e)
    assert e[best].state == em.IMG_VALID and rig.chip.slot_of_seq(e[best].seq) == 1
    device.power_on()
    assert device.boots[-1] == (1, "1.1.0")
    assert rig.chip.app_bytes("ota_1")[len(NEW_BIN):] == b"\xff" * (APP_BYTES - len(NEW_BIN))


def test_trial_timeout_rolls_back_through_otadata():
    rig = Esp32Rig()
    device = Device(rig=rig)
    device.power_on()
    drive(device, healthy=False)
    assert device.state == up.ROLLED_BACK
    assert device.reports[-1][:2] == ("rolled_back", "trial_timeout")
    assert device.boots[-1] == (0, "1.0.0")
    assert rig.chip.boot_label() == "ota_0"
    device.power_on()
    assert device.boots[-1] == (0, "1.0.0")


def test_unplanned_reboot_in_trial_is_rolled_back_by_the_bootloader():
    rig = Esp32Rig()
    device = Device(rig=rig)
    device.power_on()
    drive(device, until=up.TRIAL)
    assert device.boots[-1] == (1, "1.1.0")
    assert rig.chip.entries()[rig.chip.active(rig.chip.entries())].state == \
        em.IMG_PENDING_VERIFY
    device.power_on()                                          # watchdog, crash, power
    assert device.state == up.ROLLED_BACK and device.boots[-1] == (0, "1.0.0")
    assert device.reports[-1][:2] == ("rolled_back", "unplanned_reboot")
    assert rig.chip.boot_label() == "ota_0"


def test_the_running_slot_is_never_written():
    rig = Esp32Rig()
    rig.start()
    with pytest.raises(SlotError):
        rig.slots.write_slot(0, 0, b"x" * 4096)
    with pytest.raises(SlotError):
        rig.slots.write_slot(1, 100, b"x")


@pytest.mark.parametrize("healthy", [True, False])
@CONFIGS
def test_power_cut_at_every_flash_write(healthy, config):
    total, outcomes = cut_everywhere(lambda seed: Esp32Rig(seed=seed), healthy, seeds=(0, 1, 2),
                                     config=config)
    assert total >= (20 if config is PER_CHUNK else 16)
    assert set(outcomes) <= {up.CONFIRMED, up.ROLLED_BACK}
    if healthy:
        assert outcomes[up.CONFIRMED] > outcomes.get(up.ROLLED_BACK, 0) > 0


@pytest.mark.parametrize("seed", range(6))
def test_power_cuts_at_random_points(seed):
    rng = random.Random(seed)
    healthy = rng.random() < 0.7
    rig = Esp32Rig(seed=seed)
    probe = Device(rig=Esp32Rig(seed=seed))
    probe.power_on()
    drive(probe, healthy=healthy)
    total = probe.total_writes()
    cuts = sorted(set(rng.randint(1, total + 6) for _ in range(rng.randint(1, 4))))
    device = Device(cut_at=cuts, rig=rig)
    device.power_on()
    drive(device, healthy=healthy, steps_max=400)
    converged(device, healthy)


# ------------------------------------------------------------ on real MicroPython

MPY_ESP32 = """
import sys
from agent import updater as up
from board.sim import SimFlash
from board import esp32_model as em

def valid(data):
    return data[:len(OLD)] == OLD or data[:len(NEW)] == NEW

flash = SimFlash()
chip = em.Esp32Model(flash, 0x8000, valid)
chip.flash_image("ota_0", OLD)
flash.files["bootstate"] = up.BootState(active=0, sv=1, ksv=1).encode()
sys.modules["esp32"] = chip.module      # what the firmware's own esp32 module would be
from board.esp32_slots import Esp32Slots
config = up.Config("sim-v1", ROOT_PUB, k=2, trial_acks_min=2, trial_ms_max=60000)
reports = []

def boot():
    chip.reset()
    slots = Esp32Slots(flash)            # imports esp32 itself
    u = up.Updater(config)
    slot, blob = slots.boot()
    return u, slots, run(slots, u.handle(up.Booted(slot, blob)))

def run(slots, actions):
    pending = []
    for a in actions:
        if isinstance(a, up.WriteSlot):
            slots.write_slot(a.slot, a.offset, a.data)
        elif isinstance(a, up.WriteBootState):
            slots.write_boot_state(a.data)
        elif isinstance(a, up.Report):
            reports.append(a.status)
        elif isinstance(a, up.Reboot):
            pending.append("reboot")
        else:
            pending.append(a)
    return pending

u, slots, _ = boot()
pending = run(slots, u.handle(up.Offer(BUNDLE, NOW_MS)))
while pending and pending[0] != "reboot":
    a = pending.pop(0)
    if isinstance(a, up.ReadSlot):
        event = up.SlotRead(a.offset, slots.read_slot(a.slot, a.offset, a.length))
    elif isinstance(a, up.StepLater):
        event = up.Step()
    else:
        event = up.Chunk(a.index, NEW[a.index * 4096:(a.index + 1) * 4096])
    pending = run(slots, u.handle(event))
u, slots, _ = boot()
run(slots, u.handle(up.Healthy(2, NOW_MS + 1000)))
e = chip.entries()
print(",".join(reports), u.state, chip.running, e[chip.active(e)].state == em.IMG_VALID)
"""


def test_esp32_slots_on_micropython_with_the_model_as_esp32():
    from mpy import require_micropython, run_micropython
    require_micropython()
    code = "ROOT_PUB = %r\nBUNDLE = %r\nOLD = %r\nNEW = %r\nNOW_MS = %d\n" % (
        ROOT_PUB, NEW_BUNDLE, OLD_BIN, NEW_BIN, NOW_MS) + MPY_ESP32
    out = run_micropython(code, heap_kb=8192, modules=("agent", "board"), timeout_s=180)
    assert out.split() == ["downloading,verified,installed,trial,confirmed", "confirmed",
                           "ota_1", "True"]


def test_cut_while_marking_the_new_image_valid_converges_on_the_new_image():
    """Confirm writes the record, then ESP-IDF erases and reprograms the otadata
    entry in place. Cut at that erase: the bootloader boots the old image (the
    older entry wins), the board points otadata at the confirmed slot again,
    the updater answers Booted with Reboot, and the new image comes back."""
    probe = Device(rig=Esp32Rig())
    probe.power_on()
    drive(probe)
    total = probe.total_writes()                  # ..., record, erase, program
    device = Device(cut_at=[total - 1], rig=Esp32Rig())
    device.power_on()
    drive(device)
    assert device.power_cuts == 1 and device.state == up.CONFIRMED
    # trial, then the cut: the old image runs once and reboots into the new one
    assert device.boots == [(0, "1.0.0"), (1, "1.1.0"), (0, "1.0.0"), (1, "1.1.0")]
    assert device.reports[-1][:2] == ("confirmed", "")
    e = device.rig.chip.entries()
    assert e[device.rig.chip.active(e)].state == em.IMG_VALID
    assert device.rig.chip.boot_label() == "ota_1"
