"""`tether agent enroll | run`: the agent on a Raspberry-Pi-class Linux board.

enroll: the identity core (agent/enroll.py) driven by board/enroller.py's
Enroller over real mTLS, with the key made in a FileKeystore under DATA
(it never leaves the board) and the record on FileStorage; it ends when the
device endpoint accepted the new certificate and the cloud confirmed it.

run: LinuxAgent (board/linux.py, the telemetry core on paho) with that
identity, a sample every interval (built-in readings of the board, or a
command's JSON), firmware updates through LinuxOta when --slots is
given, and the identity core over the same connection (board/linux_identity.py:
rotation before expiry; recovery of an expired certificate with the claim
options); until SIGTERM or SIGINT.

What lives under DATA (created 0700):

    keys/id0.key, keys/id1.key   the device key, PKCS#8 encrypted (AES-256), 0600
    keys/kek                     its password, 0600 (or --kek FILE, e.g. on another partition)
    identity                     the identity core's record (CBOR, written atomically)
    identity.crt                 the active certificate (PEM), for people and other tools
    telemetry/                   the telemetry core's queue and state (store-and-forward)

The key reaches ssl without a clear copy anywhere on disk: ssl is given
the encrypted key file and its password and decrypts it at each connect
(docs/firmware-boards.md, "tether agent").
"""

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import time

from cryptography.hazmat.primitives import serialization

from agent import enroll
from agent.actions import Log
from agent.events import ConnectionLost, Refused
from agent.manifest import fingerprint
from board.enroller import Enroller, IdentityBoard, cert_identity
from board.keystore import FileKeystore
from board.linux import FileStorage, LinuxAgent, SystemClock, SystemRng
from board.linux_console import Settings
from board.linux_identity import LinuxIdentity, Recovery, pem

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2

KEYS_DIR, RECORD, CERT_FILE, TELEMETRY_DIR = "keys", "identity", "identity.crt", "telemetry"
READINGS_MAX = 32                  # what the cloud's ingest takes (cloud/ingest.py)
READING_KEY_CHARS_MAX = 32
SAMPLE_OUTPUT_BYTES_MAX = 64 * 1024
STEP_S = 0.2                       # the longest the loop waits on the network before sampling
THERMAL = "/sys/class/thermal"

log = logging.getLogger("tether.agent")

UNIT = """\
  [Unit]
  Description=tether agent
  Wants=network-online.target
  After=network-online.target

  [Service]
  ExecStart=/usr/local/bin/tether agent run --data /var/lib/tether --host cloud.example \\
      --port 8883 --ca /etc/tether/ca.crt
  Restart=always
  RestartSec=5
  KillSignal=SIGTERM

  [Install]
  WantedBy=multi-user.target
"""

ENROLL_HELP = """\
Enroll this board by claim, once (docs/identity.md): make the device key in
DATA/keys (encrypted at rest, 0600; it never leaves the board), ask the
provisioning endpoint with the batch's claim certificate and the board's
hardware id, store the certificate the cloud issued for the identity the
allowlist binds to that hardware id (DATA/identity, DATA/identity.crt),
prove it on the device endpoint and wait for the cloud's confirmation.

Run it again at any time: an enrolled board just proves its identity again
(exit 0); a board whose answer was lost gets the same certificate without
spending quota.

Exit codes: 0 enrolled; 2 refused by the cloud (not allowlisted, quota
used up, claim revoked, ...) or still pending operator approval at
--timeout (the reason is printed); 1 any other error (no answer, TLS
refused, bad files).
"""

