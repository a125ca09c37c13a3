# Client side of MQTT 3.1.1, sans-IO: encoders return bytes, a Parser turns
# the broker's byte stream into packets. No sockets, clocks or logging here
# (h11 is the model). Runs unchanged on MicroPython and CPython.
#
# Scope: QoS 0 and 1 only (what tether uses). Encoders refuse QoS 2; the
# parser treats QoS 2 traffic from the broker (PUBLISH QoS 2, PUBREC, PUBREL,
# PUBCOMP) as a protocol error, since a client that never asks for QoS 2
# must never see it.
#
# Copies: a packet that arrives whole inside one feed() is decoded straight
# from the caller's buffer, so a PUBLISH payload is copied once. A packet
# split across feeds is gathered into one exact-size bytearray (allocated when
# its header is complete, never larger than max_packet); its payload is then
# copied out once more.

import sys

from agent.errors import MQTTError
from agent.value import Value

try:
    from micropython import const
except ImportError:
    def const(x):
        return x


MAX_REMAINING = const(268435455)   # largest remaining length (4-byte varint)
MAX_PACKET_DEFAULT = const(4096)   # Parser default: 1 KiB payload + topic, ample
MAX_FIELD = const(65535)           # u16-prefixed strings and binary fields
SUBACK_FAILURE = const(0x80)

# CPython's decoder rejects every ill-formed sequence; MicroPython's checks
# only the lead/continuation structure (it lets surrogates, overlongs and
# code points past U+10FFFF through), so there we check again ourselves.
_LENIENT_DECODE = sys.implementation.name == "micropython"

CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
PUBREC = const(5)
PUBREL = const(6)
PUBCOMP = const(7)
SUBSCRIBE = const(8)
SUBACK = const(9)
UNSUBSCRIBE = const(10)
UNSUBACK = const(11)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)

_CONNACK_REASONS = (
    "accepted",
    "unacceptable protocol version",
    "identifier rejected",
    "server unavailable",
    "bad username or password",
    "not authorized",
)


def connack_reason(rc):
    """Text for a CONNACK return code, for error messages and logs."""
    if 0 <= rc < len(_CONNACK_REASONS):
        return _CONNACK_REASONS[rc]
    return "unknown return code %d" % rc


# ---------------------------------------------------------------- packets


class Packet(Value):
    __slots__ = ()


class ConnAck(Packet):
    __slots__ = ("session_present", "return_code")

    def __init__(self, session_present, return_code):
        self.session_present = session_present
        self.return_code = return_code


class PubAck(Packet):
    __slots__ = ("packet_id",)

    def __init__(self, packet_id):
        self.packet_id = packet_id


class Publish(Packet):
    """An incoming message. packet_id is None for QoS 0."""
    __slots__ = ("topic", "payload", "qos", "packet_id", "dup", "retain")

    def __init__(self, topic, payload, qos, packet_id, dup, retain):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.packet_id = packet_id
        self.dup = dup
        self.retain = retain


class SubAck(Packet):
    """return_codes is a tuple: granted QoS per filter, or SUBACK_FAILURE."""
    __slots__ = ("packet_id", "return_codes")

    def __init__(self, packet_id, return_codes):
        self.packet_id = packet_id
        self.return_codes = return_codes


class UnsubAck(Packet):
    __slots__ = ("packet_id",)

    def __init__(self, packet_id):
        self.packet_id = packet_id


class PingResp(Packet):
    __slots__ = ()


class Will:
    """Last will for connect(): published by the broker if we vanish."""
    __slots__ = ("topic", "payload", "qos", "retain")

    def __init__(self, topic, payload=b"", qos=0, retain=False):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


_PINGRESP = PingResp()  # stateless: one shared instance


# ---------------------------------------------------------------- encoders


def _u16(n):
    return bytes((n >> 8, n & 0xFF))


def _remaining_length(n):
    """Varint bytes for a remaining length (MQTT-2.2.3)."""
    if n < 0 or n > MAX_REMAINING:
        raise MQTTError("remaining length %d exceeds %d" % (n, MAX_REMAINING),
                        "too_large")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _packet(first, parts):
    """Fixed header plus parts (all bytes), joined with a single copy."""
    n = 0
    for p in parts:
        n += len(p)
    return b"".join([bytes((first,)) + _remaining_length(n)] + parts)


def _as_bytes(data, what):
    # b"".join on MicroPython needs every item to be bytes exactly.
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise MQTTError("%s must be bytes-like, not %s" % (what, type(data).__name__),
                    "bad_argument")


