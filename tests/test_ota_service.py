"""Firmware updates over the real broker (embedded and Mosquitto, mTLS), the
real cloud (cloud/service.py starts the OTA service), the real rollout
engine on SQLite and really signed images (simulator/firmware_faults.py via
cloud/firmware.py):

- virtual devices (simulator/ota_device.py on the real agent/updater.py)
  are offered a release, download it chunk by chunk, install it, run their
  trial on acknowledged telemetry and confirm;
- a halted rollout stops serving chunks (a raw MQTT device asks for them);
- hostile messages are refused with a reason and the service goes on;
- a device cannot report on another device's topic (the broker's ACL).

Plus OtaCore on its own engine (no broker): chunks and pages of a paged
release served only while it is offered, each page the slice of the
release's chunk table the manifest signs; and the message format, fuzzed
with Hypothesis against OtaCore directly: any bytes are either handled or
refused with an OtaError code, never a crash.
"""

import hashlib
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent import cbor
from agent import manifest as mf
from agent import updater as up
from agent import ota_wire as wire
from agent.ota_link import OtaLink
from board.sim import SimFlash
from board.slots import BOOT_STATE, SLOT_NAMES, SimSlots
from cloud import firmware
from cloud import ota_service as ota
from cloud import rollout_plan as rp
from cloud.rollout import Engine, Policy
from cloud.rollout_release import release_id
from simulator import firmware_faults as ff
from simulator import ota_drill
from simulator.fleet import Fleet
from simulator.ota_device import OtaDevice

from brokers import Device, any_cloud, broker_kind, wait_until  # noqa: F401 (fixtures)

HW = ota_drill.HW
GOOD = release_id(HW, ota_drill.GOOD)
PEOPLE = ("alice", "bob", "carol")
PLAN = {"silence_s": 60, "reach_s": 120, "stages": [{"name": "all", "percent": 100, "soak_s": 0}]}
WAIT_S = 30


def now_ms():
    import time
    return time.time_ns() // 1_000_000


@pytest.fixture
async def cloud(any_cloud):
    """The cloud on each broker, with the drill's releases added and trusted
    (c.fw, c.bundles) and the operator's engine (c.ops)."""
    c = any_cloud
    c.fw, c.bundles = ota_drill.build_firmware(seed=1)
    c.ops = Engine(os.path.join(c.data_dir, "rollouts.db"), Policy())   # the operator's side, like the CLI
    c.ops.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now_ms())
    for version in (ota_drill.FACTORY, ota_drill.GOOD):
        c.ops.add_release(c.bundles[version], c.fw.releases[version][0], PEOPLE[0], now_ms())
    yield c
    c.ops.close()


def start_rollout(cloud, plan=PLAN):
    rid = cloud.ops.create(GOOD, plan, PEOPLE[0], "test", now_ms())
    cloud.ops.approve(rid, PEOPLE[1], now_ms())
    cloud.ops.approve(rid, PEOPLE[2], now_ms())
    cloud.ota_service.tick_now()
    return rid


async def raw_device(cloud, identity):
    tenant, name = identity.split("/")
    cred = cloud.issue_device(tenant, name)
    dev = Device(cloud.host, cloud.port, cloud.ca_path, cred.certfile, cred.keyfile, identity)
    assert await dev.connect() == 0
    assert await dev.subscribe("t/%s/update" % identity) == [1]
    return dev


def answers(dev, op):
    out = []
    for _, payload in list(dev.messages):
        msg = cbor.loads(payload)
        if msg["op"] == op:
            out.append(msg)
    return out


def hello(dev, identity, version="1.0.0"):
    return dev.publish("t/%s/ota" % identity, ota.encode("hello", hw=HW, ver=version, site="site-0"))


# ---------------------------------------------------------------- through the broker

