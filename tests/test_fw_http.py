"""Firmware over HTTPS range requests (cloud/fw_http.py, board/https_ranges.py),
with real parts: the embedded cloud with its OTA service and rollout
engine, the HTTPS endpoint with mTLS against the device CA, real device
certificates, stdlib http.client (and raw TLS sockets for what a client
library would not send).

- a Linux board fetches its update over HTTPS and confirms, the pages of
  a paged manifest too; none of its chunks or pages went over MQTT; a
  board whose HTTPS endpoint is down falls back to MQTT chunks and pages
  and still confirms;
- the pages resource is the release's chunk table, page p the slice whose
  SHA-256 the manifest signs;
- a range of either resource is served only to a device offered that
  release, only to a device certificate, never to a revoked identity;
  every refusal is answered with its status and reason and recorded with
  the OTA service's refusals;
- malformed, oversized, multi-range, unsatisfiable, bodied and garbage
  requests get a clear 4xx and the connection closes; parse_range is
  fuzzed.
"""

import asyncio
import hashlib
import http.client
import os
import socket
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import manifest as mf
from agent import updater as up
from board.https_ranges import HttpsRanges, RangeError
from cloud import fw_http
from cloud.ca import OTA_IDENTITY
from cloud.firmware import chunk_table
from cloud.fw_http import HttpRefusal, parse_range
from cloud.rollout import Engine, Policy
from cloud.rollout_release import release_id
from cloud.service import Cloud
from simulator import firmware_faults as ff

from test_linux_ota import FACTORY, GOOD, HW, PAGED, PEOPLE, RELEASES, Board, now_ms, reported, start_rollout

GOOD_ID = release_id(HW, GOOD)
PAYLOAD = RELEASES[GOOD][1]
PAGES = "/fw/%s/pages" % GOOD_ID


@pytest.fixture
async def cloud(tmp_path):
    c = Cloud(tmp_path / "cloud", fw_http_port=0)
    await c.start()
    c.ops = Engine(os.path.join(c.data_dir, "rollouts.db"), Policy())
    c.ops.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now_ms())
    for bundle, payload in RELEASES.values():
        c.ops.add_release(bundle, payload, PEOPLE[0], now_ms())
    yield c
    c.ops.close()
    await c.stop()


def device_context(cloud, cred):
    ctx = ssl.create_default_context(cafile=cloud.ca_path)
    ctx.load_cert_chain(cred.certfile, cred.keyfile)
    return ctx


def offered(cloud, name):
    """A device the running rollout offers GOOD to (it said hello on FACTORY)."""
    cred = cloud.issue_device("acme", name)
    svc = cloud.ota_service
    with svc.lock:
        svc.engine.observe("acme/" + name, "acme", "site-0", HW, FACTORY, now_ms())
    return cred


def started(cloud, version=GOOD):
    start_rollout(cloud, version)
    return cloud


async def get(cloud, cred, path="/fw/" + GOOD_ID, headers=None, method="GET"):
    """(status, headers, body) of one request, in a thread (the cloud runs on this loop)."""
    def run():
        conn = http.client.HTTPSConnection(cloud.host, cloud.fw_http_port,
                                           context=device_context(cloud, cred), timeout=10)
        try:
            conn.request(method, path, headers=headers if headers is not None else {"Range": "bytes=0-4095"})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()
    return await asyncio.to_thread(run)


async def raw(cloud, cred, data, read_max=65536):
    """Send raw bytes over mTLS; what comes back until the server closes."""
    def run():
        ctx = device_context(cloud, cred)
        with socket.create_connection((cloud.host, cloud.fw_http_port), timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname=cloud.host) as tls:
                tls.sendall(data)
                out = b""
                while len(out) < read_max:
                    piece = tls.recv(65536)
                    if not piece:
                        break
                    out += piece
                return out
    return await asyncio.to_thread(run)


def refusal_codes(cloud):
    return [r["code"] for r in cloud.ota_service.core.refusals]


# ---------------------------------------------------------------- end to end

def pages_of(version):
    """Pages a board must fetch for `version` (0: its manifest is not paged)."""
    bundle, payload = RELEASES[version]
    paged = mf.verify_release(bundle, ff.root_public_key(), 2).paged
    return mf.page_count(mf.chunk_count(len(payload))) if paged else 0


