"""`tether sim run`: the fleet simulator against a running cloud (ours or
yours), for CI load tests. Exits 1 when a correctness check fails."""

import asyncio
import glob
import json
import os
import sys
import time
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloud.ca import CA, write_private, write_public
from simulator import live
from simulator.fleet import Credential, Fleet
from simulator.report import render
from simulator.verify import Check, summarize


class UsageError(Exception):
    pass


def add_parser(sub):
    """`tether sim run`."""
    r = sub.add_parser("sim", help="the fleet simulator")
    rsub = r.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    run = rsub.add_parser("run", help="run virtual devices against a running cloud",
                          description="Run N virtual devices (the real agent core on simulated flash) "
                          "against a broker. Credentials come from a directory of <tenant>/<device>.pem "
                          "and .key files (as `tether cloud serve --issue` writes them), or are minted "
                          "from a CA you supply. Writes summary.json; exits 1 when a correctness check "
                          "fails, so it can gate a CI load test.")
    run.add_argument("--broker-url", default="mqtts://127.0.0.1:8883", help="mqtts://HOST:PORT")
    run.add_argument("--ca-bundle", required=True, help="CA certificate(s) that signed the broker's certificate")
    run.add_argument("--server-name", default="localhost", help="name to verify in the broker's certificate")
    run.add_argument("--creds", help="directory of issued device credentials (TENANT/DEVICE.pem + .key)")
    run.add_argument("--mint-ca", nargs=2, metavar=("CA_CERT", "CA_KEY"),
                     help="mint device credentials from this CA instead")
    run.add_argument("--claim", nargs=2, metavar=("CERT", "KEY"),
                     help="enroll every device by claim with this batch claim certificate first (each makes "
                     "its own key); hardware ids HWID_PREFIX00000.. must be allowlisted for the batch")
    run.add_argument("--prov-url", help="the provisioning endpoint, mqtts://HOST:PORT (default: the broker's "
                     "host, port 8884)")
    run.add_argument("--hwid-prefix", default="sim-hw-",
                     help="hardware ids are PREFIX00000, PREFIX00001, ... (each enrolls once per cloud: a "
                     "second run against the same cloud needs another prefix on the allowlist)")
    run.add_argument("--enroll-timeout", type=float, default=60.0,
                     help="seconds a device may take to enroll by claim (default 60)")
    run.add_argument("--devices", type=int, default=100)
    run.add_argument("--tenants", type=int, default=2)
    run.add_argument("--duration", type=float, default=30.0)
    run.add_argument("--interval", type=float, default=1.0, help="seconds between samples per device")
    run.add_argument("--network-cut", metavar="AT:SECONDS", help="cut every device's network at AT for SECONDS")
    run.add_argument("--store", help="the cloud's SQLite file, for cloud-side checks (ours only)")
    run.add_argument("--out", default="tether-sim-out")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--quiet", action="store_true")


def parse_broker_url(url):
    u = urlparse(url)
    if u.scheme != "mqtts" or not u.hostname:
        raise UsageError("broker URL must look like mqtts://HOST:PORT (TLS is not optional), got %r" % url)
    return u.hostname, u.port or 8883


def credentials_from_dir(root, limit):
    """TENANT/DEVICE.crt + TENANT/DEVICE.key, as `tether cloud serve --issue` writes them."""
    creds = []
    for cert in sorted(glob.glob(os.path.join(root, "*", "*.crt"))):
        key = cert[:-4] + ".key"
        if not os.path.exists(key):
            continue
        tenant = os.path.basename(os.path.dirname(cert))
        device = os.path.basename(cert)[:-4]
        creds.append(Credential(tenant, device, cert, key))
    if len(creds) < limit:
        raise UsageError("%s holds credentials for %d devices; %d asked for" % (root, len(creds), limit))
    return creds[:limit]


