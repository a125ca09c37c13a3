"""cloud.ingest and cloud.limits: verdicts, dead letters, dedupe, gaps,
rate limits, group commit; Hypothesis over delivery orders; fuzz."""

import asyncio
import os
import tempfile
import threading

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.errors import IngestError
from cloud.ingest import REASONS, AsyncIngest, Ingest, IngestClosed
from cloud.limits import Limits, TokenBuckets
from cloud.store import Store

TENANT, DEVICE = "acme", "dev1"
IDENTITY = TENANT + "/" + DEVICE
TOPIC = "t/%s/telemetry" % IDENTITY


class Clock:
    def __init__(self, now_ms=1_700_000_000_000):
        self.now_ms = now_ms

    def __call__(self):
        return self.now_ms


def record(seq, e=0, device=DEVICE, r=None, **fields):
    m = {"v": 1, "k": "t", "d": device, "e": e, "s": seq,
         "ts": 1_700_000_000_000 + seq, "r": {"temp": 21.5, "n": seq} if r is None else r}
    m.update(fields)
    return m


def drop(s, e, de, a, b, n=None, device=DEVICE):
    return {"v": 1, "k": "drop", "d": device, "e": e, "s": s, "ts": 1,
            "de": de, "a": a, "b": b, "n": b - a + 1 if n is None else n}


def enc(m):
    return cbor2.dumps(m, canonical=True)


class Rig:
    """A store file plus an ingest on it; `reopen()` simulates a restart."""

    def __init__(self, path, limits=None, batch_max=512, synchronous="FULL"):
        self.path, self.limits, self.batch_max = path, limits, batch_max
        self.synchronous = synchronous
        self.clock = Clock()
        self._open()

    def _open(self):
        self.store = Store(self.path, synchronous=self.synchronous)
        self.ingest = Ingest(self.store, self.clock, limits=self.limits,
                             batch_max=self.batch_max)

    def reopen(self):
        self.ingest.flush()
        self.store.close()
        self._open()

    def send(self, m, identity=IDENTITY, topic=TOPIC):
        payload = m if isinstance(m, bytes) else enc(m)
        return self.ingest.accept(identity, topic, payload)

    def view(self, tenant=TENANT):
        self.ingest.flush()
        return self.store.tenant(tenant)

    def gaps(self, tenant=TENANT, device=DEVICE):
        return [(g["epoch"], g["first_seq"], g["last_seq"], g["kind"])
                for g in self.view(tenant).missing(device)]

    def seqs(self, tenant=TENANT, device=DEVICE):
        return [(r["epoch"], r["seq"]) for r in self.view(tenant).telemetry(device)]


@pytest.fixture
def rig(tmp_path):
    r = Rig(str(tmp_path / "ingest.db"))
    yield r
    r.store.close()


# -- verdicts and dead letters ------------------------------------------------

VALID = enc(record(0))
BIG = enc(record(0, r={"k%02d" % i + "x" * 29: 1.1 for i in range(32)}))  # > 1024 bytes


def with_header(payload, header):
    return bytes([header]) + payload[1:]


HOSTILE = [
    # (name, payload, reason)
    ("empty", b"", "malformed_cbor"),
    ("lone break", b"\xff", "malformed_cbor"),
    ("truncated", VALID[:-1], "malformed_cbor"),
    ("truncated head", b"\xa1\x61v\x19\x01", "malformed_cbor"),
    ("reserved info", b"\xa1\x61v\x1c", "malformed_cbor"),
    ("indefinite map", b"\xbf" + VALID[1:] + b"\xff", "malformed_cbor"),
    ("indefinite text", b"\xa1\x7f\x61v\xff\x01", "malformed_cbor"),
    ("duplicate key", with_header(VALID, VALID[0] + 1) + b"\x61v\x01", "malformed_cbor"),
    ("invalid utf-8", VALID.replace(b"\x64dev1", b"\x64de\xff1"), "malformed_cbor"),
    ("bad simple", b"\xa1\x61v\xf8\x01", "malformed_cbor"),
    ("huge length", b"\x5b" + b"\xff" * 8, "malformed_cbor"),
    ("trailing byte", VALID + b"\x00", "not_a_map"),
    ("two maps", VALID + VALID, "not_a_map"),
    ("tag 55799 around", enc(cbor2.CBORTag(55799, record(0))), "not_a_map"),
    ("bignum seq", enc(record(0, s=cbor2.CBORTag(2, b"\x05"))), "not_a_map"),
    ("datetime ts", b"\xa1\x62ts\xc1\x01", "not_a_map"),
    ("array", enc([1, 2]), "not_a_map"),
    ("int", enc(7), "not_a_map"),
    ("text", enc("hello"), "not_a_map"),
    ("null", b"\xf6", "not_a_map"),
    ("unknown key", enc(record(0, x=1)), "bad_schema"),
    ("int key", enc({**record(0), 1: 1}), "bad_schema"),
    ("missing s", enc({k: v for k, v in record(0).items() if k != "s"}), "bad_schema"),
    ("missing k", enc({k: v for k, v in record(0).items() if k != "k"}), "bad_schema"),
    ("missing v", enc({k: v for k, v in record(0).items() if k != "v"}), "bad_schema"),
    ("r in drop", enc({**drop(5, 0, 0, 1, 2), "r": {}}), "bad_schema"),
    ("de in t", enc(record(0, de=0)), "bad_schema"),
    ("drop without n", enc({k: v for k, v in drop(5, 0, 0, 1, 2).items() if k != "n"}),
     "bad_schema"),
    ("text seq", enc(record(0, s="1")), "bad_type"),
    ("float seq", enc(record(0, s=1.0)), "bad_type"),
    ("bool seq", enc(record(0, s=True)), "bad_type"),
    ("null epoch", enc(record(0, e=None)), "bad_type"),
    ("bytes device", enc(record(0, d=b"dev1")), "bad_type"),
    ("int kind", enc(record(0, k=1)), "bad_type"),
    ("float version", enc(record(0, v=1.0)), "bad_type"),
    ("readings array", enc(record(0, r=[1])), "bad_type"),
    ("reading text", enc(record(0, r={"x": "hot"})), "bad_type"),
    ("reading bool", enc(record(0, r={"x": True})), "bad_type"),
    ("reading null", enc(record(0, r={"x": None})), "bad_type"),
    ("reading bytes", enc(record(0, r={"x": b"1"})), "bad_type"),
    ("reading int key", enc(record(0, r={1: 1})), "bad_type"),
    ("reading nested", enc(record(0, r={"x": [[1]]})), "bad_type"),
    ("reading list", enc(record(0, r={"x": [1]})), "bad_type"),
    ("negative seq", enc(record(0, s=-1)), "out_of_range"),
    ("huge seq", enc(record(0, s=2 ** 32)), "out_of_range"),
    ("max cbor seq", enc(record(0, s=2 ** 64 - 1)), "out_of_range"),
    ("huge epoch", enc(record(0, e=2 ** 32)), "out_of_range"),
    ("huge ts", enc(record(0, ts=2 ** 63)), "out_of_range"),
    ("negative ts", enc(record(0, ts=-5)), "out_of_range"),
    ("version 2", enc(record(0, v=2)), "out_of_range"),
    ("version 0", enc(record(0, v=0)), "out_of_range"),
    ("kind x", enc(record(0, k="x")), "out_of_range"),
    ("nan", enc(record(0, r={"x": float("nan")})), "out_of_range"),
    ("inf", enc(record(0, r={"x": float("inf")})), "out_of_range"),
    ("-inf", enc(record(0, r={"x": float("-inf")})), "out_of_range"),
    ("33 readings", enc(record(0, r={"k%d" % i: i for i in range(33)})), "out_of_range"),
    ("long key", enc(record(0, r={"k" * 33: 1})), "out_of_range"),
    ("empty key", enc(record(0, r={"": 1})), "out_of_range"),
    ("drop a > b", enc(drop(9, 1, 0, 5, 4, n=0)), "out_of_range"),
    ("drop n over range", enc(drop(9, 1, 0, 1, 4, n=5)), "out_of_range"),
    ("drop n zero", enc(drop(9, 1, 0, 1, 4, n=0)), "out_of_range"),
    ("drop n zero single", enc(drop(9, 1, 0, 4, 4, n=0)), "out_of_range"),
    ("drop n huge", enc(drop(9, 1, 0, 0, 0, n=2 ** 32 - 1)), "out_of_range"),
    ("drop future epoch", enc(drop(9, 1, 2, 1, 4)), "out_of_range"),
    ("drop covers itself", enc(drop(3, 1, 1, 1, 4)), "out_of_range"),
    ("drop counts its own seq", enc(drop(3, 1, 1, 2, 6, n=5)), "out_of_range"),
    ("drop huge b", enc(drop(3, 1, 0, 1, 2 ** 32)), "out_of_range"),
    ("oversized", b"\x00" * 1025, "oversized"),
    ("oversized valid", BIG, "oversized"),
    ("other device", enc(record(0, device="dev2")), "identity_mismatch"),
    ("device case", enc(record(0, device="DEV1")), "identity_mismatch"),
]


