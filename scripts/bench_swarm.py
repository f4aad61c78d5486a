"""Measure how well local swarms train: the numbers behind the closing note of the swarm issue.

    python scripts/bench_swarm.py [--quick] [--json] [--tasks digits-mlp fashion-mlp]

Runs, one after the other, each case through ``local_swarm.run_swarm`` (real processes on 127.0.0.1):

- digits-mlp with 3 peers, fashion-mlp with 2 peers, one torch thread each, every other setting the task's;
- per case: wall time, global epochs, final test accuracy, and per peer the share of rounds that averaged
  with at least one other peer (rounds_averaged / rounds) and compute utilisation (forward+backward
  seconds / training wall seconds).

Training wall seconds: ``p2ptrain join --json`` does not report them yet, so they are estimated from the
arrival of the peer's epoch log lines (last minus first, plus one mean epoch for the first one). This
leaves out the wait for peers before the first step and the final checkpoint, as it should, but also
any stall inside the first epoch. A peer's own ``training_seconds`` replaces the estimate once it has one.

``--quick`` runs each case for 2 epochs: a smoke test of this script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import SwarmError, SwarmResult, run_swarm  # noqa: E402  (a sibling script, not a package)


@dataclass(frozen=True)
class Case:
    task: str
    peers: int
    join_args: tuple[str, ...] = ("--torch-threads", "1")


CASES = (Case("digits-mlp", 3), Case("fashion-mlp", 2))
QUICK_EPOCHS = 2


@dataclass(frozen=True)
class PeerMeasure:
    name: str
    epoch: int
    accuracy: float | None
    rounds: int
    rounds_averaged: int
    averaged_share: float | None  # rounds_averaged / rounds
    compute_seconds: float
    training_seconds: float | None  # estimated, see the module docstring
    utilisation: float | None  # compute_seconds / training_seconds
    samples: int


@dataclass(frozen=True)
class CaseMeasure:
    task: str
    peers: int
    wall_seconds: float
    epochs: int
    accuracy: float | None
    per_peer: tuple[PeerMeasure, ...]
    load_before: float  # 1-minute load average when the case started: these are shared machines

    @classmethod
    def of(cls, result: SwarmResult, load_before: float) -> CaseMeasure:
        peers = tuple(PeerMeasure(
            name=p.name, epoch=p.epoch, accuracy=p.accuracy, rounds=p.rounds, rounds_averaged=p.rounds_averaged,
            averaged_share=p.rounds_averaged / p.rounds if p.rounds else None,
            compute_seconds=p.compute_seconds, training_seconds=p.training_seconds,
            utilisation=p.compute_seconds / p.training_seconds if p.training_seconds else None,
            samples=p.samples) for p in result.peers)
        return cls(task=result.task, peers=len(peers), wall_seconds=result.wall_seconds, epochs=result.epochs,
                   accuracy=result.accuracy, per_peer=peers, load_before=load_before)


@dataclass(frozen=True)
class Report:
    cases: tuple[CaseMeasure, ...]

    def to_dict(self) -> dict:
        return {"cases": [asdict(c) for c in self.cases],
                "training_seconds": "estimated from each peer's epoch log lines (see bench_swarm.py)"}

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(box=None, padding=(0, 2))
        for column in ("task", "peers", "wall", "epochs", "accuracy", "averaged rounds per peer",
                       "compute utilisation per peer", "samples/epoch", "load"):
            table.add_column(column, justify="left" if column == "task" else "right", no_wrap=True)
        for c in self.cases:
            samples = sum(p.samples for p in c.per_peer)
            table.add_row(
                c.task, str(c.peers), f"{c.wall_seconds:.0f} s", str(c.epochs), _pct(c.accuracy, 1),
                " ".join(_pct(p.averaged_share, 0) for p in c.per_peer),
                " ".join(_pct(p.utilisation, 1) for p in c.per_peer),
                f"{samples / c.epochs:.0f}" if c.epochs else "n/a", f"{c.load_before:.1f}")
        yield table
        yield ("utilisation = forward+backward seconds / training wall seconds, the latter estimated from the "
               "peers' epoch log lines; samples/epoch = samples all peers computed / global epochs; "
               "load = 1-minute load average before the case")


def _pct(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


class BenchError(Exception):
    """A case failed; ``report`` holds the cases measured before it."""

    def __init__(self, error: SwarmError, report: Report):
        super().__init__(str(error))
        self.error, self.report = error, report


def bench(cases: Sequence[Case], *, max_epochs: int | None, timeout: float, console: Console) -> Report:
    measures: list[CaseMeasure] = []
    for case in cases:
        console.print(f"[bold]{case.task}[/], {case.peers} peers, join flags: {' '.join(case.join_args)}")
        load = os.getloadavg()[0]
        try:
            result = run_swarm(peers=case.peers, task=case.task, max_epochs=max_epochs, timeout=timeout,
                               join_args=case.join_args, console=console)
        except SwarmError as e:
            raise BenchError(e, Report(tuple(measures))) from e
        measures.append(CaseMeasure.of(result, load))
        time.sleep(2.0)  # let the last swarm's processes finish exiting before timing the next
    return Report(tuple(measures))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure local swarms: wall time, epochs, averaging success, "
                                            "compute utilisation, accuracy.")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per case: a smoke test, no measurement")
    p.add_argument("--json", action="store_true", help="print the raw numbers as one JSON object on stdout")
    p.add_argument("--tasks", nargs="+", choices=[c.task for c in CASES], help="only these cases")
    # fashion-mlp's 220 epochs took 15 min at load 9 on 2 shared cores: the limit only catches a hung swarm
    p.add_argument("--timeout", type=float, default=2400.0, help="limit per case in seconds (default: 2400)")
    args = p.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    cases = [c for c in CASES if not args.tasks or c.task in args.tasks]
    try:
        report = bench(cases, max_epochs=QUICK_EPOCHS if args.quick else None, timeout=args.timeout, console=err)
    except BenchError as e:
        if e.report.cases:
            err.print("measured before the failure:")
            Console(stderr=True, highlight=False, width=200).print(e.report)
        err.print(f"[red]error:[/] {e}", soft_wrap=True)
        for line in e.error.tail:
            err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted: the swarm is stopped")
        return 130
    Console(stderr=args.json, highlight=False, width=200).print(report)
    if args.json:
        print(json.dumps(report.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
