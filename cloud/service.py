"""The reference cloud put together: CA, broker (embedded amqtt or a local
Mosquitto), ingest and SQLite store, all under one data directory that
survives restarts.

    DATA/ca/ca.crt, ca.key          the device CA (key 0600)
    DATA/claim-ca/                  the claim CA: factory claim certificates only
    DATA/claims/BATCH.crt, .key     a batch's claim certificate (goes into the factory image)
    DATA/provisioner/               the provisioning service's two client identities
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
from cloud.ca import (CA, CLAIMS_IDENTITY, INGEST_IDENTITY, PROVISIONER_IDENTITY, is_cloud_identity,
                      load_cert, write_private, write_public)
from cloud import probe
from cloud.errors import CloudError
from cloud.identity import Registry
from cloud.ingest import AsyncIngest, Ingest
from cloud.limits import Limits
from cloud.store import Store

log = logging.getLogger("tether.cloud")


CRL_RESIGN_MS = 24 * 3600 * 1000


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


async def _mqtt_accepted(cloud, cred, client_id, timeout_s=3):
    return await probe.accepted(cloud.host, cloud.port, cloud.ca_path, cred, client_id, timeout_s)


async def _wait_refused(cloud, cred, timeout_s):
    """Probe until Mosquitto refuses this certificate (its CRL reload is done)."""
    import asyncio
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await _mqtt_accepted(cloud, cred, "probe") is False:
            return True
        await asyncio.sleep(0.05)
    return False


class DeviceCredential:
    """Where one device's certificate and key are, and who it is."""

    def __init__(self, tenant, device, certfile, keyfile):
        self.tenant = tenant
        self.device = device
        self.certfile = certfile
        self.keyfile = keyfile


