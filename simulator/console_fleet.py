"""Console fleet: simulated console devices that are real MQTT clients of a
running cloud (cloud/service.py), each with its own device certificate.

    section, checks = await run_console_fleet(cloud, devices=5, seed=1)
    # section: {"sessions", "commands", "attacks_tried", "attacks_refused",
    #           "audit_chain_verified", "tamper_detected"}

Each device is simulator/console_drill.py's SimConsoleDevice (the real
agent.console on board.sim flash behind board/console_port.py) plus the
real agent.audit_upload.Uploader, driven here over its own mTLS session on
the cloud's device listener (agent.mqtt packets over asyncio streams).
Technicians use the real tool (cloud.console_tool.Session) over an
in-memory serial link. Grants and revocations are made on the cloud's
support desk (its own database connection, as `tether cloud support` in
another process would); the cloud's support service ("$cloud/support")
verifies the uploads and pushes the revocation list.

What runs: a viewer and a technician session on every device and the
console drill's attacks; every device uploads its log over the broker; a
grant in use is revoked at the cloud, the push reaches the online device
(its session ends) and, offline afterwards, the device refuses that grant;
a device publishes a segment on another device's topic (the ACL must stop
it); one device's log is edited and another's truncated on flash, and the
cloud must report both while the untouched chains verify.
"""

import asyncio
import os
import random
import shutil
import tempfile
import time

from agent import audit_upload, mqtt
from agent import console as core
from agent.actions import Log, Publish
from cloud import probe
from cloud.support import SupportDesk
from simulator.console_drill import Drill, SimConsoleDevice, _refused, drop_last_records, edit_record
from simulator.verify import Check

TENANTS = ("acme", "globex")
WAIT_S = 10.0
PACKET_MAX = audit_upload.DOWN_BYTES_MAX + 512
SYNC_ROUNDS_MAX = 200
CLOCK_AHEAD_MS = 60_000   # device clocks run this far ahead of the cloud's: a grant issued
                          # the next second is already valid (nbf is the cloud's now)


class AuditClient:
    """One console device's MQTT session for its audit log: subscribes to
    t/<id>/support, feeds what arrives to the uploader and runs the actions
    (publishes here; flash writes and console lines through the device's
    console driver)."""

    def __init__(self, cloud, cred, device, segment_bytes=audit_upload.SEGMENT_BYTES,
                 rotate_bytes=audit_upload.ROTATE_BYTES):
        self.cloud = cloud
        self.cred = cred
        self.identity = "%s/%s" % (cred.tenant, cred.device)
        self.device = device
        self.uploader = audit_upload.Uploader(device.console, self.identity,
                                              device.flash.read(audit_upload.CURSOR_FILE),
                                              segment_bytes, rotate_bytes)
        self.logs = []
        self.reader = self.writer = None
        self.parser = mqtt.Parser(PACKET_MAX)
        self.packet_id = 0
        self.inbox = []

    def reboot(self):
        """After the device rebooted (its console is new): a new uploader."""
        self.uploader = audit_upload.Uploader(self.device.console, self.identity,
                                              self.device.flash.read(audit_upload.CURSOR_FILE),
                                              self.uploader.segment_bytes, self.uploader.rotate_bytes)

    async def connect(self):
        cred = (self.cred.certfile, self.cred.keyfile)
        self.reader, self.writer, rc = await probe.connect(self.cloud.host, self.cloud.port,
                                                           self.cloud.ca_path, cred, self.identity)
        if rc != 0:
            raise ConnectionError("broker refused %s: %s" % (self.identity, mqtt.connack_reason(rc)))
        self.writer.write(mqtt.subscribe(self._next_id(), [(self.uploader.down, 1)]))
        await self.writer.drain()
        await self._wait(lambda p: isinstance(p, mqtt.SubAck))
        self.run(self.uploader.feed(audit_upload.Online(self._ms())))

    def close(self):
        if self.writer is not None:
            self.run(self.uploader.feed(audit_upload.Offline(self._ms())))
            self.writer.close()
            self.writer = None

    async def sync(self, until=None, timeout_s=WAIT_S):
        """Exchange messages until the uploader has nothing pending and is
        idle (or `until()`), at most timeout_s; -> True if it got there."""
        deadline = time.monotonic() + timeout_s
        for _ in range(SYNC_ROUNDS_MAX):
            self.poll()
            done = until() if until is not None else (
                self.uploader.state == audit_upload.IDLE and not self.uploader.pending())
            if done:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not await self._receive(left):
                return False
        return False

    def poll(self):
        d = self.device
        self.run(self.uploader.feed(audit_upload.Poll(d.audit_log(), self._ms(), self._s())))

    async def _receive(self, timeout_s):
        """Wait for one message on t/<id>/support and feed it; False on timeout."""
        try:
            packet = await self._wait(lambda p: isinstance(p, mqtt.Publish), timeout_s)
        except asyncio.TimeoutError:
            return False
        d = self.device
        self.run(self.uploader.feed(audit_upload.Received(packet.payload, d.audit_log(), self._ms(),
                                                          self._s())))
        return True

    async def _wait(self, match, timeout_s=WAIT_S):
        deadline = time.monotonic() + timeout_s
        while True:
            for i, packet in enumerate(self.inbox):
                if match(packet):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError()
            data = await asyncio.wait_for(self.reader.read(65536), left)
            if not data:
                raise ConnectionError("%s: the broker closed the connection" % self.identity)
            for packet in self.parser.feed(data):
                if isinstance(packet, mqtt.Publish) and packet.qos == 1:
                    self.writer.write(mqtt.puback(packet.packet_id))
                if not isinstance(packet, mqtt.PubAck):
                    self.inbox.append(packet)

    def run(self, actions):
        for action in actions:
            if isinstance(action, Publish):
                self.writer.write(mqtt.publish(action.topic, action.payload, 1, self._next_id()))
            elif isinstance(action, Log):
                self.logs.append((action.code, action.detail))
            else:
                self.device.port.run([action])

    def _next_id(self):
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    def _ms(self):
        return self.device.clock.ticks_ms()

    def _s(self):
        return self.device.clock.now_ms() // 1000


