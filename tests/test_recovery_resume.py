"""A running identity core (as a fleet device holds one) whose certificate
expired recovers through the claim endpoint: `Enroller.run(actions=...)`
picks up the core where it is, over real mTLS on the embedded broker."""

import asyncio
import time

from agent import enroll
from agent.actions import UseIdentity
from agent.events import Tick
from board.keystore import FlashKeystore
from board.sim import SimFlash, SimRng
from cloud.service import Cloud
from board.enroller import Enroller, IdentityBoard


def clock_ms():
    return time.time_ns() // 1_000_000


async def test_a_running_core_recovers_through_the_claim_endpoint(tmp_path):
    cloud = Cloud(tmp_path / "cloud", cert_s=3600)
    await cloud.start()
    try:
        claim = cloud.add_claim_batch("b1", 2, "ops")
        cloud.provisioning.allow("hw-1", "b1", "acme", "dev-1", "s", "ops", cert_s=10)
        flash = SimFlash()
        ks = FlashKeystore(flash)
        core = enroll.Identity(enroll.Config("hw-1", "claim:b1", ks.capabilities, backoff_base_ms=100,
                                             backoff_cap_ms=500), SimRng(1))
        board = IdentityBoard(flash, ks)
        assert await Enroller(core, board, cloud.endpoints(), claim, clock_ms, "hw-1").run(timeout_s=30)
        old = core.record["a"]["cert"]
        await asyncio.sleep(10.5)  # the certificate expires while the device runs on
        todo = board.run(core, core.handle(Tick(clock_ms())))
        assert any(isinstance(a, UseIdentity) and a.name is None for a in todo)  # to the claim endpoint
        again = Enroller(core, board, cloud.endpoints(), claim, clock_ms, "hw-1")
        assert await again.run(timeout_s=30, actions=todo), again.log
        assert core.record["a"]["cert"] != old and core.identity == "acme/dev-1"
        assert cloud.provisioning.counts()["recovered"] == 1
    finally:
        await cloud.stop()
