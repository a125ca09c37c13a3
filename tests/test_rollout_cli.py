"""`tether cloud rollout | releases | window` through cloud/cli.py, on the
committed sample releases in firmware-images/ and a real SQLite file."""

import json
import os

from cloud import cli
from cloud.rollout import Engine, Policy
from cloud.rollout_cli import DB_NAME
from cloud.service import Cloud

IMAGES = os.path.join(os.path.dirname(__file__), "..", "firmware-images")


def img(name):
    return os.path.join(IMAGES, name)


def tether(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out + out.err


def test_release_window_rollout_lifecycle_and_export(tmp_path, capsys):
    data = tmp_path / "cloud"
    Cloud(str(data)).registry.close()   # the commands refuse a --data with no cloud (M8 of a walkthrough)
    d = ("--data", data)
    assert tether(capsys, "cloud", "releases", "trust", "--root", img("keys/root.pub"), "--k", 2,
                  "--hw-class", "sim-v1", "--by", "alice", *d)[0] == 0
    for version in ("1.0.0", "1.1.0"):
        status, out = tether(capsys, "cloud", "releases", "add", "--bundle", img("sim-v1-%s.bundle" % version),
                             "--payload", img("sim-v1-%s.bin" % version), "--by", "alice", *d)
        assert status == 0 and "registered sim-v1-%s" % version in out
    status, out = tether(capsys, "cloud", "releases", "add", "--bundle", img("sim-v1-1.1.0.bundle"),
                         "--payload", img("sim-v1-1.0.0.bin"), "--by", "alice", *d)
    assert status == 1 and "refused: tampered_chunk" in out      # the payload is not the manifest's
    status, out = tether(capsys, "cloud", "releases", "list", "--json", *d)
    assert [r["id"] for r in json.loads(out)] == ["sim-v1-1.0.0", "sim-v1-1.1.0"]

    status, out = tether(capsys, "cloud", "window", "set", "acme", "--start", "22:00", "--end", "02:00",
                         "--days", "sat,sun", "--by", "ops", *d)
    assert status == 0 and "22:00-02:00 on sat,sun" in out

    e = Engine(str(data / DB_NAME), Policy())
    for i in range(10):
        e.observe("globex/d%d" % i, "globex", "s", "sim-v1", "1.0.0", 1)
    e.close()

    status, out = tether(capsys, "cloud", "rollout", "start", "--release", "sim-v1-1.1.0", "--canary", 2,
                         "--cohorts", "50,100", "--soak", 600, "--rollback-release", "sim-v1-1.0.0",
                         "--reason", "CHG-42 sensor fix", "--by", "alice", *d)
    assert status == 1 and "rollback_downgrade" in out        # 1.0.0 is below 1.1.0's security version 2
    status, out = tether(capsys, "cloud", "rollout", "start", "--release", "sim-v1-1.1.0", "--canary", 2,
                         "--cohorts", "50,100", "--soak", 600, "--reason", "CHG-42 sensor fix", "--by", "alice", *d)
    assert status == 0 and out.startswith("ro-1 requested by alice")
    assert tether(capsys, "cloud", "rollout", "approve", "ro-1", "--by", "alice", *d)[1].startswith(
        "refused: requester_approval")
    assert "1 of 2 approvals; awaiting_approval" in tether(capsys, "cloud", "rollout", "approve", "ro-1",
                                                          "--by", "bob", *d)[1]
    assert "refused: duplicate_approval" in tether(capsys, "cloud", "rollout", "approve", "ro-1", "--by", "bob", *d)[1]
    assert "2 of 2 approvals; running" in tether(capsys, "cloud", "rollout", "approve", "ro-1", "--by", "carol",
                                                 "--note", "read the diff", *d)[1]
    assert "paused" in tether(capsys, "cloud", "rollout", "pause", "ro-1", "--reason", "hold", "--by", "dave", *d)[1]
    assert "running" in tether(capsys, "cloud", "rollout", "resume", "ro-1", "--reason", "go", "--by", "dave", *d)[1]
    status, out = tether(capsys, "cloud", "rollout", "status", *d)
    assert "ro-1" in out and "canary" in out and "50%" in out
    assert "kill switch ON" in tether(capsys, "cloud", "rollout", "kill", "--reason", "incident 7", "--by", "erin", *d)[1]
    status, out = tether(capsys, "cloud", "rollout", "status", "ro-1", "--json", *d)
    assert json.loads(out)["rollouts"][0]["state"] == "halted" and json.loads(out)["kill_switch"]["set_by"] == "erin"
    assert "refused: kill_switch" in tether(capsys, "cloud", "rollout", "start", "--release", "sim-v1-1.1.0",
                                            "--canary", 1, "--reason", "x", "--by", "alice", *d)[1]
    assert tether(capsys, "cloud", "rollout", "kill", "--off", "--reason", "over", "--by", "erin", *d)[0] == 0

    status, text = tether(capsys, "cloud", "rollout", "export", "ro-1", *d)
    assert status == 0
    for needle in ("ROLLOUT ro-1", "requested by alice", "bob at", "carol at", "read the diff",
                   "INCIDENT", "kill_switch", "incident 7", "pause", "resume"):
        assert needle in text, needle
    assert "{'" not in text and "['" not in text     # structured details as JSON, not Python reprs
    out_file = tmp_path / "ro-1.json"
    assert tether(capsys, "cloud", "rollout", "export", "ro-1", "--json", "--out", out_file, *d)[0] == 0
    record = json.loads(out_file.read_text())
    assert [a["approver"] for a in record["rollout"]["approvals"]] == ["bob", "carol"]
    assert record["incidents"][0]["tripped"]["reason"] == "incident 7"
    assert tether(capsys, "cloud", "rollout", "alerts", *d)[0] == 0


def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tether(capsys, "cloud", "rollout")[0] == 2
    assert not os.path.exists(tmp_path / "tether-cloud")           # nothing created for a usage error
    Cloud(str(tmp_path)).registry.close()   # the commands refuse a --data with no cloud (M8 of a walkthrough)
    status, out = tether(capsys, "cloud", "releases", "add", "--bundle", tmp_path / "missing",
                         "--payload", tmp_path / "missing", "--by", "a", "--data", tmp_path)
    assert status == 2 and "cannot read bundle" in out
    status, out = tether(capsys, "cloud", "releases", "add", "--bundle", img("sim-v1-1.0.0.bundle"),
                         "--payload", img("sim-v1-1.0.0.bin"), "--by", "a", "--data", tmp_path)
    assert status == 1 and "refused: no_trust" in out


def test_a_rollout_with_no_device_of_its_class_known_says_so(tmp_path, capsys):
    """Cohorts are chosen from the devices known when it runs: with none of
    the release's hardware class known, start and approve say it would
    complete with nothing to do (it went running -> completed silently)."""
    data = tmp_path / "cloud"
    Cloud(str(data)).registry.close()
    d = ("--data", data)
    tether(capsys, "cloud", "releases", "trust", "--root", img("keys/root.pub"), "--k", 2, "--hw-class", "sim-v1",
           "--by", "alice", *d)
    tether(capsys, "cloud", "releases", "add", "--bundle", img("sim-v1-1.1.0.bundle"),
           "--payload", img("sim-v1-1.1.0.bin"), "--by", "alice", *d)
    status, out = tether(capsys, "cloud", "rollout", "start", "--release", "sim-v1-1.1.0", "--canary", 1,
                         "--reason", "r", "--by", "alice", *d)
    assert status == 0 and "no device of hardware class sim-v1 has said hello" in out
    e = Engine(str(data / DB_NAME), Policy())
    e.observe("acme/d1", "acme", "s", "sim-v1", "1.0.0", 1)
    e.close()
    status, out = tether(capsys, "cloud", "rollout", "approve", "ro-1", "--by", "bob", *d)
    assert status == 0 and "said hello" not in out
    tether(capsys, "cloud", "rollout", "approve", "ro-1", "--by", "carol", *d)
    # the device takes it: the cohort settles and passes; the export reads as text, not Python reprs
    e = Engine(str(data / DB_NAME), Policy())
    try:
        t = 10_000_000_000_000
        e.tick(t)
        e.report("acme/d1", "confirmed", "", 1, t + 1000, release="sim-v1-1.1.0")
        for step in range(2, 6):
            e.tick(t + step * 3_600_000)
    finally:
        e.close()
    status, text = tether(capsys, "cloud", "rollout", "export", "ro-1", *d)
    assert status == 0 and "cohort_settled" in text and 'counts={"confirmed": 1}' in text, text
    assert "{'" not in text
