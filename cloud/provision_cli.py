"""`tether cloud claim | allow | approve | enrollments`: the operator's side
of provisioning by claim (docs/identity.md). Each writes to the cloud's data
directory with who and why; a running cloud acts on it at once."""

import csv
import datetime
import getpass
import json
import os
import sys

from cloud.ca import CA, check_id, make_identity
from cloud.errors import CloudError
from cloud.identity import Registry
from cloud.identity_cli import DATA_DEFAULT, DATA_HELP, has_cloud
from cloud.provision import HWID_LEN_MAX, SITE_LEN_MAX, Provisioning

FILE_HELP = """\
a CSV file of hardware ids, one a line: hwid,tenant,device,site (device
defaults to the hardware id, site to "default"); a first line whose first
field is "hwid" is a header naming the columns. Each hardware id is bound to
the tenant, device and site on its line. A malformed line is refused with
its line number and nothing is allowlisted."""


def add_parser(csub):
    c = csub.add_parser("claim", help="make a factory batch's claim certificate, with its quota",
                        description="Issue the claim certificate for a factory batch (one per batch; it goes "
                        "into the batch's firmware image) into DATA/claims/BATCH.crt and .key, and set how many "
                        "new device identities it may enroll. The claim certificate reaches only the "
                        "provisioning endpoint and only the hardware ids allowlisted for its batch.")
    c.add_argument("batch", help="batch name, e.g. line-3 (A-Z a-z 0-9 _ -)")
    c.add_argument("--quota", type=int, required=True, help="new identities this batch may enroll")
    _common(c, reason_default="new factory batch")
    a = csub.add_parser("allow", help="allowlist hardware ids for a batch, bound to tenant, device and site",
                        description="Allowlist a hardware id (or a CSV file of them, one a line: "
                        "hwid,tenant,device,site, with or without a header line) for a claim batch made "
                        "with `tether cloud claim`. The device's identity comes from here, never from its "
                        "request.")
    a.add_argument("hwid", nargs="?", help="hardware id (or use --file)")
    a.add_argument("--batch", required=True,
                   help="the claim batch (from `tether cloud claim BATCH`) whose certificate may enroll it")
    a.add_argument("--tenant", help="the tenant the device will belong to (required with HWID)")
    a.add_argument("--device", help="device id (default: the hardware id)")
    a.add_argument("--site", default="default", help="the device's site (default: default)")
    a.add_argument("--file", metavar="CSV", help=FILE_HELP)
    a.add_argument("--approval", action="store_true",
                   help="hold each enrollment for an operator's approval (critical fleets)")
    a.add_argument("--cert-seconds", type=int, help="certificate lifetime for these devices (default 30 days)")
    a.add_argument("--replace", action="store_true",
                   help="a board swap: move an identity already allowlisted for another hardware id "
                        "to this one (the old board's certificate is retired when the new one enrolls); "
                        "without it such an identity is refused")
    _common(a, reason_default="allowlisted")
    p = csub.add_parser("approve", help="approve a pending enrollment",
                        description="Approve the enrollment a device asked for and is waiting on, for the key "
                        "it asked with (compare the fingerprint `tether cloud enrollments` shows with the "
                        "device's). Recorded with who and why; the device is enrolled on its next try.")
    p.add_argument("hwid", help="the pending hardware id (`tether cloud enrollments` lists them)")
    _common(p, reason_default=None)
    e = csub.add_parser("enrollments", help="pending enrollments and claim batch usage",
                        description="List each claim batch with its quota and how much of it is used, the "
                        "enrollments waiting for `tether cloud approve` (hardware id, the identity it will "
                        "get, since when, and the SHA-256 of the key that asked: compare it with the one "
                        "the device prints), and how many identities were provisioned, rotated and "
                        "recovered.")
    e.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    e.add_argument("--json", action="store_true", help="one JSON object instead of text")


