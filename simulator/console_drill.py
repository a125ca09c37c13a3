"""Console drill: technician sessions and attacks against simulated devices,
in one process, no broker.

    result = run_drill(devices=5, seed=1)
    # {"sessions", "commands", "attacks_tried", "attacks_refused",
    #  "audit_chain_verified", "tamper_detected", "attacks": [...]}

Every device is the real agent.console on board.sim flash behind the real
board driver (board/console_port.py); the technician is the real tool
(cloud.console_tool.Session) speaking the line protocol over an in-memory
link; grants, revocations and log verification are cloud/support.py's.
Each attack counts as refused only if the device (or, for tampered logs,
the cloud) refused it with the expected code.
"""

import random
import shutil
import tempfile

from agent import console as core
from board.console_port import ConsolePort, DeviceCommands, boot_console
from board.sim import SimClock, SimFlash
from cloud import firmware
from cloud.console_tool import Refused, Session, answer, gid_of
from cloud.support import SupportDesk

T0_S = 1_800_000_000
SITE = "site-1"


class MemoryLink:
    """The tool's side of an in-memory serial link to a SimConsoleDevice:
    write() delivers bytes to the device at once, readline() returns the
    next line it sent (b"" when there is none: a timeout)."""

    def __init__(self, device):
        self.device = device

    def write(self, data):
        self.device.receive(data)

    def flush(self):
        pass

    def reset_input_buffer(self):
        self.device.outbox.clear()

    def readline(self):
        return self.device.outbox.pop(0) if self.device.outbox else b""

    def close(self):
        pass


class _Outbox:
    def __init__(self, box):
        self.box = box

    def write(self, data):
        self.box.append(bytes(data))


