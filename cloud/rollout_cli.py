"""`tether cloud rollout | releases | window`: staged rollouts from the command line.

    add_parser(csub)        adds `rollout`, `releases` and `window` under `tether cloud`
    main(args) -> int       runs the parsed command
    _standalone(argv)       the same without cloud/cli.py (tests)

Every command works on DATA/rollouts.db (cloud/rollout.py's own file) and
records who did it (--by, default $USER) and why. These commands change the
records; the running cloud's rollout loop (Engine.tick) makes the offers,
and only serves a release to a device while Engine.offer_for(device) names
it, so a pause, abort or kill from here takes effect there without a message.

`releases`, not `release`: `tether cloud release TENANT/DEVICE` already ends
a quarantine (cloud/identity_cli.py).

Exit codes: 0 done, 1 refused (the reason code is printed), 2 usage.
"""

import argparse
import getpass
import json
import os
import sys
import time

from cloud import firmware
from cloud.firmware import FirmwareError
from cloud.identity_cli import DATA_DEFAULT, DATA_HELP, has_cloud
from cloud.rollout import Engine, Policy
from cloud.rollout_plan import RolloutError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
DB_NAME = "rollouts.db"

PLAN_HELP = """\
A plan is JSON (see docs/rollouts.md), e.g.
  {"silence_s": 1800, "rollback_release": "sim-v1-1.0.0", "stages": [
     {"name": "canary", "count": 5, "soak_s": 3600, "failure_pct": 20},
     {"name": "quarter", "percent": 25, "soak_s": 7200},
     {"name": "all", "percent": 100, "soak_s": 0}]}
or give --canary N and --cohorts 25,100 for that shape with defaults.
"""


def add_parser(csub):
    """Add `rollout`, `releases` and `window` to the `tether cloud` subparsers."""
    _add_rollout(csub)
    _add_release(csub)
    _add_window(csub)


def _common(p, who=True):
    p.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    if who:
        p.add_argument("--by", default=None, help="who (default: $USER)")


