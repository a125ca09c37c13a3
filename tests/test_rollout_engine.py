"""cloud/rollout.py: the staged-rollout engine on real SQLite with releases
really signed (cloud/firmware.py with the test keys in firmware-images/).
Time is an injected number: nothing here sleeps or reads a clock."""

import json

import pytest

from cloud import rollout_plan as rp
from cloud.rollout import Engine, Policy
from cloud.rollout_actions import Cancel, Offer
from cloud.rollout_plan import RolloutError
from simulator import firmware_faults as ff

NOW = 1_800_000_000_000          # ms, 2027-01-15
HW = "sim-v1"
MIN = 60_000
HOUR = 3_600_000
_BUILT = {}


def release(version, sv=1, **kw):
    key = (version, sv, tuple(sorted(kw.items())))
    if key not in _BUILT:
        _BUILT[key] = ff.build_release(kw.pop("hw_class", HW), version, sv, **kw)
    return _BUILT[key]


def make_engine(path, devices=20, tenants=("acme", "globex"), releases=("1.0.0", "1.1.0"), **policy):
    e = Engine(str(path), Policy(**policy))
    e.set_trust(ff.root_public_key(), 2, [HW], "alice", NOW)
    for version in releases:
        e.add_release(*release(version), actor="alice", now_ms=NOW)
    for i in range(devices):
        tenant = tenants[i % len(tenants)]
        e.observe("%s/d%03d" % (tenant, i), tenant, "site-%d" % (i % 3), HW, "1.0.0", NOW)
    return e


def plan(*stages, **top):
    return dict(top, stages=list(stages))


def started(e, stages, now=NOW, release_id="sim-v1-1.1.0", **top):
    rid = e.create(release_id, plan(*stages, **top), "alice", "fix sensor drift", now)
    e.approve(rid, "bob", now)
    e.approve(rid, "carol", now)
    return rid


def offers(actions):
    return sorted(a.device for a in actions if isinstance(a, Offer))


class Seq:
    """Per-device report numbers, as agent.updater keeps them."""

    def __init__(self):
        self.n = {}

    def __call__(self, device):
        self.n[device] = self.n.get(device, 0) + 1
        return self.n[device]


def walk(e, seq, device, statuses, now):
    out = []
    for status in statuses:
        out += e.report(device, status, "", seq(device), now)
    return out


OK_PATH = ("downloading", "verified", "installed", "trial", "confirmed")
CRASH_PATH = ("downloading", "verified", "installed", "rolled_back")


@pytest.fixture
def e(tmp_path):
    engine = make_engine(tmp_path / "rollout.db")
    yield engine
    engine.close()


# ------------------------------------------------------------ releases

def test_release_verified_under_cloud_trust_is_registered(e):
    rel = e.release("sim-v1-1.1.0")
    assert (rel["hw_class"], rel["version"], rel["security_version"], rel["keyset_version"]) == (HW, "1.1.0", 1, 2)
    assert len(rel["signers"]) == 2
    assert e.release_blobs("sim-v1-1.1.0")[1] == release("1.1.0")[1]


@pytest.mark.parametrize("case,code", [
    ("one_signer", "too_few_signers"),
    ("tampered_payload", "tampered_chunk"),
    ("wrong_hw_class", "unknown_hw_class"),
    ("flipped_signature", "bad_signature"),
    ("revoked_signer", "revoked_signer"),
])
def test_release_failing_cloud_verification_is_refused(e, case, code):
    bundle, data = release("2.0.0")
    if case == "one_signer":
        bundle, data = ff.build_release(HW, "2.0.1", 1, signers=("release-1",))
    elif case == "tampered_payload":
        data = data[:5000] + bytes([data[5000] ^ 1]) + data[5001:]
    elif case == "wrong_hw_class":
        bundle, data = ff.build_release("esp32-s3", "2.0.0", 1)
    elif case == "flipped_signature":
        from agent import cbor
        fields = cbor.loads(bundle)
        sig = bytearray(fields["sigs"][0])
        sig[-1] ^= 1
        fields["sigs"][0] = bytes(sig)
        bundle = cbor.dumps(fields)
    elif case == "revoked_signer":      # signed under key set v1, shipped with v2 that revokes release-3
        from agent import cbor
        bundle, data = ff.build_release(HW, "2.0.2", 1, signers=("release-1", "release-3"),
                                        keyset_name="keyset-v1.cose")
        fields = cbor.loads(bundle)
        with open(ff.os.path.join(ff.IMAGES, "keyset-v2.cose"), "rb") as f:
            fields["keyset"] = f.read()
        bundle = cbor.dumps(fields)
    with pytest.raises(RolloutError) as info:
        e.add_release(bundle, data, "alice", NOW)
    assert info.value.code == code
    assert all(r["version"] != "2.0.0" for r in e.releases())
    refused = [ev for ev in e.events("-") if ev["action"] == "release_refused"]
    assert refused and refused[-1]["detail"]["code"] == code


