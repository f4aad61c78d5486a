"""The training comparison under wide-area links: a 2-peer p2ptrain swarm against 2-process gloo DDP.

    sudo .venv/bin/python scripts/wan/train.py [--rtt-ms 100] [--rate-mbit 50] [--task fashion-mlp]
        [--target 0.88] [--time-limit 1200] [--only swarm|ddp] [--out docs/bench/wan.json] [-- JOIN FLAGS...]

One topology (harness.py: two peer namespaces behind RTT/rate links) serves every run; it is measured first
(selfcheck, a few seconds). Then:

swarm  a ``p2ptrain bootstrap`` and trainer 0 in peer namespace 0, trainer 1 in peer namespace 1, each
       ``p2ptrain join --task T --torch-threads 1 --min-peers 2 --stop-at-accuracy TARGET --json`` listening
       on its namespace's address; flags after ``--`` go to both joins (``--compression fp16``,
       ``--local-updates``...). Its time to target is the later of the two peers' ``time_to_accuracy``
       (training seconds, their test-set checks left out), utilisation their mean compute/training seconds.
ddp    ``scripts/bench/ddp_train.py``, rank i in peer namespace i, gloo over the same links (MASTER_ADDR is
       peer 0's address, GLOO_SOCKET_IFNAME its veth). ``--ddp-args`` adds flags. It is told to stop
       training after 0.75 * ``--time-limit`` - 30 s (its own clock, which leaves start-up and its test-set
       checks out), so that it reports before the hard limit. Besides its own figures the record carries
       the communication lower bound the link model puts on one step: bytes_per_step through RATE plus one
       RTT (a 2-rank ring all-reduce sends and receives the gradient once per rank, in two latency-bound
       phases).

Each record is one flat row (for scripts/bench/report.py); ``link_mb_up``/``link_mb_down`` are the MB each
peer sent and received through its link during the run: the evidence that its traffic crossed the links.

Every run is bounded by ``--time-limit`` wall seconds from its first process (swarm peers then get SIGINT
and up to 30 s to print their summaries; DDP ranks still running 30 s later are killed). Results are merged
into ``--out``: a run replaces an earlier one with the same kind, task, target, link and flags; others are
kept, so a run per mode builds up one table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Link, Topology, WanError, add_link_args, link_from, selfcheck

ROOT = Path(__file__).resolve().parents[2]
DDP_SCRIPT = ROOT / "scripts" / "bench" / "ddp_train.py"
JOIN_LINE = re.compile(r"p2ptrain join --initial-peers (\S+)")
EPOCH_LINE = re.compile(r"epoch \d+: loss \S+, last round with \d+ peers")
GRACE = 30.0  # after SIGINT at the time limit: a peer finishes its step, checkpoints and prints its summary
STARTUP = 120.0  # bootstrap address, --join-timeout: importing torch + hivemind is slow on shared cores
DDP_PORT = 29500
DDP_SLACK = (0.75, 30.0)  # DDP trains at most 0.75 * limit - 30 s: its clock leaves start-up and tests out
PROGRESS_EVERY = 30.0
LABELS = {"swarm": "p2ptrain, 2-peer swarm", "ddp": "DDP, 2 ranks (gloo)"}
LINK_MODEL = ("each peer in its own network namespace behind a router namespace; RTT added by a user-space "
              "delay line on a TUN device (RTT/2 each way), rate by tbf on each peer's upload and download")


class RunFailed(Exception):
    """One training run failed; the others still run. ``str(e)`` is one line."""


# ---- processes in the namespaces -----------------------------------------------------------------------


class Proc:
    """A command in peer namespace ``i`` with stdout and stderr in files under ``logs``."""

    def __init__(self, topo: Topology, i: int, label: str, argv: list[str], logs: Path, env: dict[str, str]):
        self.label, self.out, self.err = label, logs / f"{label}.out", logs / f"{label}.log"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = topo.popen(i, argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env={**topo.env(i), **env, "PYTHONUNBUFFERED": "1", "COLUMNS": "250"})

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def summary(self) -> dict | None:
        """The last JSON object the process printed on stdout."""
        for line in reversed(self.stdout().splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
        return None

    def last_line(self) -> str:
        lines = self.err.read_text(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""

    def last_match(self, pattern: re.Pattern) -> str:
        matches = pattern.findall(self.err.read_text(errors="replace"))
        return matches[-1] if matches else ""

    def failure(self) -> str:
        return f"{self.label} exited with code {self.proc.returncode}: {self.last_line() or 'no output'} " \
               f"(log: {self.err})"


def wait_all(procs: list[Proc], deadline: float, progress) -> bool:
    """Wait until every process has exited (True) or ``deadline`` passes (False); raise on a failure."""
    next_progress = time.monotonic() + PROGRESS_EVERY
    while any(p.proc.poll() is None for p in procs):
        for p in procs:
            if p.proc.poll() not in (None, 0):
                raise RunFailed(p.failure())
        if time.monotonic() > deadline:
            return False
        if time.monotonic() > next_progress:
            progress()
            next_progress += PROGRESS_EVERY
        time.sleep(0.5)
    for p in procs:
        if p.proc.returncode != 0:
            raise RunFailed(p.failure())
    return True


def interrupt(procs: list[Proc]) -> None:
    """SIGINT each process still running and give them GRACE seconds together to leave."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGINT)
    end = time.monotonic() + GRACE
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


