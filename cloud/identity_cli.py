"""`tether cloud revoke` and `tether cloud audit`."""

import datetime
import getpass
import json
import os
import sys
import time

from cloud.errors import CloudError
from cloud.identity import Registry


def _registry(data):
    path = os.path.join(data, "tether.db")
    if not os.path.exists(path):
        print("tether cloud: no cloud data in %s (give --data)" % data, file=sys.stderr)
        return None
    return Registry(path)


def revoke(args):
    registry = _registry(args.data)
    if registry is None:
        return 2
    actor = args.by or os.environ.get("USER") or getpass.getuser()
    try:
        new = registry.revoke(args.device, args.reason, actor)
    except CloudError as e:
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
