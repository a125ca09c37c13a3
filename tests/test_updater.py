"""agent.updater on the sim board's A/B slots (board.slots): happy path,
resume from the persisted cursor, rollback on trial timeout and on an
unplanned reboot, refusals that leave the running image, and power cuts at
every write of the flow (then at random points): 0 bricks.

Bundles are the committed samples in firmware-images/: the device runs
1.0.0 (security version 1) and is offered 1.1.0 (security version 2, 4
chunks)."""

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives import serialization

from agent import cbor, manifest as mf, updater as up
from agent.errors import LocalError
from board.sim import PowerCut, SimFlash
from board.slots import BOOT_STATE, SLOT_NAMES, SimSlots
from cloud import firmware

IMAGES = os.path.join(os.path.dirname(__file__), "..", "firmware-images")
NOW_MS = 1_800_000_000_000


def _read(name):
    with open(os.path.join(IMAGES, name), "rb") as f:
        return f.read()


ROOT_PUB = firmware.public_bytes(serialization.load_pem_public_key(_read("keys/root.pub")))
OLD_BIN, NEW_BIN = _read("sim-v1-1.0.0.bin"), _read("sim-v1-1.1.0.bin")
OLD_BUNDLE, NEW_BUNDLE = _read("sim-v1-1.0.0.bundle"), _read("sim-v1-1.1.0.bundle")
VALID = {hashlib.sha256(OLD_BIN).digest(): "1.0.0", hashlib.sha256(NEW_BIN).digest(): "1.1.0"}
CONFIG = up.Config("sim-v1", ROOT_PUB, k=2, trial_acks_min=3, trial_ms_max=60000)
# The cursor written with every chunk: the most writes to cut power at.
PER_CHUNK = up.Config("sim-v1", ROOT_PUB, k=2, trial_acks_min=3, trial_ms_max=60000,
                      cursor_every=1)
CONFIGS = pytest.mark.parametrize("config", [CONFIG, PER_CHUNK], ids=["cursor16", "cursor1"])


def chunks(payload):
    return [payload[i:i + 4096] for i in range(0, len(payload), 4096)]


class Bricked(AssertionError):
    pass


def image_version(data):
    """The release a slot holds, or None: the image, then nothing but erased
    flash (0xFF, what a partition holds past the image) or nothing."""
    for payload, version in ((NEW_BIN, "1.1.0"), (OLD_BIN, "1.0.0")):
        if data[:len(payload)] == payload and not data[len(payload):].strip(b"\xff"):
            return version
    return None


class SimRig:
    """The sim board: SimSlots on one SimFlash, the bootloader in SimSlots.boot.
    Every rig gives: slots, writes (since power on), power_on(cut_at_write),
    start() -> (slot, boot-state bytes), version(slot)."""

    def __init__(self, sv=1, seed=7, slots_class=SimSlots):
        self.flash = SimFlash(rng=random.Random(seed))   # decides how a cut write ends
        self.flash.files[SLOT_NAMES[0]] = bytearray(OLD_BIN)
        self.flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=sv, ksv=1).encode())
        self.slots = slots_class(self.flash)

    @property
    def writes(self):
        return self.flash.writes

    def power_on(self, cut_at_write):
        self.flash.power_on(cut_at_write)

    def start(self):
        return self.slots.boot()

    def version(self, slot):
        return image_version(self.slots.read_slot(slot))