async def test_offer_download_install_trial_confirm(cloud):
    creds = cloud.issue_devices(3)
    fleet = Fleet(creds, cloud.ca_path, cloud.host, cloud.port, seed=2)
    devices = [OtaDevice(d, cloud.fw, "site-0") for d in fleet.devices]
    for dev, o in zip(fleet.devices, devices):
        dev.ota = o
    fleet.start()
    try:
        assert await wait_until(lambda: all(o.welcomed for o in devices), WAIT_S)
        assert {d["device"]: d["version"] for d in cloud.ops.devices()} == \
            {d.identity: "1.0.0" for d in fleet.devices}
        rid = start_rollout(cloud)
        assert await wait_until(lambda: cloud.ops.status(rid)["state"] == rp.COMPLETED, WAIT_S), \
            cloud.ops.status(rid)["cohorts"]
        assert all(o.running_version() == ota_drill.GOOD and o.state() == up.CONFIRMED for o in devices)
        assert {m["state"] for m in cloud.ops.members(rid)} == {rp.CONFIRMED}
        # Every step reported, in order, each naming the release it is about.
        core = cloud.ota_service.core
        first = fleet.devices[0].identity
        mine = [r for r in core.reports if r["device"] == first]
        assert [r["status"] for r in mine] == ["downloading", "verified", "installed", "trial", "confirmed"]
        assert {r["ref"] for r in mine} == {GOOD}
        assert [r["seq"] for r in mine] == sorted(r["seq"] for r in mine)
        chunks = -(-len(cloud.fw.releases[ota_drill.GOOD][0]) // 4096)
        assert core.counts["chunk_served"] == 3 * chunks
        assert core.counts["refused"] == 0 and not fleet.core_errors
    finally:
        await fleet.close()


async def test_a_halted_rollout_stops_serving_chunks(cloud):
    me = "acme/raw-1"
    dev = await raw_device(cloud, me)
    try:
        assert await hello(dev, me)
        assert await wait_until(lambda: answers(dev, "welcome"))
        rid = start_rollout(cloud)
        assert await wait_until(lambda: answers(dev, "offer"))
        offer = answers(dev, "offer")[0]
        assert offer["ref"] == GOOD and offer["bundle"] == cloud.bundles[ota_drill.GOOD]
        # While the rollout runs, chunks are served, byte for byte.
        assert await dev.publish("t/%s/ota" % me, ota.encode("chunk", ref=GOOD, i=0))
        assert await wait_until(lambda: answers(dev, "chunk"))
        assert answers(dev, "chunk")[0]["data"] == cloud.fw.releases[ota_drill.GOOD][0][:4096]
        # The kill switch halts it (from another process's engine): no more chunks.
        cloud.ops.kill(PEOPLE[1], "test: stop everything", now_ms())
        assert cloud.ops.status(rid)["state"] == rp.HALTED
        assert await dev.publish("t/%s/ota" % me, ota.encode("chunk", ref=GOOD, i=1))
        assert await wait_until(lambda: answers(dev, "error"))
        assert answers(dev, "error")[0]["why"] == "not_offered"
        assert len(answers(dev, "chunk")) == 1
        # A reconnect's hello gets no offer either.
        assert await hello(dev, me)
        assert await wait_until(lambda: len(answers(dev, "welcome")) == 2)
        assert len(answers(dev, "offer")) == 1
    finally:
        await dev.close()


HOSTILE = [
    (b"\xff\x00garbage", "not_cbor"),
    (cbor.dumps([1, 2, 3]), "not_a_map"),
    (cbor.dumps({"v": 2, "op": "hello"}), "bad_version"),
    (cbor.dumps({"v": 1, "op": "reboot"}), "unknown_op"),
    (cbor.dumps({"v": 1, "op": "hello", "hw": HW, "ver": "1", "site": "s", "x": 1}), "unknown_field"),
    (cbor.dumps({"v": 1, "op": "hello", "hw": HW, "ver": "1"}), "missing_field"),
    (cbor.dumps({"v": 1, "op": "hello", "hw": HW, "ver": "1/../../x" * 20, "site": "s"}), "bad_field"),
    (cbor.dumps({"v": 1, "op": "report", "st": "confirmed", "why": "", "seq": -1, "ref": GOOD}), "bad_field"),
    (cbor.dumps({"v": 1, "op": "report", "st": "pwned", "why": "", "seq": 1, "ref": GOOD}), "bad_field"),
    (b"\xa0" + b"\x00" * 600, "too_big"),
    (ota.encode("report", st="confirmed", why="", seq=7, ref=GOOD), "unknown_device"),
    (ota.encode("chunk", ref=GOOD, i=0), "not_offered"),
    (ota.encode("chunk", ref="no-such-release", i=0), "not_offered"),
]


async def test_hostile_messages_are_refused_with_a_reason(cloud):
    me = "globex/raw-2"
    dev = await raw_device(cloud, me)
    try:
        for payload, _ in HOSTILE:
            assert await dev.publish("t/%s/ota" % me, payload)
        assert await wait_until(lambda: len(answers(dev, "error")) == len(HOSTILE)), answers(dev, "error")
        assert [e["why"] for e in answers(dev, "error")] == [code for _, code in HOSTILE]
        core = cloud.ota_service.core
        assert core.counts["refused"] == len(HOSTILE)
        assert [r["code"] for r in core.refusals] == [code for _, code in HOSTILE]
        # A chunk of a release not offered is also withdrawn (a release the
        # cloud knows: nothing to withdraw otherwise), so a device that
        # missed the cancel (offline then) does not ask forever.
        assert await wait_until(lambda: answers(dev, "cancel"))
        assert [c["ref"] for c in answers(dev, "cancel")] == [GOOD]
        # The service goes on: a well-formed hello is welcomed.
        assert await hello(dev, me)
        assert await wait_until(lambda: answers(dev, "welcome"))
        assert cloud.ops.device(me)["version"] == "1.0.0"
    finally:
        await dev.close()


async def test_a_device_cannot_report_for_another_device(cloud):
    me, other = "acme/raw-3", "acme/raw-4"
    dev = await raw_device(cloud, me)
    try:
        # On the other device's topic: the broker's ACL stops it before the service.
        dev.publish_nowait("t/%s/ota" % other, ota.encode("hello", hw=HW, ver="6.6.6", site="site-0"))
        dev.publish_nowait("t/%s/ota" % other, ota.encode("report", st="confirmed", why="", seq=9, ref=GOOD))
        # Its own topic still works, and arrives after (one connection, in order).
        assert await hello(dev, me)
        assert await wait_until(lambda: answers(dev, "welcome"))
        core = cloud.ota_service.core
        assert core.counts["hello"] == 1 and core.counts["report"] == 0
        assert cloud.ops.device(other) is None
        assert [d["device"] for d in cloud.ops.devices()] == [me]
        # Nor can it read another device's updates (refused at SUBSCRIBE or at delivery).
        await dev.subscribe("t/%s/update" % other)
        cloud.ota_service.push(other, ota.encode("error", why="for-the-other", ref=""))
        cloud.ota_service.push(me, ota.encode("error", why="for-me", ref=""))
        assert await wait_until(lambda: answers(dev, "error"))
        assert [e["why"] for e in answers(dev, "error")] == ["for-me"]
        assert {t for t, _ in dev.messages} == {"t/%s/update" % me}
    finally:
        await dev.close()


# ---------------------------------------------------------------- OtaCore: chunks and pages

PAGED = "1.3.0"
PAGED_ID = release_id(HW, PAGED)
PAGED_CHUNKS = 300          # pages of 128, 128 and 44 chunk hashes; the last chunk short
ME = "acme/dev-1"


def paged_release(version=PAGED, chunks=PAGED_CHUNKS):
    """(bundle, payload, manifest bytes) of a small image, paged on request."""
    bundle, payload = ff.build_release(HW, version, 1, size=chunks * mf.CHUNK_BYTES - 100, pages=True)
    manifest = firmware.build_manifest(payload, HW, version, 1, ff.EXPIRES_AT, "drill", pages=True)
    return bundle, payload, manifest


PAGED_RELEASE = paged_release()
INLINE_RELEASE = ff.build_release(HW, ota_drill.GOOD, 1, size=5 * mf.CHUNK_BYTES, pages=False)


@pytest.fixture
def core(tmp_path):
    """An OtaCore on its own engine, offering the paged release to ME."""
    engine = Engine(str(tmp_path / "rollouts.db"), Policy())
    engine.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], now_ms())
    engine.add_release(PAGED_RELEASE[0], PAGED_RELEASE[1], PEOPLE[0], now_ms())
    engine.add_release(*INLINE_RELEASE, PEOPLE[0], now_ms())
    engine.observe(ME, "acme", "site-0", HW, ota_drill.FACTORY, now_ms())
    c = ota.OtaCore(engine)
    rollout = engine.create(PAGED_ID, PLAN, PEOPLE[0], "test", now_ms())
    engine.approve(rollout, PEOPLE[1], now_ms())
    engine.approve(rollout, PEOPLE[2], now_ms())
    offers = [m for m in sent(c.tick(now_ms())) if m[0] == "offer"]
    assert offers == [("offer", {"ref": PAGED_ID, "bundle": PAGED_RELEASE[0]})]
    yield c
    engine.close()


