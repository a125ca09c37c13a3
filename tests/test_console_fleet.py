"""simulator/console_fleet.py against the real cloud on both brokers: the
section it returns has exactly the summary's keys, every attack is refused,
the untouched chains verify and the tampered ones are caught."""

import pytest

from cloud.service import Cloud
from simulator.console_fleet import run_console_fleet

from brokers import require_kind

SECTION_KEYS = {"sessions", "commands", "attacks_tried", "attacks_refused", "audit_chain_verified",
                "tamper_detected"}


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
async def test_console_fleet_over_the_broker(tmp_path, kind):
    require_kind(kind)
    cloud = Cloud(tmp_path / "cloud", broker=kind)
    await cloud.start()
    try:
        section, checks = await run_console_fleet(cloud, devices=5, seed=3)
    finally:
        await cloud.stop()
    assert set(section) == SECTION_KEYS
    assert section["attacks_tried"] == section["attacks_refused"] >= 12
    assert section["audit_chain_verified"] is True and section["tamper_detected"] is True
    assert section["sessions"] >= 10 and section["commands"] > section["sessions"]
    assert [c.name for c in checks if not c.passed] == []
    assert len(checks) == 5
