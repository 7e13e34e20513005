"""The status page (`/` on METRICS_PORT): one server-rendered HTML page of a monitoring
state, no JavaScript and nothing fetched from elsewhere, so it works offline. Pure: `render`
takes the state, what `health` finds wrong and the time, and returns the page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from agent import __version__
from agent.core import generation
from agent.monitoring.state import FAILURE, SUCCESS, Body

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;
border-bottom:1px solid #ddd;white-space:nowrap}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.what{white-space:normal}
.ok{color:#186a1d}.bad{color:#b00020;font-weight:600}.muted{color:#777}
.health{padding:.6em 1em;border-radius:6px;margin:.8em 0}
.health.ok{background:#e6f4e7}.health.bad{background:#fde7ea}
.legend span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:-.1em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def size_text(size: object) -> str:
    """1536 → '1.5 KiB'. Pure."""
    if not isinstance(size, int | float):
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def age_text(seconds: float) -> str:
    """90061 → '1 d 1 h'. Pure."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{seconds} s"


def _when(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "never"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age_of(gen: str, now: datetime) -> str:
    try:
        return age_text((now - generation.parse(gen)).total_seconds())
    except ValueError:
        return "?"


def failing(body: Body) -> list[str]:
    """A line for each job whose last run that ran to its end failed, and for each store that
    could not be listed. Pure."""
    found = []
    for job, entry in sorted(body.get("jobs", {}).items()):
        if entry.get("settled", entry.get("outcome")) == FAILURE:
            found.append(
                f"{job}: the last run ({_when(entry.get('ended'))}) ended {entry['outcome']}: "
                f"{entry.get('error', '')}"
            )
    found += [f"cannot list {p}" for p in body.get("stores", {}).get("problems", [])]
    return found


def chart(runs: Sequence[dict[str, Any]], width: int = 1000, height: int = 180) -> str:
    """The last runs as an inline SVG bar chart: each run's duration, its downtime over it,
    failed runs in red. Pure."""
    top = max([float(r.get("duration_seconds") or 0) for r in runs] + [0.001])
    pad, base = 40, height - 24
    slot = (width - pad) / max(len(runs), 1)
    bars = []
    for i, run in enumerate(runs):
        x = pad + i * slot + slot * 0.15
        w = slot * 0.7
        duration = float(run.get("duration_seconds") or 0)
        downtime = float(run.get("downtime_seconds") or 0)
        h = (base - 10) * duration / top
        colour = "#4a7fc1" if run.get("outcome") == SUCCESS else "#d2344a"
        label = (
            f"{run.get('job')} {_when(run.get('started'))}: {run.get('outcome')}, "
            f"{duration:.2f} s" + (f", downtime {downtime:.2f} s" if downtime else "")
        )
        bars.append(
            f'<g class="run"><title>{_e(label)}</title>'
            f'<rect class="duration" x="{x:.1f}" y="{base - h:.1f}" width="{w:.1f}" '
            f'height="{h:.1f}" fill="{colour}"/>'
        )
        if downtime:
            dh = (base - 10) * min(downtime, top) / top
            bars.append(
                f'<rect class="downtime" x="{x + w * 0.25:.1f}" y="{base - dh:.1f}" '
                f'width="{w * 0.5:.1f}" height="{dh:.1f}" fill="#f0a020"/>'
            )
        bars.append("</g>")
    axis = (
        f'<line x1="{pad}" y1="{base}" x2="{width}" y2="{base}" stroke="#999"/>'
        f'<text x="{pad - 4}" y="14" text-anchor="end" font-size="11">{top:.1f} s</text>'
        f'<text x="{pad - 4}" y="{base}" text-anchor="end" font-size="11">0</text>'
        f'<text x="{pad}" y="{height - 6}" font-size="11" fill="#777">oldest</text>'
        f'<text x="{width}" y="{height - 6}" font-size="11" fill="#777" '
        f'text-anchor="end">newest</text>'
    )
    return (
        f'<svg id="runs-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="duration and downtime of the last {len(runs)} '
        f'runs">{axis}{"".join(bars)}</svg>'
    )


def _generations_table(rows: Sequence[dict[str, Any]], now: datetime) -> str:
    lines = [
        "<table><tr><th>kind</th><th>generation</th><th>size</th><th>age</th>"
        "<th>verified at</th><th>complete</th></tr>"
    ]
    for row in sorted(rows, key=lambda r: (r["kind"], r["generation"]), reverse=True):
        complete = bool(row.get("complete"))
        lines.append(
            f'<tr class="generation" data-store="{_e(row["store"])}" '
            f'data-kind="{_e(row["kind"])}" data-generation="{_e(row["generation"])}">'
            f"<td>{_e(row['kind'])}</td><td>{_e(row['generation'])}</td>"
            f'<td class="num">{size_text(row.get("size"))}</td>'
            f'<td class="num">{_age_of(row["generation"], now)}</td>'
            f"<td>{_e(row.get('last_verified') or 'never')}</td>"
            f'<td class="{"ok" if complete else "bad"}">{"yes" if complete else "no"}</td></tr>'
        )
    lines.append("</table>")
    return "".join(lines)


def render(body: Body, problems: Sequence[str], now: datetime) -> str:
    """The status page of state `body`, with `problems` (what `health` finds wrong) at the
    top. Pure."""
    name, role = body.get("name", "?"), body.get("role", "?")
    wrong = list(problems) + failing(body)
    if wrong:
        health = (
            '<div class="health bad" id="health"><strong>unhealthy</strong><ul>'
            + "".join(f"<li>{_e(p)}</li>" for p in wrong)
            + "</ul></div>"
        )
    else:
        health = '<div class="health ok" id="health"><strong>healthy</strong></div>'
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>backup-agent {_e(name)}: status</title><style>{_STYLE}</style></head><body>",
        f"<h1>backup-agent · {_e(role)} <em>{_e(name)}</em></h1>",
        f'<div class="muted">version {_e(__version__)} · page made {_when(now.timestamp())} · '
        '<a href="/metrics">metrics</a></div>',
        health,
    ]
    jobs = body.get("jobs", {})
    parts.append("<h2>Jobs</h2>")
    if jobs:
        parts.append(
            "<table><tr><th>job</th><th>last run ended</th><th>outcome</th><th>took</th>"
            "<th>downtime</th><th>last success</th><th>what it did</th></tr>"
        )
        for job, entry in sorted(jobs.items()):
            ok = entry.get("outcome") == SUCCESS
            downtime = entry.get("downtime_seconds")
            parts.append(
                f'<tr class="job" data-job="{_e(job)}"><td>{_e(job)}</td>'
                f"<td>{_when(entry.get('ended'))}</td>"
                f'<td class="{"ok" if ok else "bad"}">{_e(entry.get("outcome"))}</td>'
                f'<td class="num">{float(entry.get("duration_seconds", 0)):.1f} s</td>'
                f'<td class="num">{"" if downtime is None else f"{downtime:.2f} s"}</td>'
                f"<td>{_when(entry.get('last_success'))}</td>"
                f'<td class="what">{_e(entry.get("summary") or entry.get("error") or "")}</td></tr>'
            )
        parts.append("</table>")
    else:
        parts.append('<p class="muted">no job has run yet</p>')
    runs = body.get("runs", [])
    parts.append(f"<h2>The last {len(runs)} runs</h2>")
    parts.append(
        '<div class="legend muted"><span style="background:#4a7fc1"></span>duration'
        '<span style="background:#f0a020"></span>application downtime'
        '<span style="background:#d2344a"></span>failed</div>'
    )
    parts.append(chart(runs))
    downtime = body.get("downtime", {})
    if downtime:
        parts.append(
            "<p>Application downtime: "
            + ", ".join(
                f"last {_e(kind)} {entry.get('seconds', 0):.2f} s ({_when(entry.get('at'))})"
                for kind, entry in sorted(downtime.items())
            )
            + "</p>"
        )
    stores = body.get("stores", {})
    rows: list[dict[str, Any]] = stores.get("rows", [])
    waiting = [r for r in rows if r.get("store") == "handover"]
    if role == "source":
        parts.append('<h2 id="handover">Waiting in the handover</h2>')
        if waiting:
            parts.append(_generations_table(waiting, now))
        else:
            parts.append('<p class="muted">nothing waits: every generation has travelled</p>')
    parts.append("<h2>Stores</h2>")
    if not rows:
        parts.append('<p class="muted">no listing recorded yet (recorded after each job)</p>')
    by_store: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("store") != "handover":
            by_store.setdefault((row["store"], row["location"]), []).append(row)
    for (store, location), found in sorted(by_store.items()):
        complete = [r for r in found if r.get("complete")]
        ratio = found[-1].get("store_dedup_ratio")
        total = found[-1].get("store_size")
        parts.append(
            f'<h3 class="store" data-store="{_e(store)}">{_e(store)} '
            f'<span class="muted">{_e(location)}</span></h3>'
            f"<p>{len(complete)} complete generation(s)"
            + (f", {size_text(total)} in all" if total is not None else "")
            + (f", deduplication ratio {ratio}" if ratio is not None else "")
            + "</p>"
        )
        parts.append(_generations_table(found, now))
    if stores:
        parts.append(f'<p class="muted">stores listed {_when(stores.get("recorded"))}</p>')
    cert = body.get("certificate")
    if cert:
        expires = cert.get("expires")
        parts.append(
            "<h2>SSH certificate</h2>"
            f"<p>{_e(cert.get('path'))}: "
            + ("valid forever" if expires is None else f"expires {_when(expires)}")
            + "</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
