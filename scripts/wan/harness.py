"""Wide-area emulation: each peer in its own network namespace, behind a slow, far-away link.

    sudo .venv/bin/python scripts/wan/harness.py selfcheck [--rtt-ms 100] [--rate-mbit 50] [--seconds 10]
    sudo .venv/bin/python scripts/wan/harness.py run [--peers 2] [...] 'CMD FOR PEER 0' 'CMD FOR PEER 1' ...
    sudo .venv/bin/python scripts/wan/harness.py cleanup        # namespaces and processes of killed runs

``selfcheck`` measures the links it builds (median of TCP ping-pong round trips, bulk TCP goodput after a
warm-up) and exits 1 unless both are within 10% of the settings. ``run`` starts command i (a shell line)
in peer namespace i, with ``WAN_ADDR`` (its own address) and ``WAN_PEERS`` (every peer's, space-separated)
in its environment, waits for all of them and tears down. From Python::

    with Topology(peers=2, link=Link(rtt_ms=100, rate_mbit=50)) as topo:
        server = topo.popen(1, [...])      # runs in peer namespace 1, reachable at topo.address(1) = 10.77.2.2
        print(selfcheck(topo).lines(), topo.traffic())   # link figures; bytes each peer sent and received

Topology (peer i has 10.77.<i+1>.2, the router 10.77.<i+1>.1; names carry a per-run token)::

      p2pw-<token>-peer0                p2pw-<token>-router                   p2pw-<token>-peer1
    +--------------------+     +-------------------------------------+     +--------------------+
    | eth0  10.77.1.2    |     | vr0 10.77.1.1         vr1 10.77.2.1 |     |    10.77.2.2  eth0 |
    |  tbf RATE egress --+-----+-> ip rule iif vr0 --+  +-- iif vr1 <-+-----+-- tbf RATE egress |
    +--------------------+ veth|                     v  v             |veth +--------------------+
                               |    TUN wan0 -> delay.py (holds each  |
                               |    packet RTT/2) -> back into wan0   |
                               |                 |                    |
                               |  main table -> vr<j>, tbf RATE egress|
                               +-------------------------------------+

Delay: this kernel has no netem, so it is added in user space. In the router, policy routing sends every
packet that arrives from a peer's veth into the TUN device ``wan0``; ``delay.py`` reads it, holds it for
RTT/2 and writes it back; re-entering the router from ``wan0`` it follows the main table to the destination
peer's veth. Each packet crosses the delay line once per direction, so a round trip gets the full RTT.
The delay line (and the self-check's probes, one priority below it) run under SCHED_FIFO, so that load on
shared cores does not turn into extra delay; at 50 Mbit/s one way it takes about 15% of one core.
Rate: ``tbf`` on both ends of every peer's veth (the peer's egress = its upload, the router's egress
toward it = its download), so each peer has RATE up and RATE down, with about 50 ms of queue.

Cleanup: teardown kills every process inside the run's namespaces (``ip netns pids``: peers, their
p2pd daemons and workers, the delay line) and deletes the namespaces, which takes the veths and the TUN
with them. It runs on normal exit, on an exception, on SIGINT and SIGTERM (turned into exceptions, and
blocked while teardown runs) and from ``atexit``. Only SIGKILL of the harness escapes it: its direct
children then die with it (PR_SET_PDEATHSIG), and ``cleanup`` removes what is left of any run whose
owner (the pid in the token) is gone. Every process started here has ``P2PW_TOKEN`` in its environment.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "p2pw-"
STALE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")
TOKEN_ENV = "P2PW_TOKEN"
TUN = "wan0"
TABLE = "100"  # router routing table that sends everything into the delay line
TOLERANCE = 0.10
PROBE_PORT = 47001
TCP_OVERHEAD = 52 + 14  # IPv4 + TCP with timestamps + Ethernet: what tbf counts beyond the payload
PR_SET_PDEATHSIG = 1


class WanError(Exception):
    """The harness cannot go on; ``str(e)`` is one line for the user."""


@dataclass(frozen=True)
class Link:
    rtt_ms: float = 100.0
    rate_mbit: float = 50.0
    mtu: int = 1500
    queue_ms: float = 50.0  # tbf queue: about half a bandwidth-delay product at the defaults

    @property
    def burst_bytes(self) -> int:
        # enough for a few full frames, or 2 ms at line rate, so tbf does not throttle below RATE
        return max(4 * (self.mtu + 14), int(self.rate_mbit * 1e6 / 8 * 0.002))


# ---- running ip/tc -------------------------------------------------------------------------------------


def sh(*argv: str) -> str:
    """Run one command to completion; raise WanError with its own error line if it fails."""
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise WanError(f"{argv[0]} not found: install iproute2") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise WanError(f"`{' '.join(argv)}` failed: {why}")
    return done.stdout


def check_host() -> None:
    if os.geteuid() != 0:
        raise WanError("the WAN harness needs root (network namespaces, veth, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise WanError(f"`{tool}` not found: install iproute2")
    if not os.path.exists("/dev/net/tun"):
        raise WanError("/dev/net/tun is missing: the delay line needs TUN devices")


def namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_namespace(ns: str) -> None:
    """SIGKILL every process inside ``ns``, wait until they are gone, then delete it."""
    kill_processes(ns)
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def kill_processes(ns: str) -> None:
    """SIGKILL every process inside ``ns`` and wait (up to 5 s) until they are gone."""
    for _ in range(50):
        try:
            pids = [int(p) for p in sh("ip", "netns", "pids", ns).split()]
        except WanError:
            break  # already deleted
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def cleanup_stale() -> list[str]:
    """Remove the namespaces (and their processes) of runs whose harness process no longer exists."""
    removed = []
    for ns in namespaces():
        m = STALE.match(ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            kill_namespace(ns)
            removed.append(ns)
    return removed


# ---- the topology --------------------------------------------------------------------------------------


class Topology:
    """A router namespace and ``peers`` peer namespaces; a context manager that always tears down."""

    def __init__(self, peers: int = 2, link: Link = Link(), token: str | None = None):
        self.n, self.link = peers, link
        self.token = token or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.router = f"{PREFIX}{self.token}-router"
        self.peers = [f"{PREFIX}{self.token}-peer{i}" for i in range(peers)]
        self.procs: list[subprocess.Popen] = []
        self._up = False
        self._sigterm = None  # the SIGTERM handler to restore at teardown

    def address(self, i: int) -> str:
        return f"10.77.{i + 1}.2"

    # -- lifecycle

    def __enter__(self) -> Topology:
        try:
            self.up()
        except BaseException:
            self.down()  # half a topology: __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        check_host()
        if self.n < 2 or self.n > 250:
            raise WanError("--peers must be between 2 and 250")
        self._up = True
        atexit.register(self.down)
        self._sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        self._router()
        for i in range(self.n):
            self._peer(i)
        self._start_delay_line()

    def down(self) -> None:
        """Kill every process in the run's namespaces and delete them; safe to call twice."""
        if not self._up:
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for ns in [ns for ns in namespaces() if ns.startswith(f"{PREFIX}{self.token}-")]:
                kill_namespace(ns)
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            self._up = False
            signal.signal(signal.SIGTERM, self._sigterm)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def traffic(self) -> list[dict[str, int]]:
        """Bytes each peer has sent ("up") and received ("down") through its link so far."""
        links = {link["ifname"]: link["stats64"] for link in json.loads(sh("ip", "-n", self.router, "-s", "-j",
                                                                            "link", "show"))}
        return [{"up": links[f"vr{i}"]["rx"]["bytes"], "down": links[f"vr{i}"]["tx"]["bytes"]} for i in range(self.n)]

    def sweep(self) -> None:
        """Kill every process in the peer namespaces, leaving the links up: between two runs."""
        for ns in self.peers:
            kill_processes(ns)
        for proc in self.procs:
            proc.poll()  # reap

    def _router(self) -> None:
        r = self.router
        sh("ip", "netns", "add", r)
        # before any interface exists, so that they inherit it: packets re-enter from wan0 with a source
        # address whose route points at a veth, which strict reverse-path filtering would drop
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
           "net.ipv4.conf.default.rp_filter=0")
        sh("ip", "-n", r, "link", "set", "lo", "up")
        sh("ip", "-n", r, "tuntap", "add", "dev", TUN, "mode", "tun")
        sh("ip", "-n", r, "link", "set", TUN, "mtu", str(self.link.mtu), "up")
        sh("ip", "-n", r, "route", "add", "default", "dev", TUN, "table", TABLE)

    def _peer(self, i: int) -> None:
        r, p, subnet, veth = self.router, self.peers[i], f"10.77.{i + 1}", f"vr{i}"
        sh("ip", "netns", "add", p)
        sh("ip", "-n", p, "link", "set", "lo", "up")
        sh("ip", "-n", r, "link", "add", veth, "mtu", str(self.link.mtu), "type", "veth", "peer", "name", "eth0",
           "netns", p)
        sh("ip", "-n", r, "addr", "add", f"{subnet}.1/24", "dev", veth)
        sh("ip", "-n", p, "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        sh("ip", "-n", r, "link", "set", veth, "up")
        sh("ip", "-n", p, "link", "set", "eth0", "up")
        sh("ip", "-n", p, "route", "add", "default", "via", f"{subnet}.1")
        sh("ip", "-n", r, "rule", "add", "iif", veth, "table", TABLE)
        self._shape(p, "eth0")
        self._shape(r, veth)

    def _shape(self, ns: str, dev: str) -> None:
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.link.rate_mbit}mbit",
           "burst", str(self.link.burst_bytes), "latency", f"{self.link.queue_ms}ms")

    def _start_delay_line(self) -> None:
        proc = self._spawn(self.router, [sys.executable, str(HERE / "delay.py"), "--dev", TUN,
                                         "--delay-ms", str(self.link.rtt_ms / 2)], stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise WanError("the delay line did not start (see its error above)")

    # -- processes

    def env(self, i: int) -> dict[str, str]:
        return dict(os.environ, **{TOKEN_ENV: self.token, "WAN_ADDR": self.address(i),
                                   "WAN_PEERS": " ".join(self.address(j) for j in range(self.n))})

    def popen(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in peer namespace ``i``; teardown kills it and everything it started there."""
        kwargs.setdefault("env", self.env(i))
        return self._spawn(self.peers[i], argv, **kwargs)

    def _spawn(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", dict(os.environ, **{TOKEN_ENV: self.token}))
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], preexec_fn=_die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup paths run."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


# ---- self-check ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCheck:
    rtt_ms_setting: float
    rtt_ms_median: float
    rtt_ms_min: float
    rtt_ms_max: float
    rate_mbit_setting: float
    goodput_mbit: float
    wire_mbit: float  # goodput plus the headers tbf counts: what compares with the rate setting
    mtu: int
    pings: int
    bulk_seconds: float

    @property
    def rtt_ok(self) -> bool:
        return abs(self.rtt_ms_median - self.rtt_ms_setting) <= TOLERANCE * self.rtt_ms_setting

    @property
    def rate_ok(self) -> bool:
        return abs(self.wire_mbit - self.rate_mbit_setting) <= TOLERANCE * self.rate_mbit_setting

    def to_dict(self) -> dict:
        figures = {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return {**figures, "rtt_ok": self.rtt_ok, "rate_ok": self.rate_ok}

    def lines(self) -> list[str]:
        mark = {True: "ok", False: "OFF BY MORE THAN 10%"}
        rtt = (f"RTT   median {self.rtt_ms_median:.1f} ms (min {self.rtt_ms_min:.1f}, max {self.rtt_ms_max:.1f}, "
               f"{self.pings} TCP round trips), setting {self.rtt_ms_setting:g} ms: {mark[self.rtt_ok]}")
        rate = (f"rate  {self.wire_mbit:.1f} Mbit/s on the wire ({self.goodput_mbit:.1f} Mbit/s TCP goodput over "
                f"{self.bulk_seconds:.1f} s), setting {self.rate_mbit_setting:g} Mbit/s: {mark[self.rate_ok]}")
        return [rtt, rate]


def selfcheck(topo: Topology, *, pings: int = 50, seconds: float = 10.0, warmup: float = 2.0) -> SelfCheck:
    """Ping-pong and bulk TCP from peer 1 to peer 0 through the topology's links."""
    probe = [sys.executable, str(HERE / "probe.py")]
    server = topo.popen(1, [*probe, "serve", "--bind", topo.address(1), "--port", str(PROBE_PORT)],
                        stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise WanError("the probe server did not start")
        target = ["--to", topo.address(1), "--port", str(PROBE_PORT)]
        rtts = _probe(topo, [*probe, "ping", *target, "--count", str(pings + 1)])["rtt_ms"][1:]  # first: cold
        bulk = _probe(topo, [*probe, "bulk", *target, "--seconds", str(seconds), "--warmup", str(warmup)],
                      timeout=seconds + warmup + 30)
    finally:
        server.kill()  # the links are free for whatever runs next
        server.wait()
    mss = topo.link.mtu - 52
    return SelfCheck(rtt_ms_setting=topo.link.rtt_ms, rtt_ms_median=statistics.median(rtts), rtt_ms_min=min(rtts),
                     rtt_ms_max=max(rtts), rate_mbit_setting=topo.link.rate_mbit, goodput_mbit=bulk["mbit"],
                     wire_mbit=bulk["mbit"] * (mss + TCP_OVERHEAD) / mss, mtu=topo.link.mtu, pings=len(rtts),
                     bulk_seconds=bulk["seconds"])


def _probe(topo: Topology, argv: list[str], timeout: float = 60.0) -> dict:
    proc = topo.popen(0, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WanError(f"the {argv[2]} probe did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise WanError(f"the {argv[2]} probe failed: {(err.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(out)


# ---- command line --------------------------------------------------------------------------------------


def add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtt-ms", type=float, default=100.0, help="round-trip time between peers (default: 100)")
    p.add_argument("--rate-mbit", type=float, default=50.0, help="each peer's up and down rate (default: 50)")
    p.add_argument("--mtu", type=int, default=1500, help="MTU of every link (default: 1500)")


def link_from(args: argparse.Namespace) -> Link:
    if args.rtt_ms <= 0 or args.rate_mbit <= 0 or not 576 <= args.mtu <= 65535:
        raise WanError("--rtt-ms and --rate-mbit must be positive and --mtu between 576 and 65535")
    return Link(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit, mtu=args.mtu)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Wide-area emulation with network namespaces (see the module docstring).")
    sub = p.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("selfcheck", help="measure RTT and rate through the links against the settings")
    add_link_args(check)
    check.add_argument("--seconds", type=float, default=10.0, help="bulk transfer measured this long (default: 10)")
    check.add_argument("--warmup", type=float, default=2.0, help="bulk seconds not measured (default: 2)")
    check.add_argument("--pings", type=int, default=50, help="TCP round trips for the RTT median (default: 50)")
    check.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    run = sub.add_parser("run", help="run command i (a shell line) in peer namespace i")
    add_link_args(run)
    run.add_argument("--peers", type=int, help="peer namespaces (default: one per command)")
    run.add_argument("commands", nargs="+", metavar="CMD")
    sub.add_parser("cleanup", help="remove namespaces and processes left by killed runs")
    return p


def cmd_selfcheck(args: argparse.Namespace) -> int:
    with Topology(2, link_from(args)) as topo:
        print(f"topology {topo.token} up", file=sys.stderr, flush=True)
        result = selfcheck(topo, pings=args.pings, seconds=args.seconds, warmup=args.warmup)
    print(json.dumps(result.to_dict()) if args.json else "\n".join(result.lines()), flush=True)
    return 0 if result.rtt_ok and result.rate_ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    peers = args.peers or len(args.commands)
    if len(args.commands) > peers:
        raise WanError(f"{len(args.commands)} commands but only {peers} peers")
    with Topology(max(peers, 2), link_from(args)) as topo:
        print(f"topology {topo.token} up: peers at {' '.join(map(topo.address, range(topo.n)))}", file=sys.stderr,
              flush=True)
        procs = [topo.popen(i, ["sh", "-c", cmd]) for i, cmd in enumerate(args.commands)]
        codes = [proc.wait() for proc in procs]
    return max(codes, key=abs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "cleanup":
            check_host()
            removed = cleanup_stale()
            print(f"removed {len(removed)} stale namespaces" + (f": {' '.join(removed)}" if removed else ""))
            return 0
        return cmd_selfcheck(args) if args.cmd == "selfcheck" else cmd_run(args)
    except WanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: namespaces and processes removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
