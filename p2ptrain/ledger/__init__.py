"""The contribution ledger: who did which work, signed by each peer, checkable by anyone.

records   -- Claim, ReceiptSignature, Receipt: frozen, versioned records signed over canonical bytes
store     -- Ledger: the peer's append-only SQLite (WAL) copy; JSONL export / import
writer    -- LedgerWriter: what the training loop calls each round (claim, check groupmates, co-sign)
audit     -- verify: signatures, hash chains, claims against receipts -> Problems
fairness  -- attested work per peer, shares and their Gini coefficient
dht       -- Ed25519RecordValidator and publish / fetch through hivemind's DHT (imports hivemind)
"""
from p2ptrain.ledger.audit import AuditReport, Problem, verify
from p2ptrain.ledger.fairness import FairnessReport, PeerShare, fairness, gini
from p2ptrain.ledger.records import (SCHEMA_VERSION, Claim, Receipt, ReceiptSignature, Record, RecordError,
                                     from_json, sign)
from p2ptrain.ledger.store import Ledger, default_ledger_path, read_jsonl
from p2ptrain.ledger.writer import GroupCheck, LedgerWriter, group_id_for, tensor_digest

__all__ = [
    "SCHEMA_VERSION", "AuditReport", "Claim", "FairnessReport", "GroupCheck", "Ledger", "LedgerWriter", "PeerShare",
    "Problem", "Receipt", "ReceiptSignature", "Record", "RecordError", "default_ledger_path", "fairness", "from_json",
    "gini", "group_id_for", "read_jsonl", "sign", "tensor_digest", "verify",
]
