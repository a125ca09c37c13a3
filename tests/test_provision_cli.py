"""The operator's provisioning commands, run as a person would (the
`tether` CLI in its own process) against a running cloud: make a batch's
claim certificate, allowlist a device that needs approval, see it pending,
approve it; the device enrolls by claim with that certificate."""

import asyncio
import subprocess
import sys
import time

from agent import enroll
from board.keystore import FlashKeystore
from board.sim import SimFlash, SimRng
from cloud.service import Cloud
from board.enroller import Enroller, IdentityBoard

from brokers import wait_until

TETHER = [sys.executable, "-m", "cloud.cli"]


async def tether(*argv):
    proc = await asyncio.create_subprocess_exec(*TETHER, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_claim_allow_approve_from_the_command_line(tmp_path):
    data = str(tmp_path / "cloud")
    cloud = Cloud(data)
    await cloud.start()
    try:
        rc, out, _ = await tether("cloud", "claim", "line-3", "--quota", "5", "--data", data, "--by", "factory")
        assert rc == 0 and "quota 5" in out
        rc, out, _ = await tether("cloud", "allow", "hw-77", "--batch", "line-3", "--tenant", "acme",
                                  "--device", "pump-77", "--site", "plant-2", "--approval", "--data", data)
        assert rc == 0, out
        flash = SimFlash()
        ks = FlashKeystore(flash)
        core = enroll.Identity(enroll.Config("hw-77", "claim:line-3", ks.capabilities, backoff_base_ms=200,
                                             backoff_cap_ms=1000), SimRng(3))
        claim = (tmp_path / "cloud" / "claims" / "line-3.crt", tmp_path / "cloud" / "claims" / "line-3.key")
        dev = Enroller(core, IdentityBoard(flash, ks), cloud.endpoints(), tuple(map(str, claim)),
                       lambda: time.time_ns() // 1_000_000, "hw-77")
        task = asyncio.ensure_future(dev.run(timeout_s=40))
        assert await wait_until(lambda: cloud.provisioning.pending(), 15)
        rc, out, _ = await tether("cloud", "enrollments", "--data", data)
        assert rc == 0 and "hw-77" in out and "acme/pump-77" in out
        rc, _, err = await tether("cloud", "approve", "hw-77", "--data", data, "--by", "alice")
        assert rc == 2 and "--reason" in err  # an approval needs a reason
        rc, out, _ = await tether("cloud", "approve", "hw-77", "--reason", "CHG-1042", "--data", data,
                                  "--by", "alice")
        assert rc == 0 and "acme/pump-77" in out
        assert await task
        assert dev.core.identity == "acme/pump-77"
        rc, out, _ = await tether("cloud", "audit", "--data", data, "--device", "acme/pump-77")
        assert "enroll_approved" in out and "alice" in out and "CHG-1042" in out and "provision" in out
    finally:
        await cloud.stop()
