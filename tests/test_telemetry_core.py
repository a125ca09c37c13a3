"""The telemetry core on the simulated board: sequencing, store-and-forward,
declared drops, power cuts at every write, and every state x event."""

import cbor2
import pytest
from hypothesis import given, settings, strategies as st

from agent import events, journal, telemetry
from agent.backoff import Backoff
from agent.errors import LocalError
from board.sim import PowerCut, SimRng
from tests.agent_harness import Device


def acked_records(dev):
    return [cbor2.loads(p) for p in dev.broker.acked]


def coverage_holes(records):
    """Per epoch, the seqs below the highest seen that no record stored or
    declared: these would be silent gaps in the cloud."""
    seen = {}
    for r in records:
        seen.setdefault(r["e"], set()).add(r["s"])
        if r["k"] == "drop":
            seen.setdefault(r["de"], set()).update(range(r["a"], r["b"] + 1))
    holes = {}
    for epoch, seqs in seen.items():
        missing = set(range(max(seqs) + 1)) - seqs
        if missing:
            holes[epoch] = sorted(missing)
    return holes


def silent_losses(dev):
    """Records that became durable and then vanished without a declaration:
    every durable record must be acknowledged, or dropped (by a completed X
    frame) inside the range of an acknowledged drop record of its epoch, and
    the drop records' `n` must add up to exactly the records dropped."""
    acked = {}
    for r in acked_records(dev):
        acked[(r["e"], r["s"])] = r
    drops = [r for r in acked.values() if r["k"] == "drop"]
    covered = set()
    for r in drops:
        covered.update((r["de"], s) for s in range(r["a"], r["b"] + 1))
    problems = sorted(dev.durable - set(acked) - dev.dropped)
    problems += ["dropped %r outside every range" % (k,) for k in sorted(dev.dropped - covered)]
    if sum(r["n"] for r in drops) != len(dev.dropped):
        problems.append("n adds to %d, %d dropped" % (sum(r["n"] for r in drops), len(dev.dropped)))
    return problems


def same_key_same_payload(dev):
    by_key = {}
    for p in dev.broker.acked:
        r = cbor2.loads(p)
        assert by_key.setdefault((r["e"], r["s"]), p) == p


def test_records_are_sequenced_published_and_removed_on_ack():
    dev = Device()
    dev.boot()
    for _ in range(5):
        dev.step()
        dev.deliver_acks()
    recs = acked_records(dev)
    assert [(r["e"], r["s"]) for r in recs] == [(0, i) for i in range(5)]
    assert recs[0]["d"] == "dev-1" and recs[0]["k"] == "t" and recs[0]["v"] == 1
    assert dev.core.queue == []
    entries, damaged, epoch = journal.replay(dev.flash.read("queue"))
    assert entries == [] and not damaged and epoch == 0


def test_payload_is_deterministic_cbor():
    dev = Device()
    dev.boot()
    dev.step(readings={"z": 1, "a": 2.5, "m": -3})
    dev.deliver_acks()
    p = dev.broker.acked[0]
    assert p == cbor2.dumps(cbor2.loads(p), canonical=True)


