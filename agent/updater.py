# The device side of a firmware update: verified offer, chunked resumable
# download into the inactive slot, install, trial boot, confirm or roll back.
# Sans-IO: it takes events and returns lists of actions; the driver executes
# them in order and stops at the first power cut.
#
# Everything that must survive a reboot is in one boot-state record, written
# atomically (WriteBootState) *before* any step that cannot be undone. The
# bootloader (board/slots.py on the sim) reads the same record: it boots
# `active`, except in phase "installed", where it writes phase "trial" and
# boots `target` once; finding "trial" at boot means the trial image
# rebooted without confirming, so it writes "rolled_back" and boots `active`.
#
# The flow, as mender-mcu writes it: phase -> (next on success, on failure).
# "rejected" and "rolled_back" never touch the active slot.
#
#   idle/confirmed/rolled_back/rejected --Offer--> verifying
#   verifying   --Step...--> downloading          | rejected (the offer's refusal)
#   downloading --last Chunk--> checking          | rejected (bad chunk)
#               --Chunk, past a page's last--> paging (a paged manifest)
#   paging      --Page--> downloading, or resuming | rejected (bad page)
#               --Offer of another release--> verifying (this one rejected
#                                                   "superseded": its cancel was lost)
#   downloading, paging --Resend (a reconnect)--> the same, its request again
#   resuming    --SlotRead...-> downloading       (at the first chunk the slot
#                                                   does not hold) | checking
#   checking    --SlotRead N--> verified          | downloading (from the first
#                                                   bad chunk, REPAIRS_MAX times)
#                                                 | rejected
#   verified    --(no event)--> installed, Reboot
#   installed   --bootloader--> trial             (boot target once)
#   trial       --Healthy N---> confirmed         | rolled_back (timeout, reboot)
#
# "verifying" checks the offer's signatures in bounded pieces: the Offer
# returns StepLater, and each Step the driver feeds back does at most
# Config.bits_per_step bits of one ECDSA verification (agent/manifest.py's
# ReleaseVerifier), then StepLater again until the verdict. A board serves
# its network between steps (an ESP32 keeps its MQTT keepalive during the
# seconds three signatures take) and the heap holds one verification's
# state. Nothing is written until the verdict: a cut meanwhile boots the
# phase before the offer, and the cloud offers again.
#
# The cursor is persisted with every Config.cursor_every-th chunk, not each
# one: the record carries the manifest (8 KiB at 1 MiB), so writing it per
# 4 KiB chunk tripled the flash written. A boot in "downloading" goes to
# "resuming" (in memory): it reads the slot from the persisted cursor and
# checks each chunk against its hash, and downloads from the first one the
# slot does not hold (torn, never written, or another image's). A chunk
# that reached the flash is not downloaded again; none is trusted unchecked.
#
# A paged manifest (images over 1.75 MiB, agent/manifest.py) signs the
# hashes of pages of chunk hashes, not the chunk hashes: before the chunks
# of page p are downloaded or scanned, "paging" asks for page p
# (RequestPage) and checks the Page against the manifest. One page is held
# at a time, in memory only: a reboot asks again. The read-back needs no
# page: it checks each page's hash from the chunks it reads, and a bad page
# is downloaded again from its first chunk.
#
# "checking" reads the whole inactive slot back (ReadSlot / SlotRead, one
# chunk at a time) and checks every chunk hash and the payload's SHA-256
# against the manifest before the slot may boot: what was received was
# checked before it was written, this checks what the flash now holds (a
# resumed download, a board that lost a write). It is not a persisted
# phase: the record says "downloading", so a reboot during the check
# resumes (the scan finds every chunk there) and starts the check again.
#
# Every (state, event) pair accepted is in TRANSITIONS; any other pair is a
# LocalError and the machine refuses further use. Pairs the network's timing
# can cause (a late chunk, a repeated offer) are in the table and ignored.
# Events whose fields have the wrong type are the driver's bug: LocalError
# "bad_event". Any error leaves the machine in "error", refusing further use.