def test_release_below_confirmed_security_version_refused(tmp_path):
    e = make_engine(tmp_path / "r.db", devices=2, releases=())
    e.add_release(*release("3.0.0", sv=3), actor="alice", now_ms=NOW)
    rid = started(e, [{"name": "all", "percent": 100, "soak_s": 0}], release_id="sim-v1-3.0.0")
    seq = Seq()
    for a in e.tick(NOW):
        walk(e, seq, a.device, OK_PATH, NOW)
    e.tick(NOW + 1)
    assert e.status(rid)["state"] == rp.COMPLETED
    with pytest.raises(RolloutError) as info:
        e.add_release(*release("2.9.0", sv=2), actor="alice", now_ms=NOW)
    assert info.value.code == "downgrade"


def test_release_expiring_before_rollout_can_finish_refused(tmp_path):
    e = make_engine(tmp_path / "r.db", devices=0, releases=())
    late = (ff.EXPIRES_AT - 86400) * 1000        # a day before the sample expiry; policy wants 30
    with pytest.raises(RolloutError) as info:
        e.add_release(*release("1.0.0"), actor="alice", now_ms=late)
    assert info.value.code == "expires_soon"


# ------------------------------------------------------------ approvals

def test_no_offers_until_k_distinct_approvals(e):
    rid = e.create("sim-v1-1.1.0", plan({"count": 2}), "alice", "fix", NOW)
    assert e.tick(NOW) == []
    e.approve(rid, "bob", NOW)
    assert e.tick(NOW + 1) == [] and e.status(rid)["state"] == rp.AWAITING_APPROVAL
    with pytest.raises(RolloutError) as same:
        e.approve(rid, "bob", NOW + 2)
    assert same.value.code == "duplicate_approval"
    with pytest.raises(RolloutError) as own:
        e.approve(rid, "alice", NOW + 2)
    assert own.value.code == "requester_approval"
    assert e.tick(NOW + 3) == [] and len(e.approvals(rid)) == 1
    e.approve(rid, "carol", NOW + 4)
    assert len(offers(e.tick(NOW + 5))) == 2
    assert [a["approver"] for a in e.export(rid)["rollout"]["approvals"]] == ["bob", "carol"]


def test_requester_may_approve_when_policy_says_so(tmp_path):
    e = make_engine(tmp_path / "r.db", approvals_required=1, requester_may_approve=True)
    rid = e.create("sim-v1-1.1.0", plan({"count": 1}), "alice", "fix", NOW)
    e.approve(rid, "alice", NOW)
    assert e.status(rid)["state"] == rp.RUNNING


# ------------------------------------------------------------ cohorts and gates

def test_canary_by_count_then_percent_cohorts_after_soak(e):
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 3600},
                      {"name": "half", "percent": 50, "soak_s": 600},
                      {"name": "all", "percent": 100, "soak_s": 0}])
    seq = Seq()
    canary = offers(e.tick(NOW))
    assert len(canary) == 2
    for d in canary:
        walk(e, seq, d, OK_PATH, NOW + MIN)
    assert e.tick(NOW + 2 * MIN) == []                       # settled, soaking
    assert e.tick(NOW + MIN + HOUR - 1) == []                # one ms before the soak ends
    half = offers(e.tick(NOW + MIN + HOUR))
    assert len(half) == 8 and not set(half) & set(canary)    # 50% of 20 is 10, 2 already
    t = NOW + 2 * HOUR
    for d in half:
        walk(e, seq, d, OK_PATH, t)
    e.tick(t)
    rest = offers(e.tick(t + 600_000))
    assert len(rest) == 10
    for d in rest:
        walk(e, seq, d, OK_PATH, t + HOUR)
    e.tick(t + HOUR)
    assert e.status(rid)["state"] == rp.COMPLETED
    assert {d["version"] for d in e.devices()} == {"1.1.0"}


