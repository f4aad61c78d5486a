"""Closed swarms: the public keys allowed in a run, in a file signed by the run owner's key.

File (JSON; any formatting, the signature covers a canonical encoding)::

    {"format": "p2ptrain-allowlist-v1", "run_id": "R", "owner": "<owner's public key, hex>", "version": 3,
     "peers": [{"public_key": "<hex>", "name": "alice"}, ...], "signature": "<hex>"}

The signature is the owner's Ed25519 signature of ``DOMAIN + canonical JSON of everything but the signature``.
The owner is always allowed. A higher ``version`` by the same owner for the same run supersedes a lower one.

Enforcement, all keyed to the one Ed25519 key a peer has (its libp2p identity):

* :class:`AllowlistValidator` -- in every DHT node of a peer: records under the run's keys must carry the
  writer's signature (added by the writer's own validator) by an allowlisted key; the list itself travels
  under ``{run_id}_allowlist`` and a node adopts a newer version signed by the same owner when one passes by.
* :class:`AllowlistAveragerMixin` -- averagers refuse join requests, state downloads and groups with peers
  not on the list (libp2p authenticates the remote peer id of every request).
* :func:`admit` / :class:`Keeper` -- the startup check (a stranger is refused with a clear line) and the
  periodic republish / refresh of the list in the DHT.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator  # typing's: hivemind finds streaming RPCs by typing's hint names

import base58
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, crypto_pb2
from hivemind.utils import get_dht_time

from p2ptrain.errors import UserError
from p2ptrain.identity import Identity, peer_id_of, verify_signature
from p2ptrain.names import readable_name

logger = logging.getLogger(__name__)

FORMAT = "p2ptrain-allowlist-v1"
DOMAIN = b"p2ptrain-allowlist-v1\n"  # an allowlist signature is valid for nothing else
WRITER_DOMAIN = b"p2ptrain-dht-writer-v1\n"  # nor is a DHT writer's signature
MAX_PEERS = 1000  # the list travels as one DHT value
NAME_RE = re.compile(r"[A-Za-z0-9_.@ -]{1,64}")  # no "[": a DHT value must never spell a "[signature:...]"
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
TTL = 24 * 3600.0  # seconds a published list stays in the DHT without a republish
REFRESH = 30.0  # seconds between a peer's republish + refresh of the list


class AllowlistError(ValueError):
    """Bytes that are not a valid, correctly signed allowlist."""


@dataclass(frozen=True)
class Member:
    public_key: bytes
    name: str


@dataclass(frozen=True)
class Allowlist:
    """A verified allowlist. Build with :meth:`create`, :meth:`updated` or :func:`parse`."""

    run_id: str
    owner: bytes
    version: int
    members: tuple[Member, ...]  # sorted by public key, no duplicates, without the owner
    signature: bytes

    def body(self) -> dict[str, Any]:
        return {"format": FORMAT, "run_id": self.run_id, "owner": self.owner.hex(), "version": self.version,
                "peers": [{"public_key": m.public_key.hex(), "name": m.name} for m in self.members]}

    def signed_bytes(self) -> bytes:
        return DOMAIN + _canonical(self.body())

    def verify(self) -> bool:
        return verify_signature(self.owner, self.signature, self.signed_bytes())

    def allows(self, public_key: bytes) -> bool:
        return public_key == self.owner or any(m.public_key == public_key for m in self.members)

    def to_bytes(self) -> bytes:
        """The file's content (also the DHT value): indented for people, verified over the canonical form."""
        return (json.dumps({**self.body(), "signature": self.signature.hex()}, indent=2) + "\n").encode()

    def describe(self) -> str:
        return f"owner {readable_name(self.owner)} ({peer_id_of(self.owner)}), version {self.version}"

    @classmethod
    def create(cls, owner: Identity, run_id: str, members: Iterable[Member] = (), version: int = 1) -> Allowlist:
        if RUN_ID_RE.fullmatch(run_id) is None:
            raise UserError(f"--run-id may hold only letters, digits, '-', '_' and '.', got {run_id!r}")
        unique = {m.public_key: m for m in members if m.public_key != owner.public_key}
        if len(unique) > MAX_PEERS:
            raise UserError(f"an allowlist holds at most {MAX_PEERS} peers, got {len(unique)}")
        unsigned = cls(run_id, owner.public_key, version, tuple(sorted(unique.values(), key=lambda m: m.public_key)), b"")
        return cls(run_id, owner.public_key, version, unsigned.members, owner.sign(unsigned.signed_bytes()))

    def updated(self, owner: Identity, *, add: Iterable[Member] = (), remove: Iterable[bytes] = ()) -> Allowlist:
        """The next version with ``add`` added and ``remove`` removed, signed again by ``owner``."""
        if owner.public_key != self.owner:
            raise UserError(f"only the owner can change this allowlist ({self.describe()}); "
                            f"{owner.path} holds {owner.name} ({owner.peer_id})")
        gone = set(remove)
        if self.owner in gone:
            raise UserError("the owner cannot be removed from its own allowlist")
        members = {m.public_key: m for m in self.members if m.public_key not in gone}
        members.update((m.public_key, m) for m in add)
        return Allowlist.create(owner, self.run_id, members.values(), self.version + 1)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def parse(data: bytes) -> Allowlist:
    """The verified allowlist in ``data`` (untrusted: a file or a DHT value); AllowlistError says why not."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise AllowlistError("not JSON") from None
    fields = {"format", "run_id", "owner", "version", "peers", "signature"}
    if not isinstance(obj, dict) or set(obj) != fields:
        raise AllowlistError(f"expected exactly the fields {', '.join(sorted(fields))}")
    if obj["format"] != FORMAT:
        raise AllowlistError(f"unknown format {obj['format']!r} (expected {FORMAT!r})")
    if not isinstance(obj["run_id"], str) or RUN_ID_RE.fullmatch(obj["run_id"]) is None:
        raise AllowlistError("run_id is not a valid run id")
    if type(obj["version"]) is not int or not 1 <= obj["version"] < 2**63:
        raise AllowlistError("version must be a positive integer")
    owner = _hex_key(obj["owner"], "owner")
    if not isinstance(obj["signature"], str) or re.fullmatch(r"[0-9a-f]{128}", obj["signature"]) is None:
        raise AllowlistError("signature must be 128 hex digits")
    peers = obj["peers"]
    if not isinstance(peers, list) or len(peers) > MAX_PEERS:
        raise AllowlistError(f"peers must be a list of at most {MAX_PEERS} entries")
    members = []
    for peer in peers:
        if not isinstance(peer, dict) or set(peer) != {"public_key", "name"}:
            raise AllowlistError("each peer must have exactly the fields name, public_key")
        if not isinstance(peer["name"], str) or NAME_RE.fullmatch(peer["name"]) is None:
            raise AllowlistError(f"peer name {peer['name']!r} is not 1-64 letters, digits, spaces or _.@-")
        members.append(Member(_hex_key(peer["public_key"], "peer public_key"), peer["name"]))
    keys = [m.public_key for m in members]
    if keys != sorted(set(keys)) or owner in keys:
        raise AllowlistError("peers must be sorted by public key, without duplicates or the owner")
    allowlist = Allowlist(obj["run_id"], owner, obj["version"], tuple(members), bytes.fromhex(obj["signature"]))
    if not allowlist.verify():
        raise AllowlistError("the owner's signature does not match the content (tampered, or not signed by the owner)")
    return allowlist


def _hex_key(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or HEX64_RE.fullmatch(value) is None:
        raise AllowlistError(f"{what} must be 64 lowercase hex digits (an Ed25519 public key)")
    return bytes.fromhex(value)


def load(path: Path, run_id: str | None = None) -> Allowlist:
    """Read and verify an allowlist file; one-line UserError for unreadable, tampered or other-run files."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise UserError(f"cannot read allowlist {path}: {e.strerror}") from e
    try:
        allowlist = parse(data)
    except AllowlistError as e:
        raise UserError(f"allowlist {path} is invalid: {e}") from e
    if run_id is not None and allowlist.run_id != run_id:
        raise UserError(f"allowlist {path} is for run {allowlist.run_id!r}, not {run_id!r} (--run-id)")
    return allowlist