def mint_credentials(ca_cert, ca_key, out_dir, count, tenants):
    """Device credentials signed by a CA the user supplies."""
    with open(ca_cert, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(ca_key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    ca = CA(cert, key)
    creds = []
    for i in range(count):
        tenant = "tenant%d" % (i % tenants)
        device = "sim-%05d" % i
        folder = os.path.join(out_dir, "creds", tenant)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        c, k = os.path.join(folder, device + ".crt"), os.path.join(folder, device + ".key")
        cert_pem, key_pem = ca.issue_device(tenant, device)
        write_public(c, cert_pem)
        write_private(k, key_pem)
        creds.append(Credential(tenant, device, c, k))
    return creds


def device_side_summary(fleet, duration_s, drained):
    """Without the cloud's store only the devices' view can be checked."""
    acked = sum(len(d.acked) for d in fleet.devices)
    refused = fleet.refused()
    generated = fleet.generated()
    declared = fleet.declared_drops()
    n = len(fleet.devices)
    checks = [
        Check("drained", drained, "every device queue empty and acknowledged" if drained
              else "some device queues did not drain in time"),
        Check("every record acknowledged or declared dropped", acked >= generated - declared,
              "%d generated, %d acknowledged, %d declared dropped" % (generated, acked, declared)),
        Check("every device connected at the end", fleet.connected() == n,
              "%d of %d connected" % (fleet.connected(), n)),
        Check("no sample refused", refused == 0, "%d samples refused by full queues" % refused),
        Check("every sample taken", fleet.sample_failures == 0,
              "%d samples failed in the device driver" % fleet.sample_failures),
        Check("no agent core errors", not fleet.core_errors,
              "; ".join(fleet.core_errors[:3]) or "the core never refused an event"),
    ]
    return {"devices": n, "duration_s": round(duration_s, 2), "verification": "device-side only (no --store)",
            "telemetry": {"generated": generated, "acked": acked, "stored": None, "duplicates_dropped": None,
                          "declared_drops": declared, "silent_gaps": None, "dead_lettered": None,
                          "lost": None, "msgs_per_s": round(acked / duration_s, 1) if duration_s else 0.0,
                          "refused": refused},
            "checks": [c.as_dict() for c in checks]}


async def enroll_by_claim(args, host, port):
    """Every device enrolls by claim on the provisioning endpoint first (its
    hardware ids must be on the cloud's allowlist for the claim's batch)."""
    from cloud.ca import identity_of
    from simulator.provision_drill import Provisioned, enroll_many
    cert, key = args.claim
    with open(cert, "rb") as f:
        claim_identity = identity_of(f.read())
    prov_host, prov_port = parse_broker_url(args.prov_url) if args.prov_url else (host, 8884)
    if prov_host != host:
        raise UsageError("the provisioning endpoint must be on the broker's host")
    endpoints = {"host": host, "device_port": port, "prov_port": prov_port, "cafile": args.ca_bundle,
                 "server_name": args.server_name}
    hwids = ["%s%05d" % (args.hwid_prefix, i) for i in range(args.devices)]
    t0 = time.monotonic()
    enrolled, failed = await enroll_many(endpoints, (cert, key), claim_identity, hwids, args.seed,
                                         timeout_s=args.enroll_timeout)
    if failed:
        raise UsageError("%d of %d devices could not enroll by claim (first: %s; see `tether cloud audit`)"
                         % (len(failed), len(hwids), failed[0].hwid))
    print("enrolled %d devices by claim in %.1f s" % (len(enrolled), time.monotonic() - t0))
    return [Provisioned(e, args.ca_bundle) for e in enrolled]


async def run(args):
    host, port = parse_broker_url(args.broker_url)
    os.makedirs(args.out, exist_ok=True)
    if getattr(args, "claim", None):
        creds = await enroll_by_claim(args, host, port)
    elif args.creds:
        creds = credentials_from_dir(args.creds, args.devices)
    elif args.mint_ca:
        creds = mint_credentials(args.mint_ca[0], args.mint_ca[1], args.out, args.devices, args.tenants)
    else:
        raise UsageError("give --creds DIR, --mint-ca CA_CERT CA_KEY or --claim CERT KEY")
    view = live.Progress(quiet=args.quiet)
    fleet = Fleet(creds, args.ca_bundle, host, port, seed=args.seed, server_name=args.server_name,
                  sample_interval_s=args.interval, progress=view.update,
                  fresh_epochs=not getattr(args, "claim", None))
    events, marks = [], []
    if args.network_cut:
        at, length = (float(x) for x in args.network_cut.split(":"))
        events = [(at, fleet.cut_network), (at + length, fleet.restore_network)]
        marks = [(at, at + length, "network cut")]
    fleet.start()
    try:
        await fleet.run_for(args.duration, events)
        drained = await fleet.drain(timeout_s=60)
        duration = fleet.elapsed_s()
        if args.store:
            from cloud.store import Store
            time.sleep(0.5)  # the cloud's group commit lingers a few ms
            store = Store(args.store)
            try:
                summary = summarize(fleet, store, duration, drained)
            finally:
                store.close()
        else:
            summary = device_side_summary(fleet, duration, drained)
    finally:
        await fleet.close()
        view.stop()
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "report.html"), "w") as f:
        f.write(render(summary, fleet.metrics.timeline, marks, title="tether sim run"))
    return summary


def main(args):
    try:
        summary = asyncio.run(run(args))
    except UsageError as e:
        print("tether sim run: %s" % e, file=sys.stderr)
        return 2
    live.verdict(summary, args.out)
    return 0 if all(c["passed"] for c in summary["checks"]) else 1
