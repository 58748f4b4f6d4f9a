"""The report as one self-contained HTML file: inline CSS and SVG charts, no scripts or fetches."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from damm.reports.render_text import human_bytes, pct
from damm.reports.report import NEAR_CAPACITY_LOAD, NEAR_QUOTA, Report, UsageRow

GREEN = "#2f9e6e"
AMBER = "#d98e04"
RED = "#d1453b"
GREY = "#8a94a6"
BLUE = "#3b6fd1"
STATUS_COLOR = {
    "healthy": GREEN,
    "stale": AMBER,
    "unregistered": GREY,
    "disabled": GREY,
    "active": GREEN,
    "suspended": AMBER,
    "revoked": RED,
}
SEVERITY_COLOR = {"critical": RED, "warning": AMBER, "info": BLUE}

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,
 Arial,sans-serif;
 color:#1d2433;background:#f4f6fa}
header{background:#1d2433;color:#fff;padding:20px 32px}
header h1{margin:0;font-size:22px;font-weight:600}
header p{margin:4px 0 0;color:#b8c1d6}
main{padding:24px 32px;max-width:1280px;margin:0 auto}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin-bottom:20px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.card .v{font-size:26px;font-weight:650}
.card .k{color:#5b6478;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
section{background:#fff;border-radius:10px;padding:16px 20px;margin-bottom:18px;
 box-shadow:0 1px 3px rgba(0,0,0,.08)}
section h2{margin:0 0 12px;font-size:16px}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:18px}
table{border-collapse:collapse;width:100%;font-size:13px}
th{text-align:left;color:#5b6478;font-weight:600;border-bottom:2px solid #e3e7ef;padding:6px 8px}
td{border-bottom:1px solid #eef1f6;padding:6px 8px;vertical-align:top}
tr:last-child td{border-bottom:none}
.pill{display:inline-block;border-radius:999px;padding:1px 9px;font-size:12px;color:#fff}
.rec{display:flex;gap:10px;align-items:baseline;padding:7px 0;border-bottom:1px solid #eef1f6}
.rec:last-child{border-bottom:none}
.muted{color:#8a94a6}
.num{text-align:right;font-variant-numeric:tabular-nums}
svg text{font-family:inherit}
"""


def _pill(text: str, color: str) -> str:
    return f'<span class="pill" style="background:{color}">{escape(text)}</span>'


def bar_chart(
    title: str,
    items: Sequence[tuple[str, float, str, str]],
    *,
    max_value: float,
    threshold: float | None = None,
    width: int = 560,
) -> str:
    """Horizontal bars. ``items``: (label, value, color, value label)."""
    label_w, value_w, row_h, top = 150, 80, 24, 8
    plot_w = width - label_w - value_w
    height = top * 2 + max(1, len(items)) * row_h
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f"<title>{escape(title)}</title>",
    ]
    scale = plot_w / max_value if max_value > 0 else 0.0
    for n, (label, value, color, shown) in enumerate(items):
        y = top + n * row_h
        w = max(0.0, min(value, max_value)) * scale
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" font-size="12" '
            f'fill="#1d2433">{escape(label[:22])}</text>'
        )
        parts.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{plot_w}" height="16" rx="3" fill="#eef1f6"/>'
        )
        parts.append(
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="16" '
            f'rx="3" fill="{color}"><title>{escape(label)}: {escape(shown)}'
            "</title></rect>"
        )
        parts.append(
            f'<text x="{label_w + plot_w + 8}" y="{y + 16}" font-size="12" '
            f'fill="#5b6478">{escape(shown)}</text>'
        )
    if not items:
        parts.append(
            f'<text x="{label_w}" y="{top + 16}" font-size="12" fill="#8a94a6">no data</text>'
        )
    if threshold is not None and max_value > 0:
        x = label_w + threshold * scale
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - top + 4}" '
            'stroke="#d1453b" stroke-dasharray="4 3" stroke-width="1.5"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def stacked_chart(
    title: str, items: Sequence[tuple[str, Sequence[tuple[str, int, str]]]], width: int = 560
) -> str:
    """Horizontal stacked bars: (label, [(part name, count, color)])."""
    label_w, value_w, row_h, top = 150, 80, 24, 8
    plot_w = width - label_w - value_w
    height = top * 2 + max(1, len(items)) * row_h + 22
    biggest = max((sum(c for _, c, _ in parts) for _, parts in items), default=0)
    scale = plot_w / biggest if biggest else 0.0
    out = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f"<title>{escape(title)}</title>",
    ]
    legend: dict[str, str] = {}
    for n, (label, parts) in enumerate(items):
        y = top + n * row_h
        x = float(label_w)
        out.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" font-size="12" '
            f'fill="#1d2433">{escape(label[:22])}</text>'
        )
        for name, count, color in parts:
            legend[name] = color
            w = count * scale
            if w > 0:
                out.append(
                    f'<rect class="bar" x="{x:.1f}" y="{y + 4}" width="{w:.1f}" '
                    f'height="16" fill="{color}"><title>{escape(label)} {escape(name)}: '
                    f"{count}</title></rect>"
                )
            x += w
        out.append(
            f'<text x="{x + 8:.1f}" y="{y + 16}" font-size="12" fill="#5b6478">'
            f"{sum(c for _, c, _ in parts)}</text>"
        )
    ly = height - 10
    lx = label_w
    for name, color in legend.items():
        out.append(
            f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" rx="2" fill="{color}"/>'
            f'<text x="{lx + 14}" y="{ly}" font-size="11" fill="#5b6478">'
            f"{escape(name)}</text>"
        )
        lx += 24 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)


