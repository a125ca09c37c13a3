"""Firmware updates on the Linux board, end to end with real parts: the
embedded cloud (and Mosquitto) with mTLS and its OTA service, the rollout
engine on SQLite, really signed releases, LinuxAgent on paho and
board/linux_ota.LinuxOta over board/linux_slots.LinuxSlots on real files in
env-file mode (the board plays U-Boot's bootcount itself).

A reboot is simulated by the board's reboot callable: the old process's
socket is closed (no DISCONNECT, as when a process dies) and a fresh
LinuxAgent starts on the same directories, which runs slots.boot().

- a factory board downloads a release, reboots into its trial and confirms
  on acknowledged telemetry (both brokers);
- a trial image that never gets telemetry acknowledged times out and rolls
  back to the old slot;
- a tampered chunk and bad bundles leave the board on its image, each
  reported rejected with its reason;
- a process killed mid-download resumes from its cursor after a restart;
- with HTTPS ranges, a page the updater no longer waits for is not fetched,
  and one that cannot be fetched is counted and asked for over MQTT
  (end to end over HTTPS: tests/test_fw_http.py).
"""

import asyncio
import hashlib
import os
import ssl
import time

import pytest

from agent import manifest as mf
from agent import telemetry
from agent import updater as up
from agent.ota_wire import encode
from board.https_ranges import HttpsRanges
from board.linux import LinuxAgent
from board.linux_ota import LinuxOta
from board.linux_slots import BOOT_ENV, FileEnv, LinuxSlots, parse_env
from cloud.rollout import Engine, Policy
from cloud.rollout_release import release_id
from cloud.service import Cloud
from simulator import firmware_faults as ff
from simulator.ota_drill import unknown_signer_bundle

from brokers import require_kind

HW = "pi-v1"
FACTORY, GOOD, PAGED = "1.0.0", "1.1.0", "1.2.0"
IMAGE_BYTES = 4 * mf.CHUNK_BYTES - 300      # four chunks, the last one short
PAGED_BYTES = (mf.PAGE_CHUNKS + 2) * mf.CHUNK_BYTES - 300   # paged: pages of 128 and 2 chunk hashes
PEOPLE = ("alice", "bob", "carol")
PLAN = {"silence_s": 60, "reach_s": 120, "stages": [{"name": "all", "percent": 100, "soak_s": 0}]}
TRIAL_ACKS_MIN = 3
WAIT_S = 30
SAMPLE_S = 0.1

RELEASES = {v: ff.build_release(HW, v, 1, size=IMAGE_BYTES) for v in (FACTORY, GOOD)}  # (bundle, payload)
RELEASES[PAGED] = ff.build_release(HW, PAGED, 1, size=PAGED_BYTES, pages=True)
VERSION_OF_HASH = {hashlib.sha256(p).digest(): v for v, (_, p) in RELEASES.items()}


def now_ms():
    return time.time_ns() // 1_000_000


@pytest.fixture
async def cloud(tmp_path, request):
    kind = getattr(request, "param", "embedded")
    require_kind(kind)
    c = Cloud(tmp_path / "cloud", broker=kind)
    await c.start()
    c.ops = Engine(os.path.join(c.data_dir, "rollouts.db"), Policy())   # the operator's side, like the CLI
    c.ops.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now_ms())
    for bundle, payload in RELEASES.values():
        c.ops.add_release(bundle, payload, PEOPLE[0], now_ms())
    yield c
    c.ops.close()
    await c.stop()


def start_rollout(cloud, version=GOOD):
    rid = cloud.ops.create(release_id(HW, version), PLAN, PEOPLE[0], "test", now_ms())
    cloud.ops.approve(rid, PEOPLE[1], now_ms())
    cloud.ops.approve(rid, PEOPLE[2], now_ms())
    cloud.ota_service.tick_now()
    return rid


class Killed(Exception):
    """The test stops the process at a chosen point."""


def kill(agent):
    """What a process's death does to its connection: the socket closes, no DISCONNECT."""
    if agent.client is not None and agent.client.socket() is not None:
        agent.client.socket().close()