def write(allowlist: Allowlist, path: Path) -> None:
    path = Path(path).expanduser()
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_bytes(allowlist.to_bytes())
        temporary.replace(path)  # a crash never leaves half a list behind
    except OSError as e:
        raise UserError(f"cannot write allowlist {path}: {e.strerror}") from e


def parse_peer(text: str) -> Member:
    """``PEER[=NAME]``: a peer id (``12D3KooW…``, as ``p2ptrain identity`` prints it) or a public key in hex."""
    peer, _, name = text.partition("=")
    peer = peer.strip()
    public_key = public_key_of_peer_id(peer) if peer.startswith("12D3KooW") else None
    if public_key is None and HEX64_RE.fullmatch(peer.lower()):
        public_key = bytes.fromhex(peer.lower())
    if public_key is None:
        raise UserError(f"{peer!r} is neither a peer id (12D3KooW…) nor a 64-digit hex public key; "
                        f"`p2ptrain identity` prints both")
    name = name.strip() or readable_name(public_key)
    if NAME_RE.fullmatch(name) is None:
        raise UserError(f"peer name {name!r} must be 1-64 letters, digits, spaces or _.@-")
    return Member(public_key, name)


def public_key_of_peer_id(peer_id: str | bytes) -> bytes | None:
    """The Ed25519 public key inside a libp2p peer id (text or bytes), or None for any other kind of id."""
    try:
        raw = base58.b58decode(peer_id) if isinstance(peer_id, str) else bytes(peer_id)
        if len(raw) < 2 or raw[0] != 0x00 or raw[1] != len(raw) - 2:  # multihash "identity" of the key itself
            return None
        key = crypto_pb2.PublicKey.FromString(raw[2:])
    except Exception:
        return None
    return key.data if key.key_type == crypto_pb2.KeyType.Ed25519 and len(key.data) == 32 else None


