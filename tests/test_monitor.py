"""The monitor against a real swarm: JSON snapshot, a killed peer going stale then leaving, bad addresses."""
from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from p2ptrain.config import Settings
from p2ptrain.identity import peer_id_of
from p2ptrain.monitor import Collector
from p2ptrain.swarm import start_dht

if TYPE_CHECKING:
    from conftest import Cli, Swarm

from test_cli_errors import closed_port


@pytest.mark.timeout(420)
def test_monitor_reports_the_swarm_and_a_killed_peer_goes_stale_then_leaves(swarm: Swarm, cli: Cli) -> None:
    address = swarm.bootstrap()
    peers = [swarm.join(name, "--min-peers", "2", "--max-epochs", "10000", wait_up=False) for name in ("a", "b")]
    for peer in peers:
        peer.wait_for_epoch(3, timeout=240)

    result = cli("monitor", "--initial-peers", address, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    trainers = [p for p in snapshot["peers"] if p["role"] == "trainer"]
    assert len(trainers) == 2 and all(not p["stale"] for p in trainers)
    assert snapshot["global_epoch"] >= 3
    assert snapshot["target_batch_size"] == 1024
    # the swarm's samples/s is the sum of what the peers report, and they report real progress
    assert all(p["samples_per_second"] > 0 for p in trainers)
    assert snapshot["samples_per_second"] == pytest.approx(sum(p["samples_per_second"] for p in snapshot["peers"]))

    # the collector behind the live view keeps going while a peer dies under it
    dht = start_dht(Settings(initial_peers=[address], host_maddrs=["/ip4/127.0.0.1/tcp/0"]), None, client_mode=True)
    try:
        collector = Collector(dht, "p2ptrain", stale_after=6.0, drop_after=14.0)
        victim = peers[1]
        deadline = time.monotonic() + 60
        while len([p for p in collector.refresh().peers if p.role == "trainer"]) < 2:
            assert time.monotonic() < deadline, "the collector never saw both trainers"
            time.sleep(1)
        names_before = {p.peer_id: p.name for p in collector.refresh().peers if p.role == "trainer"}
        os.kill(victim.pid, signal.SIGKILL)

        saw_stale, deadline = False, time.monotonic() + 90
        while True:
            trainers_now = {p.peer_id: p for p in collector.refresh().peers if p.role == "trainer"}
            stale = [p for p in trainers_now.values() if p.stale]
            saw_stale = saw_stale or bool(stale)
            if saw_stale and len(trainers_now) == 1:
                break
            assert time.monotonic() < deadline, f"killed peer neither went stale nor left: {trainers_now}"
            time.sleep(1)
        survivor = next(iter(trainers_now.values()))
        assert survivor.peer_id in names_before and not survivor.stale
        events = {(e.kind, e.peer) for e in collector.refresh().events}
        gone = next(name for pid, name in names_before.items() if pid != survivor.peer_id)
        assert ("stale", gone) in events and ("left", gone) in events, events
    finally:
        dht.shutdown()


def test_monitor_with_unreachable_initial_peers_fails_with_one_line(cli: Cli) -> None:
    peer_id = peer_id_of(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    address = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{peer_id}"

    result = cli("monitor", "--initial-peers", address, "--join-timeout", "3", "--once", timeout=120)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = result.error_line()
    assert address in line and "check that the peer is running" in line


def test_monitor_needs_initial_peers(cli: Cli) -> None:
    result = cli("monitor", "--once", timeout=60)
    assert result.returncode == 2 and "needs --initial-peers" in result.error_line()
