"""``p2ptrain evaluate`` as a real subprocess, on a digits-mlp checkpoint written here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2ptrain.checkpoint import save_checkpoint
from p2ptrain.tasks import load_task


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2ptrain", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-mlp after 300 steps: well above chance, so the numbers mean something."""
    torch.manual_seed(0)
    task = load_task("digits-mlp")
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    for step in range(300):
        x, y = task.batch("test", "peer", step, task.batch_size)
        optimizer.zero_grad()
        task.loss(model(x), y).backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("run") / "checkpoint"
    save_checkpoint(directory, model, optimizer, meta={"task": "digits-mlp", "run_id": "test", "epoch": 7,
                                                       "peer": "test-peer"})
    return directory


def test_json(checkpoint: Path) -> None:
    result = run_cli("evaluate", "--checkpoint", str(checkpoint), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "digits-mlp" and report["epoch"] == 7
    assert report["accuracy"] > 0.9
    assert len(report["precision"]) == len(report["recall"]) == len(report["f1"]) == 10
    matrix = report["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 360
    assert report["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(10)) / 360)
    assert report["loss"] > 0


def test_table(checkpoint: Path) -> None:
    result = run_cli("evaluate", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "digits-mlp" in out and "global epoch 7" in out
    assert "accuracy 0." in out and "precision" in out and "macro avg" in out and "confusion matrix" in out


def test_corrupt_checkpoint_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 40)
    result = run_cli("evaluate", "--checkpoint", str(broken))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "model.safetensors is corrupt" in result.stderr


def test_wrong_task_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", "--checkpoint", str(checkpoint), "--task", "fashion-mlp", "--data-dir",
                     str(tmp_path / "missing"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "apt install dataset-fashion-mnist" in result.stderr


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = run_cli("evaluate", "--checkpoint", str(tmp_path / "nothing"), "--json")
    assert result.returncode != 0 and result.stdout == "" and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
