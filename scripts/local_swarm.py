"""Run a whole swarm on this machine: one bootstrap peer and N trainers on 127.0.0.1, each a real process.

    python scripts/local_swarm.py --peers 3 [--task fashion-mlp] [--max-epochs 40] [--json] [-- JOIN FLAGS...]

Every peer gets its own key and its own ``P2PTRAIN_HOME`` under one work dir (a temporary one unless
``--workdir``), starts with ``--min-peers N`` so that the swarm trains together, and logs to stderr; this
script reads those log lines into a live table. Flags after ``--`` go to every ``p2ptrain join`` as they are.

Teardown, on success, failure, Ctrl-C, SIGTERM and timeout alike: SIGINT to each peer, up to 15 s for it
to leave cleanly, then SIGKILL to its whole process group (each peer runs in its own session, so its
p2pd daemons and hivemind worker processes are in that group), then a sweep for any process still
carrying this run's token in its environment. ``run_swarm`` does the same as a function (for scripts/bench/training.py, cheaters.py and chaos.py).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

try:
    import psutil
except ImportError:  # only the leftover sweep needs it; process groups are killed without it
    psutil = None

__all__ = ["PeerResult", "PeerStatus", "SwarmError", "SwarmResult", "SwarmStatus", "run_swarm", "main"]

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
GRACE_SECONDS = 15.0  # how long a peer gets after SIGINT before its process group is killed
STARTUP_SECONDS = 120.0  # bootstrap address and --join-timeout: importing torch+hivemind is slow on 2 shared cores
TAIL_LINES = 30
SWARM_ENV = "P2PTRAIN_LOCAL_SWARM"  # set to a per-run token in every process of the swarm, to find stragglers

# What the peers log (p2ptrain.trainer / cli); the asctime prefix of the plain log format is ignored.
EPOCH_LINE = re.compile(r"epoch (\d+): loss (\S+), last round with (\d+) peers")
CHECKPOINT_LINE = re.compile(r"checkpoint written to .* \(epoch (\d+), test accuracy ([\d.]+)\)")
STATE_LINE = re.compile(r"state downloaded: now at epoch (\d+)")
STARTED_LINE = re.compile(r"^(?:bootstrap peer|peer) (\S+) \((12D3\w+)\)")
JOIN_LINE = re.compile(r"p2ptrain join --initial-peers (\S+)")


class SwarmError(Exception):
    """The swarm could not finish: ``str(e)`` is one line, ``tail`` the log lines that explain it."""

    def __init__(self, message: str, tail: Sequence[str] = ()):
        super().__init__(message)
        self.tail = list(tail)

    def show(self, console: Console, lines: int | None = None) -> None:
        """Print the error and the last ``lines`` (default: all) log lines behind it."""
        console.print(f"[red]error:[/] {self}", soft_wrap=True)
        for line in self.tail[-lines if lines else None:]:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


# ---- what the script reports -------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerResult:
    """One trainer's JSON summary (from ``p2ptrain join --json``) plus its approximate training wall time."""

    name: str
    epoch: int
    accuracy: float | None
    rounds: int
    rounds_averaged: int
    compute_seconds: float
    steps: int
    samples: int
    # Wall seconds the peer spent training, as ``p2ptrain join --json`` reports it; for a peer that
    # printed no summary, estimated from its epoch log lines (last minus first, plus one mean epoch).
    training_seconds: float | None
    ledger: str | None = None  # the peer's ledger file
    rejected_parts: int = 0  # groupmates' averaging parts this peer refused


@dataclass(frozen=True)
class SwarmResult:
    task: str
    peers: tuple[PeerResult, ...]
    accuracy: float | None  # mean of the peers' final test accuracies (they train one model: should agree)
    wall_seconds: float  # from launching the bootstrap to the last trainer's exit
    epochs: int  # the global epoch the swarm reached

    def to_dict(self) -> dict:
        return {"task": self.task, "peers": [asdict(p) for p in self.peers], "accuracy": self.accuracy,
                "wall_seconds": self.wall_seconds, "epochs": self.epochs}

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"{self.task}: {len(self.peers)} peers, {self.epochs} global epochs in "
                            f"{self.wall_seconds:.0f} s", title_justify="left", box=None)
        for column in ("peer", "epoch", "accuracy", "averaged", "steps", "samples", "compute"):
            table.add_column(column, justify="left" if column == "peer" else "right", no_wrap=True)
        for p in self.peers:
            table.add_row(p.name, str(p.epoch), _fmt(p.accuracy), f"{p.rounds_averaged}/{p.rounds} rounds",
                          str(p.steps), str(p.samples), f"{p.compute_seconds:.1f} s")
        yield table
        yield f"swarm test accuracy {_fmt(self.accuracy)}, wall time {self.wall_seconds:.1f} s"


