"""`tether sim run`: the fleet simulator against a running cloud (ours or
yours), for CI load tests. Exits 1 when a correctness check fails."""

import asyncio
import json
import math
import os
import sqlite3
import ssl
import sys
import time
from urllib.parse import quote, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloud.ca import CA, write_private, write_public
from simulator import live
from simulator.fleet import Credential, CredentialError, Fleet
from simulator.report import render
from simulator.verify import Check, RunScope, summarize


class UsageError(Exception):
    pass


def add_parser(sub):
    """`tether sim run`."""
    r = sub.add_parser("sim", help="the fleet simulator")
    rsub = r.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    run = rsub.add_parser("run", help="run virtual devices against a running cloud",
                          description="Run N virtual devices (the real agent core on simulated flash) "
                          "against a broker. Credentials come from a directory of TENANT/DEVICE.crt "
                          "and TENANT/DEVICE.key files (what `tether cloud serve --issue N` writes into "
                          "DATA/devices; a certificate named DEVICE.pem is read too), are minted from a CA "
                          "you supply, or are made by enrolling by claim. Writes OUT/summary.json and "
                          "OUT/report.html. With --store the cloud-side checks cover this run only: its "
                          "devices, their epochs of this run, and their dead letters since it started, so "
                          "a long-lived cloud can take many runs. Exits 0 when every check passes, 1 when "
                          "a correctness check fails (including devices that could not connect: the output "
                          "says why), 2 for a usage error (a bad option value, a file that is missing or "
                          "unreadable), so it can gate a CI load test.")
    run.add_argument("--broker-url", metavar="URL", default="mqtts://127.0.0.1:8883",
                     help="the broker, mqtts://HOST:PORT (default: %(default)s)")
    run.add_argument("--ca-bundle", metavar="PEM", required=True,
                     help="PEM file of the CA certificate(s) that signed the broker's certificate")
    run.add_argument("--server-name", metavar="NAME", default="localhost",
                     help="name to verify in the broker's certificate (default: %(default)s)")
    run.add_argument("--creds", metavar="DIR",
                     help="directory of issued device credentials, DIR/TENANT/DEVICE.crt + "
                     "DIR/TENANT/DEVICE.key (`tether cloud serve --issue N` writes them into DATA/devices)")
    run.add_argument("--mint-ca", nargs=2, metavar=("CA_CERT", "CA_KEY"),
                     help="mint device credentials (tenant0/sim-00000, ...) from this CA instead")
    run.add_argument("--claim", nargs=2, metavar=("CERT", "KEY"),
                     help="enroll every device by claim with this batch claim certificate first (each makes "
                     "its own key); hardware ids HWID_PREFIX00000.. must be allowlisted for the batch")
    run.add_argument("--prov-url", metavar="URL", help="the provisioning endpoint, mqtts://HOST:PORT (default: the broker's "
                     "host, port 8884)")
    run.add_argument("--hwid-prefix", metavar="PREFIX", default="sim-hw-",
                     help="hardware ids are PREFIX00000, PREFIX00001, ... (each enrolls once per cloud: a "
                     "second run against the same cloud needs another prefix on the allowlist) "
                     "(default: %(default)s)")
    run.add_argument("--enroll-timeout", metavar="SECONDS", type=float, default=60.0,
                     help="seconds a device may take to enroll by claim (default: %(default)s)")
    run.add_argument("--devices", metavar="N", type=int, default=100,
                     help="virtual devices, at least 1 (default: %(default)s)")
    run.add_argument("--tenants", metavar="N", type=int, default=2,
                     help="with --mint-ca: spread the devices over this many tenants (default: %(default)s)")
    run.add_argument("--duration", metavar="SECONDS", type=float, default=30.0,
                     help="seconds of sampling, then the fleet drains (default: %(default)s)")
    run.add_argument("--interval", metavar="SECONDS", type=float, default=1.0,
                     help="seconds between samples per device, more than 0 and at most --duration "
                     "(default: %(default)s)")
    run.add_argument("--network-cut", metavar="AT:SECONDS",
                     help="cut every device's network AT seconds into the run for SECONDS (e.g. 20:10); "
                     "AT must be before the end of --duration (default: no cut)")
    run.add_argument("--drain-timeout", metavar="SECONDS", type=float, default=60.0,
                     help="seconds the fleet may take after sampling to empty every queue and have "
                     "every device connected (default: %(default)s)")
    run.add_argument("--store", metavar="SQLITE",
                     help="the cloud's SQLite store (DATA/tether.db; ours only) for the cloud-side checks "
                     "of this run's records (default: device-side checks only)")
    run.add_argument("--out", metavar="DIR", default="tether-sim-out",
                     help="directory for summary.json and report.html (default: %(default)s)")
    run.add_argument("--seed", metavar="N", type=int, default=1,
                     help="seed for every random choice (default: %(default)s)")
    run.add_argument("--quiet", action="store_true", help="no live progress; the verdict is still printed")


