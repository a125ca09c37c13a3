"""simulator/rollout_drill.py: the real updater (agent/updater.py over
board/slots.py SimSlots) on every virtual device, the real engine on real
SQLite, releases really signed, a simulated clock. The scenario files in
simulator/scenarios/ are the ones run here."""

import json
import os

import pytest

from simulator import firmware_faults as ff
from simulator import rollout_drill as drill

SCENARIOS = os.path.join(ff.HERE, "scenarios")


def scenario(name, **changes):
    s = ff.load_scenario(os.path.join(SCENARIOS, name))
    s.update(changes)
    return s


@pytest.fixture(scope="module")
def bad_then_good(tmp_path_factory):
    return drill.run(scenario("bad-then-good.json"), str(tmp_path_factory.mktemp("d") / "r.db"))


def test_bad_release_halts_in_canary_and_good_release_reaches_everyone(bad_then_good):
    s = bad_then_good["summary"]
    assert s == {"bad_release_halted": True, "bad_release_fleet_touched_pct": 4.0,
                 "good_release_coverage_pct": 100.0, "bricked": 0, "halt_incidents": 1}
    assert s["bad_release_fleet_touched_pct"] <= 5.0            # the target
    d = bad_then_good["detail"]
    assert d["bad_release_devices_left_on_it"] == 0            # every device that took it went back
    assert d["stuck_downloading"] == 0
    assert d["bad_release_rolled_back_by_device"] > 0 and d["bad_release_confirmed_then_campaign"] > 0
    bad = bad_then_good["exports"][bad_then_good["rollouts"][0]]
    assert [c["started"] for c in bad["rollout"]["cohorts"]] == [True, False, False]
    (incident,) = bad["incidents"]
    assert incident["tripped"]["stage"] == "canary"
    assert {f["reason"] for f in incident["devices"]["failed"]} == {"unplanned_reboot"}   # the device's own words
    campaign = bad["rollback_campaigns"][0]["rollout"]
    assert campaign["state"] == "completed" and campaign["release"] == "sim-v1-1.0.0"


def test_versions_over_time_per_cohort_series(bad_then_good):
    series = bad_then_good["series"]
    assert series[0]["t_s"] == 0
    assert series[0]["cohorts"] and all(set(v) == {"1.0.0"} for v in series[0]["cohorts"].values())
    assert set(series[-1]["cohorts"]) == {"canary", "quarter", "all"}
    assert all(set(v) == {"1.2.0"} for v in series[-1]["cohorts"].values())
    assert any("1.1.0" in v for row in series for v in row["cohorts"].values())
    assert sum(sum(v.values()) for v in series[-1]["cohorts"].values()) == 300
    json.dumps(bad_then_good, default=str)


def test_silent_release_is_caught_by_silence_not_reports(tmp_path):
    r = drill.run(scenario("silent-then-good.json"), str(tmp_path / "r.db"))
    assert r["summary"]["bad_release_halted"] and r["summary"]["bricked"] == 0
    assert r["summary"]["good_release_coverage_pct"] == 100.0
    assert r["detail"]["bad_release_silent"] > 0 and r["detail"]["bad_release_rolled_back_by_device"] == 0
    incident = r["exports"][r["rollouts"][0]]["incidents"][0]
    assert incident["tripped"]["by_state"]["silent"] > incident["tripped"]["failures_max"]


def test_maintenance_windows_and_mixed_faults(tmp_path):
    r = drill.run(scenario("mixed-faults-windows.json"), str(tmp_path / "r.db"))
    s = r["summary"]
    assert s["bad_release_halted"] and s["bricked"] == 0 and s["good_release_coverage_pct"] == 100.0
    assert s["bad_release_fleet_touched_pct"] <= 5.0
    good = r["exports"][r["rollouts"][-1]]
    for dev in good["devices"]:                # acme devices were offered only 01:00-03:00 UTC
        if dev["device"].startswith("acme/"):
            assert 60 <= (dev["offered_ms"] // 60000) % 1440 < 180


def test_cloud_restarts_during_the_drill_change_nothing(tmp_path, bad_then_good):
    r = drill.run(scenario("bad-then-good.json"), str(tmp_path / "r.db"), restart_every_steps=7)
    assert r["summary"] == bad_then_good["summary"]
    assert r["series"] == bad_then_good["series"]


def test_fates_are_deterministic_and_shares_hold():
    p = ff.FaultProfile(crash_on_boot=0.25, silent=0.25)
    fates = [p.fate(1, "1.1.0", "d%d" % i) for i in range(4000)]
    assert fates == [p.fate(1, "1.1.0", "d%d" % i) for i in range(4000)]
    assert abs(fates.count("crash_on_boot") / 4000 - 0.25) < 0.03
    assert abs(fates.count("silent") / 4000 - 0.25) < 0.03
    assert fates != [p.fate(2, "1.1.0", "d%d" % i) for i in range(4000)]
    with pytest.raises(ff.ScenarioError):
        ff.FaultProfile(crash_on_boot=0.7, silent=0.5)
    with pytest.raises(ff.ScenarioError):
        ff.load_scenario('{"releases": [{"version": "1"}], "rollouts": [{"release": "2"}]}')
