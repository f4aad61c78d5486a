"""Resident memory of a running ``p2ptrain join`` peer: its Python process, hivemind's worker processes, p2pd.

    python scripts/bench/memory.py [--task digits-mlp] [--peers 2] [--epochs 15] [--json] [--out FILE]

Starts a local swarm (``local_swarm.Swarm``: a bootstrap and ``--peers`` trainers on 127.0.0.1, one torch
thread each), samples every trainer's process tree with psutil every ``--every`` seconds while it trains,
and reports per component the peak over the run, averaged over the trainers:

- ``python``: the ``p2ptrain join`` process itself (model, optimizer, data set, hivemind's host side);
- ``workers``: the Python processes hivemind forks (the DHT and the two averagers);
- ``p2pd``: the libp2p daemon(s).

RSS counts pages shared with the parent again in every forked worker, so the sum of RSS overstates what the
peer costs; PSS (each shared page split among the processes that share it) sums correctly and is the total
to read. ``training.py`` uses :class:`MemorySampler` on its 2-peer fashion-mlp swarm for the figures in
docs/BENCHMARKS.md; run this script alone for a quick look at any task.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import Swarm, SwarmError

COMPONENTS = ("python", "workers", "p2pd")
MB = 1024 * 1024


def component_of(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "python"
    try:
        return "p2pd" if "p2pd" in proc.name() else "workers"
    except psutil.Error:
        return "workers"


def sample_tree(root_pid: int) -> dict[str, dict[str, float]]:
    """RSS and PSS in MiB of one peer's process tree, summed per component (processes that vanish are skipped)."""
    totals = {c: {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0} for c in COMPONENTS}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return totals
    for proc in procs:
        try:
            info = proc.memory_full_info()  # reads smaps: PSS as well as RSS
        except psutil.AccessDenied:
            info = None
        except psutil.Error:
            continue
        try:
            rss = info.rss if info else proc.memory_info().rss
        except psutil.Error:
            continue
        part = totals[component_of(proc, root_pid)]
        part["rss_mb"] += rss / MB
        part["pss_mb"] += (getattr(info, "pss", rss) if info else rss) / MB
        part["processes"] += 1
    return totals


class MemorySampler:
    """Keeps each peer's peak per component; call :meth:`sample` now and then while the peers run."""

    def __init__(self, every: float = 2.0):
        self.every, self._last = every, 0.0
        self.peaks: dict[int, dict[str, dict[str, float]]] = {}
        self.samples = 0

    def sample(self, pids: list[int], force: bool = False) -> None:
        if not pids or (not force and time.monotonic() - self._last < self.every):
            return  # no trainer running yet: an empty sample would count without measuring anything
        self._last = time.monotonic()
        self.samples += 1
        for pid in pids:
            now, peak = sample_tree(pid), self.peaks.setdefault(pid, {})
            for component, values in now.items():
                best = peak.setdefault(component, dict(values))
                for key, value in values.items():
                    best[key] = max(best[key], value)
            total = {k: sum(now[c][k] for c in COMPONENTS) for k in ("rss_mb", "pss_mb", "processes")}
            best = peak.setdefault("total", dict(total))
            for key, value in total.items():
                best[key] = max(best[key], value)

    def summary(self) -> dict:
        """Per component (and total): the peak, averaged over the peers; plus each peer's own peaks."""
        peers = list(self.peaks.values())
        mean = {c: {k: round(sum(p[c][k] for p in peers) / len(peers), 1) for k in ("rss_mb", "pss_mb", "processes")}
                for c in (*COMPONENTS, "total")} if peers else {}
        return {"samples": self.samples, "peers": len(peers), "per_peer_mean_of_peaks": mean,
                "per_peer": [{c: {k: round(v, 1) for k, v in p[c].items()} for c in p} for p in peers]}


def run(task: str, peers: int, epochs: int, every: float, timeout: float, join_args: list[str]) -> dict:
    sampler = MemorySampler(every)
    with tempfile.TemporaryDirectory(prefix="p2ptrain-bench-memory-") as tmp, \
            Swarm(peers=peers, task=task, max_epochs=epochs, workdir=Path(tmp),
                  join_args=["--torch-threads", "1", *join_args]) as swarm:
        deadline = time.monotonic() + timeout
        swarm.start(deadline)
        swarm.wait(deadline, on_tick=lambda: sampler.sample(
            [p.pid for p in swarm.trainers if p.proc.poll() is None and p.epoch is not None]))
    return {"benchmark": "memory", "task": task, "peers": peers, "epochs": epochs, **sampler.summary()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp", help="task the swarm trains (digits-mlp)")
    p.add_argument("--peers", type=int, default=2, help="trainers (2)")
    p.add_argument("--epochs", type=int, default=15, help="global epochs to train (15)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between samples (2)")
    p.add_argument("--timeout", type=float, default=300.0, help="limit for the whole run in seconds (300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args, join_args = p.parse_known_args(argv)
    try:
        result = run(args.task, args.peers, args.epochs, args.every, args.timeout, join_args)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["command"] = "python scripts/bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        for component, v in result["per_peer_mean_of_peaks"].items():
            print(f"{component:8s} RSS {v['rss_mb']:7.1f} MiB  PSS {v['pss_mb']:7.1f} MiB  ({v['processes']:.0f} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