def test_drop_range_may_reach_past_its_own_seq(rig):
    """The device widens an unpublished drop record as it drops later records
    of its epoch, so the range can hold its own seq and seqs after it."""
    assert rig.send(enc(drop(3, 1, 1, 0, 6, n=5))) == "stored"


@pytest.mark.parametrize("name,payload,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_payload_is_dead_lettered(rig, name, payload, reason):
    assert rig.send(payload) == "dead_letter:" + reason
    (dl,) = rig.view().dead_letters()
    assert dl["payload"] == payload  # byte for byte
    assert (dl["reason"], dl["tenant"]) == (reason, TENANT)
    assert (dl["identity"], dl["topic"]) == (IDENTITY, TOPIC)
    assert dl["detail"] and dl["received_ms"] == rig.clock.now_ms
    assert rig.view().count_telemetry() == 0
    stats = rig.ingest.stats()
    assert stats["dead_lettered"] == 1
    assert stats["dead_lettered_by_reason"] == {reason: 1}
    assert stats["stored"] == 0


def test_every_reason_code_is_covered():
    covered = ({h[2] for h in HOSTILE} | {c[3] for c in CONFLICTS}
               | {"topic_mismatch", "rate_limited"})
    assert covered == set(REASONS)


def test_valid_records_are_stored(rig):
    assert rig.send(record(0)) == "stored"
    assert rig.send(drop(1, 0, 0, 5, 6) | {"s": 9}) == "stored"
    assert rig.send(record(1, r={})) == "stored"
    assert rig.send(record(2, r={"k" * 32: -(2 ** 64), "h": 0.5})) == "stored"
    assert len(enc(record(3, r={"k%02d" % i: 1.1 for i in range(32)}))) <= 1024
    assert rig.send(record(3, r={"k%02d" % i: 1.1 for i in range(32)})) == "stored"
    assert rig.send(drop(20, 0, 0, 10, 19, n=1)) == "stored"    # a range with holes
    assert rig.send(drop(21, 0, 0, 11, 18, n=7)) == "stored"
    row = rig.view().get(DEVICE, 0, 9)
    assert row["kind"] == "drop"
    assert row["readings"] == {"de": 0, "a": 5, "b": 6, "n": 2}
    assert rig.view().get(DEVICE, 0, 20)["readings"] == {"de": 0, "a": 10, "b": 19, "n": 1}
    assert rig.ingest.stats()["declared_drops"] == 2 + 1 + 7
    assert rig.view().get(DEVICE, 0, 2)["readings"] == {"k" * 32: -(2 ** 64), "h": 0.5}


def test_every_prefix_of_a_valid_record_is_malformed(rig):
    for cut in range(len(VALID)):
        assert rig.send(VALID[:cut]) == "dead_letter:malformed_cbor", cut
    assert rig.send(VALID) == "stored"


@pytest.mark.parametrize("identity", [
    "acme", "acme/", "/dev1", "acme/dev1/x", "ac me/dev1", "acme/dev 1",
    "a" * 33 + "/dev1", "acme/" + "d" * 65, "$cloud/ingest", "acme' OR '1'='1/dev1",
    "", None, b"acme/dev1"])
def test_unparseable_identity_is_unattributed(rig, identity):
    topic = "t/%s/telemetry" % (identity,)
    assert rig.ingest.accept(identity, topic, VALID) == "dead_letter:identity_mismatch"
    rig.ingest.flush()
    (dl,) = rig.store.unattributed_dead_letters()
    assert dl["tenant"] is None and dl["payload"] == VALID
    assert rig.view().dead_letters() == []


@pytest.mark.parametrize("topic", [
    "t/acme/dev1/telemetry/", "t/acme/dev1/cmd", "t/acme/dev2/telemetry",
    "t/other/dev1/telemetry", "t/acme/+/telemetry", "t/#", "T/acme/dev1/telemetry",
    "t/acme/dev1/telemetry\x00", "", None])
def test_wrong_topic_is_dead_lettered_under_the_publisher(rig, topic):
    assert rig.ingest.accept(IDENTITY, topic, VALID) == "dead_letter:topic_mismatch"
    (dl,) = rig.view().dead_letters()
    assert dl["payload"] == VALID and dl["reason"] == "topic_mismatch"
    assert rig.view("other").dead_letters() == []
    assert rig.view("other").count_telemetry() == 0


def test_other_tenants_topic_cannot_inject(rig):
    # tenant "evil" publishes a record naming acme's device on acme's topic
    assert rig.send(record(0), identity="evil/dev1") == "dead_letter:topic_mismatch"
    assert rig.send(record(0), identity="evil/dev1",
                    topic="t/evil/dev1/telemetry") == "stored"
    assert rig.view(TENANT).count_telemetry() == 0
    assert rig.view(TENANT).dead_letters() == []
    assert rig.view("evil").count_telemetry() == 1
    assert len(rig.view("evil").dead_letters()) == 1


def test_surrogates_in_topic_do_not_break_the_batch(rig):
    assert rig.send(record(0)) == "stored"
    assert rig.ingest.accept(IDENTITY, "t/\udcff", VALID) == "dead_letter:topic_mismatch"
    assert rig.seqs() == [(0, 0)]
    assert rig.view().dead_letters()[0]["topic"] == "t/\\udcff"


def test_payload_must_be_bytes(rig):
    with pytest.raises(TypeError):
        rig.ingest.accept(IDENTITY, TOPIC, "not bytes")
    assert rig.ingest.accept(IDENTITY, TOPIC, bytearray(VALID)) == "stored"
    assert rig.ingest.accept(IDENTITY, TOPIC, memoryview(VALID)) == "duplicate"


# -- duplicates ---------------------------------------------------------------

def test_duplicate_in_pending_batch(rig):
    assert rig.send(record(0)) == "stored"
    assert rig.send(record(0)) == "duplicate"
    assert rig.view().count_telemetry() == 1
    assert rig.view().get(DEVICE, 0, 0)["readings"]["temp"] == 21.5
    stats = rig.ingest.stats()
    assert (stats["stored"], stats["duplicates_dropped"], stats["dead_lettered"]) == (1, 1, 0)


def test_identical_content_in_another_encoding_is_a_duplicate(rig):
    assert rig.send(record(0, r={"x": 0.5})) == "stored"
    half = b"\xf9\x38\x00"                     # 0.5 as float16 (preferred)
    as_float64 = enc(record(0, r={"x": 0.5})).replace(half, bytes.fromhex("fb3fe0000000000000"))
    assert as_float64 != enc(record(0, r={"x": 0.5}))
    assert rig.send(as_float64) == "duplicate"
    rig.reopen()
    assert rig.send(as_float64) == "duplicate"
    assert rig.ingest.stats()["duplicates_dropped"] == 2


# -- conflicts: same (epoch, seq), other content --------------------------------

CONFLICTS = [
    # (name, first, second, reason): second is sent after first, same key
    ("readings differ", record(0), record(0, r={"other": 1}), "conflict"),
    ("one reading differs", record(0, r={"x": 1}), record(0, r={"x": 2}), "conflict"),
    ("int vs float", record(0, r={"x": 1}), record(0, r={"x": 1.0}), "conflict"),
    ("zero vs minus zero", record(0, r={"x": 0.0}), record(0, r={"x": -0.0}), "conflict"),
    ("extra reading", record(0, r={"x": 1}), record(0, r={"x": 1, "y": 2}), "conflict"),
    ("ts differs", record(0), record(0, ts=5), "conflict"),
    ("drop n differs", drop(5, 0, 0, 1, 4), drop(5, 0, 0, 1, 4, n=2), "conflict"),
    ("drop b differs", drop(5, 0, 0, 1, 4), drop(5, 0, 0, 1, 3), "conflict"),
    ("drop de differs", drop(5, 1, 0, 1, 4), drop(5, 1, 1, 1, 4), "conflict"),
    ("t then drop", record(5), drop(5, 0, 0, 1, 4), "conflict"),
    ("drop then t", drop(5, 0, 0, 1, 4), record(5), "conflict"),
]


@pytest.mark.parametrize("when", ["pending", "flushed", "reopened"])
@pytest.mark.parametrize("name,first,second,reason", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_same_key_other_content_is_a_conflict(rig, name, first, second, reason, when):
    assert rig.send(first) == "stored"
    if when == "flushed":
        rig.ingest.flush()
    elif when == "reopened":
        rig.reopen()
    assert rig.send(second) == "dead_letter:" + reason
    assert rig.send(first) == "duplicate"       # the first stays the record
    assert rig.send(second) == "dead_letter:" + reason
    (row,) = rig.view().telemetry()
    assert (row["epoch"], row["seq"]) == (first["e"], first["s"])
    assert row["kind"] == first["k"]
    assert row["readings"] == (first["r"] if first["k"] == "t" else
                               {k: first[k] for k in ("de", "a", "b", "n")})
    dead = rig.view().dead_letters()
    assert [d["payload"] for d in dead] == [enc(second)] * 2
    assert all(d["reason"] == reason and d["tenant"] == TENANT for d in dead)
    assert "e %d s %d" % (second["e"], second["s"]) in dead[0]["detail"]
    assert "other content" in dead[0]["detail"]
    stats = rig.ingest.stats()
    assert (stats["stored"], stats["duplicates_dropped"], stats["dead_lettered"]) == (1, 1, 2)
    assert stats["dead_lettered_by_reason"] == {reason: 2}
    if first["k"] == "drop":  # the conflicting drop record declares nothing
        assert stats["declared_drops"] == first["n"]


def test_conflict_detail_names_what_differs(rig):
    rig.send(record(0))
    rig.send(record(0, ts=5, r={"y": 1}))
    rig.send(record(0, ts=5))
    rig.send(drop(1, 1, 0, 1, 1))
    rig.send(drop(1, 1, 0, 1, 1, n=1) | {"a": 0})
    rig.send(record(1, e=1))
    details = [d["detail"] for d in rig.view().dead_letters()]
    assert details == [
        "e 0 s 0 is already stored with other content (ts, r differs): (e, s) reused",
        "e 0 s 0 is already stored with other content (ts differs): (e, s) reused",
        "e 1 s 1 is already stored with other content (de/a/b/n differs): (e, s) reused",
        "e 1 s 1 is already stored with other content (k differs): (e, s) reused",
    ]


def test_drop_record_ts_is_not_content(rig):
    assert rig.send(drop(5, 0, 0, 1, 4)) == "stored"
    assert rig.send(drop(5, 0, 0, 1, 4) | {"ts": 99}) == "duplicate"
    rig.reopen()
    assert rig.send(drop(5, 0, 0, 1, 4) | {"ts": 99}) == "duplicate"
    assert rig.ingest.stats()["declared_drops"] == 4


def test_conflict_spends_no_token_and_is_found_across_batches(tmp_path):
    r = Rig(str(tmp_path / "k.db"), limits=Limits(
        device_rate_per_s=1, device_burst=2, tenant_rate_per_s=100, tenant_burst=100),
        batch_max=2)
    assert [r.send(record(s)) for s in (0, 1)] == ["stored"] * 2   # auto flush
    for _ in range(5):
        assert r.send(record(0, r={"x": 1})) == "dead_letter:conflict"
        assert r.send(record(1)) == "duplicate"
    r.clock.now_ms += 1000
    assert r.send(record(2)) == "stored"    # a token refilled, none spent above
    assert r.ingest.stats()["dead_lettered_by_reason"] == {"conflict": 5}
    r.store.close()


def test_duplicate_across_flush_and_reopen(rig):
    for s in range(3):
        rig.send(record(s))
    rig.ingest.flush()
    assert rig.send(record(1)) == "duplicate"
    rig.reopen()
    assert [rig.send(record(s)) for s in range(4)] == ["duplicate"] * 3 + ["stored"]
    assert rig.seqs() == [(0, s) for s in range(4)]
    stats = rig.ingest.stats()
    assert (stats["stored"], stats["duplicates_dropped"]) == (4, 4)


def test_same_seq_in_other_epoch_or_device_is_not_duplicate(rig):
    assert rig.send(record(0, e=0)) == "stored"
    assert rig.send(record(0, e=1)) == "stored"
    assert rig.send(record(0, device="dev2"), identity="acme/dev2",
                    topic="t/acme/dev2/telemetry") == "stored"
    assert rig.send(record(0, device="dev1"), identity="beta/dev1",
                    topic="t/beta/dev1/telemetry") == "stored"


def test_auto_flush_at_batch_max(tmp_path):
    r = Rig(str(tmp_path / "b.db"), batch_max=3)
    other = Store(r.path)
    for s in range(7):
        r.send(record(s))
    assert other.tenant(TENANT).count_telemetry() == 6  # two full batches
    r.ingest.flush()
    assert other.tenant(TENANT).count_telemetry() == 7
    other.close()
    r.store.close()


# -- gaps ---------------------------------------------------------------------

def test_silent_hole_opened_then_filled(rig):
    for s in (0, 3):
        rig.send(record(s))
    assert rig.gaps() == [(0, 1, 2, "silent")]
    assert rig.ingest.stats()["silent_gaps"] == 1
    assert rig.ingest.stats()["silent_missing"] == 2
    rig.send(record(2))
    assert rig.gaps() == [(0, 1, 1, "silent")]
    rig.clock.now_ms += 5000
    rig.send(record(1))
    assert rig.gaps() == []
    (closed,) = rig.view().missing(DEVICE, include_closed=True)
    assert closed["closed_ms"] == rig.clock.now_ms
    assert closed["opened_ms"] == rig.clock.now_ms - 5000
    assert (rig.ingest.stats()["silent_gaps"], rig.ingest.stats()["silent_missing"]) == (0, 0)


def test_fill_in_the_middle_splits(rig):
    for s in (0, 10, 5):
        rig.send(record(s))
    assert rig.gaps() == [(0, 1, 4, "silent"), (0, 6, 9, "silent")]
    assert rig.ingest.stats()["silent_missing"] == 8


def test_hole_healed_within_one_batch_leaves_no_row(rig):
    for s in (0, 2, 1):
        rig.send(record(s))
    assert rig.view().missing(DEVICE, include_closed=True) == []


def test_first_record_not_at_zero(rig):
    rig.send(record(4, e=2))
    assert rig.gaps() == [(2, 0, 3, "silent")]


def test_declared_drop_after_the_hole(rig):
    for s in (0, 5):
        rig.send(record(s))
    assert rig.send(drop(6, 0, 0, 1, 4)) == "stored"
    assert rig.gaps() == [(0, 1, 4, "declared")]
    stats = rig.ingest.stats()
    assert (stats["silent_gaps"], stats["declared_gaps"]) == (0, 1)
    assert (stats["declared_drops"], stats["declared_missing"]) == (4, 4)


def test_declared_drop_before_neighbours(rig):
    assert rig.send(drop(5, 0, 0, 2, 4)) == "stored"
    assert rig.gaps() == [(0, 0, 1, "silent"), (0, 2, 4, "declared")]
    rig.send(record(1))
    rig.send(record(0))
    assert rig.gaps() == [(0, 2, 4, "declared")]
    rig.send(record(6))
    assert rig.gaps() == [(0, 2, 4, "declared")]


def test_declared_drop_partly_inside_a_silent_hole(rig):
    for s in (0, 10):
        rig.send(record(s))
    rig.send(drop(11, 0, 0, 3, 5))
    assert rig.gaps() == [(0, 1, 2, "silent"), (0, 3, 5, "declared"),
                          (0, 6, 9, "silent")]


def test_declared_range_skips_stored_seqs(rig):
    for s in (0, 2, 5):
        rig.send(record(s))
    rig.send(drop(6, 0, 0, 1, 4))
    assert rig.seqs() == [(0, 0), (0, 2), (0, 5), (0, 6)]
    assert rig.gaps() == [(0, 1, 1, "declared"), (0, 3, 4, "declared")]


def test_drop_covering_older_epoch(rig):
    for s in (0, 1):
        rig.send(record(s, e=0))
    assert rig.send(drop(0, 1, 0, 2, 6)) == "stored"
    assert rig.gaps() == [(0, 2, 6, "declared")]
    rig.send(record(7, e=0))  # late straggler of epoch 0: contiguous
    assert rig.gaps() == [(0, 2, 6, "declared")]


def test_drop_for_an_epoch_never_seen(rig):
    rig.send(drop(0, 5, 3, 2, 4))
    assert rig.gaps() == [(3, 0, 1, "silent"), (3, 2, 4, "declared")]


def test_late_record_inside_declared_range(rig):
    rig.send(record(0))
    rig.send(drop(4, 0, 0, 1, 3))
    assert rig.send(record(2)) == "stored"
    assert rig.gaps() == [(0, 1, 1, "declared"), (0, 3, 3, "declared")]


def test_drop_range_with_holes_declares_range_minus_stored(rig):
    # dropped: 1 and 4; 2 and 3 were acknowledged before the drop record
    for s in (0, 2, 3):
        rig.send(record(s))
    assert rig.send(drop(5, 0, 0, 1, 4, n=2)) == "stored"
    assert rig.gaps() == [(0, 1, 1, "declared"), (0, 4, 4, "declared")]
    stats = rig.ingest.stats()
    assert (stats["declared_drops"], stats["declared_missing"]) == (2, 2)


def test_holes_of_a_drop_range_close_when_their_records_arrive(rig):
    # dropped: 1 and 4; 2 and 3 were still queued when the drop record left
    rig.send(record(0))
    assert rig.send(drop(5, 0, 0, 1, 4, n=2)) == "stored"
    assert rig.gaps() == [(0, 1, 4, "declared")]
    assert rig.send(record(3)) == "stored"
    rig.reopen()
    assert rig.send(record(2)) == "stored"
    assert rig.gaps() == [(0, 1, 1, "declared"), (0, 4, 4, "declared")]
    stats = rig.ingest.stats()
    assert (stats["declared_drops"], stats["declared_missing"]) == (2, 2)
    assert (stats["silent_gaps"], stats["dead_lettered"]) == (0, 0)


def test_drop_range_holding_another_drop_record(rig):
    # epoch 0: 0 sent, 1 and 2 dropped. Epoch 1: 0 sent, 1 dropped, 2 the
    # drop record for epoch 0, 3 dropped, 4 the drop record for 1 and 3,
    # whose range 1..3 holds seq 2. The drop record at 4 arrives first.
    assert rig.send(record(0, e=0)) == "stored"
    assert rig.send(record(0, e=1)) == "stored"
    assert rig.send(drop(4, 1, 1, 1, 3, n=2)) == "stored"
    assert rig.gaps() == [(1, 1, 3, "declared")]
    assert rig.send(drop(2, 1, 0, 1, 2)) == "stored"
    assert rig.gaps() == [(0, 1, 2, "declared"), (1, 1, 1, "declared"),
                          (1, 3, 3, "declared")]
    stats = rig.ingest.stats()
    assert (stats["declared_drops"], stats["declared_missing"]) == (4, 4)
    assert stats["silent_missing"] == 0


def test_overlapping_drop_ranges(rig):
    # dropped 1, 2, 4, 5 declared as {1, 4} and {2, 5}; 3 arrives last
    rig.send(record(0))
    assert rig.send(drop(6, 0, 0, 1, 4, n=2)) == "stored"
    assert rig.send(drop(7, 0, 0, 2, 5, n=2)) == "stored"
    assert rig.gaps() == [(0, 1, 4, "declared"), (0, 5, 5, "declared")]
    assert rig.send(record(3)) == "stored"
    assert rig.gaps() == [(0, 1, 2, "declared"), (0, 4, 4, "declared"),
                          (0, 5, 5, "declared")]
    stats = rig.ingest.stats()
    assert (stats["declared_drops"], stats["declared_missing"]) == (4, 4)


def test_repeated_drop_record_counts_once(rig):
    rig.send(record(0))
    assert rig.send(drop(4, 0, 0, 1, 3)) == "stored"
    assert rig.send(drop(4, 0, 0, 1, 3)) == "duplicate"
    assert rig.ingest.stats()["declared_drops"] == 3


def test_gap_state_survives_restart(rig):
    for s in (0, 5):
        rig.send(record(s))
    assert rig.send(drop(3, 1, 1, 1, 2)) == "stored"
    rig.reopen()
    rig.send(record(3))
    assert rig.gaps() == [(0, 1, 2, "silent"), (0, 4, 4, "silent"),
                          (1, 0, 0, "silent"), (1, 1, 2, "declared")]
    rig.reopen()
    rig.send(record(6))  # contiguous with 5 after restart: no new hole
    rig.send(record(0, e=1))
    assert rig.gaps() == [(0, 1, 2, "silent"), (0, 4, 4, "silent"),
                          (1, 1, 2, "declared")]
    assert rig.send(record(5)) == "duplicate"


def test_open_ranges_per_stream_are_bounded(tmp_path):
    r = Rig(str(tmp_path / "g.db"))
    r.ingest = Ingest(r.store, r.clock, gaps_per_stream_max=3)
    for s in (0, 2, 4, 6):
        assert r.send(record(s)) == "stored"
    assert r.send(record(8)) == "dead_letter:out_of_range"
    assert r.send(record(7)) == "stored"  # no new range needed
    assert r.send(record(1)) == "stored"  # closes one
    assert r.send(record(9)) == "stored"
    assert r.view().dead_letters()[0]["detail"] == "too many open missing ranges"
    r.store.close()


def test_stream_cache_is_bounded_and_reloads(tmp_path):
    r = Rig(str(tmp_path / "c.db"))
    r.ingest = Ingest(r.store, r.clock, streams_max=2)
    for e in range(5):
        r.send(record(0, e=e))
        r.send(record(3, e=e))
        r.ingest.flush()
    assert len(r.ingest._streams) == 2
    assert [r.send(record(3, e=e)) for e in range(5)] == ["duplicate"] * 5
    assert [r.send(record(1, e=e)) for e in range(5)] == ["stored"] * 5
    assert r.gaps() == [(e, 2, 2, "silent") for e in range(5)]
    r.store.close()


def test_failed_commit_loses_batch_and_reloads_state(rig, monkeypatch):
    rig.send(record(0))
    rig.ingest.flush()
    rig.send(record(5))

    def broken(batch):
        raise OSError("disk full")
    monkeypatch.setattr(rig.store, "write_batch", broken)
    with pytest.raises(OSError):
        rig.ingest.flush()
    monkeypatch.undo()
    assert rig.send(record(5)) == "stored"  # not a duplicate: it was never committed
    assert rig.gaps() == [(0, 1, 4, "silent")]


# -- rate limits --------------------------------------------------------------

def limited_rig(tmp_path, **kw):
    limits = Limits(**{"device_rate_per_s": 1, "device_burst": 3,
                       "tenant_rate_per_s": 100, "tenant_burst": 100, **kw})
    return Rig(str(tmp_path / "l.db"), limits=limits)


def test_device_rate_limit(tmp_path):
    r = limited_rig(tmp_path)
    verdicts = [r.send(record(s)) for s in range(5)]
    assert verdicts == ["stored"] * 3 + ["dead_letter:rate_limited"] * 2
    other = r.send(record(0, device="dev2"), identity="acme/dev2",
                   topic="t/acme/dev2/telemetry")
    assert other == "stored"  # another device has its own bucket
    r.clock.now_ms += 1000
    assert r.send(record(3)) == "stored"
    assert r.send(record(4)) == "dead_letter:rate_limited"
    r.clock.now_ms += 2000
    assert r.send(record(5)) == "stored"
    assert r.gaps() == [(0, 4, 4, "silent")]  # rate-limited means missing
    dead = r.view().dead_letters()
    assert [d["reason"] for d in dead] == ["rate_limited"] * 3
    assert dead[0]["payload"] == enc(record(3))
    r.store.close()


def test_duplicates_spend_no_tokens(tmp_path):
    r = limited_rig(tmp_path)
    for _ in range(10):
        assert r.send(record(0)) in ("stored", "duplicate")
    assert [r.send(record(s)) for s in (1, 2)] == ["stored", "stored"]
    r.store.close()


def test_tenant_rate_limit(tmp_path):
    r = limited_rig(tmp_path, device_burst=100, tenant_rate_per_s=2, tenant_burst=4)
    verdicts = []
    for i in range(6):
        dev = "dev%d" % (i % 3)
        verdicts.append(r.send(record(i, device=dev), identity="acme/" + dev,
                               topic="t/acme/%s/telemetry" % dev))
    assert verdicts == ["stored"] * 4 + ["dead_letter:rate_limited"] * 2
    assert r.send(record(0, device="d"), identity="beta/d",
                  topic="t/beta/d/telemetry") == "stored"
    r.clock.now_ms += 500
    assert r.send(record(9, device="dev0"), identity="acme/dev0",
                  topic="t/acme/dev0/telemetry") == "stored"
    assert r.ingest.stats()["dead_lettered_by_reason"] == {"rate_limited": 2}
    r.store.close()


def test_token_bucket_refill_cap_and_clock_going_back():
    b = TokenBuckets(rate_per_s=10, burst=2, max_buckets=10)
    assert [b.take("k", 0) for _ in range(3)] == [True, True, False]
    assert b.take("k", 100)          # 100 ms at 10/s = 1 token
    assert not b.take("k", 50)       # clock went back: no refill
    assert b.tokens("k", 10_000_000) == 2   # capped at burst


def test_token_buckets_are_bounded_lru():
    b = TokenBuckets(rate_per_s=1, burst=1, max_buckets=3)
    for key in "abc":
        assert b.take(key, 0)
    assert not b.take("a", 0)        # touch a: b is now least recent
    assert b.take("d", 0)            # evicts b
    assert len(b) == 3
    assert b.take("b", 0)            # b comes back with a full bucket
    assert not b.take("a", 0) and not b.take("d", 0)


def test_limits_refusal_spends_nothing():
    limits = Limits(device_rate_per_s=1, device_burst=5, tenant_rate_per_s=1,
                    tenant_burst=1, max_devices=10, max_tenants=10)
    assert limits.check("t", "d", 0) is None
    assert limits.check("t", "d", 0) == "tenant"
    assert limits.devices.tokens(("t", "d"), 0) == 4
    with pytest.raises(ValueError):
        TokenBuckets(rate_per_s=0, burst=1, max_buckets=1)


# -- Hypothesis: delivery orders ----------------------------------------------

@st.composite
def device_history(draw):
    """A device's records over 1..3 epochs. Each telemetry seq is delivered
    ('d'), lost ('l') or dropped by the device ('x'); every run of dropped
    seqs is declared by a drop record right after it (in the next epoch if
    the run ends one). A drop record may itself be lost."""
    fates = draw(st.lists(st.lists(st.sampled_from("ddddlx"), max_size=20),
                          min_size=1, max_size=3))
    records = []  # (key, map, delivered)
    run = None

    def emit_drop(epoch, seq):
        de, a, b = run
        lost = draw(st.integers(0, 4)) == 0
        records.append(((epoch, seq), drop(seq, epoch, de, a, b), not lost))

    for epoch, epoch_fates in enumerate(fates):
        seq = 0
        if run:
            emit_drop(epoch, seq)
            seq, run = seq + 1, None
        for fate in epoch_fates:
            if fate == "x":
                run = (epoch, run[1] if run else seq, seq)
            else:
                if run:
                    emit_drop(epoch, seq)
                    seq, run = seq + 1, None
                records.append(((epoch, seq), record(seq, e=epoch), fate == "d"))
            seq += 1
    if run:
        emit_drop(len(fates), 0)
    return records


@st.composite
def holey_history(draw, lossy=True, min_fates=0):
    """(records, dropped seqs) of a device whose drop records declare ranges
    with holes. Seqs are dropped in any order; a drop record declares some
    of the dropped, not yet declared seqs of one epoch, so its range a..b
    may hold records sent before or after it, other drop records and seqs
    that another drop record declares. The last epoch's leftovers are
    declared in one more epoch. min_fates: seqs per epoch at least (longer
    epochs make those overlaps likelier: with 6, about half the histories
    have a range with holes and a quarter a range holding another drop
    record). lossy: a record or drop record may be lost
    (then a seq inside a declared range can be lost too, as with a real
    network); otherwise every record that was not dropped arrives."""
    records = []
    undeclared = {}   # epoch -> dropped seqs that no drop record names yet
    dropped = set()

    def emit_drop(epoch, seq):
        de = draw(st.sampled_from(sorted(undeclared)))
        pool = undeclared[de]
        leave = len(pool) > 1 and epoch == de   # keep some for a later drop record
        picked = draw(st.lists(st.sampled_from(pool), min_size=1, unique=True,
                               max_size=len(pool) - leave))
        for x in picked:
            pool.remove(x)
        if not pool:
            del undeclared[de]
        lost = lossy and draw(st.integers(0, 4)) == 0
        records.append(((epoch, seq), drop(seq, epoch, de, min(picked), max(picked),
                                           n=len(picked)), not lost))

    epochs = draw(st.integers(1, 3))
    for epoch in range(epochs):
        fates = draw(st.lists(st.sampled_from("dddlxxD" if lossy else "ddxxD"),
                              min_size=min_fates, max_size=20))
        for seq, fate in enumerate(fates):
            if fate == "x":
                undeclared.setdefault(epoch, []).append(seq)
                dropped.add((epoch, seq))
            elif fate == "D" and undeclared:
                emit_drop(epoch, seq)
            else:
                records.append(((epoch, seq), record(seq, e=epoch), fate != "l"))
    seq = 0
    while undeclared:
        emit_drop(epochs, seq)
        seq += 1
    return records, dropped


def expected_state(records):
    delivered = [(key, m) for key, m, ok in records if ok]
    stored = {key for key, _ in delivered}
    declared = set()
    for _, m in delivered:
        if m["k"] == "drop":
            declared |= {(m["de"], s) for s in range(m["a"], m["b"] + 1)}
    declared -= stored  # a range's other seqs are records that arrived
    silent = set()
    for epoch in {e for e, _ in stored | declared}:
        top = max(s for e, s in stored | declared if e == epoch)
        silent |= {(epoch, s) for s in range(top + 1)} - stored - declared
    drops = sum(m["n"] for _, m in delivered if m["k"] == "drop")
    return delivered, stored, declared, silent, drops


def expand(gaps, kind):
    seqs = [(g["epoch"], s) for g in gaps if g["kind"] == kind
            for s in range(g["first_seq"], g["last_seq"] + 1)]
    assert len(seqs) == len(set(seqs)), "open ranges overlap"
    return set(seqs)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(history=device_history() | holey_history().map(lambda h: h[0]),
       data=st.data())
def test_any_delivery_order_gives_exact_store_and_gaps(history, data):
    deliver_in_any_order(history, data)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(history=holey_history(lossy=False, min_fates=6), data=st.data())
def test_drop_ranges_with_holes_end_with_only_dropped_seqs_declared(history, data):
    """Nothing lost: once everything arrived, in any order, exactly the
    dropped seqs are declared, none is silent, none stored is declared."""
    records, dropped = history
    stored, gaps, stats = deliver_in_any_order(records, data)
    assert expand(gaps, "declared") == dropped
    assert expand(gaps, "silent") == set()
    assert stats["declared_drops"] == stats["declared_missing"] == len(dropped)
    assert (stats["silent_gaps"], stats["silent_missing"]) == (0, 0)


def deliver_in_any_order(history, data):
    """Deliver `history` in a drawn order, with repeats, a drawn batch size
    and maybe a restart; check store, gaps and counters against
    expected_state. -> (stored keys, open gaps, stats)."""
    delivered, stored, declared, silent, drops = expected_state(history)
    extra = data.draw(st.lists(st.integers(0, max(len(delivered) - 1, 0)),
                               max_size=8)) if delivered else []
    order = data.draw(st.permutations(list(range(len(delivered))) + extra))
    batch_max = data.draw(st.integers(1, 8))
    reopen_at = data.draw(st.none() | st.integers(0, len(order)))
    with tempfile.TemporaryDirectory() as tmp:
        r = Rig(os.path.join(tmp, "h.db"), batch_max=batch_max,
                synchronous="NORMAL")
        seen = set()
        for i, index in enumerate(order):
            if i == reopen_at:
                r.reopen()
            key, m = delivered[index]
            verdict = r.send(m)
            assert verdict == ("duplicate" if key in seen else "stored")
            seen.add(key)
            r.clock.now_ms += 1
        assert set(r.seqs()) == stored
        assert r.view().count_telemetry() == len(stored)
        gaps = r.view().missing(DEVICE)
        assert expand(gaps, "silent") == silent
        assert expand(gaps, "declared") == declared
        assert not (expand(gaps, "declared") | expand(gaps, "silent")) & stored
        stats = r.ingest.stats()
        assert stats["stored"] == len(stored)
        assert stats["duplicates_dropped"] == len(order) - len(stored)
        assert stats["declared_drops"] == drops
        assert stats["silent_missing"] == len(silent)
        assert stats["declared_missing"] == len(declared)
        assert stats["dead_lettered"] == 0
        r.store.close()
    return stored, gaps, stats


# -- fuzz -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory):
    r = Rig(str(tmp_path_factory.mktemp("fuzz") / "f.db"), synchronous="NORMAL")
    yield r
    r.store.close()


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=1100))
def test_fuzz_arbitrary_bytes_are_dead_lettered(fuzz_rig, payload):
    verdict = fuzz_rig.ingest.accept(IDENTITY, TOPIC, payload)
    assert verdict.startswith("dead_letter:")
    assert verdict[len("dead_letter:"):] in REASONS


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.integers(0, 2 ** 32 - 1), edits=st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 255), st.sampled_from("sid")),
    min_size=1, max_size=4))
