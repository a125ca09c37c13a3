"""`tether cloud support grant | revoke | revocations | review | verify-log | findings | pubkey`.

    add_parser(cloud_subparsers)   adds `support` under `tether cloud`
    main(args) -> int              runs the parsed command

Exit codes: 0 done (verify-log: the chain is sound), 1 verify-log or
findings found tampering, 2 usage or an input the tool cannot use (including a grant
request without a distinct approver, and a --data with no cloud in it: a new
support key there would be one no device pins).
"""

import argparse
import datetime
import getpass
import json
import os
import sys

from cloud import firmware
from cloud.console_tool import describe
from cloud.errors import CloudError
from cloud.identity_cli import DATA_DEFAULT, DATA_HELP, has_cloud
from cloud.support import SupportDesk, SupportError

EXIT_OK, EXIT_TAMPER, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Support access to devices' serial consoles. A grant is signed by the
support-access key (`pubkey` writes the point devices pin) and is
issued only with an approver distinct from the requester and the technician.

  tether fw keygen --out keys --name alice          (the technician's key pair)
  tether cloud support grant --technician alice --tech-key keys/alice.pub \\
      --device acme/dev-0001 --role technician --hours 4 --reason "ticket 42" \\
      --approved-by bob --out alice.grant
  tether console /dev/ttyUSB0 --grant alice.grant --key keys/alice.key
  tether cloud support revoke GID --by bob --reason "visit cancelled"
  tether cloud support review
  tether cloud support verify-log --device acme/dev-0001 --log audit.log
  tether cloud support findings [--device acme/dev-0001]   (logs uploaded over MQTT)
"""


def add_parser(cloud_sub):
    sp = cloud_sub.add_parser("support", help="console grants, revocations, access reviews, audit logs",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = sp.add_subparsers(dest="support_command", metavar="SUPPORT_COMMAND")
    g = sub.add_parser("grant", help="issue an approved, time-bound console grant")
    g.add_argument("--technician", required=True, help="technician id")
    g.add_argument("--tech-key", required=True, help="the technician's public key (PEM)")
    g.add_argument("--device", action="append", default=[],
                   help="the device as tenant/device, e.g. acme/pump-1 (repeatable): a grant is for "
                        "one tenant's devices, never a device name other tenants may use too")
    g.add_argument("--site", help="every device at this site, as tenant/site (e.g. acme/plant-2)")
    g.add_argument("--role", required=True, choices=["viewer", "technician", "admin"],
                   help="which commands the session may run; each role also has the commands of "
                        "the roles before it (docs/console.md lists them)")
    g.add_argument("--hours", type=float, default=4.0, help="validity (default 4, at most 168)")
    g.add_argument("--reason", required=True, help="why (ticket, visit)")
    g.add_argument("--approved-by", required=True, help="who approved (not the requester)")
    g.add_argument("--requested-by", default=None, help="who asked (default: $USER)")
    g.add_argument("--out", required=True, help="grant file to write")
    rv = sub.add_parser("revoke", help="revoke a grant")
    rv.add_argument("gid", metavar="GRANT_ID", help="the grant's id (`grant` and `review` print it)")
    rv.add_argument("--by", default=None, help="who (default: $USER)")
    rv.add_argument("--reason", required=True, help="why (recorded)")
    rv.add_argument("--out", help="also write the signed revocation list here")
    rl = sub.add_parser("revocations", help="write the signed revocation list devices apply")
    rl.add_argument("--out", required=True, help="file to write the signed list to")
    r = sub.add_parser("review", help="who holds and who held console access, and who approved it")
    r.add_argument("--current", action="store_true", help="only active and pending grants")
    r.add_argument("--json", action="store_true", help="JSON lines")
    v = sub.add_parser("verify-log", help="verify a device's audit log chain (gaps, edits, truncation)")
    v.add_argument("--device", required=True, help="the device the log is from, as tenant/device")
    v.add_argument("--log", required=True, help="the device's audit.log as uploaded")
    v.add_argument("--json", action="store_true", help="JSON instead of text")
    f = sub.add_parser("findings", help="what the cloud found in audit logs uploaded over MQTT")
    f.add_argument("--device", help="tenant/device (default: all)")
    f.add_argument("--json", action="store_true", help="JSON lines")
    pk = sub.add_parser("pubkey", help="write the support public key devices pin")
    pk.add_argument("--out", required=True, help="file to write the 65-byte point to")
    for p in (g, rv, rl, r, v, f, pk):
        p.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    sp.set_defaults(support_parser=sp)
    return sp


def main(args):
    command = COMMANDS.get(getattr(args, "support_command", None))
    if command is None:
        args.support_parser.print_help(sys.stderr)
        return EXIT_USAGE
    if not has_cloud(args.data):       # never a new support key in the wrong directory
        return EXIT_USAGE
    try:
        desk = SupportDesk(args.data)
    except (CloudError, OSError) as e:
        print("tether cloud support: cannot open %s: %s" % (args.data, e), file=sys.stderr)
        return EXIT_USAGE
    try:
        return command(desk, args)
    except CloudError as e:
        print("tether cloud support %s: %s" % (args.support_command, describe(e)), file=sys.stderr)
        return EXIT_USAGE
    finally:
        desk.close()


def _user(value):
    return value or os.environ.get("USER") or getpass.getuser()


def tenant_scoped(value, option):
    """value if it is tenant/name, else a usage error saying why."""
    tenant, _, name = (value or "").partition("/")
    if not tenant or not name or "/" in name:
        noun = option.lstrip("-")
        raise SupportError("%s %r must be tenant/%s (e.g. acme/%s-1): device and site names are only "
                           "unique within a tenant" % (option, value, noun, noun), "bad_scope")
    return value


def grant(desk, args):
    for device in args.device:
        tenant_scoped(device, "--device")
    if args.site is not None:
        tenant_scoped(args.site, "--site")
    point = firmware.load_public_key(args.tech_key)
    gid, message = desk.grant(args.technician, point, args.role, args.device, args.site, args.hours,
                              _user(args.requested_by), args.approved_by, args.reason)
    firmware.write_file(args.out, message)
    print("grant %s for %s (%s) written to %s" % (gid, args.technician, args.role, args.out))
    return EXIT_OK


def revoke(desk, args):
    new = desk.revoke(args.gid, _user(args.by), args.reason)
    print("%s %s" % ("revoked" if new else "already revoked", args.gid))
    if args.out:
        _write_revocations(desk, args.out)
    return EXIT_OK


def revocations(desk, args):
    _write_revocations(desk, args.out)
    return EXIT_OK


def _write_revocations(desk, path):
    firmware.write_file(path, desk.revocation_list())
    print("signed revocation list written to %s" % path)


def review(desk, args):
    rows = desk.review(include_past=not args.current)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return EXIT_OK
    print("%-32s %-14s %-10s %-8s %-24s %-17s %-17s %s" % (
        "GRANT", "TECHNICIAN", "ROLE", "STATE", "SCOPE", "FROM", "UNTIL", "REQUESTED/APPROVED"))
    for row in rows:
        scope = ",".join(row["devices"]) + ((" site:" + row["site"]) if row["site"] else "")
        print("%-32s %-14s %-10s %-8s %-24s %-17s %-17s %s/%s" % (
            row["gid"], row["technician"], row["role"], row["state"], scope[:24],
            _utc(row["not_before"]), _utc(row["expires"]), row["requested_by"], row["approved_by"]))
    return EXIT_OK


def verify_log(desk, args):
    tenant_scoped(args.device, "--device")
    data = firmware.read_file(args.log, "audit log")
    report = desk.verify_log(args.device, data)
    if args.json:
        out = dict(report, head=report["head"].hex() if report["head"] else None)
        print(json.dumps(out, sort_keys=True))
    else:
        print("%s: %d records, head seq %d, checkpoint seq %d"
              % (args.device, report["records"], report["head_seq"], report["checkpoint_seq"]))
        for kind, seq, detail in report["problems"]:
            print("  %s at seq %d: %s" % (kind, seq, detail))
        print("TAMPERED" if report["tamper"] else "chain verified")
    return EXIT_TAMPER if report["tamper"] else EXIT_OK


def findings(desk, args):
    rows = desk.audit_findings(args.device)
    for row in rows:
        if args.json:
            print(json.dumps(row, sort_keys=True))
        else:
            print("%s %-24s %-10s seq %-6d %s%s" % (_utc(row["at"]), row["identity"], row["kind"], row["seq"],
                                                 "TAMPER " if row["tamper"] else "", row["detail"]))
    if not rows and not args.json:
        print("no findings" + (" for %s" % args.device if args.device else ""))
    return EXIT_TAMPER if any(r["tamper"] for r in rows) else EXIT_OK


def pubkey(desk, args):
    firmware.write_file(args.out, desk.public_key)
    print("support key kid %s written to %s (65-byte point)" % (desk.kid.hex(), args.out))
    return EXIT_OK


def _utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


COMMANDS = {"grant": grant, "revoke": revoke, "revocations": revocations, "review": review,
            "verify-log": verify_log, "findings": findings, "pubkey": pubkey}


def _standalone(argv=None):
    parser = argparse.ArgumentParser(prog="tether")
    sub = parser.add_subparsers(dest="command")
    cloud = sub.add_parser("cloud")
    add_parser(cloud.add_subparsers(dest="cloud_command"))
    return main(parser.parse_args(["cloud", "support"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(_standalone())
