"""Heartbeats: every peer publishes a small status record under ``{run_id}_peers`` in the DHT.

Peers use it to see who is in the swarm before training starts (``--min-peers``), and the monitor
reads it for the peers table. Records expire on their own, so a crashed peer disappears within ``ttl``
seconds; a clean shutdown publishes ``leaving=True`` so it disappears at once.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable

import hivemind
from hivemind.utils import ValueWithExpiration, get_dht_time

from p2ptrain.snapshot import ROLES, PeerReport

logger = logging.getLogger(__name__)

PERIOD = 2.0  # seconds between heartbeats
TTL = 10.0  # a peer that misses heartbeats for this long is gone from the DHT


def presence_key(run_id: str) -> str:
    return f"{run_id}_peers"


def parse_report(value: Any) -> PeerReport | None:
    """A PeerReport from an untrusted DHT value, or None when any field is missing or ill-typed."""
    if not isinstance(value, dict) or set(value) != {f.name for f in dataclasses.fields(PeerReport)}:
        return None
    checks = {
        "peer_id": lambda v: isinstance(v, str) and 0 < len(v) <= 128,
        "name": lambda v: isinstance(v, str) and 0 < len(v) <= 64,
        "role": lambda v: v in ROLES,
        "client_mode": lambda v: isinstance(v, bool),
        "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
        "samples_accumulated": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
        "samples_per_second": lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
        "loss": lambda v: v is None or isinstance(v, (int, float)),
        "time": lambda v: isinstance(v, (int, float)) and math.isfinite(v),
        "leaving": lambda v: isinstance(v, bool),
        "relayed": lambda v: isinstance(v, bool),
        "target_batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
        "rounds_failed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
        "state_downloads": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
    }
    if not all(check(value[name]) for name, check in checks.items()):
        return None
    return PeerReport(**value)


def read_reports(dht: hivemind.DHT, run_id: str) -> list[PeerReport]:
    """Every live peer's latest report (malformed records are skipped)."""
    try:
        found = dht.get(presence_key(run_id), latest=True, return_future=True).result(timeout=TTL)
    except Exception as e:  # a slow or dead DHT: no reports this time
        logger.debug(f"heartbeats not read: {e!r}")
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    reports = []
    for entry in found.value.values():
        if isinstance(entry, ValueWithExpiration) and (report := parse_report(entry.value)) is not None:
            reports.append(report)
    return reports


class Heartbeat(threading.Thread):
    """Publishes ``make_report()`` every ``PERIOD`` seconds until :meth:`leave`."""

    def __init__(self, dht: hivemind.DHT, run_id: str, subkey: str, make_report: Callable[[], PeerReport]):
        super().__init__(name="p2ptrain-heartbeat", daemon=True)
        self.dht, self.run_id, self.subkey, self.make_report = dht, run_id, subkey, make_report
        self._stopped = threading.Event()

    def publish(self, report: PeerReport) -> bool:
        try:
            # a future with a timeout: if the DHT process died, a plain store would block for ever
            return bool(self.dht.store(presence_key(self.run_id), subkey=self.subkey, value=dataclasses.asdict(report),
                                       expiration_time=get_dht_time() + TTL, return_future=True).result(timeout=TTL))
        except Exception as e:  # the DHT may be shutting down; a missed heartbeat is harmless
            logger.debug(f"heartbeat not stored: {e!r}")
            return False

    def run(self) -> None:
        while not self._stopped.is_set():
            self.publish(self.make_report())
            self._stopped.wait(PERIOD)

    def leave(self) -> None:
        """Stop beating and tell the swarm we are gone."""
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=5)
        self.publish(dataclasses.replace(self.make_report(), leaving=True, time=time.time()))
