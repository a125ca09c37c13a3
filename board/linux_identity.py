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
given, the core works over a connection of its own to the claim endpoint
(board/claim_link.py, polled from the loop's Tick: the loop goes on,
samples are taken and queued meanwhile; the link is opened again after a
loss) until it asks for the new certificate, which LinuxAgent then
connects with. Without `recovery` the core is left waiting for the claim
endpoint: logged as an error every RECOVER_RETRY_S, and telemetry goes on
with the certificate in force.
"""

import logging
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import enroll
from agent.actions import Log, Publish, UseIdentity
from agent.errors import LocalError
from agent.events import ConnectionLost, Refused, Tick
from board.claim_link import ClaimLink
from board.enroller import claim_context
from board.esp32_net import open_tls
from board.identity_board import IdentityBoard

CERT_FILE = "identity.crt"     # the active certificate (PEM), for people and other tools
RECOVER_RETRY_S = 60           # without the claim options: the error said again this often


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
        self.recover_at_ms = 0     # without recovery: when to say the claim endpoint is needed again
        self.cert_written = None   # the active certificate identity.crt holds
        self.claim = None          # board/claim_link.py ClaimLink while the core is on the claim endpoint
        self.last_refusal = None   # what the broker last said of the certificate (a Refused's reason)
        # The claim certificate's TLS context, made now: a key that does not
        # load fails the start, not a recovery months later.
        self.claim_ctx = None if recovery is None else claim_context(recovery.endpoints["cafile"],
                                                                      recovery.claim)

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
            # endpoint's: only Tick, which also turns the claim link.
            return self._claim_tick(event) if isinstance(event, Tick) else []
        if isinstance(event, Refused):
            self.last_refusal = event.reason
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
                if action.name is None:
                    self._to_claim_endpoint()
                    continue
                self.device_use = action
                if self.claim is not None:        # done there: LinuxAgent connects with it
                    self.claim.stop()
                    self.claim = None
                    self._run(lambda: self.core.handle(ConnectionLost(self.clock.now_ms(),
                                                                      "the claim endpoint's link closed")),
                              "ConnectionLost")
                out.append(action)
            elif isinstance(action, Publish):
                if self.on_device_endpoint:
                    out.append(action)
                elif self.claim is not None:
                    self.claim.publish(action)
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

    def _to_claim_endpoint(self):
        if self.recovery is None:             # said at the next Tick (and every RECOVER_RETRY_S)
            return
        r = self.recovery
        if self.claim is None:
            ctx = self.claim_ctx
            self.claim = ClaimLink(self.core.config,
                                   lambda: open_tls(r.endpoints["host"], r.endpoints["prov_port"], ctx,
                                                    server_name=r.endpoints.get("server_name")),
                                   self.clock.ticks_ms, self.clock.now_ms, self.core.rng,
                                   lambda text: self.log.info("claim endpoint: %s", text))
        self.log.info("recovering the certificate through the claim endpoint %s:%d (%s)",
                      r.endpoints["host"], r.endpoints["prov_port"], self.core.last_reason or "refused")
        self.claim.start()

    def _claim_tick(self, event):
        """The core's clock, then what happened on its claim link."""
        if self.claim is None:
            if event.now_ms >= self.recover_at_ms:
                self.recover_at_ms = event.now_ms + RECOVER_RETRY_S * 1000
                self.log.error("the broker refused this certificate (last: %s): if it expired it must be "
                               "recovered through the claim endpoint, and run was not given --prov-url, "
                               "--claim-cert, --claim-key and --hwid; `tether agent enroll` recovers it, "
                               "or restart with those options. Other refusals pass or need the operator "
                               "(a clone lockout lasts a minute; a revoked device stays refused). "
                               "Telemetry goes on with the certificate in force",
                               self.last_refusal or self.core.last_reason or "refused or expired")
            return self._run(lambda: self.core.handle(event), "Tick")
        out = self._run(lambda: self.core.handle(event), "Tick")
        for link_event in self.claim.poll() if self.claim is not None else ():
            out += self._run(lambda: self.core.handle(link_event), type(link_event).__name__)
        return out
