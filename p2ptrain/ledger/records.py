"""Ledger records: frozen, versioned, signed over one canonical byte encoding.

Two kinds of record, both signed by one peer with its Ed25519 identity key and both links of that
peer's hash chain (``seq`` counts the peer's records from 0; ``prev_hash`` is the hash of its previous
record, 64 zeros for the first):

* :class:`Claim` -- "in epoch E I processed N samples, starting from model M, my gradient was G".
* :class:`ReceiptSignature` -- one member's co-signature of an averaging round: the group, every
  member's all-reduce weight (the *shared body*, identical for all members) plus the member's own digest
  of the averaged result. A :class:`Receipt` is the set of co-signatures over one shared body.

Encoding: the body is compact JSON with sorted keys, ASCII only, no NaN; bytes fields are lowercase hex.
The signature covers ``DOMAIN + body``; the record hash is SHA-256 of the same bytes, so re-signing a
body with another key cannot change its hash. ``from_json`` is the one way in for untrusted data: it
checks every field's type and range and rejects unknown fields, kinds and schema versions.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Callable, ClassVar, Mapping, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SCHEMA_VERSION = 1
DOMAIN = b"p2ptrain-ledger-v1\n"  # keeps ledger signatures from being valid for any other message
ZERO_HASH = "0" * 64  # prev_hash of a peer's first record

MAX_INT = 2**63 - 1
MAX_MEMBERS = 1024
MAX_ASSIGNMENT_ITEMS = 16
# No "[" anywhere in a record's JSON text outside arrays: hivemind's RSASignatureValidator strips every
# "[signature:...]" from DHT values, so user-chosen strings must never be able to spell one.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ASSIGNMENT_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
ASSIGNMENT_STR_RE = re.compile(r"[A-Za-z0-9_.:/+=-]{0,128}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
GROUP_ID_RE = re.compile(r"(?:[0-9a-f]{2}){1,64}")


class RecordError(ValueError):
    """Data that is not a valid ledger record (wrong type, range, field, kind or schema version)."""


def _require(condition: bool, message: str) -> None:
    """Raise with ``message`` unless ``condition``; pass only constant messages (f-strings cost on every call)."""
    if not condition:
        raise RecordError(message)


# The checks below run ~40 times per record on the verify path: they format a message only on failure.

def _check_int(name: str, value: Any, low: int = 0, high: int = MAX_INT) -> None:
    if not (type(value) is int and low <= value <= high):
        raise RecordError(f"{name} must be an integer in [{low}, {high}]")


def _check_float(name: str, value: Any, *, optional: bool = False, negative: bool = False) -> None:
    if optional and value is None:
        return
    ok = type(value) is float and math.isfinite(value) and (negative or value >= 0.0)
    if not ok:
        sign = "" if negative else " non-negative"
        raise RecordError(f"{name} must be a finite{sign} number" + (" or null" if optional else ""))


def _check_hex64(name: str, value: Any) -> None:
    if not (type(value) is str and HEX64_RE.fullmatch(value) is not None):
        raise RecordError(f"{name} must be 64 lowercase hex digits")


def _check_key(name: str, value: Any) -> None:
    if not (type(value) is bytes and len(value) == 32):
        raise RecordError(f"{name} must be a 32-byte Ed25519 public key")


def _as_float(value: Any) -> Any:
    """JSON writes 2.0 as 2.0, but other encoders may write 2: accept ints for float fields."""
    return float(value) if type(value) is int else value


@lru_cache(maxsize=4096)
def _public_key_object(public_key: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key)


def _openssl_verify(signature: bytes, data: bytes, public_key: bytes) -> bool:
    try:
        _public_key_object(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def _load_libsodium() -> Callable[[bytes, bytes, bytes], bool] | None:
    """libsodium's Ed25519 verify through ctypes, when the system has the library.

    It checks a signature in about 40 us where OpenSSL (behind ``cryptography``) takes about 90 us, which
    is what lets ``verify`` pass 10,000 records per second on one core. ``verify_raw`` applies libsodium's
    extra rules on the OpenSSL path too, so both give the same verdict; ``P2PTRAIN_NO_LIBSODIUM=1`` forces
    the OpenSSL path.
    """
    if os.environ.get("P2PTRAIN_NO_LIBSODIUM"):
        return None
    for name in ("libsodium.so.23", "libsodium.so.26", "libsodium.so", "libsodium.dylib"):
        try:
            lib = ctypes.CDLL(name)
            if lib.sodium_init() < 0:
                return None
            function = lib.crypto_sign_ed25519_verify_detached
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p]
        function.restype = ctypes.c_int
        return lambda signature, data, public_key: function(signature, data, len(data), public_key) == 0
    return None


_fast_verify = _load_libsodium()
VERIFY_BACKEND = "libsodium" if _fast_verify is not None else "openssl"


_P = 2**255 - 19
# y-coordinates (sign bit ignored) of the points of order 1, 2, 4 and 8, with the non-canonical p and p + 1:
# libsodium's blocklist. Only a signer can produce such an R or key (e.g. R = identity with S = k * a), and
# OpenSSL accepts them while libsodium does not; refusing them on both paths keeps every peer's verdict equal.
_SMALL_ORDER_Y = frozenset({0, 1, _P - 1, _P, _P + 1,
                            2707385501144840649318225287225658788936804267575313519463743609750303402022,
                            55188659117513257062467267217118295137698188065244968500265048394206261417927})
_Y_MASK = (1 << 255) - 1


def _weak_point(encoding: bytes, *, check_canonical: bool) -> bool:
    y = int.from_bytes(encoding, "little") & _Y_MASK
    return y in _SMALL_ORDER_Y or (check_canonical and y >= _P)


def verify_raw(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``data`` (libsodium's strict rules)."""
    if type(public_key) is not bytes or len(public_key) != 32 or type(signature) is not bytes or len(signature) != 64:
        return False  # the C call below reads exactly 32 and 64 bytes
    if _weak_point(signature[:32], check_canonical=False) or _weak_point(public_key, check_canonical=True):
        return False
    if _fast_verify is not None:
        return _fast_verify(signature, bytes(data), public_key)
    return _openssl_verify(signature, data, public_key)