def sent(out):
    """[(op, fields)] of what the core sends, parsed as a device would."""
    assert all(topic == ota.update_topic(ME) for topic, _ in out)
    return [ota.parse(payload, wire.DOWN, wire.DOWN_BYTES_MAX) for _, payload in out]


def ask(core, op, ref=PAGED_ID, i=0):
    return sent(core.on_message("t/%s/ota" % ME, ota.encode(op, ref=ref, i=i), now_ms()))


def test_core_pages_are_the_chunk_table_the_manifest_signs(core):
    _, payload, manifest_bytes = PAGED_RELEASE
    m = mf.parse(manifest_bytes)
    table = firmware.chunk_table(payload)
    assert m.paged and m.chunk_count() == PAGED_CHUNKS
    for page in range(3):
        [(op, f)] = ask(core, "page", i=page)
        assert (op, f["ref"], f["i"]) == ("page", PAGED_ID, page)
        assert f["data"] == table[page * mf.PAGE_BYTES:(page + 1) * mf.PAGE_BYTES]
        assert len(f["data"]) == mf.page_bytes(PAGED_CHUNKS, page)
        assert hashlib.sha256(f["data"]).digest() == m.page_hash(page)
    assert core.counts["page_served"] == 3 and core.counts["refused"] == 0


def test_core_download_of_a_paged_release_passes_the_device_check(core):
    """Every page and chunk fetched from the core, in the order the device
    asks for them, through the device's ChunkVerifier."""
    _, payload, manifest_bytes = PAGED_RELEASE
    verifier = mf.ChunkVerifier(mf.parse(manifest_bytes), whole=False)
    got = bytearray()
    for index in range(PAGED_CHUNKS):
        page = verifier.page_needed()
        if page is not None:
            [(_, f)] = ask(core, "page", i=page)
            verifier.load_page(page, f["data"])
        [(_, f)] = ask(core, "chunk", i=index)
        verifier.update(index, f["data"])
        got += f["data"]
    verifier.finish()
    assert bytes(got) == payload
    assert core.counts["page_served"] == 3 and core.counts["chunk_served"] == PAGED_CHUNKS


