"""The field console beside the ESP32 agent, in its one loop: attach()
puts agent/console.py on a stream (board/esp32_console.py UartStream on a
board) next to an Esp32Agent (board/esp32_agent.py). Its commands act on
the agent (AgentCommands); its audit log goes to the cloud over the agent's
own MQTT link and the cloud's revocation lists, checkpoints and time come
back the same way (AuditLink, agent/audit_upload.py). Portable: it runs
on MicroPython as it does in the tests on CPython.

    agent = Esp32Agent(...)
    agent.boot()
    agent_console.attach(agent, UartStream(machine.UART(0, 115200)), site, support_keys,
                         FlashStorage("/console"), reboot=machine.reset)
    agent.run(read_sensors, sample_ms=10000)
"""

import os

from agent import audit_upload
from agent import console as core
from agent.actions import Log, Publish
from board.console_port import ConsolePort, boot_console
from board.esp32_agent import _ticks_diff

BITS_PER_TICK = 8          # of the 256-bit scalar per pass: 32 passes per signature
POLL_MS = 1000             # the audit uploader's Poll (it reads the log), at most this often
INBOX_MAX = 8              # the cloud's support messages held until the next pass


class AgentCommands:
    """The console's commands answered from a running Esp32Agent
    (board/esp32_agent.py). reboot(): the board's reset, run once the
    session that asked for it ends (None: reboot is unsupported)."""

    def __init__(self, agent, reboot=None):
        self.agent = agent
        self.reboot = reboot
        self.reboot_asked = False

    def run(self, command, args, role):
        handler = getattr(self, "_" + command.replace("-", "_"), None)
        if handler is None:
            return ["%s is not available on this board" % command], "unsupported"
        return handler(args)

    def session_ended(self, reason):
        if self.reboot_asked:
            self.reboot_asked = False
            self.reboot()

    def _help(self, args):
        return ["%s (%s)" % (name, core.COMMANDS[name][0]) for name in sorted(core.COMMANDS)], None

    def _status(self, args):
        a = self.agent
        return ["device %s" % a.identity,
                "telemetry %s, %d records queued, %d acknowledged since boot"
                % (a.core.state, len(a.core.queue), a.acked)], None

    def _versions(self, args):
        ota = self.agent.ota
        if ota is None:
            return ["no update slots"], None
        boot = ota.updater.boot
        return ["slot %d running, security version %d" % (boot.active, boot.sv),
                "update phase %s%s" % (boot.phase, (" (%s into slot %d)" % (boot.ref, boot.target))
                                        if boot.ref else "")], None

    def _telemetry(self, args):
        return self.agent.recent_samples[-(int(args[0]) if args else 10):], None

    def _net(self, args):
        a = self.agent
        return ["link %s" % a.link.state, "%d connections lost since boot" % a.lost], None

    def _log(self, args):
        return self.agent.recent_log[-(int(args[0]) if args else 10):], None

    def _rotate_identity(self, args):
        if self.agent.id is None:
            return ["no identity driver on this board"], "unsupported"
        self.agent.id.rotate_now()
        return ["identity rotation asked: a new key and certificate over this board's link"], None

    def _reboot(self, args):
        if self.reboot is None:
            return ["no reset here"], "unsupported"
        self.reboot_asked = True
        return ["rebooting when this session ends"], None


class AuditLink:
    """agent/audit_upload.py's Uploader over the agent's own connection
    (the agent calls online(publish) with publish(topic, payload) at QoS 1,
    offline(), on_message(payload) for down_topic, and step(time_s) each
    pass; board/linux_console.py adapts it to paho): the console's audit log up, the
    cloud's revocation lists, checkpoints and time down. What the uploader
    hands the console's side is run by its port (a reply reaches the UART).
    The log is read from flash only when there is something to do, and at
    most every POLL_MS (64 KiB at most: a small board's heap)."""

    def __init__(self, port, storage, identity, ticks_ms, log):
        self.port = port
        self.storage = storage
        self.ticks_ms = ticks_ms
        self.log = log
        self.uploader = audit_upload.Uploader(port.console, identity, storage.read(audit_upload.CURSOR_FILE))
        self.down_topic = self.uploader.down
        self.publish = None       # publish(topic, payload) while online
        self.inbox = []
        self.polled_ms = None

    def online(self, publish):
        self.publish = publish
        self._feed(audit_upload.Online(self.ticks_ms()))

    def offline(self):
        self.publish = None
        self.inbox = []
        self._feed(audit_upload.Offline(self.ticks_ms()))

    def on_message(self, payload):
        if len(self.inbox) < INBOX_MAX:
            self.inbox.append(bytes(payload))

    def step(self, time_s):
        now = self.ticks_ms()
        while self.inbox:
            self._feed(audit_upload.Received(self.inbox.pop(0), self._log(), now, time_s))
        u = self.uploader
        work = u.state in (audit_upload.SYNCING, audit_upload.SENDING) or (
            u.state == audit_upload.IDLE and (u.pending() or u.checkpoint is not None
                                              or self.port.console.checkpoint is not None))
        if not work or (self.polled_ms is not None and _ticks_diff(now, self.polled_ms) < POLL_MS):
            return
        self.polled_ms = now
        self._feed(audit_upload.Poll(self._log(), now, time_s))

    def _log(self):
        return self.storage.read(core.AUDIT_FILE) or b""

    def _feed(self, event):
        rest = []
        for action in self.uploader.feed(event):
            if isinstance(action, Publish):
                if self.publish is not None:
                    self.publish(action.topic, action.payload)
            elif isinstance(action, Log):
                self.log("audit upload %s: %s" % (action.code, action.detail))
            else:
                rest.append(action)
        self.port.run(rest)


def attach(agent, stream, site, support_keys, storage, reboot=None, random_bytes=None,
           bits_per_tick=BITS_PER_TICK):
    """The field console beside an Esp32Agent, on `stream` (UartStream(machine.UART(...))
    on a board): commands act on the agent, the audit log goes to the cloud
    over its link. The agent polls both in its loop. -> the ConsolePort."""
    # Grants name the device by its identity and a site as tenant/site (names
    # are unique only within a tenant).
    tenant = agent.identity.split("/")[0]
    site = None if site is None else "%s/%s" % (tenant, site)
    console = boot_console(agent.identity, site, support_keys, storage, random_bytes or os.urandom,
                           bits_per_tick=bits_per_tick)
    port = ConsolePort(stream, console, storage, AgentCommands(agent, reboot), agent.clock)
    agent.attach_console(port, AuditLink(port, storage, agent.identity, agent.clock.ticks_ms, agent.log))
    return port
