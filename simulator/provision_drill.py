"""`tether demo` provisions its fleet by claim, the way a factory batch
reaches the field: one claim certificate for the batch, an allowlist of
hardware ids bound to tenants and sites, operator approval for part of the
fleet, and every device making its own key. Then it attacks the claim
path: telemetry published with the claim certificate, and a device past the
batch's quota. Each device that enrolled becomes a `Provisioned`
credential the telemetry fleet runs on (its flash, keys and identity core
carry on, so short-lived certificates are rotated during the run)."""

import asyncio
import time

import cbor2

from agent import enroll, mqtt
from board.keystore import FlashKeystore
from board.sim import SimFlash, SimRng
from cloud import probe
from board.enroller import Enroller, IdentityBoard
from simulator.verify import Check

BATCH = "factory-1"
CLAIM = "claim:" + BATCH
OPERATOR = "demo-operator"
CONCURRENCY = 50
ATTACK_TS_MS = 1_700_000_000_123  # marks the attacker's record, to look for it in the store


def clock_ms():
    return time.time_ns() // 1_000_000


class Provisioned:
    """What the fleet needs of an enrolled device."""

    def __init__(self, enroller, cafile):
        self.enroller = enroller
        self.tenant, self.device = enroller.core.identity.split("/")
        active = enroller.core.record["a"]
        self.context = enroller.board.keystore.client_context(active["k"], active["cert"], cafile)


def _core(hwid, seed, claim=CLAIM):
    flash = SimFlash()
    keystore = FlashKeystore(flash)
    core = enroll.Identity(enroll.Config(hwid, claim, keystore.capabilities, answer_timeout_ms=5000,
                                         backoff_base_ms=500, backoff_cap_ms=5000), SimRng(seed))
    return core, IdentityBoard(flash, keystore)


async def enroll_many(endpoints, claim_files, claim_identity, hwids, seed, timeout_s=60):
    """Each hardware id enrolls by claim (the real identity core on a sim
    board, over mTLS), CONCURRENCY at a time -> (enrolled, failed) Enrollers."""
    gate = asyncio.Semaphore(CONCURRENCY)
    enrolled, failed = [], []

    async def one(i, hwid):
        core, board = _core(hwid, seed * 1_000_003 + i, claim_identity)
        enroller = Enroller(core, board, endpoints, claim_files, clock_ms, hwid)
        async with gate:
            ok = await enroller.run(timeout_s=timeout_s)
        (enrolled if ok else failed).append(enroller)
        return enroller if ok else None

    done = await asyncio.gather(*(one(i, h) for i, h in enumerate(hwids)))
    return [e for e in done if e is not None], failed


