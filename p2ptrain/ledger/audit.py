"""Check a ledger: signatures, per-peer hash chains, claims against receipts, runs and duplicates.

``verify`` never stops at the first problem: it returns every :class:`Problem`, each naming its record
(kind, epoch, seq, hash, where it is stored) and the peer responsible, plus the subset of records that
passed the record-level checks, which the fairness report counts.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from p2ptrain.ledger.records import Claim, Receipt, ReceiptSignature, Record, assemble_receipts, bulk
from p2ptrain.names import readable_name

TOLERANCE = 0.05  # a claim may exceed its all-reduce weight by 5% (samples counted a moment apart) before it is flagged

# code -> what it means, for the CLI legend and the docs
PROBLEM_CODES = {
    "bad_signature": "the signature does not verify: the record was altered or signed with another key",
    "duplicate": "the same record appears more than once",
    "other_run": "the record belongs to another run",
    "chain_gap": "records are missing from a peer's chain",
    "chain_fork": "a peer signed two different records with the same sequence number",
    "chain_broken": "a record does not link to the peer's previous record (altered, replaced or re-signed)",
    "chain_reordered": "a peer's records are out of order",
    "chain_epoch": "a peer's epochs go backwards along its chain",
    "double_claim": "a peer claimed the same epoch twice",
    "double_receipt": "a peer co-signed two different rounds in one epoch",
    "claim_exceeds_weight": "a claim's samples exceed the weight its group used in the all-reduce",
    "claim_without_receipt": "a claim has no receipt of an averaging round",
    "missing_cosignature": "a group member did not co-sign its round's receipt",
    "rejected_part": "a groupmate refused this peer's averaging part (NaN/Inf or an absurd norm)",
    "unreadable_claim": "a groupmate sent something that is not a valid claim",
    "wrong_peer": "a claim arrived from a peer other than its signer",
    "wrong_epoch": "a claim is for another epoch than the current round",
}
# not a problem: a peer's newest record is a claim with no receipt yet. Its round may still be running when
# this copy was taken (every live peer's newest round is), or the peer stopped mid-round and never came
# back. Either way the claim earns no credit until a receipt attests it.
PENDING = "round_pending"

Entry = Union[Record, tuple[Record, str]]


@dataclass(frozen=True)
class Problem:
    """One finding. ``peer`` is the public key of the peer it concerns; ``record`` the record hash."""

    code: str
    message: str
    peer: bytes | None = None
    record: str | None = None
    kind: str | None = None
    epoch: int | None = None
    seq: int | None = None
    where: str | None = None

    @property
    def peer_name(self) -> str | None:
        return None if self.peer is None else readable_name(self.peer)

    def describe(self) -> str:
        """One line: where, code, message, then which record of which peer."""
        about = []
        if self.kind is not None:
            about.append(f"{self.kind} epoch {self.epoch} seq {self.seq}")
        if self.peer is not None:
            about.append(f"peer {self.peer_name}")
        if self.record is not None:
            about.append(f"record {self.record[:12]}")
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.code}: {self.message}" + (f" ({', '.join(about)})" if about else "")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "peer": self.peer_name,
                "public_key": None if self.peer is None else self.peer.hex(), "record": self.record,
                "kind": self.kind, "epoch": self.epoch, "seq": self.seq, "where": self.where}


def problem_about(code: str, message: str, record: Record, where: str | None = None, *,
                  peer: bytes | None = None) -> Problem:
    return Problem(code, message, peer=record.public_key if peer is None else peer, record=record.hash,
                   kind=record.kind, epoch=record.epoch, seq=record.seq, where=where)


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify` found. ``claims`` and ``receipts`` hold only records that passed the record checks
    (signature, run, duplicates), so reports built on them never count forged work."""

    run_id: str | None
    records: int
    peers: int
    problems: tuple[Problem, ...]
    pending: tuple[Problem, ...] = ()  # claims at the head of their chain with no receipt yet (see PENDING)
    claims: tuple[Claim, ...] = field(repr=False, default=())
    receipts: tuple[Receipt, ...] = field(repr=False, default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_id": self.run_id, "records": self.records, "peers": self.peers,
                "claims": len(self.claims), "receipts": len(self.receipts),
                "cosignatures": sum(len(r.signatures) for r in self.receipts), "problems": len(self.problems),
                "pending": len(self.pending)}