def test_cohorts_by_tenant_site_and_hw_class(e):
    e.observe("acme/other", "acme", "site-0", "esp32-s3", "0.9", NOW)
    rid = started(e, [{"name": "globex", "tenant": "globex", "soak_s": 0},
                      {"name": "acme-site-1", "tenant": "acme", "site": "site-1", "soak_s": 0}])
    seq = Seq()
    first = offers(e.tick(NOW))
    assert first and all(d.startswith("globex/") for d in first) and len(first) == 10
    for d in first:
        walk(e, seq, d, OK_PATH, NOW)
    second = offers(e.tick(NOW + 1))
    assert second and all(e.device(d)["tenant"] == "acme" and e.device(d)["site"] == "site-1" for d in second)
    assert "acme/other" not in second                       # other hardware class: never eligible
    assert e.status(rid)["cohorts"][1]["size"] == len(second)


def _gate_rollout(e, failures, size=10, pct=20):
    rid = started(e, [{"name": "canary", "count": size, "soak_s": 0, "failure_pct": pct},
                      {"name": "rest", "percent": 100, "soak_s": 0}])
    seq = Seq()
    canary = offers(e.tick(NOW))
    for i, d in enumerate(canary):
        walk(e, seq, d, CRASH_PATH if i < failures else OK_PATH, NOW + MIN)
    return rid, e.tick(NOW + 2 * MIN)


def test_gate_exactly_at_threshold_passes(e):
    rid, actions = _gate_rollout(e, failures=2)              # 2 of 10 is 20%: at the threshold
    assert e.status(rid)["state"] == rp.RUNNING
    assert len(offers(actions)) == 10                        # next cohort offered
    assert e.incidents(rid) == []


def test_gate_just_over_threshold_halts_with_incident(e):
    rid, actions = _gate_rollout(e, failures=3)              # 3 of 10 is over 20%
    assert e.status(rid)["state"] == rp.HALTED
    assert offers(actions) == []
    (incident,) = e.incidents(rid)
    assert incident["tripped"]["rule"] == "failure_rate"
    assert (incident["tripped"]["failed"], incident["tripped"]["failures_max"]) == (3, 2)
    assert incident["devices"]["failed_total"] == 3
    assert all(f["state"] == "rolled_back" for f in incident["devices"]["failed"])
    assert "offers stopped" in incident["actions"]
    assert e.status(rid)["cohorts"][1]["started"] is False   # the next cohort never started
    assert [a["kind"] for a in e.alerts(kind="halt")] == ["halt"]


def test_rejected_counts_as_failure(e):
    rid = started(e, [{"name": "canary", "count": 4, "soak_s": 0, "failure_pct": 0}])
    d = offers(e.tick(NOW))[0]
    actions = e.report(d, "rejected", "downgrade", 1, NOW + 1)
    assert e.status(rid)["state"] == rp.HALTED
    assert len([a for a in actions if isinstance(a, Cancel)]) == 3     # the other three withdrawn


def test_silence_after_install_counts_as_failure(e):
    rid = started(e, [{"name": "canary", "count": 5, "soak_s": 0, "failure_pct": 20}], silence_s=1800)
    seq = Seq()
    canary = offers(e.tick(NOW))
    for d in canary[:3]:
        walk(e, seq, d, OK_PATH, NOW)
    for d in canary[3:]:                                     # installed, then nothing
        walk(e, seq, d, ("downloading", "verified", "installed"), NOW)
    e.tick(NOW + 1800_000 - 1)
    assert e.status(rid)["state"] == rp.RUNNING              # not yet T
    e.tick(NOW + 1800_000)
    assert e.status(rid)["state"] == rp.HALTED               # 2 silent of 5 > 20%
    (incident,) = e.incidents(rid)
    assert incident["tripped"]["by_state"]["silent"] == 2
    # a late report does not undo the verdict
    e.report(canary[3], "trial", "", seq(canary[3]), NOW + 1900_000)
    assert {m["device"]: m["state"] for m in e.members(rid)}[canary[3]] == rp.SILENT


