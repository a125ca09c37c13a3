"""board/identity_board.py: the identity core's board actions, stepped on a
small board. The real identity core (agent/enroll.py) and the real ESP32
keystore (board/esp32_keystore.py, pure-Python P-256 on its flash files):
stepped MakeKey and Sign give the very bytes the one-go path gives (RFC 6979
signatures, a seeded RNG), every other event reaches the core meanwhile,
actions behind a job wait their turn, and a failure leaves nothing half
done. On real MicroPython the stepped enrollment start runs in 128 KiB
(the source compiled there; each step of the key is one 4-bit window)."""

import hashlib
import random

import pytest

from agent import csr, enroll
from agent.actions import Log, MakeKey, Sign, WriteAtomic
from agent.events import ConnectionLost, KeyMade, Tick
from board.esp32 import FlashStorage
from board.esp32_keystore import Esp32Keystore
from board.identity_board import CSR_SUBJECT, IdentityBoard
from board.keystore import MemoryKeystore
from board.sim import SimFlash
from mpy import require_micropython, run_micropython_report
from test_esp32_keystore import SEEDED     # the portable seeded RNG, the same on MicroPython

HWID, CLAIM = "hw-esp-1", "claim:b1"
BITS = 4                                # one 4-bit window of the scalar per work()
STEPS_PER_SCALAR = 256 // BITS          # 64
HEAP_KB = 128            # compiling agent/enroll.py's source on the device needs more than 64



def seeded(seed=b"identity board"):
    scope = {}
    exec(SEEDED, scope)
    return scope["SeededRandom"](seed)


def keystore(tmp_path, name="keys"):
    return Esp32Keystore(FlashStorage(str(tmp_path / name)), seeded())


def core():
    return enroll.Identity(enroll.Config(HWID, CLAIM, {}), random.Random(1))


def work_until_done(board, identity, limit=1000):
    """work() until the job ends -> (calls, the transport actions then)."""
    for calls in range(1, limit + 1):
        out = board.work(identity)
        if not board.busy():
            return calls, out
    raise AssertionError("the job did not end")


def test_a_stepped_key_and_csr_are_the_bytes_made_at_once(tmp_path):
    stepped_core, at_once_core = core(), core()
    stepped = IdentityBoard(SimFlash(), keystore(tmp_path, "a"), BITS)
    at_once = IdentityBoard(SimFlash(), keystore(tmp_path, "b"))
    for c in (stepped_core, at_once_core):
        c.boot(None)
    make = stepped_core.handle(Tick(1000))
    assert make == [MakeKey("id0", True)] == at_once_core.handle(Tick(1000))
    assert stepped.run(stepped_core, make) == [] and stepped.busy()
    assert stepped_core.state == enroll.KEYGEN
    # the key's 64 windows, one call to start the CSR's signature, its 64 windows
    calls, out = work_until_done(stepped, stepped_core)
    assert calls == 2 * STEPS_PER_SCALAR + 1
    assert out == at_once.run(at_once_core, make)                    # UseIdentity(None): the claim endpoint
    assert stepped_core.csr == at_once_core.csr                      # the same CSR, byte for byte
    public = stepped.keystore.public_key("id0")
    assert public == at_once.keystore.public_key("id0")
    assert stepped_core.csr == csr.assemble(csr.request_info(CSR_SUBJECT, public),
                                            stepped.keystore.sign("id0", hashlib.sha256(
                                                csr.request_info(CSR_SUBJECT, public)).digest()))


def test_a_reused_key_is_not_made_again_only_its_csr_signed(tmp_path):
    ks = keystore(tmp_path)
    ks.generate("id0")
    before = ks.tls_key_der("id0")
    identity = core()
    identity.boot(None)
    board = IdentityBoard(SimFlash(), ks, BITS)
    board.run(identity, identity.handle(Tick(1000)))
    calls, _ = work_until_done(board, identity)
    assert calls == STEPS_PER_SCALAR + 1 and ks.tls_key_der("id0") == before


def test_a_stepped_signature_is_the_one_made_at_once(tmp_path):
    ks = keystore(tmp_path)
    ks.generate("id0")
    digest = hashlib.sha256(b"recovery").digest()

    class Answer:                       # what the board hands the core: recorded
        got = []

        def handle(self, event):
            self.got.append(event)
            return [Log("signed", "")]

    board = IdentityBoard(SimFlash(), ks, BITS)
    answer = Answer()
    assert board.run(answer, [Sign("id0", digest)]) == [] and board.busy()
    calls, out = work_until_done(board, answer)
    assert calls == STEPS_PER_SCALAR and out == [Log("signed", "")]
    assert answer.got[0].signature == ks.sign("id0", digest)


def test_the_core_takes_other_events_while_a_key_is_made_and_actions_wait_their_turn(tmp_path):
    identity = core()
    identity.boot(None)
    flash = SimFlash()
    board = IdentityBoard(flash, keystore(tmp_path), BITS)
    board.run(identity, identity.handle(Tick(1000)))
    for i in range(5):                  # the loop goes on: ticks and link events reach the core
        board.work(identity)
        assert board.run(identity, identity.handle(Tick(1000 + i))) == []
        assert board.run(identity, identity.handle(ConnectionLost(1000 + i, "x"))) == []
    # actions that come meanwhile are carried out after the job, in order
    assert board.run(identity, [WriteAtomic("behind", b"1"), Log("after", "")]) == []
    assert flash.read("behind") is None
    _, out = work_until_done(board, identity)
    assert flash.read("behind") == b"1"
    assert [type(a).__name__ for a in out] == ["UseIdentity", "Log"]
    assert identity.state == enroll.WAITING


