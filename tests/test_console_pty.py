"""The console over a real pty pair: the device side (board/console_port.py
on the pty's master, storage in real files) and the technician's tool
(`tether console`, pyserial on /dev/pts/N) as a separate process, driven
with --command, and as a person would at a terminal (a second pty as its
controlling terminal: a prompt, line editing, history). Exit codes and
errors as documented in cloud/console_tool.py."""

import os
import select
import subprocess
import sys
import threading
import time
import tty

import pytest
import serial

from agent import auditlog
from agent import console as core
from board.console_port import ConsolePort, DeviceCommands, PtyStream, boot_console
from board.linux import FileStorage
from cloud import firmware
from cloud.console_tool import Session
from cloud.support import SupportDesk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WallClock:
    def now_ms(self):
        return int(time.time() * 1000)

    def ticks_ms(self):
        return int(time.monotonic() * 1000)


class PtyDevice:
    """A device serving its console on the master side of a fresh pty."""

    def __init__(self, root, keys, device_id="d1"):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.storage = FileStorage(root)
        self.commands = DeviceCommands(device_id)
        console = boot_console(device_id, None, keys, self.storage, os.urandom)
        self.port = ConsolePort(PtyStream(self.master, 0.02), console, self.storage, self.commands,
                                WallClock())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.port.serve, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)

    def audit_kinds(self):
        return [r[3] for r in auditlog.records(self.storage.read(core.AUDIT_FILE) or b"")]


@pytest.fixture
def setup(tmp_path):
    desk = SupportDesk(str(tmp_path / "cloud"))
    keys_dir = str(tmp_path / "keys")
    key_path, pub_path, _ = firmware.write_keypair(keys_dir, "alice")
    point = firmware.load_public_key(pub_path)
    grants = {}
    for role in ("viewer", "technician"):
        grants[role] = str(tmp_path / (role + ".grant"))
        firmware.write_file(grants[role], desk.grant("alice", point, role, ["d1"], requested_by="alice",
                                                     approved_by="bob", reason="pty test")[1])
    device = PtyDevice(str(tmp_path / "flash"), desk.keys())
    yield {"desk": desk, "device": device, "key": key_path, "grants": grants, "tmp": tmp_path}
    device.close()
    desk.close()


def tool(*args, timeout_s=60, **kw):
    return subprocess.run([sys.executable, "-m", "cloud.cli", "console"] + list(args), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s, **kw)


def test_session_over_pyserial_on_a_pty(setup):
    device = setup["device"]
    port = serial.serial_for_url(device.path, timeout=10)
    try:
        s = Session(port, open(setup["grants"]["technician"], "rb").read(),
                    firmware.load_private_key(setup["key"]))
        assert s.open()[:2] == ("technician", "alice")
        assert s.run("status")[0] == "device d1"
        assert s.run("set interval 30") == ["interval = 30"]
        s.close()
    finally:
        port.close()
    assert device.commands.config == {"interval": "30"}
    assert device.audit_kinds() == ["challenge", "session_open", "command", "command", "session_close"]


def test_tool_runs_commands_and_exits_0(setup):
    result = tool(setup["device"].path, "--grant", setup["grants"]["technician"], "--key", setup["key"],
                  "-c", "status", "-c", "reboot")
    assert result.returncode == 0, result.stderr
    assert "device d1" in result.stdout and "rebooting after this session" in result.stdout
    assert setup["device"].commands.executed == [("status", ()), ("reboot", ())]


def test_tool_exits_1_when_a_command_is_refused(setup):
    result = tool(setup["device"].path, "--grant", setup["grants"]["viewer"], "--key", setup["key"],
                  "-c", "reboot", "-c", "status")
    assert result.returncode == 1
    assert "refused: reboot needs role technician, grant has viewer (forbidden)" in result.stderr
    assert "device d1" in result.stdout            # later commands still run
    assert setup["device"].commands.executed == [("status", ())]


