"""The dashboard and status line drawn into a plain-text console: assert on what a person would read."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from p2ptrain.dashboard import Dashboard, PeerStatusLine, format_duration, short_id, sparkline
from p2ptrain.snapshot import Event, LedgerView, LocalStatus, PeerView, Snapshot

T0 = 1_700_000_000.0


def render(renderable, width: int = 120, height: int = 25) -> str:
    console = Console(file=io.StringIO(), width=width, height=height, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()


def peer(name: str, **kw) -> PeerView:
    values = dict(peer_id=f"12D3KooW{name}Ab12Cd", name=name, role="trainer", reachability="direct", epoch=7,
                  samples_per_second=44.0, loss=0.4694, work_share=0.46, last_seen=T0 - 2)
    values.update(kw)
    return PeerView(**values)


def snapshot(peers: tuple[PeerView, ...] = (), **kw) -> Snapshot:
    values = dict(time=T0, run_id="digits-demo", global_epoch=7, samples_accumulated=550, target_batch_size=1024,
                  samples_per_second=98.0, eta_seconds=4.8, uptime_seconds=3725.0, peers=peers,
                  loss_history=(2.3, 1.7, 1.2, 0.9, 0.47), throughput_history=(80.0, 95.0, 98.0),
                  ledger=None, events=())
    values.update(kw)
    return Snapshot(**values)


FOUR = (peer("swift-red-fox"),
        peer("calm-teal-otter", reachability="client", epoch=6, samples_per_second=54.0, flagged=True),
        peer("bold-amber-heron", role="auxiliary", reachability="relayed", samples_per_second=0.0, loss=None,
             work_share=None),
        peer("shy-olive-newt", stale=True, last_seen=T0 - 30, loss=0.6871))


def sample() -> Snapshot:
    return snapshot(FOUR, ledger=LedgerView(412, 398, 3, (FOUR[1].peer_id,)), events=(
        Event(T0 - 80, "joined", "swift-red-fox", "trainer at epoch 7"),
        Event(T0 - 14, "stale", "shy-olive-newt", "no report for 16s"),
        Event(T0 - 1, "averaging_failed", "calm-teal-otter", "group of 2 timed out"),
        Event(T0, "flagged", "calm-teal-otter", "failed a ledger check")))


def test_header_figures():
    text = render(Dashboard(sample()))
    assert "digits-demo" in text
    assert "epoch 7" in text and "550/1,024 samples 54%" in text
    assert "ETA 4s" in text and "up 1h02m" in text
    assert "98.0 samples/s" in text
    assert "trainers 2" in text and "clients 1" in text and "auxiliary 1" in text and "stale 1" in text


def test_peer_rows():
    text = render(Dashboard(sample()))
    rows = {name: next(x for x in text.splitlines() if f"│ {name}" in x) for name in
            ("swift-red-fox", "calm-teal-otter", "bold-amber-heron", "shy-olive-newt")}
    fox = rows["swift-red-fox"]
    assert "…Ab12Cd" in fox  # short id: an ellipsis and the last 6 characters
    assert "trainer" in fox and "direct" in fox and "44.0" in fox and "0.4694" in fox and "46.0%" in fox
    assert "2s ago" in fox and fox.rstrip("│ ").endswith("ok")
    otter = rows["calm-teal-otter"]
    assert "client" in otter and "6 (-1)" in otter and "flagged" in otter  # lagging epoch is marked
    heron = rows["bold-amber-heron"]
    assert "auxiliary" in heron and "relayed" in heron and heron.count("--") == 2
    newt = rows["shy-olive-newt"]
    assert "stale" in newt and "30s ago" in newt
    # Flagged peers come first so they are seen; the stale one comes last.
    order = [n for line in text.splitlines() for n in rows if f"│ {n}" in line]
    assert order[0] == "calm-teal-otter" and order[-1] == "shy-olive-newt"
    assert "peers (3 live)" in text


def test_history_ledger_and_events():
    text = render(Dashboard(sample()))
    assert "█" in text and "▁" in text and "0.4700" in text
    assert "records 412" in text and "verified 398" in text and "failed 3" in text
    assert "flagged calm-teal-otter" in text  # flagged peer ids shown by name when known
    for words in ("joined", "swift-red-fox", "stale", "averaging failed", "group of 2 timed out",
                  "failed a ledger check"):
        assert words in text


def test_empty_swarm():
    text = render(Dashboard(snapshot(loss_history=(), throughput_history=(), eta_seconds=None)))
    assert "no peers yet — waiting for reports" in text
    assert "ETA --" in text and "no ledger records known" in text and "no events yet" in text
    assert "(no data yet)" in text


def test_fifty_peers_truncated_with_more_row():
    peers = tuple(peer(f"peer-{i:02d}") for i in range(50))
    text = render(Dashboard(snapshot(peers)), height=40)
    shown = sum(f"│ peer-{i:02d}" in text for i in range(50))
    assert 5 <= shown < 50 and f"+{50 - shown} more" in text
    assert len(text.splitlines()) <= 40  # fits the screen
    text = render(Dashboard(snapshot(peers), max_peers=10))
    assert "peer-08" in text and "peer-09" not in text and "+41 more" in text
    assert "more" not in render(Dashboard(snapshot(peers), max_peers=50))


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("count", [0, 4, 50])
def test_renders_at_common_widths(width, count):
    peers = FOUR if count == 4 else tuple(peer(f"patient-fuchsia-pelican-{i}") for i in range(count))
    text = render(Dashboard(snapshot(peers, ledger=LedgerView(1, 1, 0), events=sample().events)), width=width)
    assert all(len(line) <= width for line in text.splitlines())
    if count:
        assert "samples/s" in text and "status" in text
    if count == 4 and width == 80:  # narrow: the id and last-seen columns go, the figures stay whole
        row = next(x for x in text.splitlines() if "│ calm-teal-otter" in x)
        assert "54.0" in row and "0.4694" in row and "46.0%" in row and "flagged" in row


def test_peer_status_line():
    status = LocalStatus(name="swift-red-fox", epoch=7, samples_accumulated=640, target_batch_size=1024,
                         samples_per_second=45.2, loss=0.4123, peers_last_round=3, state="averaging")
    for width in (80, 120):
        text = render(PeerStatusLine(status), width=width)
        assert len(text.splitlines()) == 2
        for words in ("swift-red-fox", "epoch 7", "averaging", "peers in last round 3",
                      "640/1,024 samples 62%", "45.2 samples/s", "loss 0.4123", "━"):
            assert words in text
    fresh = render(PeerStatusLine(LocalStatus("owl", 0, 0, 64, 0.0, state="loading state")))
    assert "loss --" in fresh and "peers in last round --" in fresh and "loading state" in fresh


def test_helpers():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, 5.0]) == "▄▄" and sparkline([]) == ""
    assert sparkline([0, float("nan"), 1]) == "▁ █" and sparkline(range(100), width=3) == "▁▅█"
    assert [format_duration(x) for x in (None, 5, 185, 3725, 2 * 86400 + 3 * 3600)] == \
        ["--", "5s", "3m05s", "1h02m", "2d03h"]
    assert short_id("12D3KooWabcdefXYZ123") == "…XYZ123"
