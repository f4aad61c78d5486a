"""The task interface: what a peer needs to train and test one model."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


@dataclass(frozen=True)
class Task:
    """A model factory, in-memory train/test tensors, a loss and the defaults that suit them.

    ``train`` and ``test`` are ``(inputs, labels)``; inputs may be stored compactly (e.g. uint8)
    and are turned into model inputs by ``prepare``. Labels are int64 class indices.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    accuracy_bar: float  # test accuracy a finished run is expected to reach
    batch_size: int = 32
    target_batch_size: int = 1024
    lr: float = 1e-3
    max_epochs: int = 20
    delay_updates: bool = False  # worth it only when an epoch's compute is comparable to an averaging round
    local_updates: bool = False  # step on every batch, average the epoch's change (see trainer.SwarmOptimizer)
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    make_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] = adam
    prepare: Callable[[Tensor], Tensor] = field(default=lambda x: x)

    def batch(self, run_id: str, peer_id: str, step: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """The batch a peer trains on at local ``step``: a pure function of (run, peer, step)."""
        index = batch_indices(run_id, peer_id, step, batch_size, len(self.train[1]))
        return self.prepare(self.train[0][index]), self.train[1][index]


def batch_indices(run_id: str, peer_id: str, step: int, batch_size: int, n: int) -> Tensor:
    """Indices of the training examples for one step.

    Each peer walks its own permutation of the training set, reshuffled every pass; the permutation
    is seeded from (run id, peer id, pass), so anyone can re-derive any peer's batch later.
    """
    per_pass = max(1, n // batch_size)
    start = (step % per_pass) * batch_size
    return _permutation(run_id, peer_id, step // per_pass, n)[start:start + batch_size]


@lru_cache(maxsize=4)
def _permutation(run_id: str, peer_id: str, pass_index: int, n: int) -> Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{run_id}|{peer_id}|{pass_index}".encode()).digest()[:8], "big")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed >> 1))