def test_device_confirming_after_counted_silent_joins_the_rollback(e):
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 0, "failure_pct": 0}], silence_s=60,
                  rollback_release="sim-v1-1.0.0")
    seq = Seq()
    a, b = offers(e.tick(NOW))
    walk(e, seq, a, OK_PATH, NOW)
    walk(e, seq, b, ("downloading", "verified", "installed", "trial"), NOW)
    e.tick(NOW + 60_000)                                      # b silent: halt, campaign for a
    assert e.status(rid)["state"] == rp.HALTED
    assert offers(e.tick(NOW + 61_000)) == [a]
    e.report(b, "confirmed", "", seq(b), NOW + 62_000)        # b was alive after all
    assert {m["device"]: m["state"] for m in e.members(rid)}[b] == rp.SILENT     # still a failure
    assert e.device(b)["version"] == "1.1.0"
    assert offers(e.tick(NOW + 63_000)) == [b]                # and it is sent back too


def test_offline_device_is_unreached_not_failed(e):
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 0, "failure_pct": 0}], reach_s=600)
    seq = Seq()
    a, b = offers(e.tick(NOW))
    walk(e, seq, a, OK_PATH, NOW)
    e.tick(NOW + 600_000)
    assert e.status(rid)["state"] == rp.COMPLETED
    assert {m["device"]: m["state"] for m in e.members(rid)}[b] == rp.UNREACHED


def test_repeated_report_is_kept_once(e):
    rid = started(e, [{"name": "canary", "count": 1, "soak_s": 0, "failure_pct": 0}])
    (d,) = offers(e.tick(NOW))
    e.report(d, "rolled_back", "boot_failed", 5, NOW)
    e.report(d, "confirmed", "", 5, NOW)                     # same seq: a repeat, ignored
    assert e.device(d)["status"] == "rolled_back"
    assert e.members(rid)[0]["state"] == rp.ROLLED_BACK


# ------------------------------------------------------------ pause, abort, kill

def test_pause_stops_offers_and_next_cohort_resume_continues(e):
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 0}, {"name": "rest", "percent": 100, "soak_s": 0}])
    seq = Seq()
    canary = offers(e.tick(NOW))
    e.pause(rid, "dave", "customer call", NOW + 1)
    for d in canary:
        walk(e, seq, d, OK_PATH, NOW + 2)
    assert e.tick(NOW + HOUR) == []
    assert e.status(rid)["state"] == rp.PAUSED
    with pytest.raises(RolloutError):
        e.pause(rid, "dave", "again", NOW + HOUR)
    e.resume(rid, "dave", "call over", NOW + HOUR + 1)
    assert len(offers(e.tick(NOW + HOUR + 2))) == 18


def test_paused_rollout_still_halts_on_failures(e):
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 0, "failure_pct": 0}])
    seq = Seq()
    canary = offers(e.tick(NOW))
    e.pause(rid, "dave", "look", NOW + 1)
    walk(e, seq, canary[0], CRASH_PATH, NOW + 2)
    assert e.status(rid)["state"] == rp.HALTED


def test_abort_mid_cohort_withdraws_outstanding_offers(e):
    rid = started(e, [{"name": "half", "percent": 50, "soak_s": 0}, {"name": "rest", "percent": 100}])
    seq = Seq()
    cohort = offers(e.tick(NOW))
    walk(e, seq, cohort[0], OK_PATH, NOW)
    walk(e, seq, cohort[1], ("downloading", "verified", "installed"), NOW)
    actions = e.abort(rid, "dave", "wrong build", NOW + 1)
    assert sorted(a.device for a in actions) == sorted(cohort[2:])
    assert all(isinstance(a, Cancel) for a in actions)
    assert e.status(rid)["state"] == rp.ABORTED
    assert e.tick(NOW + HOUR) == [] and e.offer_for(cohort[3]) is None
    states = {m["device"]: m["state"] for m in e.members(rid)}
    assert states[cohort[0]] == rp.CONFIRMED and states[cohort[1]] == rp.INSTALLED
    with pytest.raises(RolloutError) as info:
        e.resume(rid, "dave", "oops", NOW + 2)
    assert info.value.code == "bad_transition"


