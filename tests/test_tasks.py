"""Task loading and the deterministic (run, peer, step) -> batch derivation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from p2ptrain.errors import UserError
from p2ptrain.tasks import Task, batch_indices, load_task
from p2ptrain.tasks import base


def tiny_task(data_dir: Path | None = None) -> Task:
    """A factory for ``load_task("<this module>:tiny_task")``; the data dir ends up in the name."""
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    y = torch.arange(20) % 2
    return Task(name=f"tiny:{data_dir}", make_model=lambda: nn.Linear(2, 2), train=(x, y), test=(x[:4], y[:4]),
                num_classes=2, accuracy_bar=0.5, batch_size=4)


def not_a_task(data_dir: Path | None = None) -> str:
    return "surprise"


def test_same_run_peer_step_gives_the_same_batch() -> None:
    task = tiny_task()
    first = task.batch("run", "peer-a", 3, 4)
    base._permutation.cache_clear()  # re-derived from scratch, not served from the cache
    second = task.batch("run", "peer-a", 3, 4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_batch_depends_on_peer_run_and_step() -> None:
    reference = batch_indices("run", "peer-a", 0, 10, 1000)
    assert not torch.equal(reference, batch_indices("run", "peer-b", 0, 10, 1000))
    assert not torch.equal(reference, batch_indices("other-run", "peer-a", 0, 10, 1000))
    assert not torch.equal(reference, batch_indices("run", "peer-a", 1, 10, 1000))


def test_batch_holds_matching_inputs_and_labels() -> None:
    task = tiny_task()
    x, y = task.batch("run", "peer", 0, 4)
    index = batch_indices("run", "peer", 0, 4, 20)
    assert torch.equal(x, task.train[0][index]) and torch.equal(y, task.train[1][index])


def test_one_pass_covers_every_example_once_and_the_next_pass_reshuffles() -> None:
    n, batch_size = 100, 10
    first_pass = torch.cat([batch_indices("run", "peer", s, batch_size, n) for s in range(10)])
    second_pass = torch.cat([batch_indices("run", "peer", s, batch_size, n) for s in range(10, 20)])
    assert sorted(first_pass.tolist()) == list(range(n))
    assert sorted(second_pass.tolist()) == list(range(n))
    assert not torch.equal(first_pass, second_pass)


def test_unknown_task_name() -> None:
    with pytest.raises(UserError, match="unknown task 'nope'.*digits-mlp"):
        load_task("nope")


@pytest.mark.parametrize("spec", ["p2ptrain.no_such_module:make_task", "p2ptrain.tasks.digits:no_such_factory"])
def test_factory_that_does_not_exist(spec: str) -> None:
    with pytest.raises(UserError, match=f"cannot load task '{spec}'"):
        load_task(spec)


def test_factory_that_returns_something_else() -> None:
    with pytest.raises(UserError, match="returned str, not a p2ptrain Task"):
        load_task(f"{__name__}:not_a_task")


def test_custom_task_factory(tmp_path: Path) -> None:
    task = load_task(f"{__name__}:tiny_task", tmp_path)
    assert task.name == f"tiny:{tmp_path}"
    x, y = task.batch("run", "peer", 0, task.batch_size)
    assert task.make_model()(x).shape == (4, 2) and y.shape == (4,)


def test_builtin_digits_task() -> None:
    task = load_task("digits-mlp")
    x, y = task.batch("run", "peer", 0, task.batch_size)
    assert task.make_model()(x).shape == (task.batch_size, task.num_classes)
    assert len(task.test[1]) == 360
