"""Firmware download on a Linux board: MQTT chunks against HTTPS ranges, in
the same run, through the real cloud.

    .venv/bin/python benchmarks/ota_bench.py [--size-kib 1700] [--repeat 3] [--broker embedded]

For each transport, a fresh board (board/linux.py LinuxAgent + board/linux_ota.py
LinuxOta over board/linux_slots.py in a temporary directory, the factory
image in slot 0) is offered one signed release of --size-kib by the
cloud's rollout engine (cloud/service.py, mTLS, the embedded broker or
Mosquitto), and the time from the offer to the "verified" report is
measured: the signature check, every 4 KiB chunk fetched, checked and
written with fsync, and the whole slot read back and checked. What the
two runs share (the offer, the signature check, the read-back) is in both;
the difference is the transport: one MQTT request and answer per chunk
through the broker and the OTA service, or one HTTPS range request per
chunk on a keep-alive connection to cloud/fw_http.py.

Also measured, in the same process: the board's local part alone (the same
image's chunks checked and written to a slot and read back, no network),
so the share of the time the network takes is visible.

Each figure is the best of --repeat runs (a fresh board each time).
"""

import argparse
import asyncio
import json
import os
import platform
import ssl
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agent import manifest as mf  # noqa: E402
from agent import telemetry  # noqa: E402
from agent import updater as up  # noqa: E402
from board.https_ranges import HttpsRanges  # noqa: E402
from board.linux import LinuxAgent  # noqa: E402
from board.linux_ota import LinuxOta  # noqa: E402
from board.linux_slots import BOOT_ENV, FileEnv, LinuxSlots  # noqa: E402
from cloud.rollout import Engine, Policy  # noqa: E402
from cloud.rollout_release import release_id  # noqa: E402
from cloud.service import Cloud  # noqa: E402
from simulator import firmware_faults as ff  # noqa: E402

HW = "bench-v1"
FACTORY, NEW = "1.0.0", "2.0.0"
PEOPLE = ("alice", "bob", "carol")
PLAN = {"silence_s": 600, "reach_s": 600, "stages": [{"name": "all", "percent": 100, "soak_s": 0}]}
WAIT_S = 300


def now_ms():
    return time.time_ns() // 1_000_000


class Board:
    def __init__(self, cloud, root, name, https):
        self.cloud, self.root, self.name = cloud, root, name
        self.cred = cloud.issue_device("acme", name)
        self.config = up.Config(HW, ff.root_public_key(), k=2)
        slots = self.slots()
        with open(slots.slot_paths[0], "wb") as f:
            f.write(cloud.images[FACTORY])
        slots.write_boot_state(up.BootState(active=0, sv=1, ksv=1).encode())
        ranges = None
        if https:
            ctx = ssl.create_default_context(cafile=cloud.ca_path)
            ctx.load_cert_chain(self.cred.certfile, self.cred.keyfile)
            ranges = HttpsRanges(cloud.host, cloud.fw_http_port, ctx)
        self.ota = LinuxOta("acme/" + name, self.config, slots, "site-0", lambda slot: FACTORY,
                            reboot=lambda: None, ranges=ranges)
        self.agent = LinuxAgent(os.path.join(root, "data"), "acme", name, cloud.host, cloud.port,
                                cloud.ca_path, self.cred.certfile, self.cred.keyfile,
                                config=telemetry.Config(backoff_base_ms=100, backoff_cap_ms=800), ota=self.ota)
        self.agent.boot()

    def slots(self):
        d = os.path.join(self.root, "slots")
        os.makedirs(d, exist_ok=True)
        return LinuxSlots(d, env=FileEnv(os.path.join(d, BOOT_ENV)))

    def run_until(self, predicate, timeout_s=WAIT_S):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the board did not get there in %d s" % timeout_s)
            self.agent.step(0.005)


def reported(cloud, identity, status):
    return any(r["device"] == identity and r["status"] == status for r in list(cloud.ota_service.core.reports))


async def one_update(cloud, tmp, name, https):
    """Seconds from the offer to the "verified" report, for a fresh board."""
    board = Board(cloud, os.path.join(tmp, name), name, https)
    identity = "acme/" + name
    await asyncio.to_thread(board.run_until, lambda: board.ota.welcomed)
    rid = cloud.ops.create(release_id(HW, NEW), PLAN, PEOPLE[0], "bench", now_ms())
    cloud.ops.approve(rid, PEOPLE[1], now_ms())
    cloud.ops.approve(rid, PEOPLE[2], now_ms())
    start = time.perf_counter()
    cloud.ota_service.tick_now()
    await asyncio.to_thread(board.run_until, lambda: reported(cloud, identity, "verified"))
    elapsed = time.perf_counter() - start
    cloud.ops.abort(rid, PEOPLE[0], "bench done", now_ms())
    if board.slots().read_slot(1)[:len(cloud.images[NEW])] != cloud.images[NEW]:
        raise AssertionError("slot 1 does not hold the release")
    if https and board.ota.fetched < mf.chunk_count(len(cloud.images[NEW])):
        raise AssertionError("not every chunk came over HTTPS (%d)" % board.ota.fetched)
    if board.agent.client is not None:
        board.agent.client.disconnect()
    return elapsed


