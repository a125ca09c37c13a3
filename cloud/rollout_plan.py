"""Staged rollouts, the data: states and their transition tables, the plan
format, cohort selection and tenant maintenance windows. No I/O, no clock:
cloud/rollout.py (the engine) keeps the records and calls these.

A plan (JSON) is a list of stages run in order; the first is the canary:

    {"silence_s": 1800, "reach_s": 86400, "rollback_release": "sim-v1-1.0.0",
     "stages": [
       {"name": "canary", "count": 5,      "soak_s": 3600, "failure_pct": 20},
       {"name": "quarter", "percent": 25,  "soak_s": 7200},
       {"name": "acme",   "tenant": "acme", "soak_s": 3600},
       {"name": "all",    "percent": 100,  "soak_s": 0}]}

A stage chooses its cohort from the eligible fleet (devices of the
release's hardware class not already on its version), in a fixed order
per rollout (SHA-256 of rollout id and device), leaving out devices an
earlier stage took:

- `count` N: the next N devices;
- `percent` P: cumulative, up to ceil(P% of the eligible devices that
  match the stage's filters), at least one;
- neither: every remaining device that matches the filters;
- filters `tenant`, `site`, `hw_class` narrow the devices a stage looks at.
"""

import hashlib
import json

from cloud.errors import CloudError


class RolloutError(CloudError):
    """A rollout command, plan, window or release the engine refuses; .code says why."""
    code = "rollout"


# ---------------------------------------------------------------- rollout states

AWAITING_APPROVAL = "awaiting_approval"
RUNNING = "running"
PAUSED = "paused"
HALTED = "halted"          # stopped by a health gate or the kill switch: terminal
ABORTED = "aborted"        # stopped by a person: terminal
COMPLETED = "completed"
IN_FLIGHT = (AWAITING_APPROVAL, RUNNING, PAUSED)
OFFERING = (RUNNING,)

# (state, command or verdict) -> next state. Anything else is refused with
# RolloutError("bad_transition") and the rollout is left as it was: these
# are people's commands, so a wrong one is an answer, not a broken machine.
ROLLOUT_TRANSITIONS = {
    (AWAITING_APPROVAL, "approved"): RUNNING,
    (AWAITING_APPROVAL, "abort"): ABORTED,
    (AWAITING_APPROVAL, "kill"): HALTED,
    (RUNNING, "pause"): PAUSED,
    (RUNNING, "abort"): ABORTED,
    (RUNNING, "halt"): HALTED,
    (RUNNING, "kill"): HALTED,
    (RUNNING, "complete"): COMPLETED,
    (PAUSED, "resume"): RUNNING,
    (PAUSED, "abort"): ABORTED,
    (PAUSED, "halt"): HALTED,       # a paused rollout's gates still count
    (PAUSED, "kill"): HALTED,
}


def next_state(state, command):
    new = ROLLOUT_TRANSITIONS.get((state, command))
    if new is None:
        raise RolloutError("cannot %s a rollout that is %s" % (command, state), "bad_transition")
    return new


# ---------------------------------------------------------------- a device in a rollout

SELECTED = "selected"       # in a started cohort, not offered yet (window closed, kill switch)
OFFERED = "offered"
DOWNLOADING = "downloading"
VERIFIED = "verified"
INSTALLED = "installed"
TRIAL = "trial"
CONFIRMED = "confirmed"     # success
REJECTED = "rejected"       # failure, reported
ROLLED_BACK = "rolled_back"  # failure, reported
SILENT = "silent"           # failure: installed, no confirmed within silence_s
UNREACHED = "unreached"     # offered or downloading, no report within reach_s (not a failure)
CANCELLED = "cancelled"     # never offered, or offer withdrawn before install

REPORTS = (DOWNLOADING, VERIFIED, INSTALLED, TRIAL, CONFIRMED, ROLLED_BACK, REJECTED)
FAILED = (REJECTED, ROLLED_BACK, SILENT)
PAST_INSTALL = (VERIFIED, INSTALLED, TRIAL)      # the silence clock runs here
UNSETTLED = (SELECTED, OFFERED, DOWNLOADING, VERIFIED, INSTALLED, TRIAL)
CANCELLABLE = (SELECTED, OFFERED, UNREACHED)
# A download in progress is left to finish when a rollout stops: agent.updater
# cannot abandon one (an Offer while downloading re-requests the old cursor),
# so withdrawing it would strand the device. It then rolls back by itself or
# joins the rollback campaign. Add DOWNLOADING here once the updater can cancel.
FINISHING = (DOWNLOADING,)

