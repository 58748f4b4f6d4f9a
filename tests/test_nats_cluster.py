"""The production cluster configuration, and the loopback cluster `damm up --cluster` runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nats.js.api import KeyValueConfig

from damm.control.leadership import Leadership
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.keys import nats_identity
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.nats_cluster import NatsCluster, until_meta_leader
from damm.stack.nats_config import callout_env, production_cluster
from damm.stack.nats_server import binary
from damm.stack.stackfile import StackFile
from damm.subjects import EVENTS_STREAM, LEASE_BUCKET, TELEMETRY_STREAM
from tests.fleet import enroll, setup_fleet

ROOT = Path(__file__).resolve().parent.parent


def test_ops_cluster_conf_is_generated_and_valid(tmp_path: Path) -> None:
    text = (ROOT / "ops" / "nats-cluster.conf").read_text()
    assert text == production_cluster()
    path = tmp_path / "nats.conf"
    path.write_text(text.replace("/var/lib/damm", str(tmp_path)))
    env = {
        **os.environ,
        "DAMM_NATS_NODE": "nats-1",
        **{f"DAMM_{r}_PASSWORD": "x" * 12 for r in ("CONTROL", "ADMIN", "SYS")},
        **callout_env(),
    }
    done = subprocess.run(
        [binary(), "-t", "-c", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_a_loopback_cluster_replicates_the_streams_three_times(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "cluster")
    cluster.start()
    try:
        nc = await connect(cluster.url, user="control", password=cluster.passwords["control"])
        try:
            js = nc.jetstream()
            await until_meta_leader(js)
            await ensure_streams(js, 3)
            await ensure_streams(js, 1)  # a replica without the setting must not shrink it
            for name in (EVENTS_STREAM, TELEMETRY_STREAM):
                info = await js.stream_info(name)
                assert info.config.num_replicas == 3
                assert info.cluster is not None
                names = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
                assert names == {"damm-1", "damm-2", "damm-3"}
            # The leader lease survives any one node, as the log does; a bucket made by a
            # single-node deployment before is raised to the log's replicas.
            await js.create_key_value(KeyValueConfig(bucket=LEASE_BUCKET, ttl=3.0, replicas=1))
            lead = Leadership(nc, EventStore(nc), "damm")
            stop = asyncio.Event()
            running = asyncio.create_task(lead.run(stop))
            await asyncio.wait_for(lead.gained.wait(), 30)
            stop.set()
            await asyncio.wait_for(running, 10)
            lease = await js.stream_info(f"KV_{LEASE_BUCKET}")
            assert lease.config.num_replicas == 3
        finally:
            await nc.close()
    finally:
        cluster.stop()


async def _parties_on_every_node(urls: list[str], admin_password: str) -> None:
    """The auth callout on a cluster: whichever node a device or a gateway connects to, one of
    the two control planes decides it and the answers find their way back."""
    admin = await connect(",".join(urls), user="admin", password=admin_password)
    try:
        fleet = await setup_fleet(admin, admin, tier="silver", gateways=(("gw1", "eu"),))
    finally:
        await admin.close()
    for url in urls:
        device = await connect(url, identity_seed=nats_identity.new_user_seed(), reconnect=False)
        gateway = await connect(url, user="gw-gw1", password=fleet["gw1_token"], reconnect=False)
        try:
            assert (await enroll(device, fleet["token"])).device_id
            beat = p.Heartbeat(gateway_id="gw1", token=fleet["gw1_token"], peer_count=0,
                               active_peers=0, rx_bytes=0, tx_bytes=0, load=0.1)  # fmt: skip
            assert (await call(gateway, "gateway.heartbeat", beat, p.Done)).seq > 0
        finally:
            await device.close()
            await gateway.close()


def test_damm_up_cluster_serves_from_two_control_planes(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="damm-test-cluster-", dir="/tmp"))  # see test_stack
    env = {**os.environ, "DAMM_HOME": str(home / "home")}
    env.pop("DAMM_NATS_URL", None)
    env.pop("DAMM_DATABASE_URL", None)
    damm = str(Path(sys.executable).parent / "damm")
    up = subprocess.Popen(
        [damm, "up", "--cluster", "3", "--no-demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stack = home / "home" / "stack.json"
        deadline = time.monotonic() + 90
        while not stack.exists():
            assert up.poll() is None, up.communicate()[0]
            assert time.monotonic() < deadline, "damm up --cluster did not come up"
            time.sleep(0.1)
        assert StackFile.read(home / "home") is not None
        nats_url = json.loads(stack.read_text())["nats_url"]
        assert len(nats_url.split(",")) == 3
        done = subprocess.run(
            [damm, "admin", "tier", "create", "gold", "--regions", "eu"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        planes = subprocess.run(
            ["pgrep", "-f", f"control run --keys-dir {home}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert len(planes.stdout.split()) == 1, "the second control plane is not running"
        passwords = json.loads(stack.read_text())["passwords"]
        asyncio.run(_parties_on_every_node(nats_url.split(","), passwords["admin"]))
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
        leftovers = subprocess.run(
            ["pgrep", "-f", str(home)], capture_output=True, text=True, check=False
        )
        shutil.rmtree(home, ignore_errors=True)
    assert up.returncode == 0, out
    assert "cluster    3 nodes, streams R3, two control planes" in out
    assert leftovers.stdout.strip() == "", "processes left behind"