RUN_HELP = """\
Run the agent with the identity `tether agent enroll` stored in DATA:
sequenced telemetry over MQTT with mutual TLS, queued on disk
(DATA/telemetry) while the broker is unreachable and resent after, and,
with --slots, signed firmware updates into A/B slots
(docs/firmware-boards.md).

Samples, one every --sample-interval seconds (default 10):
  default           the board's own readings: load_1m/5m/15m, uptime_s,
                    mem_total_kb, mem_available_kb, and cpu_temp_c if
                    /sys/class/thermal has a zone
  --sample-command  a command run each time (split like a shell, no shell);
                    its stdout must be one JSON object of at most 32 numbers
                    with keys of 1..32 characters, e.g. {"temp_c": 21.5}.
                    Anything else (bad JSON, a non-number, a non-zero exit,
                    more than --sample-timeout seconds) is logged and that
                    sample skipped; the agent carries on.

Firmware updates (all of --slots, --hw-class, --root-key): the update
machine verifies each release against the root public key (k of n release
signatures), writes the other slot, and runs --reboot-command (default
`systemctl reboot`) once the cloud acknowledged the installed report; the
next start runs the new image on trial and confirms it after 3
acknowledged telemetry records, or rolls back. When the reboot command
returns, the agent stops (exit 0): the board is going down, and the next
start acts on the boot record.

The certificate (30 days by default) is rotated at two thirds of its
lifetime over the same connection: a new key in the other slot of
DATA/keys, the cloud's new certificate tried on a new connection, the old
key erased and the old certificate retired once it works; DATA/identity.crt
then holds the new one. A power cut at any point leaves a working identity.
A certificate that expired anyway (the board was off through its lifetime)
is recovered through the provisioning endpoint when run is given
--prov-url, --claim-cert, --claim-key and --hwid (as enroll takes them; the
loop goes on meanwhile, samples are queued); without them the error is
logged, and `tether agent enroll` recovers it.

Field console (--console PORT --support-key FILE; docs/console.md): the
technicians' console on the board's serial port (or PORT "pty" to try it:
the pty's path is logged), grants checked against the support public key,
every command on the audit log in DATA/console before it runs, the log
uploaded to the cloud over this connection. Commands act on the running
agent: status, versions, telemetry, net, log, rotate-identity, set
sample-interval, reboot (with --slots); rollback and factory-reset are
refused as unsupported on Linux.

It runs until SIGTERM or SIGINT, then disconnects and exits 0; the queue is
on disk at every sample, so nothing is lost by a stop or a crash. Run it as
a systemd service that restarts it, e.g. /etc/systemd/system/tether-agent.service:

%s
then `systemctl enable --now tether-agent`.

Exit codes: 0 stopped by a signal (or for a reboot); 1 not enrolled, bad
files, or a disk error; 2 options that do not go together or out of range.
""" % UNIT


class AgentError(Exception):
    """A usage or setup problem: printed, exit 1."""


class UsageError(AgentError):
    """Options that do not go together, or a value out of range: exit 2, as
    argparse's own usage errors."""


class Refusal(Exception):
    """The cloud refused this board (or it waits for approval): exit 2."""


class SampleError(Exception):
    """One sample could not be read: logged, skipped."""


# ---------------------------------------------------------------------- the parser

