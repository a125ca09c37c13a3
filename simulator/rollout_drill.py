"""The rollout drill: a fleet in one process, the real device update machine
on every virtual device, driven by the real rollout engine with a
simulated clock. No broker: the "transport" is this loop handing the
engine's Offer actions to devices and their Report actions back.

Each virtual device is agent.updater.Updater over board.slots.SimSlots on
a board.sim.SimFlash: it verifies the real signed bundle (k of n under the
root key), downloads chunk by chunk into the inactive slot, reboots through
the sim bootloader, runs its trial and confirms or rolls back by itself.
What the new image then does comes from its release's fault profile
(simulator/firmware_faults.py): crash on boot, fail the health check, or
hang silent until the watchdog.

    result = run(load_scenario("simulator/scenarios/bad-then-good.json"), db_path)
    result["summary"]  -> {"bad_release_halted", "bad_release_fleet_touched_pct",
                           "good_release_coverage_pct", "bricked", "halt_incidents"}
    result["series"]   -> [{"t_s", "cohorts": {cohort: {version: devices}}}]

The drill expects the scenario's rollouts in order: the first must halt
(it is the bad one), the last must reach every device.
"""

import hashlib
import os
import random

from agent import updater as up
from board.sim import SimFlash
from board.slots import BOOT_STATE, SLOT_NAMES, SimSlots
from cloud import rollout_plan as rp
from cloud.rollout import Engine, Policy
from cloud.rollout_actions import Offer
from cloud.rollout_release import release_id
from simulator import firmware_faults as ff

START_MS = 1_800_000_000_000        # 2027-01-15 08:00 UTC
STEP_MS = 10_000                    # while anything moves
IDLE_STEP_MS = 60_000               # while everything waits (soak, window)
SIM_MS_MAX = 14 * 86_400_000        # a drill that has not finished in two simulated weeks stops
SAMPLE_MS = 300_000
CHUNKS_PER_STEP = 1                 # one 4 KiB chunk per device per step: downloads take time
ACK_EVERY_MS = 10_000               # a healthy image gets one telemetry record acked this often
PEOPLE = ("release-manager", "qa-lead", "sre-oncall")


