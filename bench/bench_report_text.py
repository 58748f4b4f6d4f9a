"""Benchmark: ``admin report`` text rendering with a large fleet (no database: rows built here).

Run: ``.venv/bin/python bench/bench_report_text.py [--gateways 1000] [--repeat 5]``.
Each gateway has two front doors and a stale heartbeat (so each also yields a recommendation);
100 usage rows per list. Target (issue 12): the whole report <= 1 s at 1,000 gateways.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

from damm.reports.render_text import render_text
from damm.reports.report import Report, build, recommend


def fleet_report(gateways: int) -> Report:
    from damm.reports.report import Rows

    now = datetime.now(UTC)
    rows = Rows(period="2026-12")
    for n in range(gateways):
        gw = f"gw-{n:05d}"
        rows.gateways.append(
            {
                "gateway_id": gw,
                "region": f"region-{n % 20}",
                "active": True,
                "registered": True,
                "last_heartbeat": now - timedelta(seconds=5 if n % 3 else 500),
                "peer_count": 900,
                "active_peers": 850,
                "load": (n % 100) / 100,
            }
        )
        rows.gateway_devices.append({"gateway_id": gw, "status": "active", "n": 900})
        for door in range(2):
            rows.front_doors.append(
                {
                    "gateway_id": gw,
                    "front_door_id": f"fd{door}",
                    "endpoint": f"192.0.2.{n % 250}:{51820 + door}",
                    "transport": "udp",
                    "priority": door * 10,
                    "active": True,
                    "devices": 450,
                }
            )
    return build(rows, now, 30.0)


def main(gateways: int, repeat: int) -> int:
    start = time.perf_counter()
    report = fleet_report(gateways)
    report.recommendations = recommend(report)
    built = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        text = render_text(report)
        times.append(time.perf_counter() - start)
    print(
        f"gateways {gateways}, front doors {len(report.front_doors)}, "
        f"recommendations {len(report.recommendations)}: {len(text.splitlines())} lines"
    )
    print(f"build + recommend (from rows already read): {built * 1000:.0f} ms")
    print(
        f"render_text median {statistics.median(times) * 1000:.0f} ms, runs "
        + " ".join(f"{t * 1000:.0f}" for t in times)
        + "   (target: whole report <= 1000 ms)"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.exit(main(args.gateways, args.repeat))
