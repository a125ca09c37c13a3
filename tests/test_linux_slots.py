"""board.linux_slots: agent.updater on real files in a temp dir (two slot
files, the boot-state record and the boot environment, each replaced with
temp file + fsync + rename + directory fsync), in file mode and through
U-Boot's tool interface (fw_printenv / fw_setenv): here two small real
scripts put first on PATH that keep the environment in one file, and the
bootloader's bootcount step played by linux_slots.bootcount_step on that
environment, as U-Boot would before Linux starts.

Power cuts: the board calls fault(point) before each durable step; the rig
raises PowerCut at the chosen one and starts a fresh LinuxSlots (a new
process) on the same files. The OS is not cut: data that was written is
there (the fsyncs are what makes that true of a real cut)."""

import os
import stat
import sys

import pytest

from agent import updater as up
from board import linux_slots as ls
from board.sim import PowerCut
from test_updater import (CONFIGS, PER_CHUNK, NEW_BIN, OLD_BIN, Device, cut_everywhere, drive,
                          image_version, statuses)

FAKE_PRINTENV = """#!/bin/sh
cat "$FAKE_UBOOT_ENV" 2>/dev/null
exit 0
"""

FAKE_SETENV = """#!%s
# fw_setenv NAME VALUE | fw_setenv -s FILE ("NAME VALUE" lines); empty VALUE deletes.
import os, sys
path = os.environ["FAKE_UBOOT_ENV"]
env = {}
if os.path.exists(path):
    for line in open(path):
        name, _, value = line.rstrip("\\n").partition("=")
        env[name] = value
if sys.argv[1] == "-s":
    pairs = [line.rstrip("\\n").partition(" ")[::2] for line in open(sys.argv[2]) if line.strip()]
else:
    pairs = [(sys.argv[1], " ".join(sys.argv[2:]))]
for name, value in pairs:
    if value:
        env[name] = value
    else:
        env.pop(name, None)
with open(path + ".tmp", "w") as f:
    f.write("".join("%%s=%%s\\n" %% kv for kv in sorted(env.items())))
    f.flush()
    os.fsync(f.fileno())
os.replace(path + ".tmp", path)
""" % sys.executable


class Faults:
    """Counts durable steps since power on; raises PowerCut at cut_at."""

    def __init__(self):
        self.writes = 0
        self.cut_at = None
        self.points = []

    def __call__(self, point):
        self.writes += 1
        self.points.append(point)
        if self.cut_at is not None and self.writes == self.cut_at:
            raise PowerCut("power cut before %s" % point)


class LinuxRig:
    """The linux board on files under root; uboot=True drives U-Boot's tools."""

    def __init__(self, root, uboot=False, sv=1):
        self.root = str(root)
        self.uboot = uboot
        self.faults = Faults()
        self.slots = self._slots()
        with open(os.path.join(self.root, ls.SLOT_FILES[0]), "wb") as f:
            f.write(OLD_BIN)
        ls.write_atomic(os.path.join(self.root, ls.BOOT_STATE),
                        up.BootState(active=0, sv=sv, ksv=1).encode())
        self.slots.env.update({"boot_slot": 0, "upgrade_available": 0, "bootcount": 0})
        self.faults.writes = 0                   # the factory image is not part of the flow

    def _slots(self):
        return ls.LinuxSlots(self.root, fault=self.faults)   # env: ls.default_env

    @property
    def writes(self):
        return self.faults.writes

    def power_on(self, cut_at_write):
        self.faults.writes = 0
        self.faults.cut_at = cut_at_write
        self.slots = self._slots()

    def start(self):
        if self.uboot:                    # U-Boot ran before Linux
            ls.bootcount_step(self.slots.env)
        return self.slots.boot()

    def version(self, slot):
        return image_version(self.slots.read_slot(slot))


@pytest.fixture
def uboot_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("fw_printenv", FAKE_PRINTENV), ("fw_setenv", FAKE_SETENV)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env_file = tmp_path / "uboot.env"
    monkeypatch.setenv("FAKE_UBOOT_ENV", str(env_file))
    monkeypatch.setenv("PATH", "%s%s%s" % (bin_dir, os.pathsep, os.environ["PATH"]))
    return env_file