# ---- what the live view draws --------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerStatus:
    label: str
    state: str
    epoch: int | None = None
    loss: float | None = None
    group: int | None = None


@dataclass(frozen=True)
class SwarmStatus:
    """The swarm at one moment, as read from the peers' logs; renders itself as the live table."""

    task: str
    max_epochs: int | None
    elapsed: float
    peers: tuple[PeerStatus, ...]

    @property
    def epoch(self) -> int:
        return max((p.epoch or 0 for p in self.peers), default=0)

    def line(self) -> str:
        """A one-line form for logs that are not a terminal."""
        peers = ", ".join(f"{p.label} {p.state} e{p.epoch or 0} loss {_fmt(p.loss)}" for p in self.peers)
        return f"[{self.elapsed:5.0f}s] swarm epoch {self.epoch}/{self.max_epochs or '?'}: {peers}"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        header = Table.grid(padding=(0, 1))
        header.add_row(f"[bold]{self.task}[/] swarm epoch {self.epoch}/{self.max_epochs or '?'}",
                       ProgressBar(total=self.max_epochs or 1, completed=self.epoch if self.max_epochs else 0,
                                   width=30),
                       f"{self.elapsed:.0f} s")
        table = Table(box=None, padding=(0, 2))
        for column in ("peer", "state", "epoch", "loss", "last group"):
            table.add_column(column, justify="left" if column in ("peer", "state") else "right", no_wrap=True)
        for p in self.peers:
            table.add_row(p.label, p.state, "" if p.epoch is None else str(p.epoch), _fmt(p.loss),
                          "" if p.group is None else str(p.group))
        yield Group(header, table)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---- one peer process ----------------------------------------------------------------------------------