def test_kill_switch_halts_every_rollout_and_refuses_new_ones(tmp_path):
    e = make_engine(tmp_path / "r.db", releases=("1.0.0", "1.1.0"))
    e.set_trust(ff.root_public_key(), 2, [HW, "esp32-s3"], "alice", NOW)
    e.add_release(*ff.build_release("esp32-s3", "5.0.0", 1), actor="alice", now_ms=NOW)
    e.observe("acme/esp", "acme", "site-0", "esp32-s3", "4.0.0", NOW)
    a = started(e, [{"count": 3, "soak_s": 0}])
    b = started(e, [{"count": 1}], release_id="esp32-s3-5.0.0")
    assert len(offers(e.tick(NOW))) == 4
    actions = e.kill("erin", "fleet-wide incident", NOW + 1)
    assert len([x for x in actions if isinstance(x, Cancel)]) == 4
    assert e.status(a)["state"] == e.status(b)["state"] == rp.HALTED
    assert [i["tripped"]["rule"] for i in e.incidents()] == ["kill_switch", "kill_switch"]
    with pytest.raises(RolloutError) as info:
        e.create("sim-v1-1.1.0", plan({"count": 1}), "alice", "again", NOW + 2)
    assert info.value.code == "kill_switch"
    e.unkill("erin", "resolved", NOW + 3)
    c = started(e, [{"count": 1, "soak_s": 0}], now=NOW + 4)
    assert len(offers(e.tick(NOW + 5))) == 1 and e.status(c)["state"] == rp.RUNNING


# ------------------------------------------------------------ maintenance windows

def test_device_offered_only_inside_its_tenant_window(e):
    # NOW is 2027-01-15 08:00 UTC, a Friday
    e.set_window("acme", {"days": ["fri"], "start": "09:00", "end": "10:00"}, "ops", NOW)
    rid = started(e, [{"name": "all", "percent": 100, "soak_s": 0}])
    first = offers(e.tick(NOW))
    assert first and all(d.startswith("globex/") for d in first)
    assert offers(e.tick(NOW + HOUR - 1)) == []              # 08:59:59.999
    inside = offers(e.tick(NOW + HOUR))                      # 09:00
    assert inside and all(d.startswith("acme/") for d in inside)
    assert len(first) + len(inside) == 20
    assert e.status(rid)["state"] == rp.RUNNING


def test_window_across_midnight_and_utc_offset():
    w = rp.parse_window({"days": ["mon"], "start": "23:00", "end": "01:00", "utc_offset_min": 60})
    monday_2230_utc = 1_799_971_200_000 + 3 * 86_400_000 + 22 * HOUR + 30 * MIN   # Mon 23:30 local
    assert rp.window_open(w, monday_2230_utc)
    assert rp.window_open(w, monday_2230_utc + HOUR)        # Tue 00:30 local, opened Monday
    assert not rp.window_open(w, monday_2230_utc + 2 * HOUR)
    assert not rp.window_open(w, monday_2230_utc + 7 * 86_400_000 - 86_400_000)  # Sunday
    with pytest.raises(RolloutError):
        rp.parse_window({"start": "25:00", "end": "01:00"})


# ------------------------------------------------------------ rollback campaign

def test_halt_starts_rollback_campaign_for_devices_that_took_it(e):
    rid = started(e, [{"name": "canary", "count": 6, "soak_s": 0, "failure_pct": 20},
                      {"name": "rest", "percent": 100}], rollback_release="sim-v1-1.0.0")
    seq = Seq()
    canary = offers(e.tick(NOW))
    walk(e, seq, canary[0], OK_PATH, NOW)
    walk(e, seq, canary[1], OK_PATH, NOW)
    walk(e, seq, canary[2], ("downloading", "verified", "installed", "trial"), NOW)
    walk(e, seq, canary[3], CRASH_PATH, NOW)
    actions = walk(e, seq, canary[4], CRASH_PATH, NOW)
    assert e.status(rid)["state"] == rp.HALTED
    assert sorted(a.device for a in actions) == [canary[5]]   # only the untouched offer withdrawn
    campaign = rid + "-rollback"
    back = offers(e.tick(NOW + 1))
    assert back == sorted(canary[:2])
    walk(e, seq, canary[2], ("confirmed",), NOW + 2)          # confirmed after the halt: joins
    assert offers(e.tick(NOW + 3)) == [canary[2]]
    for d in canary[:3]:
        walk(e, seq, d, OK_PATH, NOW + 4)
    e.tick(NOW + 5)
    assert e.status(campaign)["state"] == rp.COMPLETED
    assert {e.device(d)["version"] for d in canary[:5]} == {"1.0.0"}
    (incident,) = e.incidents(rid)
    assert any("rollback campaign" in a for a in incident["actions"])
    assert e.export(rid)["rollback_campaigns"][0]["rollout"]["id"] == campaign