def test_fuzz_mutated_records_never_raise(fuzz_rig, seq, edits):
    payload = bytearray(enc(record(seq)))
    for pos, byte, op in edits:
        pos %= len(payload) + 1
        if op == "s" and pos < len(payload):
            payload[pos] = byte
        elif op == "i":
            payload.insert(pos, byte)
        elif op == "d" and pos < len(payload):
            del payload[pos]
    verdict = fuzz_rig.ingest.accept(IDENTITY, TOPIC, bytes(payload))
    assert verdict in ("stored", "duplicate") or (
        verdict.startswith("dead_letter:") and verdict[12:] in REASONS)
    fuzz_rig.ingest.flush()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.dictionaries(
    st.sampled_from(["v", "k", "d", "e", "s", "ts", "r", "de", "a", "b", "n", "x"]),
    st.recursive(st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64 - 1)
                 | st.floats() | st.text(max_size=5) | st.binary(max_size=5)
                 | st.sampled_from(["t", "drop", DEVICE, 1, 0]),
                 lambda kids: st.lists(kids, max_size=3)
                 | st.dictionaries(st.text(max_size=3), kids, max_size=3),
                 max_leaves=6)))
def test_fuzz_structured_maps_never_raise(fuzz_rig, m):
    verdict = fuzz_rig.ingest.accept(IDENTITY, TOPIC, enc(m))
    assert verdict in ("stored", "duplicate") or verdict[12:] in REASONS
    fuzz_rig.ingest.flush()