def test_core_computes_a_chunk_table_once_and_keeps_a_few(core, monkeypatch):
    made = []
    monkeypatch.setattr(ota, "chunk_table", lambda payload: made.append(len(payload)) or
                        firmware.chunk_table(payload))
    for page in (0, 1, 0, 2):
        assert ask(core, "page", i=page)[0][0] == "page"
    assert made == [len(PAGED_RELEASE[1])]
    monkeypatch.setattr(ota, "RELEASES_CACHED_MAX", 1)
    core.chunk_table(release_id(HW, ota_drill.GOOD))
    assert list(core.tables) == [release_id(HW, ota_drill.GOOD)] and len(core.cache) == 1
    assert ask(core, "page", i=0)[0][0] == "page"
    assert list(core.tables) == [PAGED_ID] and len(made) == 3
    # Bounded in bytes too: a release over the bound alone is kept (it is being served).
    monkeypatch.setattr(ota, "RELEASES_CACHED_MAX", 8)
    good = release_id(HW, ota_drill.GOOD)
    both = sum(len(b) for r in (PAGED_ID, good) for b in core.blobs(r))
    for bound, kept in ((both, [PAGED_ID, good]), (both - 1, [good]), (1, [good])):
        monkeypatch.setattr(ota, "CACHE_BYTES_MAX", bound)
        core.cache.clear()
        core.blobs(PAGED_ID)
        core.blobs(good)
        assert list(core.cache) == kept, bound          # over the bound the older goes, never the newest


