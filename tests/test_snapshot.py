"""Snapshot records, their JSON round trip, the Prometheus text, and the tracker driven by a fake clock."""
from __future__ import annotations

import json
import re

import pytest

from p2ptrain.snapshot import (Event, LedgerView, PeerReport, PeerView, Snapshot, SnapshotTracker,
                               to_prometheus)

T0 = 1_700_000_000.0


def peer(name: str, *, epoch: int = 5, role: str = "trainer", reach: str = "direct", **kw) -> PeerView:
    values = dict(peer_id=f"Qm{name}XYZ123", name=name, role=role, reachability=reach, epoch=epoch,
                  samples_per_second=40.0, loss=0.5, work_share=0.25, last_seen=T0 - 2)
    values.update(kw)
    return PeerView(**values)


def make_snapshot() -> Snapshot:
    peers = (peer("swift-red-fox"), peer("calm-teal-otter", reach="client", epoch=4, flagged=True),
             peer("bold-amber-heron", role="auxiliary", loss=None, work_share=None, samples_per_second=0.0),
             peer("shy-olive-newt", stale=True))
    return Snapshot(time=T0, run_id="demo", global_epoch=5, samples_accumulated=600, target_batch_size=1024,
                    samples_per_second=120.0, eta_seconds=3.5, uptime_seconds=3725.0, peers=peers,
                    loss_history=(2.3, 1.1, 0.5), throughput_history=(100.0, 110.0, 120.0),
                    ledger=LedgerView(records=40, verified=37, failed=2, flagged_peers=(peers[1].peer_id,)),
                    events=(Event(T0 - 10, "joined", "swift-red-fox", "trainer at epoch 5"),))


def report(name: str, t: float, *, epoch: int = 1, acc: int = 10, sps: float = 20.0, loss: float | None = 1.0,
           role: str = "trainer", client: bool = False, leaving: bool = False) -> PeerReport:
    return PeerReport(peer_id=f"Qm{name}", name=name, role=role, client_mode=client, epoch=epoch,
                      samples_accumulated=acc, samples_per_second=sps, loss=loss, time=t, leaving=leaving)


def kinds(snapshot: Snapshot) -> list[tuple[str, str]]:
    return [(e.kind, e.peer) for e in snapshot.events]


# --- records

def test_derived_counts_skip_stale_peers():
    s = make_snapshot()
    assert (s.n_trainers, s.n_clients, s.n_auxiliary) == (2, 1, 1)
    assert [p.name for p in s.lagging_peers] == ["calm-teal-otter"]
    assert s.progress == pytest.approx(600 / 1024)


def test_round_trip_through_json():
    s = make_snapshot()
    data = json.loads(json.dumps(s.to_dict()))
    assert Snapshot.from_dict(data) == s
    assert data["peers"][0]["name"] == "swift-red-fox" and data["ledger"]["failed"] == 2


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.pop("run_id"), "missing field(s) run_id"),
    (lambda d: d.update(extra=1), "unknown field(s) extra"),
    (lambda d: d.update(global_epoch="5"), "snapshot.global_epoch: expected int"),
    (lambda d: d.update(global_epoch=True), "snapshot.global_epoch: expected int"),
    (lambda d: d["peers"][1].update(role="boss"), "snapshot.peers[1].role: must be one of"),
    (lambda d: d["peers"][0].update(loss="low"), "snapshot.peers[0].loss: expected float"),
    (lambda d: d.update(peers={}), "snapshot.peers: expected a list"),
    (lambda d: d.update(ledger=[]), "snapshot.ledger: expected an object"),
])
def test_from_dict_is_strict(mutate, reason):
    data = make_snapshot().to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=re.escape(reason)):
        Snapshot.from_dict(data)


def test_from_dict_accepts_ints_for_floats_and_null_optionals():
    data = make_snapshot().to_dict()
    data.update(samples_per_second=120, eta_seconds=None, ledger=None)
    s = Snapshot.from_dict(data)
    assert isinstance(s.samples_per_second, float) and s.eta_seconds is None and s.ledger is None