@pytest.mark.parametrize("version", [GOOD, PAGED])
async def test_a_linux_board_updates_over_https_ranges(cloud, tmp_path, version):
    board = Board(cloud, tmp_path / "pi", "pi-1", https=True)
    assert await board.until(lambda: board.ota.welcomed)
    start_rollout(cloud, version)
    assert await board.until(lambda: board.reboots == 1 and board.state() == up.CONFIRMED
                             and reported(cloud, board.identity, "confirmed")())
    payload = RELEASES[version][1]
    assert board.slot_bytes(1) == payload
    endpoint = cloud.fw_http
    assert endpoint.served - endpoint.pages_served >= mf.chunk_count(len(payload))
    assert endpoint.served_bytes >= len(payload)
    pages = pages_of(version)
    assert endpoint.pages_served >= pages and (endpoint.pages_served == 0) == (pages == 0)
    counts = cloud.ota_service.core.counts
    assert (counts["chunk_served"], counts["page_served"]) == (0, 0)     # nothing over MQTT


@pytest.mark.parametrize("version", [GOOD, PAGED])
async def test_a_board_whose_https_endpoint_is_down_falls_back_to_mqtt(cloud, tmp_path, version):
    board = Board(cloud, tmp_path / "pi", "pi-2", https=True, https_port=1)   # nothing listens there
    assert await board.until(lambda: board.ota.welcomed)
    start_rollout(cloud, version)
    assert await board.until(lambda: board.reboots == 1 and board.state() == up.CONFIRMED
                             and reported(cloud, board.identity, "confirmed")())
    payload = RELEASES[version][1]
    assert board.slot_bytes(1) == payload
    counts = cloud.ota_service.core.counts
    assert counts["chunk_served"] >= mf.chunk_count(len(payload))
    assert counts["page_served"] >= pages_of(version)
    assert cloud.fw_http.served == 0


# ---------------------------------------------------------------- the endpoint

async def test_an_offered_device_gets_exact_ranges_on_one_connection(cloud):
    cred = offered(cloud, "dev-1")
    started(cloud)

    def run():
        conn = http.client.HTTPSConnection(cloud.host, cloud.fw_http_port,
                                           context=device_context(cloud, cred), timeout=10)
        out = []
        for first, last in ((0, 4095), (4096, 8191), (len(PAYLOAD) - 10, len(PAYLOAD) + 500)):
            conn.request("GET", "/fw/" + GOOD_ID, headers={"Range": "bytes=%d-%d" % (first, last)})
            r = conn.getresponse()
            out.append((r.status, r.getheader("Content-Range"), r.read()))
        conn.close()
        return out
    answers = await asyncio.to_thread(run)
    size = len(PAYLOAD)
    assert answers[0] == (206, "bytes 0-4095/%d" % size, PAYLOAD[:4096])
    assert answers[1] == (206, "bytes 4096-8191/%d" % size, PAYLOAD[4096:8192])
    assert answers[2] == (206, "bytes %d-%d/%d" % (size - 10, size - 1, size), PAYLOAD[-10:])
    assert cloud.fw_http.served == 3


async def test_the_pages_resource_is_the_chunk_table_the_manifest_signs(cloud):
    cred = offered(cloud, "dev-1")
    started(cloud, PAGED)
    bundle, payload = RELEASES[PAGED]
    manifest = mf.verify_release(bundle, ff.root_public_key(), 2)
    table = chunk_table(payload)
    pages = pages_of(PAGED)
    assert manifest.paged and pages == 2
    ranges = HttpsRanges(cloud.host, cloud.fw_http_port, device_context(cloud, cred))
    for p in range(pages):     # 4 KiB asked for each; the last page is shorter
        page = await asyncio.to_thread(ranges.fetch, release_id(HW, PAGED), p * mf.PAGE_BYTES,
                                       mf.PAGE_BYTES, "pages")
        assert page == table[p * mf.PAGE_BYTES:(p + 1) * mf.PAGE_BYTES]
        assert len(page) == mf.page_bytes(mf.chunk_count(len(payload)), p)
        assert hashlib.sha256(page).digest() == manifest.page_hash(p)
    with pytest.raises(RangeError) as info:         # past the table
        await asyncio.to_thread(ranges.fetch, release_id(HW, PAGED), pages * mf.PAGE_BYTES, 4096, "pages")
    assert info.value.code == "range_not_satisfiable"
    ranges.close()
    assert (cloud.fw_http.served, cloud.fw_http.pages_served) == (pages, pages)
    assert cloud.ota_service.core.counts["page_served"] == 0


