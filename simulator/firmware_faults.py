"""Fault profiles for virtual firmware, and the scenario file that names them.

A release's profile gives the share of devices on which its image
- crashes on boot (`crash_on_boot`): the new image dies before the agent
  runs, so the bootloader finds phase "trial" on the next boot and rolls
  back (agent.updater reports rolled_back / unplanned_reboot);
- fails its health check (`fails_health`): the agent runs but no telemetry
  is acknowledged, so the trial times out (rolled_back / trial_timeout);
- goes silent (`silent`): the image hangs with the network down; nothing
  is reported until the watchdog resets it after `watchdog_s` and the
  bootloader rolls back. Between the two the cloud hears nothing: the
  silence the rollout gates must count.

Which fate a device meets is a pure function of (seed, version, device), so
a run replays from its seed. Shares add up to at most 1; the rest is "ok".

A scenario (JSON) describes a fleet, its releases and the rollouts to run:

    {"seed": 1,
     "fleet": {"devices": 300, "tenants": ["acme", "globex", "initech"],
               "sites_per_tenant": 2, "hw_class": "sim-v1", "factory": "1.0.0"},
     "releases": [{"version": "1.0.0", "security_version": 1},
                  {"version": "1.1.0", "security_version": 1,
                   "faults": {"crash_on_boot": 0.4}},
                  {"version": "1.2.0", "security_version": 1}],
     "windows": {"globex": {"start": "00:00", "end": "00:00"}},
     "rollouts": [{"release": "1.1.0", "plan": {...}}, {"release": "1.2.0", "plan": {...}}]}

simulator/scenarios/ has examples; simulator/rollout_drill.py runs them.
"""

import hashlib
import json
import os

from cloud import firmware

OK = "ok"
CRASH_ON_BOOT = "crash_on_boot"
FAILS_HEALTH = "fails_health"
SILENT = "silent"
FATES = (CRASH_ON_BOOT, FAILS_HEALTH, SILENT)          # the order shares are laid out in
WATCHDOG_S_DEFAULT = 900
DEVICES_MAX = 100000
RELEASES_MAX = 32

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(os.path.dirname(HERE), "firmware-images")
EXPIRES_AT = 4102444800                               # as firmware-images/build.py
SIGNERS = ("release-1", "release-2")


class ScenarioError(ValueError):
    pass


# ---------------------------------------------------------------- fates

class FaultProfile:
    def __init__(self, crash_on_boot=0.0, fails_health=0.0, silent=0.0, watchdog_s=WATCHDOG_S_DEFAULT):
        shares = (crash_on_boot, fails_health, silent)
        if any(not 0 <= s <= 1 for s in shares) or sum(shares) > 1 + 1e-9:
            raise ScenarioError("fault shares are each in [0, 1] and add up to at most 1")
        if type(watchdog_s) is not int or watchdog_s < 1:
            raise ScenarioError("watchdog_s is a positive integer")
        self.shares = dict(zip(FATES, shares))
        self.watchdog_s = watchdog_s

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(FATES) - {"watchdog_s"}
        if unknown:
            raise ScenarioError("unknown fault %s" % ", ".join(sorted(unknown)))
        return cls(d.get(CRASH_ON_BOOT, 0.0), d.get(FAILS_HEALTH, 0.0), d.get(SILENT, 0.0),
                   d.get("watchdog_s", WATCHDOG_S_DEFAULT))

    def fate(self, seed, version, device):
        """OK or one of FATES, the same every time for the same inputs."""
        digest = hashlib.sha256(("%d/%s/%s" % (seed, version, device)).encode()).digest()
        u = int.from_bytes(digest[:8], "big") / float(1 << 64)
        edge = 0.0
        for name in FATES:
            edge += self.shares[name]
            if u < edge:
                return name
        return OK


# ---------------------------------------------------------------- releases, really signed

def payload(version, size):
    """Deterministic image bytes (SHA-256 in counter mode over the version)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"tether drill %s %d" % (version.encode(), counter)).digest()
        counter += 1
    return bytes(out[:size])


def build_release(hw_class, version, security_version, size=9000, keys_dir=None,
                  keyset_name="keyset-v2.cose", signers=SIGNERS, rollout_tag="drill",
                  expires_s=EXPIRES_AT, pages=None):
    """(bundle, payload) signed with the test keys in firmware-images/ through
    cloud/firmware.py. pages: the paged manifest form (None: over 1.75 MiB)."""
    keys_dir = keys_dir or os.path.join(IMAGES, "keys")
    data = payload(version, size)
    manifest = firmware.build_manifest(data, hw_class, version, security_version, expires_s, rollout_tag,
                                       pages=pages)
    keys = [firmware.load_private_key(os.path.join(keys_dir, name + ".key")) for name in signers]
    keyset = firmware.read_file(os.path.join(IMAGES, keyset_name), "key set")
    return firmware.sign_bundle(manifest, keys, keyset), data


def root_public_key(keys_dir=None):
    return firmware.load_public_key(os.path.join(keys_dir or os.path.join(IMAGES, "keys"), "root.pub"))


# ---------------------------------------------------------------- scenarios

def load_scenario(source):
    """A checked scenario dict from a path, JSON text or a dict."""
    if isinstance(source, str):
        if source.lstrip().startswith("{"):
            text = source
        else:
            with open(source) as f:
                text = f.read()
        try:
            source = json.loads(text)
        except ValueError as e:
            raise ScenarioError("scenario is not JSON: %s" % e) from None
    return _check_scenario(source)


def _check_scenario(s):
    if not isinstance(s, dict):
        raise ScenarioError("a scenario is a JSON object")
    fleet = dict(s.get("fleet", {}))
    fleet.setdefault("devices", 300)
    fleet.setdefault("tenants", ["acme", "globex", "initech"])
    fleet.setdefault("sites_per_tenant", 2)
    fleet.setdefault("hw_class", "sim-v1")
    releases = s.get("releases", [])
    if not (type(fleet["devices"]) is int and 1 <= fleet["devices"] <= DEVICES_MAX):
        raise ScenarioError("fleet.devices is 1..%d" % DEVICES_MAX)
    if not releases or len(releases) > RELEASES_MAX:
        raise ScenarioError("1..%d releases" % RELEASES_MAX)
    versions = [r["version"] for r in releases]
    if len(set(versions)) != len(versions):
        raise ScenarioError("release versions differ")
    fleet.setdefault("factory", versions[0])
    if fleet["factory"] not in versions:
        raise ScenarioError("fleet.factory names a release")
    out = {"seed": int(s.get("seed", 1)), "fleet": fleet, "windows": dict(s.get("windows", {})),
           "releases": [], "rollouts": list(s.get("rollouts", []))}
    for r in releases:
        out["releases"].append({"version": r["version"], "security_version": int(r.get("security_version", 1)),
                                "faults": FaultProfile.from_dict(r.get("faults", {}))})
    for ro in out["rollouts"]:
        if ro.get("release") not in versions:
            raise ScenarioError("rollout release %r is not in releases" % ro.get("release"))
    return out
