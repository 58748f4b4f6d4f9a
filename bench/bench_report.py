"""`damm admin report` end to end at fleet scale: the CLI process, its queries, its rendering.

Method (printed with the figures):
- a real PostgreSQL with the read models migrated; the rows are inserted with SQL
  (generate_series), as the projector would hold them for --gateways gateways in --regions
  regions (two front doors each, a heartbeat each, a third of them stale), --devices devices
  spread over them (1 in 10 revoked, each with a usage total this period, some near or over
  their tier's byte limit), a token per tier and an announced catalog key. The report reads only
  these tables, so this is the database a fleet of that size hands it;
- end to end: `damm admin report` (text) as a new process, DAMM_DATABASE_URL set, median of
  --repeat; next to it the floor: `damm admin report --help` (interpreter start and imports),
  same repeat; --baseline DAMM times another build's `damm` the same way, in the same run;
- each query of the report (`report.gather`) timed alone, in this process, median of --repeat.

    .venv/bin/python bench/bench_report.py [--gateways 1000] [--devices 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from damm import settings
from damm.domain.periods import period_at
from damm.projections.migrate import migrate
from damm.reports import report as rp
from damm.stack.postgres import Postgres

TARGET_S = 1.0

POPULATE = """
INSERT INTO tiers (tier, regions, exit_countries, session_limit, byte_limit, status, defined_by,
                   updated_at)
SELECT 'tier' || t, ARRAY['region-0'], '{}', 5, 10000000000, 'active', 'bench', now()
FROM generate_series(0, 9) t;
INSERT INTO tokens (token_id, token_hash, tier, issued_by, issued_at, active_sessions)
SELECT 'tok' || t, md5('tok' || t), 'tier' || t, 'bench', now(), t FROM generate_series(0, 9) t;
INSERT INTO gateways (gateway_id, region, token_hash, public_key, listen_port, registered_at,
                      added_at)
SELECT 'gw' || lpad(g::text, 5, '0'), 'region-' || (g % $2), md5('gw' || g), md5('k' || g),
       51820, now(), now()
FROM generate_series(0, $1 - 1) g;
INSERT INTO front_doors (gateway_id, front_door_id, endpoint, transport, priority, active)
SELECT 'gw' || lpad(g::text, 5, '0'), 'fd' || f, '198.51.100.' || f || ':51820', 'udp', f * 10,
       true
FROM generate_series(0, $1 - 1) g, generate_series(1, 2) f;
INSERT INTO gateway_health (gateway_id, last_heartbeat, peer_count, active_peers, rx_bytes,
                            tx_bytes, load, peer_set_revision)
SELECT 'gw' || lpad(g::text, 5, '0'),
       now() - CASE WHEN g % 3 = 0 THEN interval '10 minutes' ELSE interval '5 seconds' END,
       $3 / $1, $3 / $1 / 2, 0, 0, (g % 100) / 100.0, 1
FROM generate_series(0, $1 - 1) g;
INSERT INTO devices (device_id, public_key, token_id, tier, gateway_id, front_door_id, address,
                     region, status, enrolled_at, updated_at)
SELECT 'd' || lpad(d::text, 8, '0'), md5('p' || d), 'tok' || (d % 10), 'tier' || (d % 10),
       'gw' || lpad((d % $1)::text, 5, '0'), 'fd' || (1 + d % 2), '10.' || (d / 65536) || '.'
       || (d / 256 % 256) || '.' || (d % 256), 'region-' || (d % $1 % $2),
       CASE WHEN d % 10 = 0 THEN 'revoked' ELSE 'active' END, now(), now()