class Device:
    """The driver: the bootloader, then the updater's actions executed in
    order against the board's slots. A cut stops everything; power_on()
    boots again. cut_at counts writes over the device's whole life."""

    def __init__(self, sv=1, cut_at=(), seed=7, rig=None, config=CONFIG):
        self.rig = rig if rig is not None else SimRig(sv, seed)
        self.config = config
        self.cuts = sorted(cut_at)
        self.writes_done = 0
        self.boots = []           # (slot, version) of every boot
        self.reports = []
        self.requests = []
        self.page_requests = []
        self.reads = []           # ReadSlot actions not answered yet
        self.reboot_pending = False
        self.power_cuts = 0
        self.steps = 0            # Step events fed for StepLater
        self.now_ms = NOW_MS

    @property
    def flash(self):
        return self.rig.flash

    @property
    def slots(self):
        return self.rig.slots

    def power_on(self):
        self.writes_done += self.rig.writes
        self.cuts = [c for c in self.cuts if c > self.writes_done]
        self.rig.power_on(self.cuts[0] - self.writes_done if self.cuts else None)
        self.reboot_pending = False
        self.requests = []
        self.page_requests = []
        self.reads = []
        try:
            slot, blob = self.rig.start()
            self._check_bootable(slot)
            self.updater = up.Updater(self.config)
            self.run(self.updater.handle(up.Booted(slot, blob)))
        except PowerCut:
            self.power_cuts += 1
            return self.power_on()

    def total_writes(self):
        return self.writes_done + self.rig.writes

    def _check_bootable(self, slot):
        version = self.rig.version(slot)
        if version is None:
            raise Bricked("slot %d holds no valid image" % slot)
        self.boots.append((slot, version))

    def feed(self, event):
        try:
            self.run(self.updater.handle(event))
        except PowerCut:
            self.power_cuts += 1
            self.power_on()

    def run(self, actions):
        for action in actions:
            if isinstance(action, up.WriteSlot):
                self.slots.write_slot(action.slot, action.offset, action.data)
            elif isinstance(action, up.WriteBootState):
                self.slots.write_boot_state(action.data)
            elif isinstance(action, up.Report):
                self.reports.append((action.status, action.reason, action.seq))
            elif isinstance(action, up.RequestChunk):
                self.requests.append(action.index)
            elif isinstance(action, up.RequestPage):
                self.page_requests.append(action.index)
            elif isinstance(action, up.ReadSlot):
                self.reads.append(action)
            elif isinstance(action, up.StepLater):
                self.steps += 1
                self.run(self.updater.handle(up.Step()))
            elif isinstance(action, up.Reboot):
                self.reboot_pending = True
                return
            else:
                raise AssertionError(action)

    def answer_read(self):
        a = self.reads.pop(0)
        self.feed(up.SlotRead(a.offset, self.slots.read_slot(a.slot, a.offset, a.length)))

    @property
    def state(self):
        return self.updater.state

    def boot_state(self):
        return up.decode_boot_state(self.slots.read_boot_state())


def drive(device, bundle=NEW_BUNDLE, payload=NEW_BIN, healthy=True, steps_max=200,
          offers_max=3, tamper=None, until=None):
    """The cloud and the network: offer while idle, serve requested chunks,
    answer slot reads, ack telemetry in trial (or not), until a final state
    (or the state `until`). Pages of chunk hashes (a paged manifest) are
    served from the payload's table."""
    parts = chunks(payload)
    table = None
    offers = 0
    for _ in range(steps_max):
        if device.state == until and not device.reboot_pending:
            return device
        if device.reboot_pending:
            device.power_on()
        elif device.state == up.IDLE and offers < offers_max:
            offers += 1
            device.feed(up.Offer(bundle, device.now_ms))
        elif device.state == up.DOWNLOADING and device.requests:
            index = device.requests.pop(0)
            data = parts[index] if index < len(parts) else b""
            if tamper is not None and index == tamper:
                data = bytes([data[0] ^ 1]) + data[1:]
            device.feed(up.Chunk(index, data))
        elif device.state == up.PAGING and device.page_requests:
            table = table or firmware.chunk_table(payload)
            page = device.page_requests.pop(0)
            device.feed(up.Page(page, table[page * mf.PAGE_BYTES:(page + 1) * mf.PAGE_BYTES]))
        elif device.state in (up.CHECKING, up.RESUMING) and device.reads:
            device.answer_read()
        elif device.state == up.TRIAL:
            device.now_ms += 1000
            acked = 1 + (device.now_ms - NOW_MS) // 1000 if healthy else 0
            device.feed(up.Healthy(acked, device.now_ms) if healthy else up.Tick(device.now_ms))
        else:
            return device
    raise AssertionError("did not converge: %s" % device.state)


def statuses(device):
    return [r[0] for r in device.reports]


# ------------------------------------------------------------ flows

