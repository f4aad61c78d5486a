"""``scripts/chaos.py --quick``: trainers of a real local swarm are SIGKILLed and restarted, and the run's JSON
report holds the invariants of the chaos run (every trainer finishes, every ledger verifies clean, nothing
left running, nothing hung). The full run (4 trainers, 2 minutes) is ``python scripts/chaos.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_scripts import SCRIPTS, run_script


@pytest.mark.timeout(300)
def test_quick_chaos_run_survives_kills_and_restarts(tmp_path: Path) -> None:
    workdir, out = tmp_path / "chaos", tmp_path / "chaos.json"
    done, left = run_script([str(SCRIPTS / "chaos.py"), "--quick", "--seed", "1", "--time-limit", "200",
                             "--workdir", str(workdir), "--out", str(out)], workdir, timeout=260)
    assert out.exists(), done.stderr[-4000:]
    report = json.loads(out.read_text())
    context = done.stderr[-4000:]

    assert report["kills"] >= 1 and report["restarts"] >= 1, context
    kills = [a for a in report["actions"] if a["kind"] == "kill"]
    assert all(a["detail"].startswith("SIGKILL to ") for a in kills), report["actions"]
    restarts = [a for a in report["actions"] if a["kind"] == "restart"]
    # a clean exit: with a checkpoint once training, or (exit 130) when stopped while still starting
    assert all(a["detail"].startswith(("exit 0, interrupted=True", "exit 130: interrupted while starting",
                                       "exit -2: interrupted while starting"))
               for a in restarts), report["actions"]
    # every slot's last process trained to the end and exited cleanly
    assert report["all_finished"] and not report["peer_failures"], context
    assert all(f["exit_code"] == 0 and f["epoch"] == report["config"]["max_epochs"] for f in report["final"])
    # every ledger verifies clean: relaunched peers repaired what their SIGKILLs left
    assert len(report["ledgers"]) == 2 and all(entry["records"] for entry in report["ledgers"]), report["ledgers"]
    assert report["ledgers_clean"], report["ledgers"]
    # nothing left running, nothing hung, and the script says so with its exit status
    assert report["leftover_processes"] == [] and report["hung"] == [], report
    assert report["stragglers_before_sweep"] == [], report["stragglers_before_sweep"]
    assert not left, f"processes left running: {left}"
    assert report["ok"] and done.returncode == 0, context
    assert report["wall_seconds"] <= report["config"]["time_limit"]