def test_rollback_target_below_security_version_refused(tmp_path):
    e = make_engine(tmp_path / "r.db", releases=("1.0.0",))
    e.add_release(*release("1.3.0", sv=2), actor="alice", now_ms=NOW)
    with pytest.raises(RolloutError) as info:
        e.create("sim-v1-1.3.0", plan({"count": 1}, rollback_release="sim-v1-1.0.0"), "alice", "x", NOW)
    assert info.value.code == "rollback_downgrade"


# ------------------------------------------------------------ restart

def test_cloud_restart_resumes_where_it_was(tmp_path):
    path = tmp_path / "r.db"
    e = make_engine(path)
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 3600},
                      {"name": "rest", "percent": 100, "soak_s": 0}], silence_s=600)
    seq = Seq()
    canary = offers(e.tick(NOW))
    walk(e, seq, canary[0], OK_PATH, NOW + MIN)
    walk(e, seq, canary[1], ("downloading", "verified", "installed"), NOW + MIN)
    before = e.status(rid)
    e.close()                                                 # the cloud goes down
    e = Engine(str(path), Policy())
    assert e.status(rid) == before
    assert e.tick(NOW + 2 * MIN) == []                        # nothing offered twice
    walk(e, seq, canary[1], ("trial", "confirmed"), NOW + 3 * MIN)
    e.tick(NOW + 4 * MIN)
    e.close()
    e = Engine(str(path), Policy())                           # down again while soaking
    assert e.tick(NOW + 3 * MIN + HOUR - 1) == []              # soak counts from the last verdict
    rest = offers(e.tick(NOW + 3 * MIN + HOUR))
    assert len(rest) == 18 and not set(rest) & set(canary)
    actions = [ev["action"] for ev in e.events(rid)]
    assert actions.count("cohort_started") == 2 and actions.count("cohort_passed") == 1


# ------------------------------------------------------------ monitoring

def test_monitoring_records_stalled_outdated_and_failure_rate(tmp_path):
    e = make_engine(tmp_path / "r.db", devices=10, stall_s=600, outdated_grace_s=60)
    rid = started(e, [{"name": "all", "percent": 100, "soak_s": 0, "failure_pct": 20}], reach_s=86400)
    seq = Seq()
    devs = offers(e.tick(NOW))
    for d in devs[:8]:
        walk(e, seq, d, OK_PATH, NOW)
    walk(e, seq, devs[8], CRASH_PATH, NOW)
    walk(e, seq, devs[9], ("downloading",), NOW)              # stuck downloading
    e.tick(NOW + 600_000)
    stalled = e.alerts(kind="stalled", open_only=True)
    assert [a["subject"] for a in stalled] == [devs[9]] and stalled[0]["detail"]["state"] == "downloading"
    rate = e.alerts(kind="failure_rate", open_only=True)
    assert rate and rate[0]["detail"]["failed"] == 1           # 10% is half the 20% threshold: an alert, no halt
    walk(e, seq, devs[9], ("verified", "installed", "trial", "confirmed"), NOW + 700_000)
    e.tick(NOW + 700_000)
    assert e.status(rid)["state"] == rp.COMPLETED
    assert e.alerts(kind="stalled", open_only=True) == []     # closed, still on record
    assert len(e.alerts(kind="stalled")) == 1
    e.tick(NOW + 700_000 + 60_000)
    outdated = e.alerts(kind="outdated", open_only=True)
    assert [a["subject"] for a in outdated] == [devs[8]]
    assert outdated[0]["detail"] == {"version": "1.0.0", "expected": "1.1.0", "release": "sim-v1-1.1.0"}