def test_happy_path_confirms_and_advances_security_version():
    device = Device()
    device.power_on()
    drive(device)
    assert device.state == up.CONFIRMED
    assert statuses(device) == ["downloading", "verified", "installed", "trial", "confirmed"]
    seqs = [r[2] for r in device.reports]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    b = device.boot_state()
    assert (b.active, b.sv, b.ksv) == (1, 2, 2)
    assert device.boots == [(0, "1.0.0"), (1, "1.1.0")]
    device.power_on()                       # a later reboot keeps the new image
    assert device.boots[-1] == (1, "1.1.0")
    assert device.reports[-1] == device.reports[-2]   # re-sent, same seq: idempotent


@CONFIGS
def test_resume_after_power_cut_mid_download_from_cursor(config):
    device = Device(config=config)
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    for index, data in enumerate(chunks(NEW_BIN)[:2]):
        assert device.requests.pop(0) == index
        device.feed(up.Chunk(index, data))
    persisted = device.boot_state().cursor
    assert persisted == (2 if config is PER_CHUNK else 0)   # written every cursor_every chunks
    device.flash.power_on(1)                # the next write (chunk 2 into the slot) is torn
    device.writes_done = 0
    device.requests.pop(0)
    device.feed(up.Chunk(2, chunks(NEW_BIN)[2]))
    assert device.power_cuts == 1 and device.state == up.RESUMING
    scanned = []
    while device.reads:                     # the slot read back from the persisted cursor
        scanned.append(device.reads[0].offset // 4096)
        device.answer_read()
    assert scanned == list(range(persisted, 3))
    assert device.state == up.DOWNLOADING
    assert device.requests == [2]           # the first chunk the slot lacks, never zero
    drive(device)
    assert device.state == up.CONFIRMED
    assert device.slots.read_slot(1) == NEW_BIN


def test_a_cancelled_download_is_abandoned_and_the_running_slot_kept():
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS, "rel-2"))
    device.feed(up.Chunk(0, chunks(NEW_BIN)[0]))
    device.feed(up.Cancel("rel-other"))     # about another release: ignored
    assert device.state == up.DOWNLOADING
    device.feed(up.Cancel("rel-2"))         # the rollout was halted: withdrawn
    assert device.state == up.REJECTED and device.reports[-1][:2] == ("rejected", "cancelled")
    assert device.boot_state().active == 0
    device.feed(up.Chunk(1, chunks(NEW_BIN)[1]))   # a late chunk changes nothing
    device.feed(up.Cancel("rel-2"))                # nor a repeated cancel
    assert device.state == up.REJECTED
    device.power_on()
    assert device.boots[-1] == (0, "1.0.0")


def booted_updater(bits_per_step=up.BITS_PER_STEP):
    """An Updater booted on the factory record, with its config's step size."""
    config = up.Config("sim-v1", ROOT_PUB, k=2, bits_per_step=bits_per_step)
    u = up.Updater(config)
    u.handle(up.Booted(0, up.BootState(active=0, sv=1, ksv=1).encode()))
    return u


def steps_to_verdict(u, steps_max=1000):
    """Feed Step while the updater asks for one: (steps fed, the last actions)."""
    for steps in range(1, steps_max):
        actions = u.handle(up.Step())
        if actions != [up.StepLater()]:
            return steps, actions
    raise AssertionError("no verdict in %d steps" % steps_max)


