"""Live progress on the terminal while a run goes, and the verdict after."""

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text


class Progress:
    def __init__(self, quiet=False, connect_errors=False):
        """connect_errors: print each new reason a device could not connect
        for, as it first happens (`tether sim run`)."""
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.connect_errors = connect_errors
        self.live = None
        self.last_line_s = 0.0
        self.t0 = time.monotonic()
        self.reasons_told = set()   # connect-error reasons already printed
        if not quiet and self.console.is_terminal:
            self.live = Live(Text(""), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def say(self, message):
        if not self.quiet:
            self.console.print("[dim]%6.1fs[/dim] %s" % (time.monotonic() - self.t0, escape(message)),
                               soft_wrap=True)

    def update(self, fleet, phase):
        errors = fleet.metrics.connect_errors if self.connect_errors else {}
        for reason, entry in list(errors.items()):
            if reason not in self.reasons_told:  # each new reason once, as it first happens
                self.reasons_told.add(reason)
                self.say("a device could not connect: %s (%s)" % (reason, entry["first"]))
        line = "%s  t=%5.1fs  connected %d/%d  published %d  acked %d  queued %d  network %s" % (
            phase, fleet.elapsed_s(), fleet.connected(), len(fleet.devices), fleet.metrics.published,
            fleet.metrics.acked, fleet.queued(), "up" if fleet.network_up else "CUT")
        if errors:
            line += "  connect errors %d" % sum(e["count"] for e in errors.values())
        if self.live is not None:
            self.live.update(Text(line))
        elif not self.quiet and time.monotonic() - self.last_line_s >= 5:
            self.last_line_s = time.monotonic()
            self.console.print(line, soft_wrap=True)

    def stop(self):
        if self.live is not None:
            self.live.stop()
            self.live = None


def verdict(summary, out_dir):
    """The verdict on stdout: the PASS/FAIL line first, always one line
    (CI logs grep it), then failed checks and why devices could not connect."""
    console = Console()
    ok = all(c["passed"] for c in summary["checks"])
    t = summary["telemetry"]
    shown = ", ".join("%s %s" % (k.replace("_", " "), "n/a" if v is None else v) for k, v in (
        ("generated", t["generated"]), ("stored", t["stored"]), ("declared_dropped", t["declared_drops"]),
        ("lost", t["lost"]), ("silent_gaps", t["silent_gaps"]), ("dead_lettered", t["dead_lettered"])))
    console.print("[bold %s]%s[/]: %d devices, %.1f s: %s" % (
        "green" if ok else "red", "PASS" if ok else "FAIL", summary["devices"], summary["duration_s"],
        escape(shown)), soft_wrap=True)
    for c in summary["checks"]:
        if not c["passed"]:
            console.print("  [red]failed[/]: %s: %s" % (escape(c["name"]), escape(c["detail"])), soft_wrap=True)
    errors = summary.get("connect_errors") or []
    if errors:
        console.print("  connect errors (failed attempts, by reason):", soft_wrap=True)
        for e in errors:
            hint = " (%s)" % e["hint"] if e.get("hint") else ""
            console.print("    %d attempts: %s%s; first: %s" % (e["count"], escape(e["reason"]), escape(hint),
                                                       escape(e["first"])), soft_wrap=True)
    console.print("report: %s/report.html  summary: %s/summary.json" % (escape(str(out_dir)), escape(str(out_dir))),
                  soft_wrap=True)
    sys.stdout.flush()
