"""The identity core's own connection to the claim endpoint (enrollment by
claim, recovery of an expired certificate), polled from a board's loop so
the loop never waits on it. Portable: the ESP32 (board/esp32_identity.py)
and a Linux board (board/linux_identity.py) run it alike.

    claim = ClaimLink(core.config, opener, ticks_ms, now_ms)
    claim.start()                      # on UseIdentity(None): connect
    for event in claim.poll():         # each pass: Connected, Message,
        core.handle(event)             # PubAcked, ConnectionLost, Refused
    claim.publish(action)              # the core's Publish while there
    claim.stop()                       # on a device certificate

The link (board/esp32_net.py MqttLink) connects with the batch's claim
certificate (opener's TLS context) as the hardware id, subscribed to the
answer topic; after a loss it is opened again after a backoff with jitter
(5 s doubling to 5 min, reset by an accepted connection).
"""

from agent import enroll
from agent.backoff import Backoff
from agent.events import Connected, ConnectionLost, Message, PubAcked, Refused
from board.esp32_net import MqttLink

RETRY_BASE_MS = 5000          # the claim endpoint's link, opened again after a loss, backing off
RETRY_CAP_MS = 300000         # ... with jitter, to at most 5 min (a fleet must not reconnect in step)


class ClaimLink:
    def __init__(self, config, opener, ticks_ms, now_ms, rng, log=None):
        self.ticks_ms, self.now_ms = ticks_ms, now_ms
        self.backoff = Backoff(rng, RETRY_BASE_MS, RETRY_CAP_MS)
        self.link = MqttLink(config.hwid, [enroll.claim_topics(config.claim, config.hwid)[1]], opener,
                             ticks_ms, log=log)
        self.retry_ms = None          # when to open again after a loss
        self.active = False

    def start(self):
        """Connect (again, when connected: the core asks for a new link)."""
        self.active = True
        self.link.close("reconnecting")
        self.link.poll()              # drop the close's own event
        self.retry_ms = None
        self.link.open()

    def stop(self):
        self.active = False
        self.link.close("done with the claim endpoint")
        self.link.poll()

    def publish(self, action):
        self.link.publish(action.topic, action.payload, action.token)

    def poll(self):
        """The link's events as the identity core's."""
        if not self.active:
            return []
        if self.link.state == "down" and self.retry_ms is not None and \
                _ticks_diff(self.ticks_ms(), self.retry_ms) >= 0:
            self.retry_ms = None
            self.link.open()
        out = []
        for what in self.link.poll():
            kind = what[0]
            if kind == "up":
                self.backoff.reset()
                out.append(Connected(self.now_ms()))
            elif kind == "message":
                out.append(Message(self.now_ms(), what[1], what[2]))
            elif kind == "acked":
                if what[1] is not None:
                    out.append(PubAcked(what[1]))
            else:
                self.retry_ms = _ticks_add(self.ticks_ms(), self.backoff.next_delay_ms())
                out.append(Refused(self.now_ms(), what[2]) if what[2] is not None
                           else ConnectionLost(self.now_ms(), what[1]))
        return out


try:
    from time import ticks_add as _ticks_add, ticks_diff as _ticks_diff
except ImportError:           # CPython
    def _ticks_add(a, b):
        return a + b

    def _ticks_diff(a, b):
        return a - b
