"""The ESP32's network driver under MicroPython: one MQTT 3.1.1 connection
over TLS with the device's certificate (mTLS), polled from the board's
loop. agent/mqtt.py encodes and parses the packets; this module owns the
socket, the session's timers and the packet ids. No asyncio and no thread:
the loop calls poll() each pass and gets back what happened.

    link = MqttLink(identity, [down_topic], opener, clock.ticks_ms)
    link.open()                       # TCP + TLS handshake + CONNECT (blocks for the handshake)
    for what in link.poll():          # each pass: ("up",), ("message", topic, payload),
        ...                           # ("acked", token), ("down", reason, refused)
    pid = link.publish(topic, payload, token)    # QoS 1; None while not up

It is "up" once the broker accepted the CONNECT and every subscription
(QoS 1): board/esp32_ota.py's connected() may run then. Every QoS 1
PUBLISH from the broker is acknowledged at once. The link goes "down" (and
says why, once) on a TLS or socket error, end of stream, a malformed packet,
a refused CONNECT or subscription, no CONNACK/SUBACK within
CONNECT_TIMEOUT_MS, no PINGRESP within the keepalive, or no PUBACK within
ACK_TIMEOUT_MS; nothing is retried here: the telemetry core's backoff says
when to open again, and its queue resends what was not acknowledged.
"refused" in the down event is what the broker said of the certificate:
the CONNACK refusal ("not_authorized"), a failed TLS handshake
(board/identity_board.py refusal_reason: "cert_expired", ...), or "closed"
for a connection closed before any CONNACK (TLS 1.3 refuses a client
certificate so); None for a loss. The identity core tells refusals from
losses by it.

open_tls(host, port, ctx) makes the stream on MicroPython (socket + tls,
DER credentials: tls_context) and on CPython (socket + ssl, the tests run
this driver against the real brokers that way): both have read(n) that
gives None or raises a would-block error when nothing is there, and b""
at the end of the stream.
"""

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

import time

from agent import mqtt
from agent.errors import MQTTError
from agent.ota_wire import DOWN_BYTES_MAX
from board.identity_board import refusal_reason

CONNECT_TIMEOUT_MS = const(10000)     # for the CONNACK and the SUBACK
ACK_TIMEOUT_MS = const(15000)         # for a PUBACK, past it the link is taken for dead
KEEPALIVE_S = const(60)
READ_BYTES = const(2048)              # per read; a pass reads until nothing is left ...
READS_PER_POLL_MAX = const(64)        # ... at most this many (128 KiB) ...
MESSAGES_PER_POLL_MAX = const(64)     # ... or until this many messages ...
MESSAGE_BYTES_PER_POLL = const(16384)  # ... or this many bytes of them wait for the loop
# The largest update message the cloud may send (an offer: a bundle of up
# to 64 KiB), its topic and header: allocated only when such a packet comes.
PACKET_BYTES_MAX = DOWN_BYTES_MAX + 512
SEND_TIMEOUT_S = const(10)            # a packet not written by then takes the link down
SEND_WAIT_MS = const(5)               # between tries while the socket takes nothing
_SUBSCRIBE_ID = const(1)

try:
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
    _ticks_ms = time.ticks_ms
    _sleep_ms = time.sleep_ms
except AttributeError:                # CPython: ticks that do not wrap
    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

    def _ticks_ms():
        return int(time.monotonic() * 1000)

    def _sleep_ms(ms):
        time.sleep(ms / 1000)