def verify(entries: Iterable[Entry], *, run_id: str | None = None) -> AuditReport:
    """Check every record and every relation between records.

    Args:
        entries: records in ledger order (file or canonical order), optionally paired with where each is
            stored (``"line 7"``); order matters only for the reordering check.
        run_id: the run the ledger belongs to; by default the run most of its records belong to.
    """
    with bulk():
        return _verify([entry if isinstance(entry, tuple) else (entry, None) for entry in entries], run_id)


def _verify(pairs: list[tuple[Record, str | None]], run_id: str | None) -> AuditReport:
    problems: list[Problem] = []
    if run_id is None and pairs:
        run_id = Counter(record.run_id for record, _ in pairs).most_common(1)[0][0]

    first_seen: dict[str, str | None] = {}
    good: list[tuple[Record, str | None]] = []
    invalid_seqs: dict[bytes, set[int]] = defaultdict(set)
    for record, where in pairs:
        if record.hash in first_seen:
            seen_at = first_seen[record.hash]
            problems.append(problem_about("duplicate", "the same record appears again" +
                                          (f" (first at {seen_at})" if seen_at else ""), record, where))
            continue
        first_seen[record.hash] = where
        if not record.verify():
            problems.append(problem_about("bad_signature", f"the {record.kind}'s signature does not verify with the "
                                          f"key it names (altered, or signed with another key)", record, where))
            invalid_seqs[record.public_key].add(record.seq)
        elif record.run_id != run_id:
            problems.append(problem_about("other_run", f"record of run {record.run_id!r} in the ledger of run "
                                          f"{run_id!r}", record, where))
            invalid_seqs[record.public_key].add(record.seq)
        else:
            good.append((record, where))

    problems += _check_chains(good, invalid_seqs)
    claims = [(r, w) for r, w in good if isinstance(r, Claim)]
    signatures = [r for r, _ in good if isinstance(r, ReceiptSignature)]
    receipts = assemble_receipts(signatures)
    where_of = {r.hash: w for r, w in good}
    problems += _check_receipts(receipts, where_of)
    heads: dict[bytes, int] = {}
    for record, _ in good:
        heads[record.public_key] = max(record.seq, heads.get(record.public_key, -1))
    unattested, pending = _check_claims(claims, receipts, heads)
    problems += unattested

    peers = {r.public_key for r, _ in pairs}
    return AuditReport(run_id=run_id, records=len(pairs), peers=len(peers), problems=tuple(problems),
                       pending=tuple(pending), claims=tuple(r for r, _ in claims), receipts=tuple(receipts))


def _check_chains(good: Sequence[tuple[Record, str | None]], invalid_seqs: dict[bytes, set[int]]) -> list[Problem]:
    problems: list[Problem] = []
    chains: dict[bytes, list[tuple[Record, str | None]]] = defaultdict(list)
    for record, where in good:
        chains[record.public_key].append((record, where))

    for key, chain in chains.items():
        skip = invalid_seqs.get(key, set())
        highest: Record | None = None
        by_seq: dict[int, list[tuple[Record, str | None]]] = defaultdict(list)
        for record, where in chain:  # ledger order
            if highest is not None and record.seq < highest.seq:
                problems.append(problem_about("chain_reordered", f"seq {record.seq} comes after seq {highest.seq} "
                                              f"(epoch {highest.epoch}) in the ledger", record, where))
            if highest is None or record.seq > highest.seq:
                highest = record
            by_seq[record.seq].append((record, where))

        seqs = sorted(by_seq)
        expected = 0
        for seq in seqs:
            missing = [s for s in range(expected, seq) if s not in skip]
            if missing:
                record, where = by_seq[seq][0]
                span = f"seq {missing[0]}" if len(missing) == 1 else f"seqs {missing[0]}..{missing[-1]}"
                problems.append(problem_about("chain_gap", f"{span} of this peer's chain missing before seq {seq}",
                                              record, where))
            expected = seq + 1
            versions = by_seq[seq]
            for record, where in versions[1:]:
                other = versions[0][0]
                problems.append(problem_about("chain_fork", f"a second record with seq {seq} (the other is "
                                              f"{other.kind} {other.hash[:12]})", record, where))
            previous = by_seq.get(seq - 1)
            if previous is None:
                continue
            previous_hashes = {r.hash for r, _ in previous}
            for record, where in versions:
                if record.prev_hash not in previous_hashes:
                    problems.append(problem_about("chain_broken", f"prev_hash does not match the peer's record seq "
                                                  f"{seq - 1} ({previous[0][0].hash[:12]})", record, where))
                if record.epoch < previous[0][0].epoch:
                    problems.append(problem_about("chain_epoch", f"epoch {record.epoch} follows epoch "
                                                  f"{previous[0][0].epoch} in the peer's chain", record, where))
    return problems


