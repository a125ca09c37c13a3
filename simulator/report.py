"""A self-contained report.html: the summary's numbers, its checks, and
inline SVG charts of the run (no scripts, no network, one file)."""

import html
import json

WIDTH, HEIGHT, PAD = 720, 200, 40


def line_chart(title, rows, key, color, marks=(), unit=""):
    """An SVG line chart of rows[i][key] against rows[i]['t_s']."""
    if len(rows) < 2:
        return "<p>%s: not enough samples</p>" % html.escape(title)
    if isinstance(rows[0].get(key), float):
        rows = [dict(r, **{key: round(r[key], 1)}) for r in rows]
    xs = [r["t_s"] for r in rows]
    ys = [r[key] for r in rows]
    x0, x1 = xs[0], max(xs[-1], xs[0] + 1e-9)
    y1 = max(max(ys), 1)

    def px(x):
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def py(y):
        return HEIGHT - PAD + 10 - y / y1 * (HEIGHT - 2 * PAD)

    points = " ".join("%.1f,%.1f" % (px(x), py(y)) for x, y in zip(xs, ys))
    bands = []
    for start, end, label in marks:
        bands.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#f3d9d9"/>'
                     '<text x="%.1f" y="%d" font-size="10" fill="#a33">%s</text>' % (
                         px(start), PAD - 20, max(px(end) - px(start), 2), HEIGHT - 2 * PAD + 30,
                         px(start) + 2, PAD - 8, html.escape(label)))
    return """<figure><figcaption>{title}</figcaption>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{title}">
{bands}
<line x1="{p}" y1="{base}" x2="{xr}" y2="{base}" stroke="#888"/>
<line x1="{p}" y1="{top}" x2="{p}" y2="{base}" stroke="#888"/>
<text x="{p}" y="{h2}" font-size="10">{x0:.0f} s</text>
<text x="{xr}" y="{h2}" font-size="10" text-anchor="end">{x1:.0f} s</text>
<text x="{p2}" y="{ytop}" font-size="10" text-anchor="end">{y1:g}{unit}</text>
<text x="{p2}" y="{base}" font-size="10" text-anchor="end">0</text>
<line x1="{p}" y1="{ytop}" x2="{xr}" y2="{ytop}" stroke="#ddd" stroke-dasharray="3,3"/>
<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{points}"/>
</svg></figure>""".format(title=html.escape(title), w=WIDTH, h=HEIGHT + 20, bands="".join(bands),
                           p=PAD, p2=PAD - 4, xr=WIDTH - PAD, base=HEIGHT - PAD + 10, top=PAD - 10,
                           h2=HEIGHT + 5, x0=x0, x1=x1, y1=y1, unit=unit, color=color, points=points,
                           ytop="%.1f" % py(y1))


VERSION_COLORS = ("#718096", "#c53030", "#2f855a", "#2b6cb0", "#b7791f", "#6b46c1")


def versions_chart(cohort, series, marks=()):
    """An SVG chart of how many devices of one cohort run each version over
    time: series is [{"t_s", "cohorts": {cohort: {version: devices}}}]."""
    rows = [(r["t_s"], r["cohorts"].get(cohort, {})) for r in series]
    versions = sorted({v for _, counts in rows for v in counts})
    if len(rows) < 2 or not versions:
        return "<p>%s: not enough samples</p>" % html.escape(cohort)
    x0, x1 = rows[0][0], max(rows[-1][0], rows[0][0] + 1e-9)
    y1 = max(max(sum(c.values()) for _, c in rows), 1)

    def px(x):
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def py(y):
        return HEIGHT - PAD + 10 - y / y1 * (HEIGHT - 2 * PAD)

    lines, legend = [], []
    for i, version in enumerate(versions):
        color = VERSION_COLORS[i % len(VERSION_COLORS)]
        # a step line: the count holds until the next sample
        points, last = [], None
        for t, counts in rows:
            y = counts.get(version, 0)
            if last is not None:
                points.append("%.1f,%.1f" % (px(t), py(last)))
            points.append("%.1f,%.1f" % (px(t), py(y)))
            last = y
        lines.append('<polyline fill="none" stroke="%s" stroke-width="1.8" points="%s"/>' % (color, " ".join(points)))
        legend.append('<text x="%d" y="%d" font-size="10" fill="%s">%s</text>' % (
            WIDTH - PAD - 90, PAD + 12 * i, color, html.escape(version)))
    bands = "".join('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#edf2f7"/>'
                    '<text x="%.1f" y="%d" font-size="9" fill="#555">%s</text>' % (
                        px(a), PAD - 10, max(px(b) - px(a), 2), HEIGHT - 2 * PAD + 20,
                        px(a) + 2, PAD - 12 - 10 * (i % 2), html.escape(label))
                    for i, (a, b, label) in enumerate(marks))
    title = "Versions over time, cohort %s (devices per version)" % cohort
    return """<figure><figcaption>{title}</figcaption>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{title}">
{bands}
<line x1="{p}" y1="{base}" x2="{xr}" y2="{base}" stroke="#888"/>
<line x1="{p}" y1="{top}" x2="{p}" y2="{base}" stroke="#888"/>
<text x="{p}" y="{h2}" font-size="10">{x0:.0f} s</text>
<text x="{xr}" y="{h2}" font-size="10" text-anchor="end">{x1:.0f} s</text>
<text x="{p2}" y="{ytop:.1f}" font-size="10" text-anchor="end">{y1}</text>
<text x="{p2}" y="{base}" font-size="10" text-anchor="end">0</text>
{lines}
{legend}
</svg></figure>""".format(title=html.escape(title), w=WIDTH, h=HEIGHT + 20, bands=bands, p=PAD, p2=PAD - 4,
                           xr=WIDTH - PAD, base=HEIGHT - PAD + 10, top=PAD - 10, h2=HEIGHT + 5, x0=x0, x1=x1,
                           y1=y1, ytop=py(y1), lines="\n".join(lines), legend="".join(legend))


