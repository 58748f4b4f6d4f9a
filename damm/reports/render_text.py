"""The report as terminal tables (rich), returned as text so it can go to a file too."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from damm.reports.report import Report, UsageRow


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _table(
    console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    tbl = Table(title=title, title_justify="left")
    for col in columns:
        tbl.add_column(col)
    for row in rows:
        tbl.add_row(*("" if v is None else str(v) for v in row))
    if not rows:
        tbl.add_row(*(["(none)"] + [""] * (len(columns) - 1)))
    console.print(tbl)


def _usage_rows(rows: list[UsageRow]) -> list[list[Any]]:
    return [
        [
            u.device_id,
            u.tier,
            u.gateway_id,
            u.status,
            human_bytes(u.used),
            human_bytes(u.byte_limit),
            pct(u.share),
        ]
        for u in rows
    ]


def render_text(report: Report, width: int = 120, color: bool = False) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=color, no_color=not color)
    t = report.totals
    console.print(
        f"DAMM fleet report — {report.generated_at:%Y-%m-%d %H:%M:%S %Z} — period {report.period}"
    )
    status = ", ".join(f"{k} {v}" for k, v in t.devices_by_status.items()) or "none"
    console.print(
        f"gateways {t.gateways_healthy}/{t.gateways} healthy · devices {t.devices} "
        f"({status}) · used {human_bytes(t.used_bytes)} · near quota {t.near_quota} · "
        f"over quota {t.over_quota}"
    )
    console.print()
    _table(
        console,
        "Recommendations",
        ("severity", "kind", "subject", "advice"),
        [[r.severity, r.kind, r.subject, r.message] for r in report.recommendations],
    )
    _table(
        console,
        "Regions",
        (
            "region",
            "gateways",
            "healthy",
            "stale",
            "load",
            "headroom",
            "active devices",
            "peers",
            "near capacity",
        ),
        [
            [
                r.region,
                r.gateways,
                r.healthy,
                r.stale,
                pct(r.load),
                pct(r.headroom),
                r.devices_active,
                r.peers,
                "yes" if r.near_capacity else "",
            ]
            for r in report.regions
        ],
    )
    _table(
        console,
        "Gateways",
        (
            "gateway",
            "region",
            "status",
            "heartbeat age",
            "load",
            "peers",
            "active devices",
            "devices",
        ),
        [
            [
                g.gateway_id,
                g.region,
                g.status,
                "-" if g.heartbeat_age_s is None else f"{g.heartbeat_age_s:.0f}s",
                pct(g.load),
                g.peer_count,
                g.devices_active,
                g.devices_total,
            ]
            for g in report.gateways
        ],
    )
    _table(
        console,
        "Front doors",
        ("gateway", "front door", "endpoint", "priority", "active", "devices", "with traffic"),
        [
            [
                d.gateway_id,
                d.front_door_id,
                d.endpoint,
                d.priority,
                "yes" if d.active else "no",
                d.devices,
                d.devices_seen,
            ]
            for d in report.front_doors
        ],
    )
    if report.catalog_keys:
        _table(
            console,
            "Announced catalog signing keys",
            ("key", "announced", "fetched by", "active devices"),
            [
                [k.key_id, k.announced_at, k.devices_with_key, k.devices_active]
                for k in report.catalog_keys
            ],
        )
    _table(
        console,
        "Egress pools",
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
                p.pool_id,
                p.provider,
                p.region,
                ",".join(p.countries),
                ",".join(p.ips),
                pct(p.load),
                pct(p.headroom) + (" LOW" if p.low_headroom else ""),
                f"{p.devices_assigned} / {p.addresses * p.devices_per_address}",
                p.devices_active,
                human_bytes(p.traffic_bytes),
            ]
            for p in report.egress_pools
        ],
    )
    _table(
        console,
        "Devices by tier",
        ("tier", "byte limit", "session limit", "active", "suspended", "revoked"),
        [
            [
                tr.tier,
                human_bytes(tr.byte_limit),
                tr.session_limit or "-",
                tr.devices.get("active", 0),
                tr.devices.get("suspended", 0),
                tr.devices.get("revoked", 0),
            ]
            for tr in report.tiers
        ],
    )
    columns = ("device", "tier", "gateway", "status", "used", "limit", "share")
    _table(console, f"Top usage ({report.period})", columns, _usage_rows(report.top_usage))
    _table(console, f"Over quota ({t.over_quota})", columns, _usage_rows(report.over_quota))
    _table(console, f"Near quota, ≥80% ({t.near_quota})", columns, _usage_rows(report.near_quota))
    return buf.getvalue()
