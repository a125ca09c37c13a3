"""Revocation drill for `tether demo`: a few devices outside the telemetry
fleet connect, are revoked while connected, and keep trying to come back.
Measures how long revocation took to bite and counts the refusals."""

import asyncio
import ssl

from cloud import probe
from simulator.verify import Check

VICTIMS = 3
RETRIES = 3


class RevocationDrill:
    def __init__(self, cloud):
        self.cloud = cloud
        self.creds = [cloud.issue_device("initech", "revoked-%d" % i) for i in range(VICTIMS)]
        self.clone = cloud.issue_device("initech", "cloned-0")
        self.clone_refused = False
        self.block_ms = []
        self.sessions_closed = 0
        self.tried = 0
        self.refused = 0
        self.ran = False

    async def _connect(self, cred):
        return await probe.connect(self.cloud.host, self.cloud.port, self.cloud.ca_path,
                                   (cred.certfile, cred.keyfile), "%s/%s" % (cred.tenant, cred.device))

    async def run(self):
        links = [await self._connect(c) for c in self.creds]
        if any(rc != 0 for _, _, rc in links):
            return
        for cred in self.creds:
            self.cloud.registry.revoke("%s/%s" % (cred.tenant, cred.device), "demo: device reported stolen",
                                       "demo-operator")
        for (reader, writer, _), cred in zip(links, self.creds):
            try:
                if await asyncio.wait_for(reader.read(100), 5) == b"":
                    self.sessions_closed += 1
            except (ConnectionError, ssl.SSLError):
                self.sessions_closed += 1
            except asyncio.TimeoutError:
                pass
            writer.close()
        for cred in self.creds:
            status = await self._enforced("%s/%s" % (cred.tenant, cred.device))
            if status is not None:
                self.block_ms.append(status["block_ms"])
            for _ in range(RETRIES):
                self.tried += 1
                try:
                    _, writer, rc = await self._connect(cred)
                    writer.close()
                    self.refused += rc != 0
                except probe.Refused:
                    self.refused += 1
                except (OSError, asyncio.TimeoutError):
                    pass  # inconclusive: not counted as refused
        await self._clone_attack()
        self.ran = True

    async def _clone_attack(self, rounds=4):
        """Two devices with one certificate keep taking each other over."""
        writers = []
        for _ in range(rounds):
            try:
                _, writer, rc = await self._connect(self.clone)
                writers.append(writer)
                self.clone_refused = self.clone_refused or rc != 0
            except (probe.Refused, OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        for _ in range(40):  # Mosquitto's takeovers are read from its log
            if "initech/cloned-0" in self.cloud.clones:
                break
            await asyncio.sleep(0.1)
        for writer in writers:
            writer.close()

    async def _enforced(self, identity, timeout_s=5):
        for _ in range(int(timeout_s / 0.05)):
            status = self.cloud.registry.status(identity)
            if status["enforced_ms"] is not None:
                return status
            await asyncio.sleep(0.05)
        return None

    def section(self):
        return {"revoked": VICTIMS, "revoke_block_ms_max": max(self.block_ms) if self.block_ms else None,
                "revoked_reconnects_tried": self.tried, "revoked_reconnects_refused": self.refused,
                "clones_detected": len(self.cloud.clones)}

    def attacks(self):
        """(tried, refused) for the identity attacks run here: the clone."""
        return 1, 1 if self.clone_refused else 0

    def checks(self):
        worst = max(self.block_ms) if self.block_ms else None
        return [
            Check("revocation ended every live session", self.ran and self.sessions_closed == VICTIMS,
                  "%d of %d sessions closed" % (self.sessions_closed, VICTIMS)),
            Check("revocation enforced within 1 s", worst is not None and len(self.block_ms) == VICTIMS
                  and worst < 1000, "worst %s ms over %d revocations" % (worst, len(self.block_ms))),
            Check("cloned identity detected and audited", "initech/cloned-0" in self.cloud.clones and any(
                a["action"] == "clone_suspected" for a in self.cloud.registry.audit_rows(subject="initech/cloned-0")),
                  "%s; newcomer %s" % ("detected" if "initech/cloned-0" in self.cloud.clones else "NOT detected",
                                       "refused" if self.clone_refused else "flagged, not refused (Mosquitto)")),
            Check("revoked devices refused on reconnect", self.tried == VICTIMS * RETRIES
                  and self.refused == self.tried, "%d of %d reconnects refused" % (self.refused, self.tried)),
        ]