@contextmanager
def bulk() -> Iterator[None]:
    """Pause Python's cycle collector while parsing or checking many records.

    Records form no reference cycles, but allocating tens of thousands of them triggers full collections
    that cost ~15% of ``verify``'s time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON, sorted keys, ASCII, no NaN (one encoder reused: json.dumps builds one per call)."""
    return _ENCODER.encode(obj).encode()


class _Signed:
    """Behaviour shared by both record kinds (hash, signing, verification, JSON)."""

    kind: ClassVar[str]
    public_key: bytes
    signature: bytes

    def body(self) -> dict[str, Any]:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    @cached_property
    def signing_bytes(self) -> bytes:
        """The exact bytes the signature covers: ``DOMAIN`` + canonical JSON of every field but the signature."""
        return DOMAIN + canonical_json(self.body())

    @cached_property
    def hash(self) -> str:
        """SHA-256 (hex) of :attr:`signing_bytes`: the record's id and the next record's ``prev_hash``."""
        return hashlib.sha256(self.signing_bytes).hexdigest()

    def verify(self) -> bool:
        """True when ``signature`` is ``public_key``'s signature of this exact record."""
        return self._valid

    @cached_property
    def _valid(self) -> bool:  # a frozen record is checked once, however many hands it passes through
        return verify_raw(self.public_key, self.signature, self.signing_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature.hex()}

    def to_json(self) -> str:
        """One line of JSON holding the whole record, signature included (JSONL, SQLite and DHT format)."""
        return canonical_json(self.to_dict()).decode()

    def to_wire(self) -> bytes:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class Claim(_Signed):
    """One peer's account of its work in one global epoch.

    ``data_assignment`` re-derives the peer's batches (e.g. ``(("seed", 7), ("steps", 12))``), kept as
    sorted pairs so the record stays hashable. ``heldout_loss`` is the held-out loss of the model state
    the peer started the epoch from, when the peer evaluates one (the "did the work help" signal).
    """

    kind: ClassVar[str] = "claim"

    run_id: str
    public_key: bytes
    seq: int
    prev_hash: str
    timestamp: float
    epoch: int
    samples: int
    compute_seconds: float
    data_assignment: tuple[tuple[str, Union[int, str]], ...]
    model_digest: str
    grad_digest: str
    mean_loss: float | None
    heldout_loss: float | None = None
    signature: bytes = b""
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_common(self)
        _check_int("samples", self.samples)
        _check_float("compute_seconds", self.compute_seconds)
        _check_float("mean_loss", self.mean_loss, optional=True, negative=True)
        _check_float("heldout_loss", self.heldout_loss, optional=True, negative=True)
        _check_hex64("model_digest", self.model_digest)
        _check_hex64("grad_digest", self.grad_digest)
        assignment = self.data_assignment
        if not (type(assignment) is tuple and len(assignment) <= MAX_ASSIGNMENT_ITEMS):
            raise RecordError(f"data_assignment must have at most {MAX_ASSIGNMENT_ITEMS} items")
        previous = ""
        for item in assignment:
            _require(type(item) is tuple and len(item) == 2, "data_assignment items must be (name, value) pairs")
            name, value = item
            if not (type(name) is str and ASSIGNMENT_KEY_RE.fullmatch(name) is not None and name > previous):
                raise RecordError(f"data_assignment names must be sorted, unique identifiers (got {name!r})")
            previous = name
            if type(value) is str:
                if ASSIGNMENT_STR_RE.fullmatch(value) is None:
                    raise RecordError(f"data_assignment[{name}] must use only letters, digits and _.:/+=-")
            else:
                _check_int(f"data_assignment[{name}]", value, -MAX_INT, MAX_INT)

    @property
    def assignment(self) -> dict[str, int | str]:
        return dict(self.data_assignment)

    def body(self) -> dict[str, Any]:
        return {
            "version": self.version, "kind": self.kind, "run_id": self.run_id, "public_key": self.public_key.hex(),
            "seq": self.seq, "prev_hash": self.prev_hash, "timestamp": self.timestamp, "epoch": self.epoch,
            "samples": self.samples, "compute_seconds": self.compute_seconds,
            "data_assignment": dict(self.data_assignment), "model_digest": self.model_digest,
            "grad_digest": self.grad_digest, "mean_loss": self.mean_loss, "heldout_loss": self.heldout_loss,
        }


