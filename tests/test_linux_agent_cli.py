"""`tether agent enroll | run` (board/linux_main.py), the agent on a Linux
board, as a user runs it: the real `tether` command in its own process
against the reference cloud (in this process: embedded broker with mTLS,
provisioning endpoint, ingest, SQLite store, OTA service and rollout
engine), the board's files in a temp directory.

- enroll: an allowlisted hardware id enrolls by claim; its key is encrypted
  at rest in a 0600 file, the certificate names the allowlisted identity
  and is for that key; enrolling again is a no-op on the same certificate;
  a hardware id not on the allowlist exits 2 with the reason;
- run: a sample command's readings reach the cloud's store, a sample that
  is not JSON is logged and skipped, SIGTERM stops the agent with exit 0;
  `run` before `enroll` exits 1;
- run with --slots: a release offered by a rollout is downloaded into slot
  1, the reboot command runs (it writes a marker) and the agent stops; the
  next `run` on the same directories boots the trial and confirms it.
"""

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from cryptography import x509

from agent import manifest as mf
from agent import updater as up
from board.keystore import FileKeystore
from board.linux_slots import BOOT_ENV, FileEnv, LinuxSlots, parse_env
from cloud.ca import identity_of
from cloud.rollout import Engine, Policy
from cloud.rollout_release import release_id
from cloud.service import Cloud
from simulator import firmware_faults as ff

from brokers import wait_until