from agent import cbor
from agent import manifest as mf
from agent.errors import LocalError, RemoteError, TetherError
from agent.events import Tick  # noqa: F401  (the same event as the telemetry core's)
from agent.value import Value

OFF = "off"                  # not booted yet: only Booted is accepted
IDLE = "idle"
VERIFYING = "verifying"      # in memory only: checking an offer's signatures
RESUMING = "resuming"        # in memory only: finding how far a download got
PAGING = "paging"            # in memory only: waiting for a page of chunk hashes
DOWNLOADING = "downloading"
CHECKING = "checking"        # in memory only: reading the slot back
REBOOTING = "rebooting"      # in memory only: a Reboot is pending
VERIFIED = "verified"
INSTALLED = "installed"      # boot slot switched, trial pending
TRIAL = "trial"
CONFIRMED = "confirmed"
ROLLED_BACK = "rolled_back"
REJECTED = "rejected"
ERROR = "error"

PHASES = (IDLE, DOWNLOADING, VERIFIED, INSTALLED, TRIAL, CONFIRMED, ROLLED_BACK, REJECTED)
BOOT_STATE_VERSION = 1
SLOTS = 2
REPAIRS_MAX = 2              # re-downloads from a chunk the read-back found bad
REF_CHARS_MAX = 64           # an Offer's ref (the cloud's release id)
BITS_PER_STEP = 32           # of an ECDSA verification per Step (256 bits: one per signature)
CURSOR_EVERY = 16            # chunks per write of the download cursor (64 KiB)


# ---------------------------------------------------------------- events

class Offer(Value):
    """The cloud offers a release bundle. now_ms is the device's wall clock
    (for the manifest's expiry). ref is the cloud's name for the offer (its
    release id, at most REF_CHARS_MAX characters): every report about this
    update carries it back, so the cloud attributes reports exactly."""
    __slots__ = ("bundle", "now_ms", "ref")

    def __init__(self, bundle, now_ms, ref=""):
        self.bundle = bundle
        self.now_ms = now_ms
        self.ref = ref


class Chunk(Value):
    __slots__ = ("index", "data")

    def __init__(self, index, data):
        self.index = index
        self.data = data


class Booted(Value):
    """The bootloader started `slot`; boot_state is the record it left (bytes or None)."""
    __slots__ = ("slot", "boot_state")

    def __init__(self, slot, boot_state):
        self.slot = slot
        self.boot_state = boot_state


class Page(Value):
    """Page `index` of the chunk hashes of the release being downloaded
    (a paged manifest), answering RequestPage."""
    __slots__ = ("index", "data")

    def __init__(self, index, data):
        self.index = index
        self.data = data


class SlotRead(Value):
    """The driver's answer to ReadSlot: `data` read from the slot at `offset`."""
    __slots__ = ("offset", "data")

    def __init__(self, offset, data):
        self.offset = offset
        self.data = data


class Cancel(Value):
    """The cloud withdrew the release `ref` (a rollout paused, halted or
    killed): a verification or download of it under way is abandoned,
    reported rejected "cancelled"; the running slot is untouched. Any other
    state ignores it
    (past the download the device finishes: the read-back is short, and
    from "verified" on the image is whole and checked)."""
    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref


class Resend(Value):
    """The link is back (a reconnect): ask again for what the download waits
    for. Its request may have been lost with the old connection, and a
    release withdrawn meanwhile is not offered again, so no Offer comes to
    ask for it: the cloud's answer to this request (a cancel) ends it."""
    __slots__ = ()


class Step(Value):
    """Do the next piece of the work a StepLater announced."""
    __slots__ = ()


class Healthy(Value):
    """acked_count telemetry records acknowledged since this boot."""
    __slots__ = ("acked_count", "now_ms")

    def __init__(self, acked_count, now_ms):
        self.acked_count = acked_count
        self.now_ms = now_ms


# ---------------------------------------------------------------- actions

