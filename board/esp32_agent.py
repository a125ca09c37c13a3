"""The agent on an ESP32 under MicroPython: the telemetry core on the flash
filesystem, its MQTT connection (board/esp32_net.py) and, when given,
firmware updates (board/esp32_ota.py) over the same connection. One loop,
no threads: each pass polls the network, hands the core what happened and
lets the update driver do one bounded piece of work.

    agent = Esp32Agent("acme", "dev-1", FlashStorage("/data"), Clock(), Rng(),
                       lambda: open_tls(HOST, 8883, tls_context(ca, cert, key)), ota=ota)
    agent.boot()
    agent.run(read_sensors, sample_ms=10000)     # or call step() and sample() yourself

On a board the modules are frozen into the firmware and main.py builds the
agent; the board's reset (machine.reset) is the update driver's. With
identity (board/esp32_identity.py) it enrolls, rotates and recovers its
certificate; without, the certificate in opener's context is the one used.
The field console runs in the same loop when attached
(board/agent_console.py attach(): its commands act on this agent, its
audit log goes to the cloud over this link).
"""

import time

from agent import cbor, events, telemetry
from agent.actions import Append, Connect, Log, Publish, WriteAtomic
from board.esp32_net import MqttLink

ID_TOKEN = "id"               # an identity core's publish, told from telemetry's by its token
RECENT_MAX = 10               # samples and log lines kept for the console

IDLE_SLEEP_MS = 20            # a pass with nothing pending waits this long