FROM generate_series(0, $3 - 1) d;
INSERT INTO usage_totals (device_id, period, rx_bytes, tx_bytes)
SELECT 'd' || lpad(d::text, 8, '0'), $4, (d::bigint * 7919) % 6000000000, (d::bigint * 104729) % 5000000000
FROM generate_series(0, $3 - 1) d;
INSERT INTO signing_keys (key_id, public_key, announced_at) VALUES ('next', 'pk', now());
"""


def median_run(argv: list[str], env: dict[str, str], repeat: int) -> tuple[float, int]:
    times: list[float] = []
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
        size = len(done.stdout)
    return statistics.median(times), size


async def query_times(dsn: str, period: str, repeat: int) -> list[tuple[str, float]]:
    """Each query of ``report.gather`` alone: the function, with a connection that times."""
    out: dict[str, list[float]] = {}
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})

    class Timed:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def transaction(self, **kw: Any) -> Any:
            return self.inner.transaction(**kw)

        async def _timed(self, name: str, sql: str, *args: Any) -> Any:
            t0 = time.perf_counter()
            result = await getattr(self.inner, name)(sql, *args)
            flat = " ".join(sql.split())
            label = flat if len(flat) <= 90 else f"{flat[:55]} … {flat[-30:]}"
            out.setdefault(label, []).append(time.perf_counter() - t0)
            return result

        async def fetch(self, sql: str, *args: Any) -> Any:
            return await self._timed("fetch", sql, *args)

        async def fetchrow(self, sql: str, *args: Any) -> Any:
            return await self._timed("fetchrow", sql, *args)

        async def fetchval(self, sql: str, *args: Any) -> Any:
            return await self._timed("fetchval", sql, *args)

    try:
        for _ in range(repeat):
            await rp.gather(Timed(conn), period)
    finally:
        await conn.close()
    return sorted(((k, statistics.median(v)) for k, v in out.items()), key=lambda kv: -kv[1])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateways", type=int, default=1_000)
    ap.add_argument("--regions", type=int, default=20)
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", help="another build's `damm` (e.g. main's), timed in turn")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="damm-bench-report-", dir="/tmp"))
    pg = Postgres(root / "pg", delete_on_stop=True)
    dsn = pg.start()
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn, "damm")
        await conn.execute("SET search_path TO damm")
        period = period_at(datetime.now(UTC), settings.usage_period())
        t0 = time.perf_counter()
        sql = (  # the bench's own integers and a period label: no outside input
            POPULATE.replace("$1", str(int(args.gateways)))
            .replace("$2", str(int(args.regions)))
            .replace("$3", str(int(args.devices)))
            .replace("$4", f"'{period}'")
        )
        await conn.execute(sql)
        await conn.execute("ANALYZE")
        await conn.close()
        print(f"method: see `{Path(__file__).name}` docstring; {args.gateways} gateways, "
              f"{args.devices} devices, read models filled in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        env = {**os.environ, "DAMM_DATABASE_URL": dsn}
        damm = str(Path(sys.executable).parent / "damm")
        builds = [("this build", damm)]
        if args.baseline:
            builds.insert(0, ("baseline", args.baseline))
        for name, exe in builds:
            floor, _ = median_run([exe, "admin", "report", "--help"], env, args.repeat)
            whole, size = median_run([exe, "admin", "report"], env, args.repeat)
            print(f"`damm admin report` end to end, {name}: median {whole:.3f} s over "
                  f"{args.repeat} ({size / 1e3:.0f} kB of text; target <= {TARGET_S:.0f} s); "
                  f"the process floor (`damm admin report --help`): {floor:.3f} s")  # fmt: skip
        queries = await query_times(dsn, period, args.repeat)
        total = sum(t for _, t in queries)
        print(f"queries (median each, {total * 1000:.0f} ms together):")
        for label, t in queries:
            print(f"  {t * 1000:7.1f} ms  {label}")
        t0 = time.perf_counter()
        rep = await rp.generate(dsn, ttl_s=90.0)
        t1 = time.perf_counter()
        from damm.reports.render_text import render_text

        render_text(rep)
        print(f"in process: generate {t1 - t0:.3f} s, render_text {time.perf_counter() - t1:.3f} s")
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