class DrillDevice:
    """One virtual device: flash, slots, bootloader and the real updater."""

    def __init__(self, name, tenant, site, world):
        self.name, self.tenant, self.site, self.world = name, tenant, site, world
        flash = SimFlash(rng=random.Random(hashlib.sha256(name.encode()).digest()))
        flash.files[SLOT_NAMES[0]] = bytearray(world.images[world.factory])
        flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=world.factory_sv, ksv=1).encode())
        self.slots = SimSlots(flash)
        self.updater = None
        self.version = world.factory
        self.hung_until_ms = None
        self.fate = ff.OK
        self.acks = 0
        self.next_ack_ms = None
        self.serving = None           # release id whose chunks the transport serves
        self.reboot = False
        self.requests = []
        self.bricked = False
        self.stuck = False            # left mid-download by a withdrawn offer (never, see World.deliver)

    # -- power and boot -------------------------------------------------------

    def power_on(self, now_ms):
        for _ in range(3):            # a crash on boot costs one boot; the bootloader rolls back on the next
            slot, blob = self.slots.boot()
            version = self.world.version_of(self.slots.read_slot(slot))
            if version is None:
                self.bricked = True
                return
            state = up.decode_boot_state(blob)
            trial = state.phase == up.TRIAL and slot == state.target
            self.fate = self.world.fate(version, self.name) if trial else ff.OK
            if self.fate == ff.CRASH_ON_BOOT:
                continue
            self.version = version
            if self.fate == ff.SILENT:
                self.hung_until_ms = now_ms + self.world.watchdog_s(version) * 1000
                self.updater = None
                return
            self.hung_until_ms = None
            self.acks, self.next_ack_ms = 0, now_ms + ACK_EVERY_MS
            self.updater = up.Updater(self.world.config)
            self.world.observe(self, now_ms)
            self.run(self.updater.handle(up.Booted(slot, blob)), now_ms)
            return
        raise AssertionError("%s: the bootloader did not roll back after a crash" % self.name)

    # -- the driver: actions against the slots, reports to the cloud ---------------

    def run(self, actions, now_ms):
        for action in actions:
            if isinstance(action, up.WriteSlot):
                self.slots.write_slot(action.slot, action.offset, action.data)
            elif isinstance(action, up.WriteBootState):
                self.slots.write_boot_state(action.data)
            elif isinstance(action, up.Report):
                self.world.report(self, action, now_ms)
            elif isinstance(action, up.Reboot):
                self.reboot = True
                return
            elif isinstance(action, up.StepLater):   # nothing else to serve here: at once
                self.run(self.updater.handle(up.Step()), now_ms)
            else:                      # RequestChunk, ReadSlot (answered by serve())
                self.requests.append(action)

    def serve(self, now_ms, chunks_max=CHUNKS_PER_STEP):
        """Answer requests: slot reads at once (local flash), at most chunks_max
        chunks (the network), reboots through the bootloader."""
        served = 0
        for _ in range(10000):
            if self.reboot:
                self.reboot = False
                self.power_on(now_ms)
            if not self.requests or self.updater is None:
                return
            a = self.requests[0]
            if isinstance(a, up.RequestChunk):
                if served >= chunks_max:
                    return
                offer = self.world.engine.offer_for(self.name)   # the transport's contract
                if offer is None or offer.release != self.serving:
                    self.requests = []                           # withdrawn: the device waits
                    self.stuck = True
                    return
                served += 1
                data = self.world.payloads[self.serving]
                event = up.Chunk(a.index, data[a.index * 4096:(a.index + 1) * 4096])
            else:
                event = up.SlotRead(a.offset, self.slots.read_slot(a.slot, a.offset, a.length))
            self.requests.pop(0)
            self.run(self.updater.handle(event), now_ms)

    def offer(self, release, now_ms):
        if self.updater is None:                  # hung: the offer is lost
            return
        self.serving = release
        self.requests = []
        self.stuck = False
        self.run(self.updater.handle(up.Offer(self.world.bundles[release], now_ms)), now_ms)

    def step(self, now_ms):
        """Time passes for this device; True while it has something going on."""
        if self.hung_until_ms is not None:
            if now_ms >= self.hung_until_ms:      # the watchdog resets it
                self.power_on(now_ms)
                self.serve(now_ms)
            return True
        if self.requests or self.reboot:
            self.serve(now_ms)
            return True
        if self.updater is None or self.updater.state != up.TRIAL:
            return False
        if self.fate == ff.OK and now_ms >= self.next_ack_ms:
            self.acks += 1
            self.next_ack_ms = now_ms + ACK_EVERY_MS
            self.run(self.updater.handle(up.Healthy(self.acks, now_ms)), now_ms)
        else:
            self.run(self.updater.handle(up.Tick(now_ms)), now_ms)
        self.serve(now_ms)
        return True

    def running_version(self):
        state = up.decode_boot_state(self.slots.read_boot_state())
        return self.world.version_of(self.slots.read_slot(state.active))


