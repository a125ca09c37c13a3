"""A model of MicroPython's `esp32.Partition` on ESP-IDF, over SimFlash, for
testing board/esp32_slots.py where there is no ESP32 (CPython and the
MicroPython WebAssembly port alike: the module is MicroPython-subset).

    chip = Esp32Model(flash, app_bytes=0x10000, validate=fn)
    chip.flash_image("ota_0", image)     # esptool at the factory (no power cuts)
    chip.reset()                         # the second-stage bootloader
    esp32 = chip.module                  # what `import esp32` gives the app
    p = esp32.Partition(esp32.Partition.RUNNING)

What is modelled, from ESP-IDF's sources (components/app_update/esp_ota_ops.c,
bootloader_support/src/bootloader_utility.c and bootloader_common.c) and
MicroPython's ports/esp32/esp32_partition.c; docs/firmware-boards.md has
the list and what is left out:

- NOR flash: erase sets a 4 KiB sector to 0xFF; a program can only clear
  bits (new = old AND data), so writing without erasing first corrupts.
  Each erase and each program is one write of the SimFlash (its power-cut
  counter and rng): a cut erase leaves a random prefix erased, a cut
  program a random prefix programmed.
- Partition: the API of MicroPython 1.2x: Partition(label | BOOT | RUNNING),
  find(type, subtype, label), info(), readblocks/writeblocks with 4096-byte
  blocks (without an offset writeblocks erases the range first, which must
  be whole sectors), ioctl (1..6), set_boot(), get_next_update(),
  mark_app_valid_cancel_rollback(). Errors are OSError, as there.
- otadata: two sectors, each an esp_ota_select_entry_t (ota_seq u32,
  seq_label[20], ota_state u32, crc u32 = crc32_le(UINT32_MAX, ota_seq));
  an entry counts if ota_seq != 0xFFFFFFFF, its crc matches and its state
  is neither INVALID nor ABORTED; the higher seq wins; slot = (seq-1) % 2.
  set_boot validates the image, then writes seq+1 (or the same seq, when the
  winning entry already names that slot) into the other sector (the same)
  with state NEW; marking valid rewrites the winning entry in place
  (erase, then program: a cut between loses that entry).
- The bootloader with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE: every
  PENDING_VERIFY entry becomes ABORTED; a NEW winner becomes
  PENDING_VERIFY; with no entry that counts it boots ota_0; an image that
  fails validation is skipped for the next slot down, then up; blank
  otadata gets seq 1 VALID for the slot it booted. No bootable slot:
  BootFailure (a brick).
"""

import struct

SECTOR_BYTES = 4096
ERASED_SEQ = 0xFFFFFFFF
ENTRY_BYTES = 32
# esp_ota_img_states_t
IMG_NEW = 0x0
IMG_PENDING_VERIFY = 0x1
IMG_VALID = 0x2
IMG_INVALID = 0x3
IMG_ABORTED = 0x4
IMG_UNDEFINED = 0xFFFFFFFF
# partition types and subtypes
TYPE_APP = 0
TYPE_DATA = 1
SUBTYPE_OTA_0 = 0x10
SUBTYPE_DATA_OTA = 0x00
# esp_err_t values MicroPython raises as OSError(-code)
ESP_FAIL = -1
ESP_ERR_INVALID_ARG = 0x102
ESP_ERR_INVALID_SIZE = 0x104
ESP_ERR_NOT_FOUND = 0x105
ESP_ERR_NOT_SUPPORTED = 0x106
ESP_ERR_OTA_VALIDATE_FAILED = 0x1503
FLASH_KEY = "esp32.flash"          # the SimFlash file that holds the whole chip

BOOT = 0
RUNNING = 1


class BootFailure(Exception):
    """The bootloader found no bootable app: the device is bricked."""


