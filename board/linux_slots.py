"""A/B slots for the Linux board: two slot files (or block devices) and the
updater's boot-state record on disk, the boot selection in U-Boot's
environment when `fw_setenv`/`fw_printenv` are on PATH, else in an
environment file of our own. The same interface as board.slots.SimSlots,
so agent/updater.py drives it unchanged (docs/firmware-boards.md).

Files under `root`:

- `slot0.img`, `slot1.img` unless `slot_paths` names others (partitions
  such as /dev/mmcblk0p2 work: writes go in place, nothing is truncated
  unless the path is a regular file);
- `bootstate`: the updater's record, replaced atomically (temporary file,
  fsync, rename, fsync of the directory): wholly old or wholly new;
- `bootenv` (file mode only): the boot variables as `name=value` lines,
  replaced the same way.

The boot variables, the contract with the bootloader:

| variable | meaning |
| --- | --- |
| `boot_slot` | slot the bootloader starts: 0 or 1 |
| `upgrade_available` | 1 while a new slot is on trial |
| `bootcount` | boots since upgrade_available was set |

A bootloader with U-Boot's bootcount feature (bootlimit=1) increments
`bootcount` at each boot while `upgrade_available` is 1 and, past the
limit, runs `altbootcmd`, which must swap `boot_slot` and clear
`upgrade_available`: so a trial image gets exactly one boot. In file mode
`boot()` does that same step itself (`bootcount_step`), playing the
bootloader for a launcher that starts the agent from a slot directory.

What boot() does after the bootloader's step, in both modes: it compares
the running slot with the updater's record and writes the record the
updater expects, as board.slots' bootloader does ("installed" on the target
becomes "trial"; "trial" found again means the trial image rebooted before
confirming: "rolled_back", reason "unplanned_reboot"). The record is the
truth; the environment is brought into line with it after each record write
(write_boot_state), so a cut between the two is repaired at the next boot.

`fault(point)` is called before each durable step (tests cut power there).
"""

import os
import shutil
import subprocess
import tempfile

from agent import updater

SLOT_FILES = ("slot0.img", "slot1.img")
BOOT_STATE = "bootstate"
BOOT_ENV = "bootenv"
BOOT_LIMIT = 1
ENV_NAMES = ("boot_slot", "upgrade_available", "bootcount")


class SlotError(Exception):
    """A slot operation the board refuses (writing the running slot, a gap)."""


