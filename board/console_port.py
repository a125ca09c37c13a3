"""The console's driver on CPython boards: serves agent.console on a byte
stream (a pyserial port on Linux, the master side of a pty for a simulated
device) and carries out its actions against the board's storage.

    console = boot_console("d1", "site-a", support_keys, storage, os.urandom)
    port = ConsolePort(serial.Serial("/dev/ttyS0", 115200, timeout=0.05),
                       console, storage, DeviceCommands("d1"), clock)
    port.serve(stop_event)

Actions run in order: an audit record is appended (and persisted console
state written) before the reply is sent and before a command runs. A
failure of storage stops the loop (the next boot recovers the log) instead
of running a command that was not recorded.
"""

import os

from agent import auditlog
from agent import console as core
from agent.actions import Append, WriteAtomic

READ_BYTES_MAX = 4096
WORK_TICKS_MAX = 257        # enough for a check stepped one bit per tick


def boot_console(device_id, site, keys, storage, random_bytes, bytes_max=auditlog.LOG_BYTES_MAX,
                 bits_per_tick=256):
    """A Console continuing the audit log on storage (a torn tail from a
    power cut is cut off first, atomically) with its persisted state."""
    chain, repair = auditlog.recover(device_id, storage.read(core.AUDIT_FILE), bytes_max)
    if repair is not None:
        storage.write_atomic(core.AUDIT_FILE, repair)
    return core.Console(device_id, site, keys, chain, random_bytes, storage.read(core.STATE_FILE),
                        bits_per_tick)


class LineReader:
    """Bytes in, whole lines out. A line longer than the console accepts is
    cut to LINE_CHARS_MAX + 1 bytes (which the console refuses as too long)
    and the rest of it, up to the newline, is discarded: the buffer is bounded."""

    def __init__(self, limit=core.LINE_CHARS_MAX):
        self.limit = limit
        self.buf = bytearray()
        self.discarding = False

    def feed(self, data):
        lines = []
        for b in data:
            if b == 0x0A:
                if not self.discarding:
                    lines.append(bytes(self.buf))
                self.buf = bytearray()
                self.discarding = False
            elif not self.discarding:
                self.buf.append(b)
                if len(self.buf) > self.limit:
                    lines.append(bytes(self.buf))
                    self.buf = bytearray()
                    self.discarding = True
        return lines


class ConsolePort:
    def __init__(self, stream, console, storage, commands, clock):
        self.stream = stream
        self.console = console
        self.storage = storage
        self.commands = commands
        self.clock = clock
        self.reader = LineReader()

    def serve(self, stop):
        """Until stop (a threading.Event) is set."""
        while not stop.is_set():
            self.poll()

    def poll(self, work_ticks_max=WORK_TICKS_MAX):
        """Read what has arrived (waiting at most the stream's timeout), feed
        each line to the console, then a tick; run the resulting actions. A
        stepped signature check is finished now, in up to work_ticks_max more
        ticks (a small board passes 0 and lets its main loop step it)."""
        data = self._read()
        for line in self.reader.feed(data):
            self.run(self.console.feed(core.Line(line, self.clock.ticks_ms(), self._time_s())))
        self.run(self.console.feed(core.Tick(self.clock.ticks_ms(), self._time_s())))
        for _ in range(work_ticks_max):     # a stepped signature check: finish it now
            if not self.console.busy():
                break
            self.run(self.console.feed(core.Tick(self.clock.ticks_ms(), self._time_s())))

    def run(self, actions):
        for action in actions:
            if isinstance(action, Append):
                self.storage.append(action.name, action.data)
            elif isinstance(action, WriteAtomic):
                self.storage.write_atomic(action.name, action.data)
            elif isinstance(action, core.Send):
                self._write(action.line)
            elif isinstance(action, core.Execute):
                lines, error = self.commands.run(action.command, action.args, action.role)
                self.run(self.console.finished(action.command, lines, error))
            elif isinstance(action, core.EndSession):
                self.commands.session_ended(action.reason)

    def _time_s(self):
        return self.clock.now_ms() // 1000

    def _read(self):
        waiting = getattr(self.stream, "in_waiting", None)
        if waiting is None:
            return self.stream.read(READ_BYTES_MAX)
        return self.stream.read(min(max(waiting, 1), READ_BYTES_MAX))

    def _write(self, line):
        self.stream.write(line.encode("ascii") + b"\n")
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


class PtyStream:
    """The master side of a pty as a stream: read(n) waits up to timeout_s
    and returns what arrived (b"" on timeout), write() writes it all."""

    def __init__(self, fd, timeout_s=0.05):
        self.fd = fd
        self.timeout_s = timeout_s

    def read(self, n):
        import select  # here, not at the top: this module also runs on MicroPython (board/esp32_console.py)
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            return b""
        try:
            return os.read(self.fd, n)
        except OSError:          # EIO: the other side is closed
            return b""

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


class SocketStream:
    """A connected TCP socket as a stream (a device whose console is reached
    with `tether console socket://HOST:PORT`, as a serial server exposes one)."""

    def __init__(self, sock, timeout_s=0.05):
        self.sock = sock
        self.sock.settimeout(timeout_s)

    def read(self, n):
        try:
            return self.sock.recv(n)
        except OSError:          # timeout, or the peer went away
            return b""

    def write(self, data):
        self.sock.sendall(data)


class DeviceCommands:
    """What a simulated (or demo Linux) device answers to console commands.
    run() returns (output lines, None) or ([], error code). Privileged
    commands are recorded in `executed`, in order; the board integration
    maps them to the updater and identity code (reboot, rollback, ...)."""

    def __init__(self, device_id, version="1.0.0", telemetry=(), log=(), hooks=None):
        self.device_id = device_id
        # command -> fn(args) -> output lines: what the board really does
        # (e.g. "rotate-identity" feeds RotateNow to the identity core)
        self.hooks = dict(hooks or {})
        self.version = version
        self.telemetry = list(telemetry)
        self.log = list(log)
        self.config = {}
        self.executed = []
        self.sessions_ended = []

    def run(self, command, args, role):
        self.executed.append((command, tuple(args)))
        handler = self.hooks.get(command) or getattr(self, "_" + command.replace("-", "_"), None)
        if handler is None:
            return [], "unsupported"
        return handler(args), None

    def session_ended(self, reason):
        self.sessions_ended.append(reason)

    def _help(self, args):
        return ["%s (%s)" % (name, core.COMMANDS[name][0]) for name in sorted(core.COMMANDS)]

    def _status(self, args):
        return ["device %s" % self.device_id, "version %s" % self.version,
                "config %d keys" % len(self.config)]

    def _versions(self, args):
        return ["slot 0 %s active" % self.version, "slot 1 empty"]

    def _telemetry(self, args):
        return self.telemetry[-int(args[0] if args else 10):]

    def _net(self, args):
        return ["link up", "broker unknown (offline)"]

    def _log(self, args):
        return self.log[-int(args[0] if args else 10):]

    def _reboot(self, args):
        return ["rebooting after this session"]

    def _rollback(self, args):
        return ["rollback requested"]

    def _rotate_identity(self, args):
        return ["identity rotation requested"]

    def _set(self, args):
        self.config[args[0]] = args[1]
        return ["%s = %s" % (args[0], args[1])]

    def _factory_reset(self, args):
        return ["factory reset requested"]
