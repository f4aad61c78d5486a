"""Each benchmark of scripts/bench/ once, in a tiny setting: proof that it runs and reports, not a measurement.

The real runs (``make bench``) take minutes; here every script runs as a subprocess with the smallest
sizes it accepts, and report.py renders fixture JSON. Fashion-MNIST may be absent (CI): ddp_train.py gets
a small generated IDX data set instead.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
TIMEOUT = 240.0  # two shared cores: starting several torch + hivemind processes can take a minute


def run_bench(script: str, *args: str, env: dict | None = None, timeout: float = TIMEOUT) -> dict:
    """Run a benchmark script with ``--json``-style output; return the last stdout line as JSON."""
    proc = subprocess.Popen([sys.executable, str(BENCH / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left in its group (p2pd, workers)
        except (ProcessLookupError, PermissionError):
            pass
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_fashion(directory: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """A small Fashion-MNIST look-alike in gzipped IDX files: random images, labels 0..9."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
        (directory / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return directory


def test_ddp_train_two_ranks_from_the_environment(tmp_path: Path) -> None:
    """Launched as torchrun would: one process per rank, RANK/WORLD_SIZE/MASTER_* in the environment."""
    data = write_fashion(tmp_path / "fashion")
    port = load_module("ddp_train").free_port()
    args = [str(BENCH / "ddp_train.py"), "--task", "fashion-mlp", "--data-dir", str(data), "--global-batch", "200",
            "--max-steps", "2", "--target", "1.01", "--time-limit", "60"]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r))) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[1][0] == ""  # only rank 0 prints
    result = json.loads(outputs[0][0])
    params = 784 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10
    assert result["steps"] == 2 and result["samples"] == 400 and result["world_size"] == 2
    assert result["bytes_per_step"] == 4 * params
    assert result["time_to_target"] is None and not result["reached"]
    assert 0 <= result["final_accuracy"] <= 1 and 0 < result["utilisation"] <= 1


def test_ddp_train_local_launch_reaches_a_low_target() -> None:
    result = run_bench("ddp_train.py", "--nproc", "2", "--task", "digits-mlp", "--target", "0.5", "--time-limit", "60")
    assert result["reached"] and result["time_to_target"] > 0 and result["final_accuracy"] >= 0.5


def test_allreduce_tiny() -> None:
    result = run_bench("allreduce.py", "--sizes-mb", "0.064", "--peers", "2", "--rounds", "1", "--json")
    (case,) = result["cases"]
    assert case["peers"] == 2 and case["bytes"] == 64000 and case["variant"] == "none"
    assert case["gloo"]["allreduce_s"]["median"] > 0
    assert case["p2ptrain"]["full_group_share"] == 1.0
    assert case["ratio_round"] > 0 and case["ratio_allreduce"] > 0


def test_dht_tiny() -> None:
    result = run_bench("dht.py", "--peers", "4", "--processes", "2", "--ops", "2", "--json")
    (case,) = result["cases"]
    assert case["peers"] == 4 and case["join_s"]["n"] == 3 and case["join_success"] == 1.0  # all but the root join
    assert case["store_success"] == 1.0 and case["get_success"] >= 0.75
    assert case["store_s"]["mean"] > 0 and case["get_s"]["p95"] > 0


def test_ledger_tiny(tmp_path: Path) -> None:
    result = run_bench("ledger.py", "--records", "200", "--rounds", "5", "--json", "--out", str(tmp_path / "l.json"))
    assert result["verify"]["records"] == 200 and result["round"]["rounds"] == 5
    assert json.loads((tmp_path / "l.json").read_text())["benchmark"] == "ledger"


def test_training_swarm_and_ddp_with_memory(tmp_path: Path) -> None:
    memory = tmp_path / "memory.json"
    result = run_bench("training.py", "--task", "digits-mlp", "--target", "0.5", "--rows", "ddp", "swarm",
                       "--budget", "200", "--json", "--memory-out", str(memory))
    assert set(result["rows"]) == {"ddp", "swarm"}, result["skipped"]
    for row in result["rows"].values():
        assert row["time_to_target"] is not None and row["final_accuracy"] >= 0.5 and row["samples"] > 0
    assert result["ratios"]["swarm_vs_ddp"] > 0
    total = json.loads(memory.read_text())["per_peer_mean_of_peaks"]["total"]
    assert total["pss_mb"] > 50 and total["processes"] >= 2  # python + at least p2pd


def test_report_renders_fixtures_and_foreign_json(tmp_path: Path) -> None:
    report = load_module("report")
    fixtures = {
        "allreduce": {"averager": "x", "rounds_per_case": 3, "variants_supported": ["none"], "cases": [
            {"peers": 4, "bytes": 40000000, "size_mb": 40, "variant": "none",
             "p2ptrain": {"round_s": {"median": 1.2}, "allreduce_s": {"median": 0.3}, "full_group_share": 1.0},
             "gloo": {"allreduce_s": {"median": 0.1}}, "ratio_round": 12.0, "ratio_allreduce": 3.0}],
            "command": "python scripts/bench/allreduce.py --rounds 3"},
        "training": {"task": "fashion-mlp", "target": 0.88, "budget_seconds": 400, "skipped": {"swarm-8bit": "budget"},
                     "rows": {name: {"label": name, "time_to_target": t, "utilisation": u, "final_accuracy": a,
                                     "samples": 1000, "epochs": 10, "training_seconds": t, "wall_seconds": 100}
                              for name, t, u, a in [("one", 100.0, 0.9, 0.881), ("swarm", 50.0, 0.95, 0.8815),
                                                    ("ddp", 45.0, 0.97, 0.89)]},
                     "ratios": {"swarm_vs_one": 0.5, "swarm_vs_ddp": 50 / 45, "ddp_vs_one": 0.45,
                                "accuracy_minus_one": {"one": 0.0, "swarm": 0.0005, "ddp": 0.009}}},
        "wan": {"latency_ms": 50, "cases": [{"mode": "swarm", "seconds": 12.5}, {"mode": "ddp", "seconds": 9}]},
        "run": {"total_seconds": 512.0, "finished": "2026-11-29 05:00 UTC",
                "stages": [{"name": "training", "seconds": 300, "budget": 320, "status": "ok"}]},
    }
    for name, data in fixtures.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "chaos.json").write_text("{not json")
    text = report.render(tmp_path)
    assert "2026-11-29 05:00 UTC" in text and "512 s" in text and "## Machine" in text and "hivemind" in text
    assert "| 2-peer swarm time to 88% ≤ 0.6× 1 peer | 0.50x | met |" in text
    assert "| swarm time to 88% ≤ 1.2× DDP (loopback) | 1.11x | met |" in text
    assert "12.0x worst" in text and "not met" in text  # the round is 12x gloo; ddp is 0.9 points off
    assert "python scripts/bench/allreduce.py --rounds 3" in text
    assert "## wan (from wan.json)" in text and "| latency_ms | 50 |" in text and "| swarm | 12.5 |" in text
    assert "## chaos (from chaos.json)\n\nCould not be read (unreadable:" in text
    assert "Not measured in this run (no dht.json)" in text