# -- group commit -------------------------------------------------------------

def async_rig(tmp_path):
    return Rig(str(tmp_path / "a.db"))


async def test_submit_returns_after_commit(tmp_path):
    r = async_rig(tmp_path)
    commits = []
    write_batch = r.store.write_batch
    r.store.write_batch = lambda b: (commits.append(len(b)), write_batch(b))
    group = AsyncIngest(r.ingest, batch_max=64, linger_ms=2)
    other = Store(r.path)
    verdicts = await asyncio.gather(*[
        group.submit(IDENTITY, TOPIC, enc(record(s))) for s in range(300)])
    assert verdicts == ["stored"] * 300
    assert other.tenant(TENANT).count_telemetry() == 300  # committed, not pending
    assert len(commits) < 300 and max(commits) <= 64
    assert await group.submit(IDENTITY, TOPIC, enc(record(7))) == "duplicate"
    assert await group.submit(IDENTITY, TOPIC, b"\x00") == "dead_letter:not_a_map"
    assert other.tenant(TENANT).dead_letters()[0]["payload"] == b"\x00"
    assert (await group.stats())["duplicates_dropped"] == 1
    await group.close()
    other.close()
    r.store.close()


async def test_each_waiter_sees_its_own_commit(tmp_path):
    r = async_rig(tmp_path)
    group = AsyncIngest(r.ingest, batch_max=8, linger_ms=1)
    other = Store(r.path)

    async def one(s):
        verdict = await group.submit(IDENTITY, TOPIC, enc(record(s)))
        assert other.tenant(TENANT).get(DEVICE, 0, s) is not None
        return verdict

    assert await asyncio.gather(*[one(s) for s in range(50)]) == ["stored"] * 50
    await group.close()
    other.close()
    r.store.close()


