"""Every benchmark in scripts/bench/, each within its time budget, then docs/BENCHMARKS.md: what `make bench` runs.

    python scripts/bench/run_all.py [--total 570] [--results docs/bench] [--only ledger dht allreduce training]

Stages, in this order (the quick ones first; training takes whatever is left of ``--total``):

  ledger     ledger.py      records verified per second, ledger time per round
  dht        dht.py         32 and 64 DHT peers: join time, store/get latency
  allreduce  allreduce.py   averaging round vs gloo all_reduce, 4 and 40 MB, 2 and 4 peers (+ variants)
  training   training.py    fashion-mlp to 88%: 1 peer, 2-peer swarm, DDP (+ memory.json from the swarm)
  report     report.py      docs/BENCHMARKS.md from docs/bench/*.json

Each stage is a subprocess with a hard limit: at its budget it gets SIGTERM (the scripts tear their peers
down on it), 20 s later SIGKILL, and any process still carrying the stage's token in its environment is
killed. A stage's old JSON is deleted before it runs, so a failed stage shows as "not measured" rather
than as stale figures. Prints a line per stage and the total time; exit 1 if any stage failed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN_ENV = "P2PTRAIN_BENCH_STAGE"
KILL_GRACE = 20.0
REPORT_RESERVE = 15.0  # seconds kept back for the report at the end


@dataclass
class Stage:
    name: str
    script: str
    args: list[str]
    budget: float  # seconds; training's is set from what is left
    outputs: list[str] = field(default_factory=list)  # JSON files (names under --results) the stage writes


def stages(results: Path) -> list[Stage]:
    r = lambda name: os.path.relpath(results / name, ROOT)
    return [
        Stage("ledger", "ledger.py", ["--records", "5000", "--rounds", "150", "--out", r("ledger.json")], 60,
              ["ledger.json"]),
        Stage("dht", "dht.py", ["--peers", "32", "64", "--processes", "4", "--ops", "4", "--out", r("dht.json")], 110,
              ["dht.json"]),
        Stage("allreduce", "allreduce.py", ["--sizes-mb", "4", "40", "--peers", "2", "4", "--rounds", "2",
                                            "--variants", "none", "fp16", "8bit", "centered-clip",
                                            "--out", r("allreduce.json")], 160, ["allreduce.json"]),
        # scripts/chaos.py, shorter than its default 2-minute run (45 s of chaos, 40 epochs) to leave training its share
        Stage("chaos", "../chaos.py", ["--duration", "45", "--max-epochs", "40", "--time-limit", "140",
                                       "--out", r("chaos.json")], 150, ["chaos.json"]),
        Stage("training", "training.py", ["--task", "fashion-mlp", "--target", "0.88", "--out", r("training.json"),
                                          "--memory-out", r("memory.json")], 0, ["training.json", "memory.json"]),
    ]


def run_stage(stage: Stage, budget: float) -> tuple[str, float]:
    """Run one stage's script within ``budget`` seconds; return (status, seconds)."""
    token = uuid.uuid4().hex
    env = dict(os.environ, **{TOKEN_ENV: token}, PYTHONUNBUFFERED="1")
    argv = [sys.executable, str(HERE / stage.script), *stage.args]
    began = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=budget)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = "over budget: stopped"
        _terminate(proc)
    except KeyboardInterrupt:
        _terminate(proc)
        raise
    finally:
        _sweep(token)
    return status, time.monotonic() - began


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (the script tears its peers down), then SIGKILL to its process group."""
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _sweep(token: str) -> None:
    """Kill what a stage left behind (p2pd daemons, hivemind workers): matched by the token in its environment."""
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(TOKEN_ENV) == token:
                left.append(p)
        except psutil.Error:
            pass
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total", type=float, default=590.0, help="seconds for everything, report included (590)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "bench", help="where the JSON goes (docs/bench)")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="the report (docs/BENCHMARKS.md)")
    p.add_argument("--only", nargs="+", choices=["ledger", "dht", "allreduce", "chaos", "training"], help="only these stages")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    began, ran, failed = time.monotonic(), [], False
    for stage in stages(args.results):
        if args.only and stage.name not in args.only:
            continue
        left = args.total - (time.monotonic() - began) - REPORT_RESERVE
        budget = min(stage.budget, left) if stage.budget else left
        if stage.name == "training":
            stage.args += ["--budget", f"{max(0.0, budget - 30):.0f}"]  # 30 s for its own start and teardown
        for name in stage.outputs:
            (args.results / name).unlink(missing_ok=True)
        print(f"[{time.monotonic() - began:5.0f}s] {stage.name}: budget {budget:.0f} s", flush=True)
        status, seconds = run_stage(stage, budget) if budget > 10 else ("skipped: no time left", 0.0)
        failed |= status != "ok"
        ran.append({"name": stage.name, "seconds": seconds, "budget": budget, "status": status})
        print(f"[{time.monotonic() - began:5.0f}s] {stage.name}: {status} in {seconds:.0f} s", flush=True)
    total = time.monotonic() - began
    run = {"stages": ran, "total_seconds": total, "command": "make bench",
           "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    (args.results / "run.json").write_text(json.dumps(run, indent=1))
    code = subprocess.call([sys.executable, str(HERE / "report.py"), "--results", str(args.results),
                            "--out", str(args.report)], cwd=ROOT)
    print(f"[{time.monotonic() - began:5.0f}s] all benchmarks done in {time.monotonic() - began:.0f} s "
          f"(stages {total:.0f} s); report: {args.report}", flush=True)
    return 1 if failed or code else 0


if __name__ == "__main__":
    sys.exit(main())
