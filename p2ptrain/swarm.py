"""Joining the swarm: addresses, the DHT node, retries, and the line others paste to join."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import time
from typing import Iterable, Sequence

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.utils.multiaddr import Multiaddr

from p2ptrain.allowlist import Allowlist, AllowlistValidator
from p2ptrain.config import Settings
from p2ptrain.errors import UserError
from p2ptrain.identity import Identity
from p2ptrain.ledger.dht import Ed25519RecordValidator

logger = logging.getLogger(__name__)


def parse_initial_peers(addresses: Iterable[str]) -> list[str]:
    """Check each address is a multiaddr ending in ``/p2p/<peer id>``; raise one clear line if not."""
    checked = []
    for address in addresses:
        try:
            maddr = Multiaddr(address)
            PeerID.from_base58(maddr["p2p"])
        except Exception:
            raise UserError(f"malformed peer address {address!r}: expected a multiaddr like "
                            f"/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... (copy the line a running peer prints)")
        checked.append(str(maddr))
    return checked


def check_maddr(address: str, what: str, example: str) -> str:
    try:
        Multiaddr(address)
    except Exception:
        raise UserError(f"malformed {what} address {address!r}: expected e.g. {example}") from None
    return address


def host_maddrs(settings: Settings) -> list[str]:
    """Where to listen: ``--host-maddrs`` as given, else all interfaces on ``--port``.

    A fixed port is checked first, because p2pd only reports a bind failure as "daemon failed to start".
    """
    if settings.host_maddrs:
        return [check_maddr(a, "listen", "/ip4/0.0.0.0/tcp/31337") for a in settings.host_maddrs]
    if settings.client_mode:
        return ["/ip4/127.0.0.1/tcp/0"]  # a client accepts no connections; don't open a public port
    if settings.port:
        check_port_free(settings.port)
    return [f"/ip4/0.0.0.0/tcp/{settings.port}"]


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is already in use: stop the program using it or pick another --port")
            raise UserError(f"cannot listen on port {port}: {e.strerror}")


class _DHT(hivemind.DHT):
    """hivemind's DHT process, moved out of the terminal's process group.

    Ctrl-C in a terminal signals the whole foreground group; the p2pd daemon that this process starts
    would exit at once, and the peer could no longer say goodbye or finish its last round. In its own
    group only the main process sees Ctrl-C, and it shuts the DHT down in order.
    """

    def run(self) -> None:
        os.setpgid(0, 0)
        super().run()


def _die_with_parent() -> None:
    """In every forked child (DHT, averagers): get SIGKILL when the peer process dies, even by kill -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1
os.register_at_fork(after_in_child=_die_with_parent)


def start_dht(settings: Settings, identity: Identity | None, *, client_mode: bool | None = None,
              record_validators: Sequence[RecordValidatorBase] = (), allowlist: Allowlist | None = None) -> hivemind.DHT:
    """Start this peer's DHT node, retrying unreachable initial peers with backoff until ``join_timeout``.

    With ``allowlist`` (a closed run) the node signs its records and accepts the run's records only from
    allowlisted writers; without, it still strips writers' signatures so it can read a closed run.
    """
    initial_peers = parse_initial_peers(settings.initial_peers)
    client_mode = settings.client_mode if client_mode is None else client_mode
    listen = host_maddrs(settings)
    for address in settings.announce_maddrs:
        check_maddr(address, "announce", "/ip4/203.0.113.5/tcp/31337")
    if initial_peers and identity is not None:
        check_identity_free(identity, initial_peers)

    deadline = time.monotonic() + settings.join_timeout
    delay = 1.0
    while True:
        try:
            return _DHT(
                initial_peers=initial_peers, start=True, client_mode=client_mode,
                host_maddrs=listen, announce_maddrs=settings.announce_maddrs or None,
                identity_path=str(identity.path) if identity else None,  # None: a throwaway peer id
                check_if_identity_free=False,  # hivemind's check assumes RSA keys; see check_identity_free
                record_validators=[Ed25519RecordValidator(settings.run_id), *record_validators, AllowlistValidator(
                    settings.run_id, allowlist, identity.private_key.private_bytes_raw() if identity else None)],
            )
        except Exception as e:
            if not initial_peers or not _is_unreachable(e):
                raise UserError(f"could not start the peer: {_one_line(e)}") from e
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"could not reach any initial peer ({', '.join(initial_peers)}) within {settings.join_timeout:g}s:"
                    f" check that the peer is running, that the address and port are right, and that no firewall"
                    f" blocks TCP to it") from e
            logger.warning(f"initial peers unreachable, retrying in {min(delay, left):.0f}s ({left:.0f}s left)")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 15.0)


def check_identity_free(identity: Identity, initial_peers: list[str]) -> None:
    """Refuse to start when another live peer in the swarm already uses this key.

    hivemind's own check parses the key as RSA, so this repeats it for Ed25519: an anonymous client
    joins through the initial peers and tries to reach our peer id.
    """
    async def taken() -> bool:
        probe = await P2P.create(initial_peers=initial_peers, dht_mode="client")
        try:
            await probe._client.connect(PeerID.from_base58(identity.peer_id), [])
            return True
        except ControlFailure:
            return False
        finally:
            await probe.shutdown()

    try:
        is_taken = hivemind.utils.asyncio.switch_to_uvloop().run_until_complete(taken())
    except Exception as e:
        logger.debug(f"identity check skipped: {e!r}")  # unreachable peers are reported by start_dht
        return
    if is_taken:
        raise UserError(f"identity {identity.path} ({identity.name}, {identity.peer_id}) is already used by "
                        f"another peer in this swarm; give this peer its own key with --identity PATH")


def _is_unreachable(error: Exception) -> bool:
    text = str(error)
    return any(s in text for s in ("bootstrap failed", "failed to connect to bootstrap", "failed to dial", "failed to find any peer"))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def visible_addresses(dht: hivemind.DHT) -> list[str]:
    """Addresses others can dial, loopback last (it only helps peers on this machine)."""
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    return sorted(maddrs, key=lambda m: ("/127.0.0.1/" in m or "/::1/" in m, m))


def join_line(dht: hivemind.DHT, run_id: str) -> str:
    """The one line a newcomer pastes to join this swarm."""
    run = f" --run-id {run_id}" if run_id != Settings.run_id else ""
    return f"p2ptrain join --initial-peers {visible_addresses(dht)[0]}{run}"
