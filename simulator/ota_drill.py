"""The firmware part of `tether demo`: updates through the real broker.

Every virtual device of the fleet gets an OtaDevice (simulator/ota_device.py)
before it boots: the real update machine over the sim board's A/B slots on
its own flash, speaking to the cloud's OTA service (cloud/ota_service.py)
over its own mTLS connection. Then, after the telemetry phases:

1. attacks offered through the real transport, each on its own device:
   a tampered chunk, a tampered page of chunk hashes (the good release's
   manifest is paged), a downgrade, the wrong hardware class, an expired
   manifest, an unknown signer. Each must be rejected by the device,
   reported with its reason, and leave the device on its image;
2. a bad release (a share of devices crash on boot) in a staged rollout
   that must halt in its canary, with every device that took it back on
   the factory version (by its own rollback or the rollback campaign);
3. a good release (a paged manifest: each device fetches its page of chunk
   hashes before the chunks) that reaches every device, with a network cut while
   downloads are in flight: they resume from their cursor;
4. a power cut at every write of an update, in process on the sim board
   (SimFlash), healthy and crashing images: 0 bricks.

The operator's side (trust, releases, rollout requests and approvals) is
an Engine on the same DATA/rollouts.db, as `tether cloud rollout` would be:
the service picks the rollouts up on its next tick.
"""

import asyncio
import os
import random
import time

from agent import cbor
from agent import manifest as mf
from agent import updater as up
from board.sim import PowerCut, SimFlash
from board.slots import BOOT_STATE, SLOT_NAMES, SimSlots
from cloud import firmware
from cloud import rollout_plan as rp
from agent.ota_wire import encode
from cloud.rollout import Engine, Policy
from cloud.rollout_release import release_id
from simulator import firmware_faults as ff
from simulator.ota_device import Firmware, OtaDevice
from simulator.verify import Check

HW = "sim-v1"
FACTORY, BAD, GOOD = "1.0.0", "1.1.0", "1.2.0"
BAD_CRASH_SHARE = 0.6
IMAGE_BYTES = 5 * mf.CHUNK_BYTES - 700     # five chunks, the last one short
ATTACKS = 6                                # firmware attacks, one victim each
TRIAL_ACKS_MIN = 3
TRIAL_MS_MAX = 20000
SILENCE_S = 40                             # > the trial, plus a reconnect
REACH_S = 60
SOAK_S = 1
CANARY_PCT = 4                             # the bad release may touch at most 5%
TOUCHED_PCT_MAX = 5.0
PHASE_S_MAX = 90                           # a rollout phase that has not finished by then fails its checks
SAMPLE_S = 0.5
CUT_S = 1.0
PEOPLE = ("release-manager", "qa-lead", "sre-oncall")


def build_firmware(seed):
    releases = {}
    bundles = {}
    for version, faults in ((FACTORY, {}), (BAD, {ff.CRASH_ON_BOOT: BAD_CRASH_SHARE}), (GOOD, {})):
        # The good release's manifest is paged (as the tool makes any image
        # over 512 KiB): the fleet fetches a page of chunk hashes before its
        # chunks, and the drill runs both manifest forms.
        bundle, payload = ff.build_release(HW, version, 1, size=IMAGE_BYTES, pages=version == GOOD)
        releases[version] = (payload, 1, ff.FaultProfile.from_dict(faults))
        bundles[version] = bundle
    config = up.Config(HW, ff.root_public_key(), k=2, trial_acks_min=TRIAL_ACKS_MIN, trial_ms_max=TRIAL_MS_MAX)
    return Firmware(HW, FACTORY, releases, config, seed), bundles


def site_of(identity):
    """The site the provisioning drill bound the device to (simulator/provision_drill.py)."""
    digits = identity.rsplit("-", 1)[-1]
    return "site-%d" % (int(digits) % 4) if digits.isdigit() else "site-0"


