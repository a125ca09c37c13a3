"""The identity core's board actions (agent/enroll.py), carried out on any
board, MicroPython included: MakeKey, Sign, WriteAtomic and DeleteKey with a
keystore (board/keystore.py, board/esp32_keystore.py) and a storage
(anything with write_atomic: SimFlash, FileStorage, the ESP32's
FlashStorage), the answers fed back to the core; the transport actions
(UseIdentity, Publish, Log) are handed to the caller.

With bits_per_pass (a small board: agent/p256sign.py in pure Python takes
seconds per key or signature), MakeKey and Sign become jobs stepped by
work(), one bounded piece per call of the board's loop: a new key (unless
reused) in steps of that many scalar bits, then the CSR's signature the
same way. Actions that come meanwhile wait behind the job, in order; the
identity core takes every other event in its stride while it waits for
KeyMade or Signed. Only a keystore that offers generating() and signer()
(board/esp32_keystore.py) is stepped; others make keys and sign at once.
"""

import hashlib

from agent import csr
from agent.actions import DeleteKey, MakeKey, Sign, WriteAtomic
from agent.events import KeyMade, Signed

CSR_SUBJECT = "tether device"  # the cloud decides the identity, never the CSR


def refusal_reason(exc):
    """What a failed TLS handshake or CONNACK says about our certificate."""
    text = str(exc).lower()
    if "expired" in text:
        return "cert_expired"
    if "revoked" in text:
        return "cert_revoked"
    if "unknown ca" in text or "certificate unknown" in text or "bad certificate" in text:
        return "cert_refused"
    return "refused"


class IdentityBoard:
    def __init__(self, flash, keystore, bits_per_pass=None):
        self.flash = flash
        self.keystore = keystore
        # None: keys and signatures at once (always, for a keystore that cannot
        # step them: its keys are made by cryptography or a token, quickly)
        stepping = hasattr(keystore, "generating") and hasattr(keystore, "signer")
        self.bits_per_pass = bits_per_pass if stepping else None
        self.job = None                        # a stepped MakeKey or Sign
        self.todo = []                         # actions waiting behind the job

    def busy(self):
        """True while a key or a signature is being made in steps."""
        return self.job is not None

    def run(self, core, actions):
        """Carry out board actions depth first -> the transport actions left."""
        self.todo.extend(actions)
        return [] if self.job is not None else self._drain(core)

    def _drain(self, core):
        try:
            return self._carry_out(core)
        except BaseException:
            self.todo, self.job = [], None    # a failure leaves nothing half done to replay
            raise

    def work(self, core):
        """One step of the job under way; once it ends its answer goes to the
        core and what follows is carried out -> the transport actions left."""
        if self.job is None:
            return []
        try:
            event = self.job.step(self.bits_per_pass)
            if event is None:
                return []
            self.job = None
            self.todo[:0] = core.handle(event)
        except BaseException:
            self.todo, self.job = [], None
            raise
        return self._drain(core)

    def _carry_out(self, core):
        out = []
        todo = self.todo
        while todo and self.job is None:
            action = todo.pop(0)
            follow = None
            if isinstance(action, MakeKey):
                if self.bits_per_pass:
                    self.job = _KeyJob(self.keystore, action)
                    continue
                if not (action.reuse and self.keystore.public_key(action.name) is not None):
                    self.keystore.generate(action.name)
                follow = core.handle(KeyMade(action.name, self.keystore.csr_der(action.name, CSR_SUBJECT)))
            elif isinstance(action, Sign):
                if self.bits_per_pass:
                    self.job = _SignJob(self.keystore, action)
                    continue
                follow = core.handle(Signed(action.name, self.keystore.sign(action.name, action.digest)))
            elif isinstance(action, WriteAtomic):
                self.flash.write_atomic(action.name, action.data)
            elif isinstance(action, DeleteKey):
                self.keystore.delete(action.name)
            else:
                out.append(action)
            if follow:
                todo[:0] = follow
        return out


class _KeyJob:
    """MakeKey in steps: the key (unless reused), then the CSR's signature.
    The CSR is byte for byte the keystore's csr_der (RFC 6979 signatures)."""

    def __init__(self, keystore, action):
        self.keystore = keystore
        self.name = action.name
        reuse = action.reuse and keystore.public_key(action.name) is not None
        self.generation = None if reuse else keystore.generating(action.name)
        self.info = None
        self.signer = None

    def step(self, bits):
        """-> KeyMade once done, else None."""
        if self.generation is not None:
            if self.generation.step(bits):
                self.generation = None          # written; the signature starts next step
            return None
        if self.signer is None:
            self.info = csr.request_info(CSR_SUBJECT, self.keystore.public_key(self.name))
            self.signer = self.keystore.signer(self.name, hashlib.sha256(self.info).digest())
            return None
        if not self.signer.step(bits):
            return None
        return KeyMade(self.name, csr.assemble(self.info, self.signer.result()))


class _SignJob:
    def __init__(self, keystore, action):
        self.name = action.name
        self.signer = keystore.signer(action.name, action.digest)

    def step(self, bits):
        """-> Signed once done, else None."""
        if not self.signer.step(bits):
            return None
        return Signed(self.name, self.signer.result())
