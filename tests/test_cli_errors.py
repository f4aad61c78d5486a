"""Bad input to ``p2ptrain join`` / ``bootstrap``: one ``error:`` line, a non-zero exit, never a traceback.

Each case runs the real command as a subprocess (see the ``cli`` fixture in conftest.py).
"""
from __future__ import annotations

import random
import re
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hivemind.proto import crypto_pb2

from p2ptrain.identity import peer_id_of

if TYPE_CHECKING:
    from conftest import CliResult, Swarm

LOCAL = "/ip4/127.0.0.1/tcp/0"
Cli = Callable[..., "CliResult"]


def join(cli: Cli, work_dir: Path, *args: str, identity: str = "peer.key", **kwargs) -> CliResult:
    """``p2ptrain join`` on loopback with its own key, plus ``args``."""
    return cli("join", "--host-maddrs", LOCAL, "--identity", str(work_dir / identity), "--log-format", "plain",
               *args, **kwargs)


def failed(result: CliResult) -> str:
    """The error line of a failed command (checks: non-zero exit, one 'error:' line, no traceback)."""
    assert result.returncode != 0, result.stderr
    return result.error_line()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def key_blob(key_type: int, data: bytes) -> bytes:
    return crypto_pb2.PrivateKey(key_type=key_type, data=data).SerializeToString()


# --- addresses and the network ------------------------------------------------------------------


@pytest.mark.parametrize("address", ["foo", "/ip4/127.0.0.1/tcp/31337", "/ip4/127.0.0.1/tcp/31337/p2p/notapeerid"])
def test_malformed_initial_peer(cli: Cli, work_dir: Path, address: str) -> None:
    line = failed(join(cli, work_dir, "--initial-peers", address))
    assert f"malformed peer address {address!r}" in line and "/p2p/12D3KooW" in line


def test_unreachable_initial_peer(cli: Cli, work_dir: Path) -> None:
    peer_id = peer_id_of(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    address = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{peer_id}"

    result = join(cli, work_dir, "--initial-peers", address, "--join-timeout", "3", timeout=120)
    finished = datetime.now()

    line = failed(result)
    assert address in line and "within 3s" in line
    assert "check that the peer is running" in line and "address and port" in line
    # --join-timeout is kept: from the first log line (imports done) to exit, 3 s of retries plus a last
    # attempt; the 20 s bound leaves room for a busy machine, not for a retry loop that ignores the timeout
    first_log = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", result.stderr, re.M)
    assert first_log, result.stderr
    started = datetime.strptime(first_log.group(1), "%Y-%m-%d %H:%M:%S,%f")
    assert (finished - started).total_seconds() < 20, result.stderr


@pytest.mark.parametrize("command", ["join", "bootstrap"])
def test_port_in_use(cli: Cli, work_dir: Path, command: str) -> None:
    # --port is the only way to the check (--host-maddrs overrides it); it fails before p2pd starts
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))  # like the check itself; listening, so SO_REUSEADDR cannot share it
        blocker.listen()
        port = blocker.getsockname()[1]
        result = cli(command, "--port", str(port), "--identity", str(work_dir / "peer.key"), "--log-format", "plain")
    line = failed(result)
    assert f"port {port} is already in use" in line and "--port" in line


# --- task and data ------------------------------------------------------------------------------


def test_unknown_task(cli: Cli, work_dir: Path) -> None:
    line = failed(join(cli, work_dir, "--task", "no-such-task"))
    assert "unknown task 'no-such-task'" in line and "digits-mlp" in line and "fashion-mlp" in line


def test_missing_data_directory(cli: Cli, work_dir: Path) -> None:
    line = failed(join(cli, work_dir, "--task", "fashion-mlp", "--data-dir", "/nonexistent"))
    assert "/nonexistent does not exist" in line and "--data-dir" in line


# --- identity files -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", [random.Random(0).randbytes(100), b""], ids=["random-bytes", "empty"])
def test_corrupt_identity(cli: Cli, work_dir: Path, content: bytes) -> None:
    (work_dir / "peer.key").write_bytes(content)
    line = failed(join(cli, work_dir))
    assert f"identity file {work_dir / 'peer.key'} is corrupt" in line