class Board:
    """One Linux board on a test directory. Its factory image (FACTORY in
    slot 0, security version 1) is flashed once; `agent` is the process
    running now, replaced at each reboot."""

    def __init__(self, cloud, root, name, samples=True, trial_ms_max=20000, fault=None, https=False,
                 https_port=None):
        """https: fetch chunks over the cloud's HTTPS ranges (at https_port,
        default the cloud's) instead of MQTT."""
        self.cloud, self.root, self.name = cloud, str(root), name
        self.identity = "acme/" + name
        self.cred = cloud.issue_device("acme", name)
        self.samples = samples             # does the running image sample telemetry at all
        self.config = up.Config(HW, ff.root_public_key(), k=2, trial_acks_min=TRIAL_ACKS_MIN,
                                trial_ms_max=trial_ms_max)
        self.fault = fault
        self.https_port = (https_port or cloud.fw_http_port) if https else None
        self.reboots = 0
        self.report_acked_at_reboot = []   # was the last report acknowledged when reboot() came
        slots = self.slots()
        with open(slots.slot_paths[0], "wb") as f:
            f.write(RELEASES[FACTORY][1])
        slots.write_boot_state(up.BootState(active=0, sv=1, ksv=1).encode())
        self.start()

    def slots(self):
        slot_dir = os.path.join(self.root, "slots")
        os.makedirs(slot_dir, exist_ok=True)
        return LinuxSlots(slot_dir, env=FileEnv(os.path.join(slot_dir, BOOT_ENV)), fault=self.fault)

    def version_of(self, slot):
        return VERSION_OF_HASH[hashlib.sha256(self.slots().read_slot(slot)).digest()]

    def start(self):
        """A process starts: a fresh agent on the same directories, booted."""
        c = self.cloud
        ranges = None
        if self.https_port is not None:
            ctx = ssl.create_default_context(cafile=c.ca_path)
            ctx.load_cert_chain(self.cred.certfile, self.cred.keyfile)
            ranges = HttpsRanges(c.host, self.https_port, ctx, timeout_s=2)
        ota = LinuxOta(self.identity, self.config, self.slots(), "site-0", self.version_of,
                       reboot=self.reboot, ranges=ranges)
        self.agent = LinuxAgent(os.path.join(self.root, "data"), "acme", self.name, c.host, c.port,
                                c.ca_path, self.cred.certfile, self.cred.keyfile,
                                config=telemetry.Config(backoff_base_ms=100, backoff_cap_ms=800), ota=ota)
        self.agent.boot()

    def reboot(self):
        """The reboot callable LinuxOta is given: the process ends, the board boots."""
        self.reboots += 1
        last = self.ota.last_report
        self.report_acked_at_reboot.append(last is not None and last.is_published())
        self.crash()

    def crash(self):
        kill(self.agent)
        self.start()

    @property
    def ota(self):
        return self.agent.ota

    def state(self):
        u = self.ota.updater
        return "off" if u is None else u.state

    def run_until(self, predicate, timeout_s=WAIT_S):
        """Drive whichever agent runs now until predicate() -> True, or False
        after timeout_s. The running image samples every SAMPLE_S if it does."""
        deadline = time.monotonic() + timeout_s
        next_sample = 0.0
        n = 0
        while not predicate():
            if time.monotonic() > deadline:
                return False
            if self.samples and time.monotonic() >= next_sample:
                self.agent.sample({"n": n})
                n += 1
                next_sample = time.monotonic() + SAMPLE_S
            self.agent.step(0.02)
        return True

    async def until(self, predicate, timeout_s=WAIT_S):
        return await asyncio.to_thread(self.run_until, predicate, timeout_s)

    # -- what is on its disk ------------------------------------------------------

    def slot_bytes(self, slot):
        return self.slots().read_slot(slot)

    def env(self):
        with open(os.path.join(self.root, "slots", BOOT_ENV)) as f:
            return parse_env(f.read())

    def record(self):
        return up.decode_boot_state(self.slots().read_boot_state())


