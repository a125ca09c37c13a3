"""`tether sim run` as a CI gate: exit 0 PASS, 1 a correctness check
failed, 2 a usage error. Real parts: the reference cloud (embedded broker,
mTLS, SQLite) in this process, `tether sim run` as a child process.

- A shared, long-lived cloud: another run's bad data (a silent gap, a
  declared drop, dead letters) must not fail this run or appear in its
  numbers; this run's own losses must.
- Bad input is one line and exit 2, never a traceback and never exit 1.
- Devices that cannot connect: the run says why."""

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time

import cbor2
import pytest

from brokers import free_port
from cloud.ca import CA
from cloud.service import Cloud

TETHER = [sys.executable, "-m", "cloud.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENANT = "acme"


async def sim_run(*argv, timeout=90):
    """`tether sim run ARGV` -> (returncode, stdout, stderr), without
    blocking the loop the cloud runs on."""
    proc = await asyncio.create_subprocess_exec(
        *TETHER, "sim", "run", *argv, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def record(device, epoch, seq, **fields):
    body = {"v": 1, "d": device, "e": epoch, "s": seq, "ts": int(time.time() * 1000)}
    body.update(fields or {"k": "t", "r": {"temp_c": 20}})
    return cbor2.dumps(body, canonical=True)


async def publish(cloud, device, payload):
    identity = "%s/%s" % (TENANT, device)
    return await cloud.ingest.submit(identity, "t/%s/telemetry" % identity, payload)


@pytest.fixture
async def cloud(tmp_path):
    c = Cloud(tmp_path / "cloud")
    await c.start()
    c.issue_devices(3, tenants=(TENANT,))
    try:
        yield c
    finally:
        await c.stop()


def common(cloud, out, devices=2, duration=3):
    return ["--broker-url", "mqtts://%s:%d" % (cloud.host, cloud.port), "--ca-bundle", cloud.ca_path,
            "--creds", os.path.join(cloud.data_dir, "devices"), "--devices", str(devices),
            "--duration", str(duration), "--interval", "0.5", "--quiet", "--out", str(out)]


def verdict_line(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("PASS:", "FAIL:"))]
    assert len(lines) == 1, stdout
    return lines[0]


async def test_a_run_counts_only_its_own_devices_and_epochs(cloud, tmp_path):
    # An earlier run left bad data in this cloud: dev-00000 (also in this
    # run, an older epoch) has a silent gap, a declared drop and a dead
    # letter; dev-00002 (not in this run) has dead letters too.
    assert await publish(cloud, "dev-00000", record("dev-00000", 1, 0)) == "stored"
    drop = record("dev-00000", 1, 2, k="drop", de=1, a=1, b=1, n=1)
    assert await publish(cloud, "dev-00000", drop) == "stored"
    five = record("dev-00000", 1, 5)
    assert await publish(cloud, "dev-00000", five) == "stored"
    assert await publish(cloud, "dev-00000", five) == "duplicate"
    for device in ("dev-00000", "dev-00002", "dev-00002"):
        assert (await publish(cloud, device, b"\xff not cbor")).startswith("dead_letter:")
    before = cloud.store.fleet_counts()
    assert before["silent_gaps"] == 1 and before["dead_lettered"] == 3 and before["declared_drops"] == 1

    store = os.path.join(cloud.data_dir, "tether.db")
    rc, out, err = await sim_run(*common(cloud, tmp_path / "ok"), "--store", store)
    assert rc == 0, out + err
    line = verdict_line(out)
    assert "silent gaps 0" in line and "dead lettered 0" in line and "declared dropped 0" in line
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    t = summary["telemetry"]
    assert summary["devices"] == 2
    assert t["silent_gaps"] == 0 and t["dead_lettered"] == 0 and t["declared_drops"] == 0
    assert t["duplicates_dropped"] == 0 and t["lost"] == 0
    assert t["stored"] == t["generated"] > 0
    assert set(t) == {"generated", "acked", "stored", "duplicates_dropped", "declared_drops",
                      "silent_gaps", "dead_lettered", "lost", "msgs_per_s", "refused"}

    # A run that loses data itself still fails: while it runs, its own epoch
    # of dev-00000 gets a silent gap and a dead letter, and a stored record
    # of dev-00001 disappears from the store.
    task = asyncio.ensure_future(sim_run(*common(cloud, tmp_path / "bad", duration=4), "--store", store))
    first = cloud.store.tenant(TENANT).telemetry(device="dev-00000")[-1]["epoch"]
    deadline = time.monotonic() + 30
    epochs = {}
    while len(epochs) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        for device in ("dev-00000", "dev-00001"):
            rows = cloud.store.tenant(TENANT).telemetry(device=device)
            if rows and rows[-1]["epoch"] > first:
                epochs[device] = rows[-1]["epoch"]
    assert len(epochs) == 2, "the second run never stored a record"
    assert await publish(cloud, "dev-00000", record("dev-00000", epochs["dev-00000"], 5000)) == "stored"
    assert (await publish(cloud, "dev-00000", b"\xff not cbor")).startswith("dead_letter:")
    db = sqlite3.connect(store, timeout=10)
    gone = db.execute("DELETE FROM telemetry WHERE tenant = ? AND device = 'dev-00001' AND epoch = ?"
                      " AND seq = 0", (TENANT, epochs["dev-00001"])).rowcount
    db.commit()
    db.close()
    assert gone == 1
    rc, out, err = await task
    assert rc == 1, out + err
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    t = summary["telemetry"]
    assert t["dead_lettered"] == 1 and t["silent_gaps"] == 1 and t["lost"] == 1
    failed = {c["name"] for c in summary["checks"] if not c["passed"]}
    assert {"no silent gaps", "no acknowledged record lost"} <= failed
    line = verdict_line(out)
    assert "lost 1" in line and "silent gaps 1" in line and "dead lettered 1" in line


BAD_INPUT = [
    (["--network-cut", "20"], "AT:SECONDS"),
    (["--network-cut", "x:1"], "AT:SECONDS"),
    (["--network-cut", "10:5", "--duration", "3"], "after the run ends"),
    (["--network-cut", "1:0"], "--network-cut"),
    (["--devices", "0"], "--devices"),
    (["--duration", "-1"], "--duration"),
    (["--duration", "nan"], "--duration"),
    (["--interval", "0"], "--interval"),
    (["--interval", "10", "--duration", "3"], "--interval"),
    (["--tenants", "0"], "--tenants"),
    (["--drain-timeout", "0"], "--drain-timeout"),
    (["--enroll-timeout", "-5"], "--enroll-timeout"),
    (["--ca-bundle", "{tmp}/nope.crt"], "no such file"),
    (["--ca-bundle", "{tmp}/not-pem.crt"], "--ca-bundle"),
    (["--creds", "{tmp}/no-dir"], "no such directory"),
    (["--creds", "{tmp}/not-pem.crt"], "not a directory"),
    (["--creds", "{tmp}/empty"], "TENANT/DEVICE.crt"),
    (["--store", "{tmp}/no.db"], "no such file"),
    (["--store", "{tmp}/not-pem.crt"], "--store"),
    (["--mint-ca", "{tmp}/nope.crt", "{tmp}/nope.key"], "no such file"),
    (["--claim", "{tmp}/nope.crt", "{tmp}/nope.key"], "no such file"),
]


@pytest.mark.parametrize("extra,says", BAD_INPUT, ids=[" ".join(e) for e, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, says):
    ca = tmp_path / "ca.crt"
    CA.create(str(tmp_path / "ca"), name="test CA")
    ca.write_bytes((tmp_path / "ca" / "ca.crt").read_bytes())
    (tmp_path / "not-pem.crt").write_text("not a certificate\n")
    (tmp_path / "empty" / "acme").mkdir(parents=True)
    argv = ["--broker-url", "mqtts://127.0.0.1:%d" % free_port(), "--ca-bundle", str(ca),
            "--devices", "1", "--duration", "2", "--quiet", "--out", str(tmp_path / "out")]
    if not any(a in extra for a in ("--creds", "--mint-ca", "--claim")):
        argv += ["--mint-ca", str(tmp_path / "ca" / "ca.crt"), str(tmp_path / "ca" / "ca.key")]
    extra = [a.format(tmp=tmp_path) for a in extra]
    out = subprocess.run(TETHER + ["sim", "run"] + argv + extra, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether sim run: "), out.stderr
    assert says in lines[0], lines[0]


def test_help_says_what_is_read_and_the_defaults():
    out = subprocess.run(TETHER + ["sim", "run", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "TENANT/DEVICE.crt" in text and "--issue" in text
    for default in ("(default: 100)", "(default: 30.0)", "(default: 1.0)", "(default: tether-sim-out)",
                    "(default: localhost)", "(default: 2)", "(default: 1)", "(default: 60.0)"):
        assert default in text, default
    assert "Exits 0" in text and "1 when a correctness check fails" in text and "2 for a usage error" in text


async def test_a_device_that_cannot_connect_says_why(cloud, tmp_path):
    base = common(cloud, tmp_path / "x", devices=1, duration=1)
    nobody = free_port()
    other = CA.create(str(tmp_path / "other-ca"), name="another CA")

    def with_(option, value, out):
        argv = list(base)
        argv[argv.index(option) + 1] = value
        argv[argv.index("--out") + 1] = str(tmp_path / out)
        return argv + ["--drain-timeout", "1"]

    refused, wrong_ca, wrong_name = await asyncio.gather(
        sim_run(*with_("--broker-url", "mqtts://127.0.0.1:%d" % nobody, "refused")),
        sim_run(*with_("--ca-bundle", other.cert_path, "wrong-ca")),
        sim_run(*with_("--ca-bundle", cloud.ca_path, "wrong-name"), "--server-name", "broker.example"))
    for (rc, out, err), says, out_dir in (
            (refused, "connection refused", "refused"),
            (wrong_ca, "certificate verify failed", "wrong-ca"),
            (wrong_name, "hostname mismatch", "wrong-name")):
        assert rc == 1, out + err
        assert "Traceback" not in err
        assert says in out.lower(), out
        verdict_line(out)
        summary = json.loads((tmp_path / out_dir / "summary.json").read_text())
        reasons = summary["connect_errors"]
        assert reasons and reasons[0]["count"] >= 1 and says in reasons[0]["reason"].lower(), reasons
        connected = [c for c in summary["checks"] if c["name"] == "every device connected at the end"][0]
        assert not connected["passed"] and says in connected["detail"].lower()


async def test_a_device_the_broker_refuses_says_why(cloud, tmp_path):
    """A device certificate from a CA the broker does not trust. With TLS
    1.3 the client's handshake completes before the broker checks its
    certificate, and the embedded broker closes without an alert: the run
    says the connection was closed before any CONNACK, and what that means."""
    other = tmp_path / "other"
    CA.create(str(other / "ca"), name="rogue CA")
    rc, out, err = await sim_run(
        "--broker-url", "mqtts://%s:%d" % (cloud.host, cloud.port), "--ca-bundle", cloud.ca_path,
        "--mint-ca", str(other / "ca" / "ca.crt"), str(other / "ca" / "ca.key"), "--devices", "1",
        "--duration", "1", "--quiet", "--drain-timeout", "1", "--out", str(other / "out"))
    assert rc == 1, out + err
    summary = json.loads((other / "out" / "summary.json").read_text())
    assert summary["connect_errors"], out
    first = summary["connect_errors"][0]
    reason = first["reason"].lower()
    assert ("tls refused" in reason and "unknown ca" in reason) or "before connack" in reason, first
    assert "refused the device's certificate" in first["hint"], first
    assert first["reason"] in out and first["hint"] in out


def test_the_verdict_line_is_not_wrapped(tmp_path):
    from simulator import live
    summary = {"devices": 123456, "duration_s": 123456.7, "checks": [{"name": "x", "passed": True, "detail": "d"}],
               "telemetry": {"generated": 123456789, "stored": 123456789, "declared_drops": 123456789,
                             "lost": 0, "silent_gaps": 0, "dead_lettered": 123456789}}
    out = subprocess.run([sys.executable, "-c", "import json, sys; from simulator import live; "
                          "live.verdict(json.loads(sys.argv[1]), 'o')", json.dumps(summary)],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, COLUMNS="80"))
    assert live is not None and out.returncode == 0, out.stderr
    line = verdict_line(out.stdout)
    assert line.endswith("dead lettered 123456789"), out.stdout