class Fleet:
    def __init__(self, cloud, devices, seed, data_dir):
        self.cloud = cloud
        self.desk = SupportDesk(cloud.data_dir, random_bytes=random.Random(seed).randbytes)
        start_ms = int(time.time() * 1000) + CLOCK_AHEAD_MS
        self.devices, self.clients = [], []
        for i in range(devices):
            cred = cloud.issue_device(TENANTS[i % len(TENANTS)], "console-%02d" % i)
            dev = SimConsoleDevice("%s/%s" % (cred.tenant, cred.device), self.desk.keys(), seed * 1000 + i,
                                   start_ms=start_ms)    # named by its identity, as grants and the cloud do
            self.devices.append(dev)
            self.clients.append(AuditClient(cloud, cred, dev))
        self.drill = Drill(devices, seed, data_dir, desk=self.desk, device_list=self.devices,
                           now_s=int(time.time()))
        self.details = {}
        self.data_dir = data_dir

    def catch_up(self):
        """Device clocks run on virtual time; grants are issued on the
        cloud's: move every device's clock up to just ahead of it."""
        now_ms = int(time.time() * 1000) + CLOCK_AHEAD_MS
        for dev in self.devices:
            if dev.clock.now_ms() < now_ms:
                dev.advance(now_ms - dev.clock.now_ms())

    async def upload_all(self):
        ok = True
        for client in self.clients:
            await client.connect()
            ok = await client.sync() and ok
            client.close()
        return ok

    async def revocation_pushed(self, device, client):
        """A grant in use is revoked at the cloud: the push ends the session
        on the online device, which refuses the grant afterwards, offline."""
        self.catch_up()
        message = self.drill.grant("technician", [device.device_id])
        session = self.drill.tech.session(device, message)
        session.open()
        self.drill.sessions += 1
        await client.connect()
        await client.sync()
        from cloud.console_tool import gid_of
        self.desk.revoke(gid_of(message).hex(), "lead-bob", "fleet drill: visit cancelled")
        pushed = await client.sync(until=lambda: device.console.state != core.OPEN, timeout_s=WAIT_S)
        ended = any(line.startswith(b"end revoked") for line in device.outbox)
        await client.sync()
        client.close()                                 # offline from here on
        refused = _refused(self.drill.tech.session(device, message).open, "revoked")
        self.details["revocation"] = {"pushed": pushed, "session_ended": ended, "refused_offline": refused}
        self.drill.attack("revoked_grant_pushed_over_mqtt", pushed and ended and refused)

    async def foreign_topic(self, attacker, victim):
        """A device publishes a segment on another device's audit topic, then
        a hello on its own: once the cloud answered that, the broker has
        dealt with the segment before it (one connection's packets in order)."""
        before = self.desk.audit_status(victim.identity)
        await attacker.connect()
        await attacker.sync()
        forged = audit_upload.segment(1, before["next"], attacker.device.audit_log()[:200] or b"x",
                                      before["next"] + 1, bytes(8))
        try:
            attacker.writer.write(mqtt.publish("t/%s/audit" % victim.identity, forged, 1, 60000))
            attacker.run(attacker.uploader.feed(audit_upload.Online(attacker._ms())))
            await attacker.sync()
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass                        # a broker may also close the connection: refused either way
        attacker.close()
        after = self.desk.audit_status(victim.identity)
        refused = after["records"] == before["records"] and after["findings"] == before["findings"]
        self.drill.attack("audit_segment_on_another_devices_topic", refused)
        return refused

    async def tamper(self, edited, truncated):
        """Edit a record not yet uploaded on one device, drop uploaded
        records on another; reboot both, upload: the cloud must report it."""
        self.catch_up()
        for target in (edited, truncated):
            self.drill.session(target.device, "viewer", ["status", "net", "log 2"])
        log = edited.device.audit_log()               # a record of the new session, checksum fixed
        edited.device.flash.write_atomic(core.AUDIT_FILE, edit_record(log, len(_bodies(log)) - 3))
        t = truncated
        log = t.device.audit_log()                    # the new session and two uploaded records
        t.device.flash.write_atomic(core.AUDIT_FILE, drop_last_records(
            log, t.device.console.chain.seq - t.uploader.cursor + 2))
        found = {}
        for client in (edited, truncated):
            client.device.boot()
            client.reboot()
            await client.connect()
            await client.sync()
            client.close()
            found[client.identity] = self.desk.audit_status(client.identity)
        e, t = found[edited.identity], found[truncated.identity]
        self.details["tamper"] = {k: [f["kind"] for f in v["findings"]] for k, v in found.items()}
        self.drill.attack("audit_log_edited_on_flash", e["tamper"])
        self.drill.attack("audit_log_truncated_on_flash", t["tamper"])
        return e["tamper"] and t["tamper"]

    def verified(self, clients):
        """The cloud holds every record of these devices, with no finding."""
        for c in clients:
            st = self.desk.audit_status(c.identity)
            if st["tamper"] or st["next"] != c.device.console.chain.seq or not st["records"]:
                return False
        return True


