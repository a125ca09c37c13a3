"""Hostile input during a run, each expected to be refused with a reason:
malformed, mistyped, oversized and impersonating payloads (dead-lettered),
a replayed record (counted as a duplicate, stored once), a publish into
another tenant's topic (refused by the broker's ACL), and TLS connections
with no client certificate or one from a foreign CA (refused handshakes)."""

import asyncio
import os
import tempfile

import cbor2

from agent import mqtt
from cloud import probe
from cloud.ca import CA, write_private, write_public
from simulator.verify import Check

ROGUE = ("mallory", "rogue-1")  # its own tenant, so its counters are its own
VICTIM_TOPIC = "t/globex/dev-00001/telemetry"


def record(seq, device=ROGUE[1], **over):
    r = {"v": 1, "k": "t", "d": device, "e": 0, "s": seq, "ts": 1_800_000_000_000, "r": {"x": 1}}
    r.update(over)
    return cbor2.dumps(r, canonical=True)


class Attacks:
    def __init__(self, cloud, _any_cred=None):
        self.cloud = cloud
        self.cred = cloud.issue_device(*ROGUE)
        self.results = {}

    def payloads(self):
        own = "t/%s/%s/telemetry" % ROGUE
        return [
            ("malformed_cbor", own, b"\xa5\x61v\x01\xff\x00garbage"),
            ("bad_type", own, record(1, s="one")),
            ("oversized", own, record(2, r={"blob%02d" % i: 10 ** 15 for i in range(200)})),
            ("identity_mismatch", own, record(3, device="dev-00001")),
            ("valid", own, record(0)),
            ("replay", own, record(0)),
            ("cross_tenant", VICTIM_TOPIC, record(5, device="dev-00001")),
        ]

    async def run(self):
        self.results["publishes"] = await self._publish_all()
        self.results["no_client_cert"] = await self._handshake(None)
        self.results["foreign_ca"] = await self._handshake(self._foreign_cred())

    async def _publish_all(self):
        reader, writer, rc = await probe.connect(self.cloud.host, self.cloud.port, self.cloud.ca_path,
                                                 (self.cred.certfile, self.cred.keyfile), "%s/%s" % ROGUE)
        parser = mqtt.Parser()
        acks = 0
        try:
            for pid, (_, topic, payload) in enumerate(self.payloads(), start=1):
                writer.write(mqtt.publish(topic, payload, 1, pid))
            await writer.drain()
            while acks < len(self.payloads()):
                data = await asyncio.wait_for(reader.read(4096), 5)
                if not data:
                    break
                acks += sum(1 for p in parser.feed(data) if isinstance(p, mqtt.PubAck))
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()
        return acks

    def _foreign_cred(self):
        folder = tempfile.mkdtemp(prefix="tether-foreign-")
        foreign = CA.create(os.path.join(folder, "ca"), name="someone else's CA")
        cert, key = foreign.issue_device(*ROGUE)
        write_public(os.path.join(folder, "d.crt"), cert)
        write_private(os.path.join(folder, "d.key"), key)
        return os.path.join(folder, "d.crt"), os.path.join(folder, "d.key")

    async def _handshake(self, cred):
        """'refused' only if TLS itself turned the client away; anything else
        is inconclusive, and the check fails."""
        try:
            _, writer, rc = await probe.connect(self.cloud.host, self.cloud.port, self.cloud.ca_path,
                                                cred, "%s/%s" % ROGUE)
        except probe.Refused:
            return "refused"
        except (OSError, asyncio.TimeoutError) as e:
            return "inconclusive: %s" % type(e).__name__
        writer.close()
        return "accepted" if rc == 0 else "inconclusive: CONNACK %d, not a TLS refusal" % rc

    def _forged(self, cloud):
        victim = cloud.store.tenant("globex").telemetry(device="dev-00001")
        return [r for r in victim if r["epoch"] == 0 and r["seq"] == 5 and r["ts_ms"] == 1_800_000_000_000]

    def identity_counts(self, cloud):
        """The identity attacks here (no certificate, a foreign CA, a device
        publishing into another tenant) and how many were refused."""
        tried = [self.results.get("no_client_cert"), self.results.get("foreign_ca")]
        refused = sum(1 for r in tried if r == "refused")
        if "publishes" in self.results:
            tried.append("cross_tenant")
            refused += not self._forged(cloud)
        return {"attacks_tried": len(tried), "attacks_refused": refused}

    def checks(self, cloud):
        if not self.results:
            return [Check("attacks ran", False, "the hostile client never ran")]
        view = cloud.store.tenant(ROGUE[0])
        reasons = sorted(d["reason"] for d in view.dead_letters() if d["identity"] == "%s/%s" % ROGUE)
        expected = sorted(["malformed_cbor", "bad_type", "oversized", "identity_mismatch"])
        stored = view.telemetry(device=ROGUE[1])
        duplicates = view.counts().get("duplicates_dropped", 0)
        sent = len(self.payloads())
        forged = self._forged(cloud)
        return [
            Check("hostile client's publishes all reached the broker", self.results["publishes"] == sent,
                  "%d of %d acknowledged" % (self.results["publishes"], sent)),
            Check("hostile payloads dead-lettered with their reason", reasons == expected,
                  "dead letters: %s (expected %s)" % (", ".join(reasons) or "none", ", ".join(expected))),
            Check("replayed record stored once", len(stored) == 1 and duplicates == 1,
                  "%d rows stored, %d duplicate counted" % (len(stored), duplicates)),
            Check("publish into another tenant refused", not forged,
                  "forged record %s in tenant globex" % ("FOUND" if forged else "absent")),
            Check("TLS without a client certificate refused", self.results["no_client_cert"] == "refused",
                  self.results["no_client_cert"]),
            Check("certificate from a foreign CA refused", self.results["foreign_ca"] == "refused",
                  self.results["foreign_ca"]),
        ]
