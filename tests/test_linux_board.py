"""The Linux board: FileStorage survives a crash at any point of a write the
way a real filesystem does, and LinuxAgent (files + paho) delivers through
the reference cloud across a broker outage and a reboot."""

import asyncio
import os

import pytest

from agent import journal, telemetry
from board.linux import FileStorage, LinuxAgent
from cloud.service import Cloud


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    s = FileStorage(tmp_path / "flash")
    s.write_atomic("state", b"one")
    s.write_atomic("state", b"two")
    assert s.read("state") == b"two"
    assert sorted(os.listdir(tmp_path / "flash")) == ["state"]


def test_leftover_temp_file_from_a_crash_does_not_change_contents(tmp_path):
    s = FileStorage(tmp_path / "flash")
    s.write_atomic("state", b"old")
    (tmp_path / "flash" / "state.tmp").write_bytes(b"half-written new")  # crash before rename
    assert s.read("state") == b"old"
    s.write_atomic("state", b"new")
    assert s.read("state") == b"new"


def test_append_torn_tail_is_cut_on_recovery(tmp_path):
    s = FileStorage(tmp_path / "flash")
    s.append("queue", journal.add(0, 0, 0, b"a"))
    frame = journal.add(0, 1, 0, b"b")
    with open(tmp_path / "flash" / "queue", "ab") as f:
        f.write(frame[:5])  # the crash tore this append
    entries, damaged, _ = journal.replay(s.read("queue"))
    assert damaged and entries == [[0, 0, 0, b"a"]]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_storage_names_cannot_escape_the_directory(tmp_path, name):
    with pytest.raises(ValueError):
        FileStorage(tmp_path).read(name)


def run_agent(agent, seconds, sample_every_s=0.1):
    import time
    end = time.monotonic() + seconds
    next_sample = 0.0
    n = 0
    while time.monotonic() < end:
        if time.monotonic() >= next_sample:
            agent.sample({"n": n, "temp_c": 20.5})
            n += 1
            next_sample = time.monotonic() + sample_every_s
        agent.step(0.02)
    return n


def drain(agent, seconds=15):
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end and (agent.core.queue or agent.core.state != telemetry.ONLINE):
        agent.step(0.02)
    return not agent.core.queue


async def test_linux_agent_delivers_through_outage_and_reboot(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    await cloud.start()
    try:
        cred = cloud.issue_device("acme", "pi-1")
        root = tmp_path / "pi-flash"

        def agent():
            return LinuxAgent(root, "acme", "pi-1", cloud.host, cloud.port, cloud.ca_path,
                              cred.certfile, cred.keyfile,
                              config=telemetry.Config(backoff_base_ms=100, backoff_cap_ms=800))

        first = agent()
        first.boot()
        await asyncio.to_thread(run_agent, first, 1.0)
        await cloud.broker.stop()                      # outage: records queue on disk
        await asyncio.to_thread(run_agent, first, 1.0)
        assert first.core.queue, "records must wait on disk while the broker is down"
        del first                                      # power off with a queue on disk
        second = agent()
        second.boot()
        assert second.core.epoch == 1 and second.core.queue
        await cloud.broker.start()
        await asyncio.to_thread(run_agent, second, 1.0)
        assert await asyncio.to_thread(drain, second)
        await cloud.ingest.stats()
        rows = cloud.store.tenant("acme").telemetry(device="pi-1")
        keys = {(r["epoch"], r["seq"]) for r in rows}
        by_epoch = {}
        for e, s in keys:
            by_epoch.setdefault(e, set()).add(s)
        assert set(by_epoch) == {0, 1}
        for e, seqs in by_epoch.items():
            assert seqs == set(range(max(seqs) + 1)), "epoch %d has a hole" % e
        assert cloud.store.fleet_counts()["silent_gaps"] == 0
    finally:
        await cloud.stop()
