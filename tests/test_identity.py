"""Identity: an Ed25519 libp2p key file, its peer id and name, the local lock, and ``p2ptrain identity``."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import base58
import pytest
from hivemind.proto import crypto_pb2

from p2ptrain.errors import UserError
from p2ptrain.identity import Identity, IdentityLock, peer_id_of, verify_signature


def test_new_key_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "peer.key"
    Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    assert blob.key_type == crypto_pb2.KeyType.Ed25519 and len(blob.data) == 64


def test_name_and_peer_id_are_stable(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    created = Identity.load_or_create(path)
    blob = path.read_bytes()
    for loaded in (Identity.load(path), Identity.load_or_create(path), Identity.generate(path)):
        assert (loaded.peer_id, loaded.name, loaded.public_key) == (created.peer_id, created.name, created.public_key)
    assert path.read_bytes() == blob  # never overwritten
    other = Identity.load_or_create(tmp_path / "other.key")
    assert other.peer_id != created.peer_id and other.public_key != created.public_key


def test_peer_id_format(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "peer.key")
    assert identity.peer_id.startswith("12D3KooW")
    # a multihash of the "identity" kind (0x00) over the protobuf-encoded public key
    raw = base58.b58decode(identity.peer_id)
    assert raw[0] == 0x00 and raw[1] == len(raw) - 2
    public = crypto_pb2.PublicKey.FromString(raw[2:])
    assert public.key_type == crypto_pb2.KeyType.Ed25519 and public.data == identity.public_key
    assert peer_id_of(identity.public_key) == identity.peer_id
    words = identity.name.split("-")
    assert len(words) == 3 and all(w.isalpha() and w.islower() for w in words)


@pytest.mark.timeout(180)
def test_peer_id_is_what_hivemind_reports(tmp_path: Path) -> None:
    import hivemind

    path = tmp_path / "peer.key"
    identity = Identity.load_or_create(path)
    dht = None
    try:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(path),
                           check_if_identity_free=False)
        assert str(dht.peer_id) == identity.peer_id
        assert all(str(m).endswith(f"/p2p/{identity.peer_id}") for m in dht.get_visible_maddrs())
    finally:
        if dht is not None:
            dht.shutdown()


def test_signatures(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "peer.key")
    signature = identity.sign(b"epoch 7")
    assert verify_signature(identity.public_key, signature, b"epoch 7")
    assert not verify_signature(identity.public_key, signature, b"epoch 8")
    assert not verify_signature(Identity.load_or_create(tmp_path / "other.key").public_key, signature, b"epoch 7")
    assert not verify_signature(identity.public_key, b"short", b"epoch 7")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not a key", "is corrupt"),
    (b"", "is corrupt"),
    (crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=b"x" * 64).SerializeToString(), "holds a key of type RSA"),
])
def test_bad_key_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "peer.key"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        Identity.load(path)
    with pytest.raises(UserError, match=message):
        Identity.load_or_create(path)  # an existing bad file is reported, never replaced
    assert path.read_bytes() == content


def test_mismatched_public_key_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    Identity.load_or_create(path)
    blob = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    other = crypto_pb2.PrivateKey.FromString(Identity.generate(tmp_path / "other.key").path.read_bytes())
    path.write_bytes(crypto_pb2.PrivateKey(key_type=blob.key_type, data=blob.data[:32] + other.data[32:])
                     .SerializeToString())
    with pytest.raises(UserError, match="public key does not match"):
        Identity.load(path)


def test_lock_allows_one_holder(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "peer.key")
    with IdentityLock(identity):
        with pytest.raises(UserError, match="already used by another running peer on this machine"):
            with IdentityLock(Identity.load(identity.path)):
                pass
    with IdentityLock(identity):  # released on exit
        pass


def _identity_command(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "p2ptrain", "identity", "--json", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_identity_command(work_dir: Path) -> None:
    first = _identity_command()  # creates <P2PTRAIN_HOME>/identity.key
    default_key = work_dir / "home" / "identity.key"
    assert first["path"] == str(default_key) and stat.S_IMODE(default_key.stat().st_mode) == 0o600
    loaded = Identity.load(default_key)
    assert first == {"peer_id": loaded.peer_id, "name": loaded.name, "public_key": loaded.public_key.hex(),
                     "path": str(default_key)}
    assert _identity_command() == first  # shown again, not replaced

    other = _identity_command("--identity", str(work_dir / "other.key"))
    assert other["peer_id"].startswith("12D3KooW") and other["peer_id"] != first["peer_id"]
    assert other["peer_id"] == Identity.load(work_dir / "other.key").peer_id