class Cloud:
    def __init__(self, data_dir, host="127.0.0.1", port=0, broker="embedded", limits=None,
                 prov_port=0, cert_s=None, fw_http_port=None):
        """fw_http_port: firmware over HTTPS ranges (cloud/fw_http.py) on this
        port, 0 for a free one; None: not served."""
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
        claim_dir = os.path.join(self.data_dir, "claim-ca")
        if os.path.exists(os.path.join(claim_dir, "ca.crt")):
            self.claim_ca = CA.load(claim_dir)
        else:
            self.claim_ca = CA.create(claim_dir, name="tether claim CA")
        self.prov_port = prov_port or free_port(host)
        self.cert_s = cert_s
        self.provision_service = None
        self.ota_service = None
        self.fw_http = None
        self.fw_http_port = fw_http_port
        self.support_service = None
        self._serials = frozenset()
        self.server_cert, self.server_key = self.ca.issue_server(os.path.join(self.data_dir, "broker"))
        self.store_path = os.path.join(self.data_dir, "tether.db")
        self.store = None
        self.ingest = None
        self.broker = None
        self.mosquitto = None
        self.mosquitto_ingest = None
        self.mosquitto_prov = None    # the provisioning endpoint: its own process (cloud/mosquitto.py)
        self.registry = Registry(self.store_path)
        from cloud.provision import Provisioning
        self.provisioning = Provisioning(self.registry, self.ca, **({} if cert_s is None else {"cert_s": cert_s}))
        self.revoked = set()
        self.clones = set()      # identities seen connected twice at once, repeatedly
        self.quarantined = frozenset()
        self._kicking = set()    # identities our revocation kick takes over (not clones)
        self._crl_written_ms = 0
        self._mq_takeovers = {}
        self._watch = None
        self._log_offset = 0

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
        else:
            with open(certfile, "rb") as f:
                cert_pem = f.read()
        # Recorded every time (idempotent): revoking the identity must put this
        # serial on the CRL even if the file predates the database.
        self.registry.issued("%s/%s" % (tenant, device), load_cert(cert_pem).serial_number)
        return DeviceCredential(tenant, device, certfile, keyfile)

    def add_claim_batch(self, batch, quota, actor, reason="new factory batch"):
        """A batch's claim certificate (written to DATA/claims/) and its quota."""
        folder = os.path.join(self.data_dir, "claims")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        cert, key = os.path.join(folder, batch + ".crt"), os.path.join(folder, batch + ".key")
        if not os.path.exists(cert):
            cert_pem, key_pem = self.claim_ca.issue_claim(batch)
            write_private(key, key_pem)
            write_public(cert, cert_pem)
        self.provisioning.add_claim(batch, quota, actor, reason)
        return cert, key

    def _client_files(self, ca, name, cn):
        folder = os.path.join(self.data_dir, "provisioner")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        cert, key = os.path.join(folder, name + ".crt"), os.path.join(folder, name + ".key")
        if not os.path.exists(cert):
            cert_pem, key_pem = ca.issue_client(cn)
            write_private(key, key_pem)
            write_public(cert, cert_pem)
        return cert, key

    def endpoints(self):
        """Where devices connect: for board.enroller.Enroller and the CLI."""
        return {"host": self.host, "device_port": self.port, "prov_port": self.prov_port,
                "cafile": self.ca_path, "server_name": "localhost"}

    def record_issued_files(self):
        """Backfill the registry from DATA/devices (files from before it)."""
        root = os.path.join(self.data_dir, "devices")
        for tenant in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            for name in sorted(os.listdir(os.path.join(root, tenant))):
                if name.endswith(".crt"):
                    try:
                        with open(os.path.join(root, tenant, name), "rb") as f:
                            self.registry.issued("%s/%s" % (tenant, name[:-4]), load_cert(f.read()).serial_number)
                    except (OSError, ValueError, CloudError) as e:
                        log.warning("cannot record %s/%s: %s", tenant, name, e)

    # -- life -----------------------------------------------------------------

    async def start(self):
        import asyncio
        self.store = Store(self.store_path)
        if self.registry is None:
            self.registry = Registry(self.store_path)
        self.record_issued_files()
        self.revoked = self.registry.revoked()
        self.registry.retry_unenforced()
        limits = self.limits if self.limits is not None else default_limits()
        self.quarantined = self.registry.quarantined()
        self.ingest = AsyncIngest(Ingest(self.store, clock_ms, limits=limits, flag_of=self._flag_of))
        if self.kind == "embedded":
            self.broker = Broker(self.host, self.port, self.ca_path, self.server_cert,
                                 self.server_key, on_publish=self._on_publish, logger=log,
                                 authorize=lambda identity: identity not in self.revoked,
                                 on_takeover=self._takeover_seen, prov_port=self.prov_port,
                                 claim_ca_path=self.claim_ca.cert_path)
            self.broker.quarantined = self.quarantined
            self.broker.revoked = frozenset(self.revoked)
            self._serials = frozenset(self.registry.revoked_serials())
            self.broker.revoked_serials = self._serials
            await self.broker.start()
        else:
            await self._start_mosquitto()
        await self._start_provisioning()
        await self._start_support()
        await self._start_ota()
        await self.enforce_revocations()
        self._watch = asyncio.get_running_loop().create_task(self._watch_revocations())
        log.info("cloud up on %s:%d (%s broker)", self.host, self.port, self.kind)

    async def _start_support(self):
        """Console audit logs in, revocations and checkpoints out (cloud/support_mqtt.py)."""
        from cloud.ca import SUPPORT_IDENTITY
        from cloud.support_mqtt import SupportService
        self.support_service = SupportService(self.data_dir, self.host, self.port, self.ca_path,
                                              self._client_files(self.ca, "support", SUPPORT_IDENTITY))
        await self.support_service.start()

    async def _start_provisioning(self):
        from cloud.provision_mqtt import ProvisionService
        self.provision_service = ProvisionService(
            self.store_path, self.ca, self.host, self.port, self.prov_port, self.ca_path,
            self._client_files(self.ca, "device", PROVISIONER_IDENTITY),
            self._client_files(self.claim_ca, "claims", CLAIMS_IDENTITY), cert_s=self.cert_s,
            # On Mosquitto a claim certificate may pick any client id on the
            # provisioning endpoint: the service's is not guessable there.
            claims_client_id=None if self.kind == "embedded" else "%s-%s" % (CLAIMS_IDENTITY, os.urandom(8).hex()))
        await self.provision_service.start()

    async def _start_ota(self):
        """Firmware updates (cloud/ota_service.py) on DATA/rollouts.db, the rollout CLI's file."""
        from cloud.ca import OTA_IDENTITY
        from cloud.ota_service import OtaService
        self.ota_service = OtaService(os.path.join(self.data_dir, "rollouts.db"), self.host, self.port,
                                      self.ca_path, self._client_files(self.ca, "ota", OTA_IDENTITY))
        await self.ota_service.start()
        if self.fw_http_port is not None:
            from cloud.broker import server_context
            from cloud.fw_http import FirmwareHttp
            self.fw_http = FirmwareHttp(self.ota_service, server_context(
                self.ca_path, self.server_cert, self.server_key), self.host, self.fw_http_port,
                self.admit_https)
            await self.fw_http.start()
            self.fw_http_port = self.fw_http.port

    def admit_https(self, der):
        """(identity, None), or (identity or None, refusal code), for a client
        certificate on the firmware HTTPS endpoint: what the broker's device
        listener admits, with revocations and retired certificates as they
        are now."""
        from cloud.broker import identity_from_der, serial_of
        identity, reason = identity_from_der(der)
        if reason is None and is_cloud_identity(identity):
            reason = "cloud_identity"
        if reason is None and identity in self.revoked:
            reason = "revoked"
        if reason is None and serial_of(der) in self._serials:
            reason = "cert_revoked"
        return identity, reason

    async def sync_serials(self):
        """Certificates retired by a rotation (or of revoked identities) are
        refused at CONNECT: the embedded broker checks the serial, Mosquitto
        gets a new CRL and a reload."""
        now = frozenset(self.registry.revoked_serials())
        if now == self._serials:
            return
        self._serials = now
        if self.broker is not None:
            self.broker.revoked_serials = now
        if self.mosquitto is not None and self.mosquitto.running:
            self._write_crl()
            self.mosquitto.reload()

    def _flag_of(self, tenant, device):
        """Called by the ingest (its worker thread) for each stored record."""
        return "quarantine" if "%s/%s" % (tenant, device) in self.quarantined else None

    async def sync_quarantine(self):
        """Apply quarantines and releases recorded by any process."""
        now = self.registry.quarantined()
        if now == self.quarantined:
            return
        self.quarantined = now
        if self.broker is not None:
            self.broker.quarantined = now
        if self.mosquitto is not None:
            from cloud.mosquitto import write_acl
            write_acl(self.mosquitto.data_dir, denied=sorted(self.revoked), quarantined=sorted(now))
            self.mosquitto.reload()
        log.info("quarantine now holds %d devices", len(now))

    def _takeover_seen(self, identity, old_addr, new_addr, count, refused):
        """The same identity connected while connected: audited; repeated, a clone."""
        if refused:
            self.clones.add(identity)
        self.registry.audit("broker", "clone_suspected" if refused else "session_takeover", identity,
                            "the same identity connected twice at once",
                            "%s took over from %s (%d in %d s)%s" % (
                                new_addr, old_addr, count, 60, "; newcomer refused" if refused else ""))

    def _scan_mosquitto_log(self):
        """Mosquitto has no hook for a session takeover; it logs one. Read new
        lines of its log and audit them like the embedded broker does."""
        from cloud.broker import CLONE_TAKEOVERS_MAX, CLONE_WINDOW_S
        try:
            with open(self.mosquitto.log_path, "rb") as f:
                f.seek(self._log_offset)
                chunk = f.read(1 << 20)
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._log_offset += end
        now = time.monotonic()
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            marker = " already connected, closing old connection"
            if marker not in line or "Client " not in line:
                continue
            identity = line.split("Client ", 1)[1].split(marker)[0]
            if identity in self._kicking:
                continue  # our own revocation kick
            times = [t for t in self._mq_takeovers.get(identity, []) if now - t <= CLONE_WINDOW_S] + [now]
            self._mq_takeovers[identity] = times[-CLONE_TAKEOVERS_MAX:]
            if len(self._mq_takeovers) > 100_000:
                self._mq_takeovers.pop(next(iter(self._mq_takeovers)))
            self._takeover_seen(identity, "earlier connection", "a new connection", len(times),
                                len(times) >= CLONE_TAKEOVERS_MAX)

    async def _watch_revocations(self, every_s=0.05):
        """Revocations are recorded by `tether cloud revoke` (any process);
        the running cloud notices and enforces them."""
        import asyncio
        while True:
            await asyncio.sleep(every_s)
            for step in (self.enforce_revocations, self.sync_quarantine, self.sync_serials,
                         self._refresh_crl, self._scan_log_step):
                try:  # one failing step must not stop the others
                    await step()
                except Exception:
                    log.exception("%s failed; retrying", step.__name__)

    async def _scan_log_step(self):
        if self.mosquitto is not None:
            self._scan_mosquitto_log()

    async def _refresh_crl(self):
        """A CRL past its next-update date makes Mosquitto refuse everyone:
        re-sign it daily (it is valid for a week)."""
        if self.mosquitto is not None and clock_ms() - self._crl_written_ms > CRL_RESIGN_MS:
            self._write_crl()
            self.mosquitto.reload()

    async def enforce_revocations(self):
        """Refuse every revoked identity at CONNECT and end its live session;
        record how long that took. Mosquitto: recorded, not enforced yet."""
        for identity, revoked_ms in self.registry.pending():
            self.revoked.add(identity)
            try:
                if self.kind != "embedded":
                    await self._enforce_on_mosquitto(identity, revoked_ms)
                else:
                    await self._enforce_on_embedded(identity, revoked_ms)
            except Exception as e:  # recorded, so it is neither lost nor retried 20 times a second
                log.exception("enforcing the revocation of %s failed", identity)
                self.registry.not_enforced(identity, "NOT enforced: %s: %s" % (type(e).__name__, e))

    async def _enforce_on_embedded(self, identity, revoked_ms):
        import asyncio
        self.broker.revoked = frozenset(self.revoked)
        kicked = await asyncio.wait_for(self.broker.kick(identity), 5)
        if self.broker.sessions.get(identity, (None, None))[1] is not None:
            return  # try again on the next pass
        block_ms = max(0.0, float(clock_ms() - revoked_ms))
        self.registry.enforced(identity, block_ms, "session ended" if kicked else "no live session")

    async def _on_publish(self, identity, topic, payload):
        await self.ingest.submit(identity, topic, payload)

    async def _start_mosquitto(self):
        from cloud.mosquitto import Mosquitto, MosquittoIngest
        mdir = os.path.join(self.data_dir, "mosquitto")
        os.makedirs(mdir, mode=0o700, exist_ok=True)
        log_path = os.path.join(mdir, "mosquitto.log")
        self._log_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        self.crl_path = os.path.join(mdir, "crl.pem")
        self._write_crl()
        self.mosquitto = Mosquitto.configure(mdir, self.host, self.port, self.ca_path,
                                             self.server_cert, self.server_key, logger=log,
                                             crl_path=self.crl_path, denied=sorted(self.revoked),
                                             quarantined=sorted(self.quarantined))
        await self.mosquitto.start()
        from cloud.mosquitto import write_prov_config
        pdir = os.path.join(self.data_dir, "mosquitto-prov")
        write_prov_config(pdir, self.host, self.prov_port, self.claim_ca.cert_path, self.server_cert,
                          self.server_key)
        self.mosquitto_prov = Mosquitto(pdir, self.host, self.prov_port, logger=log)
        await self.mosquitto_prov.start()
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

    def _write_crl(self):
        self._crl_written_ms = clock_ms()
        self._serials = frozenset(self.registry.revoked_serials())
        tmp = self.crl_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.ca.crl_pem(self.registry.revoked_serials()))
        os.replace(tmp, self.crl_path)

    async def _enforce_on_mosquitto(self, identity, revoked_ms):
        """Mosquitto needs three things, none enough alone: a CRL (blocks new
        handshakes of the known certificates), an ACL deny (the identity can
        touch no topic, whatever certificate it presents) and a kick (ends
        the live session; a CRL reload does not). The kick is a session
        takeover: a throwaway certificate for the same identity connects,
        Mosquitto closes the old connection, the throwaway is revoked too."""
        import asyncio
        from cloud.mosquitto import write_acl
        mdir = self.mosquitto.data_dir
        self._kicking.add(identity)  # our probes and kick are not clones
        self._write_crl()
        write_acl(mdir, denied=sorted(self.revoked), quarantined=sorted(self.quarantined))
        self.mosquitto.reload()
        own = self._credential_files(identity)
        if own is not None:
            refused = await _wait_refused(self, own, timeout_s=3)
        else:
            await asyncio.sleep(0.3)  # no certificate on file to probe the reload with
            refused = None
        kicked = await self._takeover(identity)
        self._write_crl()
        self.mosquitto.reload()
        block_ms = max(0.0, float(clock_ms() - revoked_ms))
        note = "CRL and ACL deny reloaded, session %s%s" % (
            "taken over and closed" if kicked else "NOT confirmed closed",
            "" if refused is None else ("; reconnect refused" if refused else "; reconnect NOT refused"))
        if kicked and refused is not False:
            self.registry.enforced(identity, block_ms, note)
        else:
            self.registry.not_enforced(identity, "NOT enforced: " + note)

    def _credential_files(self, identity):
        tenant, device = identity.split("/")
        cert = os.path.join(self.data_dir, "devices", tenant, device + ".crt")
        key = os.path.join(self.data_dir, "devices", tenant, device + ".key")
        return (cert, key) if os.path.exists(cert) and os.path.exists(key) else None

    async def _takeover(self, identity):
        """Connect as `identity` with a throwaway certificate; True once
        Mosquitto accepted it (it closes any older connection first)."""
        import tempfile
        tenant, device = identity.split("/")
        cert_pem, key_pem = self.ca.issue_device(tenant, device, days=1)
        self.registry.issued(identity, load_cert(cert_pem).serial_number, purpose="takeover")
        with tempfile.TemporaryDirectory(dir=self.data_dir) as tmp:
            cert, key = os.path.join(tmp, "t.crt"), os.path.join(tmp, "t.key")
            write_public(cert, cert_pem)
            write_private(key, key_pem)
            return await _mqtt_accepted(self, (cert, key), identity)

    async def restart_broker(self, down_s=1.0):
        """Stop the broker, stay down for down_s, start it again."""
        import asyncio
        if self.kind == "embedded":
            await self.broker.stop()
            await asyncio.sleep(down_s)
            self.broker.revoked_serials = self._serials
            self.broker.quarantined = self.quarantined
            self.broker.revoked = frozenset(self.revoked)
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
        if self.provision_service is not None:
            await self.provision_service.stop()
            self.provision_service = None
        if self.support_service is not None:
            await self.support_service.stop()
            self.support_service = None
        if self.fw_http is not None:
            await self.fw_http.stop()
            self.fw_http = None
        if self.ota_service is not None:
            await self.ota_service.stop()
            self.ota_service = None
        if self.broker is not None:
            await self.broker.stop()
        if self.mosquitto_ingest is not None:
            await self.mosquitto_ingest.stop()
        if self.mosquitto is not None:
            await self.mosquitto.stop()
        if self.mosquitto_prov is not None:
            await self.mosquitto_prov.stop()
        if self.ingest is not None:
            await self.ingest.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.registry is not None:
            self.registry.close()
            self.registry = None
