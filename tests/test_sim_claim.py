"""`tether sim run --claim`: a CI load test that enrolls its devices by claim
against a running `tether cloud serve`, as a user would set it up from the
command line (claim batch, allowlist CSV), then runs telemetry with the
identities the devices got, verified against the cloud's store."""

import json
import os
import subprocess
import sys
import time

from brokers import free_port

TETHER = [sys.executable, "-m", "cloud.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tether(*argv, timeout=120):
    return subprocess.run(TETHER + list(argv), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_sim_run_enrolls_by_claim_then_runs_telemetry(tmp_path):
    port, prov_port = free_port(), free_port()
    data = tmp_path / "cloud"
    server = subprocess.Popen(TETHER + ["cloud", "serve", "--data", str(data), "--port", str(port),
                                        "--prov-port", str(prov_port)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while "provisioning endpoint" not in seen and time.monotonic() < deadline:
            seen += server.stdout.readline()
        assert "mqtts://127.0.0.1:%d" % prov_port in seen, seen
        assert tether("cloud", "claim", "ci-batch", "--quota", "6", "--data", str(data)).returncode == 0
        csv = tmp_path / "hwids.csv"
        csv.write_text("hwid,tenant,device,site\n" + "".join(
            "ci-hw-%05d,tenant%d,ci-%02d,lab\n" % (i, i % 2, i) for i in range(6)))
        allowed = tether("cloud", "allow", "--batch", "ci-batch", "--file", str(csv), "--data", str(data))
        assert allowed.returncode == 0, allowed.stderr
        common = ["sim", "run", "--broker-url", "mqtts://127.0.0.1:%d" % port,
                  "--ca-bundle", str(data / "ca" / "ca.crt"), "--devices", "6", "--duration", "4", "--quiet",
                  "--claim", str(data / "claims" / "ci-batch.crt"), str(data / "claims" / "ci-batch.key"),
                  "--prov-url", "mqtts://127.0.0.1:%d" % prov_port, "--hwid-prefix", "ci-hw-"]
        ok = tether(*common, "--store", str(data / "tether.db"), "--out", str(tmp_path / "ok"))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "enrolled 6 devices by claim" in ok.stdout
        summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
        assert summary["telemetry"]["lost"] == 0 and summary["telemetry"]["stored"] > 0
        audit = tether("cloud", "audit", "--data", str(data), "--action", "provision").stdout
        assert audit.count("provision") == 6 and "tenant1/ci-05" in audit
        # A device that is not on the allowlist: the run says so and exits 2,
        # and the cloud audited the refusal.
        stranger = [a if a != "ci-hw-" else "zz-hw-" for a in common]
        over = tether(*[a if a != "6" else "1" for a in stranger], "--enroll-timeout", "8",
                      "--out", str(tmp_path / "over"), timeout=180)
        assert over.returncode == 2 and "could not enroll" in over.stderr
        assert "not_allowlisted" in over.stderr, over.stderr         # the reason, not only the hwid
        refused = tether("cloud", "audit", "--data", str(data), "--action", "enroll_refused").stdout
        assert "not_allowlisted" in refused and "zz-hw-00000" in refused
    finally:
        server.terminate()
        server.wait(20)
