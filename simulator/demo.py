"""`tether demo`: the reference cloud and a fleet of virtual devices in one
process. The fleet enrolls by claim (simulator/provision_drill.py), runs
telemetry through a network cut and a broker restart while identities are
rotated, quarantined, revoked and attacked (hostile.py, identity_drill.py),
then takes a staged firmware rollout (ota_drill.py); console sessions run
on devices that upload their audit chains (console_fleet.py). Then a drain,
cloud-side verification, summary.json and report.html."""

import asyncio
import json
import logging
import os

from agent import telemetry
from cloud.service import Cloud
from simulator import console_fleet, hostile, identity_drill, live, ota_drill, provision_drill
from simulator.fleet import Fleet
from simulator.report import render
from simulator.verify import Check, summarize


def fleet_config(i):
    """Every fourth device has a small queue, so the network cut overflows it
    and it must declare its drops; the rest hold the whole outage. The small
    queue's in-flight window stays below its capacity: a queue whose every
    record is in flight has nothing it may drop, and a slow PUBACK would then
    make it refuse a sample."""
    if i % 4 == 3:
        return telemetry.Config(capacity=4, inflight_max=2)
    return telemetry.Config(capacity=512)


async def run_demo(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cloud = fresh_cloud(os.path.join(out, "cloud"), args.broker)
    view = live.Progress(quiet=args.quiet)
    view.say("starting the reference cloud (%s broker, mTLS) on ports %d (devices) and %d (provisioning)"
             % (cloud.kind, cloud.port, cloud.prov_port))
    await cloud.start()
    try:
        d = args.duration
        # Every tenth device gets a certificate short enough to be rotated
        # during the run (at two thirds of its lifetime, after the broker
        # restart; it expires after the run); every tenth waits for operator
        # approval before it is enrolled. Runs too short for that rotate none.
        short_cert_s = int(1.2 * d) if d > 12 else None
        provisioning = provision_drill.ProvisionDrill(cloud, args.devices, seed=args.seed,
                                                      short_cert_s=short_cert_s)
        creds = await provisioning.run()
        view.say("enrolled %d devices by claim in %.1f s (each made its own key; %d after operator approval)"
                 % (len(creds), provisioning.seconds, provisioning.approved))
        fleet = Fleet(creds, cloud.ca_path, cloud.host, cloud.port, seed=args.seed,
                      config=fleet_config, progress=view.update)
        fleet.claim = (cloud.endpoints(), provisioning.claim)  # an expired identity recovers by claim
        faults, marks, fault_summary = fault_events(cloud, fleet, view, d)

        # Every device runs the update machine on its flash (simulator/ota_device.py).
        firmware = ota_drill.OtaDrill(cloud, fleet, seed=args.seed, say=view.say)
        first_certs = {dev.identity: dev.id_core.record["a"]["cert"] for dev in fleet.devices}
        quarantine = QuarantineDrill(cloud, creds[2:4])
        victim = (creds[0].tenant, creds[0].device)
        fleet.start()
        attacks = hostile.Attacks(cloud, creds[0])
        drill = identity_drill.RevocationDrill(cloud)
        events = faults + [(0.45 * d, quarantine.run), (0.5 * d, attacks.run), (0.55 * d, drill.run),
                           (0.6 * d, lambda: provisioning.attack(victim))]
        await fleet.run_for(d, events)
        view.say("telemetry phases done; firmware updates through the broker")
        await firmware.run()
        marks.append((d, fleet.elapsed_s(), "firmware updates"))
        view.say("sampling done; draining every device queue")
        drained = await fleet.drain(timeout_s=60)
        duration = fleet.elapsed_s()
        await cloud.ingest.stats()  # commits anything pending
        rotation = rotation_check(cloud, fleet, first_certs, short_cert_s, duration)
        summary = summarize(fleet, cloud.store, duration, drained,
                            extra_checks=attacks.checks(cloud) + drill.checks() + provisioning.checks(victim)
                            + quarantine.checks() + [rotation] + firmware.checks())
        # Field console: technician sessions with signed grants on devices that
        # upload their audit chains to the cloud over the broker, and the attacks.
        view.say("field console: sessions, attacks, audit chains uploaded and checked")
        console, console_checks = await console_fleet.run_console_fleet(cloud, devices=5, seed=args.seed)
        summary["checks"] += [c.as_dict() for c in console_checks]
        summary["identity"] = identity_section(cloud, drill, attacks, provisioning, victim)
        summary["console"] = console
        summary.update(firmware.sections())
        summary["faults"] = fault_summary
        summary["broker"] = cloud.kind
        summary["seed"] = args.seed
        await fleet.close()
    finally:
        view.stop()
        await cloud.stop()
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(render(summary, fleet.metrics.timeline, marks, title="tether demo",
                       versions=firmware.series(), version_marks=firmware.marks))
    return summary


def fresh_cloud(cloud_dir, broker):
    """The cloud in OUT/cloud: its CAs and keys are kept from run to run, its
    records (every SQLite database there: telemetry, rollouts, support
    grants and audit logs) are not, so a second demo starts as the first."""
    if os.path.isdir(cloud_dir):
        for name in os.listdir(cloud_dir):
            if name.endswith((".db", ".db-wal", ".db-shm", ".db-journal")):
                os.remove(os.path.join(cloud_dir, name))
    return Cloud(cloud_dir, broker=broker)


def fault_events(cloud, fleet, view, d):
    """A network cut of every device and a broker restart, as run_for events
    -> (events, report marks, the summary's "faults")."""
    cut_at, cut_for = 0.3 * d, max(4.0, 0.15 * d)
    restart_at = 0.65 * d

    def cut():
        view.say("fault: cutting the network of every device for %.0f s" % cut_for)
        fleet.cut_network()
        # On a timer, not a run_for event: those are awaited in turn, and a slow
        # one (an attack) would keep the network down past its time.
        fleet.loop.call_later(cut_for, restore)

    def restore():
        view.say("fault cleared: network back")
        fleet.restore_network()

    async def restart():
        view.say("fault: restarting the broker")
        await cloud.restart_broker(down_s=1.5)
        view.say("broker back")

    marks = [(cut_at, cut_at + cut_for, "network cut"), (restart_at, restart_at + 1.5, "broker restart")]
    summary = {"network_cut_s": cut_for, "network_cut_at_s": round(cut_at, 1),
               "broker_restart_at_s": round(restart_at, 1)}
    return [(cut_at, cut), (restart_at, restart)], marks, summary


def identity_section(cloud, drill, attacks, provisioning, victim):
    counts = cloud.provisioning.counts()
    section = dict({"provisioned": counts["provisioned"], "rotated": counts["rotated"],
                    "quarantined": len(cloud.registry.quarantined())},
                   **drill.section(), **attacks.identity_counts(cloud))
    for tried, refused in (drill.attacks(), provisioning.attack_counts(victim)):
        section["attacks_tried"] += tried
        section["attacks_refused"] += refused
    return section


class QuarantineDrill:
    """Quarantines a few running devices: they stay connected, their later
    telemetry is flagged and kept out of normal reads."""

    def __init__(self, cloud, creds):
        self.cloud = cloud
        self.identities = ["%s/%s" % (c.tenant, c.device) for c in creds]

    async def run(self):
        for identity in self.identities:
            self.cloud.registry.quarantine(identity, "demo: anomalous readings under investigation",
                                           "demo-operator")

    def checks(self):
        flagged = {}
        for identity in self.identities:
            tenant, device = identity.split("/")
            flagged[identity] = len(self.cloud.store.tenant(tenant).flagged(device=device))
        ok = bool(flagged) and all(n > 0 for n in flagged.values())
        return [Check("quarantined devices stayed connected, their telemetry flagged and kept apart", ok,
                      ", ".join("%s: %d flagged" % kv for kv in sorted(flagged.items())))]


def rotation_check(cloud, fleet, first_certs, cert_s, duration_s):
    """Devices with a short certificate must have rotated (a new key and
    certificate in use, the old certificate retired) if the run lasted past
    two thirds of its lifetime."""
    if cert_s is None:
        return Check("short-lived certificates rotated before expiry, old ones retired", True,
                     "run too short to rotate a certificate during it")
    due = [d for d in fleet.devices if _lifetime_s(d) <= cert_s and cert_s * 2 / 3 < duration_s - 2]
    rotated = [d for d in due if d.id_core.record["a"]["cert"] != first_certs[d.identity]]
    retired = cloud.provisioning.counts()["rotated"]
    return Check("short-lived certificates rotated before expiry, old ones retired",
                 len(rotated) == len(due) and retired >= len(due),
                 "%d of %d due rotated; %d rotations confirmed (old certificate on the CRL)"
                 % (len(rotated), len(due), retired))


def _lifetime_s(dev):
    a = dev.id_core.record["a"]
    return (a["exp"] - a["iss"]) / 1000


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