def test_export_is_json_for_a_reviewer(e):
    rid = started(e, [{"count": 1, "soak_s": 0, "failure_pct": 0}])
    (d,) = offers(e.tick(NOW))
    walk(e, Seq(), d, CRASH_PATH, NOW)
    data = json.loads(json.dumps(e.export(rid)))
    assert data["rollout"]["plan"]["stages"][0]["failure_pct"] == 0
    assert [t["action"] for t in data["timeline"]][:4] == ["requested", "approved", "approved", "approved"]
    assert data["incidents"][0]["devices"]["failed"][0]["device"] == d
    assert [ev["action"] for ev in data["cohort_timeline"]["canary"]] == [
        "cohort_started", "offered", "device_failed", "halt"]


def test_device_counted_silent_is_not_offered_again_until_it_speaks(e):
    a = started(e, [{"name": "canary", "count": 1, "soak_s": 0, "failure_pct": 0}], silence_s=60)
    seq = Seq()
    (d,) = offers(e.tick(NOW))
    walk(e, seq, d, ("downloading", "verified", "installed", "trial"), NOW)
    e.tick(NOW + 60_000)
    assert e.status(a)["state"] == rp.HALTED
    b = started(e, [{"name": "all", "percent": 100, "soak_s": 0}], now=NOW + 61_000)
    assert d not in offers(e.tick(NOW + 61_000))            # still in its trial by its own last word
    e.report(d, "rolled_back", "trial_timeout", seq(d), NOW + 62_000)
    assert {m["device"]: m["state"] for m in e.members(a)}[d] == rp.SILENT   # attributed to a, not b
    assert d not in {m["device"] for m in e.members(b)}


def test_device_that_appears_mid_rollout_joins_a_later_cohort(e):
    rid = started(e, [{"name": "canary", "count": 1, "soak_s": 0}, {"name": "all", "percent": 100, "soak_s": 0}])
    seq = Seq()
    (d,) = offers(e.tick(NOW))
    e.observe("acme/new", "acme", "site-9", HW, "1.0.0", NOW + 1)
    walk(e, seq, d, OK_PATH, NOW + 2)
    assert "acme/new" in offers(e.tick(NOW + 3))
    assert e.status(rid)["cohorts"][1]["size"] == 20


def test_transport_asks_what_to_serve_after_a_restart(tmp_path):
    path = tmp_path / "r.db"
    e = make_engine(path)
    rid = started(e, [{"name": "canary", "count": 2, "soak_s": 0}])
    a, b = offers(e.tick(NOW))
    e.close()
    e = Engine(str(path), Policy())
    assert e.offer_for(a) == Offer(a, "sim-v1-1.1.0", rid)
    e.pause(rid, "dave", "hold", NOW + 1)
    assert e.offer_for(a) == Offer(a, "sim-v1-1.1.0", rid)    # paused: what was offered may finish
    e.abort(rid, "dave", "stop", NOW + 2)
    assert e.offer_for(a) is None and e.offer_for(b) is None


def test_offers_per_tick_are_bounded(tmp_path):
    e = make_engine(tmp_path / "r.db", offers_per_tick_max=6)
    started(e, [{"name": "all", "percent": 100, "soak_s": 0}])
    got = [offers(e.tick(NOW + i)) for i in range(4)]
    assert [len(g) for g in got] == [6, 6, 6, 2]
    assert len({d for g in got for d in g}) == 20


def test_download_in_progress_is_left_to_finish_after_a_halt(e):
    rid = started(e, [{"name": "canary", "count": 3, "soak_s": 0, "failure_pct": 0}],
                  rollback_release="sim-v1-1.0.0")
    seq = Seq()
    a, b, c = offers(e.tick(NOW))
    walk(e, seq, b, ("downloading",), NOW)
    actions = walk(e, seq, a, CRASH_PATH, NOW + 1)
    assert [x.device for x in actions] == [c]                 # not started: withdrawn
    assert e.offer_for(b) == Offer(b, "sim-v1-1.1.0", rid)    # mid-download: still served
    assert e.offer_for(c) is None
    (incident,) = e.incidents(rid)
    assert incident["devices"]["finishing"] == [b] and incident["devices"]["cancelled"] == [c]
    walk(e, seq, b, ("verified", "installed", "trial", "confirmed"), NOW + 2)
    assert offers(e.tick(NOW + 3)) == [b]                      # and the campaign takes it back