def reports(cloud, identity, ref=None):
    return [r for r in list(cloud.ota_service.core.reports)
            if r["device"] == identity and (ref is None or r["ref"] == ref)]


def history(cloud, identity):
    """(status, reason, ref) of each report, once per seq (a boot may say the last one again)."""
    by_seq = {r["seq"]: (r["status"], r["reason"], r["ref"]) for r in reports(cloud, identity)}
    return [by_seq[seq] for seq in sorted(by_seq)]


def reported(cloud, identity, status, ref=None):
    return lambda: any(r["status"] == status for r in reports(cloud, identity, ref))


# ---------------------------------------------------------------- an update

@pytest.mark.parametrize("cloud", ["embedded", "mosquitto"], indirect=True)
async def test_download_reboot_trial_confirm(cloud, tmp_path):
    board = Board(cloud, tmp_path / "pi", "pi-1")
    assert await board.until(lambda: board.ota.welcomed)
    assert cloud.ops.device(board.identity)["version"] == FACTORY
    start_rollout(cloud)
    good = release_id(HW, GOOD)
    assert await board.until(lambda: board.reboots == 1 and board.state() == up.CONFIRMED
                             and reported(cloud, board.identity, "confirmed")())
    # The new slot holds the release byte for byte, and the bootloader starts it from now on.
    assert board.slot_bytes(1) == RELEASES[GOOD][1]
    assert board.slot_bytes(0) == RELEASES[FACTORY][1]
    assert board.env() == {"boot_slot": "1", "upgrade_available": "0", "bootcount": "0"}
    record = board.record()
    assert (record.phase, record.active, record.sv) == (up.CONFIRMED, 1, 1)
    assert board.ota.version == GOOD and board.agent.acked >= TRIAL_ACKS_MIN
    assert board.report_acked_at_reboot == [True]     # "installed" reached the broker first
    mine = reports(cloud, board.identity)
    assert [r["status"] for r in mine] == ["downloading", "verified", "installed", "trial", "confirmed"]
    assert {r["ref"] for r in mine} == {good}
    assert [r["seq"] for r in mine] == sorted(r["seq"] for r in mine)
    # The new image said hello with its version.
    assert await board.until(lambda: cloud.ops.device(board.identity)["version"] == GOOD)
    assert board.ota.refused == 0 and board.ota.errors == {}


async def test_a_trial_without_acknowledged_telemetry_rolls_back(cloud, tmp_path):
    # No image of this board samples, so no acknowledged record can come
    # from before the reboot either: only the trial's clock can decide.
    board = Board(cloud, tmp_path / "pi", "pi-2", samples=False, trial_ms_max=1500)
    assert await board.until(lambda: board.ota.welcomed)
    start_rollout(cloud)
    assert await board.until(lambda: board.reboots == 2 and board.ota.welcomed
                             and reported(cloud, board.identity, "rolled_back")())
    assert board.agent.acked == 0
    assert board.env() == {"boot_slot": "0", "upgrade_available": "0", "bootcount": "0"}
    record = board.record()
    assert (record.phase, record.reason, record.active) == (up.ROLLED_BACK, "trial_timeout", 0)
    assert board.ota.version == FACTORY and board.slot_bytes(0) == RELEASES[FACTORY][1]
    assert [(st, why) for st, why, _ in history(cloud, board.identity)] == [
        ("downloading", ""), ("verified", ""), ("installed", ""), ("trial", ""),
        ("rolled_back", "trial_timeout")]
    assert await board.until(lambda: cloud.ops.device(board.identity)["version"] == FACTORY)


# ---------------------------------------------------------------- attacks

