"""Review of the field console beside the agents (board/linux_console.py,
board/agent_console.py), the tenant-scoped grants and the one-identity
allowlist rule (cloud/provision.py). Each test failed on the code as
reviewed because of the defect it names (xfail(strict) until fixed); they use
the real classes (LinuxAgent, LinuxConsole, LinuxCommands, linux_main.loop,
open_port, pyserial, the technician's tool, SupportDesk, Provisioning),
real ptys, and no mocks of the code under review.

Checked and found sound (no test): an audit record is appended (fsync'd)
before its Execute and before the reply, on both the port's poll and the
AuditLink path (port.run keeps the order; only Publish is split off);
cloud messages reach the uploader only from the exact t/<identity>/support
topic (LinuxAgent._on_message, Esp32Agent._link_event); the Linux console,
AuditLink and paho callbacks all run in the agent's one thread (client.loop
is stepped by hand); the ESP32 AuditLink reads the log at most once per
POLL_MS for a Poll (plus once per inbox message, at most INBOX_MAX);
reboot is only asked by an authorised technician Execute and runs once
(the flag is cleared before the call); rotate-identity needs technician;
a grant for acme/pump-1 or site acme/s does not cover beta/* (device id is
the identity, the site is prefixed with the board's own tenant); allow's
identity_taken is raised inside one transaction and the CLI checks every
row before writing, so no partial state.
"""

import datetime
import os
import subprocess
import threading
import time
import tty

import pytest
import serial
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import telemetry
from board import linux_console, linux_main
from board.linux import LinuxAgent
from board.linux_ota import command_reboot
from cloud import firmware
from cloud.console_tool import Session
from cloud.errors import CloudError
from cloud.support import SupportDesk

from enroll_harness import BATCH, Device, InProcessCloud, SimClock, enrolled

IDENTITY = "acme/pi-1"


# ---------------------------------------------------------------- helpers

def self_signed(tmp_path):
    """A CA file, certificate and key so LinuxAgent can build its TLS context
    (the broker it dials is not there: connects fail, telemetry queues)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, IDENTITY)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "dev.crt", tmp_path / "dev.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(cert_path), str(key_path)


def closed_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def board(tmp_path, stream, reboot=None, support_keys=None):
    """The agent and its console wired as linux_main.run_main/make_console do."""
    ca, cert, key = self_signed(tmp_path)
    port = closed_port()
    agent = LinuxAgent(str(tmp_path / "data" / "telemetry"), "acme", "pi-1", "127.0.0.1", port, ca, cert, key,
                       config=telemetry.Config(backoff_base_ms=50, backoff_cap_ms=200))
    settings = linux_console.Settings(0.02)
    commands = linux_console.LinuxCommands(agent, "127.0.0.1", port, settings, linux_console.RecentLog(),
                                           reboot)
    console = linux_console.LinuxConsole(agent, str(tmp_path / "data"), support_keys or {}, None, stream,
                                         commands)
    agent.audit = linux_console.AuditLink(console, agent.identity, agent.clock)
    return agent, settings, console


def run_loop(agent, settings, console, samples_wanted, until=lambda: True, seconds=20):
    """linux_main.loop as run_main runs it, stopped once `samples_wanted`
    samples were taken and until() holds. -> (samples taken, exception or None)."""
    stop = linux_main.Stop()
    taken = [0]
    deadline = time.monotonic() + seconds

    def sampler():
        taken[0] += 1
        if (taken[0] >= samples_wanted and until()) or time.monotonic() > deadline:
            stop.requested = True
        return {"temp_c": 21.5}

    agent.boot()
    try:
        linux_main.loop(agent, sampler, settings, stop, console)
    except Exception as e:              # what would end `tether agent run` with a traceback
        return taken[0], e
    return taken[0], None


def close_fds_to(path):
    """open_port("pty") keeps the slave open; close it after the test."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd) == path:
                os.close(int(fd))
        except OSError:
            pass


# ---------------------------------------------------------------- F1: a serial port that goes away

def test_f1_a_console_port_that_goes_away_does_not_end_the_agent(tmp_path):
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    stream, _ = linux_console.open_port(path)       # --console /dev/pts/N: pyserial, as for /dev/ttyUSB0
    os.close(slave)
    agent, settings, console = board(tmp_path, stream)
    os.close(master)                                # unplugged
    try:
        taken, error = run_loop(agent, settings, console, samples_wanted=5)
    finally:
        stream.close()
    assert error is None, "the agent's loop ended: %r" % (error,)
    assert taken >= 5 and len(agent.core.queue) >= 5      # telemetry went on (queued: no broker here)