def check_member(allowlist: Allowlist, identity: Identity, path: Path | str) -> None:
    if not allowlist.allows(identity.public_key):
        raise UserError(f"this run is closed: your key {identity.peer_id} ({identity.name}) is not on the allowlist "
                        f"{path} signed by {allowlist.describe()}; the owner adds it with "
                        f"`p2ptrain allowlist add FILE {identity.peer_id}`")


# ---- the DHT -------------------------------------------------------------------------------------------------

def allowlist_key(run_id: str) -> str:
    return f"{run_id}_allowlist"


def protected_keys(run_id: str, *, group_bits: int = 6) -> dict[bytes, str]:
    """DHT key ids of the run (validators see keys only as these hashes) -> what they hold.

    ``peers``: p2ptrain heartbeats (subkey: the writer's public key hex); ``progress``: hivemind's progress
    tracker (subkey: a separate RSA key); ``averager``: matchmaking and state-download declarations of both
    averagers (subkey: the writer's peer id); ``allowlist``: the signed list itself. Ledger keys are recognised
    by their ``[ed25519:`` subkeys instead (one key per epoch).
    """
    names = {f"{run_id}_peers": "peers", f"{run_id}_progress": "progress", allowlist_key(run_id): "allowlist"}
    for prefix in (f"{run_id}_grad_averager", f"{run_id}_state_averager"):
        names[f"{prefix}.all_averagers"] = "averager"
        for length in range(group_bits + 1):  # group keys "<prefix>.0b<bits>" (no bits unless a group size is set)
            for i in range(2 ** length):
                names[f"{prefix}.0b{format(i, f'0{length}b') if length else ''}"] = "averager"
    return {DHTID.generate(source=name).to_bytes(): kind for name, kind in names.items()}


LEDGER_MARKER = b"[ed25519:"
SUFFIX_HEAD = b"[p2ptrain-writer:"
SUFFIX_LEN = len(SUFFIX_HEAD) + 64 + 1 + 128 + 1  # head, key hex, ":", signature hex, "]"


def _writer_payload(record: DHTRecord, value: bytes) -> bytes:
    parts = (record.key, record.subkey, value)
    return WRITER_DOMAIN + b"".join(struct.pack(">I", len(p)) + p for p in parts) + struct.pack(
        ">d", record.expiration_time)


