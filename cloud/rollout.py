"""Staged rollouts: the cloud's engine (issue 5).

Sans-IO in the way that matters here: the engine never reads a clock,
never talks to a device and never sleeps. Every call takes `now_ms`; the
calls that can move a device return actions (cloud.rollout_actions: Offer,
Cancel) for a transport to carry out. Everything is kept in SQLite (its
own tables, prefixed `rollout`), each call in one transaction, so a cloud
that restarts opens the same file and carries on exactly where it was.

    engine = Engine(path, Policy())
    engine.set_trust(root_public_key, k, ["sim-v1"], actor, now_ms)
    engine.add_release(bundle, payload, actor, now_ms)        # verified, or refused
    engine.set_window("acme", {"start": "02:00", "end": "04:00"}, actor, now_ms)
    engine.observe(device, tenant, site, hw_class, version, now_ms)
    rid = engine.create(release_id, plan, actor, reason, now_ms)
    engine.approve(rid, other_person, now_ms)                   # k distinct, not the requester
    actions = engine.tick(now_ms)                               # offers, gates, soak, monitoring
    actions = engine.report(device, "installed", "", seq, now_ms)
    engine.pause / resume / abort(rid, actor, reason, now_ms); engine.kill(actor, reason, now_ms)

States and their transitions are tables in cloud/rollout_plan.py; the
plan format is described there and in docs/rollouts.md.
"""

import json
import sqlite3

