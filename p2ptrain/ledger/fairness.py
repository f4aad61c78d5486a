"""Who did how much of the swarm's work, and how evenly it was shared.

"Did the work" is counted from receipts only: a member's all-reduce weight counts as *attested* when at
least one other member of its group co-signed the round (a peer cannot attest itself). "The work
helped" is kept apart: the change in held-out loss across the rounds a peer joined, where peers report
one. Client-mode peers (behind NAT) are members of their groups like any other and get the same credit.
"""
from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from p2ptrain.ledger.audit import AuditReport, Entry, verify
from p2ptrain.names import readable_name


@dataclass(frozen=True)
class PeerShare:
    """One peer's line of the report. ``flags`` are the codes of the problems found about this peer."""

    public_key: bytes
    samples_claimed: int
    samples_attested: int
    compute_seconds: float
    epochs_joined: int
    share: float  # of the swarm's attested samples
    heldout_delta: float | None  # mean drop of held-out loss over the rounds it joined (> 0: loss went down)
    flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return readable_name(self.public_key)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "public_key": self.public_key.hex(), "samples_claimed": self.samples_claimed,
                "samples_attested": self.samples_attested, "compute_seconds": self.compute_seconds,
                "epochs_joined": self.epochs_joined, "share": self.share, "heldout_delta": self.heldout_delta,
                "flags": list(self.flags)}


@dataclass(frozen=True)
class FairnessReport:
    peers: tuple[PeerShare, ...]  # most attested work first
    total_attested: int
    gini: float  # 0 = every peer did the same share, -> 1 = one peer did everything
    heldout_first: float | None  # held-out loss at the first / last epoch where peers reported one
    heldout_last: float | None
    audit: AuditReport

    @property
    def flagged(self) -> tuple[str, ...]:
        return tuple(peer.name for peer in self.peers if peer.flags)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.audit.run_id, "total_attested_samples": self.total_attested, "gini": self.gini,
                "flagged": list(self.flagged), "heldout_first": self.heldout_first, "heldout_last": self.heldout_last,
                "problems": len(self.audit.problems), "peers": [peer.to_dict() for peer in self.peers]}


def gini(values: Iterable[float]) -> float:
    """Gini coefficient of non-negative values (0.0 for no values or all zeros)."""
    ordered = sorted(values)
    n, total = len(ordered), sum(ordered)
    if n == 0 or total <= 0:
        return 0.0
    weighted = sum(rank * value for rank, value in enumerate(ordered, 1))
    return 2.0 * weighted / (n * total) - (n + 1) / n


def fairness(entries: Iterable[Entry] | AuditReport, *, run_id: str | None = None) -> FairnessReport:
    """Per-peer and swarm-wide accounting of attested work; ``entries`` as for :func:`audit.verify`."""
    audit = entries if isinstance(entries, AuditReport) else verify(entries, run_id=run_id)
    claimed: dict[bytes, int] = defaultdict(int)
    compute: dict[bytes, float] = defaultdict(float)
    attested: dict[bytes, int] = defaultdict(int)
    epochs: dict[bytes, set[int]] = defaultdict(set)
    for claim in audit.claims:
        claimed[claim.public_key] += claim.samples
        compute[claim.public_key] += claim.compute_seconds
        epochs[claim.public_key].add(claim.epoch)
    for receipt in audit.receipts:
        signers = receipt.signers
        for key, weight in receipt.first.members:
            epochs[key].add(receipt.epoch)
            if signers - {key}:  # attested only by someone else
                attested[key] += weight
    flags: dict[bytes, set[str]] = defaultdict(set)
    for problem in audit.problems:
        if problem.peer is not None:
            flags[problem.peer].add(problem.code)

    heldout = _heldout_by_epoch(audit)
    known = sorted(heldout)
    total = sum(attested.values())
    peers = []
    for key in set(epochs) | set(flags):
        peers.append(PeerShare(public_key=key, samples_claimed=claimed[key], samples_attested=attested[key],
                               compute_seconds=compute[key], epochs_joined=len(epochs[key]),
                               share=attested[key] / total if total else 0.0,
                               heldout_delta=_heldout_delta(epochs[key], heldout, known),
                               flags=tuple(sorted(flags[key]))))
    peers.sort(key=lambda p: (-p.samples_attested, -p.samples_claimed, p.name))
    return FairnessReport(peers=tuple(peers), total_attested=total, gini=gini(p.share for p in peers),
                          heldout_first=heldout[known[0]] if known else None,
                          heldout_last=heldout[known[-1]] if known else None, audit=audit)


def _heldout_by_epoch(audit: AuditReport) -> dict[int, float]:
    """Median held-out loss that peers reported for the model they started each epoch from."""
    losses: dict[int, list[float]] = defaultdict(list)
    for claim in audit.claims:
        if claim.heldout_loss is not None:
            losses[claim.epoch].append(claim.heldout_loss)
    return {epoch: statistics.median(values) for epoch, values in losses.items()}


def _heldout_delta(joined: set[int], heldout: dict[int, float], known: list[int]) -> float | None:
    """Mean of (loss before the round - loss at the next epoch with a report) over the rounds a peer joined."""
    deltas = []
    for epoch in joined:
        after = bisect.bisect_right(known, epoch)
        if epoch in heldout and after < len(known):
            deltas.append(heldout[epoch] - heldout[known[after]])
    return statistics.fmean(deltas) if deltas else None