# (member state, device report) -> member state. Reports are sequenced per
# device, and one may be lost, so a member can skip forward; it never goes
# back. A pair missing here is recorded on the device and changes nothing:
# a late "confirmed" from a device already counted silent stays a failure
# for the gate (it was silent past T), as does anything after a verdict.
MEMBER_TRANSITIONS = {
    (OFFERED, DOWNLOADING): DOWNLOADING,
    (OFFERED, VERIFIED): VERIFIED,
    (OFFERED, INSTALLED): INSTALLED,
    (OFFERED, TRIAL): TRIAL,
    (OFFERED, CONFIRMED): CONFIRMED,
    (OFFERED, REJECTED): REJECTED,
    (OFFERED, ROLLED_BACK): ROLLED_BACK,
    (DOWNLOADING, VERIFIED): VERIFIED,
    (DOWNLOADING, INSTALLED): INSTALLED,
    (DOWNLOADING, TRIAL): TRIAL,
    (DOWNLOADING, CONFIRMED): CONFIRMED,
    (DOWNLOADING, REJECTED): REJECTED,
    (DOWNLOADING, ROLLED_BACK): ROLLED_BACK,
    (VERIFIED, INSTALLED): INSTALLED,
    (VERIFIED, TRIAL): TRIAL,
    (VERIFIED, CONFIRMED): CONFIRMED,
    (VERIFIED, ROLLED_BACK): ROLLED_BACK,
    (INSTALLED, TRIAL): TRIAL,
    (INSTALLED, CONFIRMED): CONFIRMED,
    (INSTALLED, ROLLED_BACK): ROLLED_BACK,
    (TRIAL, CONFIRMED): CONFIRMED,
    (TRIAL, ROLLED_BACK): ROLLED_BACK,
    # an unreached device that turns up again carries on
    (UNREACHED, DOWNLOADING): DOWNLOADING,
    (UNREACHED, VERIFIED): VERIFIED,
    (UNREACHED, INSTALLED): INSTALLED,
    (UNREACHED, TRIAL): TRIAL,
    (UNREACHED, CONFIRMED): CONFIRMED,
    (UNREACHED, REJECTED): REJECTED,
    (UNREACHED, ROLLED_BACK): ROLLED_BACK,
    # a withdrawn offer the device had already acted on: record the truth,
    # so a rollback campaign finds every device that took the release
    (CANCELLED, VERIFIED): VERIFIED,
    (CANCELLED, INSTALLED): INSTALLED,
    (CANCELLED, TRIAL): TRIAL,
    (CANCELLED, CONFIRMED): CONFIRMED,
    (CANCELLED, ROLLED_BACK): ROLLED_BACK,
}


# ---------------------------------------------------------------- plans

STAGES_MAX = 16
NAME_CHARS_MAX = 64
SOAK_S_MAX = 30 * 86400
SILENCE_S_DEFAULT = 1800
REACH_S_DEFAULT = 86400
SOAK_S_DEFAULT = 3600
FAILURE_PCT_DEFAULT = 10.0
_STAGE_FIELDS = ("name", "count", "percent", "tenant", "site", "hw_class", "soak_s",
                 "failure_pct", "devices")
_PLAN_FIELDS = ("stages", "silence_s", "reach_s", "rollback_release")


def parse_plan(plan):
    """The plan (dict or JSON text) with defaults filled in; RolloutError('bad_plan') if not valid."""
    if isinstance(plan, str):
        try:
            plan = json.loads(plan)
        except ValueError as e:
            raise RolloutError("plan is not JSON: %s" % e, "bad_plan") from None
    _require(isinstance(plan, dict), "a plan is a JSON object")
    _no_unknown(plan, _PLAN_FIELDS, "plan")
    stages = plan.get("stages")
    _require(isinstance(stages, list) and 1 <= len(stages) <= STAGES_MAX,
             "a plan has 1..%d stages" % STAGES_MAX)
    out = {"silence_s": _seconds(plan, "silence_s", SILENCE_S_DEFAULT, 1),
           "reach_s": _seconds(plan, "reach_s", REACH_S_DEFAULT, 1),
           "rollback_release": plan.get("rollback_release"),
           "stages": [_parse_stage(stage, i) for i, stage in enumerate(stages)]}
    rb = out["rollback_release"]
    _require(rb is None or (isinstance(rb, str) and 0 < len(rb) <= NAME_CHARS_MAX),
             "rollback_release is a release id")
    names = [s["name"] for s in out["stages"]]
    _require(len(set(names)) == len(names), "stage names must differ")
    return out


