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
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08);
 min-width:0;overflow-wrap:anywhere}
.card .v{font-size:26px;font-weight:650}
.card .k{color:#5b6478;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
section{background:#fff;border-radius:10px;padding:16px 20px;margin-bottom:18px;
 box-shadow:0 1px 3px rgba(0,0,0,.08);min-width:0}
section h2{margin:0 0 12px;font-size:16px;overflow-wrap:anywhere}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,480px),1fr));gap:18px}
table{border-collapse:collapse;width:100%;font-size:13px}
th{text-align:left;color:#5b6478;font-weight:600;border-bottom:2px solid #e3e7ef;padding:6px 8px}
td{border-bottom:1px solid #eef1f6;padding:6px 8px;vertical-align:top;overflow-wrap:anywhere}
tr:last-child td{border-bottom:none}
.pill{display:inline-block;border-radius:999px;padding:1px 9px;font-size:12px;color:#fff;
 white-space:nowrap}
.rec{display:flex;gap:10px;align-items:baseline;padding:7px 0;border-bottom:1px solid #eef1f6}
.rec>div{min-width:0;overflow-wrap:anywhere}
.rec:last-child{border-bottom:none}
.muted{color:#8a94a6}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;overflow-wrap:normal}
.chart{display:grid;grid-template-columns:minmax(0,14rem) minmax(5rem,1fr) max-content;
 gap:4px 10px;align-items:center;margin:0;font-size:12px}
.chart .row{display:contents}
.chart .label{text-align:right;overflow-wrap:anywhere;line-height:1.25}
.chart .value{color:#5b6478;white-space:nowrap;font-variant-numeric:tabular-nums;text-align:right}
.chart svg{display:block;width:100%;height:16px}
.chart .legend{grid-column:1/-1;display:flex;flex-wrap:wrap;gap:4px 14px;color:#5b6478;
 font-size:11px;padding-top:4px}
.chart .legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
@media (max-width:640px){
 header{padding:16px}
 main{padding:12px}
 section{padding:12px}
 .chart{grid-template-columns:minmax(0,1fr) max-content;gap:2px 8px}
 .chart .label{grid-column:1/-1;text-align:left;padding-top:4px}
 table,tbody,tr,td{display:block;width:100%}
 thead{display:none}
 tr{border-bottom:1px solid #e3e7ef;padding:4px 0}
 tr:last-child{border-bottom:none}
 td{display:flex;justify-content:space-between;gap:12px;border:none;padding:2px 0;
  text-align:right}
 td::before{content:attr(data-label);color:#5b6478;text-align:left;flex:none;max-width:45%}
 td.muted::before{content:none}
}
"""


def _pill(text: str, color: str) -> str:
    return f'<span class="pill" style="background:{color}">{escape(text)}</span>'


def _track(label: str, parts: Sequence[tuple[str, float, str]], threshold: float | None) -> str:
    """One bar as inline SVG, 0-100 wide and stretched to its grid cell: ``parts`` are
    (name, share of the full width 0..1, colour), laid left to right."""
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 16" preserveAspectRatio="none" '
        'aria-hidden="true"><rect x="0" y="0" width="100" height="16" fill="#eef1f6"/>'
    ]
    x = 0.0
    for name, share, color in parts:
        w = max(0.0, min(share, 1.0 - x / 100) * 100)
        if w > 0:
            out.append(
                f'<rect class="bar" x="{x:.2f}" y="0" width="{w:.2f}" height="16" '
                f'fill="{color}"><title>{escape(label)}: {escape(name)}</title></rect>'
            )
        x += w
    if threshold is not None:
        t = max(0.0, min(threshold, 1.0)) * 100
        out.append(
            f'<line x1="{t:.2f}" y1="0" x2="{t:.2f}" y2="16" stroke="#d1453b" '
            'stroke-dasharray="4 3" stroke-width="1.5" vector-effect="non-scaling-stroke"/>'
        )
    out.append("</svg>")
    return "".join(out)


def _chart(title: str, rows: Sequence[str], legend: str = "") -> str:
    """Labels, bars and values share one grid, so every bar has the same track width; labels
    wrap instead of being cut, and on a narrow screen they move above their bar."""
    body = "".join(rows) or '<span class="label muted">no data</span>'
    return f'<figure class="chart" aria-label="{escape(title)}">{body}{legend}</figure>'


def _row(label: str, track: str, value: str) -> str:
    return (
        f'<div class="row"><span class="label">{escape(label)}</span>{track}'
        f'<span class="value">{escape(value)}</span></div>'
    )


def bar_chart(
    title: str,
    items: Sequence[tuple[str, float, str, str]],
    *,
    max_value: float,
    threshold: float | None = None,
) -> str:
    """Horizontal bars. ``items``: (label, value, color, value label)."""
    scale = 1 / max_value if max_value > 0 else 0.0
    return _chart(
        title,
        [
            _row(
                label,
                _track(label, [(shown, value * scale, color)], threshold if scale else None),
                shown,
            )
            for label, value, color, shown in items
        ],
    )


def stacked_chart(title: str, items: Sequence[tuple[str, Sequence[tuple[str, int, str]]]]) -> str:
    """Horizontal stacked bars: (label, [(part name, count, color)])."""
    biggest = max((sum(c for _, c, _ in parts) for _, parts in items), default=0)
    legend: dict[str, str] = {}
    rows = []
    for label, parts in items:
        for name, _, color in parts:
            legend[name] = color
        shares = [
            (f"{name} {count}", count / biggest if biggest else 0.0, color)
            for name, count, color in parts
        ]
        rows.append(_row(label, _track(label, shares, None), str(sum(c for _, c, _ in parts))))
    keys = "".join(
        f'<span><i style="background:{color}"></i>{escape(name)}</span>'
        for name, color in legend.items()
    )
    return _chart(title, rows, f'<div class="legend">{keys}</div>' if legend else "")


def _table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()
) -> str:
    """A table; each cell carries its column name, shown beside it when a phone stacks rows."""
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
            f'<td data-label="{escape(columns[i])}"{" class=num" if i in numeric else ""}>'
            f"{cell}</td>"
            for i, cell in enumerate(row)
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
                str(d.devices) if d.devices else '<span class="muted">none attached</span>',
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
