"""Chaos run: a local swarm whose trainers are SIGKILLed or restarted at random, then checked end to end.

    python scripts/chaos.py [--peers 4] [--duration 120] [--interval 8] [--seed 0]
                            [--max-epochs 100] [--time-limit 380] [--out docs/bench/chaos.json] [--quick]

One bootstrap peer and ``--peers`` trainers (digits-mlp unless ``--task``) on 127.0.0.1, started with
``scripts/local_swarm.py``'s machinery. Once the swarm trains, for ``--duration`` seconds, every
``--interval`` seconds (jittered, seeded by ``--seed``) a random trainer is either

- **killed**: SIGKILL to its whole process group and to every descendant (the DHT process and its p2pd
  live in a group of their own), as a power cut would; it is relaunched at once (``--resume`` from its
  last periodic checkpoint when it has one, else fresh: it then downloads the swarm's state), or
- **restarted**: SIGINT, and once it has left cleanly (checkpoint written, ``leaving`` announced; or, when
  stopped while still starting, "interrupted" and exit 130) a relaunch with ``--resume``. The chaos goes on
  meanwhile; a peer that takes more than a minute to leave is SIGKILLed and counted as a failure.

Relaunched peers keep their key, hence their name, run directory and ledger (the hash chain continues).
After the chaos the swarm trains on to ``--max-epochs`` and every trainer exits. Then:

- accuracy: every last-generation trainer's final test accuracy against the task's accuracy bar;
- ledgers: ``p2ptrain ledger verify --json`` on every trainer's ledger; each must verify clean. A SIGKILL
  mid-round leaves a claim whose round never finished and records signed but never published; the
  relaunched peer repairs both before it trains (``Bookkeeper._recover``);
- leftovers: processes carrying this run's token in their environment (peers, hivemind workers, p2pd),
  counted once every peer has exited or been killed (stragglers) and again after teardown (must be 0);
- hangs: the whole run is bounded by ``--time-limit``; a trainer still running then is a hang.

The report goes to ``--out`` as JSON and to the terminal as tables. Exit status 0 when every check passed.
``--quick`` (a smoke test of this script): 2 trainers, 20 s of chaos, 50 epochs, no accuracy bar.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import (LOOPBACK, STARTUP_SECONDS, PeerProcess, Swarm, SwarmError,  # noqa: E402
                         _killpg, leftovers, psutil)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "bench" / "chaos.json"
STARTUP_INTERRUPTED = (130, -signal.SIGINT)  # `p2ptrain join` on Ctrl-C before it trains (after "interrupted")
RESTART_GRACE = 60.0  # a restarted peer's clean exit may take this long (the peer's own STOP_GRACE)
FINAL_GRACE = 30.0  # SIGINT grace for peers still running when the run ends early


@dataclass
class Action:
    at: float  # seconds since the chaos began
    kind: str  # "kill" or "restart"
    slot: int
    name: str | None
    epoch: int | None  # the victim's last logged epoch
    detail: str = ""
    relaunch: str = ""  # "resume" or "fresh"


@dataclass
class Slot:
    """One trainer position: a key (so one name and one ledger) and the processes run under it."""

    index: int
    key: Path
    process: PeerProcess | None = None
    generation: int = 0
    public_key: str | None = None
    name: str | None = None
    stopping: tuple[Action, float] | None = None  # a restart in progress: its action and its deadline


class ChaosSwarm(Swarm):
    """local_swarm's Swarm, with trainers that can be killed and relaunched one by one."""

    def __init__(self, *, peers: int, task: str, max_epochs: int, workdir: Path, join_args: Sequence[str] = ()):
        super().__init__(peers=peers, task=task, max_epochs=max_epochs, workdir=workdir, join_args=join_args)
        self.slots = [Slot(i, workdir / "keys" / f"peer-{i}.key") for i in range(1, peers + 1)]
        self.retired: list[PeerProcess] = []  # processes that were killed or restarted

    def start(self, deadline: float) -> None:
        self.start_bootstrap(deadline)
        for slot in self.slots:
            self.launch(slot, min_peers=self.n, resume=False)

    def launch(self, slot: Slot, *, min_peers: int, resume: bool) -> PeerProcess:
        slot.generation += 1
        args = ["join", "--initial-peers", self.bootstrap.join_address, "--host-maddrs", LOOPBACK,
                "--identity", str(slot.key), "--task", self.task, "--min-peers", str(min_peers),
                "--join-timeout", f"{STARTUP_SECONDS:g}", "--max-epochs", str(self.max_epochs),
                "--log-format", "plain", "--json", *(["--resume"] if resume else []), *self.join_args]
        process = self._spawn(f"peer {slot.index}", args, f"peer-{slot.index}.{slot.generation}.log")
        if slot.process is not None:
            self.trainers.remove(slot.process)
            self.retired.append(slot.process)
        slot.process = process
        self.trainers.append(process)
        return process

    def sigkill(self, process: PeerProcess) -> int:
        """SIGKILL the peer's group and every descendant (its DHT process and p2pd left the group)."""
        victims = []
        try:
            root = psutil.Process(process.pid)
            victims = [root, *root.children(recursive=True)]
        except psutil.Error:
            pass
        _killpg(process.pid)
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        process.proc.wait()
        psutil.wait_procs(victims, timeout=10)
        process.close()
        return len(victims)

    def interrupt(self, process: PeerProcess, timeout: float) -> int | None:
        """SIGINT (what Ctrl-C does to the peer), wait for its exit; the exit code or None if it hung."""
        self._track_descendants()
        try:
            os.kill(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            code = process.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        _killpg(process.pid)  # whatever of its group is left (nothing, after a clean exit)
        if code is None:
            self.sigkill(process)
        process.close()
        return code

    def all_processes(self) -> list[PeerProcess]:
        return [*self.retired, *self._processes()]


def _checkpoint_exists(home: Path, name: str | None) -> bool:
    return name is not None and (home / "runs" / "p2ptrain" / name / "checkpoint" / "meta.json").exists()


def _identity(key: Path) -> tuple[str, str] | None:
    """(name, public key hex) of a key file, once the peer has created it."""
    from p2ptrain.identity import Identity

    try:
        identity = Identity.load(key)
    except Exception:
        return None
    return identity.name, identity.public_key.hex()


def verify_ledger(path: Path) -> dict:
    """``p2ptrain ledger verify --json --ledger PATH``, parsed."""
    done = subprocess.run([sys.executable, "-m", "p2ptrain", "ledger", "verify", "--json", "--ledger", str(path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"ok": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1], "problems": []}


def run_chaos(*, peers: int = 4, task: str = "digits-mlp", duration: float = 120.0, interval: float = 8.0,
              seed: int = 0, max_epochs: int = 100, time_limit: float = 380.0, accuracy_bar: float | None = -1.0,
              kill_share: float = 0.5, workdir: Path | None = None, keep: bool = False,
              console: Console | None = None) -> dict:
    """Run the chaos swarm and return the report (see the module docstring). ``accuracy_bar=-1``: the task's."""
    console = console or Console(stderr=True, highlight=False)
    begin = time.monotonic()
    hard_deadline = begin + time_limit
    rng = random.Random(seed)
    if accuracy_bar is not None and accuracy_bar < 0:
        from p2ptrain.tasks import load_task

        accuracy_bar = load_task(task).accuracy_bar
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="p2ptrain-chaos-")) if own_dir else Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    actions: list[Action] = []
    report: dict = {"config": {"peers": peers, "task": task, "duration": duration, "interval": interval, "seed": seed,
                               "max_epochs": max_epochs, "time_limit": time_limit, "accuracy_bar": accuracy_bar,
                               "kill_share": kill_share}}
    hung: list[str] = []
    problems_seen: list[str] = []

    def say(text: str) -> None:
        console.print(f"[{time.monotonic() - begin:6.1f}s] {text}", markup=False, highlight=False, soft_wrap=True)

    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    swarm = ChaosSwarm(peers=peers, task=task, max_epochs=max_epochs, workdir=workdir)
    try:
        swarm.start(hard_deadline)
        say(f"bootstrap up at {swarm.bootstrap.join_address}; {peers} trainers starting")
        # the chaos starts once every trainer has logged its first epoch: the swarm really trains
        while not all(s.process.epoch for s in swarm.slots):
            _check_alive(swarm, problems_seen)
            if time.monotonic() > begin + STARTUP_SECONDS + 60:
                raise SwarmError("the trainers did not start training in time",
                                 [line for s in swarm.slots for line in list(s.process.tail)[-5:]])
            time.sleep(0.2)
        for slot in swarm.slots:
            slot.name, slot.public_key = _identity(slot.key) or (None, None)
        chaos_start = time.monotonic()
        say(f"swarm training (epoch {max(s.process.epoch or 0 for s in swarm.slots)}); chaos for {duration:g}s")
        next_action = chaos_start + interval * rng.uniform(0.5, 1.5)
        first_two = rng.sample(["kill", "restart"], 2)  # both kinds happen even in a short run
        while time.monotonic() < chaos_start + duration:
            swarm._track_descendants()
            _finish_restarts(swarm, home, say, problems_seen)
            _check_alive(swarm, problems_seen, say)
            if any(s.process.proc.poll() == 0 for s in swarm.slots if s.stopping is None):
                say("a trainer reached --max-epochs: the chaos ends early")
                break
            if time.monotonic() < next_action:
                time.sleep(0.2)
                continue
            # victims: trainers that are in the swarm (printed their address); a peer still starting is spared
            candidates = [s for s in swarm.slots
                          if s.stopping is None and s.process.proc.poll() is None and s.process.join_address]
            if candidates:
                slot = rng.choice(candidates)
                kind = "kill" if rng.random() < kill_share else "restart"
                if len(actions) < 2:
                    kind = first_two[len(actions)]
                _do(swarm, slot, kind, rng, actions, chaos_start, home, say, problems_seen)
            next_action = time.monotonic() + interval * rng.uniform(0.5, 1.5)
        chaos_seconds = time.monotonic() - chaos_start
        say(f"chaos over after {chaos_seconds:.0f}s: {sum(a.kind == 'kill' for a in actions)} kills, "
            f"{sum(a.kind == 'restart' for a in actions)} restarts; training on to epoch {max_epochs}")

        # the end: every current trainer must finish on its own, before the hard deadline
        last_line = 0.0
        while any(s.stopping is not None or s.process.proc.poll() is None for s in swarm.slots):
            swarm._track_descendants()
            _finish_restarts(swarm, home, say, problems_seen)
            _check_alive(swarm, problems_seen, say)
            if time.monotonic() > hard_deadline - FINAL_GRACE - 10:
                hung = [f"{s.process.display_name} (epoch {s.process.epoch})" for s in swarm.slots
                        if s.process.proc.poll() is None]
                say(f"time limit: still running: {', '.join(hung)}")
                break
            if time.monotonic() - last_line > 10:
                last_line = time.monotonic()
                say("epochs " + ", ".join(f"{s.process.display_name} e{s.process.epoch or 0}" for s in swarm.slots))
            time.sleep(0.5)
        running = [s.process for s in swarm.slots if s.process.proc.poll() is None]
        for process in running:
            os.kill(process.pid, signal.SIGINT)
        grace_end = time.monotonic() + FINAL_GRACE
        for process in running:
            try:
                process.proc.wait(max(0.1, grace_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                swarm.sigkill(process)
        for slot in swarm.slots:
            slot.process.close()
        wall_training = time.monotonic() - begin

        # leftovers once every peer is gone, before the teardown's sweep would hide them
        if swarm.bootstrap.proc.poll() is None:
            swarm.interrupt(swarm.bootstrap, FINAL_GRACE)
        for process in swarm.all_processes():
            _killpg(process.pid)  # each peer's own group, as any launcher would
        time.sleep(1.0)
        stragglers = _describe(leftovers(swarm.token))
    except KeyboardInterrupt:
        report["interrupted"] = True
        raise
    finally:
        swarm.stop()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_sigterm)
    after_teardown = _describe(leftovers(swarm.token))

    # accuracy: the last generation of every slot
    finals = []
    for slot in swarm.slots:
        p, s = slot.process, slot.process.summary or {}
        finals.append({"slot": slot.index, "name": s.get("name", slot.name), "generation": slot.generation,
                       "exit_code": p.proc.returncode, "epoch": s.get("epoch"), "accuracy": s.get("accuracy"),
                       "interrupted": s.get("interrupted"), "rounds": s.get("rounds"),
                       "rounds_averaged": s.get("rounds_averaged"), "ledger_clean_at_exit": s.get("ledger_clean")})
    accuracies = [f["accuracy"] for f in finals if f["accuracy"] is not None]
    finished = all(f["exit_code"] == 0 and f["epoch"] == max_epochs and not f["interrupted"] for f in finals)

    # ledgers: one per slot (a relaunched peer continues its ledger)
    ledgers = []
    for slot in swarm.slots:
        path = home / "runs" / "p2ptrain" / (slot.name or "?") / "ledger.sqlite"
        result = verify_ledger(path) if path.exists() else {"ok": False, "error": "no ledger file", "problems": []}
        problems = result.get("problems", [])
        ledgers.append({"slot": slot.index, "name": slot.name, "path": str(path), "ok": result.get("ok", False),
                        "records": result.get("records"), "peers": result.get("peers"),
                        "claims": result.get("claims"), "receipts": result.get("receipts"),
                        "error": result.get("error"), "problems": len(problems), "problem_codes": _count_codes(problems),
                        "problem_detail": [p.get("message", "") + f" ({p.get('code')}, {p.get('peer')}, "
                                           f"epoch {p.get('epoch')})" for p in problems][:10]})

    wall = time.monotonic() - begin
    report.update({
        "workdir": str(workdir) if (keep or not own_dir) else None,
        "kills": sum(a.kind == "kill" for a in actions),
        "restarts": sum(a.kind == "restart" for a in actions),
        "chaos_seconds": round(chaos_seconds, 1),
        "actions": [asdict(a) for a in actions],
        "peer_failures": problems_seen,
        "final": finals,
        "final_accuracy_min": min(accuracies) if accuracies else None,
        "final_accuracy_mean": sum(accuracies) / len(accuracies) if accuracies else None,
        "reached_accuracy_bar": None if accuracy_bar is None else bool(accuracies) and min(accuracies) >= accuracy_bar,
        "all_finished": finished,
        "ledgers": ledgers,
        "ledgers_clean": all(entry["ok"] for entry in ledgers),
        "stragglers_before_sweep": stragglers,
        "leftover_processes": after_teardown,
        "hung": hung,
        "training_wall_seconds": round(wall_training, 1),
        "wall_seconds": round(wall, 1),
    })
    report["ok"] = bool(finished and not hung and not after_teardown and not problems_seen
                        and report["ledgers_clean"]
                        and report["reached_accuracy_bar"] is not False and wall <= time_limit)
    if own_dir and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt()


def _do(swarm: ChaosSwarm, slot: Slot, kind: str, rng: random.Random, actions: list[Action], chaos_start: float,
        home: Path, say, failures: list[str]) -> None:
    process = slot.process
    action = Action(at=round(time.monotonic() - chaos_start, 1), kind=kind, slot=slot.index, name=slot.name,
                    epoch=process.epoch)
    if kind == "kill":
        count = swarm.sigkill(process)
        action.detail = f"SIGKILL to {count} processes"
        resume = _checkpoint_exists(home, slot.name) and rng.random() < 0.5
    else:  # SIGINT now; the relaunch follows once it has left (_finish_restarts), the chaos goes on meanwhile
        swarm._track_descendants()
        try:
            os.kill(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        slot.stopping = (action, time.monotonic() + RESTART_GRACE)
        actions.append(action)
        say(f"restart peer {slot.index} {slot.name} at epoch {action.epoch}: SIGINT sent")
        return
    action.relaunch = "resume" if resume else "fresh"
    swarm.launch(slot, min_peers=1, resume=resume)
    actions.append(action)
    say(f"{kind} peer {slot.index} {slot.name} at epoch {action.epoch}: {action.detail}; relaunched "
        f"({action.relaunch})")


def _finish_restarts(swarm: ChaosSwarm, home: Path, say, failures: list[str]) -> None:
    """Relaunch (with --resume) every restarted peer that has left; a peer that does not leave in time is
    SIGKILLed, relaunched all the same, and counted as a failure."""
    for slot in swarm.slots:
        if slot.stopping is None:
            continue
        action, deadline = slot.stopping
        process = slot.process
        code = process.proc.poll()
        if code is None and time.monotonic() < deadline:
            continue
        if code is None:
            swarm.sigkill(process)
            action.detail = f"hung after SIGINT ({RESTART_GRACE:g}s)"
        else:
            _killpg(process.pid)  # whatever of its group is left (nothing, after a clean exit)
            process.close()
            summary = process.summary or {}
            action.detail = (f"exit {code}, interrupted={summary.get('interrupted')}, "
                             f"ledger_clean={summary.get('ledger_clean')}")
            left = any("left the swarm" in line for line in process.tail)
            if code in STARTUP_INTERRUPTED and process.epoch is None and "interrupted" in process.tail and left:
                # Ctrl-C before training began: `p2ptrain join` leaves, prints "interrupted", exits 130 (seen
                # once as -2: a second SIGINT during the interpreter's teardown? the peer had left all the same)
                action.detail = f"exit {code}: interrupted while starting, left cleanly"
                code = 0
        if code != 0:
            failures.append(f"{process.display_name} did not leave cleanly after SIGINT: {action.detail}: "
                            + " | ".join(list(process.tail)[-3:]))
        resume = _checkpoint_exists(home, slot.name)
        action.relaunch = "resume" if resume else "fresh"
        slot.stopping = None
        swarm.launch(slot, min_peers=1, resume=resume)
        say(f"restarted peer {slot.index} {slot.name}: {action.detail}; relaunched ({action.relaunch})")


def _check_alive(swarm: ChaosSwarm, failures: list[str], say=None) -> None:
    """A trainer or the bootstrap that exits non-zero on its own is a failure of the swarm: note it once."""
    for process in [*(s.process for s in swarm.slots if s.stopping is None), swarm.bootstrap]:
        code = process.proc.poll()
        if code not in (None, 0) and not getattr(process, "_failure_noted", False):
            process._failure_noted = True
            process.close()
            failures.append(f"{process.display_name} exited with code {code}: " + " | ".join(list(process.tail)[-3:]))
            if say:
                say(failures[-1])
    if swarm.bootstrap.proc.poll() is not None and not getattr(swarm.bootstrap, "_failure_noted", False):
        swarm.bootstrap._failure_noted = True
        failures.append(f"the bootstrap peer exited with code {swarm.bootstrap.proc.returncode}")


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} {p.name()} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(str(pid))
    return out


def _count_codes(problems: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.get("code", "?")] = counts.get(p.get("code", "?"), 0) + 1
    return counts


def print_report(report: dict, console: Console) -> None:
    actions = Table(title="chaos", title_justify="left", box=None)
    for column in ("at", "action", "peer", "epoch", "what happened", "relaunch"):
        actions.add_column(column, no_wrap=column != "what happened")
    for a in report["actions"]:
        actions.add_row(f"{a['at']:.0f}s", a["kind"], f"{a['slot']} {a['name']}", str(a["epoch"]), a["detail"],
                        a["relaunch"])
    console.print(actions)
    final = Table(title="final trainers", title_justify="left", box=None)
    for column in ("peer", "gen", "exit", "epoch", "accuracy", "averaged", "ledger at exit"):
        final.add_column(column, no_wrap=True)
    for f in report["final"]:
        final.add_row(f"{f['slot']} {f['name']}", str(f["generation"]), str(f["exit_code"]), str(f["epoch"]),
                      "n/a" if f["accuracy"] is None else f"{f['accuracy']:.4f}",
                      f"{f['rounds_averaged']}/{f['rounds']}", str(f["ledger_clean_at_exit"]))
    console.print(final)
    ledgers = Table(title="ledger verify", title_justify="left", box=None)
    for column in ("peer", "records", "clean", "problems"):
        ledgers.add_column(column, no_wrap=column == "peer")
    for entry in report["ledgers"]:
        ledgers.add_row(f"{entry['slot']} {entry['name']}", str(entry["records"]), str(entry["ok"]),
                        entry["error"] or _codes(entry["problem_codes"]))
    console.print(ledgers)
    bar = report["config"]["accuracy_bar"]
    accuracy = report["final_accuracy_min"]
    console.print(
        f"kills survived {report['kills']}, restarts {report['restarts']} in {report['chaos_seconds']:.0f}s of chaos; "
        f"final accuracy min {'n/a' if accuracy is None else f'{accuracy:.4f}'}"
        + (f" (bar {bar})" if bar is not None else "") + f"; all finished: {report['all_finished']}; "
        f"ledgers clean: {report['ledgers_clean']}; "
        f"stragglers before sweep: {len(report['stragglers_before_sweep'])}; "
        f"leftover processes: {len(report['leftover_processes'])}; hung: {len(report['hung'])}; "
        f"wall {report['wall_seconds']:.0f}s -> {'OK' if report['ok'] else 'FAILED'}",
        highlight=False, soft_wrap=True)


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} x{n}" for code, n in sorted(counts.items())) or "-"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Kill and restart random trainers of a local swarm, then check that it "
                                            "still trains to accuracy with clean ledgers and no leftover processes.")
    p.add_argument("--peers", type=int, default=4, help="trainers (default 4)")
    p.add_argument("--task", default="digits-mlp", help="task (default digits-mlp)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of chaos (default 120)")
    p.add_argument("--interval", type=float, default=8.0, help="mean seconds between two actions (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the chaos (default 0)")
    p.add_argument("--kill-share", type=float, default=0.5, help="share of actions that are SIGKILLs (default 0.5)")
    p.add_argument("--max-epochs", type=int, default=100, help="the swarm trains to this epoch (default 100)")
    p.add_argument("--time-limit", type=float, default=380.0, help="hard bound on the whole run (default 380 s)")
    p.add_argument("--accuracy-bar", type=float, default=-1.0, help="default: the task's (digits 0.95)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--workdir", type=Path, help="keys, homes and logs (default: a temporary dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    p.add_argument("--quick", action="store_true", help="2 trainers, 20 s of chaos, 50 epochs, no accuracy bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.peers, args.duration, args.interval, args.max_epochs, args.accuracy_bar = 2, 20.0, 5.0, 50, None
        args.time_limit = min(args.time_limit, 200.0)
    console = Console(stderr=True, highlight=False)
    try:
        report = run_chaos(peers=args.peers, task=args.task, duration=args.duration, interval=args.interval,
                           seed=args.seed, max_epochs=args.max_epochs, time_limit=args.time_limit,
                           accuracy_bar=args.accuracy_bar, kill_share=args.kill_share, workdir=args.workdir,
                           keep=args.keep, console=console)
    except SwarmError as e:
        e.show(console)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: the swarm is stopped")
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, console)
    console.print(f"report written to {args.out}", highlight=False, soft_wrap=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
