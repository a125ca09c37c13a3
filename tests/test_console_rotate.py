"""A technician's `rotate-identity` on the serial console really rotates the
device's identity: the console (agent/console.py, with a signed grant and
challenge-response) authorizes and records the command; the board's hook
feeds RotateNow to the identity core (agent/enroll.py), which gets a new key
and certificate from the cloud (cloud/provision.py) and retires the old.
A viewer's attempt is refused and recorded, and nothing rotates."""

import tempfile

from agent.events import RotateNow
from cloud.console_tool import Refused
from simulator.console_drill import Drill

from enroll_harness import Device, InProcessCloud, SimClock, enrolled


def test_console_rotate_identity_rotates_for_a_technician_and_not_for_a_viewer(tmp_path):
    cloud = InProcessCloud(tmp_path / "cloud", SimClock(), cert_s=86400)
    cloud.allow("hw-1", "dev-0000")
    dev = Device(cloud, "hw-1")
    assert dev.run_until(enrolled(dev))
    first = dev.core.record["a"]["cert"]

    def rotate(args):
        dev.feed(RotateNow(cloud.clock.now_ms()))
        return ["identity rotation started"]

    drill = Drill(1, 7, tempfile.mkdtemp(dir=str(tmp_path)))
    console = drill.devices[0]
    console.commands.hooks["rotate-identity"] = rotate
    viewer = drill.tech.session(console, drill.grant("viewer", [console.device_id]))
    viewer.open()
    try:
        viewer.run("rotate-identity")
        raised = None
    except Refused as e:
        raised = e.code
    viewer.close()
    assert raised is not None  # refused for a viewer...
    dev.run_until(lambda: False, steps_max=5)
    assert dev.core.record["a"]["cert"] == first  # ...and nothing rotated
    tech = drill.tech.session(console, drill.grant("technician", [console.device_id]))
    tech.open()
    tech.run("rotate-identity")
    tech.close()
    assert dev.run_until(lambda: dev.core.record["a"]["cert"] != first and enrolled(dev)(), steps_max=30)
    assert cloud.prov.counts()["rotated"] == 1
    log = console.audit_log()
    assert log.count(b"rotate-identity") >= 2  # the viewer's refusal and the command, both in the chain
    assert not drill.desk.verify_log(console.device_id, log)["tamper"]