class Esp32Agent:
    def __init__(self, tenant, device, storage, clock, rng, opener, config=None, codec=None,
                 ota=None, log=None, identity=None):
        """storage: board.esp32.FlashStorage; clock: now_ms() and ticks_ms();
        opener(): a stream to the broker (board.esp32_net.open_tls);
        ota: a board.esp32_ota.Esp32Ota whose transport is this agent's
        link (build it with transport=None and the agent sets it), or None;
        identity: a board.esp32_identity.Esp32Identity (enrollment,
        rotation, recovery), or None: the certificate in opener's context
        is the one used. With it, opener should take the context from
        identity.device_context(), and the connection's client id and
        answer topic follow the certificate in force."""
        self.identity = "%s/%s" % (tenant, device)
        self.storage = storage
        self.clock = clock
        self._log_out = log or _print
        self.recent_log = []      # the last RECENT_MAX log lines, and samples (the console's)
        self.recent_samples = []
        self.console = None       # a board.console_port.ConsolePort, when attached
        self.audit = None         # its board.agent_console.AuditLink
        self.core = telemetry.Telemetry(tenant, device, codec or cbor, rng, config)
        self.ota = ota
        self.id = identity
        self.subscriptions = [ota.down_topic] if ota is not None else []
        self.link = MqttLink(self.identity, self.subscriptions, opener, clock.ticks_ms, log=self.log)
        if ota is not None:
            ota.transport = self.link
        self.acked = 0            # telemetry records acknowledged since this boot (the trial's)
        self.lost = 0             # connections that went down

    def boot(self):
        if self.ota is not None:
            self.ota.boot()
        if self.id is not None:
            self.id.boot()
        self.execute(self.core.boot(self.storage.read("state"), self.storage.read("queue")))

    def log(self, text):
        _keep(self.recent_log, text)
        self._log_out(text)

    def attach_console(self, port, audit):
        """The field console (board/agent_console.py attach() builds both)."""
        self.console, self.audit = port, audit
        self.subscriptions.append(audit.down_topic)
        self.link.subscriptions = list(self.subscriptions)     # _open adds the identity's answer topic

    def sample(self, readings):
        _keep(self.recent_samples, " ".join("%s=%s" % (k, readings[k]) for k in sorted(readings)))
        self.feed(events.Sample(self.clock.now_ms(), readings))

    def feed(self, event):
        self.execute(self.core.handle(event))

    def step(self):
        """One pass: the core's clock, the network, then the update driver."""
        self.feed(events.Tick(self.clock.now_ms()))
        for what in self.link.poll():
            self._link_event(what)
        if self.id is not None:
            self.id.poll()
            self._carry_identity()
        if self.ota is not None:
            self.ota.poll(self.acked)
        if self.audit is not None:
            self.audit.step(self.clock.now_ms() // 1000)
        if self.console is not None:
            self.console.poll(0)      # a stepped signature check goes on over the passes

    def _publish_untracked(self, topic, payload):
        self.link.publish(topic, payload, None)     # no token: no telemetry ack follows

    def _link_event(self, what):
        kind, now = what[0], self.clock.now_ms()
        if kind == "up":
            self.feed(events.Connected(now))
            self._to_identity(events.Connected(now))
            if self.ota is not None:
                self.ota.connected()
            if self.audit is not None:
                self.audit.online(self._publish_untracked)
        elif kind == "message":
            if self.ota is not None and what[1] == self.ota.down_topic:
                self.ota.on_message(what[2])
            elif self.id is not None and what[1] == self.id.answer_topic():
                self._to_identity(events.Message(now, what[1], what[2]))
            elif self.audit is not None and what[1] == self.audit.down_topic:
                self.audit.on_message(what[2])
        elif kind == "acked":
            token = what[1]
            if isinstance(token, tuple) and token[0] == ID_TOKEN:
                self._to_identity(events.PubAcked(token[1]))
            elif token is not None:               # a telemetry record's (update reports carry None)
                self.acked += 1
                self.feed(events.PubAcked(token))
        elif kind == "down":
            self.lost += 1
            self.log("link down: %s" % what[1])
            if self.core.state != telemetry.OFFLINE:
                self.feed(events.ConnectionLost(now, what[1]))
            self._to_identity(events.Refused(now, what[2]) if what[2] is not None
                              else events.ConnectionLost(now, what[1]))
            if self.audit is not None:
                self.audit.offline()

    def _to_identity(self, event):
        if self.id is not None:
            self.id.on_link(event)
            self._carry_identity()

    def _carry_identity(self):
        """The identity core's publishes go out on this link; a new
        certificate means connecting again (the telemetry core's backoff
        says when; opener takes the new context)."""
        out, reconnect = self.id.take()
        for action in out:
            token = None if action.token is None else (ID_TOKEN, action.token)
            self.link.publish(action.topic, action.payload, token)
        if reconnect and self.link.state != "down":
            self.link.close("reconnecting with another certificate")

    def busy(self):
        """Work waits (a signature step, slot reads, a key being made): the loop should not sleep."""
        return ((self.ota is not None and self.ota.busy()) or (self.id is not None and self.id.busy())
                or (self.console is not None and self.console.console.busy()))

    def run(self, read_sensors, sample_ms, passes=None):
        """The board's loop: a sample every sample_ms, step() every pass.
        passes: stop after that many (None: for ever)."""
        next_sample = self.clock.ticks_ms()
        n = 0
        while passes is None or n < passes:
            n += 1
            now = self.clock.ticks_ms()
            if _ticks_diff(now, next_sample) >= 0:
                self.sample(read_sensors())
                next_sample = _ticks_add(now, sample_ms)      # ticks wrap (2**30 ms on an ESP32)
            self.step()
            if not self.busy():
                _sleep_ms(IDLE_SLEEP_MS)

    def execute(self, actions):
        for action in actions:
            if isinstance(action, Publish):
                # Not up: the ConnectionLost is on its way and the core resends.
                self.link.publish(action.topic, action.payload, action.token)
            elif isinstance(action, Append):
                self.storage.append(action.name, action.data)
            elif isinstance(action, WriteAtomic):
                self.storage.write_atomic(action.name, action.data)
            elif isinstance(action, Connect):
                self._open()
            elif isinstance(action, Log):
                self.log("%s: %s" % (action.code, action.detail))


    def _open(self):
        if self.id is not None:
            if not self.id.ready():
                # Enrolling or recovering on the claim endpoint: no device
                # certificate to connect with yet; the core backs off.
                self.feed(events.ConnectionLost(self.clock.now_ms(), "no device certificate yet"))
                return
            self.link.client_id = self.id.client_id()
            self.link.subscriptions = self.subscriptions + [self.id.answer_topic()]
        self.link.open()


def _print(text):
    print("tether:", text)


def _keep(recent, line):
    recent.append(line)
    if len(recent) > RECENT_MAX:
        del recent[0]


try:
    _ticks_diff = time.ticks_diff
    _ticks_add = time.ticks_add
    _sleep_ms = time.sleep_ms
except AttributeError:        # CPython (the tests)
    def _ticks_diff(a, b):
        return a - b

    def _ticks_add(a, b):
        return a + b

    def _sleep_ms(ms):
        time.sleep(ms / 1000)