def add_parser(sub):
    """`tether agent enroll | run`."""
    a = sub.add_parser("agent", help="the agent on a Linux board: enroll by claim, then run",
                       description="The device agent on a Raspberry-Pi-class Linux board. First "
                       "`tether agent enroll` (once, by claim), then `tether agent run` (as a service).")
    asub = a.add_subparsers(dest="agent_command", metavar="AGENT_COMMAND")
    e = asub.add_parser("enroll", help="make the device key and enroll by claim (exit 0 enrolled, 2 refused)",
                        description=ENROLL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--data", required=True, metavar="DIR", help="the agent's data directory (keys, identity)")
    e.add_argument("--prov-url", required=True, metavar="HOST:PORT",
                   help="the provisioning endpoint (`tether cloud serve --prov-port`, default 8884)")
    e.add_argument("--device-port", type=int, default=8883, metavar="PORT",
                   help="the device endpoint on the same host, where the new certificate is proven "
                   "(default 8883)")
    e.add_argument("--claim-cert", required=True, metavar="FILE", help="the batch's claim certificate")
    e.add_argument("--claim-key", required=True, metavar="FILE", help="the batch's claim key")
    e.add_argument("--ca", required=True, metavar="FILE", help="CA certificate that signed the broker's")
    e.add_argument("--hwid", required=True, metavar="ID", help="this board's hardware id, as allowlisted")
    e.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="give up after S seconds (default 120); pending approval is waited for until then")
    e.add_argument("--kek", metavar="FILE", help="the key's password file (default DATA/keys/kek)")
    e.add_argument("--server-name", default="localhost", help="name in the broker's certificate")
    e.add_argument("--verbose", action="store_true")

    r = asub.add_parser("run", help="run the agent: telemetry, and firmware updates with --slots",
                        description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--data", required=True, metavar="DIR", help="the data directory `enroll` filled")
    r.add_argument("--host", required=True, help="the broker's host")
    r.add_argument("--port", type=int, default=8883, help="the device endpoint (default 8883)")
    r.add_argument("--ca", required=True, metavar="FILE", help="CA certificate that signed the broker's")
    r.add_argument("--kek", metavar="FILE", help="the key's password file (default DATA/keys/kek)")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--sample-command", metavar="CMD", help="a command printing one JSON object of numbers")
    r.add_argument("--sample-interval", type=float, default=10.0, metavar="S",
                   help="seconds between samples (default 10)")
    r.add_argument("--sample-timeout", type=float, default=10.0, metavar="S",
                   help="the sample command's time limit (default 10)")
    u = r.add_argument_group("firmware updates (give --slots, --hw-class and --root-key together)")
    u.add_argument("--slots", metavar="DIR", help="A/B slot directory (board/linux_slots.py: slot0.img, "
                   "slot1.img, bootstate; U-Boot's environment if fw_setenv is on PATH, else DIR/bootenv)")
    u.add_argument("--hw-class", metavar="C", help="this board's hardware class, as releases name it")
    u.add_argument("--root-key", metavar="FILE", help="the firmware root public key (PEM or raw 65 bytes)")
    u.add_argument("--k", type=int, default=2, help="release signatures required (default 2)")
    r.add_argument("--site", default="default", metavar="S",
                   help="this board's site, as the cloud allowlisted it: rollouts target it, and console "
                        "grants for tenant/S cover this board (default: default)")
    u.add_argument("--trial-timeout", type=float, default=120.0, metavar="S",
                   help="a new image must get 3 records acknowledged within S s or roll back (default 120)")
    u.add_argument("--reboot-command", default="systemctl reboot", metavar="CMD",
                   help="how to reboot into the new slot (default `systemctl reboot`)")
    u.add_argument("--version-command", metavar="CMD",
                   help="prints the running image's version; run with TETHER_SLOT and TETHER_SLOT_PATH "
                   "set (default: VERSION_ID from /etc/os-release)")
    f = r.add_argument_group("field console (give --console and --support-key together; docs/console.md)")
    f.add_argument("--console", metavar="PORT",
                   help="serve the technicians' console on this serial port (/dev/ttyS0, /dev/ttyGS0, "
                        "a pyserial URL), or on a new pty with PORT 'pty' (its path is logged)")
    f.add_argument("--support-key", metavar="FILE",
                   help="the support public key grants are checked against (`tether cloud support pubkey`)")
    f.add_argument("--console-baud", type=int, default=115200, metavar="B", help="(default 115200)")
    c = r.add_argument_group("recovery of an expired certificate (give all four, as `enroll` takes them)")
    c.add_argument("--prov-url", metavar="HOST:PORT", help="the provisioning endpoint")
    c.add_argument("--claim-cert", metavar="FILE", help="the batch's claim certificate")
    c.add_argument("--claim-key", metavar="FILE", help="the batch's claim key")
    c.add_argument("--hwid", metavar="ID", help="this board's hardware id, as allowlisted")
    r.add_argument("--server-name", default="localhost", help="name in the broker's certificate")
    r.add_argument("--verbose", action="store_true")


def main(args):
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.agent_command == "enroll":
            return enroll_main(args)
        if args.agent_command == "run":
            return run_main(args)
    except Refusal as e:
        print("refused: %s" % e, file=sys.stderr)
        return EXIT_REFUSED
    except UsageError as e:
        print("usage: %s" % e, file=sys.stderr)
        return EXIT_REFUSED
    except AgentError as e:
        print("error: %s" % e, file=sys.stderr)
        return EXIT_ERROR
    print("usage: tether agent enroll|run ... (tether agent --help)", file=sys.stderr)
    return EXIT_REFUSED


# ---------------------------------------------------------------------- files

class BoardKeystore(FileKeystore):
    """FileKeystore whose TLS context gets the encrypted key file and its
    password (ssl decrypts it), never a clear copy of the key on disk."""

    def client_context(self, name, cert, cafile):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile)
        keyfile, password = self.tls_key(name)
        with tempfile.NamedTemporaryFile(suffix=".crt") as f:   # the certificate is public
            f.write(pem(cert))
            f.flush()
            ctx.load_cert_chain(f.name, keyfile, password)
        return ctx


