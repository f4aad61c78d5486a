"""Collecting what the monitor shows: heartbeats and ledger records read from the DHT, turned into Snapshots.

Drawing lives in ``dashboard.py``; this module only reads. The monitor is a DHT client: it trains
nothing, stores nothing and accepts no connections.
"""
from __future__ import annotations

import logging
import time

import hivemind

from p2ptrain.ledger.audit import verify
from p2ptrain.ledger.dht import fetch
from p2ptrain.ledger.fairness import fairness
from p2ptrain.ledger.records import Record
from p2ptrain.presence import read_reports
from p2ptrain.snapshot import Event, LedgerView, PeerReport, Snapshot, SnapshotTracker
from p2ptrain.identity import peer_id_of

logger = logging.getLogger(__name__)

# what a partial, still-replicating copy of the ledger shows for honest peers; `ledger verify` on a
# peer's own ledger still reports these, the live monitor does not flag a peer for them
INCOMPLETE_VIEW = {"claim_without_receipt", "missing_cosignature", "chain_gap"}
LEDGER_WINDOW = 3  # epochs re-read on every refresh; older epochs are read once (their records are final)


class Collector:
    """Reads the swarm of ``run_id`` through ``dht`` and keeps the history a dashboard needs."""

    def __init__(self, dht: hivemind.DHT, run_id: str, *, stale_after: float = 15.0, drop_after: float = 45.0):
        self.dht, self.run_id = dht, run_id
        self.tracker = SnapshotTracker(run_id, stale_after=stale_after, drop_after=drop_after)
        self._last: dict[str, PeerReport] = {}
        self._records: dict[str, Record] = {}  # by record hash
        self._ledger_read_until = -1  # epochs below this were read for good
        self._target = 0

    def refresh(self, now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now
        for report in read_reports(self.dht, self.run_id):
            self._note_counters(report)
            self.tracker.observe(report)
            if report.target_batch_size:
                self._target = report.target_batch_size
        live = [r for r in self._last.values() if not r.leaving and now - r.time < self.tracker.stale_after]
        global_epoch = max((r.epoch for r in live), default=0)
        # peers report their counts a moment apart, so the sum can pass the target just before an epoch ends
        accumulated = sum(r.samples_accumulated for r in live if r.epoch == global_epoch)
        if self._target:
            accumulated = min(accumulated, self._target)
        ledger, shares = self._read_ledger(global_epoch)
        return self.tracker.snapshot(now, target_batch_size=self._target, global_epoch=global_epoch,
                                     samples_accumulated=accumulated, ledger=ledger, work_shares=shares)

    def _note_counters(self, report: PeerReport) -> None:
        """Turn changes in a peer's counters into events (failed rounds, state downloads)."""
        before = self._last.get(report.peer_id)
        if before is not None and report.time > before.time:
            if report.rounds_failed > before.rounds_failed:
                self.tracker.add_event(Event(report.time, "averaging_failed", report.name,
                                             f"finished {report.rounds_failed - before.rounds_failed} round(s) alone"))
            if report.state_downloads > before.state_downloads:
                self.tracker.add_event(Event(report.time, "state_downloaded", report.name,
                                             f"loaded the swarm's state at epoch {report.epoch}"))
        if before is None or report.time > before.time:
            self._last[report.peer_id] = report

    def _read_ledger(self, global_epoch: int) -> tuple[LedgerView | None, dict[str, float] | None]:
        first = max(0, min(self._ledger_read_until, global_epoch - LEDGER_WINDOW))
        try:
            found = fetch(self.dht, self.run_id, range(first, global_epoch + 1))
        except Exception as e:  # a DHT hiccup costs one refresh, not the monitor
            logger.debug(f"ledger read failed: {e!r}")
            found = []
        for record in found:
            self._records.setdefault(record.hash, record)
        self._ledger_read_until = max(self._ledger_read_until, global_epoch - LEDGER_WINDOW + 1)
        # the last two epochs are still in flight (claims whose receipts are not published yet)
        settled = [r for r in self._records.values() if r.epoch < global_epoch - 1]
        if not settled:
            return None, None
        report = verify(settled, run_id=self.run_id)
        fair = fairness(report, run_id=self.run_id)
        failed = sum(1 for p in report.problems if p.code == "bad_signature")
        flagged = tuple(sorted(peer_id_of(share.public_key) for share in fair.peers
                               if set(share.flags) - INCOMPLETE_VIEW))
        view = LedgerView(records=report.records, verified=report.records - failed, failed=failed,
                          flagged_peers=flagged)
        return view, {peer_id_of(share.public_key): share.share for share in fair.peers}
