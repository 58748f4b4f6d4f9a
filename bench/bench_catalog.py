"""Catalog cost at fleet scale: 1,000 gateways x 3 front doors.

Targets: build + sign <= 20 ms on the control plane (it re-signs whenever health changes), and
decode + verify <= 2 ms on the device (it verifies on every failover, possibly on a phone).

    .venv/bin/python bench/bench_catalog.py [--gateways N] [--repeat N]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import statistics
import time
from collections.abc import Callable

from damm.catalog.document import CatalogFrontDoor, CatalogGateway, decode_signed, encode_signed
from damm.catalog.signing import CatalogSigner, build_catalog
from damm.catalog.verify import initial_trust, verify

BUILD_SIGN_TARGET_MS = 20.0
VERIFY_TARGET_MS = 2.0
NOW = 1_700_000_000


def fleet(count: int) -> list[CatalogGateway]:
    gateways = []
    for i in reversed(range(count)):  # unsorted on purpose: building must sort
        key = base64.b64encode(hashlib.sha256(i.to_bytes(4, "big")).digest()).decode()
        doors = tuple(
            CatalogFrontDoor(
                id=f"gw-{i:05d}-fd{j}",
                endpoint=f"198.{51 + j}.{i // 256 % 256}.{i % 256}:{51820 + j}",
                transport="udp",
                priority=10 * (3 - j),
            )
            for j in range(3)
        )
        gateways.append(
            CatalogGateway(
                id=f"gw-{i:05d}",
                region="eu",
                public_key=key,
                front_doors=doors,
                egress_countries=("NL", "DE"),
            )
        )
    return gateways


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm caches (decoders, key objects) as a long-running process would have them
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return statistics.median(samples), p95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    signer = CatalogSigner.generate()
    gateways = fleet(args.gateways)
    trust = initial_trust("eu", signer.key_id, signer.public_key_b64)

    def build_and_sign() -> bytes:
        catalog = build_catalog("eu", gateways, version=1, now=NOW, ttl_seconds=3600)
        return encode_signed(signer.sign(catalog))

    wire = build_and_sign()

    def client_verify() -> object:
        return verify(decode_signed(wire), trust, now=NOW)

    print(
        f"catalog: {args.gateways} gateways x 3 front doors, {len(wire) / 1024:.0f} KiB on the wire"
    )
    rows = [
        ("build + sign", measure(build_and_sign, args.repeat), BUILD_SIGN_TARGET_MS),
        ("decode + verify", measure(client_verify, args.repeat), VERIFY_TARGET_MS),
    ]
    for name, (median, p95), target in rows:
        print(
            f"{name:<16} median {median:7.2f} ms  p95 {p95:7.2f} ms  "
            f"target {target:5.1f} ms  ratio median {median / target:4.2f} "
            f"p95 {p95 / target:4.2f}  "
            f"{'ok' if median <= target else 'OVER'}"
        )


if __name__ == "__main__":
    main()
