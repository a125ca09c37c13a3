"""The identity core's board actions (agent/enroll.py), carried out on any
board, MicroPython included: MakeKey, Sign, WriteAtomic and DeleteKey with a
keystore (board/keystore.py, board/esp32_keystore.py) and a storage
(anything with write_atomic: SimFlash, FileStorage, the ESP32's
FlashStorage), the answers fed back to the core; the transport actions
(UseIdentity, Publish, Log) are handed to the caller.
"""

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
    def __init__(self, flash, keystore):
        self.flash = flash
        self.keystore = keystore

    def run(self, core, actions):
        """Carry out board actions depth first -> the transport actions left."""
        todo = list(actions)
        out = []
        while todo:
            action = todo.pop(0)
            follow = None
            if isinstance(action, MakeKey):
                if not (action.reuse and self.keystore.public_key(action.name) is not None):
                    self.keystore.generate(action.name)
                follow = core.handle(KeyMade(action.name, self.keystore.csr_der(action.name, CSR_SUBJECT)))
            elif isinstance(action, Sign):
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
