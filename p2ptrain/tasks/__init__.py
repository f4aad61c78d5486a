"""Training tasks. ``load_task("digits-mlp")`` or ``load_task("my_pkg.module:factory")``.

base    -- the Task interface and deterministic per-peer batches
digits  -- digits-mlp: scikit-learn's bundled 8x8 digits, a small MLP (the default)
fashion -- fashion-mlp: Fashion-MNIST IDX files, the 784-500-500-10 MLP of the original write-up
"""
from __future__ import annotations

import importlib
from pathlib import Path

from p2ptrain.errors import UserError
from p2ptrain.tasks.base import Task, batch_indices

BUILTIN = {
    "digits-mlp": "p2ptrain.tasks.digits:make_task",
    "fashion-mlp": "p2ptrain.tasks.fashion:make_task",
}

__all__ = ["BUILTIN", "Task", "batch_indices", "load_task"]


def load_task(spec: str, data_dir: Path | None = None) -> Task:
    """A built-in task by name, or ``package.module:factory`` where ``factory(data_dir)`` returns a Task."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise UserError(f"unknown task '{spec}': use one of {', '.join(BUILTIN)} or package.module:factory")
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load task '{spec}': {e}") from e
    task = factory(data_dir=data_dir)
    if not isinstance(task, Task):
        raise UserError(f"task factory '{spec}' returned {type(task).__name__}, not a p2ptrain Task")
    return task
