"""Rich renderables for the swarm monitor and the ``join`` status line. They draw a snapshot, nothing more.

``Live(get_renderable=lambda: Dashboard(tracker.snapshot(time.time(), ...)))`` redraws each refresh; ``--once``
prints one ``Dashboard``. Gathering the snapshot lives in the swarm code (see :mod:`p2ptrain.snapshot`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from p2ptrain.snapshot import TRAINING_ROLES, LedgerView, LocalStatus, PeerView, Snapshot

SPARK_CHARS = "▁▂▃▄▅▆▇█"
EVENT_STYLES = {"joined": "green", "returned": "green", "left": "yellow", "stale": "yellow",
                "averaging_failed": "red", "flagged": "bold red", "state_downloaded": "cyan"}
NARROW = 100  # below this width the dashboard drops secondary columns and stacks panels


def sparkline(values: Sequence[float], width: int | None = None) -> str:
    """Draw ``values`` as one line of block characters, scaled between their min and max.

    Args:
        values: the series, oldest first; non-finite values are drawn as blanks.
        width: keep only the last ``width`` values (None: all).
    """
    if width is not None:
        values = values[-width:] if width > 0 else []
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    top = len(SPARK_CHARS) - 1
    if high == low:  # a flat series sits mid-height rather than looking like zero
        return "".join(SPARK_CHARS[top // 2] if math.isfinite(v) else " " for v in values)
    # Eight equal-width buckets between min and max; the max itself goes in the top one.
    return "".join(SPARK_CHARS[min(top, int((v - low) / (high - low) * len(SPARK_CHARS)))] if math.isfinite(v)
                   else " " for v in values)


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``1h02m``, ``2d03h``; ``--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def short_id(peer_id: str) -> str:
    """The last 6 characters of a peer id, prefixed by an ellipsis."""
    return "…" + peer_id[-6:]


def _loss(loss: float | None) -> str:
    return "--" if loss is None else f"{loss:.4f}"


def _speed(value: float) -> str:
    return f"{value:,.1f}"


def _progress(accumulated: int, target: int, width: int) -> Table:
    """A bar with ``accumulated/target samples NN%`` after it."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=width, no_wrap=True)
    grid.add_column(no_wrap=True)
    pct = 100 * accumulated / target if target else 0.0
    grid.add_row(ProgressBar(total=max(target, 1), completed=min(accumulated, target), width=width),
                 f"{accumulated:,}/{target:,} samples {pct:.0f}%")
    return grid


