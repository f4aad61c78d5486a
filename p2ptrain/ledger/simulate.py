"""Rounds of a fake swarm, without a network: real keys, real signatures, made-up work.

Used by the tests, ``scripts/bench/ledger.py`` and anyone who wants a ledger to look at. Each round goes
through the same calls as a real peer (claim, all-gather, check, co-sign), only the all-gather is a dict.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2ptrain.identity import Identity
from p2ptrain.ledger.records import Claim, ReceiptSignature
from p2ptrain.ledger.store import Ledger
from p2ptrain.ledger.writer import GroupCheck, LedgerWriter


@dataclass
class SimPeer:
    identity: Identity
    ledger: Ledger
    writer: LedgerWriter


def make_peers(directory: Path, count: int, run_id: str, *, shared_ledger: Ledger | None = None) -> list[SimPeer]:
    """``count`` peers with keys under ``directory``; each with its own ledger file unless ``shared_ledger``."""
    peers = []
    for i in range(count):
        identity = Identity.generate(Path(directory) / f"peer{i}.key")
        ledger = shared_ledger
        if ledger is None:  # not `or`: an empty Ledger is falsy (it has a length)
            ledger = Ledger(Path(directory) / f"peer{i}.sqlite", run_id=run_id)
        peers.append(SimPeer(identity, ledger, LedgerWriter(identity, run_id, ledger)))
    return peers


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_round(peers: Sequence[SimPeer], epoch: int, samples: Sequence[int] | None = None, *,
              heldout_loss: float | None = None,
              exchange: bool = True) -> tuple[list[Claim], list[ReceiptSignature], list[GroupCheck]]:
    """One averaging round of ``peers`` as one group; with ``exchange``, every ledger then holds every record."""
    samples = samples or [100 + 10 * i for i in range(len(peers))]
    claims = [peer.writer.claim(epoch, n, 0.5 + 0.01 * n, {"seed": epoch, "steps": max(n // 32, 1)},
                                digest(f"model {epoch}"), digest(f"grad {epoch} {i}"), 2.0 / (epoch + 1),
                                heldout_loss=heldout_loss)
              for i, (peer, n) in enumerate(zip(peers, samples))]
    gathered = {peer.identity.peer_id: LedgerWriter.gather_payload(claim, claim.samples)
                for peer, claim in zip(peers, claims)}
    checks = [peer.writer.check_groupmate_claims(epoch, gathered) for peer in peers]
    receipts = [peer.writer.cosign(epoch, check.members, digest(f"averaged {epoch} {i}"))
                for i, (peer, check) in enumerate(zip(peers, checks))]
    if exchange:
        ledgers = {id(peer.ledger): peer.ledger for peer in peers}
        if len(ledgers) > 1:
            for ledger in ledgers.values():
                ledger.add_verified([*claims, *receipts])
    return claims, receipts, checks