def test_an_offer_is_verified_in_bounded_steps_and_nothing_is_written_before_the_verdict():
    coarse, fine = booted_updater(256), booted_updater(16)
    counts = []
    for u in (coarse, fine):
        assert u.handle(up.Offer(NEW_BUNDLE, NOW_MS, "rel-2")) == [up.StepLater()]
        assert u.state == up.VERIFYING
        steps, actions = steps_to_verdict(u)
        counts.append(steps)
        assert u.state == up.DOWNLOADING
        assert [type(a) for a in actions] == [up.WriteBootState, up.Report, up.RequestChunk]
        assert actions[1] == up.Report("downloading", "", 1, "rel-2")
    # three ECDSA verifications (key set, two release signers) of 256 bits
    assert counts[1] - counts[0] == 3 * (256 // 16 - 1)


def test_what_arrives_while_verifying_is_ignored_and_a_cancel_abandons_it():
    u = booted_updater()
    u.handle(up.Offer(NEW_BUNDLE, NOW_MS, "rel-2"))
    for event in (up.Offer(NEW_BUNDLE, NOW_MS, "rel-2"), up.Chunk(0, b"x"), up.Tick(NOW_MS),
                  up.Healthy(5, NOW_MS), up.Cancel("rel-other")):
        assert u.handle(event) == [] and u.state == up.VERIFYING
    u.handle(up.Step())
    actions = u.handle(up.Cancel("rel-2"))
    assert u.state == up.REJECTED
    assert actions[1] == up.Report("rejected", "cancelled", 1, "rel-2")
    assert u.handle(up.Step()) == []                 # a step still queued by the driver


def test_a_bad_signature_is_refused_at_its_step_with_the_offers_ref():
    u = booted_updater(64)
    bundle = cbor.loads(NEW_BUNDLE)
    sig = bytearray(bundle["sigs"][1])
    sig[-1] ^= 1                                     # the second release signature
    bundle["sigs"][1] = bytes(sig)
    u.handle(up.Offer(cbor.dumps(bundle), NOW_MS, "rel-bad"))
    steps, actions = steps_to_verdict(u)
    assert steps > 2 * (256 // 64)                   # the first two verifications ran first
    assert u.state == up.REJECTED and actions[1] == up.Report("rejected", "bad_signature", 1, "rel-bad")


def test_a_power_cut_while_verifying_boots_the_phase_before_the_offer():
    device = Device()
    device.power_on()
    writes = device.total_writes()
    u = device.updater
    assert u.handle(up.Offer(NEW_BUNDLE, NOW_MS)) == [up.StepLater()]
    for _ in range(5):
        assert u.handle(up.Step()) == [up.StepLater()]
    assert device.total_writes() == writes          # nothing written while verifying
    device.power_on()                                # the cut: the updater's memory is gone
    assert device.state == up.IDLE and device.boot_state().phase == up.IDLE
    drive(device)                                    # the cloud offers again
    assert device.state == up.CONFIRMED and device.steps > 3


def test_torn_chunk_written_before_a_cut_is_caught_by_the_read_back():
    """Chunk 1 reached the slot and the cursor moved past it, then the flash
    lost part of it (a torn page, a write cache lost in the cut). The resumed
    download never sees chunk 1 again; the read-back of the whole slot does,
    and the download goes back to chunk 1 (not to zero) before the slot may
    boot. (The cursor written per chunk: with a coarser cursor the resume's
    scan finds it first, next test.)"""
    device = Device(config=PER_CHUNK)
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    for index, data in enumerate(chunks(NEW_BIN)[:2]):
        assert device.requests.pop(0) == index
        device.feed(up.Chunk(index, data))
    assert device.boot_state().cursor == 2
    torn = device.flash.files[SLOT_NAMES[1]]
    torn[4096 + 2048:8192] = b"\xff" * 2048          # the second half of chunk 1 never landed
    device.power_on()                               # the cut
    device.answer_read()                            # chunk 2, past the cursor: not there
    assert device.state == up.DOWNLOADING and device.requests == [2]
    for index in (2, 3):
        assert device.requests.pop(0) == index
        device.feed(up.Chunk(index, chunks(NEW_BIN)[index]))
    assert device.state == up.CHECKING
    while device.reads:
        device.answer_read()
    assert device.state == up.DOWNLOADING and device.requests == [1]
    assert device.boot_state().repairs == 1 and device.boot_state().cursor == 1
    drive(device)
    assert device.state == up.CONFIRMED
    assert device.slots.read_slot(1) == NEW_BIN
    assert statuses(device) == ["downloading", "downloading", "verified", "installed", "trial",
                                "confirmed"]


def test_a_torn_chunk_past_the_persisted_cursor_is_found_by_the_resume_scan():
    device = Device()                               # cursor persisted every 16 chunks
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    for index, data in enumerate(chunks(NEW_BIN)[:3]):
        device.requests.pop(0)
        device.feed(up.Chunk(index, data))
    torn = device.flash.files[SLOT_NAMES[1]]
    torn[4096 + 2048:8192] = b"\xff" * 2048          # chunk 1 torn in the cut
    device.power_on()
    assert device.boot_state().cursor == 0 and device.state == up.RESUMING
    device.answer_read()                            # chunk 0: whole, kept
    device.answer_read()                            # chunk 1: torn
    assert device.state == up.DOWNLOADING and device.requests == [1] and not device.reads
    drive(device)
    assert device.state == up.CONFIRMED and device.slots.read_slot(1) == NEW_BIN
    assert device.boot_state().repairs == 0         # found before the read-back, not by it


class BadSectorSlots(SimSlots):
    """Slots whose second 4 KiB of slot 1 never holds what is written: one bit
    stays stuck, as on a worn-out flash sector."""

    def write_slot(self, slot, offset, data):
        if slot == 1 and offset == 4096:
            data = bytes([data[0] ^ 0x80]) + bytes(data[1:])
        SimSlots.write_slot(self, slot, offset, data)


def test_slot_that_keeps_differing_is_rejected_after_bounded_repairs():
    device = Device(rig=SimRig(slots_class=BadSectorSlots))
    device.power_on()
    drive(device)
    assert device.state == up.REJECTED
    assert device.reports[-1][:2] == ("rejected", "slot_readback")
    b = device.boot_state()
    assert (b.active, b.sv, b.repairs) == (0, 1, up.REPAIRS_MAX)
    device.power_on()
    assert device.boots[-1] == (0, "1.0.0")


def test_reboot_during_the_read_back_checks_again_from_the_start():
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    for index, data in enumerate(chunks(NEW_BIN)):
        device.requests.pop(0)
        device.feed(up.Chunk(index, data))
    device.answer_read()
    assert device.state == up.CHECKING and device.reads[0].offset == 4096
    device.power_on()
    while device.state == up.RESUMING:             # the scan from the persisted cursor (0)
        device.answer_read()
    assert device.state == up.CHECKING and device.reads[0].offset == 0
    assert device.reports[-1][:2] == ("downloading", "")
    drive(device)
    assert device.state == up.CONFIRMED


def test_whole_payload_hash_is_checked_on_the_slot_before_it_may_boot():
    """A release whose chunk hashes all match but whose signed payload SHA-256
    does not: every chunk passes on the way in; the read-back's whole-payload
    hash refuses the slot, and the device stays on its image."""
    m = mf.parse(_read("sim-v1-1.1.0.manifest"))
    m.sha256 = hashlib.sha256(b"another payload").digest()
    keys = [firmware.load_private_key(os.path.join(IMAGES, "keys", "release-%d.key" % i))
            for i in (1, 2)]
    bundle = firmware.sign_bundle(m.encode(), keys, _read("keyset-v2.cose"))
    device = Device()
    device.power_on()
    drive(device, bundle=bundle)
    assert device.state == up.REJECTED
    assert device.reports[-1][:2] == ("rejected", "payload_hash")
    assert device.slots.read_slot(1) == NEW_BIN            # written, checked, never booted
    device.power_on()
    assert device.boots == [(0, "1.0.0"), (0, "1.0.0")] and device.boot_state().active == 0


def test_rollback_on_trial_timeout():
    device = Device()
    device.power_on()
    drive(device, healthy=False)
    assert device.state == up.ROLLED_BACK
    assert device.reports[-1][:2] == ("rolled_back", "trial_timeout")
    b = device.boot_state()
    assert (b.active, b.sv, b.ksv) == (0, 1, 1)   # security version did not advance
    assert device.boots[-1] == (0, "1.0.0")
    # the next offer of the same release starts again into the same slot
    device.feed(up.Offer(NEW_BUNDLE, device.now_ms))
    assert device.state == up.DOWNLOADING and device.boot_state().target == 1


def test_rollback_on_unplanned_reboot_during_trial():
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    while device.requests or device.reads:
        if device.reads:
            device.answer_read()
        else:
            index = device.requests.pop(0)
            device.feed(up.Chunk(index, chunks(NEW_BIN)[index]))
    assert device.reboot_pending
    device.power_on()
    assert device.state == up.TRIAL and device.boots[-1] == (1, "1.1.0")
    device.feed(up.Healthy(1, NOW_MS))
    device.power_on()                                # crash / watchdog / power cut
    assert device.state == up.ROLLED_BACK
    assert device.reports[-1][:2] == ("rolled_back", "unplanned_reboot")
    assert device.boots[-1] == (0, "1.0.0") and device.boot_state().sv == 1


def flip_signature(bundle):
    fields = cbor.loads(bundle)
    sig = fields["sigs"][0]
    fields["sigs"][0] = sig[:-1] + bytes([sig[-1] ^ 1])
    return cbor.dumps(fields)


@pytest.mark.parametrize("bundle, sv, code", [
    (OLD_BUNDLE, 2, "downgrade"),
    (NEW_BUNDLE[:-1] + bytes([NEW_BUNDLE[-1] ^ 1]), 1, "keyset_signature"),
    (flip_signature(NEW_BUNDLE), 1, "bad_signature"),
    (b"\xff" * 10, 1, "cbor"),
])
def test_refused_release_leaves_current_slot(bundle, sv, code):
    device = Device(sv=sv)
    device.power_on()
    device.feed(up.Offer(bundle, NOW_MS))
    assert device.state == up.REJECTED
    assert device.reports == [("rejected", code, 1)]
    assert device.boot_state().active == 0 and device.slots.read_slot(1) == b""
    device.power_on()
    assert device.boots[-1] == (0, "1.0.0")


def test_expired_and_wrong_hw_class_refused():
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, 4102444800 * 1000))
    assert device.reports[-1][:2] == ("rejected", "expired")
    device.updater.config = up.Config("other-hw", ROOT_PUB)
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    assert device.reports[-1][:2] == ("rejected", "wrong_hw_class")