# --- prometheus

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"(?:,|$)')


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict little parser of the text format: returns {metric: type} and (name, labels, value) samples."""
    assert text.endswith("\n")
    types, helps, samples = {}, set(), []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter") and name not in types
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"bad sample line: {line!r}"
            labels_text = m["labels"] or ""
            labels = {x["key"]: x["value"] for x in LABEL.finditer(labels_text)}
            assert "".join(x[0] for x in LABEL.finditer(labels_text)) == labels_text, line
            assert m["name"] in types, f"sample before its # TYPE: {line!r}"
            samples.append((m["name"], labels, float(m["value"])))
    assert helps == set(types)
    return types, samples


def test_prometheus_text_has_expected_metrics_and_labels():
    types, samples = parse_prometheus(to_prometheus(make_snapshot()))
    values = {(name, tuple(sorted(labels.items()))): v for name, labels, v in samples}
    assert values[("p2ptrain_global_epoch", ())] == 5
    assert values[("p2ptrain_samples_per_second", ())] == 120.0
    assert values[("p2ptrain_info", (("run_id", "demo"),))] == 1
    assert values[("p2ptrain_peers", (("role", "trainer"),))] == 2  # the stale trainer is not counted
    assert values[("p2ptrain_peers", (("role", "auxiliary"),))] == 1
    assert values[("p2ptrain_stale_peers", ())] == 1
    fox = (("peer", "swift-red-fox"), ("peer_id", "Qmswift-red-foxXYZ123"))
    assert values[("p2ptrain_peer_epoch", fox)] == 5
    assert values[("p2ptrain_peer_loss", fox)] == 0.5
    assert values[("p2ptrain_peer_work_share", fox)] == 0.25
    assert values[("p2ptrain_ledger_failed_records", ())] == 2
    assert values[("p2ptrain_ledger_flagged_peers", ())] == 1
    flagged = {labels["peer"]: v for name, labels, v in samples if name == "p2ptrain_peer_flagged"}
    assert flagged["calm-teal-otter"] == 1 and flagged["swift-red-fox"] == 0
    # An auxiliary peer has no loss: the series is absent, not a made-up zero.
    assert "bold-amber-heron" not in {labels.get("peer") for name, labels, _ in samples if name == "p2ptrain_peer_loss"}
    assert set(types.values()) == {"gauge"}


def test_prometheus_escapes_labels_and_omits_unknowns():
    s = Snapshot(time=T0, run_id='we"ird\\run\nid', global_epoch=0, samples_accumulated=0, target_batch_size=8,
                 samples_per_second=float("nan"), eta_seconds=None, uptime_seconds=0.0)
    text = to_prometheus(s)
    assert 'p2ptrain_info{run_id="we\\"ird\\\\run\\nid"} 1' in text
    assert "p2ptrain_samples_per_second NaN" in text
    assert "p2ptrain_eta_seconds" not in text and "p2ptrain_ledger_" not in text
    _, samples = parse_prometheus(text)
    assert ("p2ptrain_info", {"run_id": 'we\\"ird\\\\run\\nid'}, 1.0) in samples


# --- tracker

def test_tracker_join_stale_then_dropped():
    tracker = SnapshotTracker("demo", stale_after=10, drop_after=30)
    tracker.observe(report("fox", T0))
    tracker.observe(report("owl", T0))
    s = tracker.snapshot(T0 + 1, target_batch_size=100)
    assert [p.name for p in s.peers] == ["fox", "owl"] and not any(p.stale for p in s.peers)
    assert kinds(s) == [("joined", "fox"), ("joined", "owl")]
    assert s.samples_accumulated == 20 and s.samples_per_second == 40.0 and s.eta_seconds == pytest.approx(2.0)

    tracker.observe(report("owl", T0 + 9))  # owl keeps reporting, fox goes silent
    s = tracker.snapshot(T0 + 12, target_batch_size=100)
    assert {p.name: p.stale for p in s.peers} == {"fox": True, "owl": False}
    assert kinds(s)[-1] == ("stale", "fox") and s.samples_per_second == 20.0 and s.n_trainers == 1

    s = tracker.snapshot(T0 + 20, target_batch_size=100)  # owl silent for 11s now
    assert kinds(s)[2:] == [("stale", "fox"), ("stale", "owl")]  # fox logged once, not at every refresh

    s = tracker.snapshot(T0 + 31, target_batch_size=100)
    assert [p.name for p in s.peers] == ["owl"] and s.peers[0].stale
    assert kinds(s)[-1] == ("left", "fox") and s.events[-1].message == "no report for 31s"
    tracker.observe(report("fox", T0))  # its record still in the DHT, read again: it stays gone
    assert [p.name for p in tracker.snapshot(T0 + 200, target_batch_size=100).peers] == []
    assert s.uptime_seconds == 31.0


def test_stale_peer_that_reports_again_is_live():
    tracker = SnapshotTracker("demo", stale_after=5, drop_after=60)
    tracker.observe(report("fox", T0))
    assert tracker.snapshot(T0 + 6, target_batch_size=100).peers[0].stale
    tracker.observe(report("fox", T0))  # the collector re-reading the same old record changes nothing
    assert tracker.snapshot(T0 + 6.5, target_batch_size=100).peers[0].stale
    tracker.observe(report("fox", T0 + 7))
    s = tracker.snapshot(T0 + 8, target_batch_size=100)
    assert not s.peers[0].stale and kinds(s) == [("joined", "fox"), ("stale", "fox"), ("returned", "fox")]


def test_leaving_removes_at_once_and_old_reports_are_ignored():
    tracker = SnapshotTracker("demo")
    tracker.observe(report("fox", T0))
    tracker.observe(report("owl", T0))
    tracker.observe(report("fox", T0 + 1, leaving=True))
    tracker.observe(report("fox", T0 + 0.5))  # a delayed read of an older record must not resurrect it...
    s = tracker.snapshot(T0 + 1, target_batch_size=100)
    assert [p.name for p in s.peers] == ["owl"]
    assert kinds(s) == [("joined", "fox"), ("joined", "owl"), ("left", "fox")]
    tracker.observe(report("fox", T0 + 5))  # ...but a fresh report after leaving is a new join
    assert kinds(tracker.snapshot(T0 + 5, target_batch_size=100))[-1] == ("joined", "fox")


def test_leaving_unknown_peer_logs_nothing():
    tracker = SnapshotTracker("demo")
    tracker.observe(report("ghost", T0, leaving=True))
    assert tracker.snapshot(T0, target_batch_size=100).events == ()


def test_global_epoch_and_progress_from_reports():
    tracker = SnapshotTracker("demo")
    tracker.observe(report("fox", T0, epoch=3, acc=30))
    tracker.observe(report("owl", T0, epoch=3, acc=20, client=True))
    tracker.observe(report("newt", T0, epoch=2, acc=99))  # behind: its samples count toward nothing
    tracker.observe(report("heron", T0, role="auxiliary", epoch=3, acc=0, sps=0.0, loss=None))
    s = tracker.snapshot(T0 + 1, target_batch_size=100, work_shares={"Qmfox": 0.6})
    assert (s.global_epoch, s.samples_accumulated) == (3, 50)
    assert [p.name for p in s.lagging_peers] == ["newt"]
    assert (s.n_trainers, s.n_clients, s.n_auxiliary) == (3, 1, 1)
    views = {p.name: p for p in s.peers}
    assert views["owl"].reachability == "client" and views["fox"].reachability == "direct"
    assert views["fox"].work_share == 0.6 and views["owl"].work_share is None
    assert tracker.snapshot(T0 + 2, target_batch_size=100, global_epoch=7, samples_accumulated=1).global_epoch == 7


def test_flagged_peers_are_marked_and_logged_once():
    tracker = SnapshotTracker("demo")
    tracker.observe(report("fox", T0))
    ledger = LedgerView(records=3, verified=2, failed=1, flagged_peers=("Qmfox",))
    tracker.snapshot(T0 + 1, target_batch_size=10, ledger=ledger)
    s = tracker.snapshot(T0 + 2, target_batch_size=10, ledger=ledger)
    assert s.peers[0].flagged and s.ledger == ledger
    assert kinds(s).count(("flagged", "fox")) == 1


def test_history_is_bounded_and_sampled_by_interval():
    tracker = SnapshotTracker("demo", history=5, history_interval=1.0)
    for i in range(20):
        tracker.observe(report("fox", T0 + i, loss=float(i), sps=float(10 * i)))
        s = tracker.snapshot(T0 + i, target_batch_size=100)
        tracker.snapshot(T0 + i + 0.5, target_batch_size=100)  # a faster refresh adds no points
    assert s.loss_history == (15.0, 16.0, 17.0, 18.0, 19.0)
    assert s.throughput_history == (150.0, 160.0, 170.0, 180.0, 190.0)


def test_external_events_and_event_bound():
    tracker = SnapshotTracker("demo", max_events=3)
    for name in ("a", "b", "c"):
        tracker.observe(report(name, T0))
    tracker.add_event(Event(T0 + 1, "averaging_failed", "a", "timed out"))
    assert kinds(tracker.snapshot(T0 + 1, target_batch_size=10)) == [
        ("joined", "b"), ("joined", "c"), ("averaging_failed", "a")]


def test_tracker_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        SnapshotTracker("demo", stale_after=30, drop_after=10)
