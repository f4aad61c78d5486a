"""Shared fixtures for tests that start real p2ptrain processes on 127.0.0.1.

work_dir   -- a per-test directory; subprocesses see ``P2PTRAIN_HOME`` inside it
cli        -- run one ``p2ptrain`` command to completion (own process group, killed on timeout)
swarm      -- a :class:`Swarm` that starts a bootstrap and peers and stops every one of them at teardown

A session-wide safety net kills whatever is left at the end: children of pytest, every process group
a test started, and ``p2pd`` daemons whose key file lies under pytest's temporary directory.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import psutil
import pytest

LOCAL = "/ip4/127.0.0.1/tcp/0"  # every test peer listens on loopback only
# Two shared cores: importing torch + hivemind and starting p2pd can take tens of seconds under load.
STARTUP_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0  # SIGINT, then SIGKILL after this long
POLL = 0.1  # seconds between reads of an output file while waiting for a line
DESCENDANTS_EVERY = 2.0  # seconds between scans for a peer's child processes (a scan reads all of /proc)
EPOCH_LINE = re.compile(r"epoch (\d+): loss (\S+), last round with (\d+) peers")

T = TypeVar("T")
_started_groups: set[int] = set()  # process groups started by any test this session (for the safety net)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Epoch:
    """One ``epoch N: loss X, last round with K peers`` log line."""

    epoch: int
    loss: float
    group_size: int


class PeerProcess:
    """A ``python -m p2ptrain ...`` subprocess in its own process group, its output going to two files."""

    def __init__(self, name: str, args: list[str], directory: Path, env: dict[str, str],
                 program: Sequence[str] = ("-m", "p2ptrain")):
        self.name, self.args = name, args
        self.stdout_path, self.stderr_path = directory / f"{name}.out", directory / f"{name}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen([sys.executable, *program, *args], stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, env=env, cwd=directory, start_new_session=True)
        self.pgid = self.popen.pid  # start_new_session: the child leads its own group
        _started_groups.add(self.pgid)
        # the peer's DHT process moves to a group of its own, and p2pd outlives a SIGKILLed parent:
        # remember every descendant seen, so that teardown can kill those that outlive the peer
        self.descendants: dict[int, psutil.Process] = {}
        self._descendants_seen_at = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        """The tail of both outputs, for assertion messages."""
        return (f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}) stdout:\n{_tail(self.stdout())}\n"
                f"--- {self.name} stderr:\n{_tail(self.stderr())}")

    def poll(self) -> int | None:
        rc = self.popen.poll()
        if rc is None and time.monotonic() - self._descendants_seen_at > DESCENDANTS_EVERY:
            self.remember_descendants()
        return rc

    def remember_descendants(self) -> None:
        self._descendants_seen_at = time.monotonic()
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                self.descendants.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def wait_until(self, check: Callable[[], T | None], what: str, timeout: float) -> T:
        """Poll ``check()`` until it returns something truthy, and return that.

        Fails at once if the process exits first (after one last check), or when ``timeout`` runs out.
        """
        deadline = time.monotonic() + timeout
        while True:
            exited = self.poll() is not None  # before the check, so nothing printed before exit is missed
            result = check()
            if result:
                return result
            if exited:
                pytest.fail(f"{self.name} exited before {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {what} within {timeout:g}s\n{self.describe()}")
            time.sleep(POLL)

    def wait_for(self, pattern: str, *, timeout: float = STARTUP_TIMEOUT, stream: str = "stderr") -> re.Match[str]:
        """Poll the output file until a line matches ``pattern``."""
        regex = re.compile(pattern, re.M)
        read = self.stderr if stream == "stderr" else self.stdout
        return self.wait_until(lambda: regex.search(read()), f"printing {pattern!r}", timeout)

    def wait_for_epoch(self, epoch: int, *, timeout: float = STARTUP_TIMEOUT) -> Epoch:
        """Wait until this peer logs the end of global epoch ``epoch`` or a later one; return that line."""
        return self.wait_until(lambda: next((e for e in self.epochs() if e.epoch >= epoch), None),
                               f"reaching epoch {epoch}", timeout)

    def epochs(self) -> list[Epoch]:
        return [Epoch(int(e), float(loss), int(k)) for e, loss, k in EPOCH_LINE.findall(self.stderr())]

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; fail (it is killed at teardown) if it takes longer than ``timeout``."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout:g}s\n{self.describe()}")
        self.poll()
        return rc

    def summary(self) -> dict:
        """The JSON object ``join --json`` prints as its last stdout line."""
        lines = [line for line in self.stdout().splitlines() if line.strip()]
        assert lines, f"{self.name} printed nothing on stdout\n{self.describe()}"
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pytest.fail(f"{self.name}'s last stdout line is not JSON\n{self.describe()}")

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the peer's whole process group."""
        self.remember_descendants()
        _kill_group(self.pgid, signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the whole group and every descendant seen (psutil checks that a pid was not reused)."""
        if self.popen.poll() is None:
            self.remember_descendants()
        _kill_group(self.pgid, signal.SIGKILL)
        for process in self.descendants.values():
            try:
                process.kill()
            except psutil.Error:
                pass
        self.popen.wait()
        psutil.wait_procs(list(self.descendants.values()), timeout=5)


class Swarm:
    """Real p2ptrain processes on 127.0.0.1: one bootstrap peer and any number of trainers.

    Every process gets its own key file in ``directory`` and writes ``<name>.out`` / ``<name>.err`` there.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.processes: list[PeerProcess] = []
        self.address: str | None = None

    def start(self, name: str, *args: str, program: Sequence[str] = ("-m", "p2ptrain")) -> PeerProcess:
        process = PeerProcess(name, list(args), self.directory, self.env, program)
        self.processes.append(process)
        return process

    def bootstrap(self) -> str:
        """Start the bootstrap peer and return the address that others join through."""
        process = self.start("bootstrap", "bootstrap", "--host-maddrs", LOCAL,
                             "--identity", str(self.directory / "bootstrap.key"), "--log-format", "plain")
        self.address = process.wait_for(r"p2ptrain join --initial-peers (\S+)", stream="stdout").group(1)
        return self.address

    def join(self, name: str, *args: str, initial_peers: bool = True, wait_up: bool = True,
             identity: Path | None = None, program: Sequence[str] = ("-m", "p2ptrain")) -> PeerProcess:
        """Start ``p2ptrain join`` (through the bootstrap unless ``initial_peers=False``) with ``args`` added.

        With ``wait_up``, returns once the peer is in the swarm and has printed its join line. ``program``
        is what python runs (e.g. ``scripts/byzantine_peer.py --attack nan``).
        """
        command = ["join", "--host-maddrs", LOCAL, "--identity", str(identity or self.directory / f"{name}.key"),
                   "--log-format", "plain", "--json"]
        if initial_peers:
            assert self.address is not None, "start the bootstrap first"
            command += ["--initial-peers", self.address]
        process = self.start(name, *command, *args, program=program)
        if wait_up:
            process.wait_for(r"p2ptrain join --initial-peers \S+", stream="stdout")
        return process

    def wait_all(self, processes: list[PeerProcess], timeout: float) -> list[int]:
        """Exit codes of ``processes``, waiting at most ``timeout`` for all of them together."""
        deadline = time.monotonic() + timeout
        return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in processes]

    def stop(self) -> None:
        """SIGINT every live process group, give them STOP_TIMEOUT together, then SIGKILL every group."""
        for process in reversed(self.processes):  # trainers first, the bootstrap they talk to last
            if process.poll() is None:
                process.remember_descendants()
                process.interrupt()
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            try:
                process.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:
            process.kill()


