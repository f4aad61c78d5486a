"""What the training loop calls each epoch: sign a claim, check groupmates' claims, co-sign the round.

A round, in order::

    claim = writer.claim(epoch, samples, compute_seconds, {"seed": s, "steps": n}, model_digest, grad_digest, loss)
    gathered = averager.step(gather=writer.gather_payload(claim, weight), weight=weight, ...)
    check = writer.check_groupmate_claims(epoch, gathered)        # log check.problems
    receipt = writer.cosign(epoch, check.members, tensor_digest(averaged_grads))
    publish(dht, [claim, receipt])                                # ledger/dht.py, off the training thread

When no group formed and the peer applied its gradients alone, co-sign a receipt of one
(``writer.cosign(epoch, {writer.public_key: weight}, digest)``): the claim then has a receipt, but its
samples stay unattested, since a peer cannot attest its own work.

Every record this peer signs is appended to its ledger before it is returned, so the per-peer chain
(seq, prev_hash) continues across restarts from whatever the ledger file holds.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import base58

from p2ptrain.ledger.audit import TOLERANCE, Problem, problem_about
from p2ptrain.ledger.records import MAX_INT, ZERO_HASH, Claim, ReceiptSignature, Record, RecordError, from_json, sign
from p2ptrain.ledger.store import Ledger
from p2ptrain.names import readable_name

logger = logging.getLogger(__name__)

# libp2p peer id of an Ed25519 key: identity multihash (0x00, length 36) of the protobuf PublicKey
# {key_type: Ed25519 (field 1 = 1), data: 32 bytes (field 2)}; the key can be read back out of the id.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def public_key_of_peer_id(peer_id: Any) -> bytes | None:
    """The raw Ed25519 public key inside a ``12D3KooW…`` peer id (str or hivemind ``PeerID``); None otherwise."""
    try:
        raw = base58.b58decode(str(peer_id))
    except ValueError:
        return None
    if len(raw) == 38 and raw.startswith(_ED25519_PEER_ID_PREFIX):
        return raw[6:]
    return None


def tensor_digest(tensors: Sequence[Any]) -> str:
    """SHA-256 (hex) over the dtype, shape and raw bytes of each tensor, in order.

    Runs at memory speed (about 1-2 GB/s on one core); CUDA tensors are copied to the host first.
    """
    import torch  # only here: the rest of the ledger does not need torch

    h = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach()
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def group_id_for(run_id: str, epoch: int, members: Sequence[bytes]) -> str:
    """A group id every member derives alike from the run, the epoch and the sorted member keys."""
    h = hashlib.sha256(f"p2ptrain-group\n{run_id}\n{epoch}\n".encode())
    for key in sorted(members):
        h.update(key)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class GroupCheck:
    """Result of :meth:`LedgerWriter.check_groupmate_claims`.

    ``members`` maps each groupmate's public key (this peer's included) to the weight it announced for the
    all-reduce -- pass it to :meth:`LedgerWriter.cosign`. ``claims`` holds the claims that verified (they
    are added to the ledger); ``problems`` the rest.
    """

    members: dict[bytes, int]
    claims: dict[bytes, Claim] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


class LedgerWriter:
    """Signs this peer's records and appends them to its ledger, continuing its hash chain.

    Args:
        identity: the peer's :class:`p2ptrain.identity.Identity` (its libp2p key).
        run_id: the run's id (also the DHT prefix).
        ledger: the peer's open :class:`Ledger`.
        clock: returns the current time in seconds (tests pass a fake).
    """

    def __init__(self, identity: Any, run_id: str, ledger: Ledger, *, clock: Callable[[], float] = time.time):
        self.identity, self.run_id, self.ledger, self._clock = identity, run_id, ledger, clock
        self._lock = threading.Lock()  # one chain: appends from two threads must not share a seq
        last = ledger.last_record(identity.public_key)
        self._seq = 0 if last is None else last.seq + 1
        self._prev_hash = ZERO_HASH if last is None else last.hash

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    def claim(self, epoch: int, samples: int, compute_seconds: float, data_assignment: Mapping[str, int | str],
              model_digest: str, grad_digest: str, mean_loss: float | None, *,
              heldout_loss: float | None = None) -> Claim:
        """Sign, append and return this peer's claim for ``epoch``: call once local accumulation for the epoch
        is done, before averaging.

        Args:
            epoch: the global epoch the work counts towards.
            samples: samples processed in this epoch (the weight this peer will use in the all-reduce).
            compute_seconds: time spent computing gradients.
            data_assignment: what re-derives the batches, e.g. ``{"seed": 7, "steps": 12}``.
            model_digest: :func:`tensor_digest` of the parameters the epoch started from.
            grad_digest: :func:`tensor_digest` of the accumulated local gradients before averaging.
            mean_loss: mean training loss over the epoch's batches (None if unknown; NaN is stored as None).
            heldout_loss: held-out loss of the model the epoch started from, when evaluated.
        """
        with self._lock:
            record = Claim(run_id=self.run_id, public_key=self.public_key, seq=self._seq, prev_hash=self._prev_hash,
                           timestamp=float(self._clock()), epoch=epoch, samples=int(samples),
                           compute_seconds=float(compute_seconds),
                           data_assignment=tuple(sorted(data_assignment.items())), model_digest=model_digest,
                           grad_digest=grad_digest, mean_loss=_finite_or_none(mean_loss),
                           heldout_loss=_finite_or_none(heldout_loss))
            return self._append(record)

    @staticmethod
    def gather_payload(claim: Claim, weight: float) -> dict[str, Any]:
        """What to pass as ``averager.step(gather=...)``: the signed claim and the all-reduce weight."""
        return {"claim": claim.to_wire(), "weight": weight}

    def check_groupmate_claims(self, epoch: int, gathered: Mapping[Any, Any]) -> GroupCheck:
        """Check what every groupmate sent through the all-gather, before co-signing the round.

        Args:
            epoch: the epoch being averaged.
            gathered: ``{peer: payload}`` as returned by ``averager.step(gather=...)``; ``peer`` is a hivemind
                ``PeerID`` (or a peer id string, or a raw public key) and ``payload`` what
                :meth:`gather_payload` made (or bare claim bytes, then the weight is the claimed samples).

        Returns:
            a :class:`GroupCheck`. Valid claims are added to the ledger; invalid ones become problems. A
            member whose claim is invalid is still listed in ``members`` (it took part in the all-reduce)
            when its public key can be read from its peer id.
        """
        members: dict[bytes, int] = {}
        claims: dict[bytes, Claim] = {}
        problems: list[Problem] = []
        for peer, payload in gathered.items():
            sender = peer if isinstance(peer, bytes) and len(peer) == 32 else public_key_of_peer_id(peer)
            claim, weight, problem = self._read_payload(payload, sender, epoch)
            if problem is not None:
                problems.append(problem)
            key = sender if sender is not None else (claim.public_key if claim is not None else None)
            if key is not None and weight is not None:
                members[key] = weight
            if claim is None:
                continue
            if claim.samples > weight * (1 + TOLERANCE):
                problems.append(problem_about("claim_exceeds_weight", f"claims {claim.samples} samples but announced "
                                              f"weight {weight} for the all-reduce", claim, "all-gather"))
            claims[claim.public_key] = claim
        received = [c for k, c in claims.items() if k != self.public_key]
        if received:
            self.ledger.add_verified(received)
        for problem in problems:
            # hivemind lets a peer one epoch behind tag along in a round: expected, not a warning
            level = logging.DEBUG if problem.code == "wrong_epoch" else logging.WARNING
            logger.log(level, f"groupmate claim: {problem.describe()}")
        return GroupCheck(members=members, claims=claims, problems=problems)

    def _read_payload(self, payload: Any, sender: bytes | None,
                      epoch: int) -> tuple[Claim | None, int | None, Problem | None]:
        who = readable_name(sender) if sender is not None else "an unknown peer"

        def bad(code: str, message: str, record: Record | None = None) -> tuple[None, int | None, Problem]:
            if record is not None:
                return None, announced, problem_about(code, message, record, "all-gather", peer=sender)
            return None, announced, Problem(code, message, peer=sender, epoch=epoch, where="all-gather")

        announced: int | None = None
        raw = payload
        if isinstance(payload, Mapping):
            raw = payload.get("claim")
            weight = payload.get("weight")
            # at most MAX_INT: a receipt cannot hold a larger weight, and cosign() would raise on it
            if type(weight) in (int, float) and math.isfinite(weight) and 0 <= weight <= MAX_INT:
                announced = int(round(weight))
        if not isinstance(raw, (bytes, str)):
            return bad("unreadable_claim", f"{who} sent no claim in the all-gather")
        try:
            claim = from_json(raw)
        except RecordError as e:
            return bad("unreadable_claim", f"{who} sent an invalid claim: {e}")
        if not isinstance(claim, Claim):
            return bad("unreadable_claim", f"{who} sent a {claim.kind} record instead of a claim", claim)
        if announced is None:
            announced = claim.samples
        if not claim.verify():
            return bad("bad_signature", f"the claim {who} sent does not verify", claim)
        if sender is not None and claim.public_key != sender:
            return bad("wrong_peer", f"{who} sent a claim signed by {readable_name(claim.public_key)}", claim)
        if claim.run_id != self.run_id:
            return bad("other_run", f"{who} sent a claim of run {claim.run_id!r}", claim)
        if claim.epoch != epoch:
            return bad("wrong_epoch", f"{who} sent a claim for epoch {claim.epoch}, this round is epoch {epoch}",
                       claim)
        return claim, announced, None

    def cosign(self, epoch: int, members: Mapping[bytes, float], result_digest: str,
               group_id: bytes | str | None = None, rejected: Sequence[bytes] = ()) -> ReceiptSignature:
        """Sign, append and return this peer's co-signature of the round, right after the all-reduce.

        Args:
            epoch: the epoch that was averaged.
            members: every group member's public key and all-reduce weight (``GroupCheck.members``); this
                peer must be one of them. All members must pass the same mapping to sign the same receipt.
            result_digest: :func:`tensor_digest` of this peer's averaged result.
            group_id: hivemind's group id if the caller has it; by default one derived from the members.
            rejected: public keys of groupmates whose parts this peer's reducer refused (see robust.py).
        """
        if self.public_key not in members:
            raise ValueError("cosign: this peer is not among the members of the round")
        weights = []
        for key, weight in sorted(members.items()):
            if not (type(weight) in (int, float) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"cosign: weight {weight!r} of member {readable_name(key)} is not a number >= 0")
            weights.append((bytes(key), int(round(weight))))
        if group_id is None:
            group_id = group_id_for(self.run_id, epoch, [key for key, _ in weights])
        elif isinstance(group_id, bytes):
            group_id = group_id.hex()
        with self._lock:
            record = ReceiptSignature(run_id=self.run_id, public_key=self.public_key, seq=self._seq,
                                      prev_hash=self._prev_hash, timestamp=float(self._clock()), epoch=epoch,
                                      group_id=group_id, members=tuple(weights), result_digest=result_digest,
                                      rejected=tuple(sorted(set(map(bytes, rejected)))))
            return self._append(record)

    def _append(self, record: Record) -> Any:
        signed = sign(record, self.identity)
        self.ledger.append(signed)
        self._seq, self._prev_hash = signed.seq + 1, signed.hash
        return signed


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
