"""The identity core (agent/enroll.py) on the ESP32, polled from the agent's
loop (board/esp32_agent.py): enrollment by claim and recovery of an expired
certificate over a link of its own to the claim endpoint, rotation before
expiry over the agent's link to the device endpoint. Portable.

    identity = Esp32Identity(core, FlashStorage("/id"), keystore, contexts,
                             {"host": HOST, "device_port": 8883, "prov_port": 8884},
                             clock.ticks_ms, clock.now_ms)
    agent = Esp32Agent(..., identity=identity)    # the agent boots and polls it

contexts gives TLS client contexts: device(name, cert_der) for the key in
keystore slot `name` and its certificate (on MicroPython
board.esp32_net.tls_context(ca, cert, keystore.tls_key_der(name))), and
claim() for the batch's claim certificate (None on a board that has none:
it cannot enroll or recover, only rotate).

What the agent asks of it: ready() (a device certificate to connect with),
client_id(), answer_topic(), device_context(); on_link(event) with the
agent's link's Connected, ConnectionLost, Refused, Message (answer topic)
and PubAcked; poll() once per pass (the core's clock, the claim link);
take() -> (Publish actions for the agent's link, reconnect: the agent's
connection must be made again with device_context()).

Key generation and signing (agent/p256sign.py in pure Python: seconds on
a chip, once per certificate lifetime) are stepped, BITS_PER_PASS scalar
bits per poll (board/identity_board.py), so the agent's loop keeps turning
(telemetry, the link's keepalive) meanwhile; busy() says the loop should
not sleep between passes. bits_per_pass=None makes them in one go.
"""

from agent import enroll
from agent.actions import Log, Publish, UseIdentity
from agent.events import RotateNow, Tick
from board.claim_link import ClaimLink
from board.esp32_net import open_tls
from board.identity_board import IdentityBoard

HELD_MAX = 16             # link events held during a job: the latest kept
BITS_PER_PASS = 4         # one 4-bit window of a 256-bit scalar: 64 passes per key, 64 per signature

class Esp32Identity:
    def __init__(self, core, storage, keystore, contexts, endpoints, ticks_ms, now_ms, log=None,
                 bits_per_pass=BITS_PER_PASS):
        self.core = core
        self.board = IdentityBoard(storage, keystore, bits_per_pass)
        self.storage = storage
        self.contexts = contexts
        self.endpoints = endpoints
        self.ticks_ms = ticks_ms
        self.now_ms = now_ms
        self.log = log or _no_log
        self.use = None           # the core's latest UseIdentity
        self.failed = False       # the core raised: nothing more is fed (telemetry goes on)
        self.out = []             # Publish actions for the agent's link
        self.reconnect = False
        self.claim = None         # board/claim_link.py ClaimLink while the core is on the claim endpoint
        self.held = []            # link events that came while a key or signature was being made

    # -- the agent's side -----------------------------------------------------------

    def boot(self):
        self._run(lambda: self.core.boot(self.storage.read(enroll.RECORD_FILE)))

    def ready(self):
        """A device certificate to connect to the device endpoint with: the
        one the core asked for, or the active one while the core works on
        the claim endpoint (enrolling has none; a recovery or a broker that
        refused for a while must not silence a certificate that may still
        work: the link's events do not reach the core meanwhile)."""
        return self._device_use() is not None

    def _device_use(self):
        use = self.use
        if use is not None and use.name is not None and not self.failed and self._entry(use) is not None:
            return use
        a = self.core.record.get("a")
        return None if a is None else UseIdentity(a["k"], a["cert"])

    def _entry(self, use):
        """The record's identity (candidate or active) for that key and certificate, or None."""
        for key in ("c", "a"):
            entry = self.core.record.get(key)
            if entry is not None and entry["k"] == use.name and entry["cert"] == use.cert:
                return entry
        return None

    def client_id(self):
        """The identity of the certificate the next connection presents."""
        return self._entry(self._device_use())["id"]

    def answer_topic(self):
        return enroll.device_topics(self.client_id())[1]

    def device_context(self):
        use = self._device_use()
        return self.contexts.device(use.name, use.cert)

    def on_link(self, event):
        """An event of the agent's link (the device endpoint). While a key or
        signature is being made the core would let a refusal pass (it waits
        for KeyMade): the events wait, in order, and reach it after the job."""
        if self.use is not None and self.use.name is None:
            return                # the core is on the claim endpoint: not its link
        if self.board.busy():
            self.held.append(event)
            del self.held[:-HELD_MAX]
            return
        self._run(lambda: self.core.handle(event))

    def busy(self):
        """A key or a signature is being made in steps: do not sleep between polls."""
        return self.board.busy() and not self.failed

    def rotate_now(self):
        """A technician's console command: rotate now, whatever the certificate's age."""
        self._run(lambda: self.core.handle(RotateNow(self.now_ms())))

    def poll(self):
        if self.board.busy():
            self._carry(lambda: self.board.work(self.core))
        while self.held and not self.board.busy():
            self.on_link(self.held.pop(0))
        self._run(lambda: self.core.handle(Tick(self.now_ms())))
        if self.claim is not None and self.use is not None and self.use.name is None:
            for event in self.claim.poll():
                self._run(lambda: self.core.handle(event))

    def take(self):
        out, self.out = self.out, []
        reconnect, self.reconnect = self.reconnect, False
        return out, reconnect

    # -- inside -----------------------------------------------------------------------

    def _run(self, step):
        self._carry(lambda: self.board.run(self.core, step()))

    def _carry(self, work):
        """work() -> transport actions; carry them out. Nothing raises from here."""
        if self.failed:
            return
        try:
            actions = work()
        except Exception as e:    # a driver bug, a full flash: stop the identity, keep the telemetry going
            self._fail(e)
            return
        for action in actions:
            if isinstance(action, UseIdentity):
                self._use(action)
            elif isinstance(action, Publish):
                if self.use is not None and self.use.name is None:
                    if self.claim is not None:
                        self.claim.publish(action)
                else:
                    self.out.append(action)
            elif isinstance(action, Log):
                self.log("identity %s: %s" % (action.code, action.detail))

    def _fail(self, error):
        self.failed = True
        self.log("identity core failed: %s %s; telemetry goes on with the active certificate"
                 % (type(error).__name__, error))
        if self.claim is not None:
            self.claim.stop()
            self.claim = None

    def _use(self, action):
        self.use = action
        if action.name is None:   # the claim endpoint: a link of our own
            if self.claim is None:
                try:
                    self.claim = self._claim()
                except Exception as e:        # a claim certificate the TLS stack refuses
                    self._fail(e)
                    return
            if self.claim is not None:
                self.claim.start()
            else:
                self.log("identity: the claim endpoint is needed (%s) and this board has no claim "
                         "certificate" % (self.core.last_reason or "enrolling"))
            return
        if self.claim is not None:            # back to the device endpoint
            self.claim.stop()
            self.claim = None
        self.reconnect = True

    def _claim(self):
        ctx = self.contexts.claim()
        if ctx is None:
            return None
        ep = self.endpoints
        return ClaimLink(self.core.config, lambda: open_tls(ep["host"], ep["prov_port"], ctx),
                         self.ticks_ms, self.now_ms, self.core.rng, self.log)

def _no_log(text):
    pass

