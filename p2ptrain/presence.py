"""Heartbeats: every peer publishes a small status record under ``{run_id}_peers`` in the DHT.

Peers use it to see who is in the swarm before training starts (``--min-peers``), and the monitor
reads it for the peers table. Records expire on their own, so a crashed peer disappears within ``ttl``
seconds; a clean shutdown publishes ``leaving=True`` so it disappears at once. Every node that publishes
heartbeats also runs :class:`PresenceValidator`, which keeps anything but well-formed heartbeats out of
the key on that node.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from typing import Any, Callable

import hivemind
import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import ValueWithExpiration, get_dht_time

from p2ptrain.identity import peer_id_of
from p2ptrain.snapshot import ROLES, PeerReport

logger = logging.getLogger(__name__)

PERIOD = 2.0  # seconds between heartbeats
TTL = 10.0  # a peer that misses heartbeats for this long is gone from the DHT
MAX_SAMPLES_PER_SECOND = 1e12  # beyond any real peer; keeps the swarm's sum finite whatever peers report
MAX_CLOCK_SKEW = 300.0  # a heartbeat may expire at most TTL + this from now (clocks of peers differ)
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
        "samples_per_second": lambda v: _number(v) and 0 <= v <= MAX_SAMPLES_PER_SECOND,
        "loss": lambda v: v is None or _number(v),  # NaN would make `monitor --json` fail (no NaN in JSON)
        "time": lambda v: _number(v),
        "leaving": lambda v: isinstance(v, bool),
        "relayed": lambda v: isinstance(v, bool),
        "target_batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
        "rounds_failed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
        "state_downloads": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40,
    }
    if not all(check(value[name]) for name, check in checks.items()):
        return None
    return PeerReport(**value)


def _number(value: Any) -> bool:
    """A finite int or float (a bool is an int in Python, not here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


class PresenceValidator(RecordValidatorBase):
    """Lets under ``{run_id}_peers`` only heartbeats: a subkey entry whose subkey is a public key (hex), whose
    value is a report :func:`parse_report` accepts for that key's peer id, expiring within TTL (+ clock skew).

    Without it any node could store a plain value with a far expiration under the key: hivemind keeps
    whichever value expires last, so one such store evicts every heartbeat from the node that takes it and
    refuses the next ones there until it expires (nobody would see any peer: ``--min-peers`` would wait in
    vain, the monitor would go blank). Heartbeats are not signed in an open run, so a peer can still write
    a well-formed report under another peer's key; a closed run's allowlist binds them to their writers.
    Every other key passes untouched.
    """

    def __init__(self, run_id: str):
        self._keys = {DHTID.generate(source=presence_key(run_id)).to_bytes()}

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in self._keys:
            return True
        try:  # untrusted bytes
            subkey = msgpack.unpackb(record.subkey, raw=False)
            value = msgpack.unpackb(record.value, raw=False)
        except Exception:
            return False
        if not (isinstance(subkey, str) and _HEX64.fullmatch(subkey)):
            return False  # a plain value (subkey None) or a foreign subkey
        report = parse_report(value)
        if report is None or report.peer_id != peer_id_of(bytes.fromhex(subkey)):
            return False
        return record.expiration_time <= get_dht_time() + TTL + MAX_CLOCK_SKEW

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, PresenceValidator):
            return False
        self._keys |= other._keys
        return True


class Heartbeat(threading.Thread):
    """Publishes ``make_report()`` every ``PERIOD`` seconds until :meth:`leave`.

    Also installs :class:`PresenceValidator` on ``dht``: a node that publishes heartbeats keeps garbage out
    of the key it stores them under.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, subkey: str, make_report: Callable[[], PeerReport]):
        super().__init__(name="p2ptrain-heartbeat", daemon=True)
        self.dht, self.run_id, self.subkey, self.make_report = dht, run_id, subkey, make_report
        self._stopped = threading.Event()
        dht.add_validators([PresenceValidator(run_id)])

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
