"""Checkpoints: exact round trips, clear errors for damaged files, and atomic replacement."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import p2ptrain.checkpoint as checkpoint_module
from p2ptrain.checkpoint import load_checkpoint, save_checkpoint
from p2ptrain.errors import UserError

META = {"task": "digits-mlp", "run_id": "run", "epoch": 3, "peer": "brave-blue-otter"}
X = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        rows = slice(8 * (step % 4), 8 * (step % 4) + 8)
        optimizer.zero_grad()
        F.cross_entropy(model(X[rows]), Y[rows]).backward()
        optimizer.step()


class CountingSGD(torch.optim.SGD):
    """SGD that also keeps a plain-int counter per parameter: state that is not a tensor."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "counting-sgd": lambda m: CountingSGD(m.parameters(), lr=0.1, momentum=0.5),
}


def saved(tmp_path: Path, **meta: object) -> Path:
    model = make_model()
    optimizer = OPTIMIZERS["adam"](model)
    train(model, optimizer, 2)
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, model, optimizer, meta={**META, **meta})
    return directory


def user_error(directory: Path, model: nn.Module | None = None) -> str:
    with pytest.raises(UserError) as info:
        loaded = load_checkpoint(directory)
        if model is not None:
            loaded.apply(model, OPTIMIZERS["adam"](model))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_round_trip_continues_training_identically(tmp_path: Path, name: str) -> None:
    model = make_model()
    optimizer = OPTIMIZERS[name](model)
    train(model, optimizer, 5)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, meta=META)
    train(model, optimizer, 5)

    restored = make_model(seed=99)
    restored_optimizer = OPTIMIZERS[name](restored)
    load_checkpoint(tmp_path / "ckpt").apply(restored, restored_optimizer)
    train(restored, restored_optimizer, 5)
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), key
    for a, b in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert optimizer.state_dict()["param_groups"][0]["lr"] == restored_optimizer.state_dict()["param_groups"][0]["lr"]


def test_meta_json(tmp_path: Path) -> None:
    directory = saved(tmp_path, notes={"why": "test"})
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert {k: meta[k] for k in META} == META and meta["notes"] == {"why": "test"}
    assert meta["time"].endswith("+00:00")
    assert meta["optimizer"]["class"] == "Adam"
    assert meta["optimizer"]["param_groups"][0]["lr"] == 1e-2
    loaded = load_checkpoint(directory)
    assert (loaded.task, loaded.epoch, loaded.meta["notes"]) == ("digits-mlp", 3, {"why": "test"})
    assert sorted(os.listdir(directory)) == ["meta.json", "model.safetensors", "optimizer.safetensors"]


def test_plain_state_goes_to_meta_json(tmp_path: Path) -> None:
    model = make_model()
    optimizer = CountingSGD(model.parameters(), lr=0.1, momentum=0.5)
    train(model, optimizer, 3)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, meta=META)
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["optimizer"]["state"]["0"] == {"count": 3}
    state = load_checkpoint(tmp_path / "ckpt").optimizer_state
    assert state["state"][0]["count"] == 3 and isinstance(state["state"][0]["momentum_buffer"], torch.Tensor)


def test_applying_twice_gives_independent_optimizers(tmp_path: Path) -> None:
    loaded = load_checkpoint(saved(tmp_path))
    before = {k: v.clone() for k, v in loaded.optimizer_state["state"][0].items()}
    model = make_model()
    optimizer = OPTIMIZERS["adam"](model)
    loaded.apply(model, optimizer)
    train(model, optimizer, 3)
    for key, value in loaded.optimizer_state["state"][0].items():
        assert torch.equal(value, before[key]), key


def test_tied_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "ckpt", model, optimizer, meta=META)
    restored = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    load_checkpoint(tmp_path / "ckpt").apply(restored)
    assert torch.equal(restored[0].weight, model[0].weight) and torch.equal(restored[1].weight, model[0].weight)


def test_model_only_apply(tmp_path: Path) -> None:
    model = make_model(seed=5)
    load_checkpoint(saved(tmp_path)).apply(model)
    assert not torch.equal(model[0].weight, make_model(seed=5)[0].weight)


def test_missing_directory(tmp_path: Path) -> None:
    assert user_error(tmp_path / "nowhere") == f"checkpoint directory {tmp_path / 'nowhere'} does not exist"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    directory = saved(tmp_path)
    (directory / name).unlink()
    assert user_error(directory) == f"{directory / name} is missing: not a complete checkpoint"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(tmp_path: Path, name: str, damage: str) -> None:
    directory = saved(tmp_path)
    path = directory / name
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\xff" * 100, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    assert user_error(directory).startswith(f"{path} is corrupt: ")