def _utf8(s, what, code):
    """u16-length-prefixed UTF-8 string field (MQTT-1.5.3)."""
    if not isinstance(s, str):
        raise MQTTError("%s must be str, not %s" % (what, type(s).__name__), code)
    try:
        b = s.encode("utf-8")
    except UnicodeError:
        raise MQTTError("%s is not valid UTF-8" % what, code)
    if len(b) > MAX_FIELD:
        raise MQTTError("%s is %d bytes, over %d" % (what, len(b), MAX_FIELD), code)
    if "\x00" in s:
        raise MQTTError("%s contains U+0000" % what, code)
    return _u16(len(b)) + b


def _binary(data, what):
    """u16-length-prefixed binary field."""
    data = _as_bytes(data, what)
    if len(data) > MAX_FIELD:
        raise MQTTError("%s is %d bytes, over %d" % (what, len(data), MAX_FIELD),
                        "too_large")
    return _u16(len(data)) + data


def _topic_name(topic):
    """A PUBLISH topic: non-empty, no wildcards (MQTT-3.3.2-2, 4.7.3-1)."""
    field = _utf8(topic, "topic", "bad_topic")
    if len(field) == 2:
        raise MQTTError("topic is empty", "bad_topic")
    if "+" in topic or "#" in topic:
        raise MQTTError("topic %r contains a wildcard" % topic, "bad_topic")
    return field


def _topic_filter(f):
    """A SUBSCRIBE/UNSUBSCRIBE filter: wildcards only as whole levels."""
    field = _utf8(f, "topic filter", "bad_topic")
    if len(field) == 2:
        raise MQTTError("topic filter is empty", "bad_topic")
    levels = f.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) != 1:
            raise MQTTError("wildcard must be a whole level in %r" % f, "bad_topic")
        if level == "#" and i != last:
            raise MQTTError("'#' must be the last level in %r" % f, "bad_topic")
    return field


def _packet_id(packet_id):
    if not isinstance(packet_id, int) or not 1 <= packet_id <= 65535:
        raise MQTTError("packet id must be 1..65535, not %r" % (packet_id,),
                        "bad_packet_id")
    return _u16(packet_id)


def _qos01(qos, what):
    if not isinstance(qos, int) or qos not in (0, 1):
        raise MQTTError("%s QoS must be 0 or 1 (QoS 2 unsupported), not %r"
                        % (what, qos), "bad_qos")


def connect(client_id, keepalive_s, clean_session=True, username=None,
            password=None, will=None):
    """CONNECT (MQTT-3.1). password may be str or bytes; needs a username."""
    if not isinstance(keepalive_s, int) or not 0 <= keepalive_s <= 65535:
        raise MQTTError("keepalive_s must be 0..65535, not %r" % (keepalive_s,),
                        "bad_argument")
    cid = _utf8(client_id, "client id", "bad_argument")
    if len(cid) == 2 and not clean_session:
        raise MQTTError("an empty client id needs clean_session", "protocol")
    if password is not None and username is None:
        raise MQTTError("a password needs a username (MQTT-3.1.2-22)", "protocol")
    flags = 0x02 if clean_session else 0
    parts = [b"\x00\x04MQTT\x04", b"", _u16(keepalive_s), cid]
    if will is not None:
        if not isinstance(will.qos, int) or will.qos not in (0, 1, 2):
            raise MQTTError("will QoS must be 0..2, not %r" % (will.qos,), "bad_qos")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        parts.append(_topic_name(will.topic))
        parts.append(_binary(will.payload, "will payload"))
    if username is not None:
        flags |= 0x80
        parts.append(_utf8(username, "username", "bad_argument"))
    if password is not None:
        flags |= 0x40
        if isinstance(password, str):
            password = password.encode("utf-8")
        parts.append(_binary(password, "password"))
    parts[1] = bytes((flags,))
    return _packet(0x10, parts)


def publish(topic, payload, qos, packet_id=None, dup=False, retain=False):
    """PUBLISH (MQTT-3.3). Pass payload as bytes to avoid an extra copy."""
    _qos01(qos, "publish")
    parts = [_topic_name(topic)]
    if qos:
        parts.append(_packet_id(packet_id))
    elif packet_id is not None or dup:
        raise MQTTError("QoS 0 publish takes no packet id and no dup", "protocol")
    parts.append(_as_bytes(payload, "payload"))
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return _packet(first, parts)


def puback(packet_id):
    return _packet(0x40, [_packet_id(packet_id)])


def _filter_list(filters):
    if not isinstance(filters, (list, tuple)) or not filters:
        raise MQTTError("filters must be a non-empty list", "bad_argument")
    return filters


