"""Live progress on the terminal while a run goes, and the verdict after."""

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.text import Text


class Progress:
    def __init__(self, quiet=False):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.live = None
        self.last_line_s = 0.0
        self.t0 = time.monotonic()
        if not quiet and self.console.is_terminal:
            self.live = Live(Text(""), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def say(self, message):
        if not self.quiet:
            self.console.print("[dim]%6.1fs[/dim] %s" % (time.monotonic() - self.t0, message))

    def update(self, fleet, phase):
        line = "%s  t=%5.1fs  connected %d/%d  published %d  acked %d  queued %d  network %s" % (
            phase, fleet.elapsed_s(), fleet.connected(), len(fleet.devices), fleet.metrics.published,
            fleet.metrics.acked, fleet.queued(), "up" if fleet.network_up else "CUT")
        if self.live is not None:
            self.live.update(Text(line))
        elif not self.quiet and time.monotonic() - self.last_line_s >= 5:
            self.last_line_s = time.monotonic()
            self.console.print(line)

    def stop(self):
        if self.live is not None:
            self.live.stop()
            self.live = None


def verdict(summary, out_dir):
    console = Console()
    ok = all(c["passed"] for c in summary["checks"])
    t = summary["telemetry"]
    shown = ", ".join("%s %s" % (k.replace("_", " "), "n/a" if v is None else v) for k, v in (
        ("generated", t["generated"]), ("stored", t["stored"]), ("declared_dropped", t["declared_drops"]),
        ("lost", t["lost"]), ("silent_gaps", t["silent_gaps"]), ("dead_lettered", t["dead_lettered"])))
    console.print("[bold %s]%s[/]: %d devices, %.1f s: %s" % (
        "green" if ok else "red", "PASS" if ok else "FAIL", summary["devices"], summary["duration_s"], shown))
    for c in summary["checks"]:
        if not c["passed"]:
            console.print("  [red]failed[/]: %s: %s" % (c["name"], c["detail"]))
    console.print("report: %s/report.html  summary: %s/summary.json" % (out_dir, out_dir))
    sys.stdout.flush()