class OtaDrill:
    def __init__(self, cloud, fleet, seed=1, say=None):
        self.cloud, self.fleet, self.seed = cloud, fleet, seed
        self.say = say or (lambda text: None)
        self.firmware, self.bundles = build_firmware(seed)
        self.firmware.on_chunk_written = self._chunk_written
        self.devices = {}
        for dev in fleet.devices:
            dev.ota = OtaDevice(dev, self.firmware, site_of(dev.identity))
            self.devices[dev.identity] = dev.ota
        self.samples = []           # (t_s, {identity: version})
        self.marks = []             # (start_s, end_s, label) on the versions chart
        self.attacks = []
        self.rollouts = {}
        self.phase_ok = {}
        self.cut = None             # (t_s, devices downloading at the cut)
        self.arm_cut = False
        self.sweep = {"points": 0, "runs": 0, "bricked": 0}
        self.t0 = None
        self.seconds = 0.0

    # -- the run --------------------------------------------------------------------

    async def run(self):
        self.t0 = time.monotonic()
        service = self.cloud.ota_service
        engine = Engine(os.path.join(self.cloud.data_dir, "rollouts.db"), Policy())
        try:
            now = _ms()
            engine.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now)
            for version in (FACTORY, BAD, GOOD):
                engine.add_release(self.bundles[version], self.firmware.releases[version][0], PEOPLE[0], now)
            await self._wait(lambda: self._all_online(engine), 45, "every device online")
            self._sample()
            self.say("firmware: %d devices said hello with their version; %d attacks offered through the broker"
                     % (len(engine.devices()), ATTACKS))
            await self._attacks(service)
            self.say("firmware: %d of %d attacks refused by the devices" % (
                sum(a["refused"] for a in self.attacks), len(self.attacks)))
            self.say("firmware: rollout of %s (crashes on boot on %d%% of devices)" % (BAD, BAD_CRASH_SHARE * 100))
            self.rollouts["bad"] = await self._rollout(engine, BAD, True)
            self.after_bad = {n: d.running_version() for n, d in self.devices.items()}
            self.say("firmware: rollout of %s %s" % (BAD, engine.status(self.rollouts["bad"])["state"]))
            self.arm_cut = True
            self.say("firmware: rollout of %s to the whole fleet (network cut during downloads)" % GOOD)
            self.rollouts["good"] = await self._rollout(engine, GOOD, False)
            self.arm_cut = False
            self._sample()
            self.result = self._result(engine)
        finally:
            engine.close()
        self.sweep = power_cut_sweep(self.firmware, self.bundles[GOOD])
        self.seconds = time.monotonic() - self.t0
        self.say("firmware phase: %.1f s (%s)" % (self.seconds, ", ".join(
            "%s %.1f-%.1f s" % (label, a, b) for a, b, label in self.marks)))
        return self.result

    def _waiting(self, device, ref, state):
        """The device's download of ref waits for a chunk (DOWNLOADING) or a page (PAGING)."""
        u = self.devices[device].updater
        return u is not None and u.state == state and u.boot.ref == ref

    async def _wait(self, predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                self.say("firmware: gave up waiting for %s after %d s" % (what, timeout_s))
                if what == "every device online":
                    self.say("not online: %s" % ", ".join(self.not_online[:5]))
                return False
            self._sample()
            self.fleet.sample_timeline()
            self.fleet.progress(self.fleet, "run")
            await asyncio.sleep(0.1)
        return True

    def _all_online(self, engine):
        """Every device connected, and its hello since then seen by the service
        (so its subscription to its update topic, made before, is in place)."""
        self.not_online = [n for n, d in self.devices.items()
                           if not (d.dev.link is not None and d.online and d.welcomed)]
        return not self.not_online

    def _sample(self):
        t = round(time.monotonic() - self.t0, 2)
        versions = {name: ("silent" if d.hung() else d.version) for name, d in self.devices.items()}
        if not self.samples or versions != self.samples[-1][1] or t - self.samples[-1][0] >= SAMPLE_S:
            self.samples.append((t, versions))

    def _t(self):
        return round(time.monotonic() - self.t0, 2)

    # -- attacks ---------------------------------------------------------------------

    async def _attacks(self, service):
        victims = [d for d in sorted(self.devices) if self.devices[d].state() in (up.IDLE,)][-ATTACKS:]
        now_s = int(time.time())
        good_bundle, good_payload = self.bundles[GOOD], self.firmware.releases[GOOD][0]
        tampered = bytes([good_payload[0] ^ 1]) + good_payload[1:mf.CHUNK_BYTES]
        page = firmware.chunk_table(good_payload)[:mf.PAGE_BYTES]     # the good release is paged
        forged_page = bytes([page[0] ^ 1]) + page[1:]
        plans = [
            # The genuine page first, then a chunk with one bit flipped.
            ("tampered chunk", "tampered_chunk", good_bundle, [("page", 0, page), ("chunk", 0, tampered)]),
            ("tampered page", "tampered_page", good_bundle, [("page", 0, forged_page)]),
            ("downgrade", "downgrade", ff.build_release(HW, "0.9.0", 0, size=IMAGE_BYTES)[0], []),
            ("wrong hardware class", "wrong_hw_class", ff.build_release("sim-v9", GOOD, 1, size=IMAGE_BYTES)[0], []),
            ("expired manifest", "expired",
             ff.build_release(HW, "1.2.9", 1, size=IMAGE_BYTES, expires_s=now_s - 3600)[0], []),
            ("unknown signer", "unknown_signer", unknown_signer_bundle(), []),
        ]
        start = self._t()
        for (name, code, bundle, extra), victim in zip(plans, victims):
            ref = "attack-%s" % code.replace("_", "-")
            before = self.devices[victim].running_version()
            service.push(victim, encode("offer", ref=ref, bundle=bundle))
            for op, index, data in extra:
                # injected as the answer to the device's request, once it verified the offer
                want = up.PAGING if op == "page" else up.DOWNLOADING
                await self._wait(lambda v=victim, r=ref, w=want: self._waiting(v, r, w), 20,
                                 "the attacked download")
                service.push(victim, encode(op, ref=ref, i=index, data=data))
            self.attacks.append({"attack": name, "device": victim, "ref": ref, "expect": code, "before": before})
        core = service.core

        def reported(a):
            return [r for r in list(core.reports) if r["device"] == a["device"] and r["ref"] == a["ref"]
                    and r["status"] == rp.REJECTED]
        await self._wait(lambda: all(reported(a) for a in self.attacks), 20, "attack reports")
        for a in self.attacks:
            got = reported(a)
            d = self.devices[a["device"]]
            a["reason"] = got[-1]["reason"] if got else None
            a["after"] = d.running_version()
            a["state"] = d.state()
            a["refused"] = bool(got) and a["reason"] == a["expect"] and a["after"] == a["before"] \
                and d.state() == up.REJECTED
        self.marks.append((start, self._t(), "attacks"))

    # -- rollouts --------------------------------------------------------------------

    async def _rollout(self, engine, version, bad):
        fleet_n = len(self.devices)
        canary = max(1, fleet_n * CANARY_PCT // 100)
        plan = {"silence_s": SILENCE_S, "reach_s": REACH_S,
                "stages": [{"name": "canary", "count": canary, "soak_s": SOAK_S, "failure_pct": 10},
                           {"name": "rest", "percent": 100, "soak_s": 0, "failure_pct": 10}]}
        if bad:
            plan["rollback_release"] = release_id(HW, FACTORY)
        now = _ms()
        rid = engine.create(release_id(HW, version), plan, PEOPLE[0], "demo: release %s" % version, now)
        engine.approve(rid, PEOPLE[1], now, "demo")
        engine.approve(rid, PEOPLE[2], now, "demo")
        start = self._t()
        self.cloud.ota_service.tick_now()            # no need to wait for the next tick

        def over():
            states = [r["state"] for r in engine.rollouts() if r["id"] == rid or r["parent"] == rid]
            return all(s not in rp.IN_FLIGHT for s in states) and self._quiet()
        ok = await self._wait(over, PHASE_S_MAX, "rollout %s" % rid)
        self.phase_ok[rid] = ok
        self.marks.append((start, self._t(), "%s %s" % (version, engine.status(rid)["state"])))
        return rid

    def _quiet(self):
        busy = (up.DOWNLOADING, up.PAGING, up.RESUMING, up.CHECKING, up.VERIFIED, up.INSTALLED, up.TRIAL, up.REBOOTING, "off", "silent")
        return not any(d.state() in busy for d in self.devices.values())

    def _chunk_written(self, device, index):
        """The network cut: when the good release's first download reaches
        its second chunk, every device loses its network for CUT_S."""
        if not self.arm_cut or self.cut is not None or index != 1:
            return
        downloading = sum(1 for d in self.devices.values() if d.state() == up.DOWNLOADING)
        self.cut = (self._t(), downloading)
        self.say("fault: cutting the network of every device for %.1f s during downloads" % CUT_S)
        self.fleet.cut_network()
        self.fleet.loop.call_later(CUT_S, self.fleet.restore_network)
        self.marks.append((self.cut[0], self.cut[0] + CUT_S, "network cut"))

    # -- numbers -----------------------------------------------------------------------

    def _result(self, engine):
        bad, good = self.rollouts["bad"], self.rollouts["good"]
        fleet_n = len(self.devices)
        touched = [m for m in engine.members(bad) if m["offered_ms"] is not None]
        running = {n: d.running_version() for n, d in self.devices.items()}
        bricked = sum(1 for n, d in self.devices.items() if d.bricked or running[n] is None)
        reports = list(self.cloud.ota_service.core.reports)

        def distinct(status):
            return len({(r["device"], r["ref"]) for r in reports if r["status"] == status})
        took_bad = {m["device"] for m in touched}
        self.detail = {
            "bad_rollout": engine.status(bad), "good_rollout": engine.status(good),
            "bad_took": len(took_bad),
            "bad_rolled_back_by_device": sum(m["state"] == rp.ROLLED_BACK for m in touched),
            "bad_left_on_it": sorted(n for n in took_bad if self.after_bad[n] == BAD),
            "bad_back_on_factory": sum(self.after_bad[n] == FACTORY for n in took_bad),
            "campaign": [r for r in engine.rollouts() if r["parent"] == bad],
            "on_good": sum(v == GOOD for v in running.values()),
            "cohorts": {m["device"]: engine.status(good)["plan"]["stages"][m["stage"]]["name"]
                        for m in engine.members(good)},
            "core_counts": dict(self.cloud.ota_service.core.counts),
        }
        ota = {"updated": distinct(rp.CONFIRMED), "rolled_back": distinct(rp.ROLLED_BACK),
               "rejected": distinct(rp.REJECTED), "bricked": bricked,
               "power_cut_points": 0, "attacks_tried": len(self.attacks),
               "attacks_refused": sum(a["refused"] for a in self.attacks),
               "resumed_downloads": sum(d.resumed for d in self.devices.values())}
        rollout = {"bad_release_halted": engine.status(bad)["state"] == rp.HALTED,
                   "bad_release_fleet_touched_pct": round(100.0 * len(touched) / fleet_n, 2),
                   "good_release_coverage_pct": round(100.0 * self.detail["on_good"] / fleet_n, 2),
                   "bricked": bricked,
                   "halt_incidents": len(engine.incidents(bad)) + len(engine.incidents(good))}
        return {"ota": ota, "rollout": rollout}

    def sections(self):
        """summary.json's "ota" and "rollout", the power-cut sweep included."""
        ota = dict(self.result["ota"])
        ota["power_cut_points"] = self.sweep["points"]
        ota["bricked"] += self.sweep["bricked"]
        rollout = dict(self.result["rollout"])
        rollout["bricked"] = ota["bricked"]
        return {"ota": ota, "rollout": rollout}

    def checks(self):
        s = self.sections()
        ota, ro, d = s["ota"], s["rollout"], self.detail
        missed = ["%s (%s: reason %s, state %s)" % (a["attack"], a["device"], a["reason"], a["state"])
                  for a in self.attacks if not a["refused"]]
        restarted = sum(x.restarted for x in self.devices.values())
        bad_state = d["bad_rollout"]["state"]
        return [
            Check("bad release halted in its canary, touching at most %g%% of the fleet" % TOUCHED_PCT_MAX,
                  ro["bad_release_halted"] and ro["bad_release_fleet_touched_pct"] <= TOUCHED_PCT_MAX
                  and d["bad_rollout"]["stage"] == 0,
                  "%s at stage %d, %d devices offered it (%.2f%%), %d halt incident(s)"
                  % (bad_state, d["bad_rollout"]["stage"], d["bad_took"], ro["bad_release_fleet_touched_pct"],
                     ro["halt_incidents"])),
            Check("every device that took the bad release is back on %s" % FACTORY,
                  not d["bad_left_on_it"] and d["bad_back_on_factory"] == d["bad_took"],
                  "%d took it: %d rolled back by themselves (crash on boot), %d confirmed and were sent back "
                  "by the rollback campaign; %d left on %s" % (
                      d["bad_took"], d["bad_rolled_back_by_device"],
                      d["bad_took"] - d["bad_rolled_back_by_device"], len(d["bad_left_on_it"]), BAD)),
            Check("good release (a paged manifest) reached the whole fleet", ro["good_release_coverage_pct"] == 100.0
                  and d["good_rollout"]["state"] == rp.COMPLETED
                  and d["core_counts"]["page_served"] >= d["on_good"],
                  "%s; %d of %d devices run %s; %d pages of chunk hashes served"
                  % (d["good_rollout"]["state"], d["on_good"], len(self.devices), GOOD,
                     d["core_counts"]["page_served"])),
            Check("0 bricked (fleet, and a power cut at every write of an update)", ota["bricked"] == 0,
                  "%d bricked; power cut at each of %d writes (%d runs, healthy and crashing images)"
                  % (ota["bricked"], self.sweep["points"], self.sweep["runs"])),
            Check("every firmware attack refused by the device and reported with its reason",
                  ota["attacks_tried"] == ATTACKS and not missed,
                  "%d of %d refused: %s%s" % (ota["attacks_refused"], ota["attacks_tried"],
                                              ", ".join("%s -> %s" % (a["attack"], a["reason"])
                                                        for a in self.attacks),
                                              "; NOT refused: " + ", ".join(missed) if missed else "")),
            Check("downloads cut by the network resumed from their cursor, not restarted",
                  self.cut is not None and ota["resumed_downloads"] > 0 and restarted == 0,
                  "cut at %s s with %s devices downloading; %d resumed, %d restarted from chunk 0"
                  % (self.cut[0] if self.cut else "-", self.cut[1] if self.cut else 0,
                     ota["resumed_downloads"], restarted)),
        ]

    def series(self):
        """Versions over time per cohort of the good rollout: [{t_s, cohorts: {cohort: {version: n}}}]."""
        cohort = self.detail["cohorts"]
        out = []
        for t, versions in self.samples:
            row = {}
            for name, version in versions.items():
                bucket = row.setdefault(cohort.get(name, "not in rollout"), {})
                bucket[str(version)] = bucket.get(str(version), 0) + 1
            out.append({"t_s": t, "cohorts": row})
        return out


def unknown_signer_bundle():
    """A well-formed bundle for a valid manifest, signed by one listed release
    key and one key nobody listed (an attacker's): the device must refuse it."""
    payload = ff.payload("1.2.8", IMAGE_BYTES)
    manifest = firmware.build_manifest(payload, HW, "1.2.8", 1, ff.EXPIRES_AT, "attack")
    keyset = firmware.read_file(os.path.join(ff.IMAGES, "keyset-v2.cose"), "key set")
    keys = [firmware.load_private_key(os.path.join(ff.IMAGES, "keys", "release-1.key")), firmware.generate_key()]
    sigs = [firmware.sign1(manifest, key, mf.AAD_MANIFEST)
            for _, key in sorted(((firmware.kid_of(k), k) for k in keys), key=lambda p: p[0])]
    return cbor.dumps({"v": mf.FORMAT_VERSION, "keyset": keyset, "sigs": sigs})


def _ms():
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- power cuts

def power_cut_sweep(fw, bundle):
    """Cut power at each write of one update on the sim board (SimFlash), for
    a healthy image and one that crashes on boot; after each cut the device
    boots and the update converges (confirmed or rolled back). Returns
    {"points", "runs", "bricked"}: points are the writes of both clean flows."""
    out = {"points": 0, "runs": 0, "bricked": 0}
    for healthy in (True, False):
        total = _update_with_cut(fw, bundle, healthy, None)[1]
        out["points"] += total
        for n in range(1, total + 1):
            out["runs"] += 1
            ok, _ = _update_with_cut(fw, bundle, healthy, n)
            out["bricked"] += not ok
    return out


def _update_with_cut(fw, bundle, healthy, cut_at):
    """(converged with a valid image at every boot, writes of the whole run)."""
    payload = fw.releases[GOOD][0]
    flash = SimFlash(rng=random.Random(cut_at or 0))
    flash.files[SLOT_NAMES[0]] = bytearray(fw.releases[FACTORY][0])
    flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=1, ksv=1).encode())
    slots = SimSlots(flash)
    flash.power_on(cut_at)
    done = 0                                    # writes before the current power-on
    offers, now = 0, 1_800_000_000_000
    for _ in range(20):                         # boots
        try:
            state = _boot_and_update(fw, slots, bundle, payload, healthy, now, offers)
            if state is None:
                return False, done + flash.writes
            if state in (up.CONFIRMED, up.ROLLED_BACK):
                return True, done + flash.writes
            offers += 1
        except PowerCut:
            pass
        done += flash.writes
        left = None if cut_at is None or done >= cut_at else cut_at - done
        flash.power_on(left)
    return False, done