def subscribe(packet_id, filters):
    """SUBSCRIBE (MQTT-3.8): filters is a non-empty list of (filter, qos)."""
    parts = [_packet_id(packet_id)]
    for item in _filter_list(filters):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise MQTTError("each filter must be a (filter, qos) pair", "bad_argument")
        f, qos = item
        _qos01(qos, "subscribe")
        parts.append(_topic_filter(f))
        parts.append(bytes((qos,)))
    return _packet(0x82, parts)


def unsubscribe(packet_id, filters):
    """UNSUBSCRIBE (MQTT-3.10): filters is a non-empty list of filters."""
    parts = [_packet_id(packet_id)]
    for f in _filter_list(filters):
        parts.append(_topic_filter(f))
    return _packet(0xA2, parts)


def pingreq():
    return b"\xc0\x00"


def disconnect():
    return b"\xe0\x00"


# ---------------------------------------------------------------- parser


def _malformed(msg):
    return MQTTError(msg, "malformed")


def _check_first(b):
    """Reject a fixed header's first byte as early as it arrives."""
    kind = b >> 4
    flags = b & 0x0F
    if kind == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise _malformed("PUBLISH with QoS 3")
        if qos == 2:
            raise MQTTError("PUBLISH with QoS 2, never requested", "protocol")
        if qos == 0 and flags & 0x08:
            raise _malformed("QoS 0 PUBLISH with DUP set (MQTT-3.3.1-2)")
        return
    if kind in (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP):
        if flags:
            raise _malformed("reserved flags 0x%x on packet type %d" % (flags, kind))
        return
    if kind == 0 or kind == 15:
        raise _malformed("reserved packet type %d" % kind)
    if kind in (PUBREC, PUBREL, PUBCOMP):
        raise MQTTError("QoS 2 packet type %d, never requested" % kind, "protocol")
    raise MQTTError("client-to-server packet type %d from the server" % kind,
                    "protocol")


def _check_length(first, n):
    """Reject a wrong remaining length before any body byte is kept."""
    kind = first >> 4
    if kind == PUBLISH:
        least = 5 if first & 0x06 else 3  # topic >= 1 byte, packet id if QoS>0
        if n < least:
            raise _malformed("PUBLISH remaining length %d < %d" % (n, least))
    elif kind == SUBACK:
        if n < 3:
            raise _malformed("SUBACK remaining length %d < 3" % n)
    elif kind == PINGRESP:
        if n != 0:
            raise _malformed("PINGRESP remaining length %d != 0" % n)
    elif n != 2:  # CONNACK, PUBACK, UNSUBACK
        raise _malformed("packet type %d remaining length %d != 2" % (kind, n))


def _id(body, pos):
    pid = (body[pos] << 8) | body[pos + 1]
    if pid == 0:
        raise _malformed("packet id 0")
    return pid


# Lead byte -> (continuation bytes, range of the first continuation byte),
# from Unicode Table 3-7 (well-formed UTF-8 byte sequences).
def _utf8_lead(c):
    if 0xC2 <= c <= 0xDF:
        return 1, 0x80, 0xBF
    if c == 0xE0:
        return 2, 0xA0, 0xBF
    if c == 0xED:
        return 2, 0x80, 0x9F
    if 0xE1 <= c <= 0xEF:
        return 2, 0x80, 0xBF
    if c == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= c <= 0xF3:
        return 3, 0x80, 0xBF
    if c == 0xF4:
        return 3, 0x80, 0x8F
    return 0, 0, 0


def _utf8_well_formed(raw):
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c < 0x80:
            i += 1
            continue
        need, lo, hi = _utf8_lead(c)
        if need == 0 or i + need >= n or not lo <= raw[i + 1] <= hi:
            return False
        for j in range(i + 2, i + need + 1):
            if not 0x80 <= raw[j] <= 0xBF:
                return False
        i += need + 1
    return True


def _topic(raw):
    try:
        topic = str(raw, "utf-8")
    except UnicodeError:
        raise _malformed("topic is not valid UTF-8")
    if _LENIENT_DECODE and len(topic) != len(raw) and not _utf8_well_formed(raw):
        raise _malformed("topic is not well-formed UTF-8")
    if "\x00" in topic:
        raise _malformed("topic contains U+0000")
    if "+" in topic or "#" in topic:
        raise _malformed("PUBLISH topic %r contains a wildcard" % topic)
    return topic


