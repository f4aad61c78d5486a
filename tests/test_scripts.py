"""Smoke tests of scripts/: a real 2-peer digits swarm on 127.0.0.1 through local_swarm.py, then nothing left.

Slow by the standards of the unit tests (~30 s, mostly starting three Python processes with torch and
hivemind); they are the only check that `make demo` works end to end.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from rich.console import Console

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def processes_naming(workdir: Path) -> list[psutil.Process]:
    """Processes whose command line mentions ``workdir``: the run's peers, hivemind workers and p2pd daemons."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(str(workdir) in part for part in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def run_script(args: list[str], workdir: Path, *, timeout: float) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a script; afterwards kill (and report) whatever it left running that names ``workdir``."""
    done = None
    try:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    finally:
        left = processes_naming(workdir)
        described = [f"{p.pid} {p.info['name']} {' '.join(p.info['cmdline'] or ())[:200]}" for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
    return done, described


@pytest.mark.timeout(180)
def test_local_swarm_trains_reports_json_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "swarm"
    done, left = run_script([str(SCRIPTS / "local_swarm.py"), "--peers", "2", "--max-epochs", "3", "--json",
                             "--timeout", "120", "--workdir", str(workdir)], workdir, timeout=150)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not [p for p in left if "p2pd" in p], f"p2pd daemons left running: {left}"
    assert not left, f"processes left running: {left}"

    result = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert result["task"] == "digits-mlp" and result["epochs"] == 3
    assert len(result["peers"]) == 2
    assert len({p["name"] for p in result["peers"]}) == 2  # one identity per peer
    for peer in result["peers"]:
        assert peer["epoch"] == 3
        assert 0.0 <= peer["accuracy"] <= 1.0
        assert 0 <= peer["rounds_averaged"] <= peer["rounds"]
        assert peer["steps"] > 0 and peer["samples"] > 0 and peer["compute_seconds"] > 0
    assert result["accuracy"] == pytest.approx(sum(p["accuracy"] for p in result["peers"]) / 2)
    assert result["wall_seconds"] > 0
    assert "swarm epoch 3/3" in done.stderr  # progress was parsed from the peers' log lines
    keys = sorted(path.name for path in (workdir / "keys").glob("*.key"))
    assert keys == ["bootstrap.key", "peer-1.key", "peer-2.key"]  # one identity per process


def test_local_swarm_reports_a_failing_peer_in_one_line(tmp_path: Path) -> None:
    """A peer that cannot start (unknown task) ends the run with one clear line and its log's tail."""
    workdir = tmp_path / "swarm"
    done, left = run_script([str(SCRIPTS / "local_swarm.py"), "--peers", "1", "--task", "no-such-task", "--json",
                             "--timeout", "90", "--workdir", str(workdir)], workdir, timeout=120)
    assert not left, f"processes left running: {left}"
    assert done.returncode == 1
    assert done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: peer 1 exited with code 2"), done.stderr  # UserError
    assert "unknown task 'no-such-task'" in done.stderr  # the tail of the peer's stderr


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_live_view_and_result_render_as_text() -> None:
    swarm = _load("local_swarm")
    status = swarm.SwarmStatus("digits-mlp", 40, 12.0, (
        swarm.PeerStatus("peer 1 brave-amber-otter", "training", 12, 0.31, 3),
        swarm.PeerStatus("peer 2", "starting")))
    console = Console(file=io.StringIO(), width=120)
    console.print(status)
    text = console.file.getvalue()
    assert "swarm epoch 12/40" in text and "brave-amber-otter" in text and "0.3100" in text
    assert status.line().startswith("[   12s] swarm epoch 12/40: peer 1 brave-amber-otter training e12 loss 0.3100")

    peer = swarm.PeerResult(name="brave-amber-otter", epoch=40, accuracy=0.97, rounds=40, rounds_averaged=39,
                            compute_seconds=1.5, steps=700, samples=22400, training_seconds=50.0)
    result = swarm.SwarmResult(task="digits-mlp", peers=(peer,), accuracy=0.97, wall_seconds=61.0, epochs=40)
    console = Console(file=io.StringIO(), width=120)
    console.print(result)
    assert "39/40 rounds" in console.file.getvalue() and "swarm test accuracy 0.9700" in console.file.getvalue()
    assert set(result.to_dict()) == {"task", "peers", "accuracy", "wall_seconds", "epochs"}


def test_log_lines_are_parsed() -> None:
    swarm = _load("local_swarm")
    line = "2026-01-01 00:00:00,000 INFO p2ptrain.trainer: epoch 12: loss 0.3100, last round with 3 peers"
    assert swarm.EPOCH_LINE.search(line).groups() == ("12", "0.3100", "3")
    line = ("2026-01-01 00:00:00,000 INFO p2ptrain.trainer: checkpoint written to /tmp/x/checkpoint "
            "(epoch 40, test accuracy 0.9722)")
    assert swarm.CHECKPOINT_LINE.search(line).groups() == ("40", "0.9722")
    line = "  p2ptrain join --initial-peers /ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc"
    assert swarm.JOIN_LINE.search(line).group(1) == "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc"