class Dashboard:
    """The live monitor view: header, peers, history, ledger and event log.

    Args:
        snapshot: what to draw.
        max_peers: table rows before "+N more"; None fits the table into the console height.
        max_events: events shown, newest last.
    """

    def __init__(self, snapshot: Snapshot, *, max_peers: int | None = None, max_events: int = 8) -> None:
        self.snapshot = snapshot
        self.max_peers = max_peers
        self.max_events = max_events

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        narrow = options.max_width < NARROW
        history, ledger = self._history(options.max_width // (1 if narrow else 2)), self._ledger()
        if narrow:
            lower: RenderableType = Group(history, ledger)
        else:
            lower = Table.grid(expand=True, padding=(0, 1))
            lower.add_column(ratio=1)
            lower.add_column(ratio=1)
            lower.add_row(history, ledger)
        events = self._events()
        # Rows left for peers once the fixed parts are drawn; a full screen of peers beats scrolling off.
        fixed = 5 + 3 + (8 if narrow else 4) + 2 + max(1, min(self.max_events, len(self.snapshot.events)))
        rows = self.max_peers if self.max_peers is not None else max(5, options.max_height - fixed)
        yield self._header(narrow)
        yield self._peers(rows, narrow)
        yield lower
        yield events

    def _header(self, narrow: bool) -> Panel:
        s = self.snapshot
        top = Table.grid(padding=(0, 2))
        top.add_row(Text(f"epoch {s.global_epoch}", style="bold"),
                    _progress(s.samples_accumulated, s.target_batch_size, 20 if narrow else 40),
                    f"ETA {format_duration(s.eta_seconds)}", f"up {format_duration(s.uptime_seconds)}")
        counts = Text.assemble((f"{_speed(s.samples_per_second)} samples/s", "bold"),
                               f"   trainers {s.n_trainers}   clients {s.n_clients}   auxiliary {s.n_auxiliary}")
        stale = len(s.peers) - len(s.live_peers)
        if stale:
            counts.append(f"   stale {stale}", style="dim")
        return Panel(Group(top, counts), title=f"[bold]p2ptrain swarm[/] · run [cyan]{s.run_id}[/]",
                     title_align="left")

    def _peers(self, rows: int, narrow: bool) -> RenderableType:
        s = self.snapshot
        if not s.peers:
            return Panel(Text("no peers yet — waiting for reports", style="dim italic"), title="peers",
                         title_align="left")
        # Narrow screens get one space between columns so that every figure still fits in 80 columns.
        table = Table(expand=True, pad_edge=False, box=None, header_style="bold", collapse_padding=narrow)
        table.add_column("peer", no_wrap=True, overflow="ellipsis", ratio=1)
        if not narrow:
            table.add_column("id", no_wrap=True)
        table.add_column("role", no_wrap=True)
        table.add_column("reach", no_wrap=True)
        table.add_column("epoch", justify="right", no_wrap=True)
        table.add_column("samples/s", justify="right", no_wrap=True)
        table.add_column("loss", justify="right", no_wrap=True)
        table.add_column("work", justify="right", no_wrap=True)
        if not narrow:
            table.add_column("seen", justify="right", no_wrap=True)
        table.add_column("status", no_wrap=True)
        # Flagged first (they need attention), then live before stale; by name so rows don't jump around.
        peers = sorted(s.peers, key=lambda p: (not p.flagged, p.stale, p.name, p.peer_id))
        shown = peers if len(peers) <= rows else peers[:max(1, rows - 1)]
        for peer in shown:
            table.add_row(*self._peer_row(peer, narrow), style="dim" if peer.stale else None)
        if len(shown) < len(peers):
            table.add_row(Text(f"+{len(peers) - len(shown)} more", style="italic"))
        return Panel(table, title=f"peers ({len(s.live_peers)} live)", title_align="left")

    def _peer_row(self, p: PeerView, narrow: bool) -> list[RenderableType]:
        s = self.snapshot
        lag = s.global_epoch - p.epoch
        epoch = Text(str(p.epoch) if p.role in TRAINING_ROLES else "--")
        if lag > 0 and p.role in TRAINING_ROLES:
            epoch = Text(f"{p.epoch} (-{lag})", style="yellow")  # behind the swarm: will download state
        status = [word for word, on in (("flagged", p.flagged), ("stale", p.stale), ("leaving", p.leaving)) if on]
        cells: list[RenderableType] = [Text(p.name, style="bold red" if p.flagged else "")]
        if not narrow:
            cells.append(short_id(p.peer_id))
        cells += [p.role, p.reachability, epoch, _speed(p.samples_per_second), _loss(p.loss),
                  "--" if p.work_share is None else f"{100 * p.work_share:.1f}%"]
        if not narrow:
            cells.append(f"{format_duration(s.time - p.last_seen)} ago")
        cells.append(Text(" ".join(status) or "ok", style="bold red" if p.flagged else "dim" if status else "green"))
        return cells

    def _history(self, width: int) -> Panel:
        s = self.snapshot
        spark_width = max(8, width - 26)  # room for the label, the latest value and the panel border
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, style="cyan")
        grid.add_column(no_wrap=True, justify="right")
        for label, values, fmt in (("loss", s.loss_history, _loss), ("samples/s", s.throughput_history, _speed)):
            latest = fmt(values[-1]) if values else "--"
            grid.add_row(label, sparkline(values, spark_width) or "(no data yet)", latest)
        return Panel(grid, title="history", title_align="left")

    def _ledger(self) -> Panel:
        ledger: LedgerView | None = self.snapshot.ledger
        if ledger is None:
            return Panel(Text("no ledger records known", style="dim"), title="ledger", title_align="left")
        names = {p.peer_id: p.name for p in self.snapshot.peers}
        text = Text.assemble(f"records {ledger.records:,}   ", ("verified ", ""), (f"{ledger.verified:,}", "green"),
                             "   failed ", (f"{ledger.failed:,}", "red" if ledger.failed else ""))
        text.append("\nflagged ")
        if ledger.flagged_peers:
            text.append(", ".join(names.get(pid, short_id(pid)) for pid in ledger.flagged_peers), style="bold red")
        else:
            text.append("none", style="dim")
        return Panel(text, title="ledger", title_align="left")

    def _events(self) -> Panel:
        events = self.snapshot.events[-self.max_events:] if self.max_events > 0 else ()
        if not events:
            return Panel(Text("no events yet", style="dim"), title="events", title_align="left")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
        for e in events:
            grid.add_row(time.strftime("%H:%M:%S", time.localtime(e.time)),
                         Text(e.kind.replace("_", " "), style=EVENT_STYLES.get(e.kind, "")), e.peer, e.message)
        return Panel(grid, title="events", title_align="left")


class PeerStatusLine:
    """One compact line of a training peer's own progress, for ``p2ptrain join``.

    Args:
        status: what to draw.
        bar_width: width of the progress bar in cells.
    """

    def __init__(self, status: LocalStatus, *, bar_width: int = 20) -> None:
        self.status = status
        self.bar_width = bar_width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        st = self.status
        state_style = {"training": "green", "averaging": "cyan", "loading state": "yellow"}.get(st.state, "")
        peers = "--" if st.peers_last_round is None else str(st.peers_last_round)
        # Two short lines rather than one long one, so nothing is cut at 80 columns.
        yield Text.assemble((st.name, "bold"), "  ", (f"epoch {st.epoch}", "bold"), "  ", (st.state, state_style),
                            f"  peers in last round {peers}")
        figures = Table.grid(padding=(0, 2))
        figures.add_row(_progress(st.samples_accumulated, st.target_batch_size, self.bar_width),
                        f"{_speed(st.samples_per_second)} samples/s", f"loss {_loss(st.loss)}")
        yield figures