class World:
    """The scenario's releases (really built and signed), faults, and the engine."""

    def __init__(self, scenario, engine, log):
        self.scenario, self.engine, self.log = scenario, engine, log
        fleet = scenario["fleet"]
        self.hw_class = fleet["hw_class"]
        self.factory = fleet["factory"]
        self.images, self.bundles, self.payloads, self.profiles, self.by_hash = {}, {}, {}, {}, {}
        for r in scenario["releases"]:
            bundle, payload = ff.build_release(self.hw_class, r["version"], r["security_version"])
            rid = release_id(self.hw_class, r["version"])
            self.images[r["version"]] = payload
            self.bundles[rid], self.payloads[rid] = bundle, payload
            self.profiles[r["version"]] = r["faults"]
            self.by_hash[hashlib.sha256(payload).digest()] = r["version"]
            if r["version"] == self.factory:
                self.factory_sv = r["security_version"]
        self.config = up.Config(self.hw_class, ff.root_public_key(), k=2, trial_acks_min=3, trial_ms_max=120000)
        self.seed = scenario["seed"]
        self.reports = 0

    def version_of(self, image):
        return self.by_hash.get(hashlib.sha256(image).digest())

    def fate(self, version, device):
        return self.profiles[version].fate(self.seed, version, device)

    def watchdog_s(self, version):
        return self.profiles[version].watchdog_s

    def observe(self, device, now_ms):
        self.engine.observe(device.name, device.tenant, device.site, self.hw_class, device.version, now_ms)

    def report(self, device, report, now_ms):
        self.reports += 1
        for action in self.engine.report(device.name, report.status, report.reason, report.seq, now_ms):
            self.deliver(action, now_ms)

    def deliver(self, action, now_ms):
        """The transport. An offer goes out only while the engine still stands by it
        (Engine.offer_for): a halt during this same step withdraws the rest. Chunks
        are served the same way (DrillDevice.serve); the engine keeps naming a
        download already in progress after a halt, because agent.updater cannot
        abandon one, so it finishes and the device's own trial, then the rollback
        campaign, deal with it."""
        device = self.devices[action.device]
        if isinstance(action, Offer) and self.engine.offer_for(device.name) == action:
            device.offer(action.release, now_ms)
            self.busy.add(device.name)


# ---------------------------------------------------------------- the run

def run(scenario, db_path, log=None, policy=None, restart_every_steps=None):
    """Run the scenario's rollouts in order; the result dict (summary, series, records).
    restart_every_steps: close the engine and open the database again that
    often (a cloud restart) to show a rollout resumes where it was."""
    log = log or (lambda text: None)
    world = World(scenario, Engine(db_path, policy or Policy()), log)
    world.restart = (lambda: Engine(db_path, policy or Policy())), restart_every_steps
    try:
        return _run(scenario, world, log)
    finally:
        world.engine.close()


def _run(scenario, world, log):
    engine = world.engine
    now = START_MS
    engine.set_trust(ff.root_public_key(), 2, [world.hw_class], PEOPLE[0], now)
    for rid in world.bundles:
        engine.add_release(world.bundles[rid], world.payloads[rid], PEOPLE[0], now)
    for tenant, window in sorted(scenario["windows"].items()):
        engine.set_window(tenant, window, PEOPLE[2], now)
    world.devices, world.busy = _fleet(scenario["fleet"], world, now), set()
    samples, rollouts, left = [], [], {}
    _sample(world, now, samples)
    for spec in scenario["rollouts"]:
        rid = engine.create(release_id(world.hw_class, spec["release"]), spec["plan"], PEOPLE[0],
                            spec.get("reason", "drill"), now)
        engine.approve(rid, PEOPLE[1], now, "drill")
        engine.approve(rid, PEOPLE[2], now, "drill")
        rollouts.append(rid)
        log("%s: %s requested and approved" % (rid, spec["release"]))
        now = _drive(world, rid, now, samples)
        engine = world.engine
        version = spec["release"]
        left[rid] = sorted(n for n, d in world.devices.items() if d.running_version() == version)
        log("%s: %s after %.1f h" % (rid, engine.status(rid)["state"], (now - START_MS) / 3.6e6))
    return _result(world, rollouts, samples, now, left)