def parse_broker_url(url, option="--broker-url"):
    try:
        u = urlparse(url)
        port = u.port
    except ValueError:
        u, port = None, None
    if u is None or u.scheme != "mqtts" or not u.hostname:
        raise UsageError("%s: broker URL must look like mqtts://HOST:PORT (TLS is not optional), got %r"
                         % (option, url))
    return u.hostname, port or 8883


def _number(option, value, minimum=None, above=None):
    if not math.isfinite(value):
        raise UsageError("%s must be a finite number, got %s" % (option, value))
    if minimum is not None and value < minimum:
        raise UsageError("%s must be at least %s, got %s" % (option, minimum, value))
    if above is not None and value <= above:
        raise UsageError("%s must be more than %s, got %s" % (option, above, value))


def parse_network_cut(text, duration):
    """'AT:SECONDS' -> (at, seconds), a cut that happens inside the run."""
    try:
        at_s, length_s = text.split(":")
        at, length = float(at_s), float(length_s)
    except ValueError:
        raise UsageError("--network-cut must be AT:SECONDS (seconds into the run, then how long; e.g. 20:10), "
                         "got %r" % text) from None
    _number("--network-cut's AT", at, minimum=0)
    _number("--network-cut's SECONDS", length, above=0)
    if at >= duration:
        raise UsageError("--network-cut %s starts at %g s, after the run ends (--duration %g): the cut "
                         "would never happen" % (text, at, duration))
    return at, length


def check_args(args):
    """Numbers that would make an empty or meaningless run: usage errors."""
    _number("--devices", args.devices, minimum=1)
    _number("--duration", args.duration, above=0)
    _number("--interval", args.interval, above=0)
    if args.interval > args.duration:
        raise UsageError("--interval %g is longer than --duration %g: devices would take no samples"
                         % (args.interval, args.duration))
    _number("--tenants", args.tenants, minimum=1)
    _number("--enroll-timeout", args.enroll_timeout, above=0)
    _number("--drain-timeout", args.drain_timeout, above=0)
    if not args.server_name:
        raise UsageError("--server-name must not be empty")
    sources = [o for o, v in (("--creds", args.creds), ("--mint-ca", args.mint_ca), ("--claim", args.claim)) if v]
    if not sources:
        raise UsageError("give --creds DIR, --mint-ca CA_CERT CA_KEY or --claim CERT KEY")
    if len(sources) > 1:
        raise UsageError("give one of --creds, --mint-ca and --claim, not %s" % " and ".join(sources))


def readable_file(option, path):
    """A file the run will read: missing or unreadable is a usage error."""
    if not os.path.exists(path):
        raise UsageError("%s %s: no such file" % (option, path))
    if os.path.isdir(path):
        raise UsageError("%s %s: is a directory, not a file" % (option, path))
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError("%s %s: cannot read it: %s" % (option, path, e.strerror or e)) from None
    return path