def _check_receipts(receipts: Sequence[Receipt], where_of: dict[str, str | None]) -> list[Problem]:
    problems: list[Problem] = []
    rounds_signed: dict[tuple[bytes, int], ReceiptSignature] = {}
    # hivemind retries matchmaking inside one round: a peer whose first attempt failed on its side may
    # have left its claim with a group that finished without it, then co-signed the group it ended in.
    # Its missing co-signature on the first group is no problem when it co-signed a round of that epoch.
    cosigned_epoch = {(signature.public_key, signature.epoch) for receipt in receipts for signature in receipt.signatures}
    for receipt in receipts:
        first = receipt.first
        for member in receipt.missing:
            if (member, first.epoch) in cosigned_epoch:
                continue
            problems.append(problem_about(
                "missing_cosignature", f"group {first.group_id[:12]} of epoch {first.epoch} has no co-signature from "
                f"member {readable_name(member)} ({len(receipt.signatures)}/{len(first.members)} signed)",
                first, where_of.get(first.hash), peer=member))
        for signature in receipt.signatures:
            for key in signature.rejected:
                problems.append(problem_about(
                    "rejected_part", f"{readable_name(signature.public_key)} refused this peer's part in the round of "
                    f"epoch {signature.epoch} (group {signature.group_id[:12]})", signature,
                    where_of.get(signature.hash), peer=key))
            earlier = rounds_signed.setdefault((signature.public_key, signature.epoch), signature)
            if earlier.receipt_id != signature.receipt_id:
                problems.append(problem_about("double_receipt", f"co-signed two different rounds in epoch "
                                              f"{signature.epoch} (groups {earlier.group_id[:12]} and "
                                              f"{signature.group_id[:12]})", signature, where_of.get(signature.hash)))
    return problems


def _check_claims(claims: Sequence[tuple[Claim, str | None]], receipts: Sequence[Receipt],
                  heads: dict[bytes, int]) -> tuple[list[Problem], list[Problem]]:
    """(problems, pending): ``heads`` maps each signer to the highest seq of its records in this ledger."""
    problems: list[Problem] = []
    pending: list[Problem] = []
    weight_of: dict[tuple[bytes, int], int] = {}
    for receipt in receipts:
        for key, weight in receipt.first.members:
            weight_of.setdefault((key, receipt.epoch), weight)
    claimed: dict[tuple[bytes, int], Claim] = {}
    for claim, where in claims:
        earlier = claimed.setdefault((claim.public_key, claim.epoch), claim)
        if earlier is not claim:
            problems.append(problem_about("double_claim", f"a second claim for epoch {claim.epoch} (the first is "
                                          f"{earlier.hash[:12]}: {earlier.samples} samples)", claim, where))
        weight = weight_of.get((claim.public_key, claim.epoch))
        if weight is None and claim.seq == heads.get(claim.public_key):
            pending.append(problem_about(PENDING, f"claims {claim.samples} samples; no receipt of epoch "
                                         f"{claim.epoch} yet: the round may still be running, or the peer stopped "
                                         f"mid-round", claim, where))
        elif weight is None:
            problems.append(problem_about("claim_without_receipt", f"claims {claim.samples} samples but no receipt "
                                          f"of epoch {claim.epoch} lists this peer", claim, where))
        elif claim.samples > weight * (1 + TOLERANCE):
            ratio = f"{claim.samples / weight:.1f}x" if weight else "weight 0"
            problems.append(problem_about("claim_exceeds_weight", f"claims {claim.samples} samples but its group "
                                          f"used weight {weight} in the all-reduce ({ratio})", claim, where))
    return problems, pending
