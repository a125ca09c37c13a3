"""The field console in `tether agent run --console pty`: the real agent
process (enrolled by claim against a real cloud, telemetry over mTLS), its
console on a real pty, and the technician's real tool (`tether console`,
pyserial on /dev/pts/N) in its own process. Commands answer from the
running agent, rotate-identity rotates its certificate over its own
connection, refusals (unsupported commands, a forged grant) are refused and
recorded, and the audit log on the board's disk verifies and reaches the
cloud over the agent's own MQTT connection."""

import asyncio
import re

from agent import auditlog
from cloud import firmware
from cloud.support import SupportDesk

from brokers import wait_until
from test_linux_agent_cli import Agent, cloud, enroll, sample_script, tether  # noqa: F401 (cloud: a fixture)

IDENTITY = DEVICE = "acme/pi-1"     # grants and the audit chain name a device by its identity


def technician(tmp_path, desk, role, name="alice"):
    key = firmware.generate_key()
    key_path = firmware.write_keypair(str(tmp_path / "tech"), name, key)[0]
    point = firmware.public_bytes(key)
    grant = desk.grant(name, point, role, [DEVICE], requested_by=name, approved_by="lead-bob",
                       reason="field visit")[1]
    grant_path = tmp_path / ("%s-%s.grant" % (name, role))
    grant_path.write_bytes(grant)
    return str(grant_path), key_path


async def console(port, grant, key, *commands):
    argv = ["console", port, "--grant", grant, "--key", key, "--timeout", "20"]
    for c in commands:
        argv += ["--command", c]
    return await tether(*argv)


async def test_a_technician_uses_the_linux_agents_console_and_every_step_is_on_its_audit_log(cloud, tmp_path):
    data = tmp_path / "board"
    rc, out, err = await enroll(cloud, data, "hw-1")
    assert rc == 0, out + err
    desk = SupportDesk(cloud.data_dir)          # the key the cloud's support service signs with
    rogue = SupportDesk(str(tmp_path / "rogue"))
    support_pub = tmp_path / "support.pub"
    support_pub.write_bytes(desk.public_key)
    agent = await Agent(cloud, data, "--sample-command", sample_script(tmp_path), "--sample-interval", "0.5",
                        "--console", "pty", "--support-key", str(support_pub), "--site", "site-1").start()
    try:
        assert await wait_until(lambda: "console on /dev/" in agent.err, 20), agent.err
        port = re.search(r"console on (/dev/\S+)", agent.err).group(1)
        acme = cloud.store.tenant("acme")
        assert await wait_until(lambda: acme.count_telemetry("pi-1") >= 2, 30), agent.err   # online

        viewer = technician(tmp_path, desk, "viewer")
        rc, out, err = await console(port, *viewer, "status", "telemetry 3", "net", "log 5", "versions")
        assert rc == 0, out + err
        assert "device %s" % IDENTITY in out and "certificate valid until" in out
        assert "temp_c=21.5" in out                    # the samples the agent took
        assert "link up" in out and "broker 127.0.0.1:%d" % cloud.port in out
        assert "no update slots" in out
        rc, out, err = await console(port, *viewer, "rotate-identity")
        assert rc == 1 and "forbidden" in out + err    # a viewer may not

        tech = technician(tmp_path, desk, "technician", "carol")
        cert_before = (data / "identity.crt").read_bytes()
        rc, out, err = await console(port, *tech, "set sample-interval 0.25", "rotate-identity")
        assert rc == 0, out + err
        assert "sample-interval = 0.25 s" in out and "identity rotation asked" in out
        assert await wait_until(lambda: (data / "identity.crt").read_bytes() != cert_before, 30), agent.err
        rc, out, err = await console(port, *tech, "rollback")
        assert rc == 1 and "unsupported" in out + err
        rc, out, err = await console(port, *tech, "set colour blue")
        assert rc == 1 and "bad_args" in out + err

        forged = technician(tmp_path, rogue, "admin", "mallory")     # a grant the pinned key did not sign
        rc, out, err = await console(port, *forged, "status")
        assert rc == 1 and "unknown_kid" in out + err

        # The audit log went to the cloud over the agent's connection, whole and sound.
        def uploaded():
            st = desk.audit_status(IDENTITY)
            return st is not None and st["next"] == len(auditlog.records(
                (data / "console" / "audit.log").read_bytes()))
        assert await wait_until(uploaded, 30), agent.err
        st = desk.audit_status(IDENTITY)
        assert not st["tamper"] and st["findings"] == [], [(f["kind"], f["seq"], f["detail"]) for f in st["findings"]]
    finally:
        rc = await agent.stop()
        desk.close()
        rogue.close()
    assert rc == 0, agent.err
    log = (data / "console" / "audit.log").read_bytes()
    assert auditlog.check(log, DEVICE)["problems"] == []
    records = auditlog.records(log)
    kinds = [r[3] for r in records]
    assert kinds.count("session_open") == 5 and "session_close" in kinds
    commands = [r[4]["cmd"] for r in records if r[3] == "command"]
    assert commands[:5] == ["status", "telemetry", "net", "log", "versions"]
    assert "rotate-identity" in commands and "set" in commands
    failed = {r[4]["cmd"]: r[4]["code"] for r in records if r[3] == "command_failed"}
    assert failed == {"rollback": "unsupported", "set": "bad_args"}
    assert "forbidden" in [r[4]["code"] for r in records if r[3] == "refused"]
    assert "unknown_kid" in [r[4]["code"] for r in records if r[3] == "auth_fail"]