def test_truncated_ed25519_identity_is_called_corrupt(cli: Cli, work_dir: Path) -> None:
    """An Ed25519 key of the wrong length is damaged, not 'a Ed25519 key where Ed25519 is needed'."""
    raw = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    (work_dir / "peer.key").write_bytes(key_blob(crypto_pb2.KeyType.Ed25519, raw))  # 32 bytes, not 64
    line = failed(join(cli, work_dir))
    assert "corrupt" in line, line


def _rsa_der() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _secp256k1_raw() -> bytes:
    return ec.generate_private_key(ec.SECP256K1()).private_numbers().private_value.to_bytes(32, "big")


@pytest.mark.parametrize("kind, make_data", [("RSA", _rsa_der), ("Secp256k1", _secp256k1_raw)])
def test_identity_of_another_key_type(cli: Cli, work_dir: Path, kind: str, make_data: Callable[[], bytes]) -> None:
    """A valid libp2p key that is not Ed25519 (e.g. one hivemind generated, which is RSA)."""
    (work_dir / "peer.key").write_bytes(key_blob(getattr(crypto_pb2.KeyType, kind), make_data()))
    line = failed(join(cli, work_dir))
    assert f"holds a key of type {kind}" in line and "needs an Ed25519 key" in line


# --- checkpoints and profiles -------------------------------------------------------------------


def _checkpoint(directory: Path) -> None:
    import torch

    from p2ptrain.checkpoint import save_checkpoint
    from p2ptrain.tasks import load_task

    task = load_task("digits-mlp")
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    save_checkpoint(directory, model, optimizer, meta={"task": task.name, "run_id": "p2ptrain", "epoch": 3,
                                                       "peer": "test"})


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 5), "model.safetensors is corrupt"),
    (lambda d: (d / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    (lambda d: shutil.rmtree(d), "does not exist"),
], ids=["meta-json", "model-bytes", "optimizer-missing", "no-directory"])
def test_corrupt_checkpoint_with_resume(cli: Cli, work_dir: Path, damage, expected: str) -> None:
    checkpoint = work_dir / "checkpoint"
    _checkpoint(checkpoint)
    damage(checkpoint)
    line = failed(join(cli, work_dir, "--resume", "--checkpoint-dir", str(checkpoint)))
    assert expected in line and str(checkpoint) in line


def test_unknown_profile_key(cli: Cli, work_dir: Path) -> None:
    profile = work_dir / "peer.toml"
    profile.write_text('task = "digits-mlp"\nmax_epoch = 10\n')
    line = failed(join(cli, work_dir, "--config", str(profile)))
    assert f"profile {profile}: unknown key 'max_epoch'" in line and "max_epochs" in line


def test_ill_typed_profile_key(cli: Cli, work_dir: Path) -> None:
    profile = work_dir / "peer.toml"
    profile.write_text('max-epochs = "ten"\n')
    line = failed(join(cli, work_dir, "--config", str(profile)))
    assert f"profile {profile}: 'max_epochs' must be an integer" in line and "'ten'" in line


# --- two peers, one key -------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_same_identity_twice_on_one_machine(cli: Cli, swarm: Swarm) -> None:
    # --min-peers 2 with a long --join-timeout: the first peer waits for company, holding its key
    first = swarm.join("first", "--min-peers", "2", "--join-timeout", "600", initial_peers=False)

    started = time.monotonic()
    line = failed(join(cli, swarm.directory, identity="first.key"))
    assert f"identity {swarm.directory / 'first.key'}" in line
    assert "already used by another running peer on this machine" in line and "--identity" in line
    assert time.monotonic() - started < 60
    assert first.poll() is None, first.describe()  # the first one is unharmed


@pytest.mark.timeout(300)
def test_same_identity_elsewhere_in_the_swarm(cli: Cli, swarm: Swarm) -> None:
    """A copy of a running peer's key (as on another machine) is refused by the swarm-wide check."""
    address = swarm.bootstrap()
    first = swarm.join("first", "--min-peers", "2", "--join-timeout", "600")
    shutil.copy(swarm.directory / "first.key", swarm.directory / "copy.key")  # another path: no local lock

    line = failed(join(cli, swarm.directory, "--initial-peers", address, identity="copy.key"))
    assert "already used by another peer in this swarm" in line and "--identity" in line
    assert first.poll() is None, first.describe()
