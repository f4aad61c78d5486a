"""Running a peer from its settings: the glue between identity, swarm, task and trainer.

``run_join`` and ``run_bootstrap`` own every resource they start and release it in ``finally``;
they report through callbacks so that ``cli.py`` alone decides what is printed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from p2ptrain.config import Settings
from p2ptrain.errors import UserError
from p2ptrain.bookkeeper import Bookkeeper
from p2ptrain.identity import Identity, IdentityLock, default_home
from p2ptrain.ledger.store import Ledger, default_ledger_path
from p2ptrain.presence import Heartbeat
from p2ptrain.snapshot import LocalStatus, PeerReport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """What a peer tells its user once it is in the swarm."""

    name: str
    peer_id: str
    join_line: str
    new_swarm: bool


@dataclass(frozen=True)
class Finished:
    name: str
    epoch: int
    accuracy: float | None
    checkpoint_dir: str
    stats: dict
    ledger: str
    interrupted: bool


def run_dir(settings: Settings, identity: Identity) -> Path:
    """Per-run, per-peer directory for checkpoints and the ledger."""
    return default_home() / "runs" / settings.run_id / identity.name


def load_identity(settings: Settings, default_name: str = "identity.key") -> Identity:
    return Identity.load_or_create(settings.identity or default_home() / default_name)


def run_join(settings: Settings, *, on_started: Callable[[Started], None],
             on_status: Callable[[Callable[[], LocalStatus]], None] | None = None) -> Finished:
    """Join (or start) a swarm and train until ``max_epochs`` or a stop signal."""
    from p2ptrain.allowlist import Keeper, admit, load_own
    from p2ptrain.swarm import join_line, start_dht
    from p2ptrain.tasks import load_task
    from p2ptrain.trainer import Trainer

    identity = load_identity(settings)
    allowlist = load_own(settings.allowlist, settings.run_id, identity)  # closed run: a key not on it stops here
    task = load_task(settings.task, settings.data_dir)  # fail on a bad task before touching the network
    checkpoint_dir = settings.checkpoint_dir or run_dir(settings, identity) / "checkpoint"
    if settings.resume:
        from p2ptrain.checkpoint import load_checkpoint
        load_checkpoint(checkpoint_dir)  # a missing or corrupt checkpoint fails here, before joining
    logger.info("settings: " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(settings.as_dict().items())
                                        if v not in (None, [], False)))

    ledger_path = settings.ledger or default_ledger_path(default_home(), settings.run_id, identity.name)
    if settings.ledger is None:
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
    with IdentityLock(identity), Ledger(ledger_path, run_id=settings.run_id) as ledger:
        dht = start_dht(settings, identity, allowlist=allowlist)
        trainer = keeper = None
        try:
            allowlist = admit(dht, settings.run_id, identity, allowlist, look=bool(settings.initial_peers))
            on_started(Started(identity.name, identity.peer_id, join_line(dht, settings.run_id),
                               new_swarm=not settings.initial_peers))
            bookkeeper = None if settings.auxiliary else Bookkeeper(
                identity, settings.run_id, ledger, dht, batch_size=settings.batch_size or task.batch_size)
            trainer = Trainer(settings, task, identity, dht, checkpoint_dir=checkpoint_dir, bookkeeper=bookkeeper)
            if settings.resume:
                trainer.resume()
            heartbeat = Heartbeat(dht, settings.run_id, identity.public_key.hex(), trainer.report)
            heartbeat.start()
            if allowlist is not None:
                keeper = Keeper(dht, identity, allowlist, on_removed=trainer.stop_requested.set)
                keeper.start()
            threading.Thread(target=_watchdog, args=(dht, trainer.stop_requested), daemon=True,
                             name="p2ptrain-watchdog").start()
            if on_status:
                on_status(trainer.status)
            try:
                stats = trainer.run()
            finally:
                heartbeat.leave()
            return Finished(identity.name, trainer.opt.local_epoch, getattr(trainer, "final_accuracy", None),
                            str(checkpoint_dir), {k: v for k, v in vars(stats).items()}, str(ledger_path),
                            interrupted=trainer.stop_requested.is_set())
        finally:
            t0 = time.monotonic()
            if keeper is not None:
                keeper.stop()
            if trainer is not None:
                trainer.shutdown()
            t1 = time.monotonic()
            dht.shutdown()
            _left.set()
            logger.info(f"left the swarm (averagers {t1 - t0:.1f}s, DHT {time.monotonic() - t1:.1f}s)")


STOP_GRACE = 60.0  # seconds a stopping peer may take to leave before it is forced out


def _watchdog(dht, stop_requested: threading.Event) -> None:
    """Make sure a stopping peer really exits.

    hivemind blocks for ever on a lock if its DHT process dies (the progress tracker waits on a DHT
    request that never returns, holding the lock the optimizer needs), and no signal handler can
    reach a thread stuck there. The periodic checkpoints are on disk; exit non-zero and say why.
    """
    while not stop_requested.wait(1.0):
        if not dht.is_alive() and not _left.is_set():  # (after a clean leave the DHT is down on purpose)
            logger.error("the peer's DHT process died: leaving")
            stop_requested.set()
    if not _left.wait(STOP_GRACE):
        logger.error(f"leaving is stuck in hivemind after {STOP_GRACE:.0f}s (its DHT process may have died): "
                     f"forcing exit; the last periodic checkpoint is kept")
        logging.shutdown()
        os._exit(1)


_left = threading.Event()  # set once run_join has released everything


def run_bootstrap(settings: Settings, *, on_started: Callable[[Started], None]) -> None:
    """A DHT-only peer with a stable address; serves until SIGINT/SIGTERM."""
    from p2ptrain.allowlist import Keeper, admit, load_own
    from p2ptrain.swarm import join_line, start_dht

    identity = load_identity(settings, default_name="bootstrap.key")
    allowlist = load_own(settings.allowlist, settings.run_id, identity)
    stop = threading.Event()
    with IdentityLock(identity):
        dht = start_dht(settings, identity, allowlist=allowlist)
        keeper = None
        try:
            allowlist = admit(dht, settings.run_id, identity, allowlist, look=bool(settings.initial_peers))
            if allowlist is not None:
                keeper = Keeper(dht, identity, allowlist, on_removed=stop.set)
                keeper.start()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            on_started(Started(identity.name, identity.peer_id, join_line(dht, settings.run_id),
                               new_swarm=not settings.initial_peers))
            started = time.time()
            heartbeat = Heartbeat(dht, settings.run_id, identity.public_key.hex(), lambda: PeerReport(
                peer_id=identity.peer_id, name=identity.name, role="bootstrap", client_mode=dht.client_mode,
                epoch=0, samples_accumulated=0, samples_per_second=0.0, loss=None, time=time.time()))
            heartbeat.start()
            while not stop.wait(1.0):
                if not dht.is_alive():
                    raise UserError("the DHT process died; see the log above")
            heartbeat.leave()
            logger.info(f"bootstrap peer served for {time.time() - started:.0f}s")
        finally:
            if keeper is not None:
                keeper.stop()
            dht.shutdown()