async def test_the_https_ranges_client_reads_and_reports_refusals(cloud):
    cred = offered(cloud, "dev-1")
    started(cloud)
    ranges = HttpsRanges(cloud.host, cloud.fw_http_port, device_context(cloud, cred))
    assert await asyncio.to_thread(ranges.fetch, GOOD_ID, 4096, 4096) == PAYLOAD[4096:8192]
    with pytest.raises(RangeError) as info:
        await asyncio.to_thread(ranges.fetch, release_id(HW, FACTORY), 0, 4096)
    assert info.value.code == "not_offered"
    ranges.close()


RESOURCES = pytest.mark.parametrize("suffix", ["", "/pages"], ids=["payload", "pages"])


@RESOURCES
async def test_ranges_only_for_the_release_offered_to_that_device(cloud, suffix):
    path = "/fw/" + GOOD_ID + suffix
    cred = offered(cloud, "dev-1")
    other = cloud.issue_device("globex", "dev-9")        # another tenant, not observed, not offered
    assert (await get(cloud, cred, path))[0] == 403      # no rollout yet
    started(cloud)
    assert (await get(cloud, cred, path))[0] == 206
    status, _, body = await get(cloud, other, path)
    assert (status, body) == (403, b"not_offered\n")
    status, _, _ = await get(cloud, cred, "/fw/" + release_id(HW, FACTORY) + suffix)   # not the one offered
    assert status == 403
    assert refusal_codes(cloud).count("not_offered") == 3
    cloud.ops.kill(PEOPLE[1], "the kill switch", now_ms())   # any process: the next request sees it
    assert (await get(cloud, cred, path))[0] == 403


@RESOURCES
async def test_a_revoked_device_and_a_cloud_identity_are_refused(cloud, suffix):
    path = "/fw/" + GOOD_ID + suffix
    cred = offered(cloud, "dev-1")
    started(cloud)
    assert (await get(cloud, cred, path))[0] == 206
    cloud.registry.revoke("acme/dev-1", "stolen", "secops")
    await cloud.enforce_revocations()
    status, _, body = await get(cloud, cred, path)
    assert (status, body) == (403, b"revoked\n")
    ota_cred = cloud._client_files(cloud.ca, "ota", OTA_IDENTITY)
    ota = type("Cred", (), {"certfile": ota_cred[0], "keyfile": ota_cred[1]})()
    status, _, body = await get(cloud, ota, path)
    assert (status, body) == (403, b"cloud_identity\n")
    assert {"revoked", "cloud_identity"} <= set(refusal_codes(cloud))


async def test_a_certificate_retired_by_a_rotation_is_refused(cloud):
    from cryptography import x509
    cred = offered(cloud, "dev-1")
    started(cloud)
    assert (await get(cloud, cred))[0] == 206
    with open(cred.certfile, "rb") as f:
        serial = x509.load_pem_x509_certificate(f.read()).serial_number
    cloud.provisioning._retire(format(serial, "x"), "acme/dev-1", "superseded (test)")
    cloud.provisioning.db.commit()
    await cloud.sync_serials()
    status, _, body = await get(cloud, cred)
    assert (status, body) == (403, b"cert_revoked\n")


