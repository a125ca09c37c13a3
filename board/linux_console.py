"""The field console in `tether agent run --console PORT`: agent/console.py
served by board/console_port.py on a serial port (anything pyserial opens:
/dev/ttyS0, /dev/ttyAMA0, /dev/ttyGS0 for a USB gadget, rfc2217:// or
socket:// for a serial server) or on a fresh pty (PORT "pty": its path is
logged, to try the console on a desk with `tether console /dev/pts/N`).

It is polled from the agent's own loop (no thread): a command acts on the
running agent directly, after its audit record is on flash. The audit log
goes to the cloud over the agent's own connection (AuditLink,
agent/audit_upload.py: t/<tenant>/<device>/audit up, .../support down),
and the cloud's revocation lists, checkpoints and time come back the same
way (a revoked grant's open session ends at once). Grants are
checked against the support public key given (`tether cloud support
pubkey`); grants name the device by its identity (acme/pi-1, as `tether
cloud support grant --device` and the cloud's audit streams name it) and
the site as tenant/--site (acme/plant-2): names are unique only within a
tenant, so a grant for one tenant's device opens nothing of another's. The audit log and the console's state are in
DATA/console (the log is bounded; a full log refuses new sessions).

What the commands do on a Linux board:
  status            identity, certificate expiry, telemetry state and queue
  versions          the running slot and its version; the update phase (with --slots)
  telemetry [N]     the last N samples taken (default 10)
  net               the broker, whether the link is up, records acknowledged
  log [N]           the agent's last N log lines (default 10)
  rotate-identity   a new key and certificate now (the identity core's RotateNow)
  set KEY VALUE     sample-interval SECONDS (this run only)
  reboot            runs --reboot-command once the session ends (not without --slots)
  rollback, factory-reset   refused as unsupported here: a rollback is the
                    updater's (a failed trial rolls back by itself) and a
                    factory reset of a Linux board is its image's business
"""

import collections
import logging
import os
import time
import tty

from agent.events import RotateNow
from board.agent_console import AuditLink as PortableAuditLink
from board.console_port import ConsolePort, DeviceCommands, PtyStream, boot_console
from board.linux import FileStorage

CONSOLE_DIR = "console"
RECENT_MAX = 200
LINE_CHARS = 160
BAUD = 115200
WRITE_TIMEOUT_S = 0.5       # a serial write the other end takes no more of: dropped after this
REOPEN_S = 10               # a console port that failed: tried again this often

UNSUPPORTED = {
    "rollback": "a rollback is the updater's: a trial that fails rolls back by itself",
    "factory-reset": "not on a Linux board: reinstall its image",
}


class RecentLog(logging.Handler):
    """The agent's last log lines, for the console's `log` command."""

    def __init__(self, size=RECENT_MAX):
        logging.Handler.__init__(self, logging.INFO)
        self.lines = collections.deque(maxlen=size)

    def emit(self, record):
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            text = str(record.msg)
        self.lines.append("%s %s %s" % (time.strftime("%H:%M:%S", time.gmtime(record.created)),
                                        record.levelname.lower(), text[:LINE_CHARS]))


class Settings:
    """What `set` may change while the agent runs."""

    def __init__(self, sample_interval_s):
        self.sample_interval_s = sample_interval_s


class LinuxCommands(DeviceCommands):
    """DeviceCommands answered from the running agent (board/linux.py LinuxAgent)."""

    def __init__(self, agent, host, port, settings, recent_log, reboot=None):
        DeviceCommands.__init__(self, agent.identity)
        self.agent = agent
        self.broker = "%s:%d" % (host, port)
        self.settings = settings
        self.recent_log = recent_log
        self.samples = collections.deque(maxlen=RECENT_MAX)
        self.reboot = reboot            # fn() or None
        self.reboot_asked = False

    def sampled(self, readings):
        self.samples.append("%s %s" % (time.strftime("%H:%M:%S", time.gmtime()),
                                       " ".join("%s=%s" % kv for kv in sorted(readings.items()))))

    def run(self, command, args, role):
        if command in UNSUPPORTED:
            self.executed.append((command, tuple(args)))
            return [UNSUPPORTED[command]], "unsupported"
        if command == "reboot" and self.reboot is None:
            self.executed.append((command, tuple(args)))
            return ["no reboot command here (give --slots and --reboot-command)"], "unsupported"
        if command == "set":
            problem = _setting_problem(args)
            if problem is not None:
                self.executed.append((command, tuple(args)))
                return [problem], "bad_args"
        return DeviceCommands.run(self, command, args, role)

    def session_ended(self, reason):
        DeviceCommands.session_ended(self, reason)
        if self.reboot_asked:
            self.reboot_asked = False
            try:
                self.reboot()
            except Exception as e:      # a reboot command that fails: said, and the agent goes on
                logging.getLogger("tether.console").error("the reboot a technician asked for failed: %s", e)

    def _status(self, args):
        a = self.agent
        lines = ["device %s" % a.identity]
        driver = a.id_driver
        active = driver.core.record.get("a") if driver is not None else None
        if active is not None:
            lines.append("certificate valid until %s UTC" % time.strftime(
                "%Y-%m-%d %H:%M", time.gmtime(active["exp"] / 1000)))
        lines.append("telemetry %s, %d records queued, %d acknowledged since start"
                     % (a.core.state, len(a.core.queue), a.acked))
        return lines

    def _versions(self, args):
        ota = self.agent.ota
        if ota is None:
            return ["no update slots (run without --slots)"]
        boot = ota.updater.boot
        lines = ["slot %d running %s" % (boot.active, ota.version_of(boot.active)),
                 "security version %d, update phase %s" % (boot.sv, boot.phase)]
        if boot.ref:
            lines.append("update %s into slot %d" % (boot.ref, boot.target))
        return lines

    def _telemetry(self, args):
        n = int(args[0]) if args else 10
        return list(self.samples)[-n:] if n else []

    def _net(self, args):
        a = self.agent
        return ["broker %s" % self.broker,
                "link %s" % ("up" if a.accepted and a.client is not None else "down"),
                "%d records acknowledged since start" % a.acked]

    def _log(self, args):
        n = int(args[0]) if args else 10
        return list(self.recent_log.lines)[-n:] if n else []

    def _reboot(self, args):
        self.reboot_asked = True
        return ["rebooting when this session ends"]

    def _rotate_identity(self, args):
        if self.agent.id_driver is None:
            return ["no identity driver"]
        self.agent.feed_identity(RotateNow(self.agent.clock.now_ms()))
        return ["identity rotation asked: a new key and certificate over this connection"]

    def _set(self, args):
        self.settings.sample_interval_s = float(args[1])
        return ["sample-interval = %g s (this run)" % self.settings.sample_interval_s]