def test_tampered_chunk_rejected_and_current_slot_kept():
    device = Device()
    device.power_on()
    drive(device, tamper=1)
    assert device.state == up.REJECTED
    assert device.reports[-1][:2] == ("rejected", "tampered_chunk")
    device.power_on()
    assert device.boots[-1] == (0, "1.0.0") and device.state == up.REJECTED


def test_late_chunk_and_repeated_offer_are_ignored():
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))
    device.feed(up.Chunk(0, chunks(NEW_BIN)[0]))
    device.feed(up.Chunk(0, chunks(NEW_BIN)[0]))       # duplicate
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS))          # re-sent offer: ask for the cursor
    assert device.requests == [0, 1, 1]
    assert device.state == up.DOWNLOADING


def test_unknown_pair_is_a_local_error():
    u = up.Updater(CONFIG)
    with pytest.raises(LocalError):
        u.handle(up.Offer(NEW_BUNDLE, NOW_MS))       # before Booted
    with pytest.raises(LocalError):
        u.handle(up.Booted(0, None))                 # refuses further use


# ------------------------------------------------------------ power cuts

def clean_write_count(healthy, make_rig=None, config=CONFIG):
    device = Device(rig=make_rig() if make_rig else None, config=config)
    device.power_on()
    drive(device, healthy=healthy)
    return device.total_writes()