def _table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()
) -> str:
    head = "".join(
        f"<th{' class=num' if i in numeric else ''}>{escape(c)}</th>" for i, c in enumerate(columns)
    )
    if not rows:
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody><tr>"
            f'<td class="muted" colspan="{len(columns)}">none</td></tr></tbody></table>'
        )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _usage_table(rows: list[UsageRow]) -> str:
    return _table(
        ("device", "tier", "gateway", "status", "used", "limit", "share"),
        [
            [
                escape(u.device_id),
                escape(u.tier),
                escape(u.gateway_id),
                _pill(u.status, STATUS_COLOR.get(u.status, GREY)),
                human_bytes(u.used),
                human_bytes(u.byte_limit),
                pct(u.share),
            ]
            for u in rows
        ],
        numeric=(4, 5, 6),
    )


def _load_color(load: float) -> str:
    return RED if load >= 0.9 else AMBER if load >= NEAR_CAPACITY_LOAD else GREEN


def render_html(report: Report) -> str:
    t = report.totals
    cards = [
        ("gateways healthy", f"{t.gateways_healthy}/{t.gateways}"),
        ("devices", str(t.devices)),
        ("active", str(t.devices_by_status.get("active", 0))),
        ("suspended", str(t.devices_by_status.get("suspended", 0))),
        (f"used in {report.period}", human_bytes(t.used_bytes)),
        ("over quota", str(t.over_quota)),
        ("near quota", str(t.near_quota)),
    ]
    card_html = "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
        for k, v in cards
    )
    recs = (
        "".join(
            f'<div class="rec">{_pill(r.severity, SEVERITY_COLOR.get(r.severity, GREY))}'
            f"<div><b>{escape(r.kind.replace('_', ' '))}</b> · {escape(r.subject)}<br>"
            f'<span class="muted">{escape(r.message)}</span></div></div>'
            for r in report.recommendations
        )
        or '<p class="muted">Nothing to do.</p>'
    )

    region_chart = bar_chart(
        "Region load (healthy gateways)",
        [
            (r.region, r.load, _load_color(r.load), f"{r.load:.0%} · {r.healthy}/{r.gateways}")
            for r in report.regions
        ],
        max_value=1.0,
        threshold=NEAR_CAPACITY_LOAD,
    )
    gw_chart = bar_chart(
        "Gateway load",
        [
            (
                g.gateway_id,
                g.load,
                STATUS_COLOR.get(g.status, GREY) if g.status != "healthy" else _load_color(g.load),
                f"{g.load:.0%} {g.status}",
            )
            for g in report.gateways[:40]
        ],
        max_value=1.0,
        threshold=NEAR_CAPACITY_LOAD,
    )
    pool_chart = bar_chart(
        "Egress pool headroom",
        [
            (p.pool_id, p.headroom, RED if p.low_headroom else GREEN, f"{p.headroom:.0%} free")
            for p in report.egress_pools
        ],
        max_value=1.0,
        threshold=0.2,
    )
    tier_chart = stacked_chart(
        "Devices by tier and state",
        [
            (
                tr.tier,
                [
                    (s, tr.devices.get(s, 0), STATUS_COLOR[s])
                    for s in ("active", "suspended", "revoked")
                ],
            )
            for tr in report.tiers
        ],
    )
    top_max = max((u.used for u in report.top_usage), default=0)
    usage_chart = bar_chart(
        f"Top usage {report.period}",
        [
            (
                u.device_id,
                float(u.used),
                RED
                if u.share is not None and u.share > 1
                else AMBER
                if u.share is not None and u.share >= NEAR_QUOTA
                else BLUE,
                human_bytes(u.used),
            )
            for u in report.top_usage[:15]
        ],
        max_value=float(top_max),
    )

    gateways = _table(
        ("gateway", "region", "status", "heartbeat", "load", "peers", "active devices"),
        [
            [
                escape(g.gateway_id),
                escape(g.region),
                _pill(g.status, STATUS_COLOR.get(g.status, GREY)),
                "never" if g.heartbeat_age_s is None else f"{g.heartbeat_age_s:.0f}s ago",
                pct(g.load),
                str(g.peer_count),
                str(g.devices_active),
            ]
            for g in report.gateways
        ],
        numeric=(4, 5, 6),
    )
    regions = _table(
        ("region", "gateways", "healthy", "stale", "load", "headroom", "active devices", "peers"),
        [
            [
                escape(r.region),
                str(r.gateways),
                str(r.healthy),
                str(r.stale),
                pct(r.load),
                pct(r.headroom),
                str(r.devices_active),
                str(r.peers),
            ]
            for r in report.regions
        ],
        numeric=(1, 2, 3, 4, 5, 6, 7),
    )
    doors = _table(
        ("gateway", "front door", "endpoint", "priority", "active", "devices"),
        [
            [
                escape(d.gateway_id),
                escape(d.front_door_id),
                f"<code>{escape(d.endpoint)}</code>",
                str(d.priority),
                "yes" if d.active else "no",
                str(d.devices) if d.devices else '<span class="muted">never used</span>',
            ]
            for d in report.front_doors
        ],
        numeric=(3, 5),
    )
    pools = _table(
        (
            "pool",
            "provider",
            "region",
            "countries",
            "IPs",
            "load",
            "headroom",
            "assigned / capacity",
            "active devices",
            "traffic",
        ),
        [
            [
                escape(p.pool_id),
                escape(p.provider),
                escape(p.region),
                escape(",".join(p.countries)),
                escape(", ".join(p.ips)),
                pct(p.load),
                pct(p.headroom) + (" " + _pill("low", RED) if p.low_headroom else ""),
                f"{p.devices_assigned} / {p.addresses * p.devices_per_address}",
                str(p.devices_active),
                human_bytes(p.traffic_bytes),
            ]
            for p in report.egress_pools
        ],
        numeric=(5, 6, 7, 8, 9),
    )
    tiers = _table(
        ("tier", "byte limit", "session limit", "active", "suspended", "revoked"),
        [
            [
                escape(tr.tier),
                human_bytes(tr.byte_limit),
                str(tr.session_limit or "-"),
                str(tr.devices.get("active", 0)),
                str(tr.devices.get("suspended", 0)),
                str(tr.devices.get("revoked", 0)),
            ]
            for tr in report.tiers
        ],
        numeric=(1, 2, 3, 4, 5),
    )

    over, near = _usage_table(report.over_quota), _usage_table(report.near_quota)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DAMM fleet report {escape(report.period)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>DAMM fleet report</h1>
<p>generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC · usage period {escape(report.period)}
 · heartbeat ttl {report.heartbeat_ttl_s:.0f}s</p></header>
<main>
<div class="cards">{card_html}</div>
<section id="recommendations"><h2>Recommendations</h2>{recs}</section>
<div class="grid2">
<section id="regions-chart"><h2>Regions</h2>{region_chart}</section>
<section id="tiers-chart"><h2>Devices by tier and state</h2>{tier_chart}</section>
<section id="gateways-chart"><h2>Gateways</h2>{gw_chart}</section>
<section id="pools-chart"><h2>Egress pools</h2>{pool_chart}</section>
</div>
<section id="usage-chart"><h2>Top usage</h2>{usage_chart}</section>
<section id="regions"><h2>Regions</h2>{regions}</section>
<section id="gateways"><h2>Gateways</h2>{gateways}</section>
<section id="front-doors"><h2>Front doors</h2>{doors}</section>
<section id="egress-pools"><h2>Egress pools</h2>{pools}</section>
<section id="tiers"><h2>Tiers</h2>{tiers}</section>
<section id="over-quota"><h2>Over quota ({t.over_quota})</h2>{over}</section>
<section id="near-quota"><h2>Near quota, ≥{NEAR_QUOTA:.0%} ({t.near_quota})</h2>{near}</section>
<section id="top-usage"><h2>Top usage</h2>{_usage_table(report.top_usage)}</section>
</main></body></html>
"""