def _fleet(fleet, world, now):
    devices = {}
    tenants = fleet["tenants"]
    for i in range(fleet["devices"]):
        tenant = tenants[i % len(tenants)]
        name = "%s/dev-%05d" % (tenant, i)
        d = DrillDevice(name, tenant, "%s-site-%d" % (tenant, (i // len(tenants)) % fleet["sites_per_tenant"]), world)
        devices[name] = d
        d.power_on(now)
    return devices


def _drive(world, rid, now, samples):
    """Step the clock until rid (and any rollback campaign of it) is over and the fleet is quiet."""
    end = now + SIM_MS_MAX
    reopen, every = world.restart
    steps = 0
    while now < end:
        steps += 1
        if every and steps % every == 0:          # the cloud restarts: same file, fresh process state
            world.engine.close()
            world.engine = reopen()
        engine = world.engine
        for action in engine.tick(now):
            world.deliver(action, now)
        for name in sorted(world.busy):
            if not world.devices[name].step(now):
                world.busy.discard(name)
        _sample(world, now, samples)
        if _over(engine, rid) and not world.busy:
            _sample(world, now, samples)
            return now
        now += STEP_MS if world.busy else IDLE_STEP_MS
    return now


def _sample(world, now, samples):
    """Every device's running version (or "silent"), when any changed or SAMPLE_MS passed."""
    versions = {n: d.version if d.hung_until_ms is None else "silent" for n, d in world.devices.items()}
    if not samples or versions != samples[-1][1] or now - samples[-1][0] >= SAMPLE_MS:
        samples.append((now, versions))


def _over(engine, rid):
    open_states = (rp.AWAITING_APPROVAL, rp.RUNNING, rp.PAUSED)
    return all(r["state"] not in open_states for r in engine.rollouts()
               if r["id"] == rid or r["parent"] == rid)


def _result(world, rollouts, samples, now, left):
    engine = world.engine
    fleet = len(world.devices)
    bad, good = rollouts[0], rollouts[-1]
    good_version = engine.release(engine.status(good)["release"])["version"]
    touched = [m for m in engine.members(bad) if m["offered_ms"] is not None]
    running = {n: d.running_version() for n, d in world.devices.items()}
    summary = {
        "bad_release_halted": engine.status(bad)["state"] == rp.HALTED,
        "bad_release_fleet_touched_pct": round(100.0 * len(touched) / fleet, 2),
        "good_release_coverage_pct": round(100.0 * sum(v == good_version for v in running.values()) / fleet, 2),
        "bricked": sum(1 for d in world.devices.values() if d.bricked or running[d.name] is None),
        "halt_incidents": sum(len(engine.incidents(r)) for r in rollouts),
    }
    extra = {"bad_release_devices_left_on_it": len(left[bad]),
             "bad_release_rolled_back_by_device": sum(m["state"] == rp.ROLLED_BACK for m in touched),
             "bad_release_silent": sum(m["state"] == rp.SILENT for m in touched),
             "stuck_downloading": sum(d.stuck for d in world.devices.values()),
             "bad_release_confirmed_then_campaign": len(engine.members(bad + "-rollback"))
             if any(r["id"] == bad + "-rollback" for r in engine.rollouts()) else 0}
    cohort = {m["device"]: engine.status(good)["plan"]["stages"][m["stage"]]["name"] for m in engine.members(good)}
    series = []
    for t, versions in samples:
        row = {}
        for name, version in versions.items():
            bucket = row.setdefault(cohort.get(name, "not in rollout"), {})
            bucket[version] = bucket.get(version, 0) + 1
        series.append({"t_s": (t - START_MS) // 1000, "cohorts": row})
    return {"summary": summary, "detail": extra, "series": series, "rollouts": rollouts, "sim_hours": (now - START_MS) / 3.6e6,
            "reports": world.reports,
            "exports": {r: engine.export(r) for r in rollouts},
            "alerts": engine.alerts()}


def main(argv=None):
    import argparse
    import json
    import tempfile
    p = argparse.ArgumentParser(description="Run a rollout drill scenario in process.")
    p.add_argument("scenario", nargs="?", default=os.path.join(ff.HERE, "scenarios", "bad-then-good.json"))
    p.add_argument("--db", help="SQLite file to keep (default: a temporary one)")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)
    scenario = ff.load_scenario(args.scenario)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(scenario, args.db or os.path.join(tmp, "rollouts.db"), log=print)
    print(json.dumps({"summary": result["summary"], "detail": result["detail"]}, indent=2, sort_keys=True))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