def cut_everywhere(make_rig, healthy, seeds=(0,), config=CONFIG):
    """Cut power at each write of the flow in turn (one rig per cut, made by
    make_rig(seed)); every run converges. Returns {final state: runs}."""
    total = clean_write_count(healthy, lambda: make_rig(0), config)
    outcomes = {}
    for n in range(1, total + 1):
        for seed in seeds:
            device = Device(cut_at=[n], rig=make_rig(seed), config=config)
            device.power_on()
            drive(device, healthy=healthy)
            assert device.power_cuts == 1, n
            converged(device, healthy)
            outcomes[device.state] = outcomes.get(device.state, 0) + 1
    return total, outcomes


def converged(device, healthy):
    assert device.state in (up.CONFIRMED, up.ROLLED_BACK), device.state
    b = device.boot_state()
    slot, version = device.boots[-1]
    assert slot == b.active
    if device.state == up.CONFIRMED:
        assert healthy and (b.active, b.sv, version) == (1, 2, "1.1.0")
    else:
        assert (b.active, b.sv, version) == (0, 1, "1.0.0")


@pytest.mark.parametrize("healthy", [True, False])
@CONFIGS
def test_power_cut_at_every_write(healthy, config):
    total = clean_write_count(healthy, config=config)
    assert total >= (12 if config is PER_CHUNK else 8)
    outcomes = {}
    for n in range(1, total + 1):
        for seed in range(4):       # a cut write is torn or not, old or new: try both
            device = Device(cut_at=[n], seed=seed, config=config)
            device.power_on()
            drive(device, healthy=healthy)
            assert device.power_cuts == 1, n
            converged(device, healthy)
            outcomes[device.state] = outcomes.get(device.state, 0) + 1
    if healthy:     # a cut during the trial rolls back; everywhere else it resumes
        assert outcomes[up.CONFIRMED] > outcomes.get(up.ROLLED_BACK, 0) > 0


