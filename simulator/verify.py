"""After a run has drained: compare what every device generated and had
acknowledged with what the cloud stored and declared missing, and build the
summary.json contract (docs/design.md, README)."""

import time


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


ROWS_PER_READ = 10_000


def run_epochs(dev):
    """The epochs one virtual device wrote in this run: its own streams."""
    epochs = set(dev.generated)  # acked and dropped keys are generated ones
    if dev.core is not None and dev.core.epoch >= 0:
        epochs.add(dev.core.epoch)
    return epochs


def _cloud_view(view, device, epochs=None):
    """(telemetry rows, open missing-data records) of one device; only of
    `epochs` when given (a run's own streams in a long-lived store)."""
    # Flagged rows (a quarantined device's) are kept apart, not lost.
    if epochs is None:
        rows = view.telemetry(device=device, limit=ROWS_PER_READ, include_flagged=True)
        if len(rows) == ROWS_PER_READ:
            raise RuntimeError("device %s has over 10,000 rows: verification needs paging" % device)
        return rows, view.missing(device=device)
    rows, missing = [], []
    for epoch in sorted(epochs):
        part = view.telemetry(device=device, epoch=epoch, limit=ROWS_PER_READ, include_flagged=True)
        if len(part) == ROWS_PER_READ:
            raise RuntimeError("device %s has over 10,000 rows in epoch %d: verification needs paging"
                               % (device, epoch))
        rows.extend(part)
        missing.extend(view.missing_in_epoch(device, epoch))
    return rows, missing


def _cloud_sets(view, device, epochs=None):
    rows, missing = _cloud_view(view, device, epochs)
    stored = {(r["epoch"], r["seq"]) for r in rows}
    declared, silent, silent_records = set(), set(), 0
    for m in missing:
        keys = {(m["epoch"], s) for s in range(m["first_seq"], m["last_seq"] + 1)}
        if m["kind"] == "declared":
            declared.update(keys)
        else:
            silent.update(keys)
            silent_records += 1
    return stored, declared, silent, silent_records


def cloud_truth(view, device, epochs=None):
    """(stored keys, declared-missing keys, silent-missing keys) in the
    cloud; of the given epochs only, when given."""
    return _cloud_sets(view, device, epochs)[:3]


def reconcile(devices, store, own_epochs=False):
    """Totals over the fleet, device side against cloud side. own_epochs:
    read only each device's epochs of this run (a store other runs share)."""
    t = {"generated": 0, "acked": 0, "stored": 0, "declared_drops": 0, "silent_missing": 0,
         "silent_gaps": 0, "acked_not_stored": 0, "unaccounted": 0, "lost": 0, "device_declared": 0,
         "declared_mismatch": 0}
    for dev in devices:
        generated, acked, dropped = device_truth(dev)
        stored, declared, silent, silent_records = _cloud_sets(
            store.tenant(dev.tenant), dev.device, run_epochs(dev) if own_epochs else None)
        t["generated"] += len(generated)
        t["acked"] += len(acked)
        t["stored"] += len(stored & generated)
        t["declared_drops"] += len(declared)
        t["silent_missing"] += len(silent)
        t["silent_gaps"] += silent_records
        t["acked_not_stored"] += len(acked - stored)
        t["unaccounted"] += len(generated - stored - declared)
        t["lost"] += len((acked - stored) | (generated - stored - declared))
        t["device_declared"] += len(dropped - stored)
        # The cloud's declared-missing set must be exactly what the device
        # dropped and the cloud does not hold: no more, no less.
        t["declared_mismatch"] += len(declared ^ (dropped - stored))
    return t


class RunScope:
    """What one run may count in a cloud store other runs share (a
    long-lived cloud under CI): its own devices, their epochs of this run,
    and the dead letters of its identities received since it started.
    Duplicates are counted per tenant by the cloud, so they are this run's
    tenants' increase over the run (another client of those tenants
    sending duplicates meanwhile would be counted too)."""

    def __init__(self, store, devices, since_ms):
        self.since_ms = since_ms
        self.identities = sorted("%s/%s" % (d.tenant, d.device) for d in devices)
        self.tenants = sorted({d.tenant for d in devices})
        self.duplicates_before = self.duplicates(store)

    def duplicates(self, store):
        return sum(store.tenant(t).counts().get("duplicates_dropped", 0) for t in self.tenants)

    def describe(self):
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.since_ms / 1000))
        return ("cloud store, this run only: its %d devices, their epochs of this run, their dead "
                "letters since %s.%03dZ" % (len(self.identities), since, self.since_ms % 1000))


def summarize(fleet, store, duration_s, drained, extra_checks=(), scope=None):
    """scope: a RunScope, for a store other runs share (`tether sim run
    --store`); None counts the whole store (a cloud made for this run)."""
    t = reconcile(fleet.devices, store, own_epochs=scope is not None)
    if scope is None:
        counts = store.fleet_counts()
    else:
        counts = {"duplicates_dropped": max(0, scope.duplicates(store) - scope.duplicates_before),
                  "silent_gaps": t["silent_gaps"],
                  "dead_lettered": sum(store.dead_letter_counts(scope.identities, scope.since_ms).values())}
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
    summary = {"devices": n, "duration_s": round(duration_s, 2), "telemetry": telemetry,
               "checks": [c.as_dict() for c in checks]}
    if scope is not None:
        summary["verification"] = scope.describe()
    return summary