@dataclass(frozen=True)
class ReceiptSignature(_Signed):
    """One group member's co-signature of an averaging round.

    ``members`` is ``((public_key, weight), ...)`` sorted by key: every member and the weight (samples)
    it contributed to the all-reduce. The shared body (run, epoch, group, members) is what all members
    must agree on; ``result_digest`` is this member's own digest of the averaged result. It is signed but
    kept out of the shared body because hivemind's all-reduce hands each member ``local + (avg - local)``
    (and compressed parts from the other reducers), so averaged bytes differ in the last bits per member.
    ``rejected`` (also the member's own) lists groupmates whose parts this member's reducer refused (NaN/Inf,
    absurd norm); it appears in the encoding only when non-empty, so older records keep their bytes.
    """

    kind: ClassVar[str] = "receipt"

    run_id: str
    public_key: bytes
    seq: int
    prev_hash: str
    timestamp: float
    epoch: int
    group_id: str
    members: tuple[tuple[bytes, int], ...]
    result_digest: str
    rejected: tuple[bytes, ...] = ()
    signature: bytes = b""
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_common(self)
        _require(type(self.group_id) is str and GROUP_ID_RE.fullmatch(self.group_id) is not None,
                 "group_id must be 2 to 128 lowercase hex digits")
        _check_hex64("result_digest", self.result_digest)
        members = self.members
        if not (type(members) is tuple and 1 <= len(members) <= MAX_MEMBERS):
            raise RecordError(f"members must list 1 to {MAX_MEMBERS} (public key, weight) pairs")
        previous = b""
        for item in members:
            _require(type(item) is tuple and len(item) == 2, "members must be (public key, weight) pairs")
            key, weight = item
            _check_key("member public key", key)
            _require(key > previous, "members must be sorted by public key, without repeats")
            previous = key
            _check_int("member weight", weight)
        _require(self.public_key in self.weights, "the signer of a receipt must be one of its members")
        _require(type(self.rejected) is tuple, "rejected must be a list of public keys")
        previous = b""
        for key in self.rejected:
            _check_key("rejected public key", key)
            _require(key > previous, "rejected must list sorted, distinct public keys")
            previous = key

    @cached_property
    def weights(self) -> dict[bytes, int]:
        return dict(self.members)

    def shared_body(self) -> dict[str, Any]:
        return {"version": self.version, "run_id": self.run_id, "epoch": self.epoch, "group_id": self.group_id,
                "members": [[key.hex(), weight] for key, weight in self.members]}

    @cached_property
    def receipt_id(self) -> str:
        """SHA-256 (hex) of the shared body: equal for every member's co-signature of one round.

        An id, not what is signed, so it hashes a plain injective encoding (run ids and group ids cannot
        hold a newline; keys and weights have fixed widths), about 5x cheaper than canonical JSON.
        """
        h = hashlib.sha256(f"{DOMAIN.decode()}receipt\n{self.version}\n{self.run_id}\n{self.epoch}\n"
                           f"{self.group_id}\n".encode())
        for key, weight in self.members:
            h.update(key + weight.to_bytes(8, "big"))
        return h.hexdigest()

    def body(self) -> dict[str, Any]:
        body = {**self.shared_body(), "kind": self.kind, "public_key": self.public_key.hex(), "seq": self.seq,
                "prev_hash": self.prev_hash, "timestamp": self.timestamp, "result_digest": self.result_digest}
        if self.rejected:
            body["rejected"] = [key.hex() for key in self.rejected]
        return body