class PeerProcess:
    """A ``p2ptrain`` subprocess in its own session, with threads reading its stdout and stderr."""

    def __init__(self, label: str, argv: list[str], *, env: dict[str, str], log_path: Path):
        self.label = label
        self.name: str | None = None
        self.join_address: str | None = None
        self.address_ready = threading.Event()
        self.summary: dict | None = None  # the JSON line a trainer prints last
        self.epoch: int | None = None
        self.loss: float | None = None
        self.group: int | None = None
        self.accuracy: float | None = None
        self.epoch_times: list[float] = []  # monotonic arrival time of each epoch line
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.started = time.monotonic()
        self._log = open(log_path, "w", buffering=1)
        self._log_lock = threading.Lock()  # two reader threads write it; close() may race with them
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, errors="replace", bufsize=1, start_new_session=True)
        streams = ((self.proc.stdout, self._on_stdout), (self.proc.stderr, self._on_stderr))
        self._readers = [threading.Thread(target=self._read, args=(stream, handle), daemon=True)
                         for stream, handle in streams]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def display_name(self) -> str:
        return f"{self.label} {self.name}" if self.name else self.label

    def _read(self, stream, handle: Callable[[str], None]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self._log_lock:
                if not self._log.closed:
                    self._log.write(line + "\n")
            handle(line)

    def _on_stdout(self, line: str) -> None:
        if m := STARTED_LINE.search(line):
            self.name = m.group(1)
        elif m := JOIN_LINE.search(line):
            self.join_address = m.group(1)
            self.address_ready.set()
        elif line.startswith("{"):
            try:
                self.summary = json.loads(line)
            except json.JSONDecodeError:
                pass
        self.tail.append(line)

    def _on_stderr(self, line: str) -> None:
        self.tail.append(line)
        if m := EPOCH_LINE.search(line):
            self.epoch, self.group = int(m.group(1)), int(m.group(3))
            try:
                self.loss = float(m.group(2).rstrip(","))
            except ValueError:
                pass
            self.epoch_times.append(time.monotonic())
        elif m := CHECKPOINT_LINE.search(line):
            self.epoch, self.accuracy = int(m.group(1)), float(m.group(2))
        elif m := STATE_LINE.search(line):
            self.epoch = int(m.group(1))

    def state(self) -> str:
        code = self.proc.poll()
        if code is not None:
            return "done" if code == 0 else f"failed ({code})"
        if self.epoch is not None:
            return "training"
        return "waiting" if self.name else "starting"

    def status(self) -> PeerStatus:
        return PeerStatus(self.display_name, self.state(), self.epoch, self.loss, self.group)

    def training_seconds(self) -> float | None:
        times = self.epoch_times
        if len(times) < 2:
            return None
        return (times[-1] - times[0]) * len(times) / (len(times) - 1)

    def close(self) -> None:
        """Wait briefly for the readers to drain the pipes (hivemind's workers may hold them open) and close the log."""
        for reader in self._readers:
            reader.join(timeout=2.0)
        with self._log_lock:
            self._log.close()


# ---- the swarm -----------------------------------------------------------------------------------------


class Swarm:
    """One bootstrap and ``peers`` trainers under ``workdir``; a context manager that always tears down."""

    def __init__(self, *, peers: int, task: str, max_epochs: int | None, workdir: Path,
                 join_args: Sequence[str] = (), python: str = sys.executable,
                 command: Callable[[int], list[str]] | None = None):
        self.n, self.task, self.max_epochs = peers, task, max_epochs
        self.workdir, self.join_args, self.python = workdir, list(join_args), python
        self.command = command or (lambda i: ["-m", "p2ptrain"])  # what runs trainer i (scripts/cheaters.py swaps some)
        self.token = f"{os.getpid()}-{uuid.uuid4().hex}"
        self.bootstrap: PeerProcess | None = None
        self.trainers: list[PeerProcess] = []
        self.started = time.monotonic()
        self.finished: float | None = None
        self._descendants: dict[int, object] = {}  # pid -> psutil.Process, to catch processes that left the group

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, P2PTRAIN_HOME=str(self.workdir / "home"), PYTHONUNBUFFERED="1")
        env[SWARM_ENV] = self.token
        env["COLUMNS"] = "250"  # rich wraps the peers' stdout at 80 columns when it is a pipe
        return env

    def _spawn(self, label: str, args: list[str], log_name: str, command: Sequence[str] = ("-m", "p2ptrain")) -> PeerProcess:
        argv = [self.python, *command, *args]
        return PeerProcess(label, argv, env=self._env(), log_path=self.workdir / "logs" / log_name)

    def start(self, deadline: float) -> None:
        """Start the bootstrap, wait for its address, then start every trainer pointing at it."""
        self.start_bootstrap(deadline)
        epochs = ["--max-epochs", str(self.max_epochs)] if self.max_epochs else []
        for i in range(1, self.n + 1):
            args = ["join", "--initial-peers", self.bootstrap.join_address, "--host-maddrs", LOOPBACK,
                    "--identity", str(self.workdir / "keys" / f"peer-{i}.key"), "--task", self.task,
                    "--min-peers", str(self.n), "--join-timeout", f"{STARTUP_SECONDS:g}", *epochs,
                    "--log-format", "plain", "--json", *self.join_args]
            self.trainers.append(self._spawn(f"peer {i}", args, f"peer-{i}.log", self.command(i)))

    def start_bootstrap(self, deadline: float) -> None:
        """Start the bootstrap peer and wait until it prints the address trainers join through."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "keys").mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.bootstrap = self._spawn("bootstrap", [
            "bootstrap", "--host-maddrs", LOOPBACK, "--identity", str(self.workdir / "keys" / "bootstrap.key"),
            "--log-format", "plain"], "bootstrap.log")
        while not self.bootstrap.address_ready.wait(0.2):
            if self.bootstrap.proc.poll() is not None:
                raise SwarmError(f"the bootstrap peer exited with code {self.bootstrap.proc.returncode} before "
                                 f"printing its address", self.bootstrap.tail)
            if time.monotonic() > min(deadline, self.started + STARTUP_SECONDS):
                raise SwarmError("the bootstrap peer printed no address in time", self.bootstrap.tail)

    def wait(self, deadline: float, *, on_tick: Callable[[], None] | None = None) -> None:
        """Return once every trainer has exited cleanly; raise SwarmError on a failure or at ``deadline``."""
        while True:
            self._track_descendants()
            for peer in self.trainers:
                code = peer.proc.poll()
                if code is not None and code != 0:
                    peer.close()  # read its last words before quoting them
                    raise SwarmError(f"{peer.display_name} exited with code {code}", peer.tail)
            if self.bootstrap is not None and self.bootstrap.proc.poll() is not None:
                self.bootstrap.close()
                raise SwarmError(f"the bootstrap peer exited with code {self.bootstrap.proc.returncode} while the "
                                 f"swarm was training", self.bootstrap.tail)
            if all(peer.proc.poll() == 0 for peer in self.trainers):
                self.finished = time.monotonic()
                for peer in self.trainers:
                    peer.close()  # the readers have seen EOF; this collects the final JSON line
                    if peer.summary is None:
                        raise SwarmError(f"{peer.display_name} exited without its JSON summary", peer.tail)
                return
            if time.monotonic() > deadline:
                behind = min((p.epoch or 0 for p in self.trainers), default=0)
                raise SwarmError(f"the swarm did not finish in time (slowest peer at epoch {behind} of "
                                 f"{self.max_epochs or '?'}); raise --timeout or lower --max-epochs")
            if on_tick:
                on_tick()
            time.sleep(0.2)

    def status(self) -> SwarmStatus:
        return SwarmStatus(self.task, self.max_epochs, time.monotonic() - self.started,
                           tuple(p.status() for p in self.trainers))

    def result(self) -> SwarmResult:
        peers = []
        for peer in self.trainers:
            s = peer.summary or {}
            training = s.get("training_seconds", peer.training_seconds())  # the peer's own number once it has one
            peers.append(PeerResult(name=s.get("name", peer.name or peer.label), epoch=int(s.get("epoch", 0)),
                                    accuracy=s.get("accuracy"), rounds=int(s.get("rounds", 0)),
                                    rounds_averaged=int(s.get("rounds_averaged", 0)),
                                    compute_seconds=float(s.get("compute_seconds", 0.0)), steps=int(s.get("steps", 0)),
                                    samples=int(s.get("samples", 0)),
                                    training_seconds=None if training is None else round(training, 3),
                                    ledger=s.get("ledger"), rejected_parts=int(s.get("rejected_parts", 0))))
        accuracies = [p.accuracy for p in peers if p.accuracy is not None]
        end = self.finished or time.monotonic()
        return SwarmResult(task=self.task, peers=tuple(peers),
                           accuracy=sum(accuracies) / len(accuracies) if accuracies else None,
                           wall_seconds=round(end - self.started, 3), epochs=max((p.epoch for p in peers), default=0))

    # --- teardown -----------------------------------------------------------------------------------

    def _processes(self) -> list[PeerProcess]:
        return [*self.trainers, *([self.bootstrap] if self.bootstrap else [])]

    def _track_descendants(self) -> None:
        """Remember every child of every peer: one that left its process group is still killed at the end."""
        if psutil is None:
            return
        for peer in self._processes():
            try:
                for child in psutil.Process(peer.pid).children(recursive=True):
                    self._descendants.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def stop(self) -> None:
        """SIGINT every peer (trainers first), give them GRACE_SECONDS together, then SIGKILL what is left.

        A second Ctrl-C while this runs is ignored: interrupting the teardown would orphan the peers.
        """
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self._stop()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _stop(self) -> None:
        self._track_descendants()
        for peer in self._processes():
            if peer.proc.poll() is None:
                _signal(peer.proc.pid, signal.SIGINT)
        grace_end = time.monotonic() + GRACE_SECONDS
        for peer in self._processes():
            try:
                peer.proc.wait(timeout=max(0.0, grace_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for peer in self._processes():
            _killpg(peer.proc.pid)  # the peer's p2pd daemons and hivemind workers, even after a clean exit
            if peer.proc.poll() is None:
                peer.proc.kill()
            peer.proc.wait()
        if psutil is not None:
            _kill([p for p in self._descendants.values() if p.is_running()])
            leftovers(self.token, kill=True)
        for peer in self._processes():
            peer.close()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(processes: list) -> None:
    """SIGKILL each psutil process (those already gone are skipped) and reap them."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=5)