def _common(p, reason_default):
    p.add_argument("--data", default=DATA_DEFAULT, help=DATA_HELP)
    p.add_argument("--by", default=None, help="who (default: $USER)")
    if reason_default is None:
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    else:
        p.add_argument("--reason", default=reason_default, help="why (default: %s)" % reason_default)


COMMANDS = ("claim", "allow", "approve", "enrollments")


def main(args):
    if not has_cloud(args.data):
        return 2
    db = os.path.join(args.data, "tether.db")
    if not os.path.exists(os.path.join(args.data, "ca", "ca.crt")):
        print("tether cloud: no cloud in %s (start `tether cloud serve --data %s` once)" % (args.data, args.data),
              file=sys.stderr)
        return 2
    registry = Registry(db)
    prov = Provisioning(registry, CA.load(os.path.join(args.data, "ca")))
    actor = getattr(args, "by", None) or os.environ.get("USER") or getpass.getuser()
    try:
        return globals()["_" + args.cloud_command](args, prov, actor)
    except (CloudError, ValueError, OSError) as e:
        print("tether cloud %s: %s" % (args.cloud_command, e), file=sys.stderr)
        return 2
    finally:
        registry.close()


def _claim(args, prov, actor):
    from cloud.ca import write_private, write_public
    claim_dir = os.path.join(args.data, "claim-ca")
    ca = CA.load(claim_dir) if os.path.exists(os.path.join(claim_dir, "ca.crt")) else \
        CA.create(claim_dir, name="tether claim CA")
    folder = os.path.join(args.data, "claims")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    cert, key = os.path.join(folder, args.batch + ".crt"), os.path.join(folder, args.batch + ".key")
    prov.add_claim(args.batch, args.quota, actor, args.reason)
    if not os.path.exists(cert):
        cert_pem, key_pem = ca.issue_claim(args.batch)
        write_private(key, key_pem)
        write_public(cert, cert_pem)
    print("claim batch %s: quota %d; certificate %s, key %s" % (args.batch, args.quota, cert, key))
    return 0


COLUMNS = ("hwid", "tenant", "device", "site")


class _BadLine(ValueError):
    pass


def _allow_file(path):
    """[(hwid, tenant, device, site)] from a CSV: rows of hwid,tenant,device,site
    (device and site may be left out or empty), after an optional header line
    (its first field is "hwid") that names the columns in any order. Blank
    lines and lines starting with # are skipped. _BadLine names the line."""
    rows, columns = [], None
    try:
        f = open(path, newline="", encoding="utf-8-sig")     # (a spreadsheet's byte-order mark)
    except OSError as e:
        raise _BadLine("cannot read %s: %s" % (path, e.strerror)) from None
    with f:
        reader = csv.reader(f)
        while True:
            try:
                fields = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as e:
                raise _BadLine("%s line %d: %s" % (path, reader.line_num + 1, e)) from None
            if fields is None:
                break
            number = reader.line_num
            fields = [x.strip() for x in fields]
            if not any(fields) or fields[0].startswith("#"):
                continue
            where = "%s line %d" % (path, number)
            if columns is None and not rows and fields[0].lower() == "hwid":
                columns = [x.lower() for x in fields]
                unknown = [x for x in columns if x not in COLUMNS]
                if unknown or "tenant" not in columns or len(set(columns)) != len(columns):
                    raise _BadLine("%s: a header names the columns hwid,tenant,device,site (hwid and tenant "
                                   "required), not %s" % (where, ",".join(fields)))
                continue
            names = columns or COLUMNS
            rec = dict(zip(names, fields))
            if len(fields) > len(names) or not rec.get("hwid") or not rec.get("tenant"):
                raise _BadLine("%s: expected %s (hwid and tenant required), got %s"
                               % (where, ",".join(names), ",".join(fields)))
            row = (rec["hwid"], rec["tenant"], rec.get("device") or rec["hwid"], rec.get("site") or "default")
            try:
                _check_row(*row)
            except CloudError as e:
                raise _BadLine("%s: %s" % (where, e.message)) from None
            rows.append(row)
    if not rows:
        raise _BadLine("%s: no hardware ids (expected lines of hwid,tenant,device,site)" % path)
    return rows


