"""The reference cloud put together: CA, broker (embedded amqtt or a local
Mosquitto), ingest and SQLite store, all under one data directory that
survives restarts.

    DATA/ca/ca.crt, ca.key          the device CA (key 0600)
    DATA/broker/server.crt, .key    the broker's certificate
    DATA/ingest/client.crt, .key    the ingest's client identity (Mosquitto)
    DATA/mosquitto/                 generated config, ACL, persistence, log
    DATA/devices/TENANT/DEVICE.crt  issued device credentials (+ .key, 0600)
    DATA/tether.db                  the store
"""

import logging
import os
import socket
import time

from cloud.broker import Broker
from cloud.ca import CA, INGEST_IDENTITY, write_private, write_public
from cloud.identity import Registry
from cloud.ingest import AsyncIngest, Ingest
from cloud.limits import Limits
from cloud.store import Store

log = logging.getLogger("tether.cloud")


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clock_ms():
    return time.time_ns() // 1_000_000


def default_limits():
    """Generous enough that a device flushing a full queue after an outage is
    not refused; tight enough that one runaway device cannot flood a tenant."""
    return Limits(device_rate_per_s=50, device_burst=1000,
                  tenant_rate_per_s=20_000, tenant_burst=200_000)


class DeviceCredential:
    """Where one device's certificate and key are, and who it is."""

    def __init__(self, tenant, device, certfile, keyfile):
        self.tenant = tenant
        self.device = device
        self.certfile = certfile
        self.keyfile = keyfile


class Cloud:
    def __init__(self, data_dir, host="127.0.0.1", port=0, broker="embedded", limits=None):
        if broker not in ("embedded", "mosquitto"):
            raise ValueError("broker must be embedded or mosquitto")
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.kind = broker
        self.limits = limits
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        ca_dir = os.path.join(self.data_dir, "ca")
        if os.path.exists(os.path.join(ca_dir, "ca.crt")):
            self.ca = CA.load(ca_dir)
        else:
            self.ca = CA.create(ca_dir, name="tether device CA")
        self.ca_path = self.ca.cert_path
        self.server_cert, self.server_key = self.ca.issue_server(os.path.join(self.data_dir, "broker"))
        self.store_path = os.path.join(self.data_dir, "tether.db")
        self.store = None
        self.ingest = None
        self.broker = None
        self.mosquitto = None
        self.mosquitto_ingest = None
        self.registry = None
        self.revoked = set()
        self._watch = None

    # -- credentials ----------------------------------------------------------

    def issue_devices(self, count, tenants=("acme", "globex", "initech"), prefix="dev"):
        """Issue (or reuse) credentials for `count` devices spread over tenants."""
        creds = []
        for i in range(count):
            tenant = tenants[i % len(tenants)]
            creds.append(self.issue_device(tenant, "%s-%05d" % (prefix, i)))
        return creds

    def issue_device(self, tenant, device):
        folder = os.path.join(self.data_dir, "devices", tenant)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        certfile = os.path.join(folder, device + ".crt")
        keyfile = os.path.join(folder, device + ".key")
        if not (os.path.exists(certfile) and os.path.exists(keyfile)):
            cert_pem, key_pem = self.ca.issue_device(tenant, device)
            write_private(keyfile, key_pem)
            write_public(certfile, cert_pem)
        return DeviceCredential(tenant, device, certfile, keyfile)

    # -- life -----------------------------------------------------------------

    async def start(self):
        import asyncio
        self.store = Store(self.store_path)
        self.registry = Registry(self.store_path)
        self.revoked = self.registry.revoked()
        if self.kind == "embedded":
            self.registry.retry_unenforced()
        limits = self.limits if self.limits is not None else default_limits()
        self.ingest = AsyncIngest(Ingest(self.store, clock_ms, limits=limits))
        if self.kind == "embedded":
            self.broker = Broker(self.host, self.port, self.ca_path, self.server_cert,
                                 self.server_key, on_publish=self._on_publish, logger=log,
                                 authorize=lambda identity: identity not in self.revoked)
            await self.broker.start()
        else:
            await self._start_mosquitto()
        await self.enforce_revocations()
        self._watch = asyncio.get_running_loop().create_task(self._watch_revocations())
        log.info("cloud up on %s:%d (%s broker)", self.host, self.port, self.kind)

    async def _watch_revocations(self, every_s=0.05):
        """Revocations are recorded by `tether cloud revoke` (any process);
        the running cloud notices and enforces them."""
        import asyncio
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.enforce_revocations()
            except Exception:  # never let the watcher die silently
                log.exception("enforcing revocations failed; retrying")

    async def enforce_revocations(self):
        """Refuse every revoked identity at CONNECT and end its live session;
        record how long that took. Mosquitto: recorded, not enforced yet."""
        for identity, revoked_ms in self.registry.pending():
            self.revoked.add(identity)
            if self.kind != "embedded":
                self.registry.not_enforced(identity, "NOT enforced: revocation on Mosquitto is not "
                                           "implemented yet (issue 3); only the embedded broker refuses it")
                continue
            kicked = await self.broker.kick(identity)
            still = self.broker.sessions.get(identity, (None, None))[1] is not None
            if still:
                continue  # try again on the next pass
            block_ms = max(0.0, float(clock_ms() - revoked_ms))
            self.registry.enforced(identity, block_ms, "session ended" if kicked else "no live session")

    async def _on_publish(self, identity, topic, payload):
        await self.ingest.submit(identity, topic, payload)

    async def _start_mosquitto(self):
        from cloud.mosquitto import Mosquitto, MosquittoIngest
        mdir = os.path.join(self.data_dir, "mosquitto")
        self.mosquitto = Mosquitto.configure(mdir, self.host, self.port, self.ca_path,
                                             self.server_cert, self.server_key, logger=log)
        await self.mosquitto.start()
        idir = os.path.join(self.data_dir, "ingest")
        os.makedirs(idir, mode=0o700, exist_ok=True)
        cert, key = os.path.join(idir, "client.crt"), os.path.join(idir, "client.key")
        if not os.path.exists(cert):
            cert_pem, key_pem = self.ca.issue_client(INGEST_IDENTITY)
            write_private(key, key_pem)
            write_public(cert, cert_pem)
        self.mosquitto_ingest = MosquittoIngest(self.host, self.port, self.ca_path, cert, key,
                                                self._on_publish, logger=log)
        await self.mosquitto_ingest.start()

    async def restart_broker(self, down_s=1.0):
        """Stop the broker, stay down for down_s, start it again."""
        import asyncio
        if self.kind == "embedded":
            await self.broker.stop()
            await asyncio.sleep(down_s)
            await self.broker.start()
        else:
            await self.mosquitto.stop()
            await asyncio.sleep(down_s)
            await self.mosquitto.start()

    async def stats(self):
        return await self.ingest.stats()

    async def stop(self):
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.broker is not None:
            await self.broker.stop()
        if self.mosquitto_ingest is not None:
            await self.mosquitto_ingest.stop()
        if self.mosquitto is not None:
            await self.mosquitto.stop()
        if self.ingest is not None:
            await self.ingest.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.registry is not None:
            self.registry.close()
            self.registry = None
