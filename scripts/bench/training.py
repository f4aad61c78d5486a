"""Time to a test accuracy and compute utilisation: 1 p2ptrain peer, a 2-peer swarm, and gloo DDP.

    python scripts/bench/training.py [--task fashion-mlp] [--target 0.88] [--budget 420] [--json] [--out FILE]
        [--memory-out FILE] [--rows ddp one swarm swarm-local swarm-accum swarm-fp16 swarm-8bit]

Rows, run one after the other, each on 127.0.0.1 with one torch thread per process:

- ``ddp``: ``ddp_train.py --nproc 2``, gloo DDP with the swarm's micro-batch, optimizer and learning rate and
  the global batch that matches the task's mode (see ddp_train.py);
- ``one``: one ``p2ptrain join`` peer (plus a bootstrap DHT peer), the task's defaults;
- ``swarm``: two ``p2ptrain join`` peers, the task's defaults (``local_swarm.Swarm``: real processes);
- optional, when the budget allows and p2ptrain has the flag: ``swarm-local`` / ``swarm-accum``
  (``--local-updates`` / ``--no-local-updates``, whichever is not the task's default), ``swarm-fp16`` /
  ``swarm-8bit`` (``--compression``).

The p2ptrain peers run with ``--stop-at-accuracy TARGET``: each tests its model on the full test set after
every global epoch and leaves once it reaches the target; their JSON summary gives ``time_to_accuracy``
(training seconds, evaluation excluded), ``compute_seconds`` (forward/backward), ``training_seconds``
(evaluation excluded) and the final ``accuracy``. A row's time to target is its slowest peer's; its
utilisation the peers' mean of compute / training seconds; samples, all peers together. A row that passes
its time limit is stopped (SIGINT: the peers leave cleanly and still report) and shows no time to target.
``--budget`` is split over the core rows by ``CORE`` shares (what a row leaves unused passes on); the
optional rows get what is left; rows that no longer fit are listed as skipped. With ``--memory-out``
the 2-peer swarm's process trees are sampled (``memory.py``) and the result written there.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from local_swarm import Swarm, SwarmError
from memory import MemorySampler

# name -> (label, peers, extra join flags, the join flag that must exist)
ROWS = {
    "one": ("p2ptrain, 1 peer", 1, [], None),
    "swarm": ("p2ptrain, 2-peer swarm", 2, [], None),
    "ddp": ("torch DDP (gloo), 2 processes", 2, [], None),
    "swarm-local": ("p2ptrain, 2 peers, --local-updates", 2, ["--local-updates"], "--local-updates"),
    "swarm-accum": ("p2ptrain, 2 peers, --no-local-updates", 2, ["--no-local-updates"], "--no-local-updates"),
    "swarm-fp16": ("p2ptrain, 2 peers, --compression fp16", 2, ["--compression", "fp16"], "--compression"),
    "swarm-8bit": ("p2ptrain, 2 peers, --compression 8bit", 2, ["--compression", "8bit"], "--compression"),
}
DEFAULT_ROWS = ["ddp", "one", "swarm", "swarm-local", "swarm-accum", "swarm-fp16", "swarm-8bit"]
CORE = {"ddp": 1.0, "one": 1.0, "swarm": 1.3}  # shares of the budget: fashion-mlp wall times 53, 44, 60 s (load 10)
MIN_ROW_SECONDS = 30.0  # a row given less training time than this is skipped, not started
STARTUP = {"ddp": 15.0}  # seconds to start and leave, on top of a row's training-time limit
STARTUP_ALLOWANCE = 25.0  # ... for p2ptrain rows (a bootstrap, peers, a final checkpoint)
STOP_GRACE = 30.0  # after SIGINT at the time limit, how long the peers get to leave and report


def join_flags() -> str:
    """``p2ptrain join --help``: which optional flags this p2ptrain has."""
    out = subprocess.run([sys.executable, "-m", "p2ptrain", "join", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="200"), timeout=120, check=False)
    return out.stdout


def run_swarm_row(task: str, peers: int, flags: list[str], target: float, limit: float, data_dir: str | None,
                  sampler: MemorySampler | None) -> dict:
    """``peers`` trainers until each reaches ``target`` or ``limit`` training seconds pass; their summaries."""
    join_args = ["--torch-threads", "1", "--stop-at-accuracy", str(target), *flags]
    if data_dir:
        join_args += ["--data-dir", data_dir]
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="p2ptrain-bench-training-") as tmp, \
            Swarm(peers=peers, task=task, max_epochs=None, workdir=Path(tmp), join_args=join_args) as swarm:
        swarm.start(began + STARTUP_ALLOWANCE + limit)
        stopped = _wait(swarm, began + STARTUP_ALLOWANCE + limit, sampler)
        summaries = [p.summary for p in swarm.trainers]
    if any(s is None for s in summaries):
        raise SwarmError(f"a peer left without its JSON summary ({task}, {peers} peers)")
    return _row_from_summaries(summaries, time.monotonic() - began, stopped)


def _wait(swarm: Swarm, deadline: float, sampler: MemorySampler | None) -> bool:
    """Until every trainer exits; at ``deadline`` SIGINT them (they leave and report). True if stopped so."""
    stopped = False
    while any(p.proc.poll() is None for p in swarm.trainers):
        failed = [p for p in swarm.trainers if p.proc.poll() not in (None, 0)]
        if failed:
            failed[0].close()
            raise SwarmError(f"{failed[0].display_name} exited with code {failed[0].proc.returncode}", failed[0].tail)
        if sampler is not None:
            sampler.sample([p.pid for p in swarm.trainers if p.proc.poll() is None and p.epoch is not None])
        if not stopped and time.monotonic() > deadline:
            stopped = True
            for p in swarm.trainers:
                if p.proc.poll() is None:
                    os.kill(p.pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_GRACE
        elif stopped and time.monotonic() > deadline:
            raise SwarmError("the peers did not leave within 30 s of SIGINT")
        time.sleep(0.2)
    for p in swarm.trainers:
        p.close()  # collects the final JSON line
    return stopped


def _row_from_summaries(summaries: list[dict], wall: float, stopped: bool) -> dict:
    reached = [s.get("time_to_accuracy") for s in summaries]
    utilisation = [s["compute_seconds"] / s["training_seconds"] for s in summaries if s.get("training_seconds")]
    accuracies = [s["accuracy"] for s in summaries if s.get("accuracy") is not None]
    return {"time_to_target": max(reached) if all(r is not None for r in reached) else None,
            "utilisation": sum(utilisation) / len(utilisation) if utilisation else None,
            "final_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "samples": sum(int(s.get("samples", 0)) for s in summaries),
            "epochs": max(int(s.get("epoch", 0)) for s in summaries),
            "training_seconds": max(float(s.get("training_seconds", 0)) for s in summaries),
            "eval_seconds": max(float(s.get("eval_seconds", 0) or 0) for s in summaries),
            "rounds_averaged": [f"{s.get('rounds_averaged', 0)}/{s.get('rounds', 0)}" for s in summaries],
            "wall_seconds": round(wall, 1), "stopped_at_limit": stopped}


def run_ddp_row(task: str, target: float, limit: float, data_dir: str | None) -> dict:
    argv = [sys.executable, str(HERE / "ddp_train.py"), "--nproc", "2", "--task", task, "--target", str(target),
            "--time-limit", f"{limit:.0f}", "--threads", "1"]
    if data_dir:
        argv += ["--data-dir", data_dir]
    began = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=limit * 2 + STARTUP_ALLOWANCE + 60,
                         check=False)
    if out.returncode != 0:
        raise SwarmError(f"ddp_train.py exited with code {out.returncode}", out.stderr.splitlines()[-10:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"time_to_target": r["time_to_target"], "utilisation": r["utilisation"],
            "final_accuracy": r["final_accuracy"], "samples": r["samples"], "epochs": r["steps"],
            "training_seconds": r["wall_seconds"], "eval_seconds": r["eval_seconds"],
            "bytes_per_step": r["bytes_per_step"], "wall_seconds": round(time.monotonic() - began, 1),
            "stopped_at_limit": not r["reached"]}


def ratios(rows: dict[str, dict]) -> dict:
    def tt(name):
        r = rows.get(name) or {}
        return r.get("time_to_target")

    def ratio(a, b):
        return tt(a) / tt(b) if tt(a) and tt(b) else None

    out = {"swarm_vs_one": ratio("swarm", "one"), "swarm_vs_ddp": ratio("swarm", "ddp"), "ddp_vs_one": ratio("ddp", "one")}
    one = (rows.get("one") or {}).get("final_accuracy")
    out["accuracy_minus_one"] = {name: r["final_accuracy"] - one for name, r in rows.items()
                                 if one is not None and r.get("final_accuracy") is not None}
    return out


def run(task: str, target: float, budget: float, names: list[str], data_dir: str | None,
        memory_out: Path | None, log=print, save=lambda result: None) -> dict:
    """Every row within ``budget``; ``save`` gets the result so far after each row (a stop keeps them)."""
    helptext = join_flags()
    local = _task_local_updates(task, data_dir)
    rows, skipped, began = {}, {}, time.monotonic()
    result = {"benchmark": "training", "task": task, "target": target, "budget_seconds": budget, "rows": rows,
              "skipped": skipped, "ratios": {}, "load_average": os.getloadavg()[0], "complete": False}
    sampler = MemorySampler() if memory_out else None
    for i, name in enumerate(names):
        label, peers, flags, needs = ROWS[name]
        if needs and needs not in helptext:
            skipped[name] = f"p2ptrain join has no {needs}"
            continue
        if (name == "swarm-local" and local) or (name == "swarm-accum" and not local):
            skipped[name] = "the same as the swarm row: the task's default"
            continue
        left = budget - (time.monotonic() - began)
        # core rows split what is left by their shares (time a row leaves unused passes to the next);
        # the optional rows take what the core rows left
        weights = sum(CORE.get(n, 0.0) for n in names[i:])
        share = left * CORE[name] / weights if name in CORE else left
        # a row's share may fall below the minimum when the budget is small; it may then take the minimum
        limit = min(max(share, MIN_ROW_SECONDS + STARTUP.get(name, STARTUP_ALLOWANCE)), left) \
            - STARTUP.get(name, STARTUP_ALLOWANCE)
        if limit < MIN_ROW_SECONDS:
            skipped[name] = f"not enough of the {budget:.0f} s budget left ({left:.0f} s)"
            log(f"  {label}: skipped ({skipped[name]})")
            continue
        log(f"  {label}: up to {limit:.0f} s of training ...")
        try:
            if name == "ddp":
                row = run_ddp_row(task, target, limit, data_dir)
            else:
                row = run_swarm_row(task, peers, flags, target, limit, data_dir, sampler if name == "swarm" else None)
        except SwarmError as e:
            skipped[name] = f"failed: {e}"
            log(f"  {label}: failed: {e}")
            continue
        rows[name] = {"label": label, "peers": peers, "flags": flags, **row}
        result["ratios"] = ratios(rows)
        save(result)
        if name == "swarm" and memory_out and sampler and sampler.samples:
            write_json(memory_out, {"benchmark": "memory", "task": task, "peers": 2,
                                    "source": "training.py, the 2-peer swarm row", **sampler.summary()})
        log(f"  {label}: time to {target:.0%} {_s(row['time_to_target'])}, utilisation {_pct(row['utilisation'])}, "
            f"accuracy {_pct(row['final_accuracy'], 2)}, {row['samples']} samples, wall {row['wall_seconds']:.0f} s")
    result.update(complete=True, load_average=max(result["load_average"], os.getloadavg()[0]))
    return result


def _task_local_updates(task: str, data_dir: str | None) -> bool:
    from p2ptrain.tasks import load_task

    return bool(getattr(load_task(task, data_dir), "local_updates", False))


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def _s(v):
    return "not reached" if v is None else f"{v:.1f} s"


def _pct(v, digits=0):
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="fashion-mlp", help="task (fashion-mlp)")
    p.add_argument("--data-dir", default=None, help="the task's data (the task's default)")
    p.add_argument("--target", type=float, default=0.88, help="test accuracy to reach (0.88)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all rows together (420)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS, help="rows, in this order")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--memory-out", type=Path, help="sample the 2-peer swarm's memory, write memory JSON here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through Swarm, which stops the peers
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    command = "python scripts/bench/training.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save = lambda result: write_json(args.out, dict(result, command=command))
    result = run(args.task, args.target, args.budget, args.rows, args.data_dir, args.memory_out, log, save)
    result["command"] = command
    save(result)
    if args.json:
        print(json.dumps(result))
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
