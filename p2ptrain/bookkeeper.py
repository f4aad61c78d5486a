"""The ledger's side of a training peer: one signed claim and one co-signed receipt per epoch.

The trainer tells the :class:`Bookkeeper` what happened (steps, the round's start and end); the
bookkeeper signs, appends to the local SQLite ledger, and publishes to / fetches from the DHT in a
background thread so the training loop never waits for the network on the ledger's behalf.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Mapping, Sequence

import torch

from p2ptrain.identity import Identity
from p2ptrain.ledger.audit import verify
from p2ptrain.ledger.dht import fetch, publish
from p2ptrain.ledger.records import Claim, Record
from p2ptrain.ledger.store import Ledger
from p2ptrain.ledger.writer import LedgerWriter, public_key_of_peer_id, tensor_digest

logger = logging.getLogger(__name__)

SYNC_PERIOD = 5.0  # seconds between background fetches of groupmates' records
REPUBLISH = 64  # at start, publish this peer's last records again: a crash may have beaten the publisher
FINAL_SYNC = 10.0  # at exit, keep fetching this long for the last round's co-signatures


class Bookkeeper:
    """Claims, receipts and replication for one peer.

    Args:
        identity: this peer's key (signs every record).
        run_id: the run.
        ledger: the peer's open ledger.
        dht: the peer's DHT node (for publishing and fetching records).
        batch_size: local batch size (part of the data assignment that re-derives batches).
    """

    def __init__(self, identity: Identity, run_id: str, ledger: Ledger, dht: Any, *, batch_size: int):
        self.writer = LedgerWriter(identity, run_id, ledger)
        self.identity, self.run_id, self.ledger, self.dht = identity, run_id, ledger, dht
        self.batch_size = batch_size
        self._first_step, self._steps, self._compute, self._losses = 0, 0, 0.0, []
        self._model_digest = ""
        self._heldout: float | None = None
        self._claim: Claim | None = None
        self._outbox: queue.Queue[Record | None] = queue.Queue()
        self._epochs_seen: set[int] = set()
        self._stop = threading.Event()
        self._recover()
        self._thread = threading.Thread(target=self._replicate, name="p2ptrain-ledger", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        """Repair what a crash (SIGKILL, power cut) of an earlier run of this peer left in its chain.

        A record is appended to the ledger file before it is published, so a crash can leave records the
        DHT never saw (others then see a ``chain_gap``): publish the last ones again. A crash mid-round
        leaves a claim with no receipt: close that round with a receipt of one, which says "no group
        finished this round with me" and attests nothing (the claim earns no credit), and whose result
        digest is that of no tensors, since there was no result.
        """
        tail = self.ledger.chain_tail(self.writer.public_key, REPUBLISH)
        if tail and isinstance(tail[-1], Claim):
            claim = tail[-1]
            logger.info(f"ledger: the round of epoch {claim.epoch} never finished (the peer stopped mid-round): "
                        f"closing it with a receipt of one")
            tail.append(self.writer.cosign(claim.epoch, {self.writer.public_key: claim.samples}, tensor_digest([])))
        for record in tail:
            self._outbox.put(record)

    # --- called by the trainer, in order, every epoch -----------------------------------------

    def start_epoch(self, parameters: Sequence[torch.Tensor], next_step: int, heldout_loss: float | None) -> None:
        """The epoch's work starts from these weights (with this held-out loss), at this local step."""
        self._model_digest = tensor_digest(parameters)
        self._heldout = heldout_loss
        self._first_step, self._steps, self._compute, self._losses = next_step, 0, 0.0, []

    def note_step(self, compute_seconds: float, loss: float) -> None:
        self._steps += 1
        self._compute += compute_seconds
        self._losses.append(loss)

    def claim(self, epoch: int, samples: int, gradients: Sequence[torch.Tensor]) -> dict[str, Any] | None:
        """Sign this epoch's claim; returns what the round's all-gather carries to groupmates (None: no claim)."""
        last = self.ledger.last_record(self.writer.public_key)
        if last is not None and epoch <= last.epoch:
            # a peer relaunched from an older checkpoint can train epochs it already claimed before it sees
            # the swarm's epoch: claiming them again would fork its chain (double_claim, chain_epoch)
            logger.info(f"no claim for epoch {epoch}: this peer's ledger already reaches epoch {last.epoch}")
            return None
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else None
        self._claim = self.writer.claim(
            epoch, samples, self._compute,
            {"first_step": self._first_step, "steps": self._steps, "batch_size": self.batch_size},
            self._model_digest, tensor_digest(gradients), mean_loss, heldout_loss=self._heldout)
        self._outbox.put(self._claim)
        return LedgerWriter.gather_payload(self._claim, samples)

    def close_round(self, epoch: int, gathered: Mapping[Any, Any] | None, result: Sequence[torch.Tensor], *,
                    rejected: Mapping[Any, str] = {}) -> None:
        """Check groupmates' claims and co-sign the round (a receipt of one when no group formed), naming
        the groupmates whose parts were ``rejected`` ({peer id: reason})."""
        if self._claim is None:
            return  # nothing claimed this epoch (e.g. the round began before the first step)
        weight = self._claim.samples
        members: dict[bytes, float] = {self.writer.public_key: weight}
        if gathered:
            check = self.writer.check_groupmate_claims(epoch, gathered)
            # the receipt lists the members whose valid claim is for this epoch: a groupmate one epoch
            # behind (hivemind lets it tag along) co-signs its own epoch's receipt, so both verify
            members.update({key: w for key, w in check.members.items() if key in check.claims})
        rejected_keys = [key for key in map(public_key_of_peer_id, rejected) if key is not None]
        self._outbox.put(self.writer.cosign(epoch, members, tensor_digest(result), rejected=rejected_keys))
        self._epochs_seen.add(epoch)
        self._claim = None

    # --- replication ------------------------------------------------------------------------

    def _replicate(self) -> None:
        """Publish our records as they are signed; every SYNC_PERIOD fetch recent epochs' records."""
        next_sync = time.monotonic() + SYNC_PERIOD
        while not self._stop.is_set():
            try:
                batch = [self._outbox.get(timeout=max(0.0, next_sync - time.monotonic()))]
                while not self._outbox.empty():  # all waiting records in one go: their stores run concurrently
                    batch.append(self._outbox.get_nowait())
                if records := [record for record in batch if record is not None]:
                    self._publish(records)
            except queue.Empty:
                pass
            if time.monotonic() >= next_sync:
                recent = sorted(self._epochs_seen)[-3:]
                self._sync(recent)
                next_sync = time.monotonic() + SYNC_PERIOD

    def _publish(self, records: list[Record]) -> None:
        try:
            publish(self.dht, records)
        except Exception as e:  # the record stays in the local ledger; peers fetch it from us later
            logger.debug(f"ledger publish failed: {e!r}")

    def _sync(self, epochs: Sequence[int]) -> int:
        if not epochs:
            return 0
        try:
            return self.ledger.add_verified(fetch(self.dht, self.run_id, epochs))
        except Exception as e:
            logger.debug(f"ledger sync failed: {e!r}")
            return 0

    def finish(self, epoch: int) -> bool:
        """Publish what is left, then fetch every epoch up to ``epoch`` (the peer's own) until the ledger
        verifies clean (groupmates' last co-signatures arrive a moment after ours) or FINAL_SYNC passes."""
        self._stop.set()
        self._outbox.put(None)
        self._thread.join(timeout=5)
        pending = []
        while not self._outbox.empty():
            if (record := self._outbox.get_nowait()) is not None:
                pending.append(record)
        if pending:
            self._publish(pending)
        # every epoch, not only those of our rounds: a peer that loaded state mid-run, or that was relaunched
        # and left before it closed a round, would otherwise keep a partial copy
        epochs = list(range(max(epoch, *self._epochs_seen, -1) + 1))
        deadline = time.monotonic() + FINAL_SYNC
        while True:
            self._sync(epochs)
            report = verify(self.ledger.records(), run_id=self.run_id)
            if report.ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if report.ok:
            logger.info(f"ledger: {report.records} records, verified clean ({self.ledger.path})")
        else:
            logger.warning(f"ledger: {len(report.problems)} problem(s) remain (p2ptrain ledger verify "
                           f"--ledger {self.ledger.path})")
        return report.ok