@pytest.fixture
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-test directory whose ``home/`` is ``P2PTRAIN_HOME`` for this test and its subprocesses."""
    monkeypatch.setenv("P2PTRAIN_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def swarm(work_dir: Path):
    """A :class:`Swarm` in ``work_dir``; every process it started is stopped at teardown."""
    s = Swarm(work_dir)
    try:
        yield s
    finally:
        s.stop()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_line(self) -> str:
        """The single ``error: ...`` line; fails if there is none, several, or a traceback."""
        assert "Traceback" not in self.stderr + self.stdout, self.stderr
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"expected one 'error:' line on stderr, got:\n{self.stderr}"
        return errors[0]


@pytest.fixture
def cli(work_dir: Path):
    """``cli(*args, timeout=...)`` runs ``python -m p2ptrain *args`` in ``work_dir`` and returns a CliResult."""

    def run(*args: str, timeout: float = 120.0) -> CliResult:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "p2ptrain", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
                                   cwd=work_dir, start_new_session=True)
        _started_groups.add(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"p2ptrain {' '.join(args)} still running after {timeout:g}s\n{_tail(stderr)}")
        finally:
            _kill_group(process.pid, signal.SIGKILL)  # a p2pd it may have left behind
        return CliResult(process.returncode, stdout, stderr, time.monotonic() - started)

    return run


@pytest.fixture(scope="session", autouse=True)
def kill_leftover_processes(tmp_path_factory: pytest.TempPathFactory):
    """Safety net: at the end of the session, kill every process a test may have leaked."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    me = psutil.Process()
    leftovers = {p.pid: p for p in me.children(recursive=True)}
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if process.pid == me.pid:
                continue
            if process.info["name"] != "p2pd":
                continue
            # a p2pd can outlive its peer; one started with a key file names it as -id=PATH (under
            # pytest's temp dir for ours), an anonymous one (the identity probe) is in its peer's group
            cmdline = process.info["cmdline"] or []
            if os.getpgid(process.pid) in _started_groups or any(a.startswith("-id=" + base) for a in cmdline):
                leftovers[process.pid] = process
        except (psutil.Error, ProcessLookupError):
            continue
    for process in leftovers.values():
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(leftovers.values()), timeout=10)
