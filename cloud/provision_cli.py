"""`tether cloud claim | allow | approve | enrollments`: the operator's side
of provisioning by claim (docs/identity.md). Each writes to the cloud's data
directory with who and why; a running cloud acts on it at once."""

import csv
import datetime
import getpass
import json
import os
import sys

from cloud.ca import CA
from cloud.errors import CloudError
from cloud.identity import Registry
from cloud.provision import Provisioning


def add_parser(csub):
    c = csub.add_parser("claim", help="make a factory batch's claim certificate, with its quota",
                        description="Issue the claim certificate for a factory batch (one per batch; it goes "
                        "into the batch's firmware image) into DATA/claims/BATCH.crt and .key, and set how many "
                        "new device identities it may enroll. The claim certificate reaches only the "
                        "provisioning endpoint and only the hardware ids allowlisted for its batch.")
    c.add_argument("batch")
    c.add_argument("--quota", type=int, required=True, help="new identities this batch may enroll")
    _common(c, reason_default="new factory batch")
    a = csub.add_parser("allow", help="allowlist hardware ids for a batch, bound to tenant, device and site",
                        description="Allowlist a hardware id (or a CSV file of them: hwid,tenant,device,site) "
                        "for a claim batch. The device's identity comes from here, never from its request.")
    a.add_argument("hwid", nargs="?", help="hardware id (or use --file)")
    a.add_argument("--batch", required=True)
    a.add_argument("--tenant")
    a.add_argument("--device", help="device id (default: the hardware id)")
    a.add_argument("--site", default="default")
    a.add_argument("--file", help="CSV with columns hwid,tenant,device,site")
    a.add_argument("--approval", action="store_true",
                   help="hold each enrollment for an operator's approval (critical fleets)")
    a.add_argument("--cert-seconds", type=int, help="certificate lifetime for these devices (default 30 days)")
    _common(a, reason_default="allowlisted")
    p = csub.add_parser("approve", help="approve a pending enrollment",
                        description="Approve the enrollment a device asked for and is waiting on, for the key "
                        "it asked with (compare the fingerprint `tether cloud enrollments` shows with the "
                        "device's). Recorded with who and why; the device is enrolled on its next try.")
    p.add_argument("hwid")
    _common(p, reason_default=None)
    e = csub.add_parser("enrollments", help="pending enrollments and claim batch usage")
    e.add_argument("--data", default="tether-cloud", help="the cloud's data directory")
    e.add_argument("--json", action="store_true")


def _common(p, reason_default):
    p.add_argument("--data", default="tether-cloud", help="the cloud's data directory")
    p.add_argument("--by", default=None, help="who (default: $USER)")
    if reason_default is None:
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    else:
        p.add_argument("--reason", default=reason_default, help="why (default: %s)" % reason_default)


COMMANDS = ("claim", "allow", "approve", "enrollments")


def main(args):
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


def _allow(args, prov, actor):
    rows = []
    if args.file:
        with open(args.file, newline="") as f:
            for rec in csv.DictReader(f):
                rows.append((rec["hwid"], rec["tenant"], rec.get("device") or rec["hwid"], rec.get("site") or "default"))
    elif args.hwid and args.tenant:
        rows.append((args.hwid, args.tenant, args.device or args.hwid, args.site))
    else:
        print("tether cloud allow: give HWID and --tenant, or --file", file=sys.stderr)
        return 2
    for hwid, tenant, device, site in rows:
        prov.allow(hwid, args.batch, tenant, device, site, actor, approval=args.approval,
                   cert_s=args.cert_seconds, reason=args.reason)
    print("allowlisted %d hardware id(s) for batch %s%s" % (len(rows), args.batch,
                                                          " (approval required)" if args.approval else ""))
    return 0


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