# ---------------------------------------------------------------- F2: a tool that never reads

def test_f2_a_console_peer_that_never_reads_does_not_block_the_agent(tmp_path):
    stream, path = linux_console.open_port("pty")
    tool = os.open(path, os.O_RDWR | os.O_NOCTTY)
    agent, settings, console = board(tmp_path, stream)
    # 1,000 unauthenticated lines (2 KiB): 5 refusals, a lockout, then "err locked ..." each (~40 KB).
    os.write(tool, b"x\n" * 1000)
    done = threading.Event()

    def poll():
        console.poll()          # one pass of the agent's loop reads all 2 KiB and answers each line
        done.set()

    worker = threading.Thread(target=poll, daemon=True)
    worker.start()
    try:
        finished = done.wait(10)
    finally:
        os.set_blocking(tool, False)        # drain, so a blocked pass ends and the test cleans up
        end = time.monotonic() + 30
        while worker.is_alive() and time.monotonic() < end:
            try:
                os.read(tool, 65536)
            except BlockingIOError:
                time.sleep(0.01)
        worker.join(5)
        os.close(tool)
        os.close(stream.fd)
        close_fds_to(path)
    assert finished, "one console poll blocked the agent's loop for 10 s on a peer that does not read"


# ---------------------------------------------------------------- F3: a reboot command that fails

def technician_session(path, grant, key, commands, results):
    port = serial.Serial(path, 115200, timeout=5)
    try:
        s = Session(port, grant, key)
        s.open()
        for command in commands:
            results.append((command, s.run(command)))
        s.close()
        results.append(("bye", "ok"))
    except Exception as e:
        results.append(("error", repr(e)))
    finally:
        port.close()


def test_f3_a_failing_reboot_command_asked_by_console_does_not_end_the_agent(tmp_path):
    desk = SupportDesk(str(tmp_path / "desk"))
    stream, path = linux_console.open_port("pty")
    agent, settings, console = board(tmp_path, stream, reboot=command_reboot(["false"]),
                                     support_keys=desk.keys())
    key = firmware.generate_key()
    grant = desk.grant("carol", firmware.public_bytes(key), "technician", [IDENTITY], requested_by="carol",
                       approved_by="lead-bob", reason="field visit")[1]
    results = []
    tool = threading.Thread(target=technician_session, args=(path, grant, key, ["reboot"], results),
                            daemon=True)
    tool.start()
    try:
        taken, error = run_loop(agent, settings, console, samples_wanted=5, until=lambda: not tool.is_alive())
        tool.join(10)
    finally:
        desk.close()
        os.close(stream.fd)
        close_fds_to(path)
    assert ("reboot", ["rebooting when this session ends"]) in results, results
    assert error is None, "the agent's loop ended: %r" % (error,)
    assert not isinstance(error, subprocess.CalledProcessError)


# ---------------------------------------------------------------- F4: one identity, one board

def test_f4_an_identity_in_use_by_an_enrolled_board_is_not_given_to_another_without_replace(tmp_path):
    clock = SimClock()
    cloud = InProcessCloud(tmp_path, clock)
    cloud.allow("hw-0001", "pump-1")
    first = Device(cloud, "hw-0001", seed=1)
    assert first.run_until(enrolled(first))
    assert first.core.record["a"] is not None
    # The operator re-allowlists hw-0001 as another identity (say, a rename planned for later):
    # accepted silently as reviewed; now refused unless it is said to be a swap (replace).
    with pytest.raises(CloudError) as refused:
        cloud.allow("hw-0001", "pump-1b")
    assert refused.value.code == "hwid_taken"
    cloud.prov.allow("hw-0001", BATCH, "acme", "pump-1b", "site-1", "ops", replace=True)
    # acme/pump-1 is still the working board's identity (its enrollment and certificate): a second
    # board must need replace. (As reviewed it was accepted, and once hw-0091 enrolled and confirmed,
    # hw-0001's certificate was on the CRL.)
    with pytest.raises(CloudError) as refused:
        cloud.allow("hw-0091", "pump-1")
    assert refused.value.code == "identity_taken"

