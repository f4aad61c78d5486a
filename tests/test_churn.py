"""Churn on a real swarm (127.0.0.1, real processes): peers that leave cleanly, peers that crash, and the
bootstrap peer dying under a training swarm.

- A peer stopped with Ctrl-C publishes a last heartbeat with ``leaving=True`` before it exits: the live
  monitor drops it on that announcement (event "left: announced leaving"), at the latest one refresh after
  the process has exited, and ``p2ptrain monitor --json`` no longer lists it.
- A peer killed with SIGKILL announces nothing. Its heartbeat record (``presence.TTL`` seconds of
  lifetime, refreshed every ``presence.PERIOD``) expires from the DHT within TTL of the kill, so every
  peer's view of the swarm (``read_reports``, hence ``--min-peers``, and a fresh ``monitor --json``) loses
  it within TTL + PERIOD; the live monitor, which remembers peers it has seen, marks it stale within its
  ``stale_after`` (15 s) of the kill. Both bounds are asserted, with one second of slack for a DHT read.
- The bootstrap peer is only a first contact: after a SIGKILL of its whole process group the trainers keep
  averaging, and a newcomer joins through a trainer's address, downloads the swarm's state and trains on.

The kill -9 -> stale -> left sequence with short custom thresholds is in test_monitor.py.
"""
from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING

import pytest

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema

from p2ptrain.config import Settings
from p2ptrain.monitor import Collector
from p2ptrain.presence import PERIOD, TTL, read_reports
from p2ptrain.swarm import start_dht

if TYPE_CHECKING:
    from conftest import Cli, PeerProcess, Swarm

RUN = "p2ptrain"
READ_SLACK = 1.0  # one DHT read on a loaded machine
JOIN_ADDRESS = re.compile(r"p2ptrain join --initial-peers (\S+)")


def _monitor_dht(address: str):
    # with hivemind's validators for its progress record, so that reads of it come back parsed
    return start_dht(Settings(initial_peers=[address], host_maddrs=["/ip4/127.0.0.1/tcp/0"]), None, client_mode=True,
                     record_validators=[RSASignatureValidator(), SchemaValidator(TrainingProgressSchema, prefix=RUN)])


def _in_progress(dht) -> int:
    """How many peers hivemind's progress record (``{run}_progress``: the swarm's epoch and samples) counts."""
    found = dht.get(f"{RUN}_progress", latest=True)
    if found is None or not isinstance(found.value, dict):
        return 0
    return sum(1 for item in found.value.values() if item.value is not None)


def _peer_id(peer: PeerProcess) -> str:
    return peer.wait_for(r"^peer \S+ \((12D3\w+)\)", stream="stdout").group(1)


