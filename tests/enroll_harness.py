"""An in-process cloud and a device on the simulated board, for the identity
core: the real CA, registry and provisioning decisions (cloud/provision.py),
the real agent core (agent/enroll.py) on SimFlash with keys on that flash.
Only the network is replaced, by `InProcessCloud.connect`, which accepts a
connection the way the broker would: our CA, the key matching the
certificate, not retired or revoked, not expired by the cloud's clock.
The broker tests (tests/test_provision_broker.py) run the same flows over
real mTLS MQTT on both brokers."""

import hashlib
import os

from agent import enroll
from agent.actions import Log, Publish, UseIdentity
from agent.events import Connected, Message, PubAcked, Refused, Tick
from board.keystore import FlashKeystore
from board.sim import PowerCut, SimClock, SimFlash, SimRng
from cloud.ca import CA, identity_of, load_cert
from cloud.identity import Registry
from cloud.provision import Provisioning
from board.enroller import IdentityBoard

BATCH = "b1"
CLAIM = "claim:" + BATCH


class InProcessCloud:
    def __init__(self, tmp, clock, cert_s=3600, quota=10):
        self.clock = clock
        self.ca = CA.create(os.path.join(str(tmp), "ca"))
        self.registry = Registry(os.path.join(str(tmp), "cloud.db"), clock_ms=clock.now_ms)
        self.prov = Provisioning(self.registry, self.ca, clock_ms=clock.now_ms, cert_s=cert_s)
        self.prov.add_claim(BATCH, quota, "factory-ops")

    def allow(self, hwid, device, approval=False, tenant="acme", cert_s=None):
        self.prov.allow(hwid, BATCH, tenant, device, "site-1", "ops", approval=approval, cert_s=cert_s)

    def refusal(self, keystore, use):
        """None if the broker would accept this identity, else why not."""
        if use.name is None:
            return None
        cert = load_cert(bytes(use.cert))
        if not self.ca.signed(cert):
            return "unknown_ca"
        if keystore.public_key(use.name) is None or not keystore.matches(use.name, use.cert):
            return "key_mismatch"
        if cert.serial_number in self.registry.revoked_serials():
            return "cert_revoked"
        row = self.registry._db.execute("SELECT not_after_ms FROM device_certs WHERE fingerprint = ?",
                                        (hashlib.sha256(bytes(use.cert)).hexdigest(),)).fetchone()
        if row is None or self.clock.now_ms() >= row[0]:
            return "cert_expired"
        return None


class Device:
    """The identity core on a sim board, talking to an InProcessCloud."""

    def __init__(self, cloud, hwid, flash=None, seed=7):
        self.cloud = cloud
        self.hwid = hwid
        self.flash = flash or SimFlash()
        self.keystore = FlashKeystore(self.flash)
        self.board = IdentityBoard(self.flash, self.keystore)
        self.seed = seed
        self.use = None
        self.logs = []
        self.offline = False
        self.boot()

    def boot(self):
        self.core = enroll.Identity(enroll.Config(self.hwid, CLAIM, self.keystore.capabilities,
                                                  answer_timeout_ms=5000), SimRng(self.seed))
        self.use = None
        self._carry(self.board.run(self.core, self.core.boot(self.flash.read(enroll.RECORD_FILE))))

    def power_cycle(self, cut_at_write=None):
        self.flash.power_on(cut_at_write)
        self.boot()

    def feed(self, event):
        self._carry(self.board.run(self.core, self.core.handle(event)))

    def step(self, ms=1000):
        self.cloud.clock.advance(ms)
        self.feed(Tick(self.cloud.clock.now_ms()))

    def _carry(self, actions):
        now = self.cloud.clock.now_ms
        for action in actions:
            if isinstance(action, Log):
                self.logs.append(action.code)
            elif isinstance(action, UseIdentity):
                self.use = action
                if self.offline:
                    continue
                why = self.cloud.refusal(self.keystore, action)
                self.feed(Connected(now()) if why is None else Refused(now(), why))
            elif isinstance(action, Publish) and not self.offline:
                self._deliver(action)

    def _deliver(self, action):
        now = self.cloud.clock.now_ms
        prov = self.cloud.prov
        if self.use is None:
            return
        if self.use.name is None:
            req, resp = enroll.claim_topics(CLAIM, self.hwid)
            if action.topic != req:
                return  # the broker's ACL would refuse it
            answer = prov.on_claim(CLAIM, self.hwid, action.payload)
        else:
            identity = identity_of(bytes(self.use.cert))
            req, resp = enroll.device_topics(identity)
            if action.topic != req:
                return
            answer = prov.on_device(identity, action.payload)
        if action.token is not None:
            self.feed(PubAcked(action.token))
        if answer is not None:
            self.feed(Message(now(), resp, answer))

    def working(self):
        """Could this device connect right now with what it holds?"""
        return self.use is not None and self.use.name is not None and \
            self.cloud.refusal(self.keystore, self.use) is None

    def run_until(self, done, steps_max=2000, ms=1000):
        for _ in range(steps_max):
            if done():
                return True
            self.step(ms)
        return done()


def enrolled(dev):
    return lambda: dev.core.state == enroll.ENROLLED and dev.core.record.get("u") is None and dev.working()


__all__ = ["InProcessCloud", "Device", "enrolled", "PowerCut", "SimClock", "SimFlash", "BATCH", "CLAIM"]