def leftovers(token: str, *, kill: bool = False) -> list[int]:
    """Pids of processes started by the swarm whose ``SWARM_ENV`` is ``token`` (peers, hivemind workers, p2pd).

    Matched by an inherited environment variable rather than by command line, so that nothing else that
    merely names the work dir (an editor, ``tail -f`` of a log, the program that launched this one) is touched.
    """
    if psutil is None:
        return []
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(SWARM_ENV) == token:
                found.append(p)
        except psutil.Error:  # gone, a zombie, or another user's process
            pass
    if kill:
        _kill(found)
    return [p.pid for p in found]


# ---- the whole run -------------------------------------------------------------------------------------


def task_max_epochs(task: str) -> int | None:
    """The task's default ``max_epochs``, so the live view can show "epoch 12/40" (None if it cannot load)."""
    try:
        from p2ptrain.tasks import load_task

        return load_task(task).max_epochs
    except Exception:
        return None


class _Terminated(Exception):
    pass


def run_swarm(*, peers: int = 3, task: str = "digits-mlp", max_epochs: int | None = None, timeout: float = 600.0,
              workdir: Path | None = None, keep: bool = False, join_args: Sequence[str] = (),
              console: Console | None = None, live: bool = True,
              command: Callable[[int], list[str]] | None = None) -> SwarmResult:
    """Launch a local swarm, wait for it to finish, tear it down and return what it reported.

    Args:
        peers: number of training peers (besides the bootstrap peer).
        task: the task every peer trains.
        max_epochs: global epoch to stop at (default: the task's).
        timeout: seconds for the whole run, start-up and teardown included.
        workdir: where keys, homes and logs go (default: a new temporary directory).
        keep: keep ``workdir`` afterwards (a directory given by the caller is always kept).
        join_args: extra flags for every ``p2ptrain join``.
        command: the python arguments that run trainer ``i`` (1-based) before its ``join`` arguments
            (default ``-m p2ptrain``).
        console: where progress is drawn (default: stderr).
        live: draw a live table (on a terminal) or a line per epoch (otherwise); False draws nothing.

    Raises:
        SwarmError: a peer failed, or the run passed ``timeout``. Everything is torn down first.
    """
    console = console or Console(stderr=True, highlight=False)
    begin = time.monotonic()
    deadline = begin + timeout - GRACE_SECONDS - 5  # leave time to tear down within the limit
    max_epochs = max_epochs or task_max_epochs(task)
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="p2ptrain-swarm-")) if own_dir else Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)  # so a kill of this script still tears the swarm down
    try:
        with Swarm(peers=peers, task=task, max_epochs=max_epochs, workdir=workdir, join_args=join_args,
                   command=command) as swarm:
            swarm.start(deadline)
            if live and console.is_terminal:
                with Live(get_renderable=swarm.status, console=console, refresh_per_second=4, transient=True):
                    swarm.wait(deadline)
            elif live:
                last: list = [None, 0.0]

                def print_line(final: bool = False) -> None:
                    status = swarm.status()
                    if status.epoch != last[0] and (final or time.monotonic() - last[1] > 2.0):
                        last[:] = [status.epoch, time.monotonic()]
                        console.print(status.line(), markup=False, highlight=False, soft_wrap=True)

                swarm.wait(deadline, on_tick=print_line)
                print_line(final=True)
            else:
                swarm.wait(deadline)
        return swarm.result()
    except _Terminated:
        raise KeyboardInterrupt from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_sigterm)
        if own_dir and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif own_dir:
            console.print(f"logs, keys and checkpoints kept in {workdir}", soft_wrap=True, highlight=False)


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a bootstrap peer and N training peers on 127.0.0.1 and report "
                                            "how the swarm trained. Flags after `--` go to every `p2ptrain join`.")
    p.add_argument("--peers", type=int, default=3, help="training peers (default: 3)")
    p.add_argument("--task", default="digits-mlp", help="task to train (default: digits-mlp)")
    p.add_argument("--max-epochs", type=int, help="global epoch to stop at (default: the task's)")
    p.add_argument("--timeout", type=float, default=600.0, help="limit for the whole run in seconds (default: 600)")
    p.add_argument("--workdir", type=Path, help="keys, P2PTRAIN_HOME and logs go here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs, checkpoints)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout; everything else on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    join_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Console(stderr=args.json, highlight=False)
    err = Console(stderr=True, highlight=False)
    if args.peers < 1 or (args.max_epochs is not None and args.max_epochs < 1) or args.timeout <= 0:
        err.print("[red]error:[/] --peers and --max-epochs must be at least 1 and --timeout positive")
        return 2
    try:
        result = run_swarm(peers=args.peers, task=args.task, max_epochs=args.max_epochs, timeout=args.timeout,
                           workdir=args.workdir, keep=args.keep, join_args=join_args, console=err)
    except SwarmError as e:
        e.show(err)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted: the swarm is stopped")
        return 130
    out.print(result)
    if args.json:
        print(json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