async def test_attacks_leave_the_board_on_its_image(cloud, tmp_path):
    board = Board(cloud, tmp_path / "pi", "pi-3")
    assert await board.until(lambda: board.ota.welcomed)
    push = cloud.ota_service.push
    good_bundle, good_payload = RELEASES[GOOD]
    # A really signed release whose chunk 0 has one bit flipped, pushed with
    # the service's own credential once the board is downloading.
    push(board.identity, encode("offer", ref="attack-tampered", bundle=good_bundle))
    assert await board.until(lambda: board.state() == up.DOWNLOADING)
    tampered = bytes([good_payload[0] ^ 1]) + good_payload[1:mf.CHUNK_BYTES]
    push(board.identity, encode("chunk", ref="attack-tampered", i=0, data=tampered))
    assert await board.until(reported(cloud, board.identity, "rejected", "attack-tampered"))
    # Bundles refused before any download: a downgrade, a signer nobody listed.
    downgrade = ff.build_release(HW, "0.9.0", 0, size=IMAGE_BYTES)[0]
    for ref, bundle in (("attack-downgrade", downgrade), ("attack-signer", unknown_signer_bundle())):
        push(board.identity, encode("offer", ref=ref, bundle=bundle))
        assert await board.until(reported(cloud, board.identity, "rejected", ref)), ref
    assert history(cloud, board.identity) == [
        ("downloading", "", "attack-tampered"), ("rejected", "tampered_chunk", "attack-tampered"),
        ("rejected", "downgrade", "attack-downgrade"), ("rejected", "unknown_signer", "attack-signer")]
    assert board.ota.errors == {"not_offered": 1}     # the cloud serves no chunk of a release it did not offer
    # Still on its image: nothing of the tampered chunk written, the bootloader unmoved.
    assert board.reboots == 0 and board.ota.version == FACTORY
    assert board.slot_bytes(0) == RELEASES[FACTORY][1] and board.slot_bytes(1) == b""
    assert board.env() == {"boot_slot": "0", "upgrade_available": "0", "bootcount": "0"}
    record = board.record()
    assert (record.phase, record.active, record.sv) == (up.REJECTED, 0, 1)


# ---------------------------------------------------------------- interruption

async def test_a_killed_process_resumes_the_download_from_its_cursor(cloud, tmp_path):
    armed = []

    def fault(point):
        if point == "slot 1 @%d" % (2 * mf.CHUNK_BYTES) and not armed:
            armed.append(point)
            raise Killed(point)           # before chunk 2 is written
    board = Board(cloud, tmp_path / "pi", "pi-4", fault=fault)
    assert await board.until(lambda: board.ota.welcomed)
    start_rollout(cloud)
    with pytest.raises(Killed):
        await board.until(lambda: False)
    record = board.record()
    # The cursor is written every 16 chunks: the record still says 0; the
    # slot holds chunks 0 and 1, which the next start finds by its scan.
    assert (record.phase, record.cursor) == (up.DOWNLOADING, 0)
    assert board.slot_bytes(1) == RELEASES[GOOD][1][:2 * mf.CHUNK_BYTES]
    board.crash()                         # no clean shutdown: a fresh process on the same disk
    restarted = board.agent
    assert await board.until(lambda: board.reboots == 1 and board.state() == up.CONFIRMED
                             and reported(cloud, board.identity, "confirmed")())
    assert board.slot_bytes(1) == RELEASES[GOOD][1]
    assert board.env()["boot_slot"] == "1"
    # The restarted process said "downloading" again (same seq), then went on.
    assert [st for st, _, _ in history(cloud, board.identity)] == \
        ["downloading", "verified", "installed", "trial", "confirmed"]
    # The restarted process asked for chunk 2, the first its slot lacked, not chunk 0.
    assert (restarted.ota.resumed, restarted.ota.restarted) == (1, 0)


# ---------------------------------------------------------------- the driver alone

class StillClock:
    """A clock that moves only when told (both the wall clock and the ticks)."""

    def __init__(self):
        self.ms = 1_800_000_000_000

    def now_ms(self):
        return self.ms

    def ticks_ms(self):
        return self.ms