def _add_rollout(csub):
    ro = csub.add_parser("rollout", help="staged rollouts: start, approve, pause, resume, abort, kill, status, export",
                         description="Staged rollouts of registered releases: a canary, then cohorts, each "
                         "soaking before the next; k distinct approvals before anything is offered; halts by "
                         "itself when a cohort's failures (rejected, rolled back, silent) cross its threshold.\n\n"
                         + PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ro.add_subparsers(dest="rollout_command", metavar="ROLLOUT_COMMAND")
    s = sub.add_parser("start", help="request a rollout (it starts once approved)")
    s.add_argument("--release", required=True, help="release id, e.g. sim-v1-1.2.0")
    s.add_argument("--plan", metavar="FILE_OR_JSON", help="the plan (a file or JSON text)")
    s.add_argument("--canary", type=int, help="canary device count (instead of --plan)")
    s.add_argument("--cohorts", default="25,100", help="cumulative percentages after the canary (default 25,100)")
    s.add_argument("--soak", type=int, default=3600, help="seconds each cohort soaks (default 3600)")
    s.add_argument("--failure-pct", type=float, default=10.0, help="halt threshold per cohort (default 10)")
    s.add_argument("--rollback-release", help="on a halt, send devices that took it to this release")
    s.add_argument("--reason", required=True, help="why (change ticket, what it fixes)")
    _common(s)
    a = sub.add_parser("approve", help="approve a rollout (k distinct people, not the requester)")
    a.add_argument("rollout", help="rollout id, e.g. ro-1 (from `start` or `status`)")
    a.add_argument("--note", default="", help="what you checked (recorded; default: none)")
    _common(a)
    for name, text in (("pause", "stop offering; devices mid-update carry on, gates still count"),
                       ("resume", "offer again"), ("abort", "stop for good; outstanding offers withdrawn")):
        c = sub.add_parser(name, help=text)
        c.add_argument("rollout", help="rollout id, e.g. ro-1")
        c.add_argument("--reason", required=True, help="why (recorded in the rollout's timeline)")
        _common(c)
    rb = sub.add_parser("rollback", help="send the devices that took a halted/aborted rollout to another release")
    rb.add_argument("rollout", help="the halted or aborted rollout's id, e.g. ro-1")
    rb.add_argument("--to", required=True, metavar="RELEASE", help="registered release to send them to")
    rb.add_argument("--reason", required=True, help="why (recorded in the rollout's timeline)")
    _common(rb)
    k = sub.add_parser("kill", help="the kill switch: halt every rollout in flight, refuse new ones")
    k.add_argument("--reason", required=True, help="why (recorded)")
    k.add_argument("--off", action="store_true", help="disengage the kill switch")
    _common(k)
    st = sub.add_parser("status", help="rollouts and their cohorts")
    st.add_argument("rollout", nargs="?", help="only this rollout (default: all)")
    st.add_argument("--json", action="store_true", help="JSON instead of text")
    _common(st, who=False)
    al = sub.add_parser("alerts", help="monitoring records: stalled, outdated, failure_rate, halt")
    al.add_argument("--kind", choices=["stalled", "outdated", "failure_rate", "halt"], help="only this kind")
    al.add_argument("--open", action="store_true", help="only open ones")
    _common(al, who=False)
    ex = sub.add_parser("export", help="plan, approvals, cohort timeline, incidents, rollback records")
    ex.add_argument("rollout", help="rollout id, e.g. ro-1")
    ex.add_argument("--json", action="store_true", help="JSON (default: readable text)")
    ex.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    _common(ex, who=False)
    ro.set_defaults(group_parser=ro)


def _add_release(csub):
    rel = csub.add_parser("releases", help="firmware releases the cloud verified and may deploy",
                          description="A release is registered only after the cloud checks it as a device "
                          "would (root-signed key set, k distinct current signers, payload chunk by chunk) "
                          "plus hardware class served, no security-version or key-set downgrade, validity.")
    sub = rel.add_subparsers(dest="releases_command", metavar="RELEASES_COMMAND")
    t = sub.add_parser("trust", help="set the root key, k and the hardware classes this cloud serves")
    t.add_argument("--root", required=True, metavar="PUB", help="root public key devices trust")
    t.add_argument("--k", type=int, default=2, help="release signers required (default 2)")
    t.add_argument("--hw-class", required=True, action="append", help="served hardware class; repeat")
    _common(t)
    a = sub.add_parser("add", help="verify and register a release")
    a.add_argument("--bundle", required=True, help="the signed bundle from `tether fw build` / `fw sign`")
    a.add_argument("--payload", required=True, help="the firmware image the bundle's manifest describes")
    _common(a)
    ls = sub.add_parser("list", help="registered releases")
    ls.add_argument("--json", action="store_true", help="JSON instead of text")
    _common(ls, who=False)
    rel.set_defaults(group_parser=rel)


def _add_window(csub):
    w = csub.add_parser("window", help="tenant maintenance windows (devices updated only inside)")
    sub = w.add_subparsers(dest="window_command", metavar="WINDOW_COMMAND")
    s = sub.add_parser("set", help="set (or --clear) a tenant's window",
                       description="Devices of TENANT are offered updates only inside this window. "
                       "END before START runs past midnight; START == END is the whole day.")
    s.add_argument("tenant", help="the tenant whose devices the window applies to")
    s.add_argument("--start", help="HH:MM, the tenant's local time")
    s.add_argument("--end", help="HH:MM, the tenant's local time")
    s.add_argument("--days", default="mon,tue,wed,thu,fri,sat,sun",
                   help="comma-separated days the window opens on, from mon,tue,wed,thu,fri,sat,sun "
                        "(default: every day), e.g. sat,sun")
    s.add_argument("--utc-offset-min", type=int, default=0,
                   help="the tenant's offset from UTC in minutes, e.g. 60 or -300 (default 0)")
    s.add_argument("--clear", action="store_true", help="remove the window (always open)")
    _common(s)
    ls = sub.add_parser("list", help="all windows")
    _common(ls, who=False)
    w.set_defaults(group_parser=w)


# ---------------------------------------------------------------- running

def main(args):
    group = args.cloud_command
    command = getattr(args, group + "_command", None)
    fn = COMMANDS.get((group, command))
    if fn is None:
        args.group_parser.print_help(sys.stderr)
        return EXIT_USAGE
    if not has_cloud(args.data):      # a rollout recorded where no cloud acts on it is lost
        return EXIT_USAGE
    try:
        engine = Engine(os.path.join(args.data, DB_NAME), Policy())
    except OSError as e:
        print("tether cloud %s: cannot open %s: %s" % (group, args.data, e), file=sys.stderr)
        return EXIT_USAGE
    try:
        return fn(engine, args, _now_ms())
    except RolloutError as e:
        print("refused: %s: %s" % (e.code, e.message))
        return EXIT_REFUSED
    except FirmwareError as e:
        print("tether cloud %s: %s" % (group, e.message), file=sys.stderr)
        return EXIT_USAGE
    finally:
        engine.close()


def _now_ms():
    return time.time_ns() // 1_000_000


def _by(args):
    return args.by or os.environ.get("USER") or getpass.getuser()


def _plan(args):
    if args.plan:
        if os.path.exists(args.plan):
            with open(args.plan) as f:
                return f.read()
        return args.plan
    if args.canary is None:
        raise RolloutError("give --plan or --canary", "bad_plan")
    stages = [{"name": "canary", "count": args.canary, "soak_s": args.soak, "failure_pct": args.failure_pct}]
    for pct in args.cohorts.split(","):
        p = float(pct)
        stages.append({"name": "%g%%" % p, "percent": int(p) if p == int(p) else p,
                       "soak_s": args.soak if p < 100 else 0, "failure_pct": args.failure_pct})
    plan = {"stages": stages}
    if args.rollback_release:
        plan["rollback_release"] = args.rollback_release
    return plan


def rollout_start(e, args, now):
    rid = e.create(args.release, _plan(args), _by(args), args.reason, now)
    status = e.status(rid)
    print("%s requested by %s: %s, %d stages; awaiting %d approvals (not the requester)"
          % (rid, status["requested_by"], args.release, len(status["plan"]["stages"]),
             status["approvals_required"]))
    _note_if_no_devices(e, args.release)
    return EXIT_OK


def rollout_approve(e, args, now):
    count = e.approve(args.rollout, _by(args), now, args.note)
    status = e.status(args.rollout)
    print("%s: %d of %d approvals; %s" % (args.rollout, count, status["approvals_required"], status["state"]))
    _note_if_no_devices(e, status["release"])
    return EXIT_OK


def _note_if_no_devices(e, release):
    """Cohorts are chosen from the devices known when the rollout runs: say
    so when none of the release's hardware class is known yet."""
    hw_class = e.release(release)["hw_class"]
    if not any(d["hw_class"] == hw_class for d in e.devices()):
        print("note: no device of hardware class %s has said hello to this cloud yet: cohorts are "
              "chosen from the devices known when the rollout runs, so it would complete with "
              "nothing to do; start it once devices are connected" % hw_class, file=sys.stderr)


def _simple(name):
    def run(e, args, now):
        actions = getattr(e, name)(args.rollout, _by(args), args.reason, now)
        print("%s: %s%s" % (args.rollout, e.status(args.rollout)["state"],
                            "; %d outstanding offers withdrawn" % len(actions) if actions else ""))
        return EXIT_OK
    return run


def rollout_rollback(e, args, now):
    e.rollback(args.rollout, args.to, _by(args), args.reason, now)
    print("%s-rollback: devices that took %s go to %s" % (args.rollout, args.rollout, args.to))
    return EXIT_OK


def rollout_kill(e, args, now):
    if args.off:
        e.unkill(_by(args), args.reason, now)
        print("kill switch off")
        return EXIT_OK
    actions = e.kill(_by(args), args.reason, now)
    print("kill switch ON: every rollout in flight halted, %d offers withdrawn; new rollouts refused"
          % len(actions))
    return EXIT_OK


def rollout_status(e, args, now):
    rows = [e.status(args.rollout)] if args.rollout else e.rollouts()
    if args.json:
        print(json.dumps({"rollouts": rows, "kill_switch": e.killed()}, indent=2, sort_keys=True))
        return EXIT_OK
    if e.killed():
        print("KILL SWITCH ON since %s by %s: %s" % (_when(e.killed()["set_ms"]), e.killed()["set_by"],
                                                     e.killed()["reason"]))
    for s in rows:
        print(_status_line(s))
        for c in s["cohorts"]:
            print("  " + _cohort_line(c))
    if not rows:
        print("no rollouts")
    return EXIT_OK


def rollout_alerts(e, args, now):
    alerts = e.alerts(kind=args.kind, open_only=args.open)
    if not alerts:
        print("no alerts")
    for a in alerts:
        print("%s %-12s %-24s %s %s" % (_when(a["opened_ms"]), a["kind"], a["subject"],
                                        "open" if a["closed_ms"] is None else "closed " + _when(a["closed_ms"]),
                                        json.dumps(a["detail"], sort_keys=True)))
    return EXIT_OK


def rollout_export(e, args, now):
    data = e.export(args.rollout)
    text = json.dumps(data, indent=2, sort_keys=True) if args.json else export_text(data)
    if args.out:
        firmware.write_file(args.out, text.encode() + b"\n")
        print("wrote %s" % args.out)
    else:
        print(text)
    return EXIT_OK


def release_trust(e, args, now):
    root = firmware.load_public_key(args.root)
    e.set_trust(root, args.k, args.hw_class, _by(args), now)
    print("trust: root %s, k=%d, hardware classes %s" % (firmware.mf.fingerprint(root).hex(), args.k,
                                                         ", ".join(sorted(set(args.hw_class)))))
    return EXIT_OK


def release_add(e, args, now):
    rel = e.add_release(firmware.read_file(args.bundle, "bundle"), firmware.read_file(args.payload, "payload"),
                        _by(args), now)
    print("registered %s: %s %s, security version %d, key set %d, signers %s"
          % (rel["id"], rel["hw_class"], rel["version"], rel["security_version"], rel["keyset_version"],
             ", ".join(rel["signers"])))
    return EXIT_OK


def release_list(e, args, now):
    rows = e.releases()
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    for r in rows:
        print("%-24s sv %-3d keyset %-3d %8d bytes  added %s by %s" % (
            r["id"], r["security_version"], r["keyset_version"], r["size"], _when(r["added_ms"]), r["added_by"]))
    if not rows:
        print("no releases")
    return EXIT_OK


def window_set(e, args, now):
    if args.clear:
        e.set_window(args.tenant, None, _by(args), now)
        print("%s: no window (always open)" % args.tenant)
        return EXIT_OK
    w = e.set_window(args.tenant, {"days": [d.strip() for d in args.days.split(",")], "start": args.start,
                                   "end": args.end, "utc_offset_min": args.utc_offset_min}, _by(args), now)
    print("%s: %s-%s on %s (UTC%+d min)" % (args.tenant, w["start"], w["end"], ",".join(w["days"]),
                                           w["utc_offset_min"]))
    return EXIT_OK


def window_list(e, args, now):
    windows = sorted(e.windows().items())
    for tenant, w in windows:
        print("%-16s %s-%s %s UTC%+d min" % (tenant, w["start"], w["end"], ",".join(w["days"]), w["utc_offset_min"]))
    if not windows:
        print("no windows (every tenant's devices may be updated at any time)")
    return EXIT_OK


COMMANDS = {
    ("rollout", "start"): rollout_start, ("rollout", "approve"): rollout_approve,
    ("rollout", "pause"): _simple("pause"), ("rollout", "resume"): _simple("resume"),
    ("rollout", "abort"): _simple("abort"), ("rollout", "rollback"): rollout_rollback,
    ("rollout", "kill"): rollout_kill, ("rollout", "status"): rollout_status,
    ("rollout", "alerts"): rollout_alerts, ("rollout", "export"): rollout_export,
    ("releases", "trust"): release_trust, ("releases", "add"): release_add, ("releases", "list"): release_list,
    ("window", "set"): window_set, ("window", "list"): window_list,
}


# ---------------------------------------------------------------- the readable record

def _when(ms):
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + "Z"


def _status_line(s):
    return "%s  %-9s %-18s %-24s requested by %s %s" % (
        s["id"], s["kind"], s["state"], s["release"], s["requested_by"], _when(s["created_ms"]))


def _cohort_line(c):
    counts = ", ".join("%s %d" % kv for kv in sorted(c["counts"].items())) or (
        "no devices" if c["started"] else "not started")
    return "%-12s size %-5d failed %d (max %d at %g%%), soak %ds: %s" % (
        c["name"], c["size"], c["failed"], c["failures_max"], c["failure_pct"], c["soak_s"], counts)


def export_text(data, indent=""):
    """The export as a reviewer reads it."""
    s, rel = data["rollout"], data["release"]
    out = [indent + "ROLLOUT %s (%s) of release %s: %s" % (s["id"], s["kind"], s["release"], s["state"]),
           indent + "  release: %s %s, security version %d, key set %d, signers %s, manifest %s"
           % (rel["hw_class"], rel["version"], rel["security_version"], rel["keyset_version"],
              ", ".join(rel["signers"]), rel["manifest_sha256"][:16]),
           indent + "  requested by %s at %s: %s" % (s["requested_by"], _when(s["created_ms"]), s["reason"]),
           indent + "  approvals (%d required):" % s["approvals_required"]]
    out += [indent + "    %s at %s %s" % (a["approver"], _when(a["ts_ms"]), a["note"]) for a in s["approvals"]]
    out.append(indent + "  plan: silence %ds, reach %ds, rollback release %s" % (
        s["plan"]["silence_s"], s["plan"]["reach_s"], s["plan"].get("rollback_release") or "none"))
    out.append(indent + "  cohorts:")
    out += [indent + "    " + _cohort_line(c) for c in s["cohorts"]]
    out.append(indent + "  timeline:")
    for ev in data["timeline"]:
        if ev["action"] == "device_failed":
            detail = "%s %s %s" % (ev["detail"]["device"], ev["detail"]["state"], ev["detail"]["reason"])
        else:
            detail = ", ".join("%s=%s" % (k, v if isinstance(v, (str, int, float)) else
                                          json.dumps(v, sort_keys=True))
                               for k, v in sorted(ev["detail"].items()) if k not in ("plan", "devices"))
        out.append(indent + "    %s %-8s %-16s %s" % (_when(ev["ts_ms"]), ev["actor"], ev["action"], detail))
    for inc in data["incidents"]:
        out.append(indent + "  INCIDENT at %s: %s" % (_when(inc["ts_ms"]), json.dumps(inc["tripped"], sort_keys=True)))
        out += [indent + "    failed: %s %s %s" % (f["device"], f["state"], f["reason"]) for f in inc["devices"]["failed"]]
        out.append(indent + "    withdrawn: %s" % (", ".join(inc["devices"]["cancelled"]) or "none"))
        out += [indent + "    done: %s" % a for a in inc["actions"]]
    for campaign in data["rollback_campaigns"]:
        out.append(indent + "  ROLLBACK CAMPAIGN:")
        out.append(export_text(campaign, indent + "    "))
    return "\n".join(out)


def _standalone(argv=None):
    """`tether cloud ...` for these groups without cloud/cli.py: argv follows `cloud`."""
    parser = argparse.ArgumentParser(prog="tether cloud")
    add_parser(parser.add_subparsers(dest="cloud_command", metavar="CLOUD_COMMAND"))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cloud_command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return main(args)