def check_ca_bundle(path):
    readable_file("--ca-bundle", path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except (ssl.SSLError, ValueError) as e:
        raise UsageError("--ca-bundle %s: no PEM CA certificate in it (%s)" % (path, e)) from None


def open_store(path):
    """The cloud's store, checked to be one before the run starts (a typo
    must not become an empty store and a run that 'lost' everything)."""
    readable_file("--store", path)
    from cloud.store import Store
    try:
        db = sqlite3.connect("file:%s?mode=ro" % quote(os.path.abspath(path)), uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
        if not {"telemetry", "missing", "dead_letters", "counters"} <= tables:
            raise UsageError("--store %s: not the cloud's store (no telemetry tables; it is DATA/tether.db)"
                             % path)
        return Store(path)
    except (sqlite3.Error, RuntimeError) as e:
        raise UsageError("--store %s: not the cloud's SQLite store (%s)" % (path, e)) from None


CRED_SUFFIXES = (".crt", ".pem")


def credentials_from_dir(root, limit):
    """TENANT/DEVICE.crt + TENANT/DEVICE.key, as `tether cloud serve --issue`
    writes them (a certificate named DEVICE.pem is taken too)."""
    if not os.path.exists(root):
        raise UsageError("--creds %s: no such directory" % root)
    if not os.path.isdir(root):
        raise UsageError("--creds %s: not a directory (it holds TENANT/DEVICE.crt + .key)" % root)
    try:
        tenants = sorted(os.listdir(root))
    except OSError as e:
        raise UsageError("--creds %s: cannot read it: %s" % (root, e.strerror or e)) from None
    creds, seen = [], set()
    for tenant in tenants:
        folder = os.path.join(root, tenant)
        if not os.path.isdir(folder):
            continue
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise UsageError("--creds %s: cannot read it: %s" % (folder, e.strerror or e)) from None
        for name in names:
            device, suffix = os.path.splitext(name)
            if suffix not in CRED_SUFFIXES or (tenant, device) in seen:
                continue
            key = os.path.join(folder, device + ".key")
            if not os.path.exists(key):
                continue
            seen.add((tenant, device))
            creds.append(Credential(tenant, device, os.path.join(folder, name), key))
    if not creds:
        raise UsageError("--creds %s holds no device credentials: it needs TENANT/DEVICE.crt + TENANT/DEVICE.key "
                         "(what `tether cloud serve --issue N` writes into DATA/devices)" % root)
    if len(creds) < limit:
        raise UsageError("--creds %s holds credentials for %d devices; --devices asks for %d"
                         % (root, len(creds), limit))
    return creds[:limit]


def mint_credentials(ca_cert, ca_key, out_dir, count, tenants):
    """Device credentials signed by a CA the user supplies."""
    with open(readable_file("--mint-ca", ca_cert), "rb") as f:
        try:
            cert = x509.load_pem_x509_certificate(f.read())
        except ValueError as e:
            raise UsageError("--mint-ca %s: not a PEM certificate (%s)" % (ca_cert, e)) from None
    with open(readable_file("--mint-ca", ca_key), "rb") as f:
        try:
            key = serialization.load_pem_private_key(f.read(), password=None)
        except (ValueError, TypeError) as e:
            raise UsageError("--mint-ca %s: not an unencrypted PEM private key (%s)" % (ca_key, e)) from None
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
    readable_file("--claim", key)
    with open(readable_file("--claim", cert), "rb") as f:
        try:
            claim_identity = identity_of(f.read())
        except ValueError as e:
            raise UsageError("--claim %s: not a claim certificate (%s)" % (cert, e)) from None
    prov_host, prov_port = parse_broker_url(args.prov_url, "--prov-url") if args.prov_url else (host, 8884)
    if prov_host != host:
        raise UsageError("the provisioning endpoint must be on the broker's host")
    endpoints = {"host": host, "device_port": port, "prov_port": prov_port, "cafile": args.ca_bundle,
                 "server_name": args.server_name}
    hwids = ["%s%05d" % (args.hwid_prefix, i) for i in range(args.devices)]
    t0 = time.monotonic()
    enrolled, failed = await enroll_many(endpoints, (cert, key), claim_identity, hwids, args.seed,
                                         timeout_s=args.enroll_timeout)
    if failed:
        first = failed[0]
        why = getattr(first.core, "last_reason", "") or first.core.state
        raise UsageError("%d of %d devices could not enroll by claim (first: %s, %s; see `tether cloud "
                         "audit`)" % (len(failed), len(hwids), first.hwid, why))
    print("enrolled %d devices by claim in %.1f s" % (len(enrolled), time.monotonic() - t0))
    return [Provisioned(e, args.ca_bundle) for e in enrolled]


def connect_hint(reason, args):
    """What a connect-error reason most likely means for this run."""
    r = reason.lower()
    if r == "connection refused":
        return "nothing listens at %s" % args.broker_url
    if r == "timed out":
        return "no answer from %s" % args.broker_url
    if "hostname mismatch" in r or "ip address mismatch" in r:
        return "the broker's certificate does not name --server-name %s" % args.server_name
    if r.startswith("certificate verify failed"):
        return "the broker's certificate is not signed by --ca-bundle"
    if r.startswith("tls refused") or r.startswith("closed by the broker"):
        return "the broker refused the device's certificate (another CA, revoked, expired?) or its identity"
    if r.startswith("connect refused"):
        return "the broker refused the device's CONNECT: a revoked identity, or one it does not allow?"
    return None


async def run(args):
    check_args(args)
    host, port = parse_broker_url(args.broker_url)
    if args.network_cut:
        cut_at, cut_s = parse_network_cut(args.network_cut, args.duration)
    check_ca_bundle(args.ca_bundle)
    if args.claim:
        readable_file("--claim", args.claim[0])
        readable_file("--claim", args.claim[1])
    elif args.creds:
        credentials_from_dir(args.creds, args.devices)  # before anything is made or connected
    else:
        readable_file("--mint-ca", args.mint_ca[0])
        readable_file("--mint-ca", args.mint_ca[1])
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError("--out %s: cannot make the directory: %s" % (args.out, e.strerror or e)) from None
    store = open_store(args.store) if args.store else None
    try:
        return await _run(args, host, port, store, (cut_at, cut_s) if args.network_cut else None)
    finally:
        if store is not None:
            store.close()


async def _run(args, host, port, store, cut):
    if args.claim:
        creds = await enroll_by_claim(args, host, port)
    elif args.creds:
        creds = credentials_from_dir(args.creds, args.devices)
    else:
        creds = mint_credentials(args.mint_ca[0], args.mint_ca[1], args.out, args.devices, args.tenants)
    view = live.Progress(quiet=args.quiet, connect_errors=True)
    try:
        fleet = Fleet(creds, args.ca_bundle, host, port, seed=args.seed, server_name=args.server_name,
                      sample_interval_s=args.interval, progress=view.update,
                      fresh_epochs=not args.claim)
    except CredentialError as e:
        view.stop()
        raise UsageError(str(e)) from None
    events, marks = [], []
    if cut is not None:
        at, length = cut
        events = [(at, fleet.cut_network), (at + length, fleet.restore_network)]
        marks = [(at, at + length, "network cut")]
    scope = RunScope(store, fleet.devices, time.time_ns() // 1_000_000) if store is not None else None
    fleet.start()
    try:
        await fleet.run_for(args.duration, events)
        drained = await fleet.drain(timeout_s=args.drain_timeout)
        duration = fleet.elapsed_s()
        if store is not None:
            await asyncio.sleep(0.5)  # the cloud's group commit lingers a few ms
            summary = summarize(fleet, store, duration, drained, scope=scope)
        else:
            summary = device_side_summary(fleet, duration, drained)
    finally:
        await fleet.close()
        view.stop()
    errors = fleet.metrics.connect_error_tally()
    for e in errors:
        hint = connect_hint(e["reason"], args)
        if hint:
            e["hint"] = hint
    summary["connect_errors"] = errors
    if errors:  # the failed check says why, too
        why = "; ".join("%s (%d attempts)" % (e["reason"], e["count"]) for e in errors[:3])
        for c in summary["checks"]:
            if c["name"] == "every device connected at the end" and not c["passed"]:
                c["detail"] += "; connect errors: " + why
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
