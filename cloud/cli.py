"""The `tether` command. Subcommands import their parts lazily so --help is fast."""

import argparse
import sys

DESCRIPTION = """\
tether: a portable device agent, its boards, a reference cloud and a fleet
simulator. Sequenced CBOR telemetry over MQTT with mutual TLS, stored
without loss or silent gaps.

  tether demo          run the whole thing end to end and write a report
  tether cloud serve   run the reference cloud (broker + ingest + store)
  tether sim run       run the fleet simulator against a running cloud
  tether cloud claim | allow | approve | enrollments   provisioning by claim
  tether cloud revoke | quarantine | release | audit    identity operations
  tether fw keygen | keyset | build | sign | verify | inspect   signed firmware
"""


def build_parser():
    p = argparse.ArgumentParser(prog="tether", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="end-to-end run on embedded defaults; writes summary.json and report.html",
                       description="Start the reference cloud (embedded mTLS broker, SQLite), issue a "
                       "certificate per virtual device, run every device as a real agent, cut the network "
                       "for all of them and restart the broker part-way, drain, verify, and write "
                       "OUT/summary.json and OUT/report.html. Exits 1 if any check fails.")
    d.add_argument("--devices", type=int, default=200, help="virtual devices (default 200)")
    d.add_argument("--duration", type=float, default=40.0, help="seconds of sampling (default 40)")
    d.add_argument("--out", default="tether-out", help="output directory (default ./tether-out)")
    d.add_argument("--seed", type=int, default=1, help="seed for every random choice (default 1)")
    d.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded",
                   help="broker to run the demo on (default embedded)")
    d.add_argument("--quiet", action="store_true", help="no live progress")

    c = sub.add_parser("cloud", help="the reference cloud")
    csub = c.add_subparsers(dest="cloud_command", metavar="CLOUD_COMMAND")
    s = csub.add_parser("serve", help="run broker + ingest + store until interrupted",
                        description="Run the reference cloud. The data directory keeps the CA, the "
                        "broker's certificate, issued device credentials and the SQLite store, and "
                        "survives restarts.")
    s.add_argument("--data", default="tether-cloud", help="data directory (default ./tether-cloud)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8883, help="device endpoint (default 8883)")
    s.add_argument("--prov-port", type=int, default=8884,
                   help="provisioning endpoint for claim certificates (default 8884)")
    s.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    s.add_argument("--issue", type=int, default=0, metavar="N",
                   help="issue credentials for N devices into DATA/devices before serving")
    s.add_argument("--tenants", type=int, default=2, help="spread issued devices over this many tenants")

    rv = csub.add_parser("revoke", help="revoke a device's identity: refused at once, live session ended",
                         description="Record the revocation of DEVICE (TENANT/DEVICE) in the cloud's data "
                         "directory, with who and why, and wait for the running cloud to enforce it: new "
                         "connections refused and any live session ended. Prints how long that took. "
                         "Exit 0 when enforced, 1 when recorded but not (yet) enforced.")
    rv.add_argument("device", metavar="TENANT/DEVICE")
    rv.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    rv.add_argument("--by", default=None, help="who (default: $USER)")
    rv.add_argument("--data", default="tether-cloud", help="the cloud's data directory")
    rv.add_argument("--wait", type=float, default=5.0, help="seconds to wait for enforcement (default 5)")
    for name, text in (("quarantine", "confine a device: it stays connected, its telemetry is flagged and "
                                      "kept apart, it may use only the quarantine topics (diagnostics, updates)"),
                       ("release", "end a device's quarantine")):
        q = csub.add_parser(name, help=text.split(":")[0], description=text[0].upper() + text[1:] +
                            ". Recorded with who and why in the audit trail; the running cloud applies it "
                            "at once on either broker.")
        q.add_argument("device", metavar="TENANT/DEVICE")
        q.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        q.add_argument("--by", default=None, help="who (default: $USER)")
        q.add_argument("--data", default="tether-cloud", help="the cloud's data directory")
    au = csub.add_parser("audit", help="list audited identity operations",
                         description="List the audit trail: who did what to which identity, when and why.")
    au.add_argument("--data", default="tether-cloud", help="the cloud's data directory")
    au.add_argument("--action", help="only this action (revoke, revocation_enforced, ...)")
    au.add_argument("--device", help="only this TENANT/DEVICE")
    au.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    from cloud import fw_cli, provision_cli
    fw_cli.add_parser(sub)
    provision_cli.add_parser(csub)  # issue 3: provisioning by claim
    from cloud import rollout_cli  # issue 5: staged rollouts, releases, maintenance windows
    rollout_cli.add_parser(csub)
    from cloud import console_tool, support_cli  # issue 6: console grants and the technician's tool
    support_cli.add_parser(csub)
    console_tool.add_parser(sub)

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
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from simulator.demo import main as demo_main
        return demo_main(args)
    if args.command == "cloud" and args.cloud_command == "serve":
        from cloud.serve import main as serve_main
        return serve_main(args)
    if args.command == "cloud" and args.cloud_command in ("revoke", "audit", "quarantine", "release"):
        from cloud import identity_cli
        return getattr(identity_cli, args.cloud_command)(args)
    if args.command == "fw":
        from cloud import fw_cli
        return fw_cli.main(args)
    if args.command == "cloud" and args.cloud_command in ("claim", "allow", "approve", "enrollments"):
        from cloud import provision_cli
        return provision_cli.main(args)
    if args.command == "cloud" and args.cloud_command in ("rollout", "releases", "window"):
        from cloud import rollout_cli
        return rollout_cli.main(args)
    if args.command == "console" or (args.command == "cloud" and args.cloud_command == "support"):
        from cloud import console_tool, support_cli
        return (console_tool if args.command == "console" else support_cli).main(args)
    if args.command == "sim" and args.sim_command == "run":
        from simulator.run import main as run_main
        return run_main(args)
    if args.command == "cloud":
        parser.parse_args(["cloud", "--help"])
    if args.command == "sim":
        parser.parse_args(["sim", "--help"])
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