def _decode_publish(first, body):
    n = len(body)
    pos = 2 + ((body[0] << 8) | body[1])
    if pos == 2:
        raise _malformed("PUBLISH with an empty topic")
    qos = (first >> 1) & 3
    if pos + (2 if qos else 0) > n:
        raise _malformed("PUBLISH topic runs past the packet")
    topic = _topic(body[2:pos])
    pid = None
    if qos:
        pid = _id(body, pos)
        pos += 2
    return Publish(topic, bytes(body[pos:]), qos, pid,
                   bool(first & 0x08), bool(first & 0x01))


def _decode_connack(body):
    ack, rc = body[0], body[1]
    if ack & 0xFE:
        raise _malformed("CONNACK reserved ack flags 0x%x" % ack)
    if rc >= len(_CONNACK_REASONS):
        raise _malformed("CONNACK reserved return code %d" % rc)
    if rc and ack:
        raise _malformed("CONNACK refusal with session present (MQTT-3.2.2-4)")
    return ConnAck(bool(ack), rc)


def _decode_suback(body):
    codes = tuple(body[2:])
    for c in codes:
        if c > 2 and c != SUBACK_FAILURE:
            raise _malformed("SUBACK reserved return code 0x%x" % c)
    return SubAck(_id(body, 0), codes)


def _decode(first, body):
    """One packet from its first byte and its (length-checked) body."""
    kind = first >> 4
    if kind == PUBLISH:
        return _decode_publish(first, body)
    if kind == PUBACK:
        return PubAck(_id(body, 0))
    if kind == CONNACK:
        return _decode_connack(body)
    if kind == SUBACK:
        return _decode_suback(body)
    if kind == UNSUBACK:
        return UnsubAck(_id(body, 0))
    return _PINGRESP


class Parser:
    """The broker-to-client byte stream, fed in any fragmentation.

    feed(data) returns the list of packets completed by data. Any violation
    raises MQTTError; the parser then stays failed (error holds the first
    error, each later feed raises again) and the connection must be dropped.
    The packets completed before the error within that feed are attached to
    the error as .packets. At most one packet is buffered at a time, and
    never one whose header announces more than max_packet bytes in total.
    """
    __slots__ = ("max_packet", "error", "_first", "_length", "_shift",
                 "_body", "_have")

    def __init__(self, max_packet=MAX_PACKET_DEFAULT):
        if not isinstance(max_packet, int) or not 2 <= max_packet <= MAX_REMAINING + 5:
            raise MQTTError("max_packet must be 2..%d, not %r"
                            % (MAX_REMAINING + 5, max_packet), "bad_argument")
        self.max_packet = max_packet
        self.error = None
        self._first = -1   # first byte of the packet being read, -1 if none
        self._length = 0   # remaining length decoded so far
        self._shift = 0    # 7 * varint bytes read
        self._body = None  # exact-size bytearray while a split body arrives
        self._have = 0     # bytes of _body filled

    @property
    def pending(self):
        """Bytes held for the packet in progress (header bytes excluded)."""
        return self._have if self._body is not None else 0

    def feed(self, data):
        if self.error is not None:
            e = MQTTError("parser failed earlier: %s" % self.error.message,
                          self.error.code)
            e.packets = []
            raise e
        out = []
        try:
            self._feed(memoryview(data), out)
        except MQTTError as e:
            self.error = e
            self._body = None
            e.packets = out
            raise
        return out

    def _feed(self, mv, out):
        i = 0
        n = len(mv)
        while i < n:
            if self._body is not None:
                i = self._fill(mv, i, out)
            elif self._first < 0:
                self._first = mv[i]
                i += 1
                _check_first(self._first)
                self._length = 0
                self._shift = 0
            else:
                i = self._length_byte(mv, i, out)

    def _length_byte(self, mv, i, out):
        b = mv[i]
        i += 1
        self._length |= (b & 0x7F) << self._shift
        self._shift += 7
        rl = self._length
        if 1 + self._shift // 7 + rl > self.max_packet:
            raise MQTTError("packet of at least %d bytes exceeds max_packet %d"
                            % (1 + self._shift // 7 + rl, self.max_packet),
                            "too_large")
        if b & 0x80:
            if self._shift == 28:
                raise _malformed("remaining length longer than 4 bytes")
            return i
        _check_length(self._first, rl)
        if len(mv) - i >= rl:  # whole body at hand: decode in place
            out.append(_decode(self._first, mv[i:i + rl]))
            self._first = -1
            return i + rl
        self._body = bytearray(rl)
        self._have = 0
        return i

    def _fill(self, mv, i, out):
        body = self._body
        take = min(len(mv) - i, len(body) - self._have)
        body[self._have:self._have + take] = mv[i:i + take]
        self._have += take
        if self._have == len(body):
            self._body = None
            out.append(_decode(self._first, memoryview(body)))
            self._first = -1
        return i + take