TETHER = [sys.executable, "-m", "cloud.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = "line-1"
WAIT_S = 40

HW = "pi-v1"
FACTORY, GOOD = "1.0.0", "1.1.0"
PEOPLE = ("alice", "bob", "carol")
PLAN = {"silence_s": 60, "reach_s": 120, "stages": [{"name": "all", "percent": 100, "soak_s": 0}]}


def now_ms():
    return time.time_ns() // 1_000_000


@pytest.fixture
async def cloud(tmp_path):
    c = Cloud(tmp_path / "cloud")
    await c.start()
    c.claim = c.add_claim_batch(BATCH, 5, "factory-ops")
    c.provisioning.allow("hw-1", BATCH, "acme", "pi-1", "site-1", "ops")
    yield c
    await c.stop()


async def tether(*argv, timeout_s=WAIT_S):
    proc = await asyncio.create_subprocess_exec(*TETHER, *argv, cwd=REPO, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode, out.decode(), err.decode()


async def enroll(cloud, data, hwid):
    return await tether("agent", "enroll", "--data", str(data), "--prov-url", "127.0.0.1:%d" % cloud.prov_port,
                        "--device-port", str(cloud.port), "--claim-cert", cloud.claim[0],
                        "--claim-key", cloud.claim[1], "--ca", cloud.ca_path, "--hwid", hwid, "--timeout", "20")


class Agent:
    """`tether agent run` as a process; stderr collected as it comes."""

    def __init__(self, cloud, data, *extra):
        self.argv = TETHER + ["agent", "run", "--data", str(data), "--host", "127.0.0.1", "--port",
                              str(cloud.port), "--ca", cloud.ca_path, *extra]
        self.proc = None
        self.err = ""

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(*self.argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.PIPE)
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        async for line in self.proc.stderr:
            self.err += line.decode()

    async def stop(self):
        """SIGTERM -> the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self, timeout_s=WAIT_S):
        rc = await asyncio.wait_for(self.proc.wait(), timeout_s)
        await self.reader
        return rc

    def kill(self):
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def sample_script(tmp_path):
    """Prints {"temp_c": 21.5, "n": k} on its k-th run, except run 2: not JSON."""
    script = tmp_path / "sample.py"
    script.write_text(
        "import json, os, sys\n"
        "path = sys.argv[1]\n"
        "n = int(open(path).read()) if os.path.exists(path) else 0\n"
        "open(path, 'w').write(str(n + 1))\n"
        "print('temperature: warm' if n == 2 else json.dumps({'temp_c': 21.5, 'n': n}))\n")
    return "%s %s %s" % (sys.executable, script, tmp_path / "sample.count")


# ---------------------------------------------------------------- enroll

async def test_enroll_by_claim_then_again_and_a_stranger_is_refused(cloud, tmp_path):
    data = tmp_path / "board"
    rc, out, err = await enroll(cloud, data, "hw-1")
    assert rc == 0, out + err
    assert "enrolled as acme/pi-1" in out
    keys = data / "keys"
    for name in ("id0.key", "kek"):
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
    assert b"ENCRYPTED PRIVATE KEY" in (keys / "id0.key").read_bytes()
    cert = (data / "identity.crt").read_bytes()
    assert identity_of(cert) == "acme/pi-1"
    assert FileKeystore(str(keys)).matches("id0", cert)                 # issued for the board's own key
    assert x509.load_pem_x509_certificate(cert).issuer == cloud.ca.cert.subject
    assert any(r["action"] == "provision_proven" for r in cloud.registry.audit_rows(subject="acme/pi-1"))

    rc, out, err = await enroll(cloud, data, "hw-1")                   # again: the same identity, no new key
    assert rc == 0 and "enrolled as acme/pi-1" in out, out + err
    assert (data / "identity.crt").read_bytes() == cert
    assert not (keys / "id1.key").exists()

    rc, out, err = await enroll(cloud, tmp_path / "stranger", "hw-9")
    assert rc == 2, out + err
    assert "not_allowlisted" in err and "hw-9" in err
    assert not (tmp_path / "stranger" / "identity.crt").exists()


async def test_a_pending_enrollment_shows_the_key_fingerprint_the_operator_compares(cloud, tmp_path):
    """cloud approve's help: compare the fingerprint `tether cloud enrollments`
    shows with the device's. The device says it (it said nothing before)."""
    cloud.provisioning.allow("hw-2", BATCH, "acme", "pi-2", "site-1", "ops", approval=True)
    rc, out, err = await tether("agent", "enroll", "--data", str(tmp_path / "board"), "--prov-url",
                                "127.0.0.1:%d" % cloud.prov_port, "--device-port", str(cloud.port),
                                "--claim-cert", cloud.claim[0], "--claim-key", cloud.claim[1], "--ca",
                                cloud.ca_path, "--hwid", "hw-2", "--timeout", "8")
    assert rc == 2 and "pending operator approval" in err, out + err
    pending = [p for p in cloud.provisioning.pending() if p["hwid"] == "hw-2"]
    assert len(pending) == 1
    assert "key sha256 %s" % pending[0]["key_sha256"][:16] in err
    # said while it waits (the operator approves during the wait), not only when it gives up
    waiting = [line for line in err.splitlines() if "waiting for an operator's approval" in line]
    assert len(waiting) == 1 and pending[0]["key_sha256"][:16] in waiting[0]


# ---------------------------------------------------------------- run

async def test_run_sends_samples_skips_bad_ones_and_stops_on_sigterm(cloud, tmp_path):
    data = tmp_path / "board"
    rc, _, _ = await tether("agent", "run", "--data", str(data), "--host", "127.0.0.1", "--port", str(cloud.port),
                            "--ca", cloud.ca_path)
    assert rc == 1                                                      # not enrolled yet
    rc, out, err = await enroll(cloud, data, "hw-1")
    assert rc == 0, out + err
    acme = cloud.store.tenant("acme")
    agent = await Agent(cloud, data, "--sample-command", sample_script(tmp_path),
                        "--sample-interval", "0.1").start()
    try:
        assert await wait_until(lambda: acme.count_telemetry("pi-1") >= 5, WAIT_S), agent.err
    finally:
        rc = await agent.stop()
    assert rc == 0, agent.err
    assert "sample skipped" in agent.err and "not JSON" in agent.err
    assert "stopped:" in agent.err
    rows = acme.telemetry("pi-1")
    ns = [row["readings"]["n"] for row in rows]
    assert all(row["readings"]["temp_c"] == 21.5 for row in rows)
    assert 2 not in ns and {0, 1, 3, 4} <= set(ns)
    assert acme.dead_letters() == []


async def test_run_with_board_readings(cloud, tmp_path):
    """No --sample-command: the board's own load, uptime and memory."""
    data = tmp_path / "board"
    rc, out, err = await enroll(cloud, data, "hw-1")
    assert rc == 0, out + err
    acme = cloud.store.tenant("acme")
    agent = await Agent(cloud, data, "--sample-interval", "0.2").start()
    try:
        assert await wait_until(lambda: acme.count_telemetry("pi-1") >= 2, WAIT_S), agent.err
    finally:
        assert await agent.stop() == 0, agent.err
    readings = acme.telemetry("pi-1")[0]["readings"]
    assert {"load_1m", "uptime_s", "mem_available_kb"} <= set(readings), readings
    assert readings["uptime_s"] > 0


# ---------------------------------------------------------------- run with --slots

def version_script(tmp_path, payloads):
    """Says which release the slot holds, by its SHA-256, as a real image's /etc/os-release would."""
    table = tmp_path / "versions.json"
    table.write_text(json.dumps({hashlib.sha256(p).hexdigest(): v for v, p in payloads.items()}))
    script = tmp_path / "version.py"
    script.write_text(
        "import hashlib, json, os\n"
        "data = open(os.environ['TETHER_SLOT_PATH'], 'rb').read()\n"
        "print(json.load(open(%r)).get(hashlib.sha256(data).hexdigest(), 'unknown'))\n" % str(table))
    return "%s %s" % (sys.executable, script)


async def test_run_with_slots_updates_reboots_and_confirms(cloud, tmp_path):
    releases = {v: ff.build_release(HW, v, 1, size=3 * mf.CHUNK_BYTES - 100) for v in (FACTORY, GOOD)}
    ops = Engine(os.path.join(cloud.data_dir, "rollouts.db"), Policy())
    try:
        ops.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now_ms())
        for bundle, payload in releases.values():
            ops.add_release(bundle, payload, PEOPLE[0], now_ms())
        data, slot_dir = tmp_path / "board", tmp_path / "slots"
        rc, out, err = await enroll(cloud, data, "hw-1")
        assert rc == 0, out + err
        slot_dir.mkdir()
        (slot_dir / "slot0.img").write_bytes(releases[FACTORY][1])          # the factory image
        LinuxSlots(str(slot_dir), env=FileEnv(str(slot_dir / BOOT_ENV))).write_boot_state(
            up.BootState(active=0, sv=1, ksv=1).encode())
        root = tmp_path / "root.pub"
        root.write_bytes(ff.root_public_key())
        marker = tmp_path / "rebooted"
        argv = ("--sample-command", sample_script(tmp_path), "--sample-interval", "0.1",
                "--slots", str(slot_dir), "--hw-class", HW, "--root-key", str(root), "--site", "site-1",
                "--version-command", version_script(tmp_path, {v: p for v, (_, p) in releases.items()}),
                "--reboot-command", "%s -c \"open(%r, 'a').write('x')\"" % (sys.executable, str(marker)))

        def statuses():
            return [r["status"] for r in list(cloud.ota_service.core.reports) if r["device"] == "acme/pi-1"]

        first = await Agent(cloud, data, *argv).start()
        try:
            # the rollout's cohort is chosen from the devices that said hello
            assert await wait_until(lambda: ops.device("acme/pi-1") is not None, WAIT_S), first.err
            rid = ops.create(release_id(HW, GOOD), PLAN, PEOPLE[0], "test", now_ms())
            ops.approve(rid, PEOPLE[1], now_ms())
            ops.approve(rid, PEOPLE[2], now_ms())
            cloud.ota_service.tick_now()
            assert await wait_until(marker.exists, WAIT_S), first.err
            assert await first.wait() == 0, first.err                      # it stops for the reboot
        finally:
            first.kill()
        assert marker.read_text() == "x"                                   # the reboot command ran once
        assert (slot_dir / "slot1.img").read_bytes() == releases[GOOD][1]
        assert parse_env((slot_dir / BOOT_ENV).read_text())["boot_slot"] == "1"
        assert "installed" in statuses()
        # what an operator reads in the journal: the connection and the update's steps
        assert "connected to 127.0.0.1:%d as acme/pi-1" % cloud.port in first.err
        assert re.search(r"update \S+: downloading", first.err) and re.search(r"update \S+: installed", first.err)

        second = await Agent(cloud, data, *argv).start()                   # the board came back up
        try:
            assert await wait_until(lambda: "confirmed" in statuses(), WAIT_S), second.err
            assert await wait_until(lambda: re.search(r"update \S+: confirmed", second.err), 10), second.err
        finally:
            assert await second.stop() == 0, second.err
        assert statuses().index("trial") < statuses().index("confirmed")
        assert up.decode_boot_state(LinuxSlots(str(slot_dir)).read_boot_state()).active == 1
        assert marker.read_text() == "x"                                   # no second reboot
    finally:
        ops.close()