def _split(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(value, writer public key, signature) of a value that ends in a writer suffix, else None."""
    tail = value[-SUFFIX_LEN:]
    if len(tail) != SUFFIX_LEN or not tail.startswith(SUFFIX_HEAD) or not tail.endswith(b"]"):
        return None
    try:
        key, signature = tail[len(SUFFIX_HEAD):-1].split(b":")
        return value[:-SUFFIX_LEN], bytes.fromhex(key.decode()), bytes.fromhex(signature.decode())
    except ValueError:
        return None


class AllowlistValidator(RecordValidatorBase):
    """Binds the run's DHT records to allowlisted writers.

    Without an allowlist (an open run, the monitor, a stranger) it enforces nothing and only strips writer
    signatures, so such a node can still read a closed run's records. With one:

    * ``sign_value``: this node's own records under the run's keys get ``[p2ptrain-writer:<key>:<sig>]``
      appended, the Ed25519 signature of this peer's identity over key, subkey, value and expiration.
    * ``validate``: such a record is accepted only with a valid writer signature by an allowlisted key; where
      the subkey names its owner (heartbeats: public key; averager declarations: peer id) the writer must be
      that owner; ledger records must also be signed by an allowlisted peer.
    * the list itself (``{run_id}_allowlist``, one subkey per version) is accepted only when signed by the
      owner for this run; a newer version replaces this node's list at once.

    Priority 100: it signs last and validates first, so the other validators (hivemind's RSA signatures,
    the ledger's) never see the suffix.
    """

    def __init__(self, run_id: str, allowlist: Allowlist | None = None, private_key: bytes | None = None):
        self.run_id, self.allowlist = run_id, allowlist
        self._private_key = private_key  # raw 32 bytes; the object is built in the DHT process
        self._signer: Ed25519PrivateKey | None = None
        self._kinds = protected_keys(run_id)

    @property
    def priority(self) -> int:
        return 100

    def _kind(self, record: DHTRecord) -> str | None:
        kind = self._kinds.get(record.key)
        if kind is None and LEDGER_MARKER in record.subkey:
            kind = "ledger"
        return kind

    def allows(self, public_key: bytes | None) -> bool:
        return self.allowlist is None or (public_key is not None and self.allowlist.allows(public_key))

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kind(record)
        if kind is None:
            return True
        if kind == "allowlist":
            return self._validate_list(record)
        if self.allowlist is None:
            return True
        split = _split(record.value)
        if split is None:
            logger.debug(f"refused an unsigned {kind} record in closed run {self.run_id}")
            return False
        value, writer, signature = split
        if not verify_signature(writer, signature, _writer_payload(record, value)):
            logger.debug(f"refused a {kind} record with a bad writer signature")
            return False
        if not self.allowlist.allows(writer):
            logger.debug(f"refused a {kind} record by {peer_id_of(writer)}: not on the allowlist")
            return False
        owner = self._owner(kind, record.subkey)
        if kind in ("peers", "averager") and owner != writer:
            logger.debug(f"refused a {kind} record written by {peer_id_of(writer)} under another peer's subkey")
            return False
        if kind == "ledger" and not self.allows(owner):
            logger.debug("refused a ledger record of a peer not on the allowlist")
            return False
        return True

    @staticmethod
    def _owner(kind: str, subkey: bytes) -> bytes | None:
        try:  # hivemind serializes subkeys with msgpack
            decoded = msgpack.unpackb(subkey, raw=False)
        except Exception:
            return None
        if kind == "peers" and isinstance(decoded, str) and HEX64_RE.fullmatch(decoded):
            return bytes.fromhex(decoded)
        if kind == "averager" and isinstance(decoded, bytes):
            return public_key_of_peer_id(decoded)
        if kind == "ledger" and isinstance(decoded, str):
            match = re.match(r"\[ed25519:([0-9a-f]{64})\]", decoded)
            return bytes.fromhex(match.group(1)) if match else None
        return None

    def _validate_list(self, record: DHTRecord) -> bool:
        allowlist = _list_from_entry(record.subkey, record.value)
        if allowlist is None or allowlist.run_id != self.run_id:
            return False
        if self.allowlist is None:
            return True  # nothing to compare with: readers decide what to make of it
        if allowlist.owner != self.allowlist.owner:
            logger.debug(f"refused an allowlist for {self.run_id} signed by another key than its owner's")
            return False
        if allowlist.version > self.allowlist.version:
            logger.info(f"allowlist of run {self.run_id} updated to version {allowlist.version} "
                        f"({len(allowlist.members) + 1} keys)")
            self.allowlist = allowlist
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        kind = self._kind(record)
        if kind is None or kind == "allowlist" or self.allowlist is None or self._private_key is None:
            return record.value
        if self._signer is None:
            self._signer = Ed25519PrivateKey.from_private_bytes(self._private_key)
        writer = self._signer.public_key().public_bytes_raw()
        signature = self._signer.sign(_writer_payload(record, record.value))
        return record.value + SUFFIX_HEAD + writer.hex().encode() + b":" + signature.hex().encode() + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        kind = self._kind(record)
        split = _split(record.value) if kind not in (None, "allowlist") else None
        return record.value if split is None else split[0]

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """One validator per run: two would strip the suffix before the second one checks it."""
        if not isinstance(other, AllowlistValidator) or other.run_id != self.run_id:
            return False
        if self.allowlist is None and other.allowlist is not None:
            self.allowlist, self._private_key, self._signer = other.allowlist, other._private_key, None
        return True


def _list_from_entry(subkey: Any, value: Any) -> Allowlist | None:
    """The allowlist stored as a DHT entry (raw msgpack bytes or decoded), if valid and under its version."""
    try:  # untrusted bytes: anything that fails to decode is simply not a list
        if isinstance(subkey, bytes):
            subkey, value = msgpack.unpackb(subkey, raw=False), msgpack.unpackb(value, raw=False)
        allowlist = parse(value) if isinstance(value, bytes) else None
    except Exception:
        return None
    if allowlist is None or type(subkey) is not int or subkey != allowlist.version:
        return None
    return allowlist


def publish(dht: Any, allowlist: Allowlist, *, timeout: float = 15.0) -> bool:
    """Store the list under ``{run_id}_allowlist`` (subkey: its version); True when some node took it."""
    try:
        return bool(dht.store(allowlist_key(allowlist.run_id), allowlist.to_bytes(), get_dht_time() + TTL,
                              subkey=allowlist.version, return_future=True).result(timeout=timeout))
    except Exception as e:
        logger.debug(f"allowlist not published: {e!r}")
        return False


def fetch(dht: Any, run_id: str, owner: bytes | None = None, *, timeout: float = 15.0) -> Allowlist | None:
    """The highest valid version of the run's list in the DHT (signed by ``owner`` when given)."""
    try:
        found = dht.get(allowlist_key(run_id), latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:
        logger.debug(f"allowlist not fetched: {e!r}")
        return None
    if found is None or not isinstance(found.value, dict):
        return None
    lists = [a for subkey, item in found.value.items()
             if (a := _list_from_entry(subkey, getattr(item, "value", None))) is not None
             and a.run_id == run_id and (owner is None or a.owner == owner)]
    return max(lists, key=lambda a: a.version, default=None)


def admit(dht: Any, run_id: str, identity: Identity, allowlist: Allowlist | None, *,
          look: bool = True) -> Allowlist | None:
    """The startup check once in the DHT: the list this peer runs with, or a UserError saying why it may not.

    Without a list of its own a peer must find none in the DHT (an open run); with one, the newest version
    by the same owner must still hold its key. A peer with a list publishes it.
    """
    owner = allowlist.owner if allowlist else None
    found = fetch(dht, run_id, owner) if look else None
    if look and found is None:  # a node that has just joined may miss a record on its first get
        time.sleep(0.5)
        found = fetch(dht, run_id, owner)
    if allowlist is None:
        if found is None:
            return None
        if found.allows(identity.public_key):
            raise UserError(f"run {run_id} is closed and your key {identity.peer_id} is on its allowlist "
                            f"({found.describe()}), but this peer has no copy: ask the owner for the file and "
                            f"start with --allowlist FILE")
        raise UserError(f"run {run_id} is closed: your key {identity.peer_id} ({identity.name}) is not on its "
                        f"allowlist ({found.describe()}); ask the owner to add it")
    if found is not None and found.version > allowlist.version:
        logger.info(f"the swarm has a newer allowlist: version {found.version} (the file has {allowlist.version})")
        allowlist = found
    if not allowlist.allows(identity.public_key):
        raise UserError(f"this run is closed: your key {identity.peer_id} ({identity.name}) was removed from "
                        f"its allowlist in version {allowlist.version} ({allowlist.describe()})")
    publish(dht, allowlist)
    return allowlist


class Keeper(threading.Thread):
    """Every ``period`` seconds: republish the newest list this peer knows, and fetch a newer one.

    Fetching is what updates the DHT process's validator (it adopts a newer version as it validates the
    answer); this thread only notices when the newest version no longer holds this peer's key.
    """

    def __init__(self, dht: Any, identity: Identity, allowlist: Allowlist, *, on_removed: Callable[[], None],
                 period: float = REFRESH):
        super().__init__(name="p2ptrain-allowlist", daemon=True)
        self.dht, self.identity, self.allowlist = dht, identity, allowlist
        self.on_removed, self.period = on_removed, period
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.period):
            found = fetch(self.dht, self.allowlist.run_id, self.allowlist.owner)
            if found is not None and found.version > self.allowlist.version:
                self.allowlist = found
                logger.info(f"allowlist updated to version {found.version}")
                if not found.allows(self.identity.public_key):
                    logger.error(f"this peer's key was removed from the allowlist in version {found.version}: leaving")
                    self.on_removed()
                    return
            publish(self.dht, self.allowlist)

    def stop(self) -> None:
        self._stopped.set()


# ---- averaging -----------------------------------------------------------------------------------------------

async def _dht_allows(peer_id: bytes, _dht: Any, node: Any) -> bool:
    """Runs in the DHT process, which holds the newest list: may ``peer_id`` average with us?"""
    validators = getattr(node.protocol.record_validator, "_validators", [])
    validator = next((v for v in validators if isinstance(v, AllowlistValidator)), None)
    return validator is None or validator.allows(public_key_of_peer_id(peer_id))


VERDICT_TTL = 10.0  # seconds an averager trusts a verdict (a removed peer may finish a round within this)


class AllowlistAveragerMixin:
    """For ``DecentralizedAverager`` subclasses: no averaging and no state download with peers off the list.

    The list lives in the DHT process (see :class:`AllowlistValidator`); the averager asks it once per peer
    every ``VERDICT_TTL`` seconds. In an open run every peer is allowed.
    """

    _verdicts: dict[bytes, tuple[bool, float]]

    async def _peer_allowed(self, peer_id: PeerID) -> bool:
        key = peer_id.to_bytes()
        verdicts = self.__dict__.setdefault("_verdicts", {})
        cached = verdicts.get(key)
        if cached is not None and time.monotonic() - cached[1] < VERDICT_TTL:
            return cached[0]
        try:
            allowed = bool(await asyncio.wait_for(
                self.dht.run_coroutine(partial(_dht_allows, key), return_future=True), timeout=5.0))
        except Exception as e:  # the DHT process is gone or slow: refuse rather than admit a stranger
            logger.debug(f"allowlist check failed: {e!r}")
            return False
        verdicts[key] = (allowed, time.monotonic())
        if not allowed:
            logger.warning(f"refused averaging with {peer_id}: not on the allowlist")
        return allowed

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._peer_allowed(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._peer_allowed(context.remote_id):
            return  # as for a peer that shares no state: the requester moves on to the next one
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _aggregate_with_group(self, group_info: Any, *args: Any, **kwargs: Any) -> Any:
        """A follower's last line: never all-reduce with a group that holds a stranger."""
        from hivemind.averaging.allreduce import AllreduceException

        for peer_id in group_info.peer_ids:
            if not await self._peer_allowed(peer_id):
                raise AllreduceException(f"group holds {peer_id}, who is not on the allowlist")
        return await super()._aggregate_with_group(group_info, *args, **kwargs)


_closed_classes: dict[type, type] = {}


def closed(averager_class: type) -> type:
    """``averager_class`` with :class:`AllowlistAveragerMixin` in front (one class per base, made once).

    It keeps the base's name: hivemind names a servicer's RPC handlers after its class, so a renamed class
    could not even reach peers of the base class -- and it must reach them, to refuse them itself.
    """
    if issubclass(averager_class, AllowlistAveragerMixin):
        return averager_class
    if averager_class not in _closed_classes:
        _closed_classes[averager_class] = type(averager_class.__name__, (AllowlistAveragerMixin, averager_class),
                                               {"__qualname__": averager_class.__qualname__,
                                                "__module__": averager_class.__module__})
    return _closed_classes[averager_class]


class AllowlistOptimizerMixin:
    """For ``hivemind.Optimizer`` subclasses: both averagers get :class:`AllowlistAveragerMixin`.

    Usage: ``class SwarmOptimizer(AllowlistOptimizerMixin, hivemind.Optimizer)``.
    """

    def _make_state_averager(self, **kwargs: Any) -> Any:
        from hivemind.optim.state_averager import TrainingStateAverager

        # hivemind 1.1.12's Optimizer._make_state_averager, with the class swapped (the subclass may name its own)
        return closed(getattr(self, "state_averager_class", TrainingStateAverager))(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)

    def _make_gradient_averager(self, factory: Any, **kwargs: Any) -> Any:
        from hivemind.optim.grad_averager import GradientAverager

        if factory is None:
            factory = closed(GradientAverager)
        elif isinstance(factory, partial):
            factory = partial(closed(factory.func), *factory.args, **factory.keywords)
        elif isinstance(factory, type):
            factory = closed(factory)
        return super()._make_gradient_averager(factory, **kwargs)


def load_own(path: Path | None, run_id: str, identity: Identity) -> Allowlist | None:
    """The list given with ``--allowlist`` (None: none given), refusing at once a key that is not on it."""
    if path is None:
        return None
    allowlist = load(path, run_id)
    check_member(allowlist, identity, path)
    return allowlist
