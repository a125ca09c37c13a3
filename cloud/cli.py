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
  tether cloud releases | rollout | window   firmware releases, staged rollouts
  tether cloud support   console grants, revocations, reviews, audit logs
  tether console PORT    a field technician's session on a device's console
  tether fw keygen | keyset | build | sign | verify | inspect   signed firmware
  tether agent enroll | run   the agent on a Linux board

Every command has --help. A command group given without its command (e.g.
`tether cloud rollout`) prints its help and exits 2.
"""


def version():
    """The installed package's version (pyproject.toml's, read directly when
    running from a checkout that was not installed)."""
    from importlib import metadata
    try:
        return metadata.version("tether")
    except metadata.PackageNotFoundError:
        import os
        import tomllib
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, ValueError):
            return "unknown"


def build_parser():
    p = argparse.ArgumentParser(prog="tether", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version="tether " + version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="end-to-end run on embedded defaults; writes summary.json and report.html",
                       description="Start the reference cloud (mTLS broker, SQLite), enroll every virtual "
                       "device by claim (each makes its own key; a tenth wait for operator approval), run "
                       "every device as the real agent: telemetry through a network cut and a broker "
                       "restart, certificate rotation, quarantine, revocation, and attacks on each control; "
                       "then a staged firmware rollout (a bad release that must halt in its canary, a good "
                       "one to the whole fleet, attacks on the update channel) and field console sessions "
                       "with their attacks. Drains, verifies, and writes OUT/summary.json and "
                       "OUT/report.html. Exits 1 if any check fails.")
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
                        "survives restarts; this is the one command that makes a cloud there, every "
                        "other `tether cloud` command refuses a --data without one. Exit codes: 0 "
                        "stopped (Ctrl-C or SIGTERM), 1 could not start for another reason, 2 usage: a "
                        "port already in use (the message names the option), two endpoints on one port, "
                        "or a --host it cannot listen on.")
    s.add_argument("--data", default="tether-cloud",
                   help="data directory, made on first use (default ./tether-cloud)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address every endpoint listens on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8883, help="device endpoint (default 8883)")
    s.add_argument("--prov-port", type=int, default=8884,
                   help="provisioning endpoint for claim certificates (default 8884)")
    s.add_argument("--fw-http-port", type=int, default=8885,
                   help="firmware payloads over HTTPS range requests for boards that prefer them "
                        "to MQTT chunks, device certificates only (default 8885; 0: off)")
    s.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded",
                   help="MQTT broker: embedded (in this process) or mosquitto (the mosquitto binary, "
                        "run as child processes) (default embedded)")
    s.add_argument("--issue", type=int, default=0, metavar="N",
                   help="issue credentials for N devices into DATA/devices before serving")
    s.add_argument("--tenants", type=int, default=2,
                   help="spread issued devices over this many tenants, tenant0, tenant1, ... (default 2)")

    from cloud import identity_cli
    identity_cli.add_parser(csub)

    from cloud import fw_cli, provision_cli
    fw_cli.add_parser(sub)
    provision_cli.add_parser(csub)  # issue 3: provisioning by claim
    from cloud import rollout_cli  # issue 5: staged rollouts, releases, maintenance windows
    rollout_cli.add_parser(csub)
    from cloud import console_tool, support_cli  # issue 6: console grants and the technician's tool
    support_cli.add_parser(csub)
    console_tool.add_parser(sub)

    from simulator import run as sim_run
    sim_run.add_parser(sub)
    from board import linux_main  # `tether agent enroll | run` on a Linux board
    linux_main.add_parser(sub)
    _describe_all(p)
    return p


def _describe_all(parser):
    """A command without a description gets its one-line help as one, so its
    --help says what it does (argparse shows none otherwise)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe_all(sub)


def missing_command(parser, args):
    """The parser of a command group given without its command (`tether`,
    `tether cloud rollout`), else None."""
    while True:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            return None
        chosen = getattr(args, groups[0].dest, None)
        if chosen is None:
            return parser
        parser = groups[0].choices[chosen]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    bare = missing_command(parser, args)
    if bare is not None:         # every bare group alike: its help, exit 2 (argparse's usage code)
        bare.print_help(sys.stderr)
        return 2
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
    if args.command == "agent" and args.agent_command in ("enroll", "run"):
        from board import linux_main
        return linux_main.main(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
