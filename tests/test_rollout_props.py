"""Hypothesis over the rollout engine: random sequences of device reports,
time steps, operator commands, kill switch and cloud restarts (the db is
reopened), checked after every step against invariants:

- a halted or aborted rollout is never offered again;
- no device is offered the same rollout twice, and a cohort never gets
  more offers than it has members;
- a cohort over its failure threshold never lets the next cohort start;
- a rollback campaign offers only to devices that confirmed the stopped release;
- every (state, command) pair is in the table or refused, leaving the state.
"""

import os
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloud import rollout_plan as rp
from cloud.rollout import Engine, Policy
from cloud.rollout_actions import Offer
from cloud.rollout_plan import RolloutError
from tests.test_rollout_engine import HW, NOW, release
from simulator import firmware_faults as ff

DEVICES = 12
PLAN = {"silence_s": 300, "reach_s": 900, "rollback_release": "sim-v1-1.0.0", "stages": [
    {"name": "canary", "count": 3, "soak_s": 600, "failure_pct": 34},
    {"name": "half", "percent": 50, "soak_s": 600, "failure_pct": 20},
    {"name": "all", "percent": 100, "soak_s": 0, "failure_pct": 20}]}

ops = st.one_of(
    st.tuples(st.just("tick"), st.integers(1, 1200)),
    st.tuples(st.just("report"), st.integers(0, DEVICES - 1), st.sampled_from(rp.REPORTS), st.booleans()),
    st.tuples(st.just("report"), st.integers(0, DEVICES - 1), st.just("confirmed"), st.just(True)),
    st.tuples(st.just("command"), st.sampled_from(["pause", "resume", "abort"])),
    st.tuples(st.just("kill"),),
    st.tuples(st.just("restart"),),
)


def _setup(path):
    e = Engine(path, Policy())
    e.set_trust(ff.root_public_key(), 2, [HW], "alice", NOW)
    e.add_release(*release("1.0.0"), actor="alice", now_ms=NOW)
    e.add_release(*release("1.1.0"), actor="alice", now_ms=NOW)
    for i in range(DEVICES):
        tenant = ("acme", "globex")[i % 2]
        e.observe("%s/d%02d" % (tenant, i), tenant, "s", HW, "1.0.0", NOW)
    rid = e.create("sim-v1-1.1.0", PLAN, "alice", "prop", NOW)
    e.approve(rid, "bob", NOW)
    e.approve(rid, "carol", NOW)
    return e, rid


class Checker:
    def __init__(self, e, rid):
        self.rid = rid
        self.offered = set()
        self.stopped = False

    def actions(self, e, actions):
        for a in actions:
            if isinstance(a, Offer) and a.rollout == self.rid + "-rollback":
                member = [m for m in e.members(self.rid) if m["device"] == a.device]
                assert member and e.device(a.device)["version"] == "1.1.0" and \
                    e.device(a.device)["status"] == "confirmed", "rollback offered to a device not on the release"
                assert self.stopped
            if not isinstance(a, Offer) or a.rollout != self.rid:
                continue
            assert not self.stopped, "offer after halt/abort: %r" % (a,)
            assert a.device not in self.offered, "offered twice: %s" % a.device
            self.offered.add(a.device)

    def state(self, e, before):
        status = e.status(self.rid)
        if status["state"] in (rp.HALTED, rp.ABORTED):
            self.stopped = True
        members = e.members(self.rid)
        for cohort in status["cohorts"]:
            offered = [m for m in members if m["stage"] == cohort["stage"] and m["offered_ms"] is not None]
            assert len(offered) <= cohort["size"]
        if status["stage"] > before["stage"] >= 0:      # a cohort just passed
            for c in status["cohorts"][:status["stage"]]:
                assert c["failed"] <= c["failures_max"], "next cohort started past a failed gate: %r" % c
        for c in status["cohorts"]:
            if c["failed"] > c["failures_max"]:
                assert status["state"] in (rp.HALTED, rp.ABORTED), status


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_random_report_sequences_keep_invariants(steps):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.db")
        e, rid = _setup(path)
        check = Checker(e, rid)
        now = NOW
        seqs = {}
        try:
            for step in steps:
                before = e.status(rid)
                actions = _apply(e, rid, step, now, seqs)
                if step[0] == "restart":
                    e.close()
                    e = Engine(path, Policy())
                if step[0] == "tick":
                    now += step[1] * 1000
                    actions = e.tick(now)
                check.actions(e, actions)
                check.state(e, before)
            check.actions(e, e.tick(now + 10 ** 7))
            final = e.status(rid)
            event("final state %s, cohort %d" % (final["state"], final["stage"]))
        finally:
            e.close()


def _apply(e, rid, step, now, seqs):
    kind = step[0]
    if kind == "report":            # mostly about a device the rollout offered something
        members = [m["device"] for m in e.members(rid) if m["offered_ms"] is not None]
        pool = members if step[3] and members else [d["device"] for d in e.devices()]
        device = pool[step[1] % len(pool)]
        seqs[device] = seqs.get(device, 0) + 1
        return e.report(device, step[2], "", seqs[device], now)
    if kind == "command":
        try:
            return getattr(e, step[1])(rid, "dave", "prop", now)
        except RolloutError as err:
            assert err.code == "bad_transition"
            return []
    if kind == "kill":
        return e.kill("erin", "prop", now)
    return []


def test_every_state_command_pair_is_in_the_table_or_refused():
    commands = ("approved", "pause", "resume", "abort", "halt", "kill", "complete")
    states = (rp.AWAITING_APPROVAL, rp.RUNNING, rp.PAUSED, rp.HALTED, rp.ABORTED, rp.COMPLETED)
    for state in states:
        for command in commands:
            want = rp.ROLLOUT_TRANSITIONS.get((state, command))
            try:
                got = rp.next_state(state, command)
            except RolloutError as err:
                assert want is None and err.code == "bad_transition"
            else:
                assert got == want
    for state in (rp.HALTED, rp.ABORTED, rp.COMPLETED):         # terminal
        assert not [c for c in commands if (state, c) in rp.ROLLOUT_TRANSITIONS]


@given(st.sampled_from(rp.UNSETTLED + (rp.CONFIRMED, rp.SILENT, rp.UNREACHED, rp.CANCELLED) + rp.FAILED),
       st.sampled_from(rp.REPORTS))
def test_member_table_never_leaves_a_verdict(state, report):
    new = rp.MEMBER_TRANSITIONS.get((state, report))
    if state in (rp.CONFIRMED, rp.REJECTED, rp.ROLLED_BACK, rp.SILENT):
        assert new is None                    # verdicts are final for the gate
    if state == rp.SELECTED:
        assert new is None                    # not offered: a report is not about this rollout