def test_a_rollback_reboot_waits_for_its_report_and_ignores_offers_meanwhile(tmp_path):
    # No network: the reports wait in the outbox, so the reboot waits its bound.
    slots = LinuxSlots(tmp_path, env=FileEnv(os.path.join(str(tmp_path), BOOT_ENV)))
    with open(slots.slot_paths[0], "wb") as f:
        f.write(RELEASES[FACTORY][1])
    slots.write_slot(1, 0, RELEASES[GOOD][1])
    slots.write_boot_state(up.BootState(active=0, sv=1, ksv=1, phase=up.INSTALLED, target=1, seq=3,
                                        ref="r").encode())
    clock, reboots = StillClock(), []
    config = up.Config(HW, ff.root_public_key(), k=2, trial_acks_min=TRIAL_ACKS_MIN, trial_ms_max=1000)
    ota = LinuxOta("acme/pi-5", config, slots, "site-0", lambda slot: (FACTORY, GOOD)[slot],
                   reboot=lambda: reboots.append(clock.ms), clock=clock)
    ota.boot()
    assert (ota.updater.state, ota.version) == (up.TRIAL, GOOD)
    ota.step(0)                                          # the trial's clock starts
    clock.ms += 1000
    ota.step(TRIAL_ACKS_MIN - 1)                         # too few acknowledged: rolled back, Reboot
    assert ota.reboot_by_ms is not None and reboots == []
    # An offer while the reboot waits changes nothing: the next start is offered again.
    ota.on_message(encode("offer", ref="late", bundle=ff.build_release(HW, "0.9.0", 0, size=100)[0]))
    clock.ms += 4999
    ota.step(0)
    assert reboots == []                                 # the report is not acknowledged yet
    clock.ms += 1
    ota.step(0)
    assert reboots == [clock.ms]                         # ... and the wait is bounded
    record = up.decode_boot_state(slots.read_boot_state())
    assert (record.phase, record.reason, record.active) == (up.ROLLED_BACK, "trial_timeout", 0)
    with open(os.path.join(str(tmp_path), BOOT_ENV)) as f:
        assert parse_env(f.read())["boot_slot"] == "0"
    assert len(ota.outbox) == 2                          # trial and rolled_back, for the next connection


def test_a_page_is_fetched_only_while_awaited_and_falls_back_to_mqtt(tmp_path):
    # HTTPS to a port nothing listens on; MQTT offline, what it would send recorded.
    slots = LinuxSlots(tmp_path, env=FileEnv(os.path.join(str(tmp_path), BOOT_ENV)))
    with open(slots.slot_paths[0], "wb") as f:
        f.write(RELEASES[FACTORY][1])
    slots.write_boot_state(up.BootState(active=0, sv=1, ksv=1).encode())
    config = up.Config(HW, ff.root_public_key(), k=2, trial_acks_min=TRIAL_ACKS_MIN, trial_ms_max=1000)
    ranges = HttpsRanges("127.0.0.1", 1, ssl.create_default_context(), timeout_s=2)
    ota = LinuxOta("acme/pi-6", config, slots, "site-0", lambda slot: FACTORY, clock=StillClock(),
                   ranges=ranges)
    sent = []
    ota.publish = lambda payload: sent.append(payload)   # offline: None, reports kept
    ota.boot()
    offer = encode("offer", ref="r", bundle=RELEASES[PAGED][0])
    ota.on_message(offer)
    for _ in range(1000):                                # the offer's verification, a Step per pass
        if ota.updater.state != up.VERIFYING:
            break
        ota.step(0)
    # Verified: page 0 asked for and fetched in the same pass; refused there, asked over MQTT.
    page_0 = encode("page", ref="r", i=0)
    assert ota.updater.state == up.PAGING and ota.fetch_pending is None
    assert ota.fetch_errors == {"network": 1} and ota.pages_fetched == 0 and sent[-1] == page_0
    # The offer again (a reconnect) asks for the page again; a cancel comes before the next pass.
    ota.on_message(offer)
    assert ota.fetch_pending == ("page", "r", 0)
    ota.on_message(encode("cancel", ref="r", why="halted"))
    sent.clear()
    ota.step(0)
    assert ota.updater.state == up.REJECTED and ota.fetch_pending is None
    assert ota.fetch_errors == {"network": 1} and page_0 not in sent     # neither over HTTPS nor MQTT