def _bodies(log):
    from agent import journal
    return journal.scan(log)[0]


async def run_console_fleet(cloud, devices=5, seed=1):
    """-> (section dict, [simulator.verify.Check]). Needs at least 5 devices."""
    if devices < 5:
        raise ValueError("the console fleet needs at least 5 devices")
    data_dir = tempfile.mkdtemp(prefix="tether-console-fleet-")
    fleet = Fleet(cloud, devices, seed, data_dir)
    try:
        return await _run(fleet)
    finally:
        for c in fleet.clients:
            c.close()
        fleet.desk.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _run(fleet):
    d, c, drill = fleet.devices, fleet.clients, fleet.drill
    fleet.catch_up()
    for device in d:
        drill.session(device, "viewer", ["status", "versions", "telemetry 5", "net", "log 3"])
        drill.session(device, "technician", ["set interval 30", "status"])
    drill.expired_grant(d[0])
    drill.other_device(d[0])
    drill.forged_signature(d[0], os.path.join(fleet.data_dir, "rogue"))
    drill.role_escalation(d[1])
    drill.replayed_challenge(d[1], d[2])
    drill.stolen_grant(d[2])
    drill.brute_force(d[2])
    uploaded = await fleet.upload_all()
    await fleet.revocation_pushed(d[1], c[1])
    acl = await fleet.foreign_topic(c[0], c[2])
    tamper = await fleet.tamper(c[-2], c[-1])
    untouched = c[:-2]
    for client in untouched:                          # what the drill added since
        await client.connect()
        uploaded = await client.sync() and uploaded
        client.close()
    verified = uploaded and fleet.verified(untouched)
    section = {"sessions": drill.sessions, "commands": drill.commands,
               "attacks_tried": len(drill.attacks),
               "attacks_refused": sum(1 for a in drill.attacks if a["refused"]),
               "audit_chain_verified": verified, "tamper_detected": tamper}
    return section, checks(section, drill.attacks, fleet.details, acl)


def checks(section, attacks, details, acl):
    missed = [a["attack"] for a in attacks if not a["refused"]]
    rev = details.get("revocation", {})
    return [
        Check("console fleet: attacks refused on devices connected to the cloud",
              section["attacks_tried"] > 0 and not missed,
              "%d of %d refused%s" % (section["attacks_refused"], section["attacks_tried"],
                                      "; not refused: " + ", ".join(missed) if missed else "")),
        Check("console audit logs uploaded over the broker; untouched chains verified by the cloud",
              section["audit_chain_verified"], "every record held, no finding"),
        Check("a grant revoked at the cloud reaches the online device, ends its session, and is "
              "refused offline", rev.get("pushed") and rev.get("session_ended") and rev.get("refused_offline"),
              str(rev)),
        Check("a device cannot write into another device's audit stream", acl,
              "segment on another device's topic left its stream unchanged"),
        Check("an audit log edited or truncated on the device is reported by the cloud",
              section["tamper_detected"], str(details.get("tamper"))),
    ]