def _setting_problem(args):
    if args[0] != "sample-interval":
        return "only sample-interval SECONDS can be set"
    try:
        value = float(args[1])
    except ValueError:
        value = 0
    if not 0 < value <= 86400:
        return "sample-interval must be seconds in (0, 86400]"
    return None


def open_port(spec, baud=BAUD):
    """(stream, where) for a port spec: "pty" makes a pty pair and serves the
    master (where: the slave's path); else pyserial opens spec. Neither
    blocks: reads return what came, a write the peer has no room for fails
    at once (WRITE_TIMEOUT_S on a serial port) instead of stopping the agent."""
    if spec == "pty":
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        return PtyStream(master, 0), os.ttyname(slave)
    import serial
    return serial.serial_for_url(spec, baudrate=baud, timeout=0, write_timeout=WRITE_TIMEOUT_S), spec


class SafeStream:
    """A console stream whose failures end the console, never the agent: a
    port that goes away (a USB adapter unplugged: OSError) is closed and
    opened again every REOPEN_S; a write the peer has no room for (it does
    not read) is dropped, counted and said."""

    def __init__(self, stream, spec, baud=BAUD, clock=time.monotonic, log=None):
        self.stream = stream
        self.spec = spec
        self.baud = baud
        self.clock = clock
        self.log = log or logging.getLogger("tether.console")
        self.dead_since = None
        self.dropped = 0

    def read(self, n):
        if self.dead_since is not None and not self._reopen():
            return b""
        try:
            return self.stream.read(n) or b""
        except OSError as e:
            self._dead(e)
            return b""

    def write(self, data):
        if self.dead_since is not None:
            return
        try:
            self.stream.write(data)
        except OSError as e:
            if isinstance(e, BlockingIOError) or type(e).__name__ == "SerialTimeoutException":
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    self.log.warning("console: %d replies dropped, the other end does not read", self.dropped)
                return
            self._dead(e)

    def _dead(self, error):
        self.log.error("console port %s failed (%s): the console is off until it opens again; the agent "
                       "goes on", self.spec, error)
        self.dead_since = self.clock()
        close = getattr(self.stream, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                pass

    def _reopen(self):
        if self.spec == "pty" or self.clock() - self.dead_since < REOPEN_S:
            return False
        self.dead_since = self.clock()
        try:
            self.stream = open_port(self.spec, self.baud)[0]
        except (OSError, ValueError):
            return False
        self.dead_since = None
        self.log.info("console port %s open again", self.spec)
        return True


class LinuxConsole:
    """The console on one port, polled once per pass of the agent's loop."""

    def __init__(self, agent, data_dir, support_keys, site, stream, commands, random_bytes=os.urandom):
        if not isinstance(stream, SafeStream):
            stream = SafeStream(stream, getattr(stream, "port", None) or "pty")
        self.storage = FileStorage(os.path.join(data_dir, CONSOLE_DIR))
        # Grants name the device by its identity and a site as tenant/site: a
        # device or site name is only unique within its tenant.
        site = None if site is None else "%s/%s" % (agent.identity.partition("/")[0], site)
        self.console = boot_console(agent.identity, site, support_keys, self.storage, random_bytes)
        self.commands = commands
        self.port = ConsolePort(stream, self.console, self.storage, commands, agent.clock)

    def poll(self):
        self.port.poll()


class AuditLink:
    """board/agent_console.py's AuditLink (agent/audit_upload.py's Uploader)
    over LinuxAgent's paho connection, as LinuxAgent calls its `audit`
    driver: connected(client), lost(), on_message(payload) for down_topic,
    step() once per pass. Publishes go out at QoS 1; what the uploader hands
    the console's side (audit records, persisted state, a session a
    revocation ends) is run by the console's port, so a reply reaches the
    serial line."""

    def __init__(self, linux_console, identity, clock, logger=None):
        log = logger or logging.getLogger("tether.console")
        self.link = PortableAuditLink(linux_console.port, linux_console.storage, identity, clock.ticks_ms,
                                      log.info)
        self.down_topic = self.link.down_topic
        self.clock = clock

    def connected(self, client):
        client.subscribe(self.down_topic, qos=1)       # before the hello: a broker keeps the order
        self.link.online(lambda topic, payload: client.publish(topic, payload, qos=1))

    def lost(self):
        self.link.offline()

    def on_message(self, payload):
        self.link.on_message(payload)

    def step(self):
        self.link.step(self.clock.now_ms() // 1000)