def test_tool_exits_1_with_the_wrong_key(setup):
    _, _, _ = firmware.write_keypair(str(setup["tmp"] / "keys"), "mallory")
    result = tool(setup["device"].path, "--grant", setup["grants"]["technician"],
                  "--key", str(setup["tmp"] / "keys" / "mallory.key"), "-c", "status")
    assert result.returncode == 1 and "(bad_answer)" in result.stderr
    assert setup["device"].commands.executed == []


def test_tool_usage_and_port_errors(setup):
    missing = tool(setup["device"].path, "--grant", "/nonexistent.grant", "--key", setup["key"])
    assert missing.returncode == 2 and "cannot read grant" in missing.stderr
    not_grant = tool(setup["device"].path, "--grant", setup["key"], "--key", setup["key"])
    assert not_grant.returncode == 2 and "not a tether grant" in not_grant.stderr
    no_port = tool("/dev/does-not-exist", "--grant", setup["grants"]["viewer"], "--key", setup["key"])
    assert no_port.returncode == 3 and "cannot open /dev/does-not-exist" in no_port.stderr
    master, slave = os.openpty()         # a port with nobody on the other side
    try:
        silent = tool(os.ttyname(slave), "--grant", setup["grants"]["viewer"], "--key", setup["key"],
                      "--timeout", "0.5", "-c", "status")
    finally:
        os.close(master)
        os.close(slave)
    assert silent.returncode == 3 and "did not answer" in silent.stderr


def test_tool_over_a_socket_url(setup):
    """socket://HOST:PORT, as a serial device server exposes a UART."""
    import socket
    from board.console_port import SocketStream
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    commands = DeviceCommands("d1")
    storage = FileStorage(str(setup["tmp"] / "flash2"))
    console = boot_console("d1", None, setup["desk"].keys(), storage, os.urandom)
    stop = threading.Event()

    def serve():
        conn, _ = server.accept()
        ConsolePort(SocketStream(conn), console, storage, commands, WallClock()).serve(stop)
        conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = tool("socket://127.0.0.1:%d" % server.getsockname()[1], "--grant",
                      setup["grants"]["viewer"], "--key", setup["key"], input="status\nnet\n")
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert result.returncode == 0, result.stderr
    assert "device d1" in result.stdout and "link up" in result.stdout
    assert commands.executed == [("status", ()), ("net", ())]


def test_a_person_at_a_terminal_with_line_editing_and_history(setup):
    """The tool's stdin/stdout are a terminal (a second pty): it prompts; a
    typo fixed with backspace runs as corrected; up-arrow repeats it."""
    master, slave = os.openpty()
    env = dict(os.environ, HOME=str(setup["tmp"]), TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "cloud.cli", "console", setup["device"].path,
                             "--grant", setup["grants"]["viewer"], "--key", setup["key"]],
                            cwd=REPO, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    screen = bytearray()
    try:
        _read_until(master, screen, b"tether> ")
        os.write(master, b"statux\x7fs\r")         # a typo, corrected
        _read_until(master, screen, b"device d1", b"tether> ")
        os.write(master, b"\x1b[A\r")              # history: the same again
        _read_until(master, screen, b"device d1", b"tether> ")
        os.write(master, b"reboot\r")
        _read_until(master, screen, b"forbidden", b"tether> ")
        os.write(master, b"exit\r")
        assert proc.wait(timeout=30) == 1          # a command was refused
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert setup["device"].commands.executed == [("status", ()), ("status", ())]
    history = open(os.path.join(str(setup["tmp"]), ".tether_console_history")).read()
    assert "status" in history and "reboot" in history


def _read_until(fd, screen, *needles, limit_s=30):
    """Read the terminal until each needle has appeared since the previous
    call (a generous limit: a hang fails, speed does not)."""
    start = len(screen)
    deadline = time.monotonic() + limit_s
    while not all(n in screen[start:] for n in needles):
        if time.monotonic() > deadline:
            raise AssertionError("terminal never showed %r; screen: %r" % (needles, bytes(screen)))
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                screen.extend(os.read(fd, 4096))
            except OSError:
                break
