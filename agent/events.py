# Events the driver feeds into the agent core. Small value classes, no I/O.

from agent.value import Value


class Event(Value):
    __slots__ = ()


class Tick(Event):
    """Time has passed; the core may decide it is time to reconnect."""
    __slots__ = ("now_ms",)

    def __init__(self, now_ms):
        self.now_ms = now_ms


class Sample(Event):
    """The board read its sensors: make a telemetry record of these readings."""
    __slots__ = ("now_ms", "readings")

    def __init__(self, now_ms, readings):
        self.now_ms = now_ms
        self.readings = readings


class Connected(Event):
    """The transport is up and the broker accepted the session (CONNACK 0)."""
    __slots__ = ("now_ms",)

    def __init__(self, now_ms):
        self.now_ms = now_ms


class ConnectionLost(Event):
    """A connect attempt failed or a live connection ended."""
    __slots__ = ("now_ms", "reason")

    def __init__(self, now_ms, reason):
        self.now_ms = now_ms
        self.reason = reason


class PubAcked(Event):
    """The broker acknowledged (PUBACK) the publish carrying this token."""
    __slots__ = ("token",)

    def __init__(self, token):
        self.token = token


class KeyMade(Event):
    """The board made the key asked for (MakeKey) and a CSR signed by it (DER)."""
    __slots__ = ("name", "csr")

    def __init__(self, name, csr):
        self.name = name
        self.csr = csr


class Signed(Event):
    """The board signed the digest asked for (Sign): raw r || s, 64 bytes."""
    __slots__ = ("name", "signature")

    def __init__(self, name, signature):
        self.name = name
        self.signature = signature


class Message(Event):
    """A PUBLISH arrived from the cloud on a topic the device subscribed to."""
    __slots__ = ("now_ms", "topic", "payload")

    def __init__(self, now_ms, topic, payload):
        self.now_ms = now_ms
        self.topic = topic
        self.payload = payload


class Refused(Event):
    """TLS or the broker refused the identity we connected with (not a network
    failure): reason is e.g. "cert_expired", "not_authorized", "tls"."""
    __slots__ = ("now_ms", "reason")

    def __init__(self, now_ms, reason):
        self.now_ms = now_ms
        self.reason = reason


class RotateNow(Event):
    """Rotate the identity now, whatever its age (a technician's console
    command, an operator's request): new key, new certificate, old retired."""
    __slots__ = ("now_ms",)

    def __init__(self, now_ms):
        self.now_ms = now_ms