def test_file_mode_happy_path_on_real_files(tmp_path):
    rig = LinuxRig(tmp_path / "dev")
    assert isinstance(rig.slots.env, ls.FileEnv)
    device = Device(rig=rig)
    device.power_on()
    drive(device)
    assert device.state == up.CONFIRMED
    assert statuses(device) == ["downloading", "verified", "installed", "trial", "confirmed"]
    assert device.boots == [(0, "1.0.0"), (1, "1.1.0")]
    env = rig.slots.env.read()
    assert (env["boot_slot"], env["upgrade_available"]) == ("1", "0")
    with open(os.path.join(rig.root, ls.SLOT_FILES[1]), "rb") as f:
        assert f.read() == NEW_BIN
    assert sorted(os.listdir(rig.root)) == ["bootenv", "bootstate", "slot0.img", "slot1.img"]
    device.power_on()
    assert device.boots[-1] == (1, "1.1.0")


def test_file_mode_unplanned_reboot_in_trial_rolls_back(tmp_path):
    rig = LinuxRig(tmp_path / "dev")
    device = Device(rig=rig)
    device.power_on()
    drive(device, until=up.TRIAL)                  # up to the trial boot
    assert device.state == up.TRIAL and device.boots[-1] == (1, "1.1.0")
    device.power_on()                            # crash before confirming
    assert device.state == up.ROLLED_BACK
    assert device.reports[-1][:2] == ("rolled_back", "unplanned_reboot")
    assert device.boots[-1] == (0, "1.0.0")
    assert rig.slots.env.read()["boot_slot"] == "0"


def test_write_to_the_running_slot_is_refused(tmp_path):
    rig = LinuxRig(tmp_path / "dev")
    rig.slots.boot()
    with pytest.raises(ls.SlotError):
        rig.slots.write_slot(0, 0, b"x")
    with pytest.raises(ls.SlotError):
        rig.slots.write_slot(1, 4096, b"x")      # a gap


def test_atomic_write_cut_before_rename_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "f")
    ls.write_atomic(path, b"old")
    faults = Faults()
    faults.cut_at = 2                            # "write f", then "rename f"
    with pytest.raises(PowerCut):
        ls.write_atomic(path, b"new", faults)
    assert open(path, "rb").read() == b"old" and os.listdir(str(tmp_path)) == ["f"]
    ls.write_atomic(path, b"new")
    assert open(path, "rb").read() == b"new"


@pytest.mark.parametrize("healthy", [True, False])
@CONFIGS
def test_file_mode_power_cut_at_every_durable_step(tmp_path, healthy, config):
    runs = []

    def make_rig(seed):
        runs.append(1)
        return LinuxRig(tmp_path / ("dev%d" % len(runs)))

    total, outcomes = cut_everywhere(make_rig, healthy, config=config)
    assert total >= (20 if config is PER_CHUNK else 16)
    assert set(outcomes) <= {up.CONFIRMED, up.ROLLED_BACK}
    if healthy:
        assert outcomes[up.CONFIRMED] > outcomes.get(up.ROLLED_BACK, 0) > 0


def test_uboot_tools_are_used_when_on_path(tmp_path, uboot_tools):
    rig = LinuxRig(tmp_path / "dev", uboot=True)
    assert isinstance(rig.slots.env, ls.UBootEnv)
    device = Device(rig=rig)
    device.power_on()
    drive(device)
    assert device.state == up.CONFIRMED and device.boots[-1] == (1, "1.1.0")
    text = uboot_tools.read_text()
    assert "boot_slot=1\n" in text and "upgrade_available=0\n" in text
    assert not os.path.exists(os.path.join(rig.root, ls.BOOT_ENV))


def test_uboot_bootcount_rolls_back_a_trial_that_reboots(tmp_path, uboot_tools):
    rig = LinuxRig(tmp_path / "dev", uboot=True)
    device = Device(rig=rig)
    device.power_on()
    drive(device, until=up.TRIAL)
    assert device.state == up.TRIAL
    assert "bootcount=1\n" in uboot_tools.read_text()    # U-Boot counted the trial boot
    device.power_on()
    assert device.state == up.ROLLED_BACK and device.boots[-1] == (0, "1.0.0")
    assert device.reports[-1][:2] == ("rolled_back", "unplanned_reboot")
    assert "boot_slot=0\n" in uboot_tools.read_text()


@pytest.mark.parametrize("healthy", [True, False])
@CONFIGS
def test_uboot_power_cut_at_every_durable_step(tmp_path, uboot_tools, healthy, config):
    runs = []

    def make_rig(seed):
        runs.append(1)
        os.environ["FAKE_UBOOT_ENV"] = str(tmp_path / ("uboot%d.env" % len(runs)))
        return LinuxRig(tmp_path / ("dev%d" % len(runs)), uboot=True)

    total, outcomes = cut_everywhere(make_rig, healthy, config=config)
    assert set(outcomes) <= {up.CONFIRMED, up.ROLLED_BACK}
    assert total >= (20 if config is PER_CHUNK else 16)
