"""What the monitor knows about the swarm at one moment, as plain frozen records (no network imports).

:class:`Snapshot` is the only input of the dashboard, ``--json`` and ``--prometheus``. Whoever talks to the
DHT turns what it reads into :class:`PeerReport` values and feeds them to a :class:`SnapshotTracker`, which
keeps history and staleness and hands out Snapshots. :class:`LocalStatus` is the one-peer view for ``join``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["trainer", "auxiliary", "bootstrap", "monitor"]
Reachability = Literal["direct", "relayed", "client"]
ROLES: tuple[str, ...] = typing.get_args(Role)
TRAINING_ROLES = ("trainer", "auxiliary")  # the roles that have an epoch


@dataclass(frozen=True)
class PeerView:
    """One peer as the monitor sees it.

    Args:
        peer_id: libp2p peer id (base58).
        name: readable three-word name.
        role: what the peer does in the swarm.
        reachability: "direct" (accepts connections), "relayed" (reached through a relay) or "client" (dials out only).
        epoch: the peer's local epoch.
        samples_per_second: the peer's recent training throughput.
        loss: last reported training loss, None if the peer reports none (auxiliary peers).
        work_share: fraction (0..1) of attested work in the ledger, None when no ledger is known.
        last_seen: unix time of the peer's last report.
        stale: no report for a while; still listed but not counted.
        leaving: the peer announced that it is leaving.
        flagged: the ledger flagged this peer (failed verification).
    """

    peer_id: str
    name: str
    role: Role
    reachability: Reachability
    epoch: int
    samples_per_second: float
    loss: float | None
    work_share: float | None
    last_seen: float
    stale: bool = False
    leaving: bool = False
    flagged: bool = False


@dataclass(frozen=True)
class LedgerView:
    """What the monitor knows of the contribution ledger.

    Args:
        records: work records known.
        verified: records whose spot check passed.
        failed: records whose spot check failed.
        flagged_peers: peer ids flagged for failed checks.
    """

    records: int
    verified: int
    failed: int
    flagged_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Event:
    """Something that happened in the swarm, for the event log.

    Args:
        time: unix time.
        kind: "joined", "left", "stale", "returned", "averaging_failed", "state_downloaded", "flagged", ...
        peer: readable name of the peer concerned ("" when none).
        message: free text detail.
    """

    time: float
    kind: str
    peer: str = ""
    message: str = ""


@dataclass(frozen=True)
class Snapshot:
    """The whole swarm at one moment.

    Args:
        time: unix time the snapshot was taken.
        run_id: the run the swarm trains.
        global_epoch: the swarm's epoch (the highest epoch among live peers).
        samples_accumulated: samples the swarm accumulated toward the next epoch.
        target_batch_size: samples per global epoch.
        samples_per_second: swarm throughput (sum over live peers).
        eta_seconds: estimated seconds to the next epoch, None when nobody is training.
        uptime_seconds: how long the monitor has been watching.
        peers: known peers, live and stale.
        loss_history: mean loss over time, oldest first.
        throughput_history: swarm samples/s over time, oldest first.
        ledger: the ledger summary, None when no ledger is known.
        events: recent events, oldest first.
    """

    time: float
    run_id: str
    global_epoch: int
    samples_accumulated: int
    target_batch_size: int
    samples_per_second: float
    eta_seconds: float | None
    uptime_seconds: float
    peers: tuple[PeerView, ...] = ()
    loss_history: tuple[float, ...] = ()
    throughput_history: tuple[float, ...] = ()
    ledger: LedgerView | None = None
    events: tuple[Event, ...] = ()

    @property
    def live_peers(self) -> tuple[PeerView, ...]:
        """Peers that are not stale."""
        return tuple(p for p in self.peers if not p.stale)

    @property
    def n_trainers(self) -> int:
        """Live peers computing gradients (client-mode trainers included)."""
        return sum(p.role == "trainer" for p in self.live_peers)

    @property
    def n_clients(self) -> int:
        """Live peers in client mode (they dial out only)."""
        return sum(p.reachability == "client" for p in self.live_peers)

    @property
    def n_auxiliary(self) -> int:
        """Live auxiliary peers (they help averaging, compute no gradients)."""
        return sum(p.role == "auxiliary" for p in self.live_peers)

    @property
    def lagging_peers(self) -> tuple[PeerView, ...]:
        """Training peers whose epoch is behind the global epoch (bootstrap and monitor peers have none)."""
        return tuple(p for p in self.peers if p.role in TRAINING_ROLES and p.epoch < self.global_epoch)

    @property
    def progress(self) -> float:
        """Fraction (0..1) of the target batch accumulated toward the next epoch."""
        return min(1.0, max(0.0, self.samples_accumulated / self.target_batch_size)) if self.target_batch_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and numbers, ready for ``json.dumps``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        """Rebuild a Snapshot from :meth:`to_dict` output.

        Args:
            data: the mapping to read; every field must be present with the right type, no extra keys.

        Raises:
            ValueError: naming the first field that is missing, unknown or ill-typed.
        """
        return _from_dict(cls, data, "snapshot")


@dataclass(frozen=True)
class LocalStatus:
    """One peer's own progress, for the compact status line of ``p2ptrain join``.

    Args:
        name: this peer's readable name.
        epoch: this peer's epoch.
        samples_accumulated: samples the swarm accumulated toward the next epoch, as this peer knows.
        target_batch_size: samples per global epoch.
        samples_per_second: this peer's throughput.
        loss: this peer's last loss, None before the first step.
        peers_last_round: size of the last averaging group, None before the first round.
        state: what the peer is doing: "training", "averaging", "loading state", ...
    """

    name: str
    epoch: int
    samples_accumulated: int
    target_batch_size: int
    samples_per_second: float
    loss: float | None = None
    peers_last_round: int | None = None
    state: str = "training"


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - names):
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
    if missing := sorted(names - set(data)):
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    return cls(**{name: _check(data[name], hints[name], f"{where}.{name}") for name in names})


def _check(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` converted to ``hint`` (dataclasses, tuples, unions, literals) or raise ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {', '.join(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


# --- Prometheus text exposition format (version 0.0.4)

def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def to_prometheus(snapshot: Snapshot) -> str:
    """The snapshot's figures in Prometheus text format, one ``# HELP``/``# TYPE`` block per metric.

    All metrics are gauges: the ledger figures count what the monitor currently knows, which can shrink
    when DHT records expire, so they are not counters. Per-peer metrics carry ``peer`` (readable name)
    and ``peer_id`` labels; absent values (no loss yet, no ledger) are left out rather than faked.

    Args:
        snapshot: the snapshot to expose.
    """
    lines: list[str] = []

    def metric(name: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        lines.append(f"# HELP p2ptrain_{name} {help_text}")
        lines.append(f"# TYPE p2ptrain_{name} gauge")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"p2ptrain_{name}{{{label_text}}} {_number(value)}" if label_text
                         else f"p2ptrain_{name} {_number(value)}")

    s = snapshot
    metric("info", "Run the monitor watches (always 1).", [({"run_id": s.run_id}, 1)])
    metric("global_epoch", "Global epoch of the swarm.", [({}, s.global_epoch)])
    metric("samples_accumulated", "Samples accumulated toward the next epoch.", [({}, s.samples_accumulated)])
    metric("target_batch_size", "Samples per global epoch.", [({}, s.target_batch_size)])
    metric("samples_per_second", "Swarm throughput in samples per second.", [({}, s.samples_per_second)])
    if s.eta_seconds is not None:
        metric("eta_seconds", "Estimated seconds to the next epoch.", [({}, s.eta_seconds)])
    metric("uptime_seconds", "Seconds the monitor has been watching.", [({}, s.uptime_seconds)])
    live = s.live_peers
    metric("peers", "Live peers by role.", [({"role": r}, sum(p.role == r for p in live)) for r in ROLES])
    metric("stale_peers", "Peers that stopped reporting but are still listed.", [({}, len(s.peers) - len(live))])

    def per_peer(name: str, help_text: str, get: typing.Callable[[PeerView], float | None]) -> None:
        metric(name, help_text, [({"peer": p.name, "peer_id": p.peer_id}, v)
                                 for p in s.peers for v in [get(p)] if v is not None])

    per_peer("peer_epoch", "Local epoch of the peer.", lambda p: p.epoch)
    per_peer("peer_samples_per_second", "Training throughput of the peer.", lambda p: p.samples_per_second)
    per_peer("peer_loss", "Last training loss reported by the peer.", lambda p: p.loss)
    per_peer("peer_work_share", "Fraction of attested work in the ledger.", lambda p: p.work_share)
    per_peer("peer_last_seen_timestamp_seconds", "Unix time of the peer's last report.", lambda p: p.last_seen)
    per_peer("peer_stale", "1 if the peer stopped reporting.", lambda p: p.stale)
    per_peer("peer_flagged", "1 if the ledger flagged the peer.", lambda p: p.flagged)
    if s.ledger is not None:
        metric("ledger_records", "Work records known.", [({}, s.ledger.records)])
        metric("ledger_verified_records", "Records whose spot check passed.", [({}, s.ledger.verified)])
        metric("ledger_failed_records", "Records whose spot check failed.", [({}, s.ledger.failed)])
        metric("ledger_flagged_peers", "Peers flagged for failed checks.", [({}, len(s.ledger.flagged_peers))])
    return "\n".join(lines) + "\n"


# --- turning reports over time into snapshots

@dataclass(frozen=True)
class PeerReport:
    """One peer's self-reported progress, as read from the DHT.

    Args:
        peer_id: libp2p peer id.
        name: readable name.
        role: what the peer does.
        client_mode: the peer dials out only.
        epoch: the peer's local epoch.
        samples_accumulated: samples the peer accumulated in its current epoch.
        samples_per_second: the peer's throughput.
        loss: last loss, None if none.
        time: unix time of the report.
        leaving: the peer announces that it is shutting down.
        relayed: the peer is reachable only through a relay.
    """

    peer_id: str
    name: str
    role: Role
    client_mode: bool
    epoch: int
    samples_accumulated: int
    samples_per_second: float
    loss: float | None
    time: float
    leaving: bool = False
    relayed: bool = False
    target_batch_size: int = 0  # samples per global epoch as this peer is configured (0: unknown)
    rounds_failed: int = 0  # averaging rounds this peer has had to finish alone so far
    state_downloads: int = 0  # times this peer downloaded the swarm's state


class SnapshotTracker:
    """Turns a stream of :class:`PeerReport` into :class:`Snapshot` values; the clock is passed in.

    A peer silent for ``stale_after`` seconds is shown stale, and dropped after ``drop_after`` seconds;
    a report with ``leaving=True`` drops it at once. Joins, departures and staleness become events.

    Args:
        run_id: the run being watched.
        stale_after: seconds without a report before a peer is shown stale.
        drop_after: seconds without a report before a peer leaves the table.
        history: points kept in the loss and throughput histories.
        history_interval: least seconds between two history points, so refresh rate doesn't set the scale.
        max_events: events kept.
        started_at: unix time the watch began (default: the first call that passes a time).
    """

    def __init__(self, run_id: str, *, stale_after: float = 15.0, drop_after: float = 60.0, history: int = 120,
                 history_interval: float = 1.0, max_events: int = 100, started_at: float | None = None) -> None:
        if not 0 < stale_after <= drop_after:
            raise ValueError(f"need 0 < stale_after <= drop_after, got {stale_after} and {drop_after}")
        self.run_id = run_id
        self.stale_after, self.drop_after, self.history_interval = stale_after, drop_after, history_interval
        self.started_at = started_at
        self._reports: dict[str, PeerReport] = {}
        self._stale: set[str] = set()
        # Peer id -> time of its last report, so re-reading a departed peer's record doesn't bring it back.
        # Never pruned: a DHT record can outlive any timeout we pick, and one float per departed peer is cheap.
        self._gone: dict[str, float] = {}
        self._flagged: set[str] = set()
        self._loss: deque[float] = deque(maxlen=history)
        self._throughput: deque[float] = deque(maxlen=history)
        self._last_point: float | None = None
        self._events: deque[Event] = deque(maxlen=max_events)

    def add_event(self, event: Event) -> None:
        """Log an event the tracker cannot see by itself (averaging failed, state downloaded, ...)."""
        self._events.append(event)

    def observe(self, report: PeerReport) -> None:
        """Take one report. The collector re-reads the same DHT records each refresh and reads can reorder,
        so a report no newer than the peer's last one is ignored (a stale peer's old record stays stale)."""
        if self.started_at is None:
            self.started_at = report.time
        known = self._reports.get(report.peer_id)
        if report.time <= (known.time if known else self._gone.get(report.peer_id, -math.inf)):
            return
        if report.leaving:
            if known is not None:
                self._forget(report.peer_id, report.time)
                self.add_event(Event(report.time, "left", report.name, "announced leaving"))
            return
        if known is None:
            self.add_event(Event(report.time, "joined", report.name, f"{report.role} at epoch {report.epoch}"))
        elif report.peer_id in self._stale:
            self._stale.discard(report.peer_id)
            self.add_event(Event(report.time, "returned", report.name, "reporting again"))
        self._reports[report.peer_id] = report

    def snapshot(self, now: float, *, target_batch_size: int, global_epoch: int | None = None,
                 samples_accumulated: int | None = None, ledger: LedgerView | None = None,
                 work_shares: Mapping[str, float] | None = None) -> Snapshot:
        """Expire silent peers, record a history point and return the swarm as of ``now``.

        Args:
            now: current unix time.
            target_batch_size: samples per global epoch.
            global_epoch: the swarm's epoch; default: the highest epoch among live peers.
            samples_accumulated: samples toward the next epoch; default: the sum over live peers at the
                global epoch (peers behind it do not count toward it, as in hivemind's progress tracker).
            ledger: ledger summary, if known; its flagged peers are marked and logged.
            work_shares: fraction of attested work by peer id.
        """
        if self.started_at is None:
            self.started_at = now
        self._expire(now)
        live = [r for pid, r in self._reports.items() if pid not in self._stale]
        if global_epoch is None:
            global_epoch = max((r.epoch for r in live), default=0)
        if samples_accumulated is None:
            samples_accumulated = sum(r.samples_accumulated for r in live if r.epoch == global_epoch)
        speed = sum(r.samples_per_second for r in live)
        flagged = set(ledger.flagged_peers) if ledger else set()
        for pid in sorted(flagged - self._flagged):
            report = self._reports.get(pid)
            self.add_event(Event(now, "flagged", report.name if report else pid, "failed a ledger check"))
        self._flagged = flagged
        if self._last_point is None or now - self._last_point >= self.history_interval:
            self._last_point = now
            self._throughput.append(speed)
            losses = [r.loss for r in live if r.loss is not None and math.isfinite(r.loss)]
            if losses:
                self._loss.append(sum(losses) / len(losses))
        shares = work_shares or {}
        peers = tuple(PeerView(
            peer_id=r.peer_id, name=r.name, role=r.role,
            reachability="client" if r.client_mode else "relayed" if r.relayed else "direct",
            epoch=r.epoch, samples_per_second=r.samples_per_second, loss=r.loss, work_share=shares.get(r.peer_id),
            last_seen=r.time, stale=r.peer_id in self._stale, flagged=r.peer_id in flagged,
        ) for r in sorted(self._reports.values(), key=lambda r: (r.name, r.peer_id)))
        remaining = max(0, target_batch_size - samples_accumulated)
        eta = remaining / speed if speed > 0 else None
        eta = eta if eta is not None and math.isfinite(eta) else None  # a tiny speed overflows it (no inf in JSON)
        return Snapshot(
            time=now, run_id=self.run_id, global_epoch=global_epoch, samples_accumulated=samples_accumulated,
            target_batch_size=target_batch_size, samples_per_second=speed,
            eta_seconds=eta, uptime_seconds=max(0.0, now - self.started_at),
            peers=peers, loss_history=tuple(self._loss), throughput_history=tuple(self._throughput),
            ledger=ledger, events=tuple(self._events),
        )

    def _forget(self, peer_id: str, last_time: float) -> None:
        del self._reports[peer_id]
        self._stale.discard(peer_id)
        self._gone[peer_id] = last_time

    def _expire(self, now: float) -> None:
        for pid, report in list(self._reports.items()):
            silent = now - report.time
            if silent >= self.drop_after:
                self._forget(pid, report.time)
                self.add_event(Event(now, "left", report.name, f"no report for {silent:.0f}s"))
            elif silent >= self.stale_after and pid not in self._stale:
                self._stale.add(pid)
                self.add_event(Event(now, "stale", report.name, f"no report for {silent:.0f}s"))