class ProvisionDrill:
    def __init__(self, cloud, count, tenants=("acme", "globex", "initech"), seed=1,
                 approval_every=10, short_every=10, short_cert_s=None):
        self.cloud = cloud
        self.count = count
        self.tenants = tenants
        self.seed = seed
        self.approval_every = approval_every
        self.short_every = short_every
        self.short_cert_s = short_cert_s
        self.claim = None
        self.approved = 0
        self.enrolled = []
        self.failed = []
        self.seconds = 0.0
        self.results = {}

    def hwid(self, i):
        return "hw-%05d" % i

    def allow_all(self):
        self.claim = self.cloud.add_claim_batch(BATCH, self.count, OPERATOR, "demo factory batch")
        for i in range(self.count):
            approval = self.approval_every and i % self.approval_every == self.approval_every // 2
            short = self.short_cert_s and self.short_every and i % self.short_every == 1 % self.short_every
            self.cloud.provisioning.allow(self.hwid(i), BATCH, self.tenants[i % len(self.tenants)],
                                          "dev-%05d" % i, "site-%d" % (i % 4), OPERATOR,
                                          approval=bool(approval), cert_s=self.short_cert_s if short else None)

    async def _operator(self):
        """Approves what waits for approval, as a person on call would."""
        while True:
            for row in self.cloud.provisioning.pending():
                self.cloud.provisioning.approve(row["hwid"], OPERATOR, "demo: critical-fleet device checked")
                self.approved += 1
            await asyncio.sleep(0.2)

    async def run(self, timeout_s=60):
        """Enroll every allowlisted device -> [Provisioned]."""
        t0 = time.monotonic()
        self.allow_all()
        operator = asyncio.ensure_future(self._operator())
        try:
            self.enrolled, self.failed = await enroll_many(
                self.cloud.endpoints(), self.claim, CLAIM, [self.hwid(i) for i in range(self.count)],
                self.seed, timeout_s)
        finally:
            operator.cancel()
        self.seconds = time.monotonic() - t0
        return [Provisioned(e, self.cloud.ca_path) for e in self.enrolled]

    # -- attacks on the claim path -----------------------------------------------

    async def attack(self, victim):
        self.results["claim_telemetry"] = await self._claim_telemetry(victim)
        self.results["quota"] = await self._over_quota()

    async def _claim_telemetry(self, victim):
        """The claim certificate publishes a well-formed record as `victim`."""
        tenant, device = victim
        ep = self.cloud.endpoints()
        try:
            _, writer, rc = await probe.connect(ep["host"], ep["prov_port"], self.cloud.ca_path,
                                                self.claim, "hw-attacker")
        except (probe.Refused, OSError, asyncio.TimeoutError) as e:
            return "connect failed: %s" % type(e).__name__
        record = cbor2.dumps({"v": 1, "k": "t", "d": device, "e": 0, "s": 999_999, "ts": ATTACK_TS_MS,
                              "r": {"x": 1}}, canonical=True)
        for pid, topic in enumerate(("t/%s/%s/telemetry" % victim, "t/%s/telemetry" % CLAIM), start=1):
            writer.write(mqtt.publish(topic, record, 1, pid))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()
        return "sent"

    async def _over_quota(self):
        """One more allowlisted device than the batch's quota."""
        hwid = "hw-extra"
        self.cloud.provisioning.allow(hwid, BATCH, self.tenants[0], "dev-extra", "site-0", OPERATOR)
        core, board = _core(hwid, self.seed)
        enroller = Enroller(core, board, self.cloud.endpoints(), self.claim, clock_ms, hwid)
        ok = await enroller.run(timeout_s=5)
        return "enrolled" if ok else "refused"

    def _claim_record_stored(self, victim):
        rows = self.cloud.store.tenant(victim[0]).telemetry(device=victim[1], include_flagged=True)
        return any(r["ts_ms"] == ATTACK_TS_MS for r in rows)

    def _quota_audited(self):
        rows = self.cloud.registry.audit_rows(action="enroll_refused")
        return any(r["reason"] == "quota_exhausted" and "hw-extra" in r["detail"] for r in rows)

    def attack_counts(self, victim):
        tried = refused = 0
        if "claim_telemetry" in self.results:
            tried += 1
            refused += self.results["claim_telemetry"] == "sent" and not self._claim_record_stored(victim)
        if "quota" in self.results:
            tried += 1
            refused += self.results["quota"] == "refused" and self._quota_audited()
        return tried, refused

    def checks(self, victim):
        counts = self.cloud.provisioning.counts()
        return [
            Check("every allowlisted device enrolled by claim with its own key", not self.failed and
                  counts["provisioned"] >= len(self.enrolled) == self.count,
                  "%d of %d enrolled in %.1f s (%d after operator approval)%s" % (
                      len(self.enrolled), self.count, self.seconds, self.approved,
                      "; failed: %s" % ", ".join(e.hwid for e in self.failed[:5]) if self.failed else "")),
            Check("telemetry published with the claim certificate refused",
                  self.results.get("claim_telemetry") == "sent" and not self._claim_record_stored(victim),
                  "publish %s; record %s" % (self.results.get("claim_telemetry"),
                                             "STORED" if self._claim_record_stored(victim) else "not stored")),
            Check("a device past the claim quota refused and audited",
                  self.results.get("quota") == "refused" and self._quota_audited(),
                  "%s; audit %s" % (self.results.get("quota"), "has quota_exhausted" if self._quota_audited()
                                    else "has NO refusal")),
        ]