def local_only(tmp, payload, bundle):
    """The board's part without a network: verify, write with fsync, read back."""
    d = os.path.join(tmp, "local")
    os.makedirs(d, exist_ok=True)
    slots = LinuxSlots(d, env=FileEnv(os.path.join(d, BOOT_ENV)))
    slots.write_boot_state(up.BootState(active=0, sv=1, ksv=1).encode())
    with open(slots.slot_paths[0], "wb") as f:
        f.write(b"factory")
    u = up.Updater(up.Config(HW, ff.root_public_key(), k=2))
    start = time.perf_counter()
    todo = u.handle(up.Booted(*slots.boot())) + u.handle(up.Offer(bundle, now_ms(), "r"))
    while todo:
        a = todo.pop(0)
        if isinstance(a, up.StepLater):
            todo = u.handle(up.Step()) + todo
        elif isinstance(a, up.RequestChunk):
            todo = u.handle(up.Chunk(a.index, payload[a.index * 4096:(a.index + 1) * 4096])) + todo
        elif isinstance(a, up.WriteSlot):
            slots.write_slot(a.slot, a.offset, a.data)
        elif isinstance(a, up.WriteBootState):
            slots.write_boot_state(a.data)
        elif isinstance(a, up.ReadSlot):
            todo = u.handle(up.SlotRead(a.offset, slots.read_slot(a.slot, a.offset, a.length))) + todo
        elif isinstance(a, up.Reboot):
            break
    if u.state != up.INSTALLED:
        raise AssertionError("local update ended in %s" % u.state)
    return time.perf_counter() - start


async def bench(args):
    size = args.size_kib * 1024
    with tempfile.TemporaryDirectory() as tmp:
        cloud = Cloud(os.path.join(tmp, "cloud"), broker=args.broker, fw_http_port=0)
        await cloud.start()
        try:
            cloud.ops = Engine(os.path.join(cloud.data_dir, "rollouts.db"), Policy())
            cloud.ops.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now_ms())
            cloud.images = {}
            bundles = {}
            for version, sv in ((FACTORY, 1), (NEW, 2)):
                bundle, payload = ff.build_release(HW, version, sv, size=size if version == NEW else 5000)
                cloud.ops.add_release(bundle, payload, PEOPLE[0], now_ms())
                cloud.images[version], bundles[version] = payload, bundle
            times = {"mqtt": [], "https": [], "local": []}
            for i in range(args.repeat):      # interleaved: a noisy neighbour hits all alike
                times["mqtt"].append(await one_update(cloud, tmp, "mqtt-%d" % i, False))
                times["https"].append(await one_update(cloud, tmp, "https-%d" % i, True))
                times["local"].append(await asyncio.to_thread(local_only, os.path.join(tmp, "l%d" % i),
                                                             cloud.images[NEW], bundles[NEW]))
        finally:
            cloud.ops.close()
            await cloud.stop()
    best = {k: min(v) for k, v in times.items()}
    mib = size / (1 << 20)
    return {"bytes": size, "chunks": mf.chunk_count(size), "broker": args.broker, "repeat": args.repeat,
            "seconds": best, "mib_s": {k: round(mib / v, 2) for k, v in best.items()},
            "https_vs_mqtt": round(best["mqtt"] / best["https"], 2),
            "machine": {"cpu": _cpu(), "cpus": os.cpu_count(), "python": platform.python_version()}}


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")][0]
    except (OSError, IndexError):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-kib", type=int, default=1700,
                        help="the release's size in KiB (at most 1792: what a signed manifest describes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if not 0 < args.size_kib * 1024 <= mf.SIZE_MAX:
        parser.error("--size-kib must be 1..%d" % (mf.SIZE_MAX // 1024))
    result = asyncio.run(bench(args))
    s, r = result["seconds"], result["mib_s"]
    print("%d KiB (%d chunks), %s broker, best of %d: MQTT %.2f s (%.2f MiB/s), HTTPS %.2f s (%.2f MiB/s), "
          "board alone %.2f s (%.2f MiB/s); HTTPS is %.2fx MQTT's speed"
          % (result["bytes"] // 1024, result["chunks"], result["broker"], result["repeat"], s["mqtt"], r["mqtt"],
             s["https"], r["https"], s["local"], r["local"], result["https_vs_mqtt"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
