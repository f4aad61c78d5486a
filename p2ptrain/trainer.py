"""One training peer: the local loop around ``hivemind.Optimizer``.

Read top to bottom: build the model and optimizer, load state (checkpoint or swarm), then loop over
deterministic batches until the swarm reaches ``max_epochs`` or a stop signal arrives.
"""
from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from p2ptrain import compression
from p2ptrain.allowlist import AllowlistOptimizerMixin
from p2ptrain.bookkeeper import Bookkeeper
from p2ptrain.config import Settings
from p2ptrain.errors import UserError
from p2ptrain.identity import Identity
from p2ptrain.presence import TTL, read_reports
from p2ptrain.robust import RobustAveraging, group_options
from p2ptrain.snapshot import LocalStatus, PeerReport
from p2ptrain.tasks import Task

logger = logging.getLogger(__name__)
HELDOUT = 512  # test examples behind the per-epoch held-out loss
ROUTINE = {"routine": True}  # per-epoch lines: the live status line replaces them on a terminal
OUTER_LR = 1.0  # --local-updates: the outer step lands exactly on the average of the peers' weights
# one attempt at downloading the swarm's state (a few MB here) gives up after this long: its source is gone;
# well inside the 60 s a stopping peer has to leave (peer.STOP_GRACE)
LOAD_STATE_TIMEOUT = 20.0
PROGRESS_TTL = 20.0  # seconds a peer's record in hivemind's {run_id}_progress lives without a refresh
LOAD_RETRY_FIRST, LOAD_RETRY_MAX = 1.0, 8.0  # seconds between two attempts at downloading the swarm's state


@dataclass
class Stats:
    """What a peer measured about its own run (also the source of its live status line)."""

    steps: int = 0
    samples: int = 0
    compute_seconds: float = 0.0  # forward + backward only
    training_seconds: float = 0.0  # wall time from the first step to leaving (utilisation = compute / this)
    rounds: int = 0  # global epochs this peer took part in
    rounds_averaged: int = 0  # ... of which its gradients were averaged with at least one other peer
    rejected_parts: int = 0  # groupmates' parts this peer's reducer refused (NaN/Inf, absurd norm)
    last_group_size: int = 0
    last_loss: float | None = None
    rollbacks: int = 0
    state_downloads: int = 0
    ledger_clean: bool | None = None  # did this peer's ledger verify clean when it left?
    eval_seconds: float = 0.0  # spent on --stop-at-accuracy checks; left out of training_seconds
    time_to_accuracy: float | None = None  # training seconds until --stop-at-accuracy was reached
    stage: str = "starting"


class GatheringGradientAverager(RobustAveraging, GradientAverager):
    """A gradient averager whose rounds carry ``self.gather`` (this epoch's signed claim) to groupmates
    and screen and combine the parts they receive as ``aggregation`` says (see robust.py)."""

    gather: Any = None

    def step(self, control=None, **kwargs):
        if control is None and self.gather is not None:
            kwargs.setdefault("gather", self.gather)
        return super().step(control=control, **kwargs)


class RobustStateAverager(RobustAveraging, TrainingStateAverager):
    """hivemind's state averager (weights and optimizer state, every few epochs; what late joiners download)
    with the same screening and aggregation as gradient rounds: one garbage model must not reach the others."""


