"""Hostile bytes at the broker from an authenticated client: oversized
announcements, garbage instead of CONNECT, truncated packets, random bytes
after CONNECT. Each connection is closed; the broker keeps serving the
honest device next to it, on both brokers."""

import asyncio
import random
import ssl

import pytest

from agent import mqtt
from brokers import (  # noqa: F401  (fixtures)
    broker, broker_kind, device_factory, pki, wait_until,
)

TOPIC = "t/acme/dev-1/telemetry"


async def open_tls(broker, pki, identity):
    cert, key = pki.device(identity)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_path)
    ctx.load_cert_chain(cert, key)
    return await asyncio.open_connection(broker.host, broker.port, ssl=ctx, server_hostname="localhost")


async def closed_by_broker(reader, timeout_s=5):
    """True once the broker has closed the connection (EOF or reset)."""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(4096), timeout_s)
            if not data:
                return True
    except (ConnectionError, ssl.SSLError):
        return True
    except asyncio.TimeoutError:
        return False


async def honest_device_still_served(broker, device_factory, n):
    dev = device_factory("acme/dev-1")
    assert await dev.connect() == 0
    assert await dev.publish(TOPIC, b"honest-%d" % n)
    assert await broker.wait_received(n + 1, timeout_s=10)
    await dev.close()


HOSTILE = {
    "announces 256 MB": lambda: mqtt.connect("acme/rogue", 30) + bytes([0x32, 0xFF, 0xFF, 0xFF, 0x7F]) + b"\0" * 70000,
    "garbage instead of CONNECT": lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "reserved packet type first": lambda: b"\xf0\x00",
    "remaining length over 4 bytes": lambda: b"\x10\xff\xff\xff\xff\x7f",
    "truncated CONNECT": lambda: mqtt.connect("acme/rogue", 30)[:7],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_bytes_close_the_connection_and_nothing_else(broker, pki, device_factory, case):
    reader, writer = await open_tls(broker, pki, "acme/rogue")
    writer.write(HOSTILE[case]())
    try:
        await writer.drain()
    except ConnectionError:
        pass
    if case == "truncated CONNECT":
        writer.close()  # the client gives up half-way; the broker must cope
    else:
        assert await closed_by_broker(reader, timeout_s=12), case
    await honest_device_still_served(broker, device_factory, 0)


async def test_random_bytes_after_connect_never_take_the_broker_down(broker, pki, device_factory):
    rng = random.Random(42)
    for _ in range(12):
        reader, writer = await open_tls(broker, pki, "acme/rogue")
        writer.write(mqtt.connect("acme/rogue", 30))
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(4), 5)  # CONNACK
        writer.write(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
    await honest_device_still_served(broker, device_factory, 0)
    assert [r[2] for r in broker.received] == [b"honest-0"]
