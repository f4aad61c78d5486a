"""The cheater run: what three dishonest peers do to a swarm, with and without ``--aggregation centered-clip``.

    python scripts/cheaters.py [--honest 3] [--task digits-mlp] [--max-epochs N] [--quick] [-- JOIN FLAGS...]

Three local swarms on 127.0.0.1, one after the other, each through ``local_swarm.run_swarm``:

1. clean: ``honest + 3`` honest peers, weighted mean;
2. attacked, mean: ``honest`` honest peers plus one sending its gradients x100, one sending them
   sign-flipped, one claiming 10x the samples it processed (``scripts/byzantine_peer.py``);
3. attacked, centered-clip: the same peers, every peer running ``--aggregation centered-clip``.

Reported per run: the honest peers' mean final test accuracy, and what ``p2ptrain ledger fairness`` says
on an honest peer's ledger (the flagged peers and why). Writes ``docs/bench/cheaters.json``.
``--quick`` runs 2 epochs per swarm: a smoke test of this script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import SwarmError, run_swarm  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parent.parent
BYZANTINE = str(Path(__file__).resolve().parent / "byzantine_peer.py")
ATTACKS = ("scale", "flip", "inflate")
DEFAULT_OUT = ROOT / "docs" / "bench" / "cheaters.json"


def command_for(honest: int, attacked: bool):
    """Trainers 1..honest run p2ptrain; the next three run one attack each (when ``attacked``)."""
    def command(i: int) -> list[str]:
        if not attacked or i <= honest:
            return ["-m", "p2ptrain"]
        return [BYZANTINE, "--attack", ATTACKS[i - honest - 1]]
    return command


def ledger_findings(ledger: str) -> dict:
    """``p2ptrain ledger fairness`` on one ledger file: flagged peer names and their flags."""
    done = subprocess.run([sys.executable, "-m", "p2ptrain", "ledger", "fairness", "--ledger", ledger, "--json"],
                          capture_output=True, text=True, timeout=120)
    if not done.stdout.strip():
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    report = json.loads(done.stdout)
    return {"flagged": {p["name"]: p["flags"] for p in report["peers"] if p["flags"]}, "gini": report.get("gini")}


def run_case(name: str, *, honest: int, attacked: bool, aggregation: str, task: str, max_epochs: int | None,
             join_args: Sequence[str], console: Console, keep: Path | None = None) -> dict:
    console.print(f"[bold]{name}[/]: {honest if attacked else honest + 3} honest peers"
                  + (", 1 sending x100, 1 sign-flipped, 1 claiming 10x" if attacked else "")
                  + f", aggregation {aggregation}")
    begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="p2ptrain-cheaters-") as scratch:  # kept until the audit has run
        workdir = keep / name.replace(", ", "-") if keep else Path(scratch)
        result = run_swarm(peers=honest + 3, task=task, max_epochs=max_epochs, timeout=900, console=console,
                           workdir=workdir, join_args=[*join_args, "--aggregation", aggregation],
                           command=command_for(honest, attacked))
        honest_peers = result.peers[:honest] if attacked else result.peers
        ledger = ledger_findings(honest_peers[0].ledger) if honest_peers[0].ledger else {"error": "no ledger"}
    accuracies = [p.accuracy for p in honest_peers if p.accuracy is not None]
    attackers = {p.name: attack for p, attack in zip(result.peers[honest:], ATTACKS)} if attacked else {}
    case = {"case": name, "aggregation": aggregation, "attacked": attacked, "epochs": result.epochs,
            "honest_accuracy": round(sum(accuracies) / len(accuracies), 4) if accuracies else None,
            "attackers": attackers, "rejected_parts": sum(p.rejected_parts for p in result.peers),
            "ledger": ledger, "wall_seconds": round(time.monotonic() - begin, 1)}
    console.print(f"  honest peers' accuracy {case['honest_accuracy']}, flagged: {ledger}")
    return case


def render(cases: list[dict], console: Console) -> None:
    table = Table(title="cheater run", title_justify="left", box=None)
    for column in ("case", "honest accuracy", "epochs", "flagged by the ledger audit", "wall"):
        table.add_column(column, justify="left" if column in ("case", "flagged by the ledger audit") else "right")
    for case in cases:
        flagged = case["ledger"].get("flagged", {})
        roles = case["attackers"]
        text = "; ".join(f"{roles.get(peer, 'honest')} peer {peer}: {', '.join(flags)}"
                         for peer, flags in flagged.items()) or case["ledger"].get("error", "none")
        accuracy = case["honest_accuracy"]
        table.add_row(case["case"], "n/a" if accuracy is None else f"{accuracy:.4f}", str(case["epochs"]), text,
                      f"{case['wall_seconds']:.0f} s")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest", type=int, default=3, help="honest peers in the attacked swarms (default 3)")
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--max-epochs", type=int, help="global epochs per swarm (default: the task's)")
    parser.add_argument("--quick", action="store_true", help="2 epochs per swarm: checks the script, measures nothing")
    parser.add_argument("--only", choices=("clean", "mean", "centered-clip"), help="run one of the three cases")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each swarm's keys, logs and ledgers under DIR")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    parser.add_argument("join_args", nargs="*", help="after --: flags for every p2ptrain join")
    args = parser.parse_args(argv)
    console = Console(stderr=True, highlight=False)
    max_epochs = 2 if args.quick else args.max_epochs
    cases = []
    try:
        for key, name, attacked, aggregation in (("clean", "clean, mean", False, "mean"),
                                                 ("mean", "attacked, mean", True, "mean"),
                                                 ("centered-clip", "attacked, centered-clip", True, "centered-clip")):
            if args.only in (None, key):
                cases.append(run_case(name, honest=args.honest, attacked=attacked, aggregation=aggregation,
                                      task=args.task, max_epochs=max_epochs, join_args=args.join_args,
                                      console=console, keep=args.keep))
    except SwarmError as e:
        e.show(console, lines=15)
        return 1
    render(cases, console)
    report = {"task": args.task, "honest": args.honest, "join_args": args.join_args, "quick": args.quick,
              "command": " ".join(["python scripts/cheaters.py", *(argv if argv is not None else sys.argv[1:])]),
              "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