class SwarmOptimizer(AllowlistOptimizerMixin, hivemind.Optimizer):
    """``hivemind.Optimizer`` that signs a claim before each round and co-signs the round after it.

    With ``local_updates`` the trainer steps its own inner optimizer on every batch; this optimizer only
    counts samples, and at the end of the epoch averages the pseudo-gradient ``start - current weights``
    through the same rounds (claims, robust aggregation, compression and all) and applies it with the
    outer optimizer: DiLoCo's outer step (Douillard et al., 2023).

    Args:
        bookkeeper: the peer's ledger side; None for auxiliary peers, which claim nothing.
        on_round: called with the size of each finished round's group (0: the peer averaged alone) and the
            groupmates whose parts were rejected.
        local_updates: average pseudo-gradients of local steps instead of accumulated gradients.
    """

    def __init__(self, *, bookkeeper: Bookkeeper | None, on_round: Callable[[int, dict], None],
                 local_updates: bool = False, **kwargs):
        self.bookkeeper, self._on_round, self.local_updates = bookkeeper, on_round, local_updates
        self.state_averager_class = RobustStateAverager  # read by AllowlistOptimizerMixin._make_state_averager
        self.in_round = False
        self._round_epoch = 0
        self._load_retry_at, self._load_retry_delay = 0.0, LOAD_RETRY_FIRST
        super().__init__(**kwargs)

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        if not self.local_updates:
            return super()._check_and_accumulate_gradients(batch_size, grad_scaler)
        # the inner optimizer already used this batch's gradients: count its samples, accumulate nothing
        self.grad_averager.local_samples_accumulated += batch_size
        self.grad_averager.local_times_accumulated = 1
        self.tracker.report_local_progress(self.local_epoch, self.grad_averager.local_samples_accumulated)
        return True

    @torch.no_grad()
    def _load_pseudo_gradients(self) -> None:
        """Accumulators := weights at the epoch's start (the offloaded copy, untouched since) - weights now."""
        start = [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]
        for accumulator, begin, now in zip(self.grad_averager._grad_accumulators(), start,
                                           self.state_averager.main_parameters):
            torch.sub(begin, now, out=accumulator)

    def _update_global_epoch(self, grad_scaler) -> None:
        self.in_round = True  # read by the status line
        self._round_epoch = self.local_epoch
        try:
            if self.local_updates and not self.auxiliary:
                self._load_pseudo_gradients()
            if self.bookkeeper is not None and not self.auxiliary:
                with torch.no_grad():  # hivemind keeps the accumulated local gradients in these buffers
                    accumulated = list(self.grad_averager._grad_accumulators())
                self.grad_averager.gather = self.bookkeeper.claim(
                    self.local_epoch, self.grad_averager.local_samples_accumulated, accumulated)
            super()._update_global_epoch(grad_scaler)
        finally:
            self.in_round = False

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        gathered = None
        try:
            if maybe_step_control is not None:
                gathered = maybe_step_control.result(self.averaging_timeout)
                self._load_averaged_gradients_into_optimizer_()
        except BaseException as e:
            logger.info(f"averaging gradients failed ({e!r}); using local gradients for this epoch")
            gathered = None
        if not gathered:
            self._load_local_gradients_into_optimizer()
        rejected = getattr(gathered, "rejected", {})
        if self.bookkeeper is not None and not self.auxiliary:
            with self.grad_averager.get_tensors() as result:  # what this peer's optimizer step will use
                self.bookkeeper.close_round(self._round_epoch, gathered, result, rejected=rejected)
        self._on_round(len(gathered) if gathered else 0, rejected)

    def _maybe_schedule_gradient_averaging(self) -> None:
        """Trainers never pre-schedule: a round starts when the epoch ends, so what it gathers is final.

        Auxiliary peers gather nothing and learn of an epoch's end only from the tracker, a little
        late; pre-scheduling from the tracker's ETA puts them in the trainers' groups on time.
        """
        if self.auxiliary:
            super()._maybe_schedule_gradient_averaging()

    def load_state_from_peers(self, **kwargs) -> None:
        """hivemind's, with one attempt bounded by ``load_state_timeout`` in place of its retry loop.

        hivemind retries a failed download at once and for ever (``while True``), so a peer whose state source
        died, or that was told to stop meanwhile, hangs there out of reach of its signal handlers. A peer still
        behind after an attempt tries again on a later step, after the trainer has looked for a stop; the
        wait between attempts doubles up to LOAD_RETRY_MAX (every source may be gone: the swarm's epoch is
        only a record in the DHT, which outlives a crashed peer by up to PROGRESS_TTL).
        """
        if time.monotonic() < self._load_retry_at:
            time.sleep(min(0.5, self._load_retry_at - time.monotonic()))  # the step is lost anyway: don't spin
            return
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)
        with self.tracker.pause_updates():
            try:
                self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                if self.grad_averager is not None:
                    self.grad_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
            except Exception as e:
                logger.warning(f"downloading the swarm's state failed ({e!r})")
            if self.local_epoch < self.tracker.global_epoch - 1:
                logger.info(f"no peer served the state of epoch {self.tracker.global_epoch}: trying again in "
                            f"{self._load_retry_delay:g}s")
                self._load_retry_at = time.monotonic() + self._load_retry_delay
                self._load_retry_delay = min(2 * self._load_retry_delay, LOAD_RETRY_MAX)
                return
            self._load_retry_delay = LOAD_RETRY_FIRST
            if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:
                self.state_averager.local_epoch = self.tracker.global_epoch
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
            if not self.client_mode:
                self.state_averager.state_sharing_priority = self.local_epoch
            if self.use_gradient_averaging:
                self.grad_averager.reset_accumulated_grads_()
                if not self.client_mode:
                    self.grad_averager.state_sharing_priority = self.local_epoch

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        # Without pre-scheduling, scheduled_grads still holds the previous epoch's (finished) round;
        # hivemind would mistake it for a used pre-scheduled group and skip averaging this epoch.
        if self.scheduled_grads is not None and (self.scheduled_grads.triggered or self.scheduled_grads.done()):
            self.scheduled_grads = None
        if not self.auxiliary and self.tracker.global_epoch > self.local_epoch:
            # the swarm has moved on: nobody will join this epoch's group, so don't wait for one;
            # hivemind loads the swarm's state on the next step
            logger.info(f"swarm is at epoch {self.tracker.global_epoch}, this peer at {self.local_epoch}: "
                        f"skipping the round")
            began = False
        else:
            began = super()._begin_averaging_gradients(grad_scaler)
        if not began and self.bookkeeper is not None and not self.auxiliary:
            self.grad_averager.load_accumulators_into_averager_()  # hivemind does this next, too
            with self.grad_averager.get_tensors() as local_result:
                self.bookkeeper.close_round(self._round_epoch, None, local_result)
        return began