def test_bad_json(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "meta.json").write_text('{"format_version": 1, "task": ')
    assert user_error(directory).startswith(f"{directory / 'meta.json'} is not valid JSON: ")


@pytest.mark.parametrize("change, expected", [
    ({"format_version": 2}, "checkpoint format version 2, this p2ptrain reads version 1"),
    ({"format_version": None}, "checkpoint format version None"),
    ({"task": None}, "'task' must be a string, found None"),
    ({"epoch": "7"}, "'epoch' must be an integer, found '7'"),
    ({"epoch": -1}, "'epoch' must not be negative"),
    ({"optimizer": []}, "'optimizer' must be an object with 'state' and 'param_groups'"),
])
def test_invalid_meta(tmp_path: Path, change: dict[str, object], expected: str) -> None:
    directory = saved(tmp_path)
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, **change}))
    message = user_error(directory)
    assert message.startswith(f"{directory / 'meta.json'}: ") and expected in message


def test_meta_that_is_not_an_object(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "meta.json").write_text("[1, 2]")
    assert "expected a JSON object, found list" in user_error(directory)


def test_unexpected_optimizer_tensor(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    save_file({"bogus": torch.zeros(1)}, str(directory / "optimizer.safetensors"))
    assert "unexpected tensor 'bogus'" in user_error(directory)


def test_shape_mismatch_names_the_file(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    wider = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    message = user_error(directory, wider)
    assert message == (f"{directory / 'model.safetensors'} (task 'digits-mlp'): '0.weight' has shape [16, 8] "
                       "but this model expects [32, 8]")


def test_missing_layer_names_the_file(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    message = user_error(directory, nn.Sequential(nn.Linear(8, 16)))
    assert message == (f"{directory / 'model.safetensors'} (task 'digits-mlp') does not fit this model: "
                       "missing nothing; unexpected 2.bias, 2.weight")


def test_other_optimizer_class(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    model = make_model()
    with pytest.raises(UserError, match="holds Adam state but the optimizer is SGD"):
        load_checkpoint(directory).apply(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_other_parameter_groups(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    model = make_model()
    optimizer = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    with pytest.raises(UserError, match="optimizer.safetensors does not fit the optimizer"):
        load_checkpoint(directory).apply(model, optimizer)


def test_meta_needs_the_run_fields(tmp_path: Path) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="'peer'"):
        save_checkpoint(tmp_path / "c", model, torch.optim.Adam(model.parameters()), meta={**META, "peer": None})
    with pytest.raises(ValueError, match="written by save_checkpoint itself"):
        save_checkpoint(tmp_path / "c", model, torch.optim.Adam(model.parameters()), meta={**META, "time": 1})
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    saved(tmp_path, epoch=1)
    directory = saved(tmp_path, epoch=2)
    assert load_checkpoint(directory).epoch == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_refuses_to_overwrite_other_directories(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite .* not a p2ptrain checkpoint"):
        saved(tmp_path)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"


def test_failure_while_writing_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = saved(tmp_path, epoch=1)
    real_save_file = checkpoint_module.save_file

    def fail_on_optimizer(tensors: dict[str, torch.Tensor], filename: str) -> None:
        real_save_file(tensors, filename)
        if filename.endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"half")
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", fail_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        saved(tmp_path, epoch=2)
    assert load_checkpoint(directory).epoch == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_crash_between_the_renames(tmp_path: Path) -> None:
    directory = saved(tmp_path, epoch=1)
    # what a kill between "checkpoint -> .old" and ".tmp -> checkpoint" leaves behind
    directory.rename(tmp_path / ".ckpt.old")
    (tmp_path / ".ckpt.tmp").mkdir()
    (tmp_path / ".ckpt.tmp" / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(directory).epoch == 1
    saved(tmp_path, epoch=2)
    assert load_checkpoint(directory).epoch == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


KILL_TARGET = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from p2ptrain.checkpoint import save_checkpoint

    model = nn.Linear(512, 512)
    optimizer = torch.optim.Adam(model.parameters())
    for epoch in range(1, 100_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(epoch)
        meta = {"task": "t", "run_id": "r", "epoch": epoch, "peer": "p"}
        save_checkpoint(sys.argv[1], model, optimizer, meta=meta)
        print(epoch, flush=True)
""")


def test_kill_9_while_saving_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    for delay in (0.0, 0.013, 0.031):
        child = subprocess.Popen([sys.executable, "-c", KILL_TARGET, str(directory)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            last = int(child.stdout.readline())  # one save has completed
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
        loaded = load_checkpoint(directory)
        assert loaded.epoch >= last
        for value in loaded.model_state.values():
            assert torch.all(value == loaded.epoch)
