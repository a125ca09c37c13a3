"""cloud.store: durability settings, atomic batches, tenant isolation."""

import math
import sqlite3

import cbor2
import pytest

from cloud.errors import IdentityError
from cloud.store import DECLARED, SILENT, Batch, MissingRange, Store


def telemetry_row(tenant, device, epoch, seq, readings=None, kind="t"):
    body = cbor2.dumps(readings if readings is not None else {"x": seq},
                       canonical=True)
    return (tenant, device, epoch, seq, kind, 1000 + seq, 2000 + seq, body)


def batch_of(rows=(), dead=(), missing=(), counters=()):
    batch = Batch()
    for row in rows:
        batch.telemetry.append(row)
        batch.devices.setdefault((row[0], row[1]), row[6])
    batch.dead_letters.extend(dead)
    for m in missing:
        batch.touch(m)
    for tenant, name, n in counters:
        batch.count(tenant, name, n)
    return batch


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "t.db"))
    yield s
    s.close()


def test_wal_and_full_sync(store):
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL


def test_normal_sync_on_request(tmp_path):
    with Store(str(tmp_path / "n.db"), synchronous="NORMAL") as s:
        assert s.pragma("synchronous") == 1
    with pytest.raises(ValueError):
        Store(str(tmp_path / "x.db"), synchronous="OFF")


def test_pragma_name_is_checked(store):
    with pytest.raises(ValueError):
        store.pragma("user_version; DROP TABLE telemetry")


def test_batch_round_trip(store):
    readings = {"t": 21.5, "h": -0.0, "n": -(2 ** 64), "big": 2 ** 64 - 1,
                "f": 1.1, "half": 0.099975586}
    store.write_batch(batch_of([telemetry_row("a", "d1", 0, 0, readings)],
                               counters=[("a", "stored", 1)]))
    row = store.tenant("a").get("d1", 0, 0)
    assert row["readings"] == readings
    assert math.copysign(1.0, row["readings"]["h"]) == -1.0
    assert (row["ts_ms"], row["received_ms"], row["kind"]) == (1000, 2000, "t")
    assert store.tenant("a").devices() == [{"device": "d1", "created_ms": 2000}]
    assert store.tenant("a").counts()["stored"] == 1


def test_duplicate_key_is_ignored_not_doubled(store):
    store.write_batch(batch_of([telemetry_row("a", "d1", 0, 0, {"x": 1})]))
    store.write_batch(batch_of([telemetry_row("a", "d1", 0, 0, {"x": 2})]))
    assert store.tenant("a").count_telemetry() == 1
    assert store.tenant("a").get("d1", 0, 0)["readings"] == {"x": 1}


def test_batch_is_all_or_nothing(store):
    good = telemetry_row("a", "d1", 0, 0)
    bad = ("a", "d1", 0, 1, "t", 2 ** 63, 0, b"\xa0")  # ts overflows INTEGER
    with pytest.raises(OverflowError):
        store.write_batch(batch_of([good, bad], counters=[("a", "stored", 2)]))
    assert store.tenant("a").count_telemetry() == 0
    assert store.tenant("a").counts()["stored"] == 0
    store.write_batch(batch_of([good]))  # the connection is still usable
    assert store.tenant("a").count_telemetry() == 1


def test_dead_letter_payload_kept_byte_for_byte(store):
    payload = bytes(range(256)) + b"\x00\x00"
    store.write_batch(batch_of(dead=[
        ("a", "a/d1", "t/a/d1/telemetry", payload, "malformed_cbor", "why", 5),
        (None, "junk", "t/x", b"\x00", "identity_mismatch", "no", 6)]))
    (dl,) = store.tenant("a").dead_letters()
    assert dl["payload"] == payload and isinstance(dl["payload"], bytes)
    assert (dl["reason"], dl["detail"], dl["received_ms"]) == ("malformed_cbor", "why", 5)
    (orphan,) = store.unattributed_dead_letters()
    assert orphan["tenant"] is None and orphan["payload"] == b"\x00"


def test_missing_ranges_insert_update_close(store):
    m = MissingRange("a", "d1", 0, 1, 9, SILENT, 100)
    store.write_batch(batch_of(missing=[m]))
    assert m.id is not None
    m.first_seq = 4
    d = MissingRange("a", "d1", 0, 1, 3, DECLARED, 200)
    store.write_batch(batch_of(missing=[m, d]))
    got = store.tenant("a").missing()
    assert [(r["first_seq"], r["last_seq"], r["kind"]) for r in got] == [
        (1, 3, DECLARED), (4, 9, SILENT)]
    m.closed_ms = 300
    store.write_batch(batch_of(missing=[m]))
    assert [r["kind"] for r in store.tenant("a").missing()] == [DECLARED]
    closed = [r for r in store.tenant("a").missing(include_closed=True)
              if r["closed_ms"] is not None]
    assert closed[0]["opened_ms"] == 100 and closed[0]["closed_ms"] == 300