@CONFIGS
@pytest.mark.parametrize("seed", range(8))
def test_power_cuts_at_random_points(seed, config):
    rng = random.Random(seed)
    healthy = rng.random() < 0.7
    total = clean_write_count(healthy, config=config)
    cuts = sorted(set(rng.randint(1, total + 6) for _ in range(rng.randint(1, 4))))
    device = Device(cut_at=cuts, seed=seed, config=config)
    device.power_on()
    drive(device, healthy=healthy, steps_max=400)
    assert device.power_cuts == sum(1 for c in cuts if c <= device.total_writes())
    converged(device, healthy)
    assert all(v in ("1.0.0", "1.1.0") for _, v in device.boots)


def test_boot_state_round_trip():
    b = up.BootState(active=1, sv=3, ksv=2, phase=up.TRIAL, target=1, cursor=4, seq=9,
                     reason="x", manifest=b"m", trial_sv=3, trial_ksv=2)
    assert up.decode_boot_state(b.encode()).encode() == b.encode()
    with pytest.raises(LocalError):
        up.decode_boot_state(cbor.dumps({"v": 9}))


def test_an_offer_between_a_rollback_and_its_reset_is_ignored():
    """The trial image times out: the record says rolled_back and a Reboot is
    pending. An offer in that window must not start an update, whose target
    (1 - active) would be the slot running now."""
    manifest = mf.verify_release(NEW_BUNDLE, ROOT_PUB, 2)
    record = up.BootState(active=0, sv=1, ksv=1, phase=up.TRIAL, target=1, seq=4,
                          manifest=manifest.signed_bytes, trial_sv=2, trial_ksv=2).encode()
    u = up.Updater(CONFIG)
    u.handle(up.Booted(1, record))
    u.handle(up.Tick(NOW_MS))
    actions = u.handle(up.Tick(NOW_MS + CONFIG.trial_ms_max))
    assert actions[-1] == up.Reboot() and u.state == up.REBOOTING
    assert u.boot.phase == up.ROLLED_BACK and u.boot.reason == "trial_timeout"
    assert u.handle(up.Offer(NEW_BUNDLE, NOW_MS, "rel-3")) == [] and u.state == up.REBOOTING


def test_the_answer_to_a_read_a_cancel_abandoned_is_dropped():
    """Found by review: a Cancel while resuming, then the answer to the slot
    read it had asked for, put the updater in "error" (updates off)."""
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS, "rel-2"))
    device.feed(up.Chunk(0, chunks(NEW_BIN)[0]))
    device.power_on()                                 # a cut mid-download
    assert device.state == up.RESUMING and device.reads
    device.feed(up.Cancel("rel-2"))                   # the rollout was halted
    assert device.state == up.REJECTED
    device.answer_read()                              # the read it had asked for
    assert device.state == up.REJECTED
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS, "rel-3"))   # and it takes the next offer
    drive(device)
    assert device.state == up.CONFIRMED


def test_an_offer_of_another_release_supersedes_a_download_whose_cancel_was_lost():
    """Found by review: a device downloading release A whose cancel it never
    got (offline, clean sessions) kept asking for A when offered B."""
    device = Device()
    device.power_on()
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS, "rel-A"))
    device.feed(up.Chunk(0, chunks(NEW_BIN)[0]))
    device.requests = []
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS, "rel-A"))   # the same offer again: the cursor
    assert device.requests == [1]
    device.requests = []
    device.feed(up.Offer(NEW_BUNDLE, NOW_MS, "rel-B"))
    assert ("rejected", "superseded") in [r[:2] for r in device.reports]
    assert device.state == up.DOWNLOADING and device.updater.boot.ref == "rel-B"
    assert device.requests == [0]
    drive(device)
    assert device.state == up.CONFIRMED