from cloud import db
from cloud import rollout_plan as rp
from cloud.rollout_actions import Cancel, Offer
from cloud.rollout_release import MIN_VALIDITY_S_DEFAULT, check_release
from cloud.rollout_plan import RolloutError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout_trust (
    id INTEGER PRIMARY KEY CHECK (id = 1), root BLOB NOT NULL, k INTEGER NOT NULL,
    hw_classes TEXT NOT NULL, set_by TEXT NOT NULL, set_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_releases (
    id TEXT PRIMARY KEY, hw_class TEXT NOT NULL, version TEXT NOT NULL,
    security_version INTEGER NOT NULL, keyset_version INTEGER NOT NULL, expires_s INTEGER NOT NULL,
    rollout_tag TEXT NOT NULL, size INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL,
    signers TEXT NOT NULL, bundle BLOB NOT NULL, payload BLOB NOT NULL,
    added_by TEXT NOT NULL, added_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, kind TEXT NOT NULL, release TEXT NOT NULL,
    parent TEXT, state TEXT NOT NULL, plan TEXT NOT NULL, approvals_required INTEGER NOT NULL,
    requested_by TEXT NOT NULL, reason TEXT NOT NULL, created_ms INTEGER NOT NULL,
    state_ms INTEGER NOT NULL, stage INTEGER NOT NULL, stage_started_ms INTEGER,
    stage_settled_ms INTEGER);
CREATE TABLE IF NOT EXISTS rollout_approvals (
    rollout TEXT NOT NULL, approver TEXT NOT NULL, ts_ms INTEGER NOT NULL, note TEXT NOT NULL,
    PRIMARY KEY (rollout, approver));
CREATE TABLE IF NOT EXISTS rollout_members (
    rollout TEXT NOT NULL, device TEXT NOT NULL, stage INTEGER NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', selected_ms INTEGER NOT NULL, offered_ms INTEGER,
    installed_ms INTEGER, last_ms INTEGER NOT NULL, done_ms INTEGER,
    PRIMARY KEY (rollout, device));
CREATE INDEX IF NOT EXISTS rollout_members_by_stage ON rollout_members (rollout, stage, state);
CREATE INDEX IF NOT EXISTS rollout_members_by_device ON rollout_members (device);
CREATE TABLE IF NOT EXISTS rollout_devices (
    device TEXT PRIMARY KEY, tenant TEXT NOT NULL, site TEXT NOT NULL, hw_class TEXT NOT NULL,
    version TEXT NOT NULL, last_seen_ms INTEGER NOT NULL, last_seq INTEGER NOT NULL DEFAULT -1,
    status TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', status_ms INTEGER,
    rollout TEXT);
CREATE TABLE IF NOT EXISTS rollout_windows (
    tenant TEXT PRIMARY KEY, spec TEXT NOT NULL, set_by TEXT NOT NULL, set_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    rollout TEXT NOT NULL, stage INTEGER, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rollout_events_by_rollout ON rollout_events (rollout, id);
CREATE TABLE IF NOT EXISTS rollout_incidents (
    id INTEGER PRIMARY KEY, rollout TEXT NOT NULL, ts_ms INTEGER NOT NULL, stage INTEGER,
    tripped TEXT NOT NULL, devices TEXT NOT NULL, actions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_alerts (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL, opened_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL, closed_ms INTEGER, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rollout_alerts_open ON rollout_alerts (kind, subject, closed_ms);
CREATE TABLE IF NOT EXISTS rollout_control (
    name TEXT PRIMARY KEY, value TEXT NOT NULL, set_by TEXT NOT NULL, set_ms INTEGER NOT NULL,
    reason TEXT NOT NULL);
"""

TEXT_MAX = 500
SYSTEM_ACTOR = "cloud"            # the engine's own records; no person may use it
ROLLOUTS_LISTED_MAX = 1000
ALERTS_LISTED_MAX = 10000
INCIDENT_DEVICES_MAX = 1000       # an incident names at most this many devices (and says so)


class Policy:
    """approvals_required distinct people approve a rollout before it
    starts; the requester is not one of them unless requester_may_approve.
    offers_per_tick_max bounds each tick's output; stall_s, outdated_grace_s
    and alert_fraction drive the monitoring records."""

    def __init__(self, approvals_required=2, requester_may_approve=False,
                 min_validity_s=MIN_VALIDITY_S_DEFAULT, offers_per_tick_max=10000,
                 stall_s=3600, outdated_grace_s=86400, alert_fraction=0.5):
        if approvals_required < 1 or offers_per_tick_max < 1:
            raise ValueError("approvals_required >= 1 and offers_per_tick_max >= 1")
        self.approvals_required = approvals_required
        self.requester_may_approve = requester_may_approve
        self.min_validity_s = min_validity_s
        self.offers_per_tick_max = offers_per_tick_max
        self.stall_s = stall_s
        self.outdated_grace_s = outdated_grace_s
        self.alert_fraction = alert_fraction


class Engine:
    def __init__(self, db_path, policy=None):
        self.policy = policy or Policy()
        self._db = db.connect(db_path)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)

    def close(self):
        self._db.close()

    def _atomic(self, fn):
        """fn() in one transaction: a state change, its records and its actions land together."""
        return db.atomic(self._db, fn)

    def _rows(self, sql, args=()):
        return [dict(row) for row in self._db.execute(sql, args)]

    def _row(self, sql, args=()):
        row = self._db.execute(sql, args).fetchone()
        return None if row is None else dict(row)

    def _event(self, now_ms, actor, action, rollout, stage=None, **detail):
        self._db.execute("INSERT INTO rollout_events (ts_ms, actor, action, rollout, stage, detail)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (now_ms, actor, action, rollout, stage, json.dumps(detail, sort_keys=True)))

    # ------------------------------------------------------------ trust and releases

    def set_trust(self, root_public_key, k, hw_classes, actor, now_ms):
        """What the cloud trusts: the root key devices trust, the k they require, the hardware it serves."""
        _person(actor)
        if not isinstance(root_public_key, bytes) or len(root_public_key) != 65:
            raise RolloutError("the root public key is 65 bytes (uncompressed P-256)", "bad_trust")
        if type(k) is not int or not 1 <= k <= 8 or not hw_classes:
            raise RolloutError("k is 1..8 and at least one hardware class is served", "bad_trust")

        def op():
            self._db.execute("INSERT OR REPLACE INTO rollout_trust VALUES (1, ?, ?, ?, ?, ?)",
                             (root_public_key, k, json.dumps(sorted(set(hw_classes))), actor, now_ms))
            self._event(now_ms, actor, "trust_set", "-", k=k, hw_classes=sorted(set(hw_classes)))
        self._atomic(op)

    def trust(self):
        row = self._row("SELECT root, k, hw_classes FROM rollout_trust WHERE id = 1")
        if row is None:
            raise RolloutError("no trust settings yet: `tether cloud releases trust` first", "no_trust")
        return {"root": row["root"], "k": row["k"], "hw_classes": json.loads(row["hw_classes"])}

    def add_release(self, bundle, payload, actor, now_ms):
        """Verify and register a release; its record, or RolloutError (the refusal is recorded too)."""
        _person(actor)
        trust = self.trust()
        try:
            rec = check_release(bytes(bundle), bytes(payload), trust, self._floors(), now_ms // 1000,
                                self.policy.min_validity_s)
        except RolloutError as e:
            refusal = {"code": e.code, "message": e.message}
            self._atomic(lambda: self._event(now_ms, actor, "release_refused", "-", **refusal))
            raise
        same = self._row("SELECT manifest_sha256 FROM rollout_releases WHERE id = ?", (rec["id"],))
        if same is not None:
            if same["manifest_sha256"] == rec["manifest_sha256"]:
                return self.release(rec["id"])
            raise RolloutError("release %s exists with a different manifest" % rec["id"], "duplicate")

        def op():
            self._db.execute(
                "INSERT INTO rollout_releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec["id"], rec["hw_class"], rec["version"], rec["security_version"],
                 rec["keyset_version"], rec["expires_s"], rec["rollout_tag"], rec["size"],
                 rec["manifest_sha256"], json.dumps(rec["signers"]), bytes(bundle), bytes(payload),
                 actor, now_ms))
            self._event(now_ms, actor, "release_added", "-", release=rec["id"],
                        security_version=rec["security_version"], signers=rec["signers"])
        self._atomic(op)
        return self.release(rec["id"])

    def _floors(self):
        """Per hardware class, the highest security and key-set versions a completed rollout confirmed."""
        floors = {}
        for row in self._rows(
                "SELECT hw_class, MAX(security_version) AS sv, MAX(keyset_version) AS ksv"
                " FROM rollout_releases WHERE id IN (SELECT release FROM rollouts WHERE state = ?)"
                " GROUP BY hw_class", (rp.COMPLETED,)):
            floors[row["hw_class"]] = {"security_version": row["sv"], "keyset_version": row["ksv"]}
        return floors

    def release(self, release_id):
        row = self._row("SELECT * FROM rollout_releases WHERE id = ?", (release_id,))
        if row is None:
            raise RolloutError("no release %r" % release_id, "unknown_release")
        return _release_dict(row)

    def releases(self):
        return [_release_dict(r) for r in self._rows("SELECT * FROM rollout_releases ORDER BY added_ms, id")]

    def release_blobs(self, release_id):
        """(bundle, payload) for the transport to send."""
        row = self._row("SELECT bundle, payload FROM rollout_releases WHERE id = ?", (release_id,))
        if row is None:
            raise RolloutError("no release %r" % release_id, "unknown_release")
        return row["bundle"], row["payload"]

    # ------------------------------------------------------------ windows and fleet

    def set_window(self, tenant, spec, actor, now_ms):
        """The tenant's maintenance window; spec None removes it (always open)."""
        _person(actor)
        _text(tenant, "tenant")
        window = None if spec is None else rp.parse_window(spec)

        def op():
            if window is None:
                self._db.execute("DELETE FROM rollout_windows WHERE tenant = ?", (tenant,))
            else:
                self._db.execute("INSERT OR REPLACE INTO rollout_windows VALUES (?, ?, ?, ?)",
                                 (tenant, json.dumps(window), actor, now_ms))
            self._event(now_ms, actor, "window_set", "-", tenant=tenant, window=window)
        self._atomic(op)
        return window

    def windows(self):
        return {r["tenant"]: json.loads(r["spec"]) for r in self._rows("SELECT * FROM rollout_windows")}

    def observe(self, device, tenant, site, hw_class, version, now_ms):
        """A device announced itself (hello or telemetry): what it is and what it runs."""
        for value, what in ((device, "device"), (tenant, "tenant"), (site, "site"),
                            (hw_class, "hw_class"), (version, "version")):
            _text(value, what)
        self._atomic(lambda: self._db.execute(
            "INSERT INTO rollout_devices (device, tenant, site, hw_class, version, last_seen_ms)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET tenant = excluded.tenant,"
            " site = excluded.site, hw_class = excluded.hw_class, version = excluded.version,"
            " last_seen_ms = excluded.last_seen_ms", (device, tenant, site, hw_class, version, now_ms)))

    def device(self, device):
        return self._row("SELECT * FROM rollout_devices WHERE device = ?", (device,))

    def devices(self):
        return self._rows("SELECT * FROM rollout_devices ORDER BY device")

    # ------------------------------------------------------------ reports

    def report(self, device, status, reason, seq, now_ms, release=None):
        """A device's update status report (agent.updater's vocabulary). Reports
        are sequenced per device: one with a seq at or below the last kept is
        a repeat and changes nothing. `release` is the release the report is
        about (the updater's Report.ref, the id the offer named): a report
        about another release than the device's rollout is recorded and does
        not move the member. None: attributed to the latest offer. Returns
        actions (a halt cancels offers)."""
        if status not in rp.REPORTS:
            raise RolloutError("unknown report status %r" % (status,), "bad_report")
        if type(seq) is not int or seq < 0:
            raise RolloutError("seq is a non-negative integer", "bad_report")
        if release is not None:
            _text(release, "release")
        return self._atomic(lambda: self._report(device, status, str(reason or "")[:TEXT_MAX], seq, now_ms,
                                                 release))

    def _report(self, device, status, reason, seq, now_ms, release=None):
        dev = self.device(device)
        if dev is None:
            raise RolloutError("unknown device %r: observe it first" % device, "unknown_device")
        if seq <= dev["last_seq"]:
            return []
        self._db.execute("UPDATE rollout_devices SET last_seq = ?, status = ?, reason = ?,"
                         " status_ms = ?, last_seen_ms = ? WHERE device = ?",
                         (seq, status, reason, now_ms, now_ms, device))
        if dev["rollout"] is None:
            return []
        member = self._row("SELECT * FROM rollout_members WHERE rollout = ? AND device = ?",
                           (dev["rollout"], device))
        r = self._rollout(dev["rollout"])
        if release is not None and release != r["release"]:
            self._event(now_ms, SYSTEM_ACTOR, "other_release_report", r["id"], member["stage"], device=device,
                        release=release, status=status, reason=reason)
            return []
        new = rp.MEMBER_TRANSITIONS.get((member["state"], status))
        if status == rp.CONFIRMED:      # it runs the release now, even if counted silent before
            version = self._row("SELECT version FROM rollout_releases WHERE id = ?", (r["release"],))["version"]
            self._db.execute("UPDATE rollout_devices SET version = ? WHERE device = ?", (version, device))
            self._join_campaign(r, device, now_ms)
        if new is None:
            self._event(now_ms, SYSTEM_ACTOR, "late_report", r["id"], member["stage"], device=device,
                        member_state=member["state"], status=status, reason=reason)
            return []
        self._set_member(r, member, new, reason, now_ms)
        if r["state"] in (rp.RUNNING, rp.PAUSED):
            return self._check_gates(r, now_ms)
        return []

    def _set_member(self, r, member, state, reason, now_ms):
        installed = member["installed_ms"]
        if installed is None and state in rp.PAST_INSTALL:
            installed = now_ms
        done = now_ms if state not in rp.UNSETTLED and state != rp.UNREACHED else None
        self._db.execute("UPDATE rollout_members SET state = ?, reason = ?, installed_ms = ?,"
                         " last_ms = ?, done_ms = ? WHERE rollout = ? AND device = ?",
                         (state, reason, installed, now_ms, done, r["id"], member["device"]))
        if state in rp.FAILED:
            self._event(now_ms, SYSTEM_ACTOR, "device_failed", r["id"], member["stage"],
                        device=member["device"], state=state, reason=reason)

    # ------------------------------------------------------------ rollouts: people's commands

    def create(self, release_id, plan, actor, reason, now_ms):
        """Request a rollout of a registered release; it starts once approved."""
        _person(actor)
        _text(reason, "reason")
        plan = rp.parse_plan(plan)
        return self._atomic(lambda: self._create(release_id, plan, actor, reason, now_ms))

    def _create(self, release_id, plan, actor, reason, now_ms):
        if self.killed():
            raise RolloutError("the kill switch is engaged: no rollout may start", "kill_switch")
        rel = self.release(release_id)
        busy = self._row("SELECT r.id FROM rollouts r JOIN rollout_releases x ON x.id = r.release"
                         " WHERE r.kind = 'rollout' AND x.hw_class = ? AND r.state IN (?, ?, ?)",
                         (rel["hw_class"],) + rp.IN_FLIGHT)
        if busy:
            raise RolloutError("rollout %s for %s is in flight; one at a time per hardware class"
                               % (busy["id"], rel["hw_class"]), "concurrent_rollout")
        if plan["rollback_release"] is not None:
            self._check_rollback_target(rel, plan["rollback_release"])
        seq = self._db.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] + 1
        rid = "ro-%d" % seq
        self._db.execute("INSERT INTO rollouts (id, seq, kind, release, state, plan, approvals_required,"
                         " requested_by, reason, created_ms, state_ms, stage) VALUES"
                         " (?, ?, 'rollout', ?, ?, ?, ?, ?, ?, ?, ?, -1)",
                         (rid, seq, release_id, rp.AWAITING_APPROVAL, json.dumps(plan),
                          self.policy.approvals_required, actor, reason, now_ms, now_ms))
        self._event(now_ms, actor, "requested", rid, release=release_id, plan=plan, reason=reason,
                    approvals_required=self.policy.approvals_required)
        return rid

    def _check_rollback_target(self, rel, target_id):
        target = self.release(target_id)
        if target["hw_class"] != rel["hw_class"]:
            raise RolloutError("rollback release %s is for %s, not %s"
                               % (target_id, target["hw_class"], rel["hw_class"]), "rollback_hw_class")
        if target["security_version"] < rel["security_version"]:
            raise RolloutError("rollback release %s has security version %d, below %d of %s: devices"
                               " that confirmed %s would refuse it; build the known-good image with"
                               " security version >= %d" % (target_id, target["security_version"],
                                                            rel["security_version"], rel["id"], rel["id"],
                                                            rel["security_version"]), "rollback_downgrade")
        return target

    def approve(self, rollout_id, actor, now_ms, note=""):
        """Record actor's approval; the rollout starts when enough distinct people approved."""
        _person(actor)
        return self._atomic(lambda: self._approve(rollout_id, actor, str(note)[:TEXT_MAX], now_ms))

    def _approve(self, rollout_id, actor, note, now_ms):
        r = self._rollout(rollout_id)
        if r["state"] != rp.AWAITING_APPROVAL:
            raise RolloutError("rollout %s is %s, not awaiting approval" % (rollout_id, r["state"]),
                               "not_awaiting_approval")
        if actor == r["requested_by"] and not self.policy.requester_may_approve:
            raise RolloutError("%s requested rollout %s and may not approve it" % (actor, rollout_id),
                               "requester_approval")
        if self._row("SELECT 1 FROM rollout_approvals WHERE rollout = ? AND approver = ?",
                     (rollout_id, actor)):
            raise RolloutError("%s already approved rollout %s; the same person twice counts once"
                               % (actor, rollout_id), "duplicate_approval")
        self._db.execute("INSERT INTO rollout_approvals VALUES (?, ?, ?, ?)", (rollout_id, actor, now_ms, note))
        count = len(self.approvals(rollout_id))
        self._event(now_ms, actor, "approved", rollout_id, approvals=count,
                    approvals_required=r["approvals_required"], note=note)
        if count >= r["approvals_required"]:
            self._transition(r, "approved", SYSTEM_ACTOR, "approved by %d people" % count, now_ms)
        return count

    def approvals(self, rollout_id):
        return self._rows("SELECT approver, ts_ms, note FROM rollout_approvals WHERE rollout = ?"
                          " ORDER BY ts_ms, approver", (rollout_id,))

    def pause(self, rollout_id, actor, reason, now_ms):
        return self._command(rollout_id, "pause", actor, reason, now_ms)

    def resume(self, rollout_id, actor, reason, now_ms):
        return self._command(rollout_id, "resume", actor, reason, now_ms)

    def abort(self, rollout_id, actor, reason, now_ms):
        """Stop for good: no further offers, outstanding ones withdrawn (Cancel actions)."""
        return self._command(rollout_id, "abort", actor, reason, now_ms)

    def _command(self, rollout_id, command, actor, reason, now_ms):
        _person(actor)
        _text(reason, "reason")

        def op():
            r = self._rollout(rollout_id)
            self._transition(r, command, actor, reason, now_ms)
            if command == "abort":
                return self._cancel_outstanding(r, "aborted: %s" % reason, now_ms)[0]
            return []
        return self._atomic(op)

    def _transition(self, r, command, actor, reason, now_ms):
        new = rp.next_state(r["state"], command)
        self._db.execute("UPDATE rollouts SET state = ?, state_ms = ? WHERE id = ?", (new, now_ms, r["id"]))
        self._event(now_ms, actor, command, r["id"], r["stage"] if r["stage"] >= 0 else None,
                    state_from=r["state"], state_to=new, reason=reason)
        r["state"] = new

    def rollback(self, rollout_id, target_release, actor, reason, now_ms):
        """Start a rollback campaign by hand for a halted or aborted rollout."""
        _person(actor)
        _text(reason, "reason")

        def op():
            r = self._rollout(rollout_id)
            if r["state"] not in (rp.HALTED, rp.ABORTED) or r["kind"] != "rollout":
                raise RolloutError("only a halted or aborted rollout is rolled back", "bad_transition")
            return self._start_campaign(r, target_release, actor, reason, now_ms)
        return self._atomic(op)

    # ------------------------------------------------------------ the kill switch

    def kill(self, actor, reason, now_ms):
        """Stop every rollout in flight at once (halted, with an incident each) and
        refuse new ones until unkill. Returns the Cancel actions."""
        _person(actor)
        _text(reason, "reason")

        def op():
            self._db.execute("INSERT OR REPLACE INTO rollout_control VALUES ('kill', 'on', ?, ?, ?)",
                             (actor, now_ms, reason))
            self._event(now_ms, actor, "kill_switch_on", "-", reason=reason)
            actions = []
            for r in self._rows("SELECT * FROM rollouts WHERE state IN (?, ?, ?) ORDER BY seq", rp.IN_FLIGHT):
                tripped = {"rule": "kill_switch", "actor": actor, "reason": reason}
                actions += self._halt(r, "kill", tripped, actor, now_ms, campaign=False)
            return actions
        return self._atomic(op)

    def unkill(self, actor, reason, now_ms):
        _person(actor)
        _text(reason, "reason")

        def op():
            self._db.execute("DELETE FROM rollout_control WHERE name = 'kill'")
            self._event(now_ms, actor, "kill_switch_off", "-", reason=reason)
        self._atomic(op)

    def killed(self):
        return self._row("SELECT set_by, set_ms, reason FROM rollout_control WHERE name = 'kill'")

    # ------------------------------------------------------------ time passes

    def tick(self, now_ms):
        """Silence and reach verdicts, health gates, offers inside windows, soak and
        the next cohort, monitoring records. Returns the actions, in order."""
        def op():
            actions = []
            budget = [self.policy.offers_per_tick_max]
            for r in self._rows("SELECT * FROM rollouts WHERE state IN (?, ?) ORDER BY seq",
                                (rp.RUNNING, rp.PAUSED)):
                actions += self._advance(r, now_ms, budget)
            self._monitor(now_ms)
            return actions
        return self._atomic(op)

    def _advance(self, r, now_ms, budget):
        plan = json.loads(r["plan"])
        self._sweep(r, plan, now_ms)
        actions = self._check_gates(r, now_ms)
        if actions or r["state"] != rp.RUNNING or self.killed():
            return actions
        for _ in range(rp.STAGES_MAX + 1):        # empty cohorts with no soak pass at once
            if r["stage"] < 0:
                self._start_stage(r, plan, 0, now_ms)
            actions += self._offer(r, now_ms, budget)
            if not self._settle(r, plan, now_ms):
                break
        return actions

    def _sweep(self, r, plan, now_ms):
        """Installed and silent past silence_s: failed. Offered, no word past reach_s: unreached."""
        for m in self._rows("SELECT * FROM rollout_members WHERE rollout = ? AND state IN (?, ?, ?)"
                            " AND installed_ms <= ?", (r["id"],) + rp.PAST_INSTALL
                            + (now_ms - plan["silence_s"] * 1000,)):
            self._set_member(r, m, rp.SILENT, "no confirmed within %d s of %s" % (plan["silence_s"], m["state"]),
                             now_ms)
        for m in self._rows("SELECT * FROM rollout_members WHERE rollout = ? AND state IN (?, ?)"
                            " AND last_ms <= ?", (r["id"], rp.OFFERED, rp.DOWNLOADING,
                                                  now_ms - plan["reach_s"] * 1000)):
            self._set_member(r, m, rp.UNREACHED, "no report within %d s of %s" % (plan["reach_s"], m["state"]),
                             now_ms)

    def _check_gates(self, r, now_ms):
        """Halt when any started cohort has more failures than its threshold allows."""
        if r["stage"] < 0 or r["state"] not in (rp.RUNNING, rp.PAUSED):
            return []
        plan = json.loads(r["plan"])
        for index in range(r["stage"] + 1):
            stage = plan["stages"][index]
            counts = self._counts(r["id"], index)
            size = sum(counts.values())
            failed = sum(counts.get(s, 0) for s in rp.FAILED)
            limit = rp.failures_max(size, stage["failure_pct"])
            if failed > limit:
                tripped = {"rule": "failure_rate", "stage": stage["name"], "failed": failed, "size": size,
                           "failure_pct": stage["failure_pct"], "failures_max": limit,
                           "by_state": {s: counts.get(s, 0) for s in rp.FAILED}}
                return self._halt(r, "halt", tripped, SYSTEM_ACTOR, now_ms, stage_index=index)
        return []

    def _counts(self, rollout_id, stage):
        return {row["state"]: row["n"] for row in self._rows(
            "SELECT state, COUNT(*) AS n FROM rollout_members WHERE rollout = ? AND stage = ?"
            " GROUP BY state", (rollout_id, stage))}

    def _start_stage(self, r, plan, index, now_ms):
        stage = plan["stages"][index]
        rel = self.release(r["release"])
        eligible = self._rows(
            "SELECT device, tenant, site, hw_class FROM rollout_devices d WHERE hw_class = ? AND"
            " (version != ? OR device IN (SELECT device FROM rollout_members WHERE rollout = ?))",
            (rel["hw_class"], rel["version"], r["id"]))
        eligible.sort(key=lambda d: rp.rank(r["id"], d["device"]))
        # taken: members already, busy in another rollout, or by their own last word mid-update
        # (a device counted silent may still be in its trial: its next report must not land here)
        taken = {row["device"] for row in self._rows(
            "SELECT device FROM rollout_members WHERE rollout = ? OR state IN (?, ?, ?, ?, ?, ?)"
            " UNION SELECT device FROM rollout_devices WHERE status IN (?, ?, ?, ?)",
            (r["id"],) + rp.UNSETTLED + (rp.DOWNLOADING,) + rp.PAST_INSTALL)}
        chosen = rp.choose_cohort(stage, eligible, taken)
        for device in chosen:
            self._db.execute("INSERT INTO rollout_members (rollout, device, stage, state, selected_ms,"
                             " last_ms) VALUES (?, ?, ?, ?, ?, ?)", (r["id"], device, index, rp.SELECTED,
                                                                     now_ms, now_ms))
        self._db.execute("UPDATE rollouts SET stage = ?, stage_started_ms = ?, stage_settled_ms = NULL"
                         " WHERE id = ?", (index, now_ms, r["id"]))
        r.update(stage=index, stage_started_ms=now_ms, stage_settled_ms=None)
        self._event(now_ms, SYSTEM_ACTOR, "cohort_started", r["id"], index, name=stage["name"],
                    size=len(chosen), eligible=len(eligible), devices=chosen[:INCIDENT_DEVICES_MAX])

    def _offer(self, r, now_ms, budget):
        windows = self.windows()
        actions = []
        for m in self._rows("SELECT m.device, d.tenant FROM rollout_members m JOIN rollout_devices d"
                            " ON d.device = m.device WHERE m.rollout = ? AND m.stage = ? AND m.state = ?"
                            " ORDER BY m.device", (r["id"], r["stage"], rp.SELECTED)):
            if budget[0] <= 0:
                break
            if not rp.window_open(windows.get(m["tenant"]), now_ms):
                continue
            budget[0] -= 1
            self._db.execute("UPDATE rollout_members SET state = ?, offered_ms = ?, last_ms = ?"
                             " WHERE rollout = ? AND device = ?", (rp.OFFERED, now_ms, now_ms, r["id"], m["device"]))
            self._db.execute("UPDATE rollout_devices SET rollout = ? WHERE device = ?", (r["id"], m["device"]))
            actions.append(Offer(m["device"], r["release"], r["id"]))
        if actions:
            self._event(now_ms, SYSTEM_ACTOR, "offered", r["id"], r["stage"], count=len(actions))
        return actions

    def _settle(self, r, plan, now_ms):
        """True when the rollout moved to its next stage (the caller offers again)."""
        counts = self._counts(r["id"], r["stage"])
        if any(counts.get(s) for s in rp.UNSETTLED) or self._parent_unsettled(r):
            return False
        stage = plan["stages"][r["stage"]]
        if r["stage_settled_ms"] is None:      # the soak counts from the cohort's last verdict
            last = self._db.execute("SELECT MAX(last_ms) FROM rollout_members WHERE rollout = ? AND stage = ?",
                                    (r["id"], r["stage"])).fetchone()[0]
            settled = max(last or 0, r["stage_started_ms"] or 0)
            self._db.execute("UPDATE rollouts SET stage_settled_ms = ? WHERE id = ?", (settled, r["id"]))
            r["stage_settled_ms"] = settled
            self._event(now_ms, SYSTEM_ACTOR, "cohort_settled", r["id"], r["stage"], name=stage["name"],
                        counts=counts)
        if now_ms < r["stage_settled_ms"] + stage["soak_s"] * 1000:
            return False
        self._event(now_ms, SYSTEM_ACTOR, "cohort_passed", r["id"], r["stage"], name=stage["name"],
                    counts=counts, soak_s=stage["soak_s"])
        if r["stage"] + 1 >= len(plan["stages"]):
            self._transition(r, "complete", SYSTEM_ACTOR, "every cohort passed", now_ms)
            return False
        self._start_stage(r, plan, r["stage"] + 1, now_ms)
        return True

    def _parent_unsettled(self, r):
        """A rollback campaign stays open while its halted rollout has devices mid-install."""
        if r["parent"] is None:
            return False
        return self._row("SELECT 1 FROM rollout_members WHERE rollout = ? AND state IN (?, ?, ?)",
                         (r["parent"],) + rp.PAST_INSTALL) is not None

    # ------------------------------------------------------------ halts, incidents, rollback

    def _halt(self, r, command, tripped, actor, now_ms, stage_index=None, campaign=True):
        self._transition(r, command, actor, tripped["rule"], now_ms)
        actions, cancelled = self._cancel_outstanding(r, "halted: %s" % tripped["rule"], now_ms)
        failed = self._rows("SELECT device, stage, state, reason FROM rollout_members WHERE rollout = ?"
                            " AND state IN (?, ?, ?) ORDER BY done_ms, device", (r["id"],) + rp.FAILED)
        finishing = [m["device"] for m in self._rows(
            "SELECT device FROM rollout_members WHERE rollout = ? AND state IN %s ORDER BY device"
            % _marks(rp.FINISHING), (r["id"],) + rp.FINISHING)]
        done = ["offers stopped", "%d outstanding offers withdrawn" % len(cancelled),
                "%d downloads in progress left to finish (a device cannot abandon a download yet)"
                % len(finishing)]
        plan = json.loads(r["plan"])
        if campaign and plan.get("rollback_release"):
            try:
                actions += self._start_campaign(r, plan["rollback_release"], SYSTEM_ACTOR,
                                                "automatic: plan's rollback_release", now_ms, done)
            except RolloutError as e:
                done.append("rollback campaign not started: %s (%s)" % (e.message, e.code))
        else:
            done.append("no rollback campaign (%s)" % ("kill switch" if not campaign else "plan names none"))
        self._db.execute("INSERT INTO rollout_incidents (rollout, ts_ms, stage, tripped, devices, actions)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (r["id"], now_ms, stage_index, json.dumps(tripped, sort_keys=True),
                          json.dumps({"failed": failed[:INCIDENT_DEVICES_MAX], "failed_total": len(failed),
                                      "cancelled": cancelled[:INCIDENT_DEVICES_MAX],
                                      "finishing": finishing[:INCIDENT_DEVICES_MAX]}, sort_keys=True),
                          json.dumps(done)))
        self._alert("halt", r["id"], now_ms, {"tripped": tripped, "actions": done})
        return actions

    def _cancel_outstanding(self, r, reason, now_ms):
        """Withdraw what was not installed yet: (Cancel actions, devices cancelled)."""
        actions, cancelled = [], []
        for m in self._rows("SELECT device, state FROM rollout_members WHERE rollout = ? AND state IN %s"
                            " ORDER BY device" % _marks(rp.CANCELLABLE), (r["id"],) + rp.CANCELLABLE):
            self._db.execute("UPDATE rollout_members SET state = ?, reason = ?, last_ms = ?, done_ms = ?"
                             " WHERE rollout = ? AND device = ?",
                             (rp.CANCELLED, reason, now_ms, now_ms, r["id"], m["device"]))
            cancelled.append(m["device"])
            if m["state"] != rp.SELECTED:
                actions.append(Cancel(m["device"], r["release"], r["id"], reason))
        return actions, cancelled

    def _start_campaign(self, r, target_id, actor, reason, now_ms, done=None):
        rel = self.release(r["release"])
        self._check_rollback_target(rel, target_id)
        cid = "%s-rollback" % r["id"]
        if self._row("SELECT 1 FROM rollouts WHERE id = ?", (cid,)):
            raise RolloutError("rollout %s already has a rollback campaign" % r["id"], "duplicate")
        took = [row["device"] for row in self._rows(
            "SELECT m.device FROM rollout_members m JOIN rollout_devices d ON d.device = m.device"
            " WHERE m.rollout = ? AND m.state = ? AND d.version = ? ORDER BY m.device",
            (r["id"], rp.CONFIRMED, rel["version"]))]
        plan = {"stages": [{"name": "rollback", "devices": took, "soak_s": 0, "failure_pct": 100}],
                "silence_s": json.loads(r["plan"])["silence_s"], "reach_s": json.loads(r["plan"])["reach_s"]}
        plan = rp.parse_plan(plan)
        seq = self._db.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] + 1
        self._db.execute("INSERT INTO rollouts (id, seq, kind, release, parent, state, plan, approvals_required,"
                         " requested_by, reason, created_ms, state_ms, stage) VALUES"
                         " (?, ?, 'rollback', ?, ?, ?, ?, 0, ?, ?, ?, ?, -1)",
                         (cid, seq, target_id, r["id"], rp.RUNNING, json.dumps(plan), actor, reason,
                          now_ms, now_ms))
        self._event(now_ms, actor, "rollback_started", r["id"], campaign=cid, release=target_id,
                    devices=len(took), reason=reason)
        self._event(now_ms, actor, "requested", cid, release=target_id, plan=plan, reason=reason,
                    parent=r["id"])
        self._start_stage(self._rollout(cid), plan, 0, now_ms)    # so late confirmers can join at once
        if done is not None:
            done.append("rollback campaign %s started: %d devices on %s told to go to %s (more join as"
                        " devices still installing confirm)" % (cid, len(took), rel["version"], target_id))
        return []

    def _join_campaign(self, r, device, now_ms):
        """A device of a stopped rollout confirmed after all: into its rollback campaign."""
        if r["state"] not in (rp.HALTED, rp.ABORTED):
            return
        c = self._row("SELECT * FROM rollouts WHERE parent = ? AND state IN (?, ?)",
                      (r["id"], rp.RUNNING, rp.PAUSED))
        if c is None:
            return
        self._db.execute("INSERT OR IGNORE INTO rollout_members (rollout, device, stage, state, selected_ms,"
                         " last_ms) VALUES (?, ?, 0, ?, ?, ?)", (c["id"], device, rp.SELECTED, now_ms, now_ms))
        self._db.execute("UPDATE rollouts SET stage_settled_ms = NULL WHERE id = ?", (c["id"],))
        self._event(now_ms, SYSTEM_ACTOR, "rollback_joined", c["id"], 0, device=device)

    # ------------------------------------------------------------ monitoring

    def _monitor(self, now_ms):
        self._monitor_stalled(now_ms)
        self._monitor_outdated(now_ms)
        self._monitor_failure_rate(now_ms)

    def _monitor_stalled(self, now_ms):
        stalled = {}
        for m in self._rows("SELECT m.rollout, m.device, m.state, m.last_ms FROM rollout_members m JOIN"
                            " rollouts r ON r.id = m.rollout WHERE m.state IN (?, ?, ?, ?, ?, ?) AND"
                            " m.last_ms <= ?", rp.UNSETTLED + (now_ms - self.policy.stall_s * 1000,)):
            if m["state"] != rp.SELECTED:
                stalled[m["device"]] = {"rollout": m["rollout"], "state": m["state"], "since_ms": m["last_ms"]}
        self._sync_alerts("stalled", stalled, now_ms)

    def _monitor_outdated(self, now_ms):
        outdated = {}
        for latest in self._rows(
                "SELECT x.hw_class, x.version, x.id, MAX(r.state_ms) AS done_ms FROM rollouts r JOIN"
                " rollout_releases x ON x.id = r.release WHERE r.state = ? AND r.kind = 'rollout'"
                " GROUP BY x.hw_class", (rp.COMPLETED,)):
            if now_ms < latest["done_ms"] + self.policy.outdated_grace_s * 1000:
                continue
            for d in self._rows("SELECT device, version FROM rollout_devices WHERE hw_class = ? AND version != ?",
                                (latest["hw_class"], latest["version"])):
                outdated[d["device"]] = {"version": d["version"], "expected": latest["version"],
                                         "release": latest["id"]}
        self._sync_alerts("outdated", outdated, now_ms)

    def _monitor_failure_rate(self, now_ms):
        high = {}
        for r in self._rows("SELECT * FROM rollouts WHERE state IN (?, ?) AND stage >= 0", (rp.RUNNING, rp.PAUSED)):
            plan = json.loads(r["plan"])
            for index in range(r["stage"] + 1):
                counts = self._counts(r["id"], index)
                size = sum(counts.values())
                failed = sum(counts.get(s, 0) for s in rp.FAILED)
                pct = plan["stages"][index]["failure_pct"]
                if failed and failed * 100 >= size * pct * self.policy.alert_fraction:
                    high["%s/%s" % (r["id"], plan["stages"][index]["name"])] = {
                        "failed": failed, "size": size, "failure_pct": pct,
                        "rate_pct": round(100.0 * failed / size, 2)}
        self._sync_alerts("failure_rate", high, now_ms)

    def _sync_alerts(self, kind, current, now_ms):
        """Open an alert per subject newly in `current`, update open ones, close the rest."""
        open_ = {a["subject"]: a for a in self._rows(
            "SELECT id, subject, detail FROM rollout_alerts WHERE kind = ? AND closed_ms IS NULL", (kind,))}
        for subject, detail in sorted(current.items()):
            text = json.dumps(detail, sort_keys=True)
            if subject not in open_:
                self._alert(kind, subject, now_ms, detail)
            elif open_[subject]["detail"] != text:
                self._db.execute("UPDATE rollout_alerts SET detail = ?, updated_ms = ? WHERE id = ?",
                                 (text, now_ms, open_[subject]["id"]))
        for subject, alert in open_.items():
            if subject not in current:
                self._db.execute("UPDATE rollout_alerts SET closed_ms = ?, updated_ms = ? WHERE id = ?",
                                 (now_ms, now_ms, alert["id"]))

    def _alert(self, kind, subject, now_ms, detail):
        self._db.execute("INSERT INTO rollout_alerts (kind, subject, opened_ms, updated_ms, detail)"
                         " VALUES (?, ?, ?, ?, ?)", (kind, subject, now_ms, now_ms, json.dumps(detail, sort_keys=True)))

    def alerts(self, kind=None, open_only=False, limit=ALERTS_LISTED_MAX):
        sql = "SELECT * FROM rollout_alerts WHERE 1 = 1"
        args = []
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if open_only:
            sql += " AND closed_ms IS NULL"
        sql += " ORDER BY id LIMIT ?"
        args.append(max(1, min(int(limit), ALERTS_LISTED_MAX)))
        rows = self._rows(sql, args)
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows

    # ------------------------------------------------------------ queries and records

    def _rollout(self, rollout_id):
        r = self._row("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if r is None:
            raise RolloutError("no rollout %r" % rollout_id, "unknown_rollout")
        return r

    def rollouts(self):
        return [self.status(r["id"]) for r in self._rows("SELECT id FROM rollouts ORDER BY seq LIMIT ?",
                                                         (ROLLOUTS_LISTED_MAX,))]

    def offer_for(self, device):
        """The release a device may fetch now, or None: the transport serves chunks
        only while this names the release, and re-sends it on reconnect. A download
        in progress stays served after a stop (see rollout_plan.FINISHING)."""
        row = self._row("SELECT m.rollout, r.release FROM rollout_members m JOIN rollouts r ON r.id = m.rollout"
                        " WHERE m.device = ? AND (m.state = ? OR (m.state IN (?, ?) AND r.state IN (?, ?)))"
                        " ORDER BY r.seq DESC",
                        (device, rp.DOWNLOADING, rp.OFFERED, rp.UNREACHED, rp.RUNNING, rp.PAUSED))
        return None if row is None else Offer(device, row["release"], row["rollout"])

    def members(self, rollout_id):
        return self._rows("SELECT device, stage, state, reason, selected_ms, offered_ms, installed_ms, done_ms"
                          " FROM rollout_members WHERE rollout = ? ORDER BY stage, device", (rollout_id,))

    def status(self, rollout_id):
        r = self._rollout(rollout_id)
        plan = json.loads(r["plan"])
        cohorts = []
        for index, stage in enumerate(plan["stages"]):
            counts = self._counts(r["id"], index) if index <= r["stage"] else {}
            size = sum(counts.values())
            cohorts.append({"stage": index, "name": stage["name"], "size": size, "counts": counts,
                            "failed": sum(counts.get(s, 0) for s in rp.FAILED),
                            "failures_max": rp.failures_max(size, stage["failure_pct"]),
                            "failure_pct": stage["failure_pct"], "soak_s": stage["soak_s"],
                            "started": index <= r["stage"]})
        return {"id": r["id"], "kind": r["kind"], "release": r["release"], "parent": r["parent"],
                "state": r["state"], "state_ms": r["state_ms"], "requested_by": r["requested_by"],
                "reason": r["reason"], "created_ms": r["created_ms"], "stage": r["stage"],
                "stage_started_ms": r["stage_started_ms"], "stage_settled_ms": r["stage_settled_ms"],
                "approvals_required": r["approvals_required"], "approvals": self.approvals(r["id"]),
                "plan": plan, "cohorts": cohorts}

    def events(self, rollout_id):
        rows = self._rows("SELECT ts_ms, actor, action, stage, detail FROM rollout_events WHERE rollout = ?"
                          " ORDER BY id", (rollout_id,))
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows

    def incidents(self, rollout_id=None):
        sql, args = "SELECT * FROM rollout_incidents", ()
        if rollout_id:
            sql, args = sql + " WHERE rollout = ?", (rollout_id,)
        rows = self._rows(sql + " ORDER BY id", args)
        for row in rows:
            for key in ("tripped", "devices", "actions"):
                row[key] = json.loads(row[key])
        return rows

    def export(self, rollout_id):
        """Everything a reviewer asks for about one rollout, as plain data (JSON-ready)."""
        status = self.status(rollout_id)
        campaigns = [self.export(c["id"]) for c in self._rows(
            "SELECT id FROM rollouts WHERE parent = ? ORDER BY seq", (rollout_id,))]
        timeline = self.events(rollout_id)
        by_cohort = {c["name"]: [ev for ev in timeline if ev["stage"] == c["stage"]] for c in status["cohorts"]}
        return {"rollout": status, "release": self.release(status["release"]),
                "timeline": timeline, "cohort_timeline": by_cohort, "incidents": self.incidents(rollout_id),
                "devices": self.members(rollout_id), "rollback_campaigns": campaigns,
                "kill_switch": self.killed()}


# ---------------------------------------------------------------- helpers

def _marks(values):
    """SQL placeholders for `IN`: (?, ?, ?) for three values."""
    return "(%s)" % ", ".join("?" * len(values))


def _release_dict(row):
    out = {k: row[k] for k in row if k not in ("bundle", "payload")}
    out["signers"] = json.loads(out["signers"])
    return out


def _text(value, what):
    if not isinstance(value, str) or not value or len(value) > TEXT_MAX or \
            any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise RolloutError("%s must be one line of 1..%d characters" % (what, TEXT_MAX), "bad_input")


def _person(actor):
    _text(actor, "actor")
    if actor == SYSTEM_ACTOR:
        raise RolloutError("%r is reserved for the engine's own records" % SYSTEM_ACTOR, "bad_input")