@pytest.mark.timeout(300)
def test_clean_leave_is_announced_and_a_crash_is_detected_within_the_bound(swarm: Swarm, cli: Cli) -> None:
    address = swarm.bootstrap()
    leaver, victim = (swarm.join(name, "--min-peers", "2", "--max-epochs", "100000") for name in ("leaver", "victim"))
    leaver_id, victim_id = _peer_id(leaver), _peer_id(victim)
    dht = _monitor_dht(address)
    try:
        collector = Collector(dht, RUN)  # the live monitor's defaults
        stale_after = collector.tracker.stale_after

        def trainers() -> dict[str, object]:
            return {p.peer_id: p for p in collector.refresh().peers if p.role == "trainer"}

        leaver.wait_until(lambda: {leaver_id, victim_id} <= set(trainers()), "both trainers in the monitor", 120)
        leaver.wait_until(lambda: _in_progress(dht) == 2, "both trainers in the swarm's progress", 60)

        # --- clean shutdown: Ctrl-C ---
        leaver.interrupt()
        left_at = exited_at = None
        deadline = time.monotonic() + 60
        while left_at is None or exited_at is None:
            if exited_at is None and leaver.popen.poll() is not None:
                exited_at = time.monotonic()
            read_at = time.monotonic()  # what a read shows held when it began (a read takes a while when busy)
            now_trainers = trainers()
            if left_at is None and leaver_id not in now_trainers:
                left_at = read_at
                assert victim_id in now_trainers
            assert time.monotonic() < deadline, f"left at {left_at}, exited at {exited_at}\n{leaver.describe()}"
            time.sleep(0.2)
        assert leaver.popen.returncode == 0 and leaver.summary()["interrupted"], leaver.describe()
        # and it took its entry out of the swarm's progress before it exited (else the swarm's epoch and
        # samples would count it for a minute more)
        assert _in_progress(dht) == 1
        events = [e for e in collector.refresh().events
                  if e.peer == leaver.summary()["name"] and e.kind in ("joined", "stale", "returned", "left")]
        # dropped on its announcement, not by a timeout, and before it went stale
        assert [e.kind for e in events] == ["joined", "left"] and events[-1].message == "announced leaving", events
        assert left_at <= exited_at + PERIOD + READ_SLACK, (left_at - exited_at)
        # its last record says so, and a fresh `monitor --json` does not list it
        reports = {r.peer_id: r for r in read_reports(dht, RUN)}
        assert reports[leaver_id].leaving and not reports[victim_id].leaving
        snapshot = json.loads(cli("monitor", "--initial-peers", address, "--json", timeout=120).stdout)
        listed = {p["peer_id"]: p for p in snapshot["peers"]}
        assert leaver_id not in listed and victim_id in listed and not listed[victim_id]["stale"], listed

        # --- crash: SIGKILL, no goodbye ---
        victim.remember_descendants()  # its DHT process and p2pd are killed at teardown if they outlive it
        victim.popen.kill()
        killed_at = time.monotonic()
        victim.wait(10)
        gone_at = stale_at = None
        deadline = killed_at + stale_after + 30
        while gone_at is None or stale_at is None:
            read_at = time.monotonic()
            if gone_at is None and victim_id not in {r.peer_id for r in read_reports(dht, RUN)}:
                gone_at = read_at
            read_at = time.monotonic()
            view = trainers().get(victim_id)
            if stale_at is None and (view is None or view.stale):
                stale_at = read_at
            assert time.monotonic() < deadline, f"gone {gone_at}, stale {stale_at} (killed at {killed_at})"
            time.sleep(0.2)
        # gone from the DHT (what --min-peers and a fresh monitor read) within TTL + one heartbeat period
        assert gone_at - killed_at <= TTL + PERIOD + READ_SLACK, gone_at - killed_at
        # the live monitor shows it stale within stale_after of its last heartbeat, hence of the kill
        assert stale_at - killed_at <= stale_after + READ_SLACK, stale_at - killed_at
        print(f"left {left_at - exited_at:+.1f}s from the leaver's exit; killed peer gone from the DHT after "
              f"{gone_at - killed_at:.1f}s (bound {TTL + PERIOD:g}s), stale in the monitor after "
              f"{stale_at - killed_at:.1f}s (bound {stale_after:g}s)")
    finally:
        dht.shutdown()


@pytest.mark.timeout(400)
def test_swarm_survives_the_bootstrap_dying_and_a_newcomer_joins_through_a_trainer(swarm: Swarm) -> None:
    swarm.bootstrap()
    bootstrap = swarm.processes[0]
    a, b = (swarm.join(name, "--min-peers", "2", "--max-epochs", "100000") for name in ("a", "b"))
    a.wait_for_epoch(3, timeout=180)

    bootstrap.kill()  # SIGKILL to its group and to every descendant seen: its p2pd dies with it
    assert bootstrap.popen.returncode == -9
    killed_at_epoch = max(e.epoch for e in a.epochs())

    # the two trainers keep training together without it
    for peer in (a, b):
        peer.wait_until(lambda peer=peer: any(e.epoch >= killed_at_epoch + 3 and e.group_size == 2
                                              for e in peer.epochs()),
                        "a round averaged with the other trainer after the bootstrap died", timeout=120)

    # a newcomer joins through a trainer's address (the bootstrap's is dead) and trains to its end
    through = JOIN_ADDRESS.search(a.stdout()).group(1)
    assert through != swarm.address
    launched_at_epoch = max(e.epoch for e in a.epochs())
    # its end: 30 epochs on, of which starting the process and downloading take about a third on 2 busy cores
    max_epochs = launched_at_epoch + 30
    c = swarm.join("c", "--initial-peers", through, "--max-epochs", str(max_epochs), initial_peers=False)
    downloaded = int(c.wait_for(r"state downloaded: now at epoch (\d+)", timeout=120).group(1))
    assert downloaded >= launched_at_epoch, c.describe()
    assert c.wait(180) == 0, c.describe()
    summary = c.summary()
    assert summary["epoch"] == max_epochs and not summary["interrupted"], c.describe()
    # it trained with the survivors, not alone: a round after the download averaged with them
    assert any(e.epoch > downloaded and e.group_size >= 2 for e in c.epochs()), c.describe()
    assert summary["accuracy"] > 0.8, c.describe()  # the swarm's weights, not a fresh init (~0.1)

    for peer in (a, b):
        peer.interrupt()
    for peer, code in zip((a, b), swarm.wait_all([a, b], timeout=60)):
        assert code == 0 and peer.summary()["interrupted"], peer.describe()
