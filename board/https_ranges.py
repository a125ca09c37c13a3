"""Firmware chunks and pages over HTTPS range requests (cloud/fw_http.py),
for a Linux board that prefers them to MQTT: one keep-alive connection with
the device's own certificate (mTLS), one 4 KiB range per request, a timeout
on every request. What arrives is checked by the updater against the
signed manifest like any chunk or page: this is a transport, not a trust
anchor.

    ranges = HttpsRanges("cloud.example", 8885, ssl_context)
    data = ranges.fetch("sim-v1-1.2.0", offset, 4096)            # or RangeError
    page = ranges.fetch("sim-v1-1.2.0", p * 4096, 4096, "pages")  # the chunk table
"""

import http.client
import socket
import ssl

TIMEOUT_S = 10.0
BODY_BYTES_MAX = 65536          # an answer longer than this is refused unread
PATHS = {"payload": "/fw/%s", "pages": "/fw/%s/pages"}   # a release's two resources


class RangeError(Exception):
    """A range could not be fetched; code says why (the status's reason, or
    "network")."""

    def __init__(self, message, code):
        Exception.__init__(self, message)
        self.code = code


class HttpsRanges:
    def __init__(self, host, port, ssl_context, timeout_s=TIMEOUT_S):
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.conn = None

    def fetch(self, release, offset, length, resource="payload"):
        """Bytes offset..offset+length-1 of the release's payload (or of its
        chunk table: resource "pages"), exactly as the server's Content-Range
        says (shorter only at the end)."""
        path = PATHS[resource] % release
        try:
            return self._fetch(path, offset, length)
        except (OSError, http.client.HTTPException, ssl.SSLError, socket.timeout) as e:
            self.close()
            raise RangeError("fetching %s @%d: %s" % (path, offset, e), "network")

    def _fetch(self, path, offset, length):
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl_context,
                                                    timeout=self.timeout_s)
        self.conn.request("GET", path, headers={"Range": "bytes=%d-%d" % (offset, offset + length - 1)})
        response = self.conn.getresponse()
        declared = response.getheader("Content-Length")
        if declared is None or not declared.isdigit() or int(declared) > BODY_BYTES_MAX:
            self.close()
            raise RangeError("answer of %s bytes refused" % declared, "bad_answer")
        body = response.read()
        if response.status != 206:
            self.close()
            raise RangeError("HTTP %d: %s" % (response.status, body[:80].decode("ascii", "replace").strip()),
                             body[:40].decode("ascii", "replace").strip() or str(response.status))
        want = "bytes %d-%d/" % (offset, offset + len(body) - 1)
        if not (response.getheader("Content-Range") or "").startswith(want) or not 0 < len(body) <= length:
            self.close()
            raise RangeError("answer is not the range asked for", "bad_answer")
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return body

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
