"""A peer's Ed25519 key: its libp2p identity, its ledger signing key and its readable name.

The key file is a serialized libp2p ``crypto_pb2.PrivateKey`` (type Ed25519, data = 32 private bytes +
32 public bytes), the format p2pd reads for ``identity_path``, so the peer id seen in the swarm and the
key that signs ledger records are one and the same.
"""
from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError
from hivemind.proto import crypto_pb2

from p2ptrain.errors import UserError
from p2ptrain.names import readable_name


def default_home() -> Path:
    """Where p2ptrain keeps keys and run directories (``$P2PTRAIN_HOME`` or ``~/.p2ptrain``)."""
    return Path(os.environ.get("P2PTRAIN_HOME") or Path.home() / ".p2ptrain")


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58, ``12D3KooW…``) of a raw 32-byte Ed25519 public key."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public_key).SerializeToString()
    return base58.b58encode(bytes([0x00, len(encoded)]) + encoded).decode()  # multihash "identity"


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    """A loaded key. Create with :meth:`load_or_create`."""

    path: Path
    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: bytes  # raw 32 bytes

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    @property
    def name(self) -> str:
        """Three words derived from the public key, stable for a key (e.g. ``brave-amber-otter``)."""
        return readable_name(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls, path: Path) -> Identity:
        """A new key written to ``path`` with owner-only permissions (fails if the file exists)."""
        private_key = Ed25519PrivateKey.generate()
        raw_private = private_key.private_bytes_raw()
        raw_public = private_key.public_key().public_bytes_raw()
        blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=raw_private + raw_public)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)  # another process created it first: use theirs
        except OSError as e:
            raise UserError(f"cannot create identity file {path}: {e.strerror}") from e
        with os.fdopen(fd, "wb") as f:
            f.write(blob.SerializeToString())
        return cls(path=path, private_key=private_key, public_key=raw_public)

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read identity file {path}: {e.strerror}") from e
        try:
            message = crypto_pb2.PrivateKey.FromString(blob)
        except DecodeError:
            message = None
        if message is None or len(blob) == 0:
            raise UserError(f"identity file {path} is corrupt (not a libp2p private key)")
        if message.key_type != crypto_pb2.KeyType.Ed25519:
            kind = crypto_pb2.KeyType.Name(message.key_type) if message.key_type in (0, 1, 2, 3) else "unknown"
            raise UserError(f"identity file {path} holds a key of type {kind}; p2ptrain needs an Ed25519 key "
                            f"(move the file away and a new one is created)")
        if len(message.data) != 64:
            raise UserError(f"identity file {path} is corrupt (an Ed25519 key of {len(message.data)} bytes, "
                            f"expected 64)")
        private_key = Ed25519PrivateKey.from_private_bytes(message.data[:32])
        public_key = private_key.public_key().public_bytes_raw()
        if public_key != message.data[32:]:
            raise UserError(f"identity file {path} is corrupt (public key does not match private key)")
        return cls(path=path, private_key=private_key, public_key=public_key)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        path = Path(path).expanduser()
        return cls.load(path) if path.exists() else cls.generate(path)


class IdentityLock:
    """Holds an exclusive lock on the identity file so two local peers cannot share one key.

    Peers on other machines are caught by the swarm check in ``swarm.py``; this one is instant and
    covers the common mistake of starting a second peer on the same machine with the default key.
    """

    def __init__(self, identity: Identity):
        self._path = identity.path.with_name(identity.path.name + ".lock")
        self._fd: int | None = None
        self._identity = identity

    def __enter__(self) -> IdentityLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"identity {self._identity.path} ({self._identity.name}) is already used by another "
                            f"running peer on this machine; give this peer its own key with --identity PATH")
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