def crc32_le(crc, data):
    """ESP-IDF's esp_rom_crc32_le (zlib's CRC-32, crc in and out complemented)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def pack_entry(seq, state, label=b"\xff" * 20):
    crc = crc32_le(0xFFFFFFFF, struct.pack("<I", seq))
    return struct.pack("<I", seq) + label + struct.pack("<II", state, crc)


def _esp_error(code):
    return OSError(-code if code > 0 else code)


class Entry:
    """One esp_ota_select_entry_t as read from its sector."""

    def __init__(self, raw):
        self.seq = struct.unpack_from("<I", raw, 0)[0]
        self.label = bytes(raw[4:24])
        self.state = struct.unpack_from("<I", raw, 24)[0]
        self.crc = struct.unpack_from("<I", raw, 28)[0]

    def crc_ok(self):
        return self.crc == crc32_le(0xFFFFFFFF, struct.pack("<I", self.seq))

    def invalid(self):        # bootloader_common_ota_select_invalid
        return self.seq == ERASED_SEQ or self.state in (IMG_INVALID, IMG_ABORTED)

    def counts(self):         # bootloader_common_ota_select_valid
        return not self.invalid() and self.crc_ok()


class Esp32Model:
    def __init__(self, flash, app_bytes=0x10000, validate=None, rollback=True):
        """validate(partition bytes) -> bool stands in for esp_image_verify
        (header, checksum, appended SHA-256); the default accepts anything
        that does not start with an erased byte."""
        self.flash = flash
        self.rollback = rollback
        self.validate = validate or (lambda data: data[0] != 0xFF)
        otadata_at = 0xD000
        app_at = 0x10000
        # (label, type, subtype, address, size), as in a partition table
        self.table = [
            ("otadata", TYPE_DATA, SUBTYPE_DATA_OTA, otadata_at, 2 * SECTOR_BYTES),
            ("ota_0", TYPE_APP, SUBTYPE_OTA_0, app_at, app_bytes),
            ("ota_1", TYPE_APP, SUBTYPE_OTA_0 + 1, app_at + app_bytes, app_bytes),
        ]
        self.size = app_at + 2 * app_bytes
        if FLASH_KEY not in flash.files:
            flash.files[FLASH_KEY] = bytearray(b"\xff" * self.size)
        self.running = None       # label of the app the bootloader started
        self.module = _make_module(self)

    # -- the flash chip ---------------------------------------------------------

    def _mem(self):
        self.flash._alive()
        return self.flash.files[FLASH_KEY]

    def read(self, addr, n):
        return bytes(self._mem()[addr:addr + n])

    def erase(self, addr, n):
        """Erase whole sectors, one write (and one power-cut point) each."""
        if addr % SECTOR_BYTES or n % SECTOR_BYTES:
            raise _esp_error(ESP_ERR_INVALID_SIZE)
        mem = self._mem()
        for start in range(addr, addr + n, SECTOR_BYTES):
            if self.flash._cut_now():
                done = self.flash.rng.randint(0, SECTOR_BYTES)
                mem[start:start + done] = b"\xff" * done
                self.flash._die()
            mem[start:start + SECTOR_BYTES] = b"\xff" * SECTOR_BYTES

    def program(self, addr, data):
        """NOR programming: bits can only go from 1 to 0."""
        mem = self._mem()
        n = len(data)
        if self.flash._cut_now():
            n = self.flash.rng.randint(0, n)
            self._and(mem, addr, data, n)
            self.flash._die()
        self._and(mem, addr, data, n)

    @staticmethod
    def _and(mem, addr, data, n):
        for i in range(n):
            mem[addr + i] &= data[i]

    def flash_image(self, label, image):
        """What esptool does at the factory: erase the partition, write the image."""
        _, _, _, addr, size = self.part(label)
        mem = self.flash.files[FLASH_KEY]
        mem[addr:addr + size] = b"\xff" * size
        mem[addr:addr + len(image)] = image

    def part(self, label):
        for row in self.table:
            if row[0] == label:
                return row
        return None

    def apps(self):
        return [row for row in self.table if row[1] == TYPE_APP]

    def app_bytes(self, label):
        _, _, _, addr, size = self.part(label)
        return self.read(addr, size)

    # -- otadata ------------------------------------------------------------------

    def entries(self):
        addr = self.part("otadata")[3]
        return [Entry(self.read(addr + i * SECTOR_BYTES, ENTRY_BYTES)) for i in (0, 1)]

    def write_entry(self, sector, seq, state, label=b"\xff" * 20):
        """rewrite_ota_seq / write_otadata: erase the sector, program the entry."""
        addr = self.part("otadata")[3] + sector * SECTOR_BYTES
        self.erase(addr, SECTOR_BYTES)
        self.program(addr, pack_entry(seq, state, label))

    @staticmethod
    def active(entries):
        """bootloader_common_get_active_otadata: the counting entry with the higher seq."""
        best = -1
        for i in (0, 1):
            if entries[i].counts() and (best < 0 or entries[i].seq > entries[best].seq):
                best = i
        return best

    def slot_of_seq(self, seq):
        return (seq - 1) % len(self.apps())

    def boot_label(self):
        """esp_ota_get_boot_partition."""
        e = self.entries()
        best = self.active(e)
        if best < 0:
            return self.apps()[0][0]          # no factory: the first OTA slot
        return self.apps()[self.slot_of_seq(e[best].seq)][0]

    # -- the bootloader -------------------------------------------------------------

    def reset(self):
        """Power-on or reset: the second-stage bootloader chooses and starts an app."""
        self.running = None
        e = self.entries()
        if self.rollback:
            for i in (0, 1):
                if e[i].state == IMG_PENDING_VERIFY:
                    self.write_entry(i, e[i].seq, IMG_ABORTED, e[i].label)
            e = self.entries()
        initial = False
        if e[0].invalid() and e[1].invalid():
            start = 0
            initial = all(x.seq == ERASED_SEQ or not x.crc_ok() for x in e)
        else:
            best = self.active(e)
            if best < 0:
                start = -1                    # try every slot
            else:
                start = self.slot_of_seq(e[best].seq)
                if self.rollback and e[best].state == IMG_NEW:
                    self.write_entry(best, e[best].seq, IMG_PENDING_VERIFY, e[best].label)
        return self._load(start, initial)

    def _load(self, start, initial):
        """bootloader_utility_load_boot_image: start, then down, then up."""
        apps = self.apps()
        order = list(range(start, -1, -1)) + list(range(start + 1, len(apps)))
        for index in order:
            if index < 0:
                continue
            label = apps[index][0]
            if self.validate(self.app_bytes(label)):
                if initial:                       # set_actual_ota_seq
                    self.write_entry(0, index + 1, IMG_VALID)
                self.running = label
                return label
        raise BootFailure("no bootable app partition")

    # -- esp_ota_ops -------------------------------------------------------------------

    def set_boot(self, label):
        """esp_ota_set_boot_partition (MicroPython raises its error)."""
        row = self.part(label)
        if row[1] != TYPE_APP:
            raise _esp_error(ESP_ERR_INVALID_ARG)
        if not self.validate(self.app_bytes(label)):
            raise _esp_error(ESP_ERR_OTA_VALIDATE_FAILED)
        slot = row[2] - SUBTYPE_OTA_0
        count = len(self.apps())
        e = self.entries()
        best = self.active(e)
        state = IMG_NEW if self.rollback else IMG_UNDEFINED
        if best < 0:
            self.write_entry(0, slot + 1, state, e[0].label)
            return
        if self.slot_of_seq(e[best].seq) == slot:
            self.write_entry(best, e[best].seq, state, e[best].label)
            return
        base = (slot + 1) % count
        i = 0
        while e[best].seq > base + i * count:
            i += 1
        other = 1 - best
        self.write_entry(other, base + i * count, state, e[other].label)

    def mark_valid(self):
        """esp_ota_mark_app_valid_cancel_rollback."""
        if not self.rollback:
            raise _esp_error(ESP_ERR_NOT_SUPPORTED)
        e = self.entries()
        best = self.active(e)
        if best < 0:
            raise _esp_error(ESP_FAIL)        # "Running firmware is factory"
        if e[best].state != IMG_VALID:
            self.write_entry(best, e[best].seq, IMG_VALID, e[best].label)

    def next_update(self, label):
        """esp_ota_get_next_update_partition(label's partition)."""
        apps = self.apps()
        for i in range(len(apps)):
            if apps[i][0] == label:
                return apps[(i + 1) % len(apps)][0]
        return apps[0][0]


class _Module:
    """What `import esp32` gives: here only Partition."""


def _make_module(chip):
    class Partition(PartitionBase):
        _chip = chip

    module = _Module()
    module.Partition = Partition
    return module


class PartitionBase:
    BOOT = BOOT
    RUNNING = RUNNING
    TYPE_APP = TYPE_APP
    TYPE_DATA = TYPE_DATA
    _chip = None

    def __init__(self, id, block_size=SECTOR_BYTES):
        chip = self._chip
        if id == BOOT:
            label = chip.boot_label()
        elif id == RUNNING:
            label = chip.running
        elif isinstance(id, str):
            label = id if chip.part(id) is not None else None
        else:
            raise ValueError("bad partition id")
        if label is None:
            raise OSError(2)                   # ENOENT
        self._row = chip.part(label)
        self.block_size = block_size

    @classmethod
    def find(cls, type=TYPE_APP, subtype=0xFF, label=None):
        found = []
        for row in cls._chip.table:
            if row[1] == type and subtype in (0xFF, row[2]) and label in (None, row[0]):
                found.append(cls(row[0]))
        return found

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        cls._chip.mark_valid()

    def info(self):
        label, type, subtype, addr, size = self._row
        return (type, subtype, addr, size, label, False)

    def _range(self, block_num, n, offset):
        start = block_num * self.block_size + (offset or 0)
        if block_num < 0 or start < 0 or start + n > self._row[4]:
            raise _esp_error(ESP_ERR_INVALID_SIZE)
        return self._row[3] + start

    def readblocks(self, block_num, buf, offset=None):
        addr = self._range(block_num, len(buf), offset)
        buf[:] = self._chip.read(addr, len(buf))

    def writeblocks(self, block_num, buf, offset=None):
        addr = self._range(block_num, len(buf), offset)
        if offset is None:
            self._chip.erase(addr, len(buf))
        self._chip.program(addr, buf)

    def ioctl(self, cmd, arg):
        if cmd in (1, 2, 3):                    # init, deinit, sync
            return 0
        if cmd == 4:                            # block count
            return self._row[4] // self.block_size
        if cmd == 5:                            # block size
            return self.block_size
        if cmd == 6:                            # erase one block
            self._chip.erase(self._range(arg, self.block_size, None), self.block_size)
            return 0
        return None

    def set_boot(self):
        self._chip.set_boot(self._row[0])

    def get_next_update(self):
        return type(self)(self._chip.next_update(self._row[0]))

    def __repr__(self):
        t, s, addr, size, label, _ = self.info()
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % (
            t, s, addr, size, label)

