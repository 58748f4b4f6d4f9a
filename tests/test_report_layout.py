"""The HTML report's layout in headless Chromium at a desktop and a phone width.

The report is built from hand-made rows (no servers): the longest ids the subjects allow, loads
and headrooms at 0 % and 100 %, every gateway status. The page itself is asked whether any
element sticks out of its card, overflows its own box, or is cut off by its chart. Screenshots
are kept in an artefact directory (printed, ignored by git) for a person to look at.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from damm.reports.render_html import render_html
from damm.reports.report import Report, Rows, build

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(
    os.environ.get("DAMM_TEST_ARTEFACTS", Path(__file__).resolve().parents[1] / "test-artefacts")
)
WIDTHS = (1280, 390)
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

# Every box that is drawn as a card; nothing inside one may leave it.
CHECK_LAYOUT = """
() => {
  const problems = [];
  const tol = 0.5;
  const name = (el) => {
    const id = el.id ? '#' + el.id : '';
    const cls = el.getAttribute('class') ? '.' + el.getAttribute('class').split(' ').join('.') : '';
    const text = (el.textContent || '').trim().slice(0, 40);
    return `${el.tagName.toLowerCase()}${id}${cls} "${text}"`;
  };
  const page = document.documentElement;
  if (page.scrollWidth > window.innerWidth + tol) {
    problems.push(`page scrolls sideways: ${page.scrollWidth} > ${window.innerWidth}`);
  }
  for (const card of document.querySelectorAll('section, .card')) {
    const c = card.getBoundingClientRect();
    for (const el of card.querySelectorAll('*')) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue;
      if (r.left < c.left - tol || r.right > c.right + tol) {
        problems.push(`${name(el)} [${r.left.toFixed(1)}, ${r.right.toFixed(1)}] leaves ` +
                      `${name(card)} [${c.left.toFixed(1)}, ${c.right.toFixed(1)}]`);
      }
      if (!(el instanceof SVGElement) && el.scrollWidth > el.clientWidth + 1 &&
          getComputedStyle(el).display !== 'inline') {
        problems.push(`${name(el)} overflows itself: ${el.scrollWidth} > ${el.clientWidth}`);
      }
    }
  }
  for (const svg of document.querySelectorAll('svg')) {
    const s = svg.getBoundingClientRect();
    for (const el of svg.querySelectorAll('text, rect, line')) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue;
      if (r.left < s.left - tol || r.right > s.right + tol ||
          r.top < s.top - tol || r.bottom > s.bottom + tol) {
        problems.push(`${name(el)} is cut off by its chart ${name(svg.closest('section'))}: ` +
                      `[${r.left.toFixed(1)}, ${r.right.toFixed(1)}] in ` +
                      `[${s.left.toFixed(1)}, ${s.right.toFixed(1)}]`);
      }
    }
  }
  return problems;
}
"""


def long_id(prefix: str, n: int) -> str:
    return (prefix + f"-{n:02d}-" + "0123456789abcdef" * 4)[:64]


def awkward_report() -> Report:
    """Long ids, 0 % and 100 %, every status: the cases that broke the layout."""
    beat = NOW - timedelta(seconds=5)
    gateways: list[dict[str, Any]] = []
    for n, (active, registered, heartbeat, load) in enumerate(
        [
            (True, True, beat, 0.0),
            (True, True, beat, 1.0),
            (True, True, NOW - timedelta(hours=3), 0.0),
            (True, False, None, 0.0),
            (False, True, beat, 0.5),
        ]
    ):
        gateways.append(
            {
                "gateway_id": long_id("gateway", n),
                "region": "eu-central-with-a-long-name" if n % 2 else "eu",
                "active": active,
                "registered": registered,
                "last_heartbeat": heartbeat,
                "load": load,
                "peer_count": 1000 * n,
                "active_peers": 999 * n,
            }
        )
    devices = [long_id("device", n) for n in range(12)]
    usage = [
        {
            "device_id": device,
            "tier": "platinum-unlimited-business",
            "gateway_id": gateways[n % len(gateways)]["gateway_id"],
            "status": ("active", "suspended", "revoked")[n % 3],
            "rx_bytes": 10**12 // (n + 1),
            "tx_bytes": 10**9,
            "used": 10**12 // (n + 1) + 10**9,
            "byte_limit": 10**11,
        }
        for n, device in enumerate(devices)
    ]
    rows = Rows(
        period="2026-11",
        gateways=gateways,
        gateway_devices=[
            {"gateway_id": g["gateway_id"], "status": "active", "n": 40} for g in gateways
        ],
        front_doors=[
            {
                "gateway_id": g["gateway_id"],
                "front_door_id": long_id("fd", n),
                "endpoint": "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:51820",
                "transport": "udp",
                "priority": 10 * n,
                "active": n % 2 == 0,
                "devices": 0 if n % 2 else 40,
            }
            for n, g in enumerate(gateways)
        ],
        pools=[
            {
                "pool_id": long_id("pool", n),
                "provider": "a-provider-with-a-long-name",
                "region": "eu",
                "countries": ["DE", "NL", "FR", "BE", "LU", "AT", "CH"],
                "ips": [f"198.51.100.{i}" for i in range(8)],
                "active": True,
                "devices_active": 100 * n,
                # a full pool and an empty one: 0% and 100% labels must fit their cards
                "devices_per_address": 128,
                "devices_assigned": 8 * 128 * (1 - n),
                "traffic_bytes": 0,
                "transfer_per_address": None,
            }
            for n in range(2)
        ],
        tiers=[
            {
                "tier": "platinum-unlimited-business",
                "byte_limit": 10**11,
                "session_limit": 10,
                "status": "active",
            },
            {"tier": "free", "byte_limit": None, "session_limit": None, "status": "active"},
        ],
        tier_devices=[
            {"tier": "platinum-unlimited-business", "status": s, "n": n}
            for s, n in (("active", 1200), ("suspended", 30), ("revoked", 7))
        ],
        top_usage=usage,
        quota=usage[:6],
        quota_counts={"near": 0, "over": 6},
        used_bytes=sum(u["used"] for u in usage),
        sessions_at_limit=[
            {
                "token_id": long_id("token", 0),
                "tier": "platinum-unlimited-business",
                "active_sessions": 10,
                "session_limit": 10,
            }
        ],
    )
    return build(rows, NOW, 90)


def test_awkward_report_has_the_cases_that_broke() -> None:
    """The fixture really holds what the layout must survive (the report code may change)."""
    rep = awkward_report()
    html = render_html(rep)
    assert {g.status for g in rep.gateways} == {"healthy", "stale", "unregistered", "disabled"}
    assert "0% healthy" in html and "100% healthy" in html
    assert max(len(u.device_id) for u in rep.top_usage) == 64
    for u in rep.top_usage[:15]:
        assert u.device_id in html  # the whole id, not a cut one


@pytest.fixture
def artefacts() -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    return ARTEFACTS


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed at /usr/bin")
@pytest.mark.parametrize("width", WIDTHS)
async def test_nothing_leaves_its_card(width: int, tmp_path: Path, artefacts: Path) -> None:
    from playwright.async_api import async_playwright

    rep = awkward_report()
    page_path = tmp_path / "report.html"
    page_path.write_text(render_html(rep), encoding="utf-8")
    shot = artefacts / f"report-{width}.png"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = await browser.new_page(viewport={"width": width, "height": 900})
            await page.goto(page_path.as_uri())
            await page.screenshot(path=str(shot), full_page=True)
            problems: list[str] = await page.evaluate(CHECK_LAYOUT)
            assert await page.locator("figure.chart").count() >= 5
            shown = await page.locator("#usage-chart").inner_text()
            gauges = await page.locator("#gateways-chart").inner_text()
        finally:
            await browser.close()
    print(f"report screenshot at {width}px: {shot}")
    assert problems == [], "\n".join(problems[:40])
    # Whole ids as visible text (a tooltip does not count), and the labels that overflowed.
    assert all(u.device_id in shown for u in rep.top_usage[:15])
    assert "0% healthy" in gauges and "0% unregistered" in gauges