class MqttLink:
    def __init__(self, client_id, subscriptions, opener, ticks_ms, keepalive_s=KEEPALIVE_S,
                 packet_bytes_max=PACKET_BYTES_MAX, log=None):
        """client_id: "tenant/device" (the broker checks it against the
        certificate); subscriptions: topic filters, each at QoS 1;
        opener(): a new stream (open_tls with the board's host, port and TLS
        context), or raises OSError; ticks_ms: a monotonic clock."""
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.opener = opener
        self.ticks_ms = ticks_ms
        self.keepalive_s = keepalive_s
        self.packet_bytes_max = packet_bytes_max
        self.log = log or _no_log
        self.state = "down"           # "connecting" (CONNACK, then SUBACK, awaited), "up"
        self.accepted = False
        self.stream = None
        self.parser = None
        self.inflight = {}            # packet id -> (token, ticks sent)
        self.next_pid = 2             # 1 is the SUBSCRIBE's
        self.opened_ms = 0
        self.wrote_ms = 0             # the keepalive counts from the last packet sent
        self.ping_ms = None           # a PINGREQ waiting for its PINGRESP, since
        self.events = []
        self.held = 0                 # bytes of messages in events
        self.connections = 0

    # -- what the board calls ------------------------------------------------------

    def open(self):
        """Connect: TCP, the TLS handshake (blocking), CONNECT. A failure is
        a ("down", reason, None) event at the next poll()."""
        if self.state != "down":
            return
        try:
            self.stream = self.opener()
            connect = mqtt.connect(self.client_id, self.keepalive_s, clean_session=True)
        except TlsRefused as e:           # the handshake failed: what it says of our certificate
            self._failed_open("TLS handshake failed: %s" % e, refusal_reason(e))
            return
        except Exception as e:            # OSError, MemoryError (TLS buffers), a bad client id, ...
            self._failed_open("connect failed: %s" % _describe(e), None)
            return
        self.parser = mqtt.Parser(self.packet_bytes_max)
        self.connections += 1
        self.state = "connecting"
        self.accepted = False         # the CONNACK came (then the SUBACK is awaited)
        self.opened_ms = self.ticks_ms()
        self.ping_ms = None
        self._send(connect)

    def _failed_open(self, reason, refused):
        """A down event, never an exception: the telemetry core waits for one."""
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:
                pass
        self.stream = None
        self.events.append(("down", reason, refused))

    def poll(self):
        """Read what arrived, run the timers; the events since the last poll."""
        if self.stream is not None:
            self._read()
        if self.stream is not None:
            self._timers()
        events, self.events = self.events, []
        self.held = 0
        return events

    def publish(self, topic, payload, token=None):
        """QoS 1 -> a handle for delivered(), or None when not up. An
        ("acked", token) event follows the PUBACK."""
        if self.state != "up":
            return None
        pid = self.next_pid
        self.next_pid = pid % 65535 + 1
        if self.next_pid == _SUBSCRIBE_ID:
            self.next_pid = 2
        handle = [pid, False]         # [packet id, its PUBACK came]
        self.inflight[pid] = (token, self.ticks_ms(), handle)
        self._send(mqtt.publish(topic, payload, 1, pid))
        return handle if self.stream is not None else None

    def delivered(self, handle):
        """True once the broker acknowledged that publish (board/esp32_ota.py's
        transport); never for one whose connection died first."""
        return handle is not None and handle[1]

    def close(self, reason="closed by the board", refused=None):
        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        try:
            if self.state == "up":
                stream.send(mqtt.disconnect())
        except OSError:
            pass
        try:
            stream.close()
        except OSError:
            pass
        self.state = "down"
        self.inflight = {}
        self.parser = None
        self.events.append(("down", reason, refused))

    # -- inside ---------------------------------------------------------------------

    def _send(self, data):
        try:
            self.stream.send(data)
            self.wrote_ms = self.ticks_ms()
        except OSError as e:
            self.close("write failed: %s" % _describe(e))

    def _read(self):
        for _ in range(READS_PER_POLL_MAX):
            # TLS 1.3 refuses a client certificate after the handshake, by
            # closing: a close before the CONNACK is reported as a refusal.
            early = None if self.accepted else "closed"
            try:
                data = self.stream.recv(READ_BYTES)
            except OSError as e:
                self.close("read failed: %s" % _describe(e), early)
                return
            if data is None:
                return                   # nothing more for now
            if not data:
                self.close("closed by the broker", early)
                return
            try:
                packets = self.parser.feed(data)
            except MQTTError as e:
                self.close("bad packet: %s" % e)
                return
            for packet in packets:
                self._packet(packet)
                if self.stream is None:
                    return
            if len(self.events) >= MESSAGES_PER_POLL_MAX or self.held >= MESSAGE_BYTES_PER_POLL:
                return                   # a flood waits in the socket for the next passes

    def _packet(self, p):
        if isinstance(p, mqtt.ConnAck):
            if self.state != "connecting" or self.accepted:
                self.close("a CONNACK out of turn")
            elif p.return_code != 0:
                reason = mqtt.connack_reason(p.return_code)
                # "not authorized" -> not_authorized, as the identity core names refusals
                self.close("refused: %s" % reason, reason.replace(" ", "_"))
            elif self.subscriptions:
                self.accepted = True
                self._send(mqtt.subscribe(_SUBSCRIBE_ID, [(f, 1) for f in self.subscriptions]))
            else:
                self.accepted = True
                self._up()
        elif isinstance(p, mqtt.SubAck):
            if self.state != "connecting" or not self.accepted or p.packet_id != _SUBSCRIBE_ID:
                self.close("a SUBACK out of turn")
            elif mqtt.SUBACK_FAILURE in p.return_codes:
                self.close("subscription refused")
            else:
                self._up()
        elif isinstance(p, mqtt.Publish):
            # Once the CONNACK came a broker may deliver on a subscription
            # before its SUBACK (MQTT 3.1.1 section 3.8.4).
            if not self.accepted:
                self.close("a PUBLISH before the CONNACK")
                return
            if p.packet_id is not None:
                self._send(mqtt.puback(p.packet_id))
            self.held += len(p.payload)
            self.events.append(("message", p.topic, p.payload))
        elif isinstance(p, mqtt.PubAck):
            sent = self.inflight.pop(p.packet_id, None)
            if sent is not None:
                sent[2][1] = True
                self.events.append(("acked", sent[0]))
        elif isinstance(p, mqtt.PingResp):
            self.ping_ms = None
        # UNSUBACK: never asked for; ignored

    def _up(self):
        self.state = "up"
        self.events.append(("up",))

    def _timers(self):
        now = self.ticks_ms()
        if self.state == "connecting":
            if ticks_diff(now, self.opened_ms) >= CONNECT_TIMEOUT_MS:
                self.close("no CONNACK or SUBACK in %d ms" % CONNECT_TIMEOUT_MS)
            return
        if self.ping_ms is not None and ticks_diff(now, self.ping_ms) >= self.keepalive_s * 1000:
            self.close("no PINGRESP in %d s" % self.keepalive_s)
            return
        for token, sent_ms, _ in self.inflight.values():
            if ticks_diff(now, sent_ms) >= ACK_TIMEOUT_MS:
                self.close("no PUBACK in %d ms" % ACK_TIMEOUT_MS)
                return
        if self.ping_ms is None and ticks_diff(now, self.wrote_ms) >= self.keepalive_s * 500:
            self.ping_ms = now
            self._send(mqtt.pingreq())


