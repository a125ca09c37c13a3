"""Firmware payloads over HTTPS range requests, for boards that prefer them
to MQTT chunks and pages (docs/ota.md, "HTTPS ranges"). Two resources per
release, served alike:

    GET /fw/<release id>         the payload
    GET /fw/<release id>/pages   its chunk table (cloud.firmware.chunk_table:
                                 page p of a paged manifest is bytes p*4096 ..)
    Range: bytes=<first>-<last>  (one range, at most RANGE_BYTES_MAX)
    -> 206 Partial Content, Content-Range: bytes <first>-<last>/<size>

The same rule as the MQTT chunks and pages (cloud/ota_service.py): bytes of
a release are served to a device only while the rollout engine offers it
that release (`Engine.offer_for`), so a pause, halt or kill takes effect at
the next request. The device is its client certificate (mTLS against the
device CA, as on the broker): claim and cloud identities, revoked
identities and retired certificates are refused. Every refusal is answered
with its status and a one-line reason, recorded with the OTA service's
refusals and logged.

The bytes are checked on the device against the signed manifest, chunk by
chunk and page by page, as over MQTT: this endpoint is a transport, not a
trust anchor.

HTTP/1.1 parsing is h11's; keep-alive is supported, one request at a time
per connection, with bounded head size and idle time; past CONNECTIONS_MAX
open connections a new one is closed at once (recorded as "busy").
"""

import asyncio
import logging

import h11

from agent.ota_wire import TEXT_CHARS_MAX
from cloud.ota_service import OtaError

log = logging.getLogger("tether.fw_http")

PATH_PREFIX = "/fw/"
PAGES_SUFFIX = "/pages"           # /fw/<release>/pages: the chunk table, not the payload
RANGE_BYTES_MAX = 65536           # one answer's body, at most
HEAD_BYTES_MAX = 8192             # request line and headers
IDLE_S = 30.0                     # a connection with no complete request for this long is closed
CONNECTIONS_MAX = 1024
READ_BYTES = 8192
_RELEASE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-+:@"


