"""How fast devices enroll by claim through the reference cloud, beside what
the same cloud does with no network in between, in the same run.

    .venv/bin/python benchmarks/provision_bench.py --devices 300 [--broker mosquitto] [--json OUT]

1. **baseline** (in-process, no broker): for each device, make a key and a
   CSR, verify the CSR and issue a certificate from it (cloud/ca.py), then
   record it in the registry (one SQLite transaction, as the provisioning
   service does). This is the floor the cloud's own work sets.
2. **enroll**: the reference cloud (`cloud.service.Cloud`, embedded or
   Mosquitto) with a claim batch and an allowlist; N devices, each the real
   identity core (agent/enroll.py) on the simulated board, enroll by claim
   over real mTLS MQTT: claim connection, request, answer, a second
   connection with the new identity, confirmation. `--concurrency` at a
   time (default 50).

Prints enrollments per second for both, and their ratio, plus the
machine. Nothing here is a test: the numbers go to docs/benchmarks.md.
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent import enroll  # noqa: E402
from board.keystore import FlashKeystore, MemoryKeystore  # noqa: E402
from board.sim import SimFlash, SimRng  # noqa: E402
from cloud.ca import CA  # noqa: E402
from cloud.identity import Registry  # noqa: E402
from cloud.provision import Provisioning  # noqa: E402
from cloud.service import Cloud  # noqa: E402
from board.enroller import Enroller, IdentityBoard  # noqa: E402


def clock_ms():
    return time.time_ns() // 1_000_000


def baseline(n, tmp):
    """Key, CSR, CSR check, certificate and registry row per device, in-process."""
    ca = CA.create(os.path.join(tmp, "ca"))
    registry = Registry(os.path.join(tmp, "base.db"))
    prov = Provisioning(registry, ca)
    prov.add_claim("b", n, "bench")
    t0 = time.perf_counter()
    for i in range(n):
        ks = MemoryKeystore()
        ks.generate("k")
        csr = ks.csr_der("k", "x")
        from cloud.ca import csr_public_key
        from cloud.provision import key_sha256
        key = csr_public_key(csr)
        prov._issue("acme/dev-%05d" % i, key, key_sha256(key), 3600, "claim", hwid="hw-%05d" % i, batch="b")
    elapsed = time.perf_counter() - t0
    registry.close()
    return n / elapsed


async def enroll_all(n, broker, concurrency, tmp):
    cloud = Cloud(os.path.join(tmp, "cloud"), broker=broker)
    await cloud.start()
    try:
        claim = cloud.add_claim_batch("bench", n, "bench")
        for i in range(n):
            cloud.provisioning.allow("hw-%05d" % i, "bench", "acme", "dev-%05d" % i, "s", "bench")
        gate = asyncio.Semaphore(concurrency)
        ep = cloud.endpoints()

        async def one(i):
            flash = SimFlash()
            ks = FlashKeystore(flash)
            core = enroll.Identity(enroll.Config("hw-%05d" % i, "claim:bench", ks.capabilities,
                                                 answer_timeout_ms=10000), SimRng(i))
            async with gate:
                return await Enroller(core, IdentityBoard(flash, ks), ep, claim, clock_ms,
                                      "hw-%05d" % i).run(timeout_s=120)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        return sum(results) / elapsed, sum(results)
    finally:
        await cloud.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=300)
    p.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline(args.devices, tmp)
        rate, ok = asyncio.run(enroll_all(args.devices, args.broker, args.concurrency, tmp))
    result = {"devices": args.devices, "broker": args.broker, "concurrency": args.concurrency,
              "baseline_per_s": round(base, 1), "enrolled": ok, "enroll_per_s": round(rate, 1),
              "ratio": round(rate / base, 3), "python": platform.python_version(),
              "cpus": os.cpu_count()}
    print("in-process issue (baseline): %8.1f /s" % base)
    print("enroll by claim over mTLS:   %8.1f /s  (%d of %d enrolled, %s)" % (rate, ok, args.devices, args.broker))
    print("ratio:                       %8.3f" % (rate / base))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if ok == args.devices else 1


if __name__ == "__main__":
    sys.exit(main())
