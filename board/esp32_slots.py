"""A/B slots for the ESP32 under MicroPython: the two OTA app partitions
through `esp32.Partition`, the boot selection in ESP-IDF's otadata (set_boot,
mark_app_valid_cancel_rollback), the updater's boot-state record in board
storage (board.esp32.FlashStorage on LittleFS: write_atomic is all or
nothing). The same interface as board.slots.SimSlots, so agent/updater.py
drives it unchanged. Needs a MicroPython built with ESP-IDF's app rollback
(CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE): a new image boots once in
PENDING_VERIFY and the bootloader aborts it at the next reset unless it was
marked valid.

Nothing touches hardware at import time: `esp32` is imported in the
constructor, or passed in (tests pass board.esp32_model's).

How the updater's record maps onto otadata (the record is written first,
then otadata is brought into line with it, so a cut between the two is
repaired at the next boot):

| record written | then |
| --- | --- |
| installed | the target's set_boot() (otadata: NEW) |
| confirmed | mark_app_valid_cancel_rollback() (VALID) |
| rolled_back | point otadata at the confirmed slot again |

and at boot(), after the bootloader chose (Partition.RUNNING):

| record | running | boot() |
| --- | --- | --- |
| installed | target | write "trial" (otadata is PENDING_VERIFY now) |
| installed | not target | leave it: the updater rolls back ("no_trial") |
| trial | any | the trial image restarted before confirming: write "rolled_back" ("unplanned_reboot"), point otadata at the confirmed slot |
| other | any | point otadata at the confirmed slot (set_boot if Partition.BOOT is another), mark it valid when it is the one running |

If the running slot is not the confirmed one outside a trial, the updater
answers Booted with Reboot (agent/updater.py).
"""

from agent import updater

BOOT_STATE = "bootstate"
LABELS = ("ota_0", "ota_1")
BLOCK_BYTES = 4096
IOCTL_BLOCK_SIZE = 5


class SlotError(Exception):
    """A slot operation the board refuses (writing the running slot, misalignment)."""


class Esp32Slots:
    def __init__(self, storage, esp32=None, labels=LABELS):
        if esp32 is None:
            import esp32
        self.Partition = esp32.Partition
        self.storage = storage
        self.labels = labels
        self.parts = [self.Partition(label) for label in labels]
        if self.parts[0].ioctl(IOCTL_BLOCK_SIZE, 0) != BLOCK_BYTES:
            raise SlotError("partitions must have 4096-byte blocks")
        self.running = None
        self._wbuf = None          # one block, for a short last chunk
        self._rbuf = bytearray(BLOCK_BYTES)

    def slot_of(self, partition):
        label = partition.info()[4]
        for i in range(len(self.labels)):
            if self.labels[i] == label:
                return i
        raise SlotError("partition %s is not an update slot" % label)

    # -- what the driver executes --------------------------------------------------

    def write_slot(self, slot, offset, data):
        """Erase and program whole blocks; a short tail is padded with 0xFF."""
        if slot == self.running:
            raise SlotError("slot %d is running; refusing to write it" % slot)
        if offset % BLOCK_BYTES:
            raise SlotError("slot writes start on a block (offset %d)" % offset)
        part = self.parts[slot]
        view = memoryview(data)
        block = offset // BLOCK_BYTES
        while len(view) >= BLOCK_BYTES:
            part.writeblocks(block, view[:BLOCK_BYTES])      # erases the block first
            view = view[BLOCK_BYTES:]
            block += 1
        if len(view):
            if self._wbuf is None:
                self._wbuf = bytearray(BLOCK_BYTES)
            buf = self._wbuf
            for i in range(len(view), BLOCK_BYTES):
                buf[i] = 0xFF
            buf[:len(view)] = view
            part.writeblocks(block, buf)

    def read_slot(self, slot, offset=0, length=None):
        """Bytes of the slot. A read of at most one block comes back as a view
        of one reused buffer, valid until the next read."""
        part = self.parts[slot]
        if length is None:
            length = part.info()[3] - offset
        block, within = offset // BLOCK_BYTES, offset % BLOCK_BYTES
        if length <= BLOCK_BYTES:
            view = memoryview(self._rbuf)[:length]
            part.readblocks(block, view, within)
            return view
        buf = bytearray(length)
        part.readblocks(block, buf, within)
        return buf

    def read_boot_state(self):
        return self.storage.read(BOOT_STATE)

    def write_boot_state(self, data):
        self.storage.write_atomic(BOOT_STATE, data)
        state = updater.decode_boot_state(data)
        if state.phase == updater.INSTALLED:
            self.parts[state.target].set_boot()
        elif state.phase in (updater.CONFIRMED, updater.ROLLED_BACK):
            self._point_at_active(state)

    # -- boot ------------------------------------------------------------------------

    def boot(self):
        """(slot running, boot-state bytes left for the updater)."""
        slot = self.slot_of(self.Partition(self.Partition.RUNNING))
        self.running = slot
        blob = self.read_boot_state()
        state = updater.decode_boot_state(blob)
        if state.phase == updater.INSTALLED:
            if slot == state.target:
                blob = state.copy(phase=updater.TRIAL, seq=state.seq + 1).encode()
                self.storage.write_atomic(BOOT_STATE, blob)
        elif state.phase == updater.TRIAL:
            blob = state.copy(phase=updater.ROLLED_BACK, reason="unplanned_reboot",
                              manifest=b"", cursor=0, seq=state.seq + 1).encode()
            self.write_boot_state(blob)
        else:
            self._point_at_active(state)
        return slot, blob

    def _point_at_active(self, state):
        """otadata names the confirmed slot, and it is marked valid once it runs."""
        boot = self.slot_of(self.Partition(self.Partition.BOOT))
        if boot != state.active:
            self.parts[state.active].set_boot()
        if self.running == state.active:
            try:
                self.Partition.mark_app_valid_cancel_rollback()
            except OSError:
                pass    # otadata holds no entry to mark (the image booted from blank otadata)