class WriteSlot(Value):
    __slots__ = ("slot", "offset", "data")

    def __init__(self, slot, offset, data):
        self.slot = slot
        self.offset = offset
        self.data = data


class WriteBootState(Value):
    """Replace the boot-state record, all or nothing."""
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class ReadSlot(Value):
    """Read `length` bytes of `slot` at `offset`; answer with SlotRead."""
    __slots__ = ("slot", "offset", "length")

    def __init__(self, slot, offset, length):
        self.slot = slot
        self.offset = offset
        self.length = length


class Reboot(Value):
    __slots__ = ()


class StepLater(Value):
    """Work is pending: feed Step() once the board has served its network."""
    __slots__ = ()


class Report(Value):
    """A status report. seq identifies it: the same report may be sent again
    after a reboot, with the same seq, and the cloud keeps one. ref is the
    Offer's ref of the update it is about ("" for none)."""
    __slots__ = ("status", "reason", "seq", "ref")

    def __init__(self, status, reason, seq, ref=""):
        self.status = status
        self.reason = reason
        self.seq = seq
        self.ref = ref


class RequestChunk(Value):
    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


class RequestPage(Value):
    """Ask the cloud for page `index` of the chunk hashes; answer with Page."""
    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


# ---------------------------------------------------------------- boot state

class BootState:
    """The persisted record. `active` is the confirmed slot, `sv` and `ksv`
    the confirmed security and key-set versions, `seq` the number of the
    last status report, `manifest` the verified manifest bytes of the update
    being downloaded or checked (b"" in every other phase), `cursor` the
    next chunk to download,
    `repairs` how often the read-back sent this update back to download,
    `ref` the cloud's name for the update the phase is about."""

    def __init__(self, active=0, sv=0, ksv=0, phase=IDLE, target=0, cursor=0, seq=0,
                 reason="", manifest=b"", trial_sv=0, trial_ksv=0, repairs=0, ref=""):
        self.active = active
        self.sv = sv
        self.ksv = ksv
        self.phase = phase
        self.target = target
        self.cursor = cursor
        self.seq = seq
        self.reason = reason
        self.manifest = manifest
        self.trial_sv = trial_sv
        self.trial_ksv = trial_ksv
        self.repairs = repairs
        self.ref = ref

    def copy(self, **changes):
        new = BootState(self.active, self.sv, self.ksv, self.phase, self.target, self.cursor,
                        self.seq, self.reason, self.manifest, self.trial_sv, self.trial_ksv,
                        self.repairs, self.ref)
        for name in changes:
            setattr(new, name, changes[name])
        return new

    def encode(self):
        return cbor.dumps({"v": BOOT_STATE_VERSION, "a": self.active, "sv": self.sv,
                           "ksv": self.ksv, "ph": self.phase, "t": self.target,
                           "c": self.cursor, "seq": self.seq, "why": self.reason,
                           "m": self.manifest, "tsv": self.trial_sv, "tksv": self.trial_ksv,
                           "rp": self.repairs, "ref": self.ref})


# key -> kind; the order is BootState's arguments. "rp" and "ref" may be
# missing (older records): _RECORD_DEFAULTS.
_RECORD_FIELDS = (("a", "slot"), ("sv", "uint"), ("ksv", "uint"), ("ph", "phase"),
                  ("t", "slot"), ("c", "uint"), ("seq", "uint"), ("why", "text"),
                  ("m", "bytes"), ("tsv", "uint"), ("tksv", "uint"), ("rp", "uint"),
                  ("ref", "ref"))
_RECORD_DEFAULTS = {"rp": 0, "ref": ""}