def test_core_pages_only_while_offered(core):
    [(op, f)] = ask(core, "page", ref="sim-v1-9.9.9")          # no such release: nothing to cancel
    assert (op, f) == ("error", {"why": "not_offered", "ref": "sim-v1-9.9.9"})
    other = release_id(HW, ota_drill.GOOD)                    # ours, but not offered to ME
    assert ask(core, "page", ref=other) == [("error", {"why": "not_offered", "ref": other}),
                                            ("cancel", {"ref": other, "why": "not offered now"})]
    core.engine.abort(core.engine.offer_for(ME).rollout, PEOPLE[1], "test: withdrawn", now_ms())
    for op in ("page", "chunk"):
        assert ask(core, op) == [("error", {"why": "not_offered", "ref": PAGED_ID}),
                                 ("cancel", {"ref": PAGED_ID, "why": "not offered now"})]
    assert core.counts["page_served"] == core.counts["chunk_served"] == 0
    assert [r["code"] for r in core.refusals] == ["not_offered"] * 4


class WiredDevice(OtaLink):
    """The real update machine on the sim board, its messages going straight
    to an OtaCore (no broker) while online; answers wait in `inbox` until
    pump() delivers them, so a test can cut the link between any two."""

    def __init__(self, core):
        flash = SimFlash(capacity_bytes=4 << 20)
        flash.files[SLOT_NAMES[0]] = bytearray(ota_drill.build_firmware(seed=1)[0].releases[ota_drill.FACTORY][0])
        flash.files[BOOT_STATE] = bytearray(up.BootState(active=0, sv=1, ksv=1).encode())
        OtaLink.__init__(self, ME, HW, "site-0", SimSlots(flash))
        self.core, self.online, self.inbox, self.steps = core, True, [], 0
        self.version = ota_drill.FACTORY
        self.booted(up.Updater(up.Config(HW, ff.root_public_key(), k=2)), *self.slots.boot())

    def publish(self, payload):
        if not self.online:
            return None
        self.inbox += [p for _, p in self.core.on_message("t/%s/ota" % ME, payload, now_ms())]
        return True

    def step_later(self):
        self.steps += 1

    def reboot_later(self):
        pass

    def pump(self, until):
        for _ in range(5000):
            if until():
                return True
            if self.steps:
                self.steps -= 1
                self.step_now()
            elif self.inbox:
                self.received(self.inbox.pop(0), now_ms())
            else:
                return until()
        return until()


def test_a_download_whose_release_was_withdrawn_while_offline_ends_at_the_reconnect(core):
    """The device is away mid-download (its requests lost) until the engine
    gives up on it (no report within reach_s: "unreached"): no offer comes
    after its hello, so only its own request, asked again at the reconnect
    (Resend), can bring the cloud's cancel. Before that it waited in
    "downloading" until some other release was offered."""
    dev = WiredDevice(core)
    dev.link_up(0)
    assert dev.pump(lambda: dev.updater.state == up.DOWNLOADING and dev.updater.boot.cursor >= 3)
    dev.online, dev.inbox = False, []                     # gone: what was in flight is lost
    core.tick(now_ms() + (PLAN["reach_s"] + 60) * 1000)  # away too long: the engine gives up on it
    assert core.engine.offer_for(ME) is None
    dev.online = True
    dev.link_up(0)                                        # back: hello, and the request again
    assert dev.pump(lambda: dev.updater.state == up.REJECTED)
    assert dev.updater.boot.reason == "cancelled" and dev.updater.boot.active == 0
    assert dev.errors == {"not_offered": 1} and core.refusals[-1]["code"] == "not_offered"


@pytest.mark.parametrize("op, i", [("page", 3), ("page", mf.PAGES_MAX - 1), ("chunk", PAGED_CHUNKS),
                                   ("chunk", mf.PAGED_CHUNKS_MAX - 1)])
def test_core_refuses_an_index_past_the_release(core, op, i):
    assert ask(core, op, i=i) == [("error", {"why": "bad_index", "ref": ""})]
    assert core.counts[op + "_served"] == 0 and core.refused_by_code == {"bad_index": 1}


def page_request(**change):
    fields = {"v": 1, "op": "page", "ref": PAGED_ID, "i": 0}
    fields.update(change)
    return cbor.dumps({k: v for k, v in fields.items() if v is not None})


@pytest.mark.parametrize("payload, code", [
    (page_request(i=mf.PAGES_MAX), "bad_field"),
    (page_request(i=-1), "bad_field"),
    (page_request(i="0"), "bad_field"),
    (page_request(i=True), "bad_field"),
    (page_request(i=0.0), "bad_field"),
    (page_request(ref=""), "bad_field"),
    (page_request(data=b""), "unknown_field"),
    (page_request(i=None), "missing_field"),
])
def test_core_refuses_malformed_page_requests(core, payload, code):
    out = sent(core.on_message("t/%s/ota" % ME, payload, now_ms()))
    assert out == [("error", {"why": code, "ref": ""})]
    assert core.counts["page_served"] == 0 and core.refused_by_code == {code: 1}