async def test_no_client_certificate_no_tls(cloud):
    def run():
        ctx = ssl.create_default_context(cafile=cloud.ca_path)
        conn = http.client.HTTPSConnection(cloud.host, cloud.fw_http_port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/fw/" + GOOD_ID, headers={"Range": "bytes=0-1"})
            return conn.getresponse().status
        finally:
            conn.close()
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        await asyncio.to_thread(run)


@pytest.mark.parametrize("headers, path, method, status, code", [
    ({}, None, "GET", 400, "range_required"),
    ({"Range": "bytes=0-1,5-6"}, None, "GET", 400, "bad_range"),
    ({"Range": "items=0-1"}, None, "GET", 400, "bad_range"),
    ({"Range": "bytes=-500"}, None, "GET", 400, "bad_range"),
    ({"Range": "bytes=9-3"}, None, "GET", 400, "bad_range"),
    ({"Range": "bytes=99999999-"}, None, "GET", 416, "range_not_satisfiable"),
    ({"Range": "bytes=0-70000"}, None, "GET", 416, "range_too_long"),
    ({"Range": "bytes=0-1"}, None, "POST", 405, "bad_method"),
    ({"Range": "bytes=0-1"}, "/etc/passwd", "GET", 404, "not_found"),
    ({"Range": "bytes=0-1"}, "/fw/../../x", "GET", 404, "not_found"),
    ({"Range": "bytes=0-1"}, "/fw/" + "a" * 65, "GET", 404, "not_found"),
    ({}, PAGES, "GET", 400, "range_required"),
    ({"Range": "bytes=0-1,5-6"}, PAGES, "GET", 400, "bad_range"),
    ({"Range": "bytes=99999999-"}, PAGES, "GET", 416, "range_not_satisfiable"),
    ({"Range": "bytes=0-70000"}, PAGES, "GET", 416, "range_too_long"),
    ({"Range": "bytes=0-1"}, PAGES + "/pages", "GET", 404, "not_found"),
    ({"Range": "bytes=0-1"}, "/fw/" + GOOD_ID + "/page", "GET", 404, "not_found"),
    ({"Range": "bytes=0-1"}, "/fw//pages", "GET", 404, "not_found"),
])
async def test_bad_requests_get_a_clear_refusal(cloud, headers, path, method, status, code):
    cred = offered(cloud, "dev-1")
    started(cloud)
    got, got_headers, body = await get(cloud, cred, path or "/fw/" + GOOD_ID, headers, method)
    assert (got, body) == (status, (code + "\n").encode())
    assert got_headers.get("Connection") == "close"
    if status == 416:
        size = len(chunk_table(PAYLOAD)) if path == PAGES else len(PAYLOAD)
        assert got_headers["Content-Range"] == "bytes */%d" % size
    assert code in refusal_codes(cloud)


@pytest.mark.parametrize("data, code", [
    (b"\x16\x03\x01 not http at all\r\n\r\n", "bad_request"),
    (b"GET /fw/x HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 9000 + b"\r\n\r\n", "head_too_large"),
    (b"GET /fw/" + GOOD_ID.encode() + b" HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\n"
     b"Content-Length: 5\r\n\r\nhello", "body_not_allowed"),
    (b"GET /fw/" + GOOD_ID.encode() + b" HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\n"
     b"Range: bytes=2-3\r\n\r\n", "bad_range"),
])
async def test_hostile_bytes_get_400_and_the_connection_closes(cloud, data, code):
    cred = offered(cloud, "dev-1")
    started(cloud)
    answer = await raw(cloud, cred, data)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert code in refusal_codes(cloud)


async def test_an_idle_connection_is_closed(cloud, monkeypatch):
    monkeypatch.setattr(fw_http, "IDLE_S", 0.3)
    cred = offered(cloud, "dev-1")
    answer = await raw(cloud, cred, b"GET /fw/x HTTP/1.1\r\n")     # and nothing more
    assert answer == b""                                           # closed by the server, no answer


async def test_past_the_connection_bound_a_connection_is_closed_and_recorded(cloud, monkeypatch):
    monkeypatch.setattr(fw_http, "CONNECTIONS_MAX", 0)
    cred = offered(cloud, "dev-1")
    started(cloud)
    answer = await raw(cloud, cred, b"GET /fw/" + GOOD_ID.encode() + b" HTTP/1.1\r\nHost: a\r\n"
                       b"Range: bytes=0-1\r\n\r\n")
    assert answer == b"" and "busy" in refusal_codes(cloud)
    assert cloud.fw_http.served == 0


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(st.text(max_size=40), st.binary(max_size=40),
                       st.builds(lambda a, b: "bytes=%d-%d" % (a, b), st.integers(-5, 10 ** 6),
                                 st.integers(-5, 10 ** 6))),
       size=st.integers(1, 2 * 1024 * 1024))
def test_parse_range_returns_a_range_inside_the_body_or_refuses(value, size):
    try:
        first, last = parse_range(value, size)
    except HttpRefusal as e:
        assert e.status in (400, 416)
        return
    assert 0 <= first <= last < size and last - first + 1 <= fw_http.RANGE_BYTES_MAX