def _no_log(text):
    pass


def _describe(error):
    return "%s %s" % (type(error).__name__, error)


# ---------------------------------------------------------------- the stream

class Stream:
    """A TLS socket, never blocking: recv() gives what is there, send()
    writes all of it within SEND_TIMEOUT_S or raises (MicroPython's TLS
    socket has no timeout of its own: a broker that stops reading must not
    stop the board's loop)."""

    def __init__(self, sock, raw):
        self.sock = sock
        self.raw = raw                 # the TCP socket under it (closed with it)
        sock.setblocking(False)

    def send(self, data):
        view = memoryview(data)
        deadline = ticks_add(_ticks_ms(), SEND_TIMEOUT_S * 1000)
        while view:
            try:
                n = self.sock.write(view)
            except OSError as e:
                if not _would_block(e):
                    raise
                n = None
            if n == 0:
                raise OSError(5, "the connection takes no more bytes")    # EIO
            if n is not None:
                view = view[n:]
            elif ticks_diff(deadline, _ticks_ms()) <= 0:
                raise OSError(110, "send timed out")                       # ETIMEDOUT
            else:
                _sleep_ms(SEND_WAIT_MS)

    def recv(self, n):
        """bytes; None when nothing is there yet; b"" at the end of the stream."""
        try:
            return self.sock.read(n)
        except OSError as e:
            if _would_block(e):
                return None
            raise

    def close(self):
        try:
            self.sock.close()
        finally:
            self.raw.close()


def _network_failure(error):
    name = type(error).__name__
    if name in ("TimeoutError", "timeout", "ConnectionResetError", "ConnectionAbortedError",
                "BrokenPipeError", "SSLEOFError", "SSLZeroReturnError"):
        return True
    return bool(error.args) and error.args[0] in (32, 103, 104, 110, 113, 116)  # EPIPE, ECONNABORTED,
    # ECONNRESET, ETIMEDOUT (Linux; 116 on the ESP32), EHOSTUNREACH


class TlsRefused(OSError):
    """The TLS handshake failed (after the TCP connection was made)."""


def _would_block(error):
    name = type(error).__name__
    if name in ("SSLWantReadError", "SSLWantWriteError", "BlockingIOError"):
        return True
    return error.args and error.args[0] in (11, 115, -26880, -26752)   # EAGAIN, EINPROGRESS, mbedTLS WANT_READ/WRITE


def open_tls(host, port, ctx, timeout_s=10, server_name=None):
    """A Stream to host:port through TLS context ctx (the device's
    certificate and key loaded, the cloud's CA to verify the broker);
    server_name: the name the broker's certificate must have (host's)."""
    import socket
    addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0][-1]
    raw = socket.socket()
    try:
        raw.settimeout(timeout_s)
        raw.connect(addr)
    except BaseException:
        raw.close()
        raise
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_name or host)
    except OSError as e:              # ssl.SSLError (CPython), mbedTLS errors (MicroPython)
        raw.close()
        if _network_failure(e):       # a timeout or a reset: the network, not a verdict
            raise
        raise TlsRefused(str(e))
    except BaseException:
        raw.close()
        raise
    return Stream(sock, raw)


def tls_context(ca_der, cert_der, key_der):
    """MicroPython (1.23 and later): a client context with the device's
    certificate and key (DER, board/esp32_keystore.py tls_key_der) that
    verifies the broker against the cloud's CA."""
    import tls
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert_der, key_der)
    ctx.load_verify_locations(cadata=ca_der)
    ctx.verify_mode = tls.CERT_REQUIRED
    return ctx