Record = Union[Claim, ReceiptSignature]


def _check_common(record: Claim | ReceiptSignature) -> None:
    if record.version != SCHEMA_VERSION:
        raise RecordError(f"unknown schema version {record.version!r}")
    _require(type(record.run_id) is str and RUN_ID_RE.fullmatch(record.run_id) is not None,
             "run_id must be 1-64 characters: letters, digits, '_', '.', '-'")
    _check_key("public_key", record.public_key)
    _check_int("seq", record.seq)
    _check_hex64("prev_hash", record.prev_hash)
    _require((record.seq == 0) == (record.prev_hash == ZERO_HASH),
             "prev_hash must be all zeros exactly for a peer's first record (seq 0)")
    _check_float("timestamp", record.timestamp)
    _check_int("epoch", record.epoch)
    _require(type(record.signature) is bytes and len(record.signature) in (0, 64),
             "signature must be 64 bytes")


@dataclass(frozen=True)
class Receipt:
    """All co-signatures seen for one averaging round (one shared body)."""

    signatures: tuple[ReceiptSignature, ...]

    @property
    def first(self) -> ReceiptSignature:
        return self.signatures[0]

    @property
    def receipt_id(self) -> str:
        return self.first.receipt_id

    @property
    def epoch(self) -> int:
        return self.first.epoch

    @property
    def weights(self) -> dict[bytes, int]:
        return self.first.weights

    @property
    def signers(self) -> set[bytes]:
        return {s.public_key for s in self.signatures}

    @property
    def missing(self) -> list[bytes]:
        """Members whose co-signature is not among :attr:`signatures`."""
        signers = self.signers
        return [key for key, _ in self.first.members if key not in signers]


def assemble_receipts(signatures: list[ReceiptSignature]) -> list[Receipt]:
    """Group co-signatures by shared body, in order of first appearance."""
    groups: dict[str, list[ReceiptSignature]] = {}
    for signature in signatures:
        groups.setdefault(signature.receipt_id, []).append(signature)
    return [Receipt(tuple(group)) for group in groups.values()]


def sign(record: Record, identity: Any) -> Record:
    """``record`` signed with ``identity`` (a :class:`p2ptrain.identity.Identity` holding its key)."""
    if record.public_key != identity.public_key:
        raise ValueError("a record can only be signed by the key named in its public_key")
    return dataclasses.replace(record, signature=identity.sign(record.signing_bytes))


