"""`tether demo`: the reference cloud and a fleet of virtual devices in one
process, with a network cut and a broker restart part-way, then a drain,
cloud-side verification, summary.json and report.html."""

import asyncio
import json
import logging
import os
import time

from agent import telemetry
from cloud.service import Cloud
from simulator import hostile, identity_drill, live
from simulator.fleet import Fleet
from simulator.report import render
from simulator.verify import summarize


def fleet_config(i):
    """Every fourth device has a small queue, so the network cut overflows it
    and it must declare its drops; the rest hold the whole outage."""
    if i % 4 == 3:
        return telemetry.Config(capacity=4)
    return telemetry.Config(capacity=512)


async def run_demo(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cloud_dir = os.path.join(out, "cloud")
    if os.path.exists(os.path.join(cloud_dir, "tether.db")):
        os.remove(os.path.join(cloud_dir, "tether.db"))  # a fresh store for a fresh run
    cloud = Cloud(cloud_dir, broker=args.broker)
    view = live.Progress(quiet=args.quiet)
    view.say("starting the reference cloud (%s broker, mTLS) on port %d" % (cloud.kind, cloud.port))
    await cloud.start()
    try:
        t = time.monotonic()
        creds = cloud.issue_devices(args.devices)
        view.say("issued %d device certificates in %.1f s" % (len(creds), time.monotonic() - t))
        fleet = Fleet(creds, cloud.ca_path, cloud.host, cloud.port, seed=args.seed,
                      config=fleet_config, progress=view.update)
        d = args.duration
        cut_at, cut_for = 0.3 * d, max(4.0, 0.15 * d)
        restart_at = 0.65 * d
        marks = [(cut_at, cut_at + cut_for, "network cut"), (restart_at, restart_at + 1.5, "broker restart")]

        def cut():
            view.say("fault: cutting the network of every device for %.0f s" % cut_for)
            fleet.cut_network()

        def restore():
            view.say("fault cleared: network back")
            fleet.restore_network()

        async def restart():
            view.say("fault: restarting the broker")
            await cloud.restart_broker(down_s=1.5)
            view.say("broker back")

        fleet.start()
        attacks = hostile.Attacks(cloud, creds[0])
        drill = identity_drill.RevocationDrill(cloud)
        events = [(cut_at, cut), (cut_at + cut_for, restore), (restart_at, restart),
                  (0.5 * d, attacks.run), (0.55 * d, drill.run)]
        await fleet.run_for(d, events)
        view.say("sampling done; draining every device queue")
        drained = await fleet.drain(timeout_s=60)
        duration = fleet.elapsed_s()
        await cloud.ingest.stats()  # commits anything pending
        summary = summarize(fleet, cloud.store, duration, drained,
                            extra_checks=attacks.checks(cloud) + drill.checks())
        summary["identity"] = dict(drill.section(), **attacks.identity_counts())
        tried, refused = drill.attacks()
        summary["identity"]["attacks_tried"] += tried
        summary["identity"]["attacks_refused"] += refused
        summary["faults"] = {"network_cut_s": cut_for, "network_cut_at_s": round(cut_at, 1),
                             "broker_restart_at_s": round(restart_at, 1)}
        summary["broker"] = cloud.kind
        summary["seed"] = args.seed
        await fleet.close()
    finally:
        view.stop()
        await cloud.stop()
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(render(summary, fleet.metrics.timeline, marks, title="tether demo"))
    return summary


def main(args):
    # The demo attacks its own cloud on purpose: the refusals go to a log file
    # (and into summary.json as checks), not over the live progress.
    os.makedirs(args.out, exist_ok=True)
    handler = logging.FileHandler(os.path.join(args.out, "cloud.log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    summary = asyncio.run(run_demo(args))
    live.verdict(summary, args.out)
    return 0 if all(c["passed"] for c in summary["checks"]) else 1
