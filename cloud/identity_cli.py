"""`tether cloud revoke | quarantine | release | audit`: identity operations,
recorded with who and why; a running cloud enforces them at once."""

import datetime
import getpass
import json
import os
import sqlite3
import sys
import time

from cloud.ca import parse_identity
from cloud.errors import CloudError
from cloud.identity import Registry

DATA_DEFAULT = "tether-cloud"
DATA_HELP = "the cloud's data directory, made by `tether cloud serve` (default ./tether-cloud)"


def add_parser(csub):
    """`tether cloud revoke | quarantine | release | audit`."""
    rv = csub.add_parser("revoke", help="revoke a device's identity: refused at once, live session ended",
                         description="Record the revocation of DEVICE (TENANT/DEVICE) in the cloud's data "
                         "directory, with who and why, and wait for the running cloud to enforce it: new "
                         "connections refused and any live session ended. Prints how long that took. "
                         "Exit 0 when enforced, 1 when recorded but not (yet) enforced, 2 for a usage error, no "
                         "cloud in DATA, or an identity this cloud never issued nor allowlisted (a typo).")
    rv.add_argument("device", metavar="TENANT/DEVICE", help="the identity to revoke, e.g. acme/dev-00042")
    rv.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    rv.add_argument("--by", default=None, help="who (default: $USER)")
    rv.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    rv.add_argument("--wait", type=float, default=5.0, help="seconds to wait for enforcement (default 5)")
    for name, text in (("quarantine", "confine a device: it stays connected, its telemetry is flagged and "
                                      "kept apart, it may use only the quarantine topics (diagnostics, updates)"),
                       ("release", "end a device's quarantine")):
        q = csub.add_parser(name, help=text.split(":")[0], description=text[0].upper() + text[1:] +
                            ". Recorded with who and why in the audit trail; the running cloud applies it "
                            "at once on either broker.")
        q.add_argument("device", metavar="TENANT/DEVICE", help="the device's identity, e.g. acme/dev-00042")
        q.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        q.add_argument("--by", default=None, help="who (default: $USER)")
        q.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    au = csub.add_parser("audit", help="list audited identity operations",
                         description="List the audit trail: who did what to which identity, when and why.")
    au.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    au.add_argument("--action", help="only this action (revoke, revocation_enforced, ...)")
    au.add_argument("--device", help="only this TENANT/DEVICE")
    au.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def has_cloud(data):
    """True when DATA holds a cloud (`tether cloud serve` made its tether.db);
    otherwise says so on stderr. Every `tether cloud` command but `serve` asks
    this first, so a wrong --data never quietly starts a second cloud there."""
    if os.path.exists(os.path.join(data, "tether.db")):
        return True
    print("tether cloud: no cloud data in %s (give --data)" % data, file=sys.stderr)
    return False


def _registry(data):
    if not has_cloud(data):
        return None
    return Registry(os.path.join(data, "tether.db"))


def revoke(args):
    registry = _registry(args.data)
    if registry is None:
        return 2
    actor = args.by or os.environ.get("USER") or getpass.getuser()
    try:
        if not _known(args.data, registry, args.device):
            registry.close()
            print("tether cloud revoke: %s was never issued nor allowlisted by the cloud in %s: nothing "
                  "revoked (check the name; `tether cloud audit` lists the identities it knows)"
                  % (args.device, args.data), file=sys.stderr)
            return 2
        new = registry.revoke(args.device, args.reason, actor)
    except CloudError as e:
        registry.close()
        print("tether cloud revoke: %s" % e, file=sys.stderr)
        return 2
    print("%s %s (by %s: %s)" % ("revoked" if new else "already revoked", args.device, actor, args.reason))
    deadline = time.monotonic() + args.wait
    status = registry.status(args.device)
    while status["enforced_ms"] is None and status["note"] is None and time.monotonic() < deadline:
        time.sleep(0.02)
        status = registry.status(args.device)
    registry.close()
    if status["enforced_ms"] is not None:
        print("enforced: %s; %.1f ms from revocation to session closed and reconnects refused"
              % (status["note"], status["block_ms"]))
        return 0
    print(status["note"] or "recorded, not enforced within %.1f s: is the cloud running on %s? "
          "It will refuse the device when it starts." % (args.wait, args.data))
    return 1


def _known(data, registry, identity):
    """Whether the cloud in DATA ever issued, allowlisted or revoked IDENTITY
    (TENANT/DEVICE): a revocation of a name it never knew is a typo, which
    would be reported as done while the real device stays trusted."""
    tenant, device = parse_identity(identity)
    if registry.status(identity) is not None:
        return True
    if os.path.exists(os.path.join(data, "devices", tenant, device + ".crt")):
        return True
    for sql in ("SELECT 1 FROM certificates WHERE identity = ?",
                "SELECT 1 FROM device_certs WHERE identity = ?",
                "SELECT 1 FROM allowlist WHERE tenant = ? AND device = ?"):
        try:
            if registry._db.execute(sql, (tenant, device) if "tenant" in sql else (identity,)).fetchone():
                return True
        except sqlite3.OperationalError:       # a table this cloud never made
            pass
    return False


def quarantine(args):
    return _confine(args, "quarantine")


def release(args):
    return _confine(args, "release")


def _confine(args, op):
    registry = _registry(args.data)
    if registry is None:
        return 2
    actor = args.by or os.environ.get("USER") or getpass.getuser()
    try:
        changed = getattr(registry, op)(args.device, args.reason, actor)
    except CloudError as e:
        print("tether cloud %s: %s" % (op, e), file=sys.stderr)
        return 2
    finally:
        registry.close()
    if op == "quarantine":
        print("%s %s (by %s: %s)" % ("quarantined" if changed else "already quarantined", args.device, actor,
                                     args.reason))
    else:
        print("%s %s (by %s: %s)" % ("released" if changed else "was not quarantined:", args.device, actor,
                                     args.reason))
    return 0


def audit(args):
    registry = _registry(args.data)
    if registry is None:
        return 2
    rows = registry.audit_rows(action=args.action, subject=args.device)
    registry.close()
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        when = datetime.datetime.fromtimestamp(row["ts_ms"] / 1000, datetime.timezone.utc)
        print("%s  %-10s %-22s %-24s %s%s" % (
            when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z", row["actor"], row["action"], row["subject"],
            row["reason"], ("  (" + row["detail"] + ")") if row["detail"] else ""))
    return 0