async def test_back_pressure_when_queue_is_full(tmp_path):
    r = async_rig(tmp_path)
    gate = threading.Event()
    flush = r.ingest.flush

    def slow_flush():
        gate.wait(10)
        flush()
    r.ingest.flush = slow_flush
    group = AsyncIngest(r.ingest, batch_max=2, linger_ms=0, queue_max=3)
    tasks = [asyncio.ensure_future(group.submit(IDENTITY, TOPIC, enc(record(s))))
             for s in range(12)]
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert group._queue.qsize() == 3       # bounded
    assert group._putting > 0              # the rest are waiting to enqueue
    assert not any(t.done() for t in tasks)
    gate.set()
    assert await asyncio.gather(*tasks) == ["stored"] * 12
    await group.close()
    r.store.close()


async def test_close_flushes_and_refuses_more(tmp_path):
    r = async_rig(tmp_path)
    group = AsyncIngest(r.ingest, batch_max=4, linger_ms=50, queue_max=2)
    tasks = [asyncio.ensure_future(group.submit(IDENTITY, TOPIC, enc(record(s))))
             for s in range(9)]
    await asyncio.sleep(0)
    await group.close()
    assert await asyncio.gather(*tasks) == ["stored"] * 9
    with pytest.raises(IngestClosed):
        await group.submit(IDENTITY, TOPIC, VALID)
    assert r.store.tenant(TENANT).count_telemetry() == 9
    r.store.close()


async def test_close_without_submits(tmp_path):
    r = async_rig(tmp_path)
    await AsyncIngest(r.ingest).close()
    r.store.close()


async def test_failed_commit_fails_its_waiters_then_recovers(tmp_path):
    r = async_rig(tmp_path)
    group = AsyncIngest(r.ingest, batch_max=16, linger_ms=1)
    write_batch = r.store.write_batch

    def broken(batch):
        raise OSError("disk full")
    r.store.write_batch = broken
    results = await asyncio.gather(*[
        group.submit(IDENTITY, TOPIC, enc(record(s))) for s in range(5)],
        return_exceptions=True)
    assert all(isinstance(x, IngestError) and x.code == "commit_failed" for x in results)
    r.store.write_batch = write_batch
    verdicts = await asyncio.gather(*[
        group.submit(IDENTITY, TOPIC, enc(record(s))) for s in range(5)])
    assert verdicts == ["stored"] * 5  # retransmissions are stored, not duplicates
    await group.close()
    assert r.store.tenant(TENANT).count_telemetry() == 5
    r.store.close()