def rates(rows, key):
    """Per-second rate of a cumulative counter, as rows with key 'rate'."""
    out = []
    for a, b in zip(rows, rows[1:]):
        dt = b["t_s"] - a["t_s"]
        if dt > 0:
            out.append({"t_s": b["t_s"], "rate": (b[key] - a[key]) / dt})
    return out


def render(summary, timeline, marks=(), title="tether run", versions=None, version_marks=()):
    """versions: the firmware phase's versions-over-time series (one chart per cohort)."""
    checks = "".join(
        "<tr><td>{mark}</td><td>{name}</td><td>{detail}</td></tr>".format(
            mark="&#10004;" if c["passed"] else "&#10008;", name=html.escape(c["name"]),
            detail=html.escape(c["detail"]))
        for c in summary["checks"])
    tele = "".join("<tr><td>%s</td><td>%s</td></tr>" % (html.escape(k), html.escape(str(v)))
                   for k, v in summary["telemetry"].items())
    errors = summary.get("connect_errors") or []
    if errors:  # why devices could not connect (tether sim run)
        tele += '</table><h2>Connect errors</h2><table><tr><th>attempts</th><th>reason</th><th>first</th></tr>'
        tele += "".join("<tr><td>%d</td><td>%s</td><td>%s</td></tr>" % (
            e["count"], html.escape(e["reason"] + (" (%s)" % e["hint"] if e.get("hint") else "")),
            html.escape(e["first"])) for e in errors)
    ok = all(c["passed"] for c in summary["checks"])
    charts = "\n".join([
        line_chart("Devices connected", timeline, "connected", "#2b6cb0", marks),
        line_chart("Records acknowledged per second", rates(timeline, "acked"), "rate", "#2f855a", marks, "/s"),
        line_chart("Records queued on devices (store-and-forward)", timeline, "queued", "#b7791f", marks),
    ])
    if versions:
        cohorts = sorted({c for row in versions for c in row["cohorts"]})
        charts += "\n<h2>Firmware: versions over time per cohort of the good release</h2>\n" + "\n".join(
            versions_chart(c, versions, version_marks) for c in cohorts)
    return """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 780px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
.verdict {{ font-size: 1.3em; padding: .5em 1em; border-radius: 4px;
           background: {bg}; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: 600; }}
</style></head><body>
<h1>{title}</h1>
<p class="verdict">{verdict}: {devices} devices, {duration:.1f} s</p>
<h2>Checks</h2><table><tr><th></th><th>check</th><th>detail</th></tr>{checks}</table>
<h2>Telemetry</h2><table>{tele}</table>
<h2>Over time</h2>{charts}
<h2>summary.json</h2><pre>{raw}</pre>
</body></html>
""".format(title=html.escape(title), bg="#e6f4ea" if ok else "#fde8e8",
           verdict="PASS" if ok else "FAIL", devices=summary["devices"],
           duration=summary["duration_s"], checks=checks, tele=tele, charts=charts,
           raw=html.escape(json.dumps(summary, indent=2)))
