"""Simulated A/B flash slots for the sim board, with the bootloader's part.

Storage is a board.sim.SimFlash, so the same power-cut injection applies:
a slot write is an append that a cut can tear (rewriting from an offset
first cuts the slot back there, a separate write), the boot-state record
is replaced with write_atomic (wholly old or wholly new).

The bootloader reads the boot-state record (agent.updater's format):
- phase "installed": write phase "trial" (next report seq), boot `target`
  once;
- phase "trial": the trial image rebooted before confirming: write
  "rolled_back" (reason "unplanned_reboot"), boot `active`;
- anything else: boot `active`.
Its own write happens before the jump, so a cut there boots again from
whichever record survived.

The interface every slot board gives the update driver (board/linux_slots.py
and board/esp32_slots.py too): write_slot(slot, offset, data),
read_slot(slot, offset=0, length=None), write_boot_state(data),
read_boot_state(), and boot() -> (slot running, boot-state bytes).
"""

from agent import updater

SLOT_NAMES = ("slot0", "slot1")
BOOT_STATE = "bootstate"


class SimSlots:
    def __init__(self, flash):
        self.flash = flash

    # -- what the driver executes ----------------------------------------------

    def write_slot(self, slot, offset, data):
        name = SLOT_NAMES[slot]
        have = len(self.flash.read(name) or b"")
        if offset > have:
            raise ValueError("write at %d leaves a gap in %s (%d bytes)" % (offset, name, have))
        if offset < have:                       # erase back to offset first
            self.flash.write_atomic(name, (self.flash.read(name) or b"")[:offset])
        self.flash.append(name, data)

    def write_boot_state(self, data):
        self.flash.write_atomic(BOOT_STATE, data)

    def read_slot(self, slot, offset=0, length=None):
        """length bytes of the slot from offset (to its end when None); short
        at the end of what was written."""
        data = self.flash.read(SLOT_NAMES[slot]) or b""
        return data[offset:] if length is None else data[offset:offset + length]

    def read_boot_state(self):
        return self.flash.read(BOOT_STATE)

    # -- the bootloader ------------------------------------------------------------

    def boot(self):
        """Choose the slot to run; returns (slot, boot-state bytes it leaves)."""
        blob = self.read_boot_state()
        state = updater.decode_boot_state(blob)
        if state.phase == updater.INSTALLED:
            blob = state.copy(phase=updater.TRIAL, seq=state.seq + 1).encode()
            self.write_boot_state(blob)
            return state.target, blob
        if state.phase == updater.TRIAL:
            blob = state.copy(phase=updater.ROLLED_BACK, reason="unplanned_reboot",
                              manifest=b"", cursor=0, seq=state.seq + 1).encode()
            self.write_boot_state(blob)
            return state.active, blob
        return state.active, blob
