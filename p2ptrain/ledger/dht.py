"""The ledger in hivemind's DHT: an Ed25519 record validator and publish / fetch helpers.

Layout: key ``f"{run_id}_ledger_{epoch}"`` (one key per epoch keeps each get small); inside it one subkey
per record, ``"[ed25519:<signer public key hex>]<kind>:<seq>"``; the value is the record's JSON bytes,
which carry their own signature. This is the only ledger module that imports hivemind.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from p2ptrain.ledger.records import Record, RecordError, from_json
from p2ptrain.ledger.store import Ledger

logger = logging.getLogger(__name__)

DEFAULT_TTL = 7 * 24 * 3600.0  # seconds a published record stays in the DHT; peers keep their own copy for good
MARKER = b"[ed25519:"  # hivemind's RSA validator uses "[owner:...]"; this one is ours
SUBKEY_RE = re.compile(r"\[ed25519:([0-9a-f]{64})\](claim|receipt):(0|[1-9][0-9]{0,18})")


RESULT_TIMEOUT = 15.0  # seconds to wait for one DHT store or get


def ledger_key(run_id: str, epoch: int) -> str:
    return f"{run_id}_ledger_{epoch}"


def ledger_key_id(run_id: str, epoch: int) -> bytes:
    """The key as validators see it: hivemind hands them ``DHTID.generate(key).to_bytes()``, never the text."""
    return DHTID.generate(source=ledger_key(run_id, epoch)).to_bytes()


def subkey_of(record: Record) -> str:
    """The owner-marked subkey under which ``record`` is stored: only its signer's signature is accepted there."""
    return f"[ed25519:{record.public_key.hex()}]{record.kind}:{record.seq}"


def parse_entry(subkey: Any, value: Any) -> Record | None:
    """The record stored as ``value`` under ``subkey`` when it is a valid, correctly signed ledger entry.

    Valid means: the subkey names the record's own signer, kind and seq; the value parses with the strict
    schema; and the signature verifies with the key named in the subkey.
    """
    if isinstance(subkey, bytes):
        try:
            subkey = subkey.decode()
        except UnicodeDecodeError:
            return None
    if not isinstance(subkey, str) or not isinstance(value, bytes):
        return None
    match = SUBKEY_RE.fullmatch(subkey)
    if match is None:
        return None
    try:
        record = from_json(value)
    except RecordError as e:
        logger.debug(f"ledger entry {subkey} is not a record: {e}")
        return None
    owner, kind, seq = match.groups()
    if record.public_key.hex() != owner or record.kind != kind or record.seq != int(seq):
        logger.debug(f"ledger entry {subkey} holds a record of another signer, kind or seq")
        return None
    if not record.verify():
        logger.debug(f"ledger entry {subkey} has a bad signature")
        return None
    return record