# ---------------------------------------------------------------- the format, fuzzed

_DB = tempfile.mkdtemp(prefix="tether-ota-fuzz-")
_CORE = None


def fuzz_core():
    global _CORE
    if _CORE is None:
        engine = Engine(os.path.join(_DB, "rollouts.db"), Policy())
        engine.set_trust(ff.root_public_key(), 2, [HW], PEOPLE[0], 1)
        _CORE = ota.OtaCore(engine)
    return _CORE


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.text(max_size=80),
                     st.binary(max_size=80), st.floats(allow_nan=False))
_near_valid = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, 2, "1"]),
     "op": st.sampled_from(["hello", "report", "chunk", "page", "offer", "nope", 7])},
    optional={"hw": st.one_of(st.just(HW), _scalars), "ver": st.one_of(st.just("1.0.0"), _scalars),
              "site": st.one_of(st.just("site-0"), _scalars),
              "st": st.one_of(st.sampled_from(rp.REPORTS), _scalars), "why": _scalars,
              "seq": st.one_of(st.integers(0, 10), _scalars), "ref": st.one_of(st.just(GOOD), _scalars),
              "i": st.one_of(st.integers(0, 500), _scalars), "extra": _scalars})
_topics = st.one_of(st.just("t/acme/fuzz-1/ota"), st.just("t/acme/fuzz-1/update"), st.text(max_size=40),
                    st.sampled_from(["t//x/ota", "t/a/b/c/ota", "ota", "t/acme/fuzz-2/ota"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=_topics, payload=st.one_of(st.binary(max_size=700), _near_valid.map(cbor.dumps)))
def test_any_message_is_handled_or_refused_never_a_crash(topic, payload):
    core = fuzz_core()
    refused = core.counts["refused"]
    out = core.on_message(topic, payload, 1_800_000_000_000)
    assert isinstance(out, list)
    for t, p in out:
        assert t.startswith("t/") and t.endswith("/update") and isinstance(p, bytes)
        op, fields = ota.parse(p, wire.DOWN, wire.DOWN_BYTES_MAX)     # what we send parses strictly
        if op == "error":
            assert core.counts["refused"] == refused + 1 and core.refusals[-1]["code"] == fields["why"]
    if core.counts["refused"] > refused:
        assert core.refusals[-1]["code"] and core.refusals[-1]["code"] != "ota"


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=5000), _near_valid.map(cbor.dumps)))
def test_device_side_parse_accepts_or_refuses_with_a_code(payload):
    try:
        op, fields = ota.parse(payload, wire.DOWN, wire.DOWN_BYTES_MAX)
    except ota.OtaError as e:
        assert e.code in ("too_big", "not_cbor", "not_a_map", "bad_version", "unknown_op", "unknown_field",
                          "missing_field", "bad_field", "bad_payload")
    else:
        assert op in wire.DOWN and set(fields) == set(wire.DOWN[op])


def test_messages_round_trip_and_are_deterministic():
    for op, fields in (("hello", {"hw": HW, "ver": "1.0.0", "site": "site-1"}),
                       ("report", {"st": "trial", "why": "", "seq": 3, "ref": GOOD}),
                       ("chunk", {"ref": GOOD, "i": 2}), ("page", {"ref": GOOD, "i": 1})):
        data = ota.encode(op, **fields)
        assert ota.parse(data, wire.UP, wire.UP_BYTES_MAX) == (op, fields)
        assert data == ota.encode(op, **dict(reversed(list(fields.items()))))
    big = ota.encode("chunk", ref=GOOD, i=0, data=b"x" * 4096)
    assert ota.parse(big, wire.DOWN, wire.DOWN_BYTES_MAX)[1]["data"] == b"x" * 4096
    with pytest.raises(ota.OtaError) as e:
        ota.parse(ota.encode("chunk", ref=GOOD, i=0, data=b"x" * 4097), wire.DOWN, wire.DOWN_BYTES_MAX)
    assert e.value.code == "bad_field"