def test_new_range_closed_before_commit_is_not_written(store):
    m = MissingRange("a", "d1", 0, 1, 1, SILENT, 100, closed_ms=100)
    store.write_batch(batch_of(missing=[m]))
    assert m.id is None
    assert store.tenant("a").missing(include_closed=True) == []


def test_stream_state(store):
    store.write_batch(batch_of(
        [telemetry_row("a", "d1", 3, s) for s in (0, 5)],
        missing=[MissingRange("a", "d1", 3, 1, 4, SILENT, 1),
                 MissingRange("a", "d1", 3, 6, 8, DECLARED, 1)]))
    top, gaps = store.tenant("a").stream_state("d1", 3)
    assert top == 8  # an open range beyond the last stored seq counts
    assert [(g.first_seq, g.last_seq, g.kind) for g in gaps] == [
        (1, 4, SILENT), (6, 8, DECLARED)]
    assert store.tenant("a").stream_state("d1", 4) == (-1, [])
    assert store.tenant("b").stream_state("d1", 3) == (-1, [])


def fill_two_tenants(store):
    rows = [telemetry_row(t, d, 0, s) for t in ("a", "ab", "b")
            for d in ("d1", "x' OR '1'='1") for s in range(3)]
    dead = [(t, t + "/d1", "t/%s/d1/telemetry" % t, b"\xff", "malformed_cbor", "", 1)
            for t in ("a", "ab", "b")]
    missing = [MissingRange(t, "d1", 0, 7, 9, SILENT, 1) for t in ("a", "ab", "b")]
    counters = [(t, "stored", 6) for t in ("a", "ab", "b")]
    store.write_batch(batch_of(rows, dead, missing, counters))


def test_tenant_view_sees_only_its_rows(store):
    fill_two_tenants(store)
    for tenant in ("a", "ab", "b"):
        view = store.tenant(tenant)
        assert view.count_telemetry() == 6
        assert {r["device"] for r in view.telemetry()} == {"d1", "x' OR '1'='1"}
        assert all(r["tenant"] == tenant for r in view.dead_letters())
        assert len(view.dead_letters()) == 1
        assert all(r["tenant"] == tenant for r in view.missing())
        assert len(view.missing()) == 1
        assert view.counts()["stored"] == 6
        assert len(view.devices()) == 2
    # a hostile device string is a literal value, not SQL
    view = store.tenant("a")
    assert len(view.telemetry(device="x' OR '1'='1")) == 3
    assert view.telemetry(device="nope' OR '1'='1") == []
    assert view.get("d1' OR '1'='1", 0, 0) is None


@pytest.mark.parametrize("hostile", [
    "a' OR '1'='1", "a'; DROP TABLE telemetry; --", "%", "a%", "", "a" * 33,
    "a/b", "a\x00", None, 1, b"a"])
def test_hostile_tenant_ids_are_refused(store, hostile):
    fill_two_tenants(store)
    with pytest.raises(IdentityError):
        store.tenant(hostile)
    assert store.fleet_counts()["stored"] == 18  # and nothing was dropped


def test_wildcard_like_tenant_ids_match_literally(store):
    fill_two_tenants(store)
    for tenant in ("_", "__", "a_", "A", "-"):  # valid ids, no such tenant
        view = store.tenant(tenant)
        assert view.telemetry() == [] and view.dead_letters() == []
        assert view.missing(include_closed=True) == [] and view.devices() == []
        assert view.counts()["stored"] == 0


def test_fleet_counts_are_aggregates(store):
    fill_two_tenants(store)
    store.write_batch(batch_of(counters=[
        ("a", "dead_lettered:oversized", 2), ("", "dead_lettered:identity_mismatch", 1),
        ("b", "duplicates_dropped", 4)]))
    counts = store.fleet_counts()
    assert counts["stored"] == 18
    assert counts["duplicates_dropped"] == 4
    assert counts["dead_lettered"] == 3
    assert counts["dead_lettered_by_reason"] == {"oversized": 2, "identity_mismatch": 1}
    assert (counts["silent_gaps"], counts["silent_missing"]) == (3, 9)
    assert (counts["tenants"], counts["devices"]) == (3, 6)


def test_read_limits_are_bounded(store):
    fill_two_tenants(store)
    assert len(store.tenant("a").telemetry(limit=2)) == 2
    with pytest.raises(ValueError):
        store.tenant("a").telemetry(limit=-1)


def test_reopen_keeps_data(tmp_path):
    path = str(tmp_path / "r.db")
    with Store(path) as s:
        s.write_batch(batch_of([telemetry_row("a", "d1", 0, 0)]))
    with Store(path) as s:
        assert s.tenant("a").count_telemetry() == 1


def test_unknown_schema_version_is_refused(tmp_path):
    path = str(tmp_path / "v.db")
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError):
        Store(path)