class Trainer:
    """Trains ``task`` as one peer of the swarm reachable through ``dht``."""

    def __init__(self, settings: Settings, task: Task, identity: Identity, dht: hivemind.DHT, *,
                 checkpoint_dir: Path, bookkeeper: Bookkeeper | None):
        self.settings, self.task, self.identity, self.dht = settings, task, identity, dht
        self.checkpoint_dir = checkpoint_dir
        self.stats = Stats()
        self._training_started: float | None = None
        self._samples_seen: deque[tuple[float, int]] = deque()  # (time, samples) for the throughput window
        self._samples_lock = threading.Lock()
        self.stop_requested = threading.Event()
        self.batch_size = settings.batch_size or task.batch_size
        self.max_epochs = settings.max_epochs or task.max_epochs
        self.delay_updates = task.delay_updates if settings.delay_updates is None else settings.delay_updates
        self.local_updates = task.local_updates if settings.local_updates is None else settings.local_updates
        if self.local_updates and self.delay_updates:
            raise UserError(f"--delay-updates works only with --no-local-updates (task {task.name} defaults to "
                            f"{'local' if task.local_updates else 'delayed'} updates)")

        torch.set_num_threads(settings.torch_threads)
        torch.manual_seed(settings.seed)  # every peer starts from the same weights
        self.model = task.make_model()
        lr = settings.lr or task.lr
        self.bookkeeper = bookkeeper
        # local updates: the task's optimizer steps locally; the swarm's (outer) step is plain SGD with lr 1,
        # i.e. every peer moves to the (robust) average of the peers' weights at the end of each epoch
        self.inner = task.make_optimizer(self.model.parameters(), lr) if self.local_updates else None
        outer = (lambda params: torch.optim.SGD(params, lr=OUTER_LR)) if self.local_updates else \
            (lambda params: task.make_optimizer(params, lr))
        # a request timeout below the matchmaking time avoids matchmaking deadlocks (hivemind warns otherwise)
        averaging = dict(request_timeout=settings.matchmaking_time / 2, aggregation=settings.aggregation,
                         **group_options(settings.aggregation))
        self.opt = SwarmOptimizer(
            bookkeeper=None if settings.auxiliary else bookkeeper,
            on_round=self._record_round,
            local_updates=self.local_updates,
            dht=dht,
            run_id=settings.run_id,
            params=self.model.parameters(),
            optimizer=outer,
            target_batch_size=settings.target_batch_size or task.target_batch_size,
            batch_size_per_step=None if settings.auxiliary else self.batch_size,
            matchmaking_time=settings.matchmaking_time,
            averaging_timeout=settings.averaging_timeout,
            load_state_timeout=LOAD_STATE_TIMEOUT,
            # delayed: averaging and the optimizer step run in the background while the next epoch
            # computes, buying compute that never waits for the network at the price of one stale step
            delay_optimizer_step=self.delay_updates,
            delay_grad_averaging=self.delay_updates,
            average_state_every=5,  # weights stay in sync through identical averaged gradients; this repairs drift
            client_mode=dht.client_mode,  # hivemind inverts this argument; pass it explicitly (see notes)
            auxiliary=settings.auxiliary,
            # a crashed peer's progress record counts it (hence a round to wait for) until it expires: 20 s,
            # not hivemind's 60; a live peer re-sends its record every half of that, at least
            tracker_opts=dict(private_key=RSAPrivateKey(), min_refresh_period=0.25, default_refresh_period=1.0,
                              metadata_expiration=PROGRESS_TTL),
            averager_opts=averaging,
            grad_averager_factory=partial(GatheringGradientAverager, **averaging),
            grad_compression=compression.GRADIENTS[settings.compression],
            state_averaging_compression=compression.STATE[settings.compression],
        )
        self._last_good = self._snapshot()
        self._install_signal_handlers()  # after the averagers: they set SIGINT to SIG_IGN when they start

    # --- lifecycle ---------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            logger.info(f"received {signal.Signals(signum).name}: finishing the current step and leaving")
            self.stop_requested.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    def sync_with_swarm(self) -> bool:
        """Download the model and optimizer state if the swarm is ahead of us (late joiner)."""
        if self.settings.initial_peers:
            self._fetch_swarm_progress()
        if self.opt.tracker.global_epoch > self.opt.local_epoch:
            self.stats.stage = "loading state"
            logger.info(f"swarm is at epoch {self.opt.tracker.global_epoch}: downloading its state")
            self.opt.load_state_from_peers()
            if self.opt.local_epoch < self.opt.tracker.global_epoch - 1:
                return False  # tried again from the training loop
            self.stats.state_downloads += 1
            self._last_good = self._snapshot()
            logger.info(f"state downloaded: now at epoch {self.opt.local_epoch}")
            return True
        return False

    def _fetch_swarm_progress(self, timeout: float = 10.0) -> None:
        """Have the progress tracker read the swarm's epoch now: a peer relaunched from an older checkpoint
        would otherwise train, alone, epochs the swarm has long passed before it notices."""
        tracker = self.opt.tracker
        tracker.fetched_global_progress_this_epoch.clear()
        tracker.global_progress.next_fetch_time = 0
        tracker.global_state_updated.set()
        tracker.fetched_global_progress_this_epoch.wait(timeout)

    def wait_for_peers(self) -> None:
        """Hold the first step until ``min_peers`` training peers report, so a swarm starts together."""
        deadline = time.monotonic() + self.settings.join_timeout
        while (peers := self._count_trainers()) < self.settings.min_peers:
            self.stats.stage = f"waiting for peers ({peers}/{self.settings.min_peers})"
            if self.stop_requested.wait(0.5):
                return
            if time.monotonic() > deadline:
                raise UserError(f"only {peers} of {self.settings.min_peers} peers joined within "
                                f"{self.settings.join_timeout:g}s (--min-peers); start more peers or lower it")

    def _wait_for_tracker(self) -> None:
        """After the first step, wait until hivemind's progress tracker sees ``min_peers`` peers.

        The tracker learns of a peer only after that peer reports samples; without this wait the
        first peer to start would finish several epochs alone before it notices the others.
        """
        tracker, deadline = self.opt.tracker, time.monotonic() + self.settings.join_timeout
        while tracker.global_progress.num_peers < self.settings.min_peers and time.monotonic() < deadline:
            tracker.global_progress.next_fetch_time = 0  # ask the tracker's fetcher for a fresh read now
            tracker.global_state_updated.set()
            if self.stop_requested.wait(0.2):
                return

    def _count_trainers(self) -> int:
        return sum(r.role == "trainer" and not r.leaving for r in read_reports(self.dht, self.settings.run_id))

    def report(self) -> PeerReport:
        """This peer's heartbeat record (see presence.py)."""
        return PeerReport(
            peer_id=self.identity.peer_id, name=self.identity.name,
            role="auxiliary" if self.settings.auxiliary else "trainer", client_mode=self.dht.client_mode,
            epoch=self.opt.local_epoch, samples_accumulated=self.opt.tracker.local_progress.samples_accumulated,
            samples_per_second=self._throughput(),
            loss=self.stats.last_loss, time=time.time(), target_batch_size=self.opt.target_batch_size,
            rounds_failed=self.stats.rounds - self.stats.rounds_averaged, state_downloads=self.stats.state_downloads)

    def _throughput(self) -> float:
        """Samples per wall-clock second over the last ~10 s, waiting for rounds included."""
        with self._samples_lock:  # called from the heartbeat and the status-line threads
            now = time.monotonic()
            self._samples_seen.append((now, self.stats.samples))
            while len(self._samples_seen) > 2 and now - self._samples_seen[0][0] > 10:
                self._samples_seen.popleft()
            (t0, n0), (t1, n1) = self._samples_seen[0], self._samples_seen[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self) -> LocalStatus:
        """This peer's live status (for the ``join`` status line); cheap, safe from any thread."""
        stage = "averaging" if self.opt.in_round and self.stats.stage == "training" else self.stats.stage
        return LocalStatus(
            name=self.identity.name, epoch=self.opt.local_epoch,
            samples_accumulated=self.opt.tracker.global_progress.samples_accumulated,
            target_batch_size=self.opt.target_batch_size,
            samples_per_second=self._throughput(),
            loss=self.stats.last_loss, peers_last_round=self.stats.last_group_size if self.stats.rounds else None,
            state=stage)

    def run(self) -> Stats:
        """Train until the swarm's epoch reaches ``max_epochs`` or a stop is requested."""
        self.wait_for_peers()
        self.sync_with_swarm()
        self.stats.stage = "training"
        if self.settings.auxiliary:
            return self._run_auxiliary()
        step, losses = 0, []
        self._training_started = time.monotonic()
        self._start_epoch(step)
        while not self.stop_requested.is_set() and self.opt.local_epoch < self.max_epochs:
            inputs, labels = self.task.batch(self.settings.run_id, self.identity.peer_id, step, self.batch_size)
            begin = time.perf_counter()
            loss = self.task.loss(self.model(inputs), labels)
            loss.backward()
            seconds = time.perf_counter() - begin
            self.stats.compute_seconds += seconds
            step += 1
            if not self._finite(loss):
                self._roll_back(f"loss is {loss.item()}")
                continue
            if self.bookkeeper is not None:
                self.bookkeeper.note_step(seconds, loss.item())  # before opt.step(): it may end the epoch
            if self.inner is not None:
                self.inner.step()
            epoch_before = self.opt.local_epoch
            self.opt.step()
            self.opt.zero_grad()
            if step == 1 and self.settings.min_peers > 1:
                self._wait_for_tracker()
            losses.append(loss.item())
            self.stats.steps, self.stats.samples = step, self.stats.samples + len(labels)
            if self.opt.local_epoch != epoch_before:
                self._on_epoch(losses)
                self._start_epoch(step)
                losses = []
        self.finish()
        return self.stats

    def _start_epoch(self, next_step: int) -> None:
        if self.bookkeeper is not None:
            self.bookkeeper.start_epoch(list(self.model.parameters()), next_step, self._heldout_loss())

    @torch.no_grad()
    def _heldout_loss(self) -> float:
        """Loss on a fixed slice of the test set: the ledger's "did the work help" figure (~1 ms here)."""
        inputs, labels = self.task.test[0][:HELDOUT], self.task.test[1][:HELDOUT]
        return float(self.task.loss(self.model(self.task.prepare(inputs)), labels))

    def _run_auxiliary(self) -> Stats:
        last_trainer_seen = time.monotonic()
        while not self.stop_requested.is_set() and max(self.opt.local_epoch, self.opt.tracker.global_epoch) < self.max_epochs:
            self.opt.step()  # joins averaging rounds with weight 0, computes nothing
            if self._count_trainers() > 0:
                last_trainer_seen = time.monotonic()
            elif time.monotonic() - last_trainer_seen > 2 * TTL:
                logger.info("no trainers left in the swarm: leaving")
                break
            self._refresh_stats([])
            self.stop_requested.wait(0.2)
        self.finish()
        return self.stats

    def finish(self) -> None:
        """Apply the last delayed update and write a checkpoint."""
        self.stats.stage = "leaving"
        self.opt.state_averager.step(wait_for_delayed_updates=True)
        if self._training_started is not None:
            self.stats.training_seconds = self._elapsed_training()
        if not self._weights_finite():
            self._restore(self._last_good)
        self.save_checkpoint()
        if self.bookkeeper is not None:
            self.stats.ledger_clean = self.bookkeeper.finish(self.opt.local_epoch)

    def shutdown(self) -> None:
        self.opt.shutdown()
        self._clear_progress()

    def _clear_progress(self, timeout: float = 5.0) -> None:
        """Remove this peer's record from the swarm's progress, and wait until the DHT took it.

        hivemind's tracker sends the same goodbye on shutdown but does not wait, and the DHT stops right
        after, so the goodbye was often lost: the swarm's epoch then stayed this peer's until the record
        expired, and a peer that joined meanwhile waited for a state no one served.
        """
        tracker = self.opt.tracker
        try:  # the DHT process may be dead (the watchdog's case): then this fails or times out, and that is all
            self.dht.store(tracker.training_progress_key, subkey=tracker._local_public_key, value=None,
                           expiration_time=get_dht_time() + tracker.metadata_expiration,
                           return_future=True).result(timeout)
        except Exception as e:
            logger.debug(f"clearing this peer's progress record failed: {e!r}")

    # --- per-epoch bookkeeping ----------------------------------------------------------------

    def _record_round(self, group_size: int, rejected: dict) -> None:
        self.stats.rounds += 1
        self.stats.last_group_size = group_size
        self.stats.rejected_parts += len(rejected)
        if group_size > 1:
            self.stats.rounds_averaged += 1

    def _on_epoch(self, losses: list[float]) -> None:
        epoch = self.opt.local_epoch
        self._refresh_stats(losses)
        logger.info(f"epoch {epoch}: loss {self.stats.last_loss or float('nan'):.4f}, "
                    f"last round with {self.stats.last_group_size} peers", extra=ROUTINE)
        if self._weights_finite():
            self._last_good = self._snapshot()
        else:
            self._roll_back("weights became non-finite")
        if self.settings.stop_at_accuracy is not None:
            self._check_accuracy(self.settings.stop_at_accuracy)
        every = self.settings.checkpoint_every
        if epoch % every == 0 and epoch < self.max_epochs:  # the last one is written by finish()
            self.save_checkpoint()

    def _check_accuracy(self, target: float) -> None:
        from p2ptrain.metrics import evaluate

        begin = time.monotonic()
        accuracy = evaluate(self.model, self.task).accuracy
        self.stats.eval_seconds += time.monotonic() - begin
        logger.info(f"epoch {self.opt.local_epoch}: test accuracy {accuracy:.4f}", extra=ROUTINE)
        if accuracy >= target and self.stats.time_to_accuracy is None:
            self.stats.time_to_accuracy = round(self._elapsed_training(), 3)
            logger.info(f"test accuracy {accuracy:.4f} reached --stop-at-accuracy {target:g} after "
                        f"{self.stats.time_to_accuracy:.1f} s of training: leaving")
            self.stop_requested.set()

    def _elapsed_training(self) -> float:
        """Wall seconds since the first step, less the time spent checking accuracy."""
        return time.monotonic() - self._training_started - self.stats.eval_seconds

    def _refresh_stats(self, losses: list[float]) -> None:
        if losses:
            self.stats.last_loss = sum(losses) / len(losses)

    # --- bad numbers never reach the swarm ----------------------------------------------------

    @staticmethod
    def _finite(loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss).all())

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def _roll_back(self, reason: str) -> None:
        """Drop this step's gradients and return to the last good weights instead of sharing garbage."""
        logger.warning(f"{reason}: rolling back to the state of epoch {self._last_good['epoch']}")
        self.stats.rollbacks += 1
        self.opt.zero_grad()
        self._restore(self._last_good)

    def _snapshot(self) -> dict:
        return {"epoch": self.opt.local_epoch, "model": copy.deepcopy(self.model.state_dict()),
                "optimizer": copy.deepcopy(self.opt.opt.state_dict()),
                "inner": copy.deepcopy(self.inner.state_dict()) if self.inner is not None else None}

    def _restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            self.model.load_state_dict(snapshot["model"])
            self.opt.opt.load_state_dict(snapshot["optimizer"])
            if self.inner is not None:
                self.inner.load_state_dict(snapshot["inner"])
        self._restore_offloaded_from_model()

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        from p2ptrain.checkpoint import save_checkpoint
        from p2ptrain.metrics import evaluate

        metrics = evaluate(self.model, self.task)
        save_checkpoint(self.checkpoint_dir, self.model, self._stateful_optimizer, meta={
            "task": self.task.name, "run_id": self.settings.run_id, "epoch": self.opt.local_epoch,
            "peer": self.identity.name, "peer_id": self.identity.peer_id, "test_accuracy": metrics.accuracy,
            "stats": {k: v for k, v in vars(self.stats).items() if isinstance(v, (int, float, str))},
        })
        logger.info(f"checkpoint written to {self.checkpoint_dir} (epoch {self.opt.local_epoch}, "
                    f"test accuracy {metrics.accuracy:.4f})")
        self.final_accuracy = metrics.accuracy

    def resume(self) -> None:
        """Continue from the checkpoint in ``checkpoint_dir``."""
        from p2ptrain.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(self.checkpoint_dir)
        checkpoint.apply(self.model, self._stateful_optimizer)
        self.opt.state_averager.local_epoch = int(checkpoint.meta["epoch"])
        self.opt.tracker.report_local_progress(self.opt.local_epoch, 0)
        self._restore_offloaded_from_model()
        self._last_good = self._snapshot()
        logger.info(f"resumed from {self.checkpoint_dir} at epoch {self.opt.local_epoch}")

    @property
    def _stateful_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state a checkpoint keeps: with local updates the task's inner one (the outer
        step is stateless SGD); a resumed peer that restarted Adam's moments took large first steps, and
        one resumed alone at the end of a chaos run fell from 0.97 to 0.925 test accuracy in 7 epochs."""
        return self.inner if self.inner is not None else self.opt.opt

    def _restore_offloaded_from_model(self) -> None:
        """hivemind's offloaded optimizer holds its own copy of the weights: make it match the model."""
        with torch.no_grad():
            offloaded = [p for group in self.opt.opt.param_groups for p in group["params"]]
            for main, copy_ in zip(self.model.parameters(), offloaded):
                copy_.copy_(main)