class HttpRefusal(Exception):
    """A request answered with an error status; code is the reason's name."""

    def __init__(self, status, code, detail, headers=()):
        Exception.__init__(self, detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, list(headers)


def parse_range(value, size):
    """(first, last) of a Range header value for a body of `size` bytes.
    One range only, "bytes=a-b" or "bytes=a-" (to the end, capped at
    RANGE_BYTES_MAX). HttpRefusal 400 if malformed, 416 if unsatisfiable."""
    if value is None:
        raise HttpRefusal(400, "range_required", "a Range header is required")
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        raise HttpRefusal(400, "bad_range", "Range is not ASCII")
    unit, _, spec = text.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise HttpRefusal(400, "bad_range", "one range in bytes only")
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not _digits(first_text) or (last_text and not _digits(last_text)):
        raise HttpRefusal(400, "bad_range", "a range is bytes=<first>-[<last>]")
    first = int(first_text)
    last = int(last_text) if last_text else first + RANGE_BYTES_MAX - 1
    if last < first:
        raise HttpRefusal(400, "bad_range", "range ends before it starts")
    if first >= size:
        raise HttpRefusal(416, "range_not_satisfiable", "range starts past %d bytes" % size,
                          [("Content-Range", "bytes */%d" % size)])
    if last - first + 1 > RANGE_BYTES_MAX:
        raise HttpRefusal(416, "range_too_long", "at most %d bytes per request" % RANGE_BYTES_MAX,
                          [("Content-Range", "bytes */%d" % size)])
    return first, min(last, size - 1)


def _digits(text):
    return 0 < len(text) <= 12 and all("0" <= c <= "9" for c in text)


def resource_of(target):
    """(release id, "payload" or "pages") of a request target /fw/<release>
    or /fw/<release>/pages; HttpRefusal 404 otherwise."""
    try:
        path = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpRefusal(404, "not_found", "no such path")
    release = path[len(PATH_PREFIX):] if path.startswith(PATH_PREFIX) else ""
    resource = "payload"
    if release.endswith(PAGES_SUFFIX):
        release, resource = release[:-len(PAGES_SUFFIX)], "pages"
    if not 0 < len(release) <= TEXT_CHARS_MAX or any(c not in _RELEASE_CHARS for c in release):
        raise HttpRefusal(404, "not_found", "no such path")
    return release, resource


class FirmwareHttp:
    """The HTTPS endpoint. ota: the running cloud.ota_service.OtaService
    (its engine, release cache, refusal record and lock); ssl_context: an
    mTLS server context (cloud.broker.server_context); admit(der) -> (identity,
    None) or (identity or None, refusal code) for a peer certificate."""

    def __init__(self, ota, ssl_context, host, port, admit):
        self.ota = ota
        self.ssl_context = ssl_context
        self.host, self.port = host, port
        self.admit = admit
        self.server = None
        self.connections = set()
        self.served = 0               # 206 answers, both resources
        self.served_bytes = 0
        self.pages_served = 0         # ... of which ranges of a chunk table

    async def start(self):
        self.server = await asyncio.start_server(self._connection, self.host, self.port,
                                                 ssl=self.ssl_context, limit=READ_BYTES)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("firmware over HTTPS on %s:%d", self.host, self.port)

    async def stop(self):
        if self.server is not None:
            self.server.close()
            for task in list(self.connections):
                task.cancel()
            await self.server.wait_closed()
            self.server = None

    async def _connection(self, reader, writer):
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            if len(self.connections) > CONNECTIONS_MAX:
                # Closed before a request is read (HTTP has no answer then): recorded.
                self._refuse(None, HttpRefusal(503, "busy", "too many connections, closed"))
                return
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            identity, reason = self.admit(der) if der else (None, "no_certificate")
            await self._serve(reader, writer, identity, reason)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass                       # the peer went away or idled out
        finally:
            self.connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    async def _serve(self, reader, writer, identity, reason):
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_BYTES_MAX)
        while True:
            try:
                request = await self._read_request(conn, reader)
            except (h11.RemoteProtocolError, HttpRefusal) as e:
                refusal = e if isinstance(e, HttpRefusal) else \
                    HttpRefusal(400, "bad_request", "malformed HTTP: %s" % e)
                self._refuse(identity, refusal)
                try:
                    await self._send(writer, conn, refusal.status, [], (refusal.code + "\n").encode())
                except h11.LocalProtocolError:
                    pass               # h11 cannot answer in this state: just close
                return
            if request is None:
                return
            status, headers, body = self._answer(identity, reason, request)
            await self._send(writer, conn, status, headers, body)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return                 # an error answer, or the client asked to close
            conn.start_next_cycle()

    async def _read_request(self, conn, reader):
        """The next whole request, or None when the client closed. Requests
        with a body are refused: a GET has none."""
        request = None
        head_bytes = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                # b"" at the end of the stream: h11 then says ConnectionClosed
                data = await asyncio.wait_for(reader.read(READ_BYTES), IDLE_S)
                head_bytes += len(data)
                if request is None and head_bytes > HEAD_BYTES_MAX:
                    raise HttpRefusal(400, "head_too_large", "request head over %d bytes" % HEAD_BYTES_MAX)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                raise HttpRefusal(400, "body_not_allowed", "a request body was sent")
            elif isinstance(event, h11.EndOfMessage):
                return request
            else:                      # ConnectionClosed
                return None

    def _answer(self, identity, reason, request):
        """(status, headers, body) for one request; refusals recorded."""
        try:
            if reason is not None:
                raise HttpRefusal(403, reason, "certificate refused: %s" % reason)
            if request.method != b"GET":
                raise HttpRefusal(405, "bad_method", "GET only", [("Allow", "GET")])
            release, resource = resource_of(request.target)
            whole = self._resource(identity, release, resource)
            first, last = parse_range(_header(request, b"range"), len(whole))
        except HttpRefusal as e:
            self._refuse(identity, e)
            return e.status, [("Content-Type", "text/plain")] + e.headers, (e.code + "\n").encode()
        body = whole[first:last + 1]
        self.served += 1
        self.served_bytes += len(body)
        if resource == "pages":
            self.pages_served += 1
        return 206, [("Content-Type", "application/octet-stream"),
                     ("Content-Range", "bytes %d-%d/%d" % (first, last, len(whole)))], body

    def _resource(self, identity, release, resource):
        """The release's payload or chunk table (the OTA core's caches), only
        while the engine offers that release to identity."""
        with self.ota.lock:
            offer = self.ota.engine.offer_for(identity)
            if offer is None or offer.release != release:
                raise HttpRefusal(403, "not_offered", "%s is not offered %s now" % (identity, release))
            core = self.ota.core
            return core.chunk_table(release) if resource == "pages" else core.blobs(release)[1]

    def _refuse(self, identity, refusal):
        with self.ota.lock:
            self.ota.core.refuse(identity or "?", OtaError("https: %s" % refusal.detail, refusal.code))

    async def _send(self, writer, conn, status, headers, body):
        headers = headers + [("Content-Length", str(len(body)))]
        if status >= 400:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()


def _header(request, name):
    """The one value of header `name` (lower-case bytes), None if absent; two are malformed."""
    values = [v for k, v in request.headers if k == name]
    if len(values) > 1:
        raise HttpRefusal(400, "bad_range", "more than one %s header" % name.decode())
    return values[0] if values else None