def test_unacked_records_survive_reboot_and_epoch_advances():
    dev = Device()
    dev.boot()
    dev.broker.up = False
    for _ in range(4):
        dev.step()
    dev.boot()  # reboot with 4 records queued in epoch 0
    assert dev.core.epoch == 1
    dev.broker.up = True
    for _ in range(3):
        dev.step(ms=31000)
        dev.deliver_acks()
    keys = [(r["e"], r["s"]) for r in acked_records(dev)]
    assert keys[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert (1, 0) in keys
    assert coverage_holes(acked_records(dev)) == {}


def test_epoch_never_repeats_even_if_state_file_is_lost():
    dev = Device()
    dev.boot()
    dev.broker.up = False
    dev.step()
    dev.flash.remove("state")
    dev.boot()
    assert dev.core.epoch == 1  # taken from the queue's newest record


def test_full_queue_declares_exactly_what_it_dropped():
    dev = Device(config=telemetry.Config(capacity=5))
    dev.boot()
    dev.broker.up = False
    for _ in range(20):
        dev.step()
    assert dev.core.data_count == 5 and len(dev.core.queue) == 6  # one drop record
    assert dev.core.refused == 0
    dev.broker.up = True
    for _ in range(4):
        dev.step(ms=31000)
        dev.deliver_acks()
    recs = acked_records(dev)
    drops = [r for r in recs if r["k"] == "drop"]
    assert len(drops) == 1, "one epoch offline: one drop record"
    assert drops[0]["n"] == dev.core.dropped == 15
    assert coverage_holes(recs) == {}
    assert silent_losses(dev) == []


def test_a_published_drop_record_is_never_widened_even_after_reboot():
    dev = Device(config=telemetry.Config(capacity=3))
    dev.boot()
    dev.broker.up = False
    for _ in range(6):
        dev.step()                      # drops: one open drop record
    dev.broker.up = True
    dev.step(ms=31000)                  # connects and publishes it, no PUBACK yet
    sent = [p.payload for p in dev.pending_acks if cbor2.loads(p.payload)["k"] == "drop"]
    assert sent
    dev.boot()                          # reboot before the PUBACK
    dev.broker.up = False
    for _ in range(6):
        dev.step()                      # more drops of the same epoch 0 records
    dev.broker.up = True
    for _ in range(5):
        dev.step(ms=31000)
        dev.deliver_acks()
    same_key_same_payload(dev)
    again = [p for p in dev.broker.acked if cbor2.loads(p)["k"] == "drop"
             and (cbor2.loads(p)["e"], cbor2.loads(p)["s"]) == (cbor2.loads(sent[0])["e"], cbor2.loads(sent[0])["s"])]
    assert again == [sent[0]] or again == [], "a published drop record must not change"
    assert silent_losses(dev) == []


def test_long_outage_keeps_the_newest_records_and_a_bounded_journal():
    dev = Device(config=telemetry.Config(capacity=16, compact_bytes_min=2048))
    dev.boot()
    dev.broker.up = False
    for _ in range(16 * 16 * 2):
        dev.step()
    core = dev.core
    assert core.refused == 0
    assert core.data_count == 16 and len(core.queue) == 17
    newest = [e[1] for e in core.queue if not e[2]]
    assert newest == list(range(core.next_seq - 16, core.next_seq))
    assert len(dev.flash.read("queue")) < 4 * 2048, "the journal must be compacted offline too"


def test_reboots_while_offline_declare_per_epoch_and_stay_bounded():
    dev = Device(config=telemetry.Config(capacity=4, drops_max=3))
    dev.boot()
    dev.broker.up = False
    for _ in range(6):
        for _ in range(6):
            dev.step()
        dev.boot()
    drops = [e for e in dev.core.queue if e[2]]
    assert len(drops) <= 3 and dev.core.data_count <= 4
    dev.broker.up = True
    for _ in range(20):
        dev.step(ms=31000)
        dev.deliver_acks()
    assert silent_losses(dev) == [] and coverage_holes(acked_records(dev)) == {}


def test_records_in_flight_are_republished_after_connection_loss():
    dev = Device()
    dev.boot()
    dev.step()
    dev.step()
    dev.drop_connection()           # both publishes lost with the connection
    dev.step(ms=31000)
    dev.deliver_acks()
    keys = sorted((r["e"], r["s"]) for r in acked_records(dev))
    assert keys == [(0, 0), (0, 1), (0, 2)]


def test_backoff_is_bounded_and_jittered():
    b = Backoff(SimRng(3), base_ms=100, cap_ms=5000)
    delays = [b.next_delay_ms() for _ in range(40)]
    assert all(50 <= d <= 5000 for d in delays)
    assert max(delays[-10:]) <= 5000 and min(delays[-10:]) >= 2500
    assert len(set(delays[-10:])) > 1
    b.reset()
    assert b.next_delay_ms() <= 100


def test_unknown_transition_is_an_error_and_the_machine_stays_broken():
    dev = Device()
    dev.boot()
    with pytest.raises(LocalError) as e:
        dev.core.handle(events.Connected(1))  # the driver never asked to connect
    assert e.value.code == "bad_transition"
    with pytest.raises(LocalError):
        dev.core.handle(events.Tick(0))


def test_what_a_peer_can_cause_is_logged_never_fatal():
    dev = Device()
    dev.boot()
    assert dev.core.handle(events.PubAcked((0, 0)))[0].code == "stray_ack"      # late PUBACK
    assert dev.core.handle(events.ConnectionLost(1, "late")) == []              # late loss
    dev.step()
    assert dev.core.state == telemetry.ONLINE
    assert dev.core.handle(events.Connected(2))[0].code == "second_connack"
    assert dev.core.state == telemetry.ONLINE


def test_backward_clock_step_does_not_stall_reconnection():
    dev = Device()
    dev.boot()
    dev.step()
    dev.drop_connection()
    assert dev.core.state == telemetry.OFFLINE
    dev.clock._now_ms -= 3_600_000  # NTP steps the clock back an hour
    dev.step(ms=10)
    assert dev.core.state == telemetry.ONLINE


def test_handle_before_boot_is_refused():
    core = telemetry.Telemetry("acme", "d", None, SimRng(1))
    with pytest.raises(LocalError):
        core.handle(events.Tick(0))


def scenario(dev, script):
    """Run a list of ops; a PowerCut reboots the device and carries on."""
    for op in script:
        try:
            if op == "step":
                dev.step()
            elif op == "ack":
                dev.deliver_acks(limit=2)
            elif op == "cut_net":
                dev.broker.up = False
                dev.drop_connection()
            elif op == "net_up":
                dev.broker.up = True
            elif op == "reboot":
                dev.boot()
        except PowerCut:
            dev.flash.power_on()
            dev.boot()


def drain(dev):
    dev.broker.up = True
    dev.flash.cut_at_write = None
    scenario(dev, ["reboot"])  # a cut that has not happened yet is cancelled
    for _ in range(30):
        dev.step(ms=31000)
        dev.deliver_acks()
    dev.drop_connection()
    dev.step(ms=31000)
    dev.deliver_acks()


SCRIPT = (["step", "ack"] * 3 + ["cut_net"] + ["step"] * 8 + ["reboot", "net_up"]
          + ["step", "ack"] * 3 + ["step", "reboot", "ack", "step", "ack"])


def count_writes():
    dev = Device(config=telemetry.Config(capacity=4))
    dev.boot()
    scenario(dev, SCRIPT)
    return dev.flash.writes


def test_power_cut_at_every_write_loses_nothing_silently():
    total = count_writes()
    assert total > 30
    for k in range(1, total + 1):
        dev = Device(config=telemetry.Config(capacity=4))
        dev.flash.cut_at_write = k
        try:
            dev.boot()
        except PowerCut:
            dev.flash.power_on()
            dev.boot()
        scenario(dev, SCRIPT)
        drain(dev)
        recs = acked_records(dev)
        assert coverage_holes(recs) == {}, "cut at write %d" % k
        assert silent_losses(dev) == [], "cut at write %d" % k
        same_key_same_payload(dev)
        assert dev.core.queue == [], "cut at write %d" % k


OPS = st.sampled_from(["step", "ack", "cut_net", "net_up", "reboot"])


@settings(max_examples=150, deadline=None)
@given(st.lists(OPS, max_size=60), st.integers(0, 400), st.integers(2, 8))
def test_any_history_with_a_power_cut_drains_without_silent_gaps(script, cut, capacity):
    dev = Device(seed=cut, config=telemetry.Config(capacity=capacity, inflight_max=3))
    dev.flash.cut_at_write = cut or None
    try:
        dev.boot()
    except PowerCut:
        dev.flash.power_on()
        dev.boot()
    scenario(dev, script)
    drain(dev)
    assert coverage_holes(acked_records(dev)) == {}
    assert silent_losses(dev) == []
    same_key_same_payload(dev)
    assert len(dev.core.queue) == 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([telemetry.OFFLINE, telemetry.CONNECTING, telemetry.ONLINE]),
       st.sampled_from(["tick", "sample", "connected", "lost", "acked"]))
def test_every_state_and_event_is_handled_or_refused(state, kind):
    dev = Device()
    dev.boot()
    dev.core.state = state
    event = {"tick": events.Tick(10 ** 13), "sample": events.Sample(1, {"a": 1}),
             "connected": events.Connected(1), "lost": events.ConnectionLost(1, "x"),
             "acked": events.PubAcked((0, 0))}[kind]
    if (state, type(event)) in telemetry.TRANSITIONS:
        actions = dev.core.handle(event)
        assert isinstance(actions, list)
        assert dev.core.state in (telemetry.OFFLINE, telemetry.CONNECTING, telemetry.ONLINE)
    else:
        with pytest.raises(LocalError):
            dev.core.handle(event)
        assert dev.core.state == telemetry.ERROR