def _no_fault(point):
    pass


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data, fault=_no_fault):
    """Replace the file at path with data: temp file, fsync, rename, fsync dir."""
    directory = os.path.dirname(os.path.abspath(path))
    fault("write " + os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault("rename " + os.path.basename(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


# ---------------------------------------------------------------- environments

class FileEnv:
    """The boot variables in a file of `name=value` lines, replaced atomically."""

    def __init__(self, path, fault=_no_fault):
        self.path = path
        self.fault = fault

    def read(self):
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            return {}
        return parse_env(text)

    def update(self, values):
        env = self.read()
        env.update(values)
        text = "".join("%s=%s\n" % (name, env[name]) for name in sorted(env))
        write_atomic(self.path, text.encode("utf-8"), self.fault)


class UBootEnv:
    """U-Boot's environment through the fw_printenv / fw_setenv tools
    (libubootenv or u-boot-tools): `fw_printenv` prints `name=value` lines,
    `fw_setenv -s FILE` sets every `name value` line of FILE in one
    environment write (the tools keep a redundant copy, so it is atomic)."""

    def __init__(self, printenv="fw_printenv", setenv="fw_setenv", fault=_no_fault):
        self.printenv = printenv
        self.setenv = setenv
        self.fault = fault

    def read(self):
        out = subprocess.run([self.printenv], capture_output=True, check=True, timeout=30)
        return parse_env(out.stdout.decode("utf-8", "replace"))

    def update(self, values):
        script = "".join("%s %s\n" % (name, values[name]) for name in sorted(values))
        self.fault("fw_setenv")
        with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as f:
            f.write(script)
        try:
            subprocess.run([self.setenv, "-s", f.name], capture_output=True, check=True,
                           timeout=30)
        finally:
            os.unlink(f.name)


def parse_env(text):
    env = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip():
            env[name.strip()] = value.strip()
    return env


def default_env(root, fault=_no_fault):
    """U-Boot's environment when both tools are on PATH, else a file under root."""
    printenv, setenv = shutil.which("fw_printenv"), shutil.which("fw_setenv")
    if printenv and setenv:
        return UBootEnv(printenv, setenv, fault)
    return FileEnv(os.path.join(root, BOOT_ENV), fault)


def env_int(env, name, default=0):
    try:
        return int(env.get(name, default))
    except ValueError:
        return default


def bootcount_step(env):
    """What U-Boot's bootcount does at a boot, on an environment object:
    returns the slot it starts."""
    values = env.read()
    slot = env_int(values, "boot_slot") & 1
    if env_int(values, "upgrade_available") != 1:
        return slot
    count = env_int(values, "bootcount") + 1
    if count > BOOT_LIMIT:                        # altbootcmd: back to the other slot
        slot = 1 - slot
        env.update({"boot_slot": slot, "upgrade_available": 0, "bootcount": 0})
    else:
        env.update({"bootcount": count})
    return slot


# ---------------------------------------------------------------- the slots

class LinuxSlots:
    def __init__(self, root, env=None, slot_paths=None, fault=None, bootloader=None):
        """bootloader: True runs bootcount_step in boot() (no U-Boot before
        us); the default is True for a FileEnv and False for U-Boot."""
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.fault = fault or _no_fault
        self.env = env if env is not None else default_env(self.root, self.fault)
        self.slot_paths = tuple(slot_paths or [os.path.join(self.root, n) for n in SLOT_FILES])
        self.bootloader = isinstance(self.env, FileEnv) if bootloader is None else bootloader
        self.running = None

    # -- what the driver executes ------------------------------------------------

    def write_slot(self, slot, offset, data):
        if slot == self.running:
            raise SlotError("slot %d is running; refusing to write it" % slot)
        path = self.slot_paths[slot]
        regular = not os.path.exists(path) or os.path.isfile(path)
        if regular and offset > self._size(path):
            raise SlotError("write at %d leaves a gap in %s" % (offset, path))
        self.fault("slot %d @%d" % (slot, offset))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if regular and offset == 0:
                os.ftruncate(fd, 0)                  # a new image starts: empty the slot
            os.lseek(fd, offset, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)                             # on disk before the cursor moves past it
        finally:
            os.close(fd)

    def read_slot(self, slot, offset=0, length=None):
        try:
            with open(self.slot_paths[slot], "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            return b""

    def read_boot_state(self):
        try:
            with open(os.path.join(self.root, BOOT_STATE), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_boot_state(self, data):
        """The record first, then the environment brought into line with it."""
        write_atomic(os.path.join(self.root, BOOT_STATE), data, self.fault)
        state = updater.decode_boot_state(data)
        if state.phase in (updater.INSTALLED, updater.CONFIRMED, updater.ROLLED_BACK):
            self._sync_env(state)       # not per chunk: U-Boot's tools are a process each

    def _sync_env(self, state):
        """Point the bootloader where the record says: the target once for a
        trial, else the confirmed slot."""
        if state.phase == updater.INSTALLED:
            self.env.update({"boot_slot": state.target, "upgrade_available": 1, "bootcount": 0})
        elif state.phase != updater.TRIAL:
            want = {"boot_slot": state.active, "upgrade_available": 0, "bootcount": 0}
            if self._env_differs(want):
                self.env.update(want)

    def _env_differs(self, want):
        have = self.env.read()
        for name in want:
            if env_int(have, name, -1) != want[name]:
                return True
        return False

    # -- boot ----------------------------------------------------------------------

    def boot(self):
        """(slot running, boot-state bytes left for the updater)."""
        slot = bootcount_step(self.env) if self.bootloader else \
            env_int(self.env.read(), "boot_slot") & 1
        self.running = slot
        blob = self.read_boot_state()
        state = updater.decode_boot_state(blob)
        if state.phase == updater.INSTALLED and slot == state.target:
            blob = state.copy(phase=updater.TRIAL, seq=state.seq + 1).encode()
            write_atomic(os.path.join(self.root, BOOT_STATE), blob, self.fault)
        elif state.phase == updater.TRIAL:
            blob = state.copy(phase=updater.ROLLED_BACK, reason="unplanned_reboot",
                              manifest=b"", cursor=0, seq=state.seq + 1).encode()
            self.write_boot_state(blob)
        elif state.phase != updater.INSTALLED:
            self._sync_env(state)       # repair an environment write a cut lost
        return slot, blob

    @staticmethod
    def _size(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            return 0
