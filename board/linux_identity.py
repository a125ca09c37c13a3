"""The identity core (agent/enroll.py) inside `tether agent run`: the device
certificate is rotated before it expires over LinuxAgent's own paho
connection, as the simulator's devices do over theirs (simulator/device.py),
and an expired one is recovered through the claim endpoint when the board
was given its claim certificate.

LinuxIdentity carries out the core's board actions with board/enroller.py's
IdentityBoard (the record on FileStorage under DATA, keys in the board's
keystore) and hands LinuxAgent (board/linux.py) what its connection must
do: Publish (QoS 1) and UseIdentity (reconnect with that certificate).
LinuxAgent feeds it Tick each pass, and Connected, ConnectionLost, Refused
and the messages on the answer topic of the connection it made with
`context()`.

UseIdentity(None) (the claim endpoint) is a recovery: with `recovery`
given, board/enroller.py's Enroller carries it out on its own connection
while the loop waits (at most RECOVER_TIMEOUT_S; telemetry stays queued,
no samples are taken meanwhile), retried every RECOVER_RETRY_S until it
succeeds. Without `recovery` the core is left waiting for the claim
endpoint: logged as an error, and telemetry goes on with the certificate
in force.
"""

import asyncio
import logging
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import enroll
from agent.actions import Log, Publish, UseIdentity
from agent.errors import LocalError
from agent.events import ConnectionLost, Tick
from board.enroller import Enroller, IdentityBoard

CERT_FILE = "identity.crt"     # the active certificate (PEM), for people and other tools
RECOVER_TIMEOUT_S = 60         # one recovery through the claim endpoint, at most
RECOVER_RETRY_S = 60           # then the next try, no sooner


def pem(cert):
    data = bytes(cert)
    if data.lstrip().startswith(b"-----"):
        return data
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.PEM)


class Recovery:
    """Where to recover an expired certificate: endpoints as board/enroller.py's
    Enroller takes them, claim = (certfile, keyfile), and the hardware id."""

    def __init__(self, endpoints, claim, hwid):
        self.endpoints = endpoints
        self.claim = claim
        self.hwid = hwid


class LinuxIdentity:
    """core: an enroll.Identity; storage: FileStorage of DATA (the record and
    identity.crt); keystore: the board's keystore, whose client_context never
    writes the key in clear (board/linux_main.py BoardKeystore)."""

    def __init__(self, core, storage, keystore, cafile, clock, logger=None, recovery=None):
        self.core = core
        self.board = IdentityBoard(storage, keystore)
        self.storage = storage
        self.keystore = keystore
        self.cafile = cafile
        self.clock = clock
        self.log = logger or logging.getLogger("tether.identity")
        self.recovery = recovery
        self.use = None            # the core's latest UseIdentity (name None: the claim endpoint)
        self.device_use = None     # its latest with a device certificate: what LinuxAgent presents
        self.failed = False        # the core raised: it sits in ERROR, nothing more is fed
        self.recover_at_ms = 0     # waiting for the claim endpoint: when to try it (again)
        self.cert_written = None   # the active certificate identity.crt holds

    @property
    def answer_topic(self):
        return enroll.device_topics(self.core.identity)[1]

    @property
    def on_device_endpoint(self):
        """Whether the core asked for a device certificate (not the claim endpoint)."""
        return self.use is not None and self.use.name is not None

    def boot(self):
        """-> transport actions; the record as a power cut left it."""
        blob = self.storage.read(enroll.RECORD_FILE)
        out = self._run(lambda: self.core.boot(blob), "boot")
        active = self.core.record.get("a")
        self.cert_written = None if active is None else active["cert"]
        return out

    def context(self):
        """The TLS client context for the device certificate in force."""
        return self.keystore.client_context(self.device_use.name, self.device_use.cert, self.cafile)

    def handle(self, event):
        """-> transport actions (Publish, UseIdentity) for LinuxAgent."""
        if self.failed or self.use is None:
            return []
        if not self.on_device_endpoint:
            # Link events of LinuxAgent's connection are not the claim
            # endpoint's: only Tick, to retry a recovery.
            return self._recover_tick(event.now_ms) if isinstance(event, Tick) else []
        return self._run(lambda: self.core.handle(event), type(event).__name__)

    def _run(self, step, what):
        try:
            left = self.board.run(self.core, step())
        except LocalError as e:           # a driver bug: stop rotating, keep the telemetry going
            self.failed = True
            self.log.error("identity core failed on %s: %s", what, e)
            return []
        out = []
        for action in left:
            if isinstance(action, Log):
                self.log.info("identity %s: %s", action.code, action.detail)
            elif isinstance(action, UseIdentity):
                self.use = action
                if action.name is not None:
                    self.device_use = action
                else:
                    self.recover_at_ms = 0
                    break                 # the rest belongs to the claim endpoint's connection
                out.append(action)
            elif isinstance(action, Publish):
                out.append(action)
        self._write_cert()
        return out

    def _write_cert(self):
        active = self.core.record.get("a")
        if active is not None and active["cert"] != self.cert_written:
            self.storage.write_atomic(CERT_FILE, pem(active["cert"]))
            self.cert_written = active["cert"]
            self.log.info("identity certificate in force: %s, valid until %s UTC (cloud time)", active["id"],
                          time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(active["exp"] / 1000)))

    # -- recovery through the claim endpoint ----------------------------------------

    def _recover_tick(self, now_ms):
        if now_ms < self.recover_at_ms:
            return []
        self.recover_at_ms = now_ms + RECOVER_RETRY_S * 1000
        if self.recovery is None:
            self.log.error("the certificate must be recovered through the claim endpoint (%s), and run "
                           "was not given --prov-url, --claim-cert, --claim-key and --hwid: telemetry goes "
                           "on with the certificate in force; run `tether agent enroll` (it recovers) or "
                           "restart with those options", self.core.last_reason or "refused or expired")
            return []
        r = self.recovery
        self.log.info("recovering the certificate through the claim endpoint %s:%d",
                      r.endpoints["host"], r.endpoints["prov_port"])
        enroller = Enroller(self.core, self.board, r.endpoints, r.claim, self.clock.now_ms, r.hwid)
        try:
            ok = asyncio.run(enroller.run(timeout_s=RECOVER_TIMEOUT_S, actions=[self.use]))
        except LocalError as e:
            self.failed = True
            self.log.error("identity core failed while recovering: %s", e)
            return []
        for code, detail in enroller.log:
            self.log.info("identity %s: %s", code, detail)
        # The core's connection is the one the Enroller ended on: a device
        # certificate (proven, or a candidate it did not get to prove) is
        # LinuxAgent's to connect with now; the claim endpoint is tried again
        # at recover_at_ms.
        self.use = enroller.use
        if self.on_device_endpoint:
            self.device_use = self.use
        self.core.handle(ConnectionLost(self.clock.now_ms(), "the recovery's connection closed"))
        self._write_cert()
        if not ok:
            self.log.warning("recovery not done in %d s (state %s)%s", RECOVER_TIMEOUT_S, self.core.state,
                             "" if self.on_device_endpoint else ": again in %d s" % RECOVER_RETRY_S)
        return [self.use] if self.on_device_endpoint else []
