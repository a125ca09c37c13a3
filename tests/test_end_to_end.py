"""End to end, with real parts: the reference cloud (embedded amqtt or
Mosquitto, mTLS, SQLite) and virtual devices running the real agent core,
through a network cut and a broker restart."""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from brokers import require_kind
from cloud.service import Cloud
from simulator.demo import run_demo
from simulator.fleet import Fleet
from simulator.verify import summarize

TETHER = [sys.executable, "-m", "cloud.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_args(out, broker="embedded", devices=24, duration=9.0):
    return argparse.Namespace(out=str(out), devices=devices, duration=duration, seed=3,
                              broker=broker, quiet=True)


def failed(summary):
    return [c for c in summary["checks"] if not c["passed"]]


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_demo_survives_network_cut_and_broker_restart(tmp_path, broker):
    if broker == "mosquitto":
        require_kind("mosquitto")
    summary = await run_demo(demo_args(tmp_path, broker))
    assert failed(summary) == []
    t = summary["telemetry"]
    assert t["lost"] == 0 and t["silent_gaps"] == 0
    assert t["generated"] > 24 * 5
    assert t["declared_drops"] > 0, "small-queue devices must overflow during the cut"
    assert t["stored"] + t["declared_drops"] == t["generated"]
    assert t["dead_lettered"] == 4
    assert set(summary) >= {"devices", "duration_s", "telemetry", "checks", "identity"}
    ident = summary["identity"]
    assert ident["revoked"] == 3 and ident["revoke_block_ms_max"] < 1000
    assert ident["revoked_reconnects_refused"] == ident["revoked_reconnects_tried"] == 9
    # no client certificate, foreign CA, another tenant's topic, clone, claim
    # certificate publishing telemetry, claim past its quota
    assert ident["clones_detected"] == 1 and ident["attacks_tried"] == 6
    # Mosquitto can only flag a clone (from its log); the embedded broker refuses it.
    assert ident["attacks_refused"] == (6 if broker == "embedded" else 5)
    assert ident["provisioned"] == 24 and ident["quarantined"] == 2
    # Firmware through the same broker: attacks, a bad release halted in its canary, a good one everywhere.
    ota, ro = summary["ota"], summary["rollout"]
    assert set(ota) == {"updated", "rolled_back", "rejected", "bricked", "power_cut_points",
                        "attacks_tried", "attacks_refused", "resumed_downloads"}
    assert set(ro) == {"bad_release_halted", "bad_release_fleet_touched_pct", "good_release_coverage_pct",
                       "bricked", "halt_incidents"}
    assert ota["attacks_tried"] == ota["attacks_refused"] == 6 and ota["rejected"] >= 6
    assert ota["bricked"] == ro["bricked"] == 0 and ota["power_cut_points"] >= 20
    assert ota["resumed_downloads"] > 0 and ota["updated"] >= 24 and ota["rolled_back"] >= 1
    assert ro["bad_release_halted"] and ro["halt_incidents"] == 1
    assert 0 < ro["bad_release_fleet_touched_pct"] <= 5.0 and ro["good_release_coverage_pct"] == 100.0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["telemetry"] == t and on_disk["ota"] == ota and on_disk["rollout"] == ro
    report = (tmp_path / "report.html").read_text()
    # three telemetry charts, then versions over time for each cohort of the good release
    assert report.count("<svg") >= 5 and report.count("Versions over time, cohort") >= 2
    assert "PASS" in report and "<script" not in report


async def test_verification_catches_a_lost_record(tmp_path):
    """The checks can fail: delete one stored row and `lost` must say so."""
    cloud = Cloud(tmp_path / "cloud")
    await cloud.start()
    try:
        creds = cloud.issue_devices(3)
        fleet = Fleet(creds, cloud.ca_path, cloud.host, cloud.port, seed=5)
        fleet.start()
        await fleet.run_for(3)
        assert await fleet.drain(20)
        await cloud.ingest.stats()
        good = summarize(fleet, cloud.store, 3, True)
        assert failed(good) == []
        cloud.store._db.execute("DELETE FROM telemetry WHERE device = 'dev-00000' AND epoch = 0 AND seq = 1")
        bad = summarize(fleet, cloud.store, 3, True)
        assert bad["telemetry"]["lost"] == 1
        names = {c["name"] for c in failed(bad)}
        assert "no acknowledged record lost" in names
        assert "every record stored or declared dropped" in names
        await fleet.close()
    finally:
        await cloud.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sim_run_against_cloud_serve_and_its_exit_codes(tmp_path):
    port = free_port()
    data = tmp_path / "cloud"
    server = subprocess.Popen(TETHER + ["cloud", "serve", "--data", str(data), "--port", str(port),
                                        "--issue", "6"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "mqtts://" not in line and time.monotonic() < deadline:
            line = server.stdout.readline()
        assert "mqtts://127.0.0.1:%d" % port in line
        common = ["sim", "run", "--broker-url", "mqtts://127.0.0.1:%d" % port,
                  "--ca-bundle", str(data / "ca" / "ca.crt"), "--devices", "6", "--duration", "4",
                  "--quiet"]
        ok = subprocess.run(TETHER + common + ["--creds", str(data / "devices"), "--network-cut", "1:1",
                                               "--store", str(data / "tether.db"),
                                               "--out", str(tmp_path / "ok")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
        assert summary["telemetry"]["lost"] == 0 and summary["telemetry"]["stored"] > 0
        # Verified against a store that never saw the records: must fail, exit 1.
        # (A --store path that does not exist is a usage error, exit 2: make an empty store.)
        from cloud.store import Store
        empty = tmp_path / "empty.db"
        Store(str(empty)).close()
        bad = subprocess.run(TETHER + common + ["--creds", str(data / "devices"), "--store", str(empty),
                                                "--out", str(tmp_path / "bad")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "FAIL" in bad.stdout
        usage = subprocess.run(TETHER + ["sim", "run", "--broker-url", "mqtt://127.0.0.1:1", "--ca-bundle",
                                         "x", "--creds", "y"], cwd=REPO, capture_output=True, text=True)
        assert usage.returncode == 2 and "TLS is not optional" in usage.stderr
    finally:
        server.terminate()
        server.wait(20)


def test_every_command_explains_itself():
    for cmd in (["--help"], ["demo", "--help"], ["cloud", "serve", "--help"], ["sim", "run", "--help"],
                ["cloud", "revoke", "--help"], ["cloud", "quarantine", "--help"], ["cloud", "release", "--help"],
                ["cloud", "audit", "--help"], ["fw", "--help"], ["fw", "verify", "--help"]):
        out = subprocess.run(TETHER + cmd, cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0 and "usage: tether" in out.stdout, cmd


def test_a_second_demo_in_the_same_out_dir_starts_from_fresh_records(tmp_path):
    """`tether demo` twice in ./tether-out crashed on the second run: the
    support desk's grants (seeded ids, for a reproducible demo) were kept
    and the first grant's id was taken. Every record database goes; the
    CAs and keys stay."""
    from cloud.support import SupportDesk
    from simulator.demo import fresh_cloud
    cloud_dir = tmp_path / "cloud"
    cloud = fresh_cloud(str(cloud_dir), "embedded")
    desk = SupportDesk(str(cloud_dir), random_bytes=lambda n: b"\1" * n)
    desk.grant("t", desk.public_key, "viewer", ["d1"], requested_by="a", approved_by="b", reason="r")
    desk.close()
    ca_files = sorted(p.name for p in (cloud_dir / "ca").iterdir())
    for name in ("tether.db-wal", "rollouts.db", "other.db-shm"):
        (cloud_dir / name).write_bytes(b"x")
    assert cloud.ca_path and ca_files
    fresh_cloud(str(cloud_dir), "embedded")
    left = {p.name for p in cloud_dir.iterdir()}
    assert not left & {"support.db", "rollouts.db", "other.db-shm"}     # (Cloud opens a new tether.db)
    assert sorted(p.name for p in (cloud_dir / "ca").iterdir()) == ca_files
    desk = SupportDesk(str(cloud_dir), random_bytes=lambda n: b"\1" * n)
    try:                                   # the same seeded id again: no UNIQUE failure
        desk.grant("t", desk.public_key, "viewer", ["d1"], requested_by="a", approved_by="b", reason="r")
    finally:
        desk.close()