def _boot_and_update(fw, slots, bundle, payload, healthy, now, offers):
    """One power-on: the bootloader, then the updater driven to a final state or
    a reboot. None when the slot booted holds no valid image (a brick)."""
    for _ in range(up.SLOTS + 1):
        slot, blob = slots.boot()
        if fw.version_of(slots.read_slot(slot)) is None:
            return None
        if healthy or up.decode_boot_state(blob).phase != up.TRIAL:
            break                               # a crashing image dies before the agent runs
    u = up.Updater(fw.config)
    todo = u.handle(up.Booted(slot, blob))
    for _ in range(500):
        if not todo:
            if u.state in (up.IDLE, up.DOWNLOADING, up.PAGING) and offers < 8:   # the cloud offers (again)
                offers += 1
                todo = u.handle(up.Offer(bundle, now, "sweep"))
            elif u.state == up.TRIAL:
                now += 1000
                todo = u.handle(up.Healthy(TRIAL_ACKS_MIN, now))
            else:
                return u.state
            continue
        a = todo.pop(0)
        if isinstance(a, up.WriteSlot):
            slots.write_slot(a.slot, a.offset, a.data)
        elif isinstance(a, up.WriteBootState):
            slots.write_boot_state(a.data)
        elif isinstance(a, up.RequestChunk):
            data = payload[a.index * mf.CHUNK_BYTES:(a.index + 1) * mf.CHUNK_BYTES]
            todo = u.handle(up.Chunk(a.index, data)) + todo
        elif isinstance(a, up.RequestPage):
            data = firmware.chunk_table(payload)[a.index * mf.PAGE_BYTES:(a.index + 1) * mf.PAGE_BYTES]
            todo = u.handle(up.Page(a.index, data)) + todo
        elif isinstance(a, up.ReadSlot):
            todo = u.handle(up.SlotRead(a.offset, slots.read_slot(a.slot, a.offset, a.length))) + todo
        elif isinstance(a, up.StepLater):
            todo = u.handle(up.Step()) + todo
        elif isinstance(a, up.Reboot):
            return up.REBOOTING
    return u.state