# ---- the two runs --------------------------------------------------------------------------------------


def run_swarm(topo: Topology, args: argparse.Namespace, join_flags: list[str], work: Path, say) -> dict:
    keys, env = work / "keys", {"P2PTRAIN_HOME": str(work / "home")}
    keys.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.time_limit
    p2ptrain = [sys.executable, "-m", "p2ptrain"]
    listen = [["--host-maddrs", f"/ip4/{topo.address(i)}/tcp/0"] for i in range(topo.n)]
    boot = Proc(topo, 0, "bootstrap", [*p2ptrain, "bootstrap", *listen[0], "--identity", str(keys / "bootstrap.key"),
                                       "--log-format", "plain"], work / "logs", env)
    address = _wait_for(boot, JOIN_LINE, min(deadline, started + STARTUP))
    trainers = [Proc(topo, i, f"trainer{i}", [
        *p2ptrain, "join", "--initial-peers", address, *listen[i], "--identity", str(keys / f"trainer{i}.key"),
        "--task", args.task, "--torch-threads", "1", "--min-peers", "2", "--join-timeout", f"{STARTUP:g}",
        "--stop-at-accuracy", str(args.target), "--log-format", "plain", "--json", *join_flags], work / "logs", env)
        for i in range(2)]

    def progress():
        epochs = ", ".join(f"{t.label}: {t.last_match(EPOCH_LINE) or 'starting'}" for t in trainers)
        say(f"[{time.monotonic() - started:5.0f}s] swarm {epochs}")

    finished = wait_all(trainers, deadline, progress)
    if not finished:
        say(f"swarm: time limit of {args.time_limit:g} s reached; stopping the peers")
        interrupt(trainers)
    wall = time.monotonic() - started
    summaries = [t.summary() for t in trainers]
    if None in summaries:
        missing = trainers[summaries.index(None)]
        raise RunFailed(f"{missing.label} left no JSON summary: {missing.last_line() or 'no output'} "
                        f"(log: {missing.err})")
    return swarm_record(summaries, wall, finished)


def swarm_record(summaries: list[dict], wall: float, finished: bool) -> dict:
    """One flat row from the two peers' ``--json`` summaries."""
    reached = [s.get("time_to_accuracy") for s in summaries]
    return {"time_to_target": _round(max(reached)) if None not in reached else None, "reached": None not in reached,
            "utilisation": _round(_mean([s["compute_seconds"] / s["training_seconds"] for s in summaries
                                         if s.get("training_seconds")]), 3),
            "final_accuracy": _round(_mean([s["accuracy"] for s in summaries if s.get("accuracy") is not None]), 4),
            "training_seconds": _round(max(s.get("training_seconds", 0.0) for s in summaries)),
            "eval_seconds": _round(max(s.get("eval_seconds", 0.0) for s in summaries)),
            "wall_seconds": _round(wall), "stopped_at_limit": not finished,
            "epochs": max(s.get("epoch", 0) for s in summaries),
            "rounds_averaged": [f"{s.get('rounds_averaged')}/{s.get('rounds')}" for s in summaries]}


