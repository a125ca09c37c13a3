"""After a run has drained: compare what every device generated and had
acknowledged with what the cloud stored and declared missing, and build the
summary.json contract (docs/design.md, README)."""


class Check:
    def __init__(self, name, passed, detail):
        self.name = name
        self.passed = bool(passed)
        self.detail = detail

    def as_dict(self):
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def device_truth(dev):
    """(generated, acked, dropped) keys of one virtual device."""
    generated = set()
    for epoch, count in dev.generated.items():
        generated.update((epoch, s) for s in range(count))
    return generated, dev.acked.to_set(), dev.dropped.to_set()


def cloud_truth(view, device):
    """(stored keys, declared-missing keys, silent-missing keys) in the cloud."""
    stored = set()
    # Flagged rows (a quarantined device's) are kept apart, not lost.
    rows = view.telemetry(device=device, limit=10_000, include_flagged=True)
    stored.update((r["epoch"], r["seq"]) for r in rows)
    if len(rows) == 10_000:
        raise RuntimeError("device %s has over 10,000 rows: verification needs paging" % device)
    declared, silent = set(), set()
    for m in view.missing(device=device):
        keys = {(m["epoch"], s) for s in range(m["first_seq"], m["last_seq"] + 1)}
        (declared if m["kind"] == "declared" else silent).update(keys)
    return stored, declared, silent


def reconcile(devices, store):
    """Totals over the fleet, device side against cloud side."""
    t = {"generated": 0, "acked": 0, "stored": 0, "declared_drops": 0, "silent_missing": 0,
         "acked_not_stored": 0, "unaccounted": 0, "lost": 0, "device_declared": 0,
         "declared_mismatch": 0}
    for dev in devices:
        generated, acked, dropped = device_truth(dev)
        stored, declared, silent = cloud_truth(store.tenant(dev.tenant), dev.device)
        t["generated"] += len(generated)
        t["acked"] += len(acked)
        t["stored"] += len(stored & generated)
        t["declared_drops"] += len(declared)
        t["silent_missing"] += len(silent)
        t["acked_not_stored"] += len(acked - stored)
        t["unaccounted"] += len(generated - stored - declared)
        t["lost"] += len((acked - stored) | (generated - stored - declared))
        t["device_declared"] += len(dropped - stored)
        # The cloud's declared-missing set must be exactly what the device
        # dropped and the cloud does not hold: no more, no less.
        t["declared_mismatch"] += len(declared ^ (dropped - stored))
    return t


def summarize(fleet, store, duration_s, drained, extra_checks=()):
    t = reconcile(fleet.devices, store)
    counts = store.fleet_counts()
    lost = t["lost"]  # each lost record once, whether acknowledged or not
    telemetry = {
        "generated": t["generated"], "acked": t["acked"], "stored": t["stored"],
        "duplicates_dropped": counts.get("duplicates_dropped", 0),
        "declared_drops": t["declared_drops"],
        "silent_gaps": counts.get("silent_gaps", 0),
        "dead_lettered": counts.get("dead_lettered", 0),
        "lost": lost,
        "msgs_per_s": round(t["stored"] / duration_s, 1) if duration_s else 0.0,
        "refused": fleet.refused(),
    }
    n = len(fleet.devices)
    checks = [
        Check("drained", drained, "every device queue empty and acknowledged at the end"
              if drained else "some device queues did not drain in time"),
        Check("no acknowledged record lost", t["acked_not_stored"] == 0,
              "%d acknowledged by the broker, %d of them not stored" % (t["acked"], t["acked_not_stored"])),
        Check("every record stored or declared dropped", t["unaccounted"] == 0,
              "%d generated, %d stored, %d declared dropped, %d unaccounted"
              % (t["generated"], t["stored"], t["declared_drops"], t["unaccounted"])),
        Check("no silent gaps", telemetry["silent_gaps"] == 0,
              "%d silent missing-data records open in the cloud" % telemetry["silent_gaps"]),
        Check("declared drops match the devices", t["declared_mismatch"] == 0,
              "devices dropped %d records the cloud lacks; the cloud declares %d missing; %d differ"
              % (t["device_declared"], t["declared_drops"], t["declared_mismatch"])),
        Check("no sample refused", telemetry["refused"] == 0,
              "%d samples refused by full queues that could declare no more drops" % telemetry["refused"]),
        Check("every sample taken", fleet.sample_failures == 0,
              "%d samples failed in the device driver" % fleet.sample_failures),
        Check("no agent core errors", not fleet.core_errors,
              "; ".join(fleet.core_errors[:3]) or "the core never refused an event"),
        Check("every device connected at the end", fleet.connected() == n,
              "%d of %d connected" % (fleet.connected(), n)),
    ]
    checks.extend(extra_checks)
    return {"devices": n, "duration_s": round(duration_s, 2), "telemetry": telemetry,
            "checks": [c.as_dict() for c in checks]}