def _check_row(hwid, tenant, device, site):
    """What Provisioning.allow checks, before anything is written."""
    check_id("hardware", hwid, HWID_LEN_MAX)
    check_id("site", site, SITE_LEN_MAX)
    make_identity(tenant, device)


def _allow(args, prov, actor):
    if args.file and (args.hwid or args.tenant or args.device):
        print("tether cloud allow: give HWID (with --tenant, --device) or --file, not both: the file's "
              "lines name their own tenant and device", file=sys.stderr)
        return 2
    if args.file:
        try:
            rows = _allow_file(args.file)
        except _BadLine as e:
            print("tether cloud allow: %s" % e, file=sys.stderr)
            return 2
    elif args.hwid and args.tenant:
        rows = [(args.hwid, args.tenant, args.device or args.hwid, args.site)]
        _check_row(*rows[0])
    else:
        print("tether cloud allow: give HWID and --tenant, or --file", file=sys.stderr)
        return 2
    if prov.claim_usage(args.batch) is None:
        print("tether cloud allow: no claim batch %r in %s: nothing allowlisted (make it first: "
              "`tether cloud claim %s --quota N`; `tether cloud enrollments` lists the batches)"
              % (args.batch, args.data, args.batch), file=sys.stderr)
        return 2
    problem = _conflicts(prov, rows, args.replace)
    if problem is not None:
        print("tether cloud allow: %s: nothing allowlisted" % problem, file=sys.stderr)
        return 2
    for hwid, tenant, device, site in rows:
        prov.allow(hwid, args.batch, tenant, device, site, actor, approval=args.approval,
                   cert_s=args.cert_seconds, reason=args.reason, replace=args.replace)
    print("allowlisted %d hardware id(s) for batch %s%s" % (len(rows), args.batch,
                                                          " (approval required)" if args.approval else ""))
    return 0


def _conflicts(prov, rows, replace):
    """Why rows cannot be allowlisted together, or None: a hardware id or an
    identity twice in them, or an identity already allowlisted for another
    hardware id (one identity is one board) unless replace."""
    hwids, identities = set(), {}
    for hwid, tenant, device, site in rows:
        identity = "%s/%s" % (tenant, device)
        if hwid in hwids:
            return "hardware id %s is given twice" % hwid
        if identity in identities:
            return "%s is given for two hardware ids (%s and %s)" % (identity, identities[identity], hwid)
        hwids.add(hwid)
        identities[identity] = hwid
        try:
            prov.check_allow(hwid, tenant, device, replace)
        except CloudError as e:
            return "%s; give --replace for a board swap" % e
    return None


def _approve(args, prov, actor):
    identity = prov.approve(args.hwid, actor, args.reason)
    print("approved %s as %s (by %s: %s)" % (args.hwid, identity, actor, args.reason))
    return 0


def _enrollments(args, prov, actor):
    pending = prov.pending()
    batches = [dict(zip(("batch", "quota", "used", "revoked"), row)) for row in prov.db.execute(
        "SELECT batch, quota, used, revoked FROM claims ORDER BY batch")]
    if args.json:
        print(json.dumps({"pending": pending, "batches": batches, "counts": prov.counts()}))
        return 0
    for b in batches:
        print("batch %-16s %d of %d used%s" % (b["batch"], b["used"], b["quota"], " REVOKED" if b["revoked"] else ""))
    for p in pending:
        when = datetime.datetime.fromtimestamp(p["requested_ms"] / 1000, datetime.timezone.utc)
        print("pending  %-20s %-28s since %s  key sha256 %s" % (
            p["hwid"], p["identity"], when.strftime("%Y-%m-%dT%H:%M:%SZ"), (p["key_sha256"] or "?")[:16]))
    print("provisioned %(provisioned)d, rotated %(rotated)d, recovered %(recovered)d" % prov.counts())
    return 0