def run_ddp(topo: Topology, args: argparse.Namespace, work: Path, say) -> dict:
    if not DDP_SCRIPT.exists():
        raise RunFailed(f"{DDP_SCRIPT.relative_to(ROOT)} does not exist")
    started = time.monotonic()
    argv = [sys.executable, str(DDP_SCRIPT), "--task", args.task, "--target", str(args.target),
            "--time-limit", f"{max(10.0, DDP_SLACK[0] * args.time_limit - DDP_SLACK[1]):g}", "--threads", "1",
            *shlex.split(args.ddp_args)]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": topo.address(0), "MASTER_PORT": str(DDP_PORT),
           "GLOO_SOCKET_IFNAME": "eth0"}
    ranks = [Proc(topo, i, f"ddp-rank{i}", argv, work / "logs", {**env, "RANK": str(i)}) for i in range(2)]
    progress = lambda: say(f"[{time.monotonic() - started:5.0f}s] ddp running")
    if not wait_all(ranks, started + args.time_limit + GRACE, progress):
        raise RunFailed(f"DDP did not finish within --time-limit {args.time_limit:g} s (log: {ranks[0].err})")
    result = ranks[0].summary()
    if result is None:
        raise RunFailed(f"DDP rank 0 printed no JSON summary (log: {ranks[0].err})")
    return ddp_record(result, time.monotonic() - started, topo.link)


def ddp_record(result: dict, wall: float, link: Link) -> dict:
    """One flat row from rank 0's JSON, with the link model's bound on its communication."""
    per_step = comm_lower_bound(result["bytes_per_step"], link)
    return {"time_to_target": _round(result.get("time_to_target")), "reached": result.get("reached"),
            "utilisation": _round(result.get("utilisation"), 3), "final_accuracy": result.get("final_accuracy"),
            "training_seconds": _round(result.get("wall_seconds")), "eval_seconds": _round(result.get("eval_seconds")),
            "wall_seconds": _round(wall), "stopped_at_limit": not result.get("reached"), "steps": result.get("steps"),
            "bytes_per_step": result["bytes_per_step"], "comm_lower_bound_seconds_per_step": round(per_step, 3),
            "comm_lower_bound_seconds": round(per_step * result.get("steps", 0), 1)}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def comm_lower_bound(bytes_per_step: int, link: Link) -> float:
    """Seconds one 2-rank all-reduce step needs at least: the gradient through the rate plus one RTT."""
    return bytes_per_step * 8 / (link.rate_mbit * 1e6) + link.rtt_ms / 1000


def _wait_for(proc: Proc, pattern: re.Pattern, deadline: float) -> str:
    while time.monotonic() < deadline:
        if m := pattern.search(proc.stdout()):
            return m.group(1)
        if proc.proc.poll() is not None:
            raise RunFailed(proc.failure())
        time.sleep(0.2)
    raise RunFailed(f"{proc.label} printed no address in time (log: {proc.err})")


# ---- results -------------------------------------------------------------------------------------------


