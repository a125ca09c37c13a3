"""The field console beside the ESP32 agent (board/agent_console.py
attach()): one loop runs telemetry, the link and the console; commands act
on the agent; the audit log goes to the cloud over the agent's own MQTT
link. On CPython against the real brokers with real mTLS, the console on
a real pty driven by the technician's real tool (cloud.console_tool over
pyserial) in another thread, as a UART would be; and on real MicroPython,
the same module attached to an agent in a small heap."""

import asyncio
import os
import threading
import tty

import serial

from agent import auditlog
from board import agent_console
from board.console_port import PtyStream
from cloud import firmware
from cloud.console_tool import Refused, Session
from cloud.support import SupportDesk

from brokers import any_cloud, broker_kind  # noqa: F401 (fixtures)
from mpy import require_micropython, run_micropython_report
from test_esp32_agent import booted_agent, run


def grant_for(desk, device, role, name):
    key = firmware.generate_key()
    grant = desk.grant(name, firmware.public_bytes(key), role, [device], requested_by=name,
                       approved_by="lead-bob", reason="field visit")[1]
    return grant, key


def technician(path, grant, key, commands, results):
    """A session over the pty as the tool runs it; results gets (command, lines or error code)."""
    port = serial.Serial(path, 115200, timeout=20)
    try:
        s = Session(port, grant, key)
        s.open()
        for command in commands:
            try:
                results.append((command, s.run(command)))
            except Refused as e:
                results.append((command, e.code))
        s.close()
    except Exception as e:          # reported, so the test says what went wrong
        results.append(("error", repr(e)))
    finally:
        port.close()


async def test_the_console_runs_in_the_agents_loop_and_its_log_reaches_the_cloud(any_cloud, tmp_path):
    cloud = any_cloud
    agent = booted_agent(cloud, "esp-c", tmp_path)
    desk = SupportDesk(cloud.data_dir)          # the key the cloud's support service signs with
    master, slave = os.openpty()
    tty.setraw(slave)
    resets = []
    agent_console.attach(agent, PtyStream(master, 0), "site-1", desk.keys(), agent.storage,
                         reboot=lambda: resets.append(True), random_bytes=os.urandom, bits_per_tick=8)
    try:
        online = lambda: agent.link.state == "up"  # noqa: E731
        assert await asyncio.to_thread(run, agent, online, 15)
        n = [0]
        assert await asyncio.to_thread(run, agent, lambda: n[0] >= 3, 10, 0.02, n)
        results = []
        grant, key = grant_for(desk, "acme/esp-c", "technician", "carol")
        tool = threading.Thread(target=technician, args=(os.ttyname(slave), grant, key, [
            "status", "telemetry 2", "net", "log 3", "versions", "rotate-identity", "rollback", "reboot"],
            results))
        tool.start()
        # The agent's loop serves the console (signature checks 8 bits a pass) while it samples.
        assert await asyncio.to_thread(run, agent, lambda: not tool.is_alive(), 60, 0.05, n)
        tool.join(5)
        got = dict(results)
        assert "error" not in got, got
        assert got["status"][0] == "device acme/esp-c" and "acknowledged since boot" in got["status"][1]
        assert len(got["telemetry 2"]) == 2 and got["telemetry 2"][0].startswith("n=")
        assert got["net"][0] == "link up"
        assert got["versions"] == ["no update slots"]
        assert got["rotate-identity"] == "unsupported" and got["rollback"] == "unsupported"
        assert got["reboot"] == ["rebooting when this session ends"] and resets == [True]

        records = lambda: auditlog.records(agent.storage.read("audit.log"))  # noqa: E731

        def uploaded():
            st = desk.audit_status("acme/esp-c")
            return st["next"] == len(records()) > 0
        assert await asyncio.to_thread(run, agent, uploaded, 30), desk.audit_status("acme/esp-c")
        st = desk.audit_status("acme/esp-c")
        assert not st["tamper"] and st["findings"] == []
        kinds = [r[3] for r in records()]
        assert kinds[:2] == ["challenge", "session_open"] and kinds.count("command_failed") == 2
        assert auditlog.check(agent.storage.read("audit.log"), "acme/esp-c")["problems"] == []
    finally:
        desk.close()
        os.close(master)
        os.close(slave)


MPY_IMPORTS = ["from agent import cbor", "from agent import console as core", "from agent import audit_upload",
               "from board.console_port import ConsolePort", "from agent import mqtt", "from agent import ota_wire",
               "from agent import csr", "from board import identity_board", "from board import esp32_net",
               "from agent import telemetry", "from board.esp32_agent import Esp32Agent",
               "from board import agent_console"]   # one module compiled per step

MPY_SETUP = r'''
class Flash:
    def __init__(self):
        self.files = {}
    def read(self, name):
        return self.files.get(name)
    def append(self, name, data):
        self.files[name] = self.files.get(name, b"") + data
    def write_atomic(self, name, data):
        self.files[name] = bytes(data)

class Clock:
    t = 1000
    def ticks_ms(self):
        return self.t
    def now_ms(self):
        return 1800000000000 + self.t

class Rng:
    def randint(self, a, b):
        return a

class Link:
    state = "up"
    def __init__(self):
        self.sent = []
    def publish(self, topic, payload, token):
        self.sent.append((topic, payload))

class Stream:
    def __init__(self):
        self.to_device = b""
        self.out = []
    def read(self, n):
        data, self.to_device = self.to_device[:n], self.to_device[n:]
        return data
    def write(self, data):
        self.out.append(bytes(data))

flash, clock, stream = Flash(), Clock(), Stream()
agent = Esp32Agent("acme", "esp-m", flash, clock, Rng(), lambda: None, log=lambda t: None)
agent.boot()
port = agent_console.attach(agent, stream, None, {}, flash, random_bytes=lambda n: bytes(n))
link = Link()
agent.audit.online(lambda topic, payload: link.publish(topic, payload, None))
print("hello", len(link.sent), link.sent[0][0])
'''

MPY_STEPS = [
    "stream.to_device = b'hello 00\\n'\nport.poll(0)\nprint('reply', stream.out[-1])",
    "agent.sample({'n': 1})\nprint('samples', agent.recent_samples)",
    "clock.t += 2000\nagent.audit.step(1800000002)\nprint('log', len(flash.read('audit.log') or b''))",
]


HEAP_KB = 160        # the modules' source compiled on the device (frozen on a board)


def test_the_console_beside_the_agent_on_micropython():
    require_micropython()
    report = run_micropython_report(MPY_IMPORTS[0], heap_kb=HEAP_KB, modules=("agent", "board"),
                                    steps=MPY_IMPORTS[1:] + [MPY_SETUP] + MPY_STEPS, timeout_s=120)
    out = report["stdout"]
    assert "hello 1 t/acme/esp-m/audit" in out                      # the uploader said hello on the link
    assert "reply b'err malformed" in out                            # a bad grant refused on the UART
    assert "samples ['n=1']" in out
    assert "log 0" not in out                                        # the refusal is on the audit log
