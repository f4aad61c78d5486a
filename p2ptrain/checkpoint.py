"""Local checkpoints: a directory holding model.safetensors, optimizer.safetensors and meta.json.

A checkpoint is written into a sibling temp directory and swapped into place with renames, so a crash
at any moment leaves either the old checkpoint or the new one, never a mix. If a crash falls between
the two renames, the previous checkpoint sits in ``.<name>.old`` and is used (and moved back) from there.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from p2ptrain.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
REQUIRED_META = {"task": str, "run_id": str, "epoch": int, "peer": str}
RESERVED_META = ("format_version", "time", "optimizer")  # written by save_checkpoint itself


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. ``optimizer_state`` is in ``torch.optim.Optimizer.state_dict()`` form."""

    directory: Path
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def epoch(self) -> int:
        return self.meta["epoch"]

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load the weights into ``model`` and, if given, the state into ``optimizer``.

        Raises:
            UserError: the checkpoint does not fit this model or optimizer (another task, another optimizer).
        """
        model_path = self.directory / MODEL_FILE
        expected = model.state_dict()
        missing = sorted(expected.keys() - self.model_state.keys())
        unexpected = sorted(self.model_state.keys() - expected.keys())
        if missing or unexpected:
            raise UserError(f"{model_path} (task '{self.task}') does not fit this model: missing "
                            f"{', '.join(missing) or 'nothing'}; unexpected {', '.join(unexpected) or 'nothing'}")
        for name, tensor in expected.items():
            if tensor.shape != self.model_state[name].shape:
                raise UserError(f"{model_path} (task '{self.task}'): '{name}' has shape "
                                f"{list(self.model_state[name].shape)} but this model expects {list(tensor.shape)}")
        model.load_state_dict(self.model_state)
        if optimizer is None:
            return
        optimizer_path = self.directory / OPTIMIZER_FILE
        saved_class = self.meta["optimizer"].get("class")
        if saved_class is not None and saved_class != type(optimizer).__name__:
            raise UserError(f"{optimizer_path} holds {saved_class} state but the optimizer is "
                            f"{type(optimizer).__name__}")
        # clone: torch keeps same-device tensors as they are, and the optimizer's in-place updates
        # would otherwise change this Checkpoint's copy too
        state = {"state": {i: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                           for i, s in self.optimizer_state["state"].items()},
                 "param_groups": [dict(g) for g in self.optimizer_state["param_groups"]]}
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{optimizer_path} does not fit the optimizer: {e}") from e


def save_checkpoint(directory: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    meta: dict[str, Any]) -> None:
    """Write a checkpoint to ``directory``, atomically replacing any checkpoint already there.

    Args:
        directory: the checkpoint directory; its parent is created if missing.
        model: its ``state_dict()`` goes to model.safetensors.
        optimizer: a torch optimizer; tensor state goes to optimizer.safetensors, the rest to meta.json.
        meta: must hold ``task`` (str), ``run_id`` (str), ``epoch`` (int, the global epoch) and
            ``peer`` (str); any other JSON-serializable keys are stored as given.

    Raises:
        UserError: ``directory`` exists but is not a checkpoint (it is never overwritten then).
    """
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"checkpoint meta needs '{key}' of type {kind.__name__}, got {meta.get(key)!r}")
    clash = [key for key in RESERVED_META if key in meta]
    if clash:
        raise ValueError(f"checkpoint meta keys {clash} are written by save_checkpoint itself")
    directory = Path(directory).expanduser()
    temp, backup = _temp_path(directory), _backup_path(directory)
    _recover(directory)
    if directory.exists() and not _is_checkpoint(directory):
        raise UserError(f"refusing to overwrite {directory}: it exists and is not a p2ptrain checkpoint")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (temp, backup):  # from a save that was killed; the checkpoint itself is intact
        if leftover.exists():
            shutil.rmtree(leftover)

    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    optimizer_meta["class"] = type(optimizer).__name__
    full_meta = {"format_version": FORMAT_VERSION, **meta,
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "optimizer": optimizer_meta}
    meta_text = json.dumps(full_meta, indent=2)  # before touching the disk: a TypeError leaves no temp dir

    temp.mkdir()
    try:
        save_file(_saveable(model.state_dict()), str(temp / MODEL_FILE))
        save_file(_saveable(optimizer_tensors), str(temp / OPTIMIZER_FILE))
        (temp / META_FILE).write_text(meta_text + "\n")
        for name in (MODEL_FILE, OPTIMIZER_FILE, META_FILE):
            _fsync(temp / name)
        _fsync(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if directory.exists():
        directory.rename(backup)
    temp.rename(directory)
    _fsync(directory.parent)
    shutil.rmtree(backup, ignore_errors=True)


def load_checkpoint(directory: Path | str) -> Checkpoint:
    """Read and check the checkpoint in ``directory``.

    Raises:
        UserError: the directory or one of its files is missing, corrupt, or of another format version.
    """
    directory = Path(directory).expanduser()
    if not directory.exists() and _backup_path(directory).is_dir():
        logger.warning("%s is missing but a save was interrupted; using the previous checkpoint in %s",
                       directory, _backup_path(directory))
        directory = _backup_path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist" if not directory.exists()
                        else f"checkpoint {directory} is not a directory")
    meta = _read_meta(directory / META_FILE)
    model_state = _read_tensors(directory / MODEL_FILE)
    optimizer_state = _unflatten_optimizer(_read_tensors(directory / OPTIMIZER_FILE), meta["optimizer"],
                                           directory / OPTIMIZER_FILE)
    return Checkpoint(directory=directory, model_state=model_state, optimizer_state=optimizer_state, meta=meta)


def _temp_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.tmp")


def _backup_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _recover(directory: Path) -> None:
    """Undo a save killed between its two renames: put the previous checkpoint back."""
    backup = _backup_path(directory)
    if not directory.exists() and backup.is_dir():
        logger.warning("restoring %s from %s (a previous save was interrupted)", directory, backup)
        backup.rename(directory)


def _is_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and ((directory / META_FILE).is_file() or not any(directory.iterdir()))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _saveable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, and no two tensors sharing memory (safetensors refuses tied weights)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors (``state.<param>.<key>``, ``param_groups.<i>.<key>``)
    and the JSON-ready rest."""
    tensors: dict[str, Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        plain_state[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                plain_state[str(index)][key] = value
    groups: list[dict[str, Any]] = []
    for i, group in enumerate(state_dict["param_groups"]):
        groups.append({})
        for key, value in group.items():
            if isinstance(value, Tensor):  # e.g. a tensor lr
                tensors[f"param_groups.{i}.{key}"] = value
            else:
                groups[i][key] = value
    return tensors, {"param_groups": groups, "state": plain_state}


def _unflatten_optimizer(tensors: dict[str, Tensor], saved: dict[str, Any], path: Path) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {_param_key(i): dict(values) for i, values in saved["state"].items()}
    groups = [dict(g) for g in saved["param_groups"]]
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        index, _, key = rest.partition(".")
        if kind == "state" and key:
            state.setdefault(_param_key(index), {})[key] = tensor
        elif kind == "param_groups" and key and index.isdigit() and int(index) < len(groups):
            groups[int(index)][key] = tensor
        else:
            raise UserError(f"{path}: unexpected tensor '{name}' (not written by p2ptrain?)")
    return {"state": state, "param_groups": groups}


def _param_key(index: str) -> int | str:
    return int(index) if index.isdigit() else index  # torch optimizers key state by parameter number


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing: not a complete checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is corrupt: {e}") from e


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing: not a complete checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format version {version!r}, this p2ptrain reads version {FORMAT_VERSION}")
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{path}: '{key}' must be {'an integer' if kind is int else 'a string'}, "
                            f"found {meta.get(key)!r}")
    if meta["epoch"] < 0:
        raise UserError(f"{path}: 'epoch' must not be negative, found {meta['epoch']}")
    optimizer = meta.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and all(isinstance(v, dict) for v in optimizer["state"].values())
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        raise UserError(f"{path}: 'optimizer' must be an object with 'state' and 'param_groups'")
    return meta