def decode_boot_state(blob, default_active=0):
    """The BootState in blob; a factory record (idle, slot default_active)
    when blob is None. Damage raises LocalError: it is written atomically,
    so damage is a bug, not a power cut."""
    if blob is None:
        return BootState(active=default_active)
    if not isinstance(blob, (bytes, bytearray)):
        raise LocalError("boot state must be bytes", "bad_boot_state")
    try:
        f = cbor.loads(blob)
    except RemoteError:
        raise LocalError("boot state is not CBOR", "bad_boot_state")
    if not isinstance(f, dict) or f.get("v") != BOOT_STATE_VERSION:
        raise LocalError("boot state is damaged", "bad_boot_state")
    values = []
    for key, kind in _RECORD_FIELDS:
        value = f.get(key, _RECORD_DEFAULTS.get(key))
        if not _is_kind(value, kind):
            raise LocalError("boot state field %s is damaged" % key, "bad_boot_state")
        values.append(value)
    return BootState(*values)


def _is_kind(value, kind):
    if kind == "uint":
        return type(value) is int and value >= 0
    if kind == "slot":
        return type(value) is int and 0 <= value < SLOTS
    if kind == "phase":
        return value in PHASES
    if kind == "text":
        return isinstance(value, str)
    if kind == "ref":
        return isinstance(value, str) and len(value) <= REF_CHARS_MAX
    return isinstance(value, bytes)


# ---------------------------------------------------------------- the machine

TRANSITIONS = {
    (OFF, Booted): "_booted",
    (IDLE, Offer): "_offer",
    (CONFIRMED, Offer): "_offer",
    (ROLLED_BACK, Offer): "_offer",
    (REJECTED, Offer): "_offer",
    (VERIFYING, Step): "_step",
    (VERIFYING, Cancel): "_cancel",
    (DOWNLOADING, Chunk): "_chunk",
    (DOWNLOADING, Offer): "_rerequest",
    (DOWNLOADING, Cancel): "_cancel",
    (CHECKING, SlotRead): "_slot_read",
    (RESUMING, SlotRead): "_resume_read",
    (RESUMING, Cancel): "_cancel",
    (PAGING, Page): "_page",
    (PAGING, Offer): "_rerequest",
    (PAGING, Cancel): "_cancel",
    (PAGING, Resend): "_resend",
    (DOWNLOADING, Resend): "_resend",
    (TRIAL, Healthy): "_healthy",
    (TRIAL, Tick): "_tick",
}
_IGNORED = (Chunk, Page, Healthy, Tick, Offer, Cancel, Step, Resend)   # late or repeated network input elsewhere

# The fields each event must carry, checked before any transition.
_EVENT_FIELDS = {
    Booted: (("slot", "slot"), ("boot_state", "blob")),
    Offer: (("now_ms", "uint"), ("ref", "ref")),
    Chunk: (("index", "uint"), ("data", "bytes")),
    Page: (("index", "uint"), ("data", "bytes")),
    SlotRead: (("offset", "uint"), ("data", "bytes")),
    Healthy: (("acked_count", "uint"), ("now_ms", "uint")),
    Tick: (("now_ms", "uint"),),
    Cancel: (("ref", "ref"),),
}


class Config:
    """trial_acks_min telemetry records acknowledged within trial_ms_max of
    the trial boot confirm the new image. bits_per_step: of an ECDSA
    verification per Step; cursor_every: chunks per write of the cursor."""

    def __init__(self, hw_class, root_public_key, k=2, trial_acks_min=3, trial_ms_max=60000,
                 bits_per_step=BITS_PER_STEP, cursor_every=CURSOR_EVERY):
        if min(trial_acks_min, trial_ms_max, bits_per_step, cursor_every) < 1:
            raise ValueError("trial_acks_min, trial_ms_max, bits_per_step and cursor_every "
                             "must be >= 1")
        self.bits_per_step = bits_per_step
        self.cursor_every = cursor_every
        self.hw_class = hw_class
        self.root_public_key = root_public_key
        self.k = k
        self.trial_acks_min = trial_acks_min
        self.trial_ms_max = trial_ms_max


