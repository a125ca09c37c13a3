"""Open an mTLS MQTT connection the way a device does, to see what the
broker does with it. Used by the cloud to probe its own enforcement and by
the demo's attack drills; not a device driver."""

import asyncio
import ssl

from agent import mqtt


class Refused(Exception):
    """TLS or the broker turned the connection away."""


def client_context(cafile, cred=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile)
    if cred is not None:
        ctx.load_cert_chain(cred[0], cred[1])
    return ctx


async def connect(host, port, cafile, cred, client_id, timeout_s=5, will=None):
    """-> (reader, writer, CONNACK return code). Raises Refused when TLS
    refuses (a handshake alert, or, with TLS 1.3, the connection closed
    before any CONNACK); OSError or asyncio.TimeoutError when it could not
    tell."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=client_context(cafile, cred), server_hostname="localhost"), timeout_s)
    except ssl.SSLError as e:
        raise Refused("TLS handshake refused: %s" % e) from None
    try:
        writer.write(mqtt.connect(client_id, 30, will=will))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(4), timeout_s)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        writer.close()
        raise Refused("closed during CONNECT: %s" % e) from None
    except BaseException:
        writer.close()
        raise
    packets = mqtt.Parser().feed(data) if data else []
    if not packets or not isinstance(packets[0], mqtt.ConnAck):
        writer.close()
        raise Refused("closed before any CONNACK")
    return reader, writer, packets[0].return_code


async def accepted(host, port, cafile, cred, client_id, timeout_s=3):
    """True on CONNACK 0, False if refused (TLS or CONNACK), None if it could
    not tell. The connection is closed again."""
    try:
        _, writer, rc = await connect(host, port, cafile, cred, client_id, timeout_s)
    except Refused:
        return False
    except (OSError, asyncio.TimeoutError):
        return None
    writer.close()
    return rc == 0