# ---- strict parsing of untrusted input -------------------------------------------------------------------

_CLAIM_FIELDS = frozenset(Claim("run_id", bytes(32), 0, ZERO_HASH, 0.0, 0, 0, 0.0, (),
                                ZERO_HASH, ZERO_HASH, None).to_dict())
_RECEIPT_FIELDS = frozenset(ReceiptSignature("run_id", bytes(32), 0, ZERO_HASH, 0.0, 0, "00", ((bytes(32), 0),),
                                             ZERO_HASH).to_dict())


_HEX_RE = {32: re.compile(r"[0-9a-f]{64}"), 64: re.compile(r"[0-9a-f]{128}")}


def _hex_bytes(name: str, value: Any, length: int) -> bytes:
    if not (type(value) is str and _HEX_RE[length].fullmatch(value) is not None):
        raise RecordError(f"{name} must be {2 * length} lowercase hex digits")
    return bytes.fromhex(value)


def from_json(data: str | bytes | Mapping[str, Any]) -> Record:
    """Parse one record from its JSON text (or an already decoded object), checking the full schema.

    Raises:
        RecordError: with a one-line reason when ``data`` is not a valid record of a known version.
    """
    if isinstance(data, (str, bytes)):
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise RecordError(f"not JSON ({str(e) or type(e).__name__})") from None
    else:
        obj = data
    _require(isinstance(obj, dict), "not a ledger record (expected a JSON object)")
    version = obj.get("version")
    if version != SCHEMA_VERSION or type(version) is not int:
        if "version" not in obj:
            raise RecordError("not a ledger record (no schema version)")
        raise RecordError(f"unknown schema version {version!r} (this p2ptrain reads version {SCHEMA_VERSION};"
                          f" a newer p2ptrain may read it)")
    kind = obj.get("kind")
    fields = {"claim": _CLAIM_FIELDS, "receipt": _RECEIPT_FIELDS}.get(kind)  # type: ignore[arg-type]
    if fields is None:
        raise RecordError(f"unknown record kind {kind!r}")
    keys = obj.keys() - ({"rejected"} if kind == "receipt" else set())  # optional: written only when non-empty
    if keys != fields:
        extra, missing = sorted(keys - fields), sorted(fields - keys)
        raise RecordError(f"{kind} record has " + "; ".join(
            part for part in (extra and f"unknown fields {extra}", missing and f"missing fields {missing}") if part))
    try:
        common = dict(run_id=obj["run_id"], public_key=_hex_bytes("public_key", obj["public_key"], 32),
                      seq=obj["seq"], prev_hash=obj["prev_hash"], timestamp=_as_float(obj["timestamp"]),
                      epoch=obj["epoch"], signature=_hex_bytes("signature", obj["signature"], 64))
        if kind == "claim":
            assignment = obj["data_assignment"]
            _require(isinstance(assignment, dict), "data_assignment must be an object")
            return Claim(**common, samples=obj["samples"], compute_seconds=_as_float(obj["compute_seconds"]),
                         data_assignment=tuple(sorted(assignment.items())), model_digest=obj["model_digest"],
                         grad_digest=obj["grad_digest"], mean_loss=_as_float(obj["mean_loss"]),
                         heldout_loss=_as_float(obj["heldout_loss"]))
        members = obj["members"]
        _require(type(members) is list, "members must be a list of [public key, weight] pairs")
        parsed = []
        for item in members:
            _require(type(item) is list and len(item) == 2, "members must be a list of [public key, weight] pairs")
            parsed.append((_hex_bytes("member public key", item[0], 32), item[1]))
        rejected = obj.get("rejected", [])
        _require(type(rejected) is list and len(rejected) > 0 or "rejected" not in obj,
                 "rejected must be a non-empty list of public keys when present")
        return ReceiptSignature(**common, group_id=obj["group_id"], members=tuple(parsed),
                                result_digest=obj["result_digest"],
                                rejected=tuple(_hex_bytes("rejected public key", key, 32) for key in rejected))
    except TypeError as e:  # e.g. an unhashable value where a name was expected
        raise RecordError(f"malformed {kind} record ({e})") from None