class Updater:
    def __init__(self, config, log=None):
        self.config = config
        self.log = log or _no_log
        self.state = OFF
        self.boot = None          # the BootState as last written (or read at boot)
        self.slot = None          # the slot running now
        self._verifier = None     # ChunkVerifier while downloading or checking
        self._release = None      # ReleaseVerifier while verifying
        self._verdict = None      # its Manifest, once it has one
        self._read_abandoned = False  # a Cancel came while a ReadSlot was unanswered
        self._scanning = False    # the page awaited is for the resume scan, not a download
        self._offered = None      # (ref, now_ms) of the Offer being verified, not its bundle
        self._trial_start_ms = None

    def handle(self, event):
        """The actions for one event. Raises only TetherErrors (LocalError for
        misuse); after any error the machine is in "error" and refuses use."""
        if self.state == ERROR:
            raise LocalError("updater failed earlier", "failed")
        try:
            return self._handle(event)
        except TetherError:
            self.state = ERROR
            self._verifier = self._release = self._verdict = self._offered = None
            raise

    def _handle(self, event):
        kind = type(event)
        if kind is SlotRead and self._read_abandoned:
            # The answer to the read a Cancel abandoned (while resuming).
            self._read_abandoned = False
            return []
        name = TRANSITIONS.get((self.state, kind))
        if name is None:
            if self.state != OFF and kind in _IGNORED:
                self.log("ignored %s in %s" % (kind.__name__, self.state))
                return []
            raise LocalError("%s is not allowed in state %s" % (
                getattr(kind, "__name__", "?"), self.state), "bad_transition")
        _check_event(event)
        return getattr(self, name)(event)

    # -- boot ---------------------------------------------------------------

    def _booted(self, event):
        self.boot = decode_boot_state(event.boot_state, event.slot)
        self.slot = event.slot
        phase = self.boot.phase
        if phase == TRIAL:
            if event.slot != self.boot.target:
                return self._roll_back("boot_failed")
            self.state = TRIAL
            return [self._report()]
        if phase == INSTALLED:   # the bootloader always moves it on: a board without one
            return self._roll_back("no_trial")
        if event.slot != self.boot.active:
            # Outside a trial only the confirmed slot may run: the board has
            # pointed its bootloader back at it (board/esp32_slots.py).
            self.state = REBOOTING
            return [Reboot()]
        if phase == DOWNLOADING:
            return self._resume()
        if phase == VERIFIED:
            return self._install()
        self.state = phase
        return [] if phase == IDLE else [self._report()]

    def _resume(self):
        try:
            manifest = mf.parse(self.boot.manifest)
        except RemoteError:
            raise LocalError("boot state holds a damaged manifest", "bad_boot_state")
        if self.boot.cursor > manifest.chunk_count() or self.boot.target == self.boot.active:
            raise LocalError("boot state is inconsistent", "bad_boot_state")
        self._verifier = mf.ChunkVerifier(manifest, whole=False, next_index=self.boot.cursor)
        return [self._report()] + self._scan()

    def _scan(self):
        """Read the next chunk past the cursor back; the check when all are there."""
        if self._verifier.next_index == self._verifier.manifest.chunk_count():
            return self._start_check()
        page = self._verifier.page_needed()
        if page is not None:
            self._scanning = True
            self.state = PAGING
            return [RequestPage(page)]
        self.state = RESUMING
        return [self._read(self._verifier.next_index)]

    def _resume_read(self, event):
        index, error = self._check_read(event)
        if error is not None:           # not (wholly) written before the reboot
            self._verifier = self._verifier.resumed_at(index)
            return self._next()
        self.boot = self.boot.copy(cursor=index + 1)
        return self._scan()

    def _check_read(self, event):
        """(chunk index, ManifestError or None): the SlotRead checked as the next chunk."""
        index = self._verifier.next_index
        _expect_offset(event, index)
        try:
            self._verifier.update(index, event.data)
        except mf.ManifestError as error:
            return index, error
        return index, None

    # -- offer and download ------------------------------------------------

    def _offer(self, event):
        c = self.config
        try:
            self._release = mf.ReleaseVerifier(event.bundle, c.root_public_key, c.k,
                                               self.boot.ksv, c.bits_per_step)
        except RemoteError as error:
            return self._reject(error.code, event.ref)
        self._offered = (event.ref, event.now_ms)
        self.state = VERIFYING
        return [StepLater()]

    def _step(self, event):
        c = self.config
        ref, now_ms = self._offered
        try:
            if self._verdict is None:
                if not self._release.step():
                    return [StepLater()]
                # The verdict took this step (parsing a long manifest is its
                # biggest piece): what follows gets a step of its own.
                self._verdict, self._release = self._release.result(), None
                return [StepLater()]
            manifest = self._verdict
            mf.check(manifest, c.hw_class, self.boot.sv, now_ms // 1000)
        except RemoteError as error:   # ManifestError, CBORError
            return self._reject(error.code, ref)
        self._verdict = self._offered = None
        boot = self.boot.copy(phase=DOWNLOADING, target=1 - self.boot.active, cursor=0,
                              reason="", manifest=manifest.signed_bytes, repairs=0, ref=ref,
                              trial_sv=manifest.security_version,
                              trial_ksv=manifest.keyset_version)
        # Chunk hashes only: the whole-payload hash is checked on the read-back.
        self._verifier = mf.ChunkVerifier(manifest, whole=False)
        return self._save(boot) + self._next()

    def _rerequest(self, event):
        """The offer again (after a reconnect): ask for the cursor. An offer of
        another release means this one was withdrawn (its Cancel lost while
        the device was away): drop it and take the new one."""
        if event.ref != self.boot.ref:
            return self._reject("superseded") + self._offer(event)
        return self._resend(event)

    def _resend(self, event):
        """What the download waits for, asked again."""
        if self.state == PAGING:
            return [RequestPage(self._verifier.page_needed())]
        return [RequestChunk(self.boot.cursor)]

    def _next(self):
        """Ask for what the download needs next: the page of the next chunk
        if it is not held, else the chunk."""
        page = self._verifier.page_needed()
        if page is not None:
            self.state = PAGING
            return [RequestPage(page)]
        self.state = DOWNLOADING
        return [RequestChunk(self._verifier.next_index)]

    def _page(self, event):
        if event.index != self._verifier.page_needed():
            return []                   # a late answer to an earlier request
        try:
            self._verifier.load_page(event.index, event.data)
        except mf.ManifestError as error:
            return self._reject(error.code)
        if self._scanning:
            self._scanning = False
            return self._scan()
        return self._next()

    def _chunk(self, event):
        if event.index < self.boot.cursor:        # a late duplicate
            return []
        try:
            self._verifier.update(event.index, event.data)
        except mf.ManifestError as error:
            return self._reject(error.code)
        index = event.index
        write = WriteSlot(self.boot.target, index * mf.CHUNK_BYTES, event.data)
        self.boot = self.boot.copy(cursor=index + 1)
        actions = [write]
        if self.boot.cursor % self.config.cursor_every == 0:
            actions.append(WriteBootState(self.boot.encode()))
        if self.boot.cursor < self._verifier.manifest.chunk_count():
            return actions + self._next()
        return actions + self._start_check()

    # -- read-back check ---------------------------------------------------------

    def _start_check(self):
        """Read the whole slot back, chunk by chunk, against the manifest."""
        self._verifier = mf.ChunkVerifier(self._verifier.manifest, whole=True)
        self.state = CHECKING
        return [self._read(0)]

    def _read(self, index):
        size = self._verifier.manifest.size
        offset = index * mf.CHUNK_BYTES
        return ReadSlot(self.boot.target, offset, min(mf.CHUNK_BYTES, size - offset))

    def _slot_read(self, event):
        index, error = self._check_read(event)
        v = self._verifier
        if error is None and v.next_index < v.manifest.chunk_count():
            return [self._read(v.next_index)]
        if error is None:
            try:
                v.finish()
            except mf.ManifestError as e:
                error = e
        if error is not None:
            if error.code == "payload_hash":        # the chunks match, the manifest does not
                return self._reject(error.code)
            return self._repair(v.repair_from)      # a paged manifest: the bad page's first chunk
        # The manifest served the download and the check; from here on the
        # record is small (the bootloader rewrites it at the trial boot).
        return self._save(self.boot.copy(phase=VERIFIED, manifest=b"")) + self._install()

    def _repair(self, index):
        """The slot differs from the manifest at chunk `index`: download again
        from there, at most REPAIRS_MAX times per update."""
        if self.boot.repairs >= REPAIRS_MAX:
            return self._reject("slot_readback")
        self.log("slot %d differs at chunk %d: downloading from there" % (self.boot.target, index))
        self.boot = self.boot.copy(cursor=index, repairs=self.boot.repairs + 1)
        self._verifier = mf.ChunkVerifier(self._verifier.manifest, whole=False, next_index=index)
        return [WriteBootState(self.boot.encode())] + self._next()

    def _install(self):
        self._verifier = None
        self.state = INSTALLED
        return self._save(self.boot.copy(phase=INSTALLED)) + [Reboot()]

    def _cancel(self, event):
        ref = self._offered[0] if self.state == VERIFYING else self.boot.ref
        if event.ref != ref:
            return []  # about another release: not ours to drop
        self._read_abandoned = self.state == RESUMING
        return self._reject("cancelled", ref)

    def _reject(self, reason, ref=None):
        self._verifier = self._release = self._verdict = self._offered = None
        self._scanning = False
        self.state = REJECTED
        boot = self.boot.copy(phase=REJECTED, reason=reason, cursor=0, manifest=b"")
        if ref is not None:
            boot.ref = ref
        return self._save(boot)

    # -- trial ---------------------------------------------------------------

    def _healthy(self, event):
        self._start_clock(event.now_ms)
        if event.acked_count >= self.config.trial_acks_min:
            return self._confirm()
        return self._tick(event)

    def _tick(self, event):
        self._start_clock(event.now_ms)
        if event.now_ms - self._trial_start_ms >= self.config.trial_ms_max:
            return self._roll_back("trial_timeout")
        return []

    def _start_clock(self, now_ms):
        if self._trial_start_ms is None:
            self._trial_start_ms = now_ms

    def _confirm(self):
        b = self.boot
        self.state = CONFIRMED
        return self._save(b.copy(phase=CONFIRMED, active=b.target, sv=max(b.sv, b.trial_sv),
                                 ksv=max(b.ksv, b.trial_ksv), manifest=b"", cursor=0))

    def _roll_back(self, reason):
        self.state = ROLLED_BACK
        actions = self._save(self.boot.copy(phase=ROLLED_BACK, reason=reason, manifest=b"",
                                            cursor=0))
        if self.slot != self.boot.active:
            # Until the reset nothing may start: an offer now would target
            # the slot that is running (1 - active).
            self.state = REBOOTING
            actions.append(Reboot())
        return actions

    # -- helpers -------------------------------------------------------------

    def _save(self, boot):
        """Persist a new phase with the next report seq, then report it."""
        boot.seq = self.boot.seq + 1
        self.boot = boot
        return [WriteBootState(boot.encode()), self._report()]

    def _report(self):
        return Report(self.boot.phase, self.boot.reason, self.boot.seq, self.boot.ref)


def _expect_offset(event, index):
    """A SlotRead must answer the ReadSlot of chunk `index`."""
    if event.offset != index * mf.CHUNK_BYTES:
        raise LocalError("SlotRead at %d, expected %d" % (event.offset, index * mf.CHUNK_BYTES),
                         "bad_event")


def _check_event(event):
    for name, kind in _EVENT_FIELDS.get(type(event), ()):
        value = getattr(event, name)
        if kind == "blob":
            ok = value is None or isinstance(value, (bytes, bytearray))
        elif kind == "bytes":
            ok = isinstance(value, (bytes, bytearray, memoryview))
        else:
            ok = _is_kind(value, kind)
        if not ok:
            raise LocalError("%s.%s has a bad value" % (type(event).__name__, name), "bad_event")


def _no_log(message):
    pass