def keystore(data, kek=None):
    return BoardKeystore(os.path.join(data, KEYS_DIR), kek)


def read_file(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise AgentError("cannot read %s %s: %s" % (what, path, e.strerror)) from None


def host_port(url, what):
    text = url.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AgentError("%s must be HOST:PORT, not %r" % (what, url))
    return host, int(port)


# ---------------------------------------------------------------------- enroll

def enroll_main(args):
    host, prov_port = host_port(args.prov_url, "--prov-url")
    claim_pem = read_file(args.claim_cert, "claim certificate")
    read_file(args.claim_key, "claim key")
    read_file(args.ca, "CA certificate")
    try:
        claim = cert_identity(claim_pem)
    except ValueError as e:
        raise AgentError("%s is not a claim certificate: %s" % (args.claim_cert, e)) from None
    storage = FileStorage(args.data)
    store = keystore(args.data, args.kek)
    core = enroll.Identity(enroll.Config(args.hwid, claim, store.capabilities, answer_timeout_ms=10000,
                                         backoff_base_ms=1000, backoff_cap_ms=10000), SystemRng())
    endpoints = {"host": host, "device_port": args.device_port, "prov_port": prov_port, "cafile": args.ca,
                 "server_name": args.server_name}
    device = LoggingEnroller(core, IdentityBoard(storage, store), endpoints, (args.claim_cert, args.claim_key),
                             SystemClock().now_ms, args.hwid,
                             fingerprint=lambda: key_fingerprint(store, core.slot))

    def refused():
        return core.state == enroll.RETRY and core.last_reason.startswith(enroll.REFUSED_ + ":")

    ended = asyncio.run(device.run(timeout_s=args.timeout, boot_blob=storage.read(RECORD),
                                   until=lambda: device.proven() or refused()))
    if ended and not refused():                  # proven: the connection is closed by now
        active = core.record["a"]
        storage.write_atomic(CERT_FILE, pem(active["cert"]))
        print("enrolled as %s (hardware id %s, certificate valid until %s UTC); key in %s"
              % (active["id"], args.hwid, time.strftime("%Y-%m-%d %H:%M", time.gmtime(active["exp"] / 1000)),
                 store.path(active["k"])))
        return EXIT_OK
    reason = core.last_reason
    if refused():
        raise Refusal("the cloud refused hardware id %s: %s" % (args.hwid, reason.split(":", 1)[1].strip()))
    if reason.startswith(enroll.PENDING + ":"):
        raise Refusal("hardware id %s is pending operator approval (`tether cloud approve %s`): the "
                      "operator checks that `tether cloud enrollments` shows key sha256 %s for it; run "
                      "enroll again after it" % (args.hwid, args.hwid, key_fingerprint(store, core.slot)))
    last = device.link_errors[-1] if device.link_errors else reason or "no answer"
    raise AgentError("not enrolled within %g s (state %s; last: %s)" % (args.timeout, core.state, last))


def key_fingerprint(store, name):
    """What `tether cloud enrollments` shows for a pending device: the first
    16 hex digits of SHA-256 over the key's uncompressed point."""
    public_key = store.public_key(name)
    return "?" if public_key is None else hashlib.sha256(public_key).hexdigest()[:16]


class LoggingEnroller(Enroller):
    """An Enroller that logs what the core says and keeps why connections
    failed, for the error message."""

    def __init__(self, *a, **kw):
        self.fingerprint = kw.pop("fingerprint", None)    # () -> the key's, said once while pending
        Enroller.__init__(self, *a, **kw)
        self.link_errors = []
        self.said_pending = False

    def feed(self, event):
        if isinstance(event, (ConnectionLost, Refused)):
            self.link_errors.append(event.reason)
            log.info("connection: %s", event.reason)
        return Enroller.feed(self, event)

    async def _carry(self, action):
        if isinstance(action, Log):
            log.info("%s: %s", action.code, action.detail)
            if (not self.said_pending and self.fingerprint is not None
                    and self.core.last_reason.startswith(enroll.PENDING + ":")):
                self.said_pending = True
                log.warning("waiting for an operator's approval of hardware id %s: the operator checks "
                            "that `tether cloud enrollments` shows key sha256 %s for it",
                            self.hwid, self.fingerprint())
        return await Enroller._carry(self, action)


# ---------------------------------------------------------------------- samples

def check_readings(readings):
    """The readings the cloud's ingest accepts, else SampleError."""
    if not isinstance(readings, dict) or not readings:
        raise SampleError("not a JSON object of readings: %.80r" % (readings,))
    if len(readings) > READINGS_MAX:
        raise SampleError("%d readings > %d" % (len(readings), READINGS_MAX))
    for key, value in readings.items():
        if not 1 <= len(key) <= READING_KEY_CHARS_MAX:
            raise SampleError("reading name %.40r: 1..%d characters" % (key, READING_KEY_CHARS_MAX))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SampleError("reading %r is not a number: %.40r" % (key, value))
        if isinstance(value, float) and not math.isfinite(value):
            raise SampleError("reading %r is not finite" % key)
        if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 64:
            raise SampleError("reading %r is out of range" % key)
    return readings


def command_sampler(command, timeout_s):
    argv = shlex.split(command)
    if not argv:
        raise UsageError("--sample-command is empty")

    def sample():
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SampleError("sample command ran over %g s" % timeout_s) from None
        except OSError as e:
            raise SampleError("sample command failed to start: %s" % e) from None
        if done.returncode != 0:
            raise SampleError("sample command exited %d: %s" % (done.returncode,
                                                                 done.stderr[-200:].decode(errors="replace")))
        if len(done.stdout) > SAMPLE_OUTPUT_BYTES_MAX:
            raise SampleError("sample command printed %d bytes" % len(done.stdout))
        try:
            readings = json.loads(done.stdout)
        except ValueError as e:
            raise SampleError("sample command output is not JSON (%s): %.80r" % (e, done.stdout)) from None
        return check_readings(readings)

    return sample


def board_readings():
    """Load, uptime, memory and CPU temperature, as far as this board has them."""
    r = {}
    try:
        r["load_1m"], r["load_5m"], r["load_15m"] = (round(x, 3) for x in os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/uptime") as f:
            r["uptime_s"] = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = dict(line.split(":", 1) for line in f if ":" in line)
        for name, key in (("MemTotal", "mem_total_kb"), ("MemAvailable", "mem_available_kb")):
            if name in mem:
                r[key] = int(mem[name].split()[0])
    except (OSError, ValueError):
        pass
    temp = cpu_temp_c()
    if temp is not None:
        r["cpu_temp_c"] = temp
    return check_readings(r)


def cpu_temp_c(root=THERMAL):
    try:
        zones = sorted(z for z in os.listdir(root) if z.startswith("thermal_zone"))
    except OSError:
        return None
    for zone in zones:
        try:
            with open(os.path.join(root, zone, "temp")) as f:
                return int(f.read().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return None


# ---------------------------------------------------------------------- run

def load_identity(data):
    """-> (active identity map, key slot) of the enrolled board."""
    record = enroll.decode_record(FileStorage(data).read(RECORD))
    if record is None or record.get("a") is None:
        raise AgentError("%s holds no enrolled identity: run `tether agent enroll --data %s ...` first"
                         % (data, data))
    return record["a"]


def load_root_key(path):
    data = read_file(path, "root public key")
    if len(data) == 65 and data[0] == 4:
        return data
    try:
        key = serialization.load_pem_public_key(data)
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    except (ValueError, TypeError) as e:
        raise AgentError("%s is not a P-256 public key: %s" % (path, e)) from None


def version_reader(command, slots):
    """version_of(slot) for the hello: the command's stdout, else /etc/os-release's VERSION_ID."""
    def version_of(slot):
        if command is None:
            try:
                with open("/etc/os-release") as f:
                    for line in f:
                        if line.startswith("VERSION_ID="):
                            return line.split("=", 1)[1].strip().strip('"') or "unknown"
            except OSError:
                pass
            return "unknown"
        env = dict(os.environ, TETHER_SLOT=str(slot), TETHER_SLOT_PATH=slots.slot_paths[slot])
        try:
            done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("version command failed: %s", e)
            return "unknown"
        return done.stdout.strip()[:64] or "unknown"
    return version_of


def make_ota(args, identity, stop):
    from agent import updater as up
    from board.linux_ota import LinuxOta, command_reboot
    from board.linux_slots import LinuxSlots
    given = [args.slots, args.hw_class, args.root_key]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("firmware updates need --slots, --hw-class and --root-key together")
    config = up.Config(args.hw_class, load_root_key(args.root_key), k=args.k, trial_acks_min=3,
                       trial_ms_max=int(args.trial_timeout * 1000))
    slots = LinuxSlots(args.slots)
    run_command = command_reboot(shlex.split(args.reboot_command))

    def reboot():
        run_command()          # raises when it fails: LinuxOta logs it and the record stands
        log.info("reboot command done: stopping (the next start runs the boot record)")
        stop.requested = True

    return LinuxOta(identity, config, slots, args.site, version_reader(args.version_command, slots),
                    reboot=reboot, logger=logging.getLogger("tether.ota"))


NO_CLAIM = "none"   # Config's hwid and claim when run cannot recover: no request ever names them


def make_identity(args, store):
    """The identity core over run's connection (board/linux_identity.py):
    rotation always; recovery of an expired certificate with --prov-url,
    --claim-cert, --claim-key and --hwid."""
    given = [args.prov_url, args.claim_cert, args.claim_key, args.hwid]
    if any(given) and not all(given):
        raise UsageError("recovery needs --prov-url, --claim-cert, --claim-key and --hwid together")
    recovery, hwid, claim = None, NO_CLAIM, NO_CLAIM
    if all(given):
        host, prov_port = host_port(args.prov_url, "--prov-url")
        read_file(args.claim_key, "claim key")
        try:
            claim = cert_identity(read_file(args.claim_cert, "claim certificate"))
        except ValueError as e:
            raise AgentError("%s is not a claim certificate: %s" % (args.claim_cert, e)) from None
        hwid = args.hwid
        recovery = Recovery({"host": host, "device_port": args.port, "prov_port": prov_port, "cafile": args.ca,
                             "server_name": args.server_name}, (args.claim_cert, args.claim_key), hwid)
    core = enroll.Identity(enroll.Config(hwid, claim, store.capabilities), SystemRng())
    try:
        return LinuxIdentity(core, FileStorage(args.data), store, args.ca, SystemClock(),
                             logging.getLogger("tether.identity"), recovery)
    except OSError as e:              # ssl.SSLError too: the claim key does not load, or does not match
        raise AgentError("the claim certificate and key do not load: %s" % e) from None


class Stop:
    """Set by SIGTERM/SIGINT (or the reboot); the loop ends after its pass."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        log.info("signal %d: stopping", signum)
        self.requested = True


def run_main(args):
    if args.sample_interval <= 0 or args.sample_timeout <= 0:
        raise UsageError("--sample-interval and --sample-timeout must be > 0")
    read_file(args.ca, "CA certificate")
    active = load_identity(args.data)
    tenant, _, device = active["id"].partition("/")
    FileStorage(args.data).write_atomic(CERT_FILE, pem(active["cert"]))
    store = keystore(args.data, args.kek)
    keypath, password = store.tls_key(active["k"])
    id_driver = make_identity(args, store)
    stop = Stop()
    sampler = command_sampler(args.sample_command, args.sample_timeout) if args.sample_command \
        else board_readings
    ota = make_ota(args, active["id"], stop)
    agent = LinuxAgent(os.path.join(args.data, TELEMETRY_DIR), tenant, device, args.host, args.port, args.ca,
                       os.path.join(args.data, CERT_FILE), keypath, logger=log, ota=ota,
                       key_password=password, id_driver=id_driver)
    settings = Settings(args.sample_interval)
    console = make_console(args, agent, ota, settings)
    if console is not None:
        from board.linux_console import AuditLink
        agent.audit = AuditLink(console, agent.identity, agent.clock)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("running as %s against %s:%d%s; the certificate is rotated before it expires%s", active["id"], args.host,
             args.port, ", updates on" if ota is not None else "",
             ", recovered through %s if it expires" % args.prov_url if id_driver.recovery else "")
    try:
        agent.boot()             # the queue from the last run, and with --slots the boot record
        loop(agent, sampler, settings, stop, console)
    finally:
        shutdown(agent)
    return EXIT_OK


def loop(agent, sampler, settings, stop, console=None):
    """Sample every settings.sample_interval_s (the console's `set` may change
    it), step the agent, and poll the console, until stop."""
    next_sample = time.monotonic()
    skipped = 0
    while not stop.requested:
        now = time.monotonic()
        if now >= next_sample:
            next_sample = now + settings.sample_interval_s
            try:
                readings = sampler()
                agent.sample(readings)
                if console is not None:
                    console.commands.sampled(readings)
            except SampleError as e:
                skipped += 1
                log.warning("sample skipped (%d so far): %s", skipped, e)
        agent.step(max(0.0, min(STEP_S, next_sample - time.monotonic())))
        if console is not None:
            console.poll()


def make_console(args, agent, ota, settings):
    """The field console of --console (board/linux_console.py), or None."""
    from board import linux_console
    if not args.console and not args.support_key:
        return None
    if not (args.console and args.support_key):
        raise UsageError("the console needs --console and --support-key together")
    point = load_root_key(args.support_key)
    recent = linux_console.RecentLog()
    logging.getLogger("tether").addHandler(recent)
    try:
        stream, where = linux_console.open_port(args.console, args.console_baud)
    except (OSError, ValueError) as e:     # pyserial's SerialException is an OSError
        raise AgentError("cannot open the console port %s: %s" % (args.console, e)) from None
    stream = linux_console.SafeStream(stream, args.console, args.console_baud)
    reboot = None if ota is None else ota.reboot
    commands = linux_console.LinuxCommands(agent, args.host, args.port, settings, recent, reboot)
    console = linux_console.LinuxConsole(agent, args.data, {fingerprint(point): point}, args.site,
                                         stream, commands)
    log.info("console on %s for %s (grants checked against support key %s)", where, agent.identity,
             fingerprint(point).hex())
    return console


def shutdown(agent):
    """DISCONNECT if connected; every record not acknowledged is in the queue
    file already and goes out after the next start."""
    client, agent.client = agent.client, None
    if client is not None:
        try:
            client.disconnect()
            client.loop(timeout=0.1)
        except (OSError, ValueError):
            pass
    log.info("stopped: %d records queued on disk", len(agent.core.queue))