class SimConsoleDevice:
    """A simulated device's console: SimFlash, SimClock, seeded randomness."""

    def __init__(self, device_id, keys, seed, site=SITE, flash=None, bytes_max=None,
                 bits_per_tick=256, start_ms=T0_S * 1000):
        self.device_id = device_id
        self.site = site
        self.keys = keys
        self.flash = flash if flash is not None else SimFlash()
        self.clock = SimClock(start_ms=start_ms)
        self.rng = random.Random(seed)
        self.commands = DeviceCommands(device_id, telemetry=["t%d" % i for i in range(20)],
                                       log=["boot ok"])
        self.outbox = []
        self.bytes_max = bytes_max
        self.bits_per_tick = bits_per_tick
        self.boot()

    def boot(self):
        kwargs = {"bits_per_tick": self.bits_per_tick}
        if self.bytes_max is not None:
            kwargs["bytes_max"] = self.bytes_max
        self.console = boot_console(self.device_id, self.site, self.keys, self.flash,
                                    self._random_bytes, **kwargs)
        self.port = ConsolePort(_Outbox(self.outbox), self.console, self.flash, self.commands,
                                self.clock)

    def _random_bytes(self, n):
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def receive(self, data):
        for line in self.port.reader.feed(data):
            self.port.run(self.console.feed(
                core.Line(line, self.clock.ticks_ms(), self.clock.now_ms() // 1000)))
            while self.console.busy():
                self.port.run(self.console.feed(
                    core.Tick(self.clock.ticks_ms(), self.clock.now_ms() // 1000)))

    def advance(self, ms):
        self.clock.advance(ms)
        self.port.run(self.console.feed(core.Tick(self.clock.ticks_ms(), self.clock.now_ms() // 1000)))

    def link(self):
        return MemoryLink(self)

    def audit_log(self):
        return self.flash.read(core.AUDIT_FILE) or b""


class Technician:
    """A technician: a key pair, and grants the support desk issued for it."""

    def __init__(self, name):
        self.name = name
        self.key = firmware.generate_key()
        self.point = firmware.public_bytes(self.key)

    def session(self, device, grant_message, key=None):
        return Session(device.link(), grant_message, key or self.key)


def _refused(fn, *codes):
    """True if fn() raised Refused with one of codes."""
    try:
        fn()
    except Refused as e:
        return e.code in codes
    return False


class Drill:
    """Sessions and attacks; on its own desk and devices, or (desk and
    device_list given, with now_s their time) on someone else's."""

    def __init__(self, devices, seed, data_dir, desk=None, device_list=None, now_s=T0_S):
        self.now_s = now_s
        self.desk = desk or SupportDesk(data_dir, clock_s=lambda: self.now_s,
                                        random_bytes=random.Random(seed).randbytes)
        self.keys = self.desk.keys()
        self.devices = device_list or [SimConsoleDevice("dev-%04d" % i, self.keys, seed * 1000 + i)
                                       for i in range(devices)]
        self.tech = Technician("tech-alice")
        self.sessions = 0
        self.commands = 0
        self.attacks = []

    def grant(self, role, devices=None, site=None, hours=4, not_before=None, tech=None):
        tech = tech or self.tech
        return self.desk.grant(tech.name, tech.point, role, devices=devices or [], site=site,
                               hours=hours, requested_by=tech.name, approved_by="lead-bob",
                               reason="drill", not_before=not_before)[1]

    def session(self, device, role, commands):
        s = self.tech.session(device, self.grant(role, [device.device_id]))
        s.open()
        self.sessions += 1
        for command in commands:
            s.run(command)
            self.commands += 1
        s.close()
        return s

    def attack(self, name, refused):
        self.attacks.append({"attack": name, "refused": bool(refused)})

    # -- the attacks -------------------------------------------------------

    def expired_grant(self, device):
        old = self.grant("admin", [device.device_id], hours=1, not_before=self.now_s - 3 * 3600)
        self.attack("expired_grant", _refused(self.tech.session(device, old).open, "expired"))

    def other_device(self, device):
        other = self.grant("admin", ["dev-not-this-one"])
        self.attack("grant_for_another_device",
                    _refused(self.tech.session(device, other).open, "wrong_device"))

    def forged_signature(self, device, data_dir):
        rogue = SupportDesk(data_dir)           # a key the device does not pin
        forged = rogue.grant(self.tech.name, self.tech.point, "admin", [device.device_id],
                             requested_by="mallory", approved_by="mallory2", reason="x")[1]
        rogue.close()
        self.attack("forged_signature_unknown_key",
                    _refused(self.tech.session(device, forged).open, "unknown_kid"))
        edited = edit_grant(self.grant("viewer", [device.device_id]), role="admin")
        self.attack("forged_signature_edited_role",
                    _refused(self.tech.session(device, edited).open, "bad_signature"))

    def role_escalation(self, device):
        s = self.tech.session(device, self.grant("viewer", [device.device_id]))
        s.open()
        self.sessions += 1
        before = len(device.commands.executed)
        refused = all(_refused(lambda c=c: s.run(c), "forbidden")
                      for c in ("reboot", "factory-reset " + device.device_id, "set a b"))
        s.close()
        self.attack("role_escalation", refused and len(device.commands.executed) == before)

    def replayed_challenge(self, device, other):
        message = self.grant("technician", [device.device_id, other.device_id])
        s = self.tech.session(device, message)
        s.open()
        nonce, device_id = s.last_challenge
        captured = answer(self.tech.key, nonce, gid_of(message), device_id)
        s.close()
        self.sessions += 1
        replay = self.tech.session(device, message)
        replay.request("hello " + message.hex())       # a fresh challenge...
        same = _refused(lambda: replay.auth(captured), "bad_answer")    # ...the old answer
        elsewhere = self.tech.session(other, message)
        elsewhere.request("hello " + message.hex())
        moved = _refused(lambda: elsewhere.auth(captured), "bad_answer")
        self.attack("replayed_challenge", same and moved)

    def stolen_grant(self, device):
        thief = Technician("mallory")
        message = self.grant("admin", [device.device_id])
        self.attack("stolen_grant_without_key",
                    _refused(thief.session(device, message, thief.key).open, "bad_answer"))

    def brute_force(self, device):
        message = self.grant("admin", [device.device_id])
        s = self.tech.session(device, message)
        tries = 0
        while tries < 100 and device.console.state != core.LOCKED:
            s.request("hello " + message.hex())
            _refused(lambda: s.auth(bytes(64)), "bad_answer", "bad_signature")
            tries += 1
        locked = device.console.state == core.LOCKED
        # locked: even the right grant and key are turned away
        refused = _refused(self.tech.session(device, message).open, "locked")
        device.advance(core.LOCKOUT_MS + 1000)
        self.attack("brute_force_lockout", locked and refused and tries <= core.FAILURES_MAX)

    def revoked_grant(self, device):
        message = self.grant("technician", [device.device_id])
        gid = gid_of(message).hex()
        self.desk.revoke(gid, "lead-bob", "drill")
        device.port.run(device.console.feed(core.Revocations(
            self.desk.revocation_list(), device.clock.ticks_ms(), device.clock.now_ms() // 1000)))
        self.attack("revoked_grant", _refused(self.tech.session(device, message).open, "revoked"))

    def tampered_logs(self, device_edit, device_trunc):
        """Verify both logs (checkpoints), then edit one and truncate the other."""
        for d in (device_edit, device_trunc):
            self.desk.verify_log(d.device_id, d.audit_log())
        edited = edit_record(device_edit.audit_log(), 1)
        report_e = self.desk.verify_log(device_edit.device_id, edited, record=False)
        log = device_trunc.audit_log()
        truncated = drop_last_records(log, 2)
        report_t = self.desk.verify_log(device_trunc.device_id, truncated, record=False)
        self.attack("audit_log_edited", report_e["tamper"])
        self.attack("audit_log_truncated", report_t["tamper"])
        return report_e["tamper"] and report_t["tamper"]


def edit_grant(message, **changes):
    """A grant with claims changed under its original signature."""
    from agent import cbor, cose
    protected, _, _, payload, signature = cose.decode1(message)
    claims = cbor.loads(payload)
    claims.update(changes)
    return b"\xd2" + cbor.dumps([protected, {}, cbor.dumps(claims), signature])


def edit_record(log, index):
    """The log with record `index` changed and its checksum recomputed (a
    careful attacker): only the hash chain can tell."""
    from agent import cbor, journal
    bodies, _ = journal.scan(log)
    record = cbor.loads(bodies[index])
    record[4] = dict(record[4], edited=1)
    bodies[index] = cbor.dumps(record)
    return b"".join(journal.frame(b) for b in bodies)


def drop_last_records(log, count):
    from agent import journal
    bodies, _ = journal.scan(log)
    return b"".join(journal.frame(b) for b in bodies[:len(bodies) - count])


def run_drill(devices=4, seed=1, data_dir=None, details=False):
    """Sessions and attacks on `devices` (at least 3) simulated devices; with
    details, also "attacks": [{"attack", "refused"}, ...]."""
    if devices < 3:
        raise ValueError("the drill needs at least 3 devices")
    own = data_dir is None
    data_dir = data_dir or tempfile.mkdtemp(prefix="tether-console-drill-")
    try:
        result = _run(devices, seed, data_dir)
        if not details:
            result.pop("attacks")
        return result
    finally:
        if own:
            shutil.rmtree(data_dir, ignore_errors=True)


def _run(devices, seed, data_dir):
    drill = Drill(devices, seed, data_dir + "/support")
    d = drill.devices
    for device in d:
        drill.session(device, "viewer", ["status", "versions", "telemetry 5", "net", "log 3"])
        drill.session(device, "technician", ["set interval 30", "status"])
    drill.expired_grant(d[0])
    drill.other_device(d[0])
    drill.forged_signature(d[0], data_dir + "/rogue")
    drill.role_escalation(d[1])
    drill.replayed_challenge(d[1], d[2])
    drill.stolen_grant(d[2])
    drill.brute_force(d[2])
    drill.revoked_grant(d[1])
    untouched = d[:-2] if len(d) > 4 else d[:2]
    verified = all(not drill.desk.verify_log(x.device_id, x.audit_log())["tamper"] for x in untouched)
    tamper = drill.tampered_logs(d[-2], d[-1])
    drill.desk.close()
    return {"sessions": drill.sessions, "commands": drill.commands,
            "attacks_tried": len(drill.attacks),
            "attacks_refused": sum(1 for a in drill.attacks if a["refused"]),
            "audit_chain_verified": verified, "tamper_detected": tamper,
            "attacks": drill.attacks}