class Ed25519RecordValidator(RecordValidatorBase):
    """Lets into the DHT only ledger records their own signer wrote, and nothing else under ledger keys.

    * An entry whose subkey carries ``[ed25519:<key>]`` is accepted only when :func:`parse_entry` accepts it
      and the DHT key is the ledger key of the record's own run and epoch. So no peer can write or
      overwrite another peer's records, and a record cannot be replayed under another epoch's key.
    * Any other entry under a known ledger key (a plain value, a foreign subkey) is refused: a plain value
      with a later expiration would otherwise evict every record of that epoch from the storing node.
    * Everything else passes untouched (return True), so hivemind's own protected records -- e.g. the
      ``{run_id}_progress`` key that ProgressTracker signs with RSA -- keep working next to this validator.

    DHT keys reach a validator only as hashes, so "known ledger key" means: the keys of the runs and epochs
    this validator has been told about (``run_id``, ``epoch``) or has seen valid records for, plus
    ``lookahead`` epochs ahead of each, in a bounded LRU table.

    Values are not wrapped (records carry their own signature), so ``sign_value`` and ``strip_value`` are the
    identity. Priority 0 validates after hivemind's RSASignatureValidator (priority 10) has stripped its
    ``[signature:...]`` suffixes, which ledger JSON can never contain.
    """

    def __init__(self, run_id: str | None = None, *, epoch: int = 0, lookahead: int = 64, capacity: int = 1 << 16):
        self._lookahead, self._capacity = lookahead, capacity
        self._known: OrderedDict[bytes, None] = OrderedDict()  # LRU set of ledger key ids
        if run_id is not None:
            self._learn(run_id, epoch)

    def validate(self, record: DHTRecord) -> bool:
        if MARKER not in record.subkey:
            if record.key in self._known:
                logger.debug("refused a non-ledger entry under a ledger key")
                return False
            return True
        try:  # untrusted bytes: anything that fails to decode is simply not a ledger record
            subkey = msgpack.unpackb(record.subkey, raw=False)
            value = msgpack.unpackb(record.value, raw=False)
        except Exception:
            return False
        parsed = parse_entry(subkey, value)
        if parsed is None:
            return False
        if record.key != ledger_key_id(parsed.run_id, parsed.epoch):
            logger.debug(f"refused {parsed.kind} of epoch {parsed.epoch} stored under another key")
            return False
        self._learn(parsed.run_id, parsed.epoch)
        return True

    def _learn(self, run_id: str, epoch: int) -> None:
        self._remember(ledger_key_id(run_id, epoch))
        ahead = ledger_key_id(run_id, epoch + self._lookahead)
        if ahead in self._known:
            return  # this stretch of epochs is already known: one hash per record, not `lookahead`
        for e in range(epoch + 1, epoch + self._lookahead):
            self._remember(ledger_key_id(run_id, e))
        self._remember(ahead)

    def _remember(self, key_id: bytes) -> None:
        self._known[key_id] = None
        self._known.move_to_end(key_id)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, Ed25519RecordValidator):
            return False
        for key_id in other._known:  # one instance is enough; keep what the other one knew
            self._remember(key_id)
        return True


def publish(dht: Any, records: Iterable[Record], *, ttl: float = DEFAULT_TTL) -> int:
    """Store records (this peer's, or verified ones it relays) in the DHT; returns how many stores succeeded.

    Blocks until the DHT answers (about a third of a second on a small swarm): call it off the training
    thread or after the round.
    """
    expiration = get_dht_time() + ttl
    futures = [dht.store(ledger_key(r.run_id, r.epoch), r.to_wire(), expiration, subkey=subkey_of(r),
                         return_future=True) for r in records]
    return sum(1 for future in futures if _result(future))


def fetch(dht: Any, run_id: str, epochs: Iterable[int], *, latest: bool = True) -> list[Record]:
    """Every valid ledger record of ``run_id`` found in the DHT for ``epochs`` (verified here again)."""
    futures = [(epoch, dht.get(ledger_key(run_id, epoch), latest=latest, return_future=True)) for epoch in epochs]
    records = []
    for epoch, future in futures:
        found = _result(future)
        if found is None or not isinstance(found.value, dict):
            continue
        for subkey, item in found.value.items():
            record = parse_entry(subkey, getattr(item, "value", None))
            if record is not None and record.run_id == run_id and record.epoch == epoch:
                records.append(record)
    return records


def _result(future: Any, timeout: float = RESULT_TIMEOUT) -> Any:
    """A DHT future's result, or None after ``timeout``: if the DHT process died, it would never resolve."""
    try:
        return future.result(timeout=timeout)
    except Exception as e:
        logger.debug(f"DHT request failed: {e!r}")
        return None


def sync(dht: Any, ledger: Ledger, run_id: str, epochs: Iterable[int]) -> int:
    """Fetch the records of ``epochs`` and add those the ledger lacks; returns how many were new."""
    return ledger.add_verified(fetch(dht, run_id, epochs))