def _parse_stage(stage, index):
    _require(isinstance(stage, dict), "stage %d is not an object" % index)
    _no_unknown(stage, _STAGE_FIELDS, "stage %d" % index)
    name = stage.get("name", "canary" if index == 0 else "stage-%d" % index)
    _require(isinstance(name, str) and 0 < len(name) <= NAME_CHARS_MAX, "stage name is 1..64 characters")
    _require(not ("count" in stage and "percent" in stage), "stage %r: count or percent, not both" % name)
    out = {"name": name, "soak_s": _seconds(stage, "soak_s", SOAK_S_DEFAULT, 0)}
    if "count" in stage:
        _require(type(stage["count"]) is int and stage["count"] >= 1, "stage %r: count >= 1" % name)
        out["count"] = stage["count"]
    if "percent" in stage:
        p = stage["percent"]
        _require(type(p) in (int, float) and 0 < p <= 100, "stage %r: percent in (0, 100]" % name)
        out["percent"] = p
    pct = stage.get("failure_pct", FAILURE_PCT_DEFAULT)
    _require(type(pct) in (int, float) and 0 <= pct <= 100, "stage %r: failure_pct in [0, 100]" % name)
    out["failure_pct"] = pct
    for key in ("tenant", "site", "hw_class"):
        if key in stage:
            _require(isinstance(stage[key], str) and stage[key], "stage %r: %s is text" % (name, key))
            out[key] = stage[key]
    if "devices" in stage:      # an explicit list: rollback campaigns
        _require(isinstance(stage["devices"], list), "stage %r: devices is a list" % name)
        out["devices"] = sorted(set(stage["devices"]))
    return out


def _seconds(obj, key, default, low):
    value = obj.get(key, default)
    _require(type(value) is int and low <= value <= SOAK_S_MAX, "%s is an integer %d..%d" % (key, low, SOAK_S_MAX))
    return value


def _require(ok, message):
    if not ok:
        raise RolloutError(message, "bad_plan")


def _no_unknown(obj, fields, what):
    for key in obj:
        _require(key in fields, "%s has unknown field %r" % (what, key))


def failures_max(size, failure_pct):
    """The most failures a cohort of `size` may have and pass: floor(size * pct / 100).
    Exactly at the threshold passes; one more halts."""
    # percent to thousandths, in integers, so 20% of 5 is exactly 1
    return (size * int(round(failure_pct * 1000))) // 100000


# ---------------------------------------------------------------- cohorts

def rank(rollout_id, device):
    """A device's place in a rollout's order: stable, spread over tenants and sites."""
    return hashlib.sha256(("%s\0%s" % (rollout_id, device)).encode()).hexdigest()


def choose_cohort(stage, eligible, taken):
    """The devices stage adds. eligible: device rows (dicts with device,
    tenant, site, hw_class) in rank order; taken: devices already members."""
    if "devices" in stage:
        wanted = set(stage["devices"])
        return [d["device"] for d in eligible if d["device"] in wanted and d["device"] not in taken]
    matching = [d for d in eligible if _matches(stage, d)]
    free = [d["device"] for d in matching if d["device"] not in taken]
    if "count" in stage:
        return free[:stage["count"]]
    if "percent" in stage:
        target = max(1, -(-len(matching) * int(round(stage["percent"] * 1000)) // 100000))
        already = len(matching) - len(free)
        return free[:max(0, target - already)]
    return free


def _matches(stage, device):
    for key in ("tenant", "site", "hw_class"):
        if key in stage and device.get(key) != stage[key]:
            return False
    return True


# ---------------------------------------------------------------- maintenance windows

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_window(spec):
    """{"days": ["mon", ...], "start": "HH:MM", "end": "HH:MM", "utc_offset_min": int}
    normalized; start == end means the whole day; end < start runs past midnight."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise RolloutError("window is not JSON: %s" % e, "bad_window") from None
    if not isinstance(spec, dict):
        raise RolloutError("a window is a JSON object", "bad_window")
    days = spec.get("days", list(DAYS))
    if not isinstance(days, list) or not days or any(d not in DAYS for d in days):
        raise RolloutError("days: a non-empty list of %s" % ", ".join(DAYS), "bad_window")
    offset = spec.get("utc_offset_min", 0)
    if type(offset) is not int or not -14 * 60 <= offset <= 14 * 60:
        raise RolloutError("utc_offset_min: minutes in -840..840", "bad_window")
    return {"days": [d for d in DAYS if d in days], "start": _hhmm(spec.get("start")),
            "end": _hhmm(spec.get("end")), "utc_offset_min": offset}


def _hhmm(text):
    try:
        h, m = text.split(":")
        h, m = int(h), int(m)
    except (AttributeError, ValueError):
        h = m = -1
    if not (0 <= h <= 23 and 0 <= m <= 59):
        raise RolloutError("a time is HH:MM, 00:00..23:59, not %r" % (text,), "bad_window")
    return "%02d:%02d" % (h, m)


def window_open(window, now_ms):
    """Is the window open at now_ms? None (no window set) means always."""
    if window is None:
        return True
    local_min = now_ms // 60000 + window["utc_offset_min"]
    day = DAYS[(local_min // 1440 + 3) % 7]          # 1970-01-01 was a Thursday
    yesterday = DAYS[(local_min // 1440 + 2) % 7]
    minute = local_min % 1440
    start, end = _minutes(window["start"]), _minutes(window["end"])
    if start == end:
        return day in window["days"]
    if start < end:
        return day in window["days"] and start <= minute < end
    return (day in window["days"] and minute >= start) or (yesterday in window["days"] and minute < end)


def _minutes(hhmm):
    return int(hhmm[:2]) * 60 + int(hhmm[3:])