async def test_the_console_options_go_together_and_a_bad_port_is_one_line(cloud, tmp_path):
    data = tmp_path / "board"
    rc, out, err = await enroll(cloud, data, "hw-1")
    assert rc == 0, out + err
    key = tmp_path / "support.pub"
    key.write_bytes(SupportDesk(str(tmp_path / "support")).public_key)
    for extra, says in ((["--console", "pty"], "--console and --support-key together"),
                        (["--console", "/dev/nonexistent-tty", "--support-key", str(key)],
                         "cannot open the console port /dev/nonexistent-tty")):
        agent = await Agent(cloud, data, *extra).start()
        rc = await agent.wait(20)
        assert rc == (2 if "together" in says else 1) and says in agent.err, agent.err
        assert "Traceback" not in agent.err
    await asyncio.sleep(0)


async def test_a_revocation_pushed_by_the_cloud_ends_the_session_and_the_tool_says_so(cloud, tmp_path):
    """The grant revoked at the cloud while its session is open: the list is
    pushed to the agent over its connection, the session ends at once ("end
    revoked" on the line), and the tool says so at the next command without
    sending it, so the device counts no failed attempt."""
    import serial
    from cloud.console_tool import Refused, Session, gid_of
    data = tmp_path / "board"
    rc, out, err = await enroll(cloud, data, "hw-1")
    assert rc == 0, out + err
    desk = SupportDesk(cloud.data_dir)
    support_pub = tmp_path / "support.pub"
    support_pub.write_bytes(desk.public_key)
    agent = await Agent(cloud, data, "--console", "pty", "--support-key", str(support_pub)).start()
    try:
        assert await wait_until(lambda: "console on /dev/" in agent.err, 20), agent.err
        assert await wait_until(lambda: "connected to" in agent.err, 30), agent.err
        port_path = re.search(r"console on (/dev/\S+)", agent.err).group(1)
        grant_path, key_path = technician(tmp_path, desk, "technician", "dora")
        grant = open(grant_path, "rb").read()
        key = firmware.load_private_key(key_path)
        port = serial.Serial(port_path, 115200, timeout=20)
        try:
            s = await asyncio.to_thread(lambda: Session(port, grant, key))
            assert (await asyncio.to_thread(s.open))[0] == "technician"
            assert (await asyncio.to_thread(s.run, "status"))[0] == "device %s" % IDENTITY
            desk.revoke(gid_of(grant).hex(), "lead-bob", "left the site")
            assert await wait_until(lambda: port.in_waiting > 0, 30), agent.err     # "end revoked"
            try:
                await asyncio.to_thread(s.run, "status")
                raise AssertionError("the ended session ran a command")
            except Refused as e:
                assert e.code == "revoked"
        finally:
            port.close()
    finally:
        await agent.stop()
        desk.close()
    records = auditlog.records((data / "console" / "audit.log").read_bytes())
    kinds = [r[3] for r in records]
    assert "revocations" in kinds and kinds[-1] == "session_close" and records[-1][4]["reason"] == "revoked"
    assert not [r for r in records if r[3] == "auth_fail"]          # the tool sent nothing after the end