def merge(out: Path, check: dict, runs: list[dict]) -> dict:
    """Add ``runs`` to the results in ``out``, replacing runs of the same configuration."""
    data = json.loads(out.read_text()) if out.exists() else {}
    keep = [r for r in data.get("runs", []) if _key(r) not in {_key(run) for run in runs}]
    data.update(benchmark="wan", link_model=LINK_MODEL, selfcheck=check, runs=keep + runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _key(run: dict) -> tuple:
    return run["kind"], run["task"], run["target"], run["rtt_ms"], run["rate_mbit"], run["mtu"], run["flags"]


def table(data: dict) -> Table:
    t = Table(title="training under WAN links (2 peers)", title_justify="left")
    for column in ("run", "link", "flags", "time to target", "utilisation", "final accuracy", "wall"):
        t.add_column(column, justify="left" if column in ("run", "link", "flags") else "right")
    for r in data["runs"]:
        link = f"{r['rtt_ms']:g} ms / {r['rate_mbit']:g} Mbit"
        reached = f"{r['time_to_target']:.0f} s" if r.get("time_to_target") is not None else "not reached"
        wall = f"{r['wall_seconds']:.0f} s" if "wall_seconds" in r else "failed"
        t.add_row(r["kind"], link, r["flags"] or "-", reached, _pct(r.get("utilisation")),
                  _num(r.get("final_accuracy")), wall)
    return t


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ---- command line --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="2-peer swarm vs 2-process DDP under emulated WAN links. "
                                            "Flags after `--` go to both `p2ptrain join`.")
    add_link_args(p)
    p.add_argument("--task", default="fashion-mlp", help="task to train (default: fashion-mlp)")
    p.add_argument("--target", type=float, default=0.88, help="test accuracy to reach (default: 0.88)")
    # 480 s was too short on the 2 shared cores: DDP needed 636 s of wall time to 0.88 at load 21
    p.add_argument("--time-limit", type=float, default=1200.0, help="wall seconds per training run (default: 1200)")
    p.add_argument("--only", choices=("swarm", "ddp"), help="run one side only")
    p.add_argument("--ddp-args", default="", help="extra flags for ddp_train.py, one shell-quoted string")
    p.add_argument("--selfcheck-seconds", type=float, default=5.0, help="bulk seconds of the link check (5)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "wan.json", help="results JSON")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, keys, checkpoints)")
    return p


def run_one(kind: str, topo: Topology, args: argparse.Namespace, join_flags: list[str], work: Path, say) -> dict:
    flags = shlex.join(join_flags if kind == "swarm" else shlex.split(args.ddp_args))
    head = {"label": LABELS[kind], "kind": kind, "task": args.task, "target": args.target, "flags": flags,
            "rtt_ms": topo.link.rtt_ms, "rate_mbit": topo.link.rate_mbit, "mtu": topo.link.mtu,
            "time_limit": args.time_limit, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
    say(f"{kind}: starting ({flags or 'default flags'})")
    before = topo.traffic()
    try:
        body = run_swarm(topo, args, join_flags, work, say) if kind == "swarm" else run_ddp(topo, args, work, say)
    except RunFailed as e:
        say(f"[red]{kind} failed:[/] {e}")
        return {**head, "error": str(e)}
    # what actually crossed the emulated links: evidence that the run's traffic went through them
    after = topo.traffic()
    return {**head, **body, **{f"link_mb_{way}": [round((a[way] - b[way]) / 1e6, 1) for b, a in zip(before, after)]
                               for way in ("up", "down")}}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    join_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    err = Console(stderr=True, highlight=False)
    say = lambda text: err.print(text, soft_wrap=True)
    if args.time_limit <= 0 or not 0 < args.target <= 1:
        say("[red]error:[/] --time-limit must be positive and --target in (0, 1]")
        return 2
    work = Path(tempfile.mkdtemp(prefix="p2pw-train-"))
    (work / "logs").mkdir()
    runs: list[dict] = []
    try:
        with Topology(2, link_from(args)) as topo:
            say(f"topology {topo.token} up: peers at {topo.address(0)} and {topo.address(1)}")
            check = selfcheck(topo, pings=20, seconds=args.selfcheck_seconds)
            for line in check.lines():
                say(line)
            for kind in [args.only] if args.only else ["swarm", "ddp"]:
                runs.append(run_one(kind, topo, args, join_flags, work, say))
                data = merge(args.out, check.to_dict(), runs[-1:])  # now: an interrupted comparison keeps it
                topo.sweep()  # nothing of one run may linger into the next
    except WanError as e:
        say(f"[red]error:[/] {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted: namespaces and processes removed" + (f"; finished runs are in {args.out}" if runs else ""))
        return 130
    finally:
        failed = any("error" in r for r in runs)
        if args.keep or failed:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    out.print(table(data))
    for r in data["runs"]:
        if "error" in r:
            out.print(f"{r['kind']} {r['flags']}: {r['error']}", soft_wrap=True)
    say(f"results in {args.out}")
    return 1 if any("error" in r for r in runs) or not (check.rtt_ok and check.rate_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