def test_a_failure_mid_job_leaves_nothing_to_replay(tmp_path):
    identity = core()
    identity.boot(None)
    ks = keystore(tmp_path)
    board = IdentityBoard(SimFlash(), ks, BITS)
    board.run(identity, identity.handle(Tick(1000)))
    board.run(identity, [WriteAtomic("behind", b"1")])

    def full(name, data):
        raise OSError(28, "no space left on flash")

    ks.storage.write_atomic = full      # the key file cannot be written
    with pytest.raises(OSError):
        work_until_done(board, identity)
    assert not board.busy() and board.todo == []


def test_a_keystore_that_cannot_step_makes_keys_at_once(tmp_path):
    identity = core()
    identity.boot(None)
    board = IdentityBoard(SimFlash(), MemoryKeystore(), BITS)
    out = board.run(identity, identity.handle(Tick(1000)))
    assert not board.busy() and [type(a).__name__ for a in out] == ["UseIdentity"]
    assert isinstance(identity.csr, bytes)


def test_a_keymade_for_another_slot_is_refused_by_the_core(tmp_path):
    """The board answers exactly what was asked: the core checks it."""
    identity = core()
    identity.boot(None)
    identity.handle(Tick(1000))
    with pytest.raises(Exception) as e:
        identity.handle(KeyMade("id1", b"x"))
    assert getattr(e.value, "code", None) == "bad_key"


# ---------------------------------------------------------------- MicroPython

MPY_STEPS = [
    "import binascii",
    "from agent import enroll",
    "from agent.events import Tick",
    "from board.esp32 import FlashStorage, Rng",
    "from board.esp32_keystore import Esp32Keystore",
    "from board.identity_board import IdentityBoard",
    "from board.sim import SimFlash",
    SEEDED,
    "core = enroll.Identity(enroll.Config(%r, %r, {}), Rng())\n"
    "core.boot(None)\n"
    "board = IdentityBoard(SimFlash(), Esp32Keystore(FlashStorage('/keys'), SeededRandom(b'identity board')), %d)\n"
    "print('run', board.run(core, core.handle(Tick(1000))), board.busy())" % (HWID, CLAIM, BITS),
] + ["out = board.work(core)"] * (2 * STEPS_PER_SCALAR + 1) + [
    "print('done', board.busy(), core.state, [type(a).__name__ for a in out])\n"
    "print('csr', binascii.hexlify(core.csr).decode())",
]


def test_stepped_enrollment_start_on_micropython_matches_cpython(tmp_path):
    require_micropython()
    report = run_micropython_report(MPY_STEPS[0], heap_kb=HEAP_KB, modules=("agent", "board"),
                                    steps=MPY_STEPS[1:], timeout_s=180)
    lines = dict(line.split(" ", 1) for line in report["stdout"].splitlines())
    assert lines["run"] == "[] True"
    assert lines["done"] == "False waiting ['UseIdentity']"
    identity = core()
    identity.boot(None)
    at_once = IdentityBoard(SimFlash(), keystore(tmp_path))
    at_once.run(identity, identity.handle(Tick(1000)))
    assert lines["csr"] == identity.csr.hex()
    print("\nMicroPython: stepped key and CSR, %d steps, heap peak %d bytes (budget %d)"
          % (len(MPY_STEPS), report["heap_peak_bytes"], HEAP_KB * 1024))


# ---------------------------------------------------------------- the ESP32 driver around it

def test_a_refusal_while_a_rotation_key_is_made_reaches_the_core_after_the_job(tmp_path):
    """The core waits for KeyMade in KEYGEN and lets a refusal pass there, so
    Esp32Identity holds the link's events during a job and feeds them in
    order after it: an expired certificate refused while the rotation's key
    is made starts the recovery at once (it waited for the next refusal, 8
    passes later in this rig, before)."""
    from board import esp32_net
    from board.esp32_keystore import Esp32Keystore as Keystore
    from test_review_identity_links import CLAIM_RESP, Rig, issued

    class Patch:
        def setattr(self, owner, name, value):
            setattr(owner, name, value)

    rig = Rig(Patch(), keystore=Keystore(SimFlash(), seeded()))
    assert rig.run_until(lambda: rig.claim.requests())
    rig.claim.answer(CLAIM_RESP, issued(rig.claim.requests()[-1]["nonce"], rig.clock.now_ms(), life_ms=600_000))
    assert rig.run_until(lambda: rig.core.state == enroll.ENROLLED and rig.agent.link.state == "up")
    assert rig.run_until(lambda: rig.identity.busy(), ms=500, limit=5000)      # rotating: the key is being made
    assert (rig.core.state, rig.core.purpose) == (enroll.KEYGEN, enroll.OP_ROTATE)
    rig.device.refuse_open = esp32_net.TlsRefused("certificate has expired")
    rig.device.live[-1].hung_up = True
    passes = 0
    while rig.core.purpose == enroll.OP_ROTATE:
        rig.step()
        passes += 1
        assert passes < 1000
    assert rig.core.purpose == enroll.OP_RECOVER and rig.core.state == enroll.KEYGEN
    assert passes == 2 * STEPS_PER_SCALAR + 1          # in the pass the rotation's job ended
    assert any("certificate has expired" in line for line in rig.logged)
