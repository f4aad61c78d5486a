"""Real swarms on 127.0.0.1: training together, late joiners, crashes, Ctrl-C and resuming.

Every peer is a ``python -m p2ptrain`` subprocess (see ``conftest.Swarm``); nothing in hivemind is mocked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from p2ptrain.ledger.audit import verify
from p2ptrain.ledger.fairness import fairness
from p2ptrain.ledger.store import Ledger

if TYPE_CHECKING:
    from conftest import Swarm

FRESH_LOSS = 2.3  # cross-entropy of an untrained 10-class model (ln 10)
# one digits-mlp epoch takes ~1.3 s with 2-3 peers on 2 idle cores; leave room for a busy machine
EPOCH_TIMEOUT = 60.0
SOLO_EPOCH_TIMEOUT = 30.0  # a peer alone waits for nobody; 30 s is more than any busy machine needs


@pytest.mark.timeout(600)
def test_three_peers_train_together(swarm: Swarm) -> None:
    swarm.bootstrap()
    peers = [swarm.join(name, "--min-peers", "3", "--max-epochs", "40",
                        "--checkpoint-dir", str(swarm.directory / f"{name}-checkpoint"), wait_up=False)
             for name in ("a", "b", "c")]

    codes = swarm.wait_all(peers, timeout=480)

    for peer, code in zip(peers, codes):
        assert code == 0, peer.describe()
        summary = peer.summary()
        assert summary["epoch"] == 40 and not summary["interrupted"], peer.describe()
        assert summary["accuracy"] >= 0.95, peer.describe()
        # rounds really averaged across peers, not trained alone
        assert summary["rounds"] > 0 and summary["rounds_averaged"] >= 0.8 * summary["rounds"], peer.describe()
        assert any(e.group_size == 3 for e in peer.epochs()), peer.describe()
        meta = json.loads((Path(summary["checkpoint"]) / "meta.json").read_text())
        assert meta["epoch"] == 40 and meta["test_accuracy"] == summary["accuracy"]

    # the ledger (issue 3): every peer's copy verifies clean, the copies hold the same records, and the
    # fairness shares add up to 1 and follow each peer's attested samples
    ledgers = [Ledger(peer.summary()["ledger"], create=False) for peer in peers]
    try:
        record_sets = [{record.hash for record in ledger.records()} for ledger in ledgers]
        for peer, ledger in zip(peers, ledgers):
            assert peer.summary()["ledger_clean"], peer.describe()
            report = verify(ledger.records())
            assert report.ok, [problem.describe() for problem in report.problems]
        assert record_sets[0] == record_sets[1] == record_sets[2]
        fair = fairness(ledgers[0].records())
        assert sorted(share.name for share in fair.peers) == sorted(p.summary()["name"] for p in peers)
        assert sum(share.share for share in fair.peers) == pytest.approx(1.0)
        for share in fair.peers:
            assert share.share == pytest.approx(share.samples_attested / fair.total_attested)
            assert 0 < share.samples_attested <= share.samples_claimed  # rounds alone attest nothing
            peer_summary = next(p.summary() for p in peers if p.summary()["name"] == share.name)
            assert share.samples_claimed <= peer_summary["samples"]
    finally:
        for ledger in ledgers:
            ledger.close()


@pytest.mark.timeout(600)
def test_late_joiner_downloads_the_swarm_state(swarm: Swarm) -> None:
    swarm.bootstrap()
    common = ("--min-peers", "2", "--max-epochs", "60")
    early = [swarm.join(name, *common, "--checkpoint-dir", str(swarm.directory / f"{name}-checkpoint"),
                        wait_up=False) for name in ("a", "b")]
    at_join = early[0].wait_for_epoch(10, timeout=300)

    late = swarm.join("late", *common, "--checkpoint-dir", str(swarm.directory / "late-checkpoint"))
    downloaded = int(late.wait_for(r"state downloaded: now at epoch (\d+)").group(1))
    first = late.wait_for_epoch(downloaded + 1, timeout=EPOCH_TIMEOUT)

    # the state came from the swarm: at least the epoch the others had reached when the late peer started
    assert downloaded >= at_join.epoch, late.describe()
    # its first loss is measured on the weights it loaded, before its first update: the swarm's trained
    # weights give about the swarm's loss at that epoch; a fresh init would give ~2.3
    logged = {e.epoch: e.loss for peer in reversed(early) for e in peer.epochs() if e.epoch <= first.epoch}
    reference = logged[max(logged)]  # the others' loss at that epoch, or the closest one before it
    assert first.loss < min(reference + 0.4, 0.6 * FRESH_LOSS), (first, reference, late.describe())

    # and it trains with them: a later round averaged all three
    late.wait_until(lambda: any(e.group_size == 3 for e in late.epochs()), "a round averaged with both others",
                    timeout=EPOCH_TIMEOUT * 2)

    for peer in (late, *early):
        peer.interrupt()
    for peer, code in zip((late, *early), swarm.wait_all([late, *early], timeout=60)):
        summary = peer.summary()
        assert code == 0 and (summary["interrupted"] or summary["epoch"] == 60), peer.describe()


@pytest.mark.timeout(600)
def test_survivors_finish_after_a_peer_is_killed(swarm: Swarm) -> None:
    swarm.bootstrap()
    a, b, victim = (swarm.join(name, "--min-peers", "3", "--max-epochs", "15", wait_up=False)
                    for name in ("a", "b", "victim"))
    victim.wait_for_epoch(4, timeout=300)

    victim.remember_descendants()  # whatever outlives it is killed at teardown
    victim.popen.kill()  # kill -9 of the trainer process itself, as the OOM killer would
    victim.wait(10)
    killed_at = max((e.epoch for e in a.epochs()), default=0)

    for peer, code in zip((a, b), swarm.wait_all([a, b], timeout=300)):
        assert code == 0, peer.describe()
        summary = peer.summary()
        assert summary["epoch"] == 15 and not summary["interrupted"], peer.describe()
        after = [e for e in peer.epochs() if e.epoch > killed_at + 2]  # a round or two may fail on the way
        assert after and any(e.group_size == 2 for e in after), peer.describe()  # still averaging, as two


@pytest.mark.timeout(600)
def test_ctrl_c_writes_a_checkpoint_and_resume_continues(swarm: Swarm) -> None:
    swarm.bootstrap()
    checkpoint_dir = swarm.directory / "a-checkpoint"
    # --checkpoint-every 1000: the only checkpoint is the one written on the way out
    a, b = (swarm.join(name, "--min-peers", "2", "--max-epochs", "60", "--checkpoint-every", "1000",
                       "--checkpoint-dir", str(swarm.directory / f"{name}-checkpoint"), wait_up=False)
            for name in ("a", "b"))
    a.wait_for_epoch(8, timeout=300)  # far enough from a fresh init (loss ~1.1 against 2.3) to tell them apart

    a.interrupt()  # what Ctrl-C in a terminal does: SIGINT to the peer's whole process group
    # the summary is printed last, once the checkpoint is written and the peer has left the swarm
    a.wait_for(r'^\{.*"interrupted"', stream="stdout", timeout=10)
    # what remains is the interpreter's own teardown (~1 s of CPU), slow only on a starved machine
    assert a.wait(30) == 0, a.describe()
    summary = a.summary()
    assert summary["interrupted"] and 8 <= summary["epoch"] < 60, a.describe()
    meta = json.loads((checkpoint_dir / "meta.json").read_text())
    assert meta["epoch"] == summary["epoch"], a.describe()
    # with local updates (the task's default) the state worth keeping is the inner Adam's, not the outer SGD's
    assert meta["optimizer"]["class"] == "Adam" and meta["optimizer"]["state"], meta["optimizer"]
    assert f"checkpoint written to {checkpoint_dir} (epoch {meta['epoch']}" in a.stderr()
    stopped_at = meta["epoch"]

    b.interrupt()  # the other one stops cleanly too (its round with a may have to time out first)
    assert b.wait(60) == 0 and b.summary()["interrupted"], b.describe()

    # alone in a new swarm, so no other peer's state can hide where the weights came from
    resumed = swarm.join("a-resumed", "--resume", "--checkpoint-dir", str(checkpoint_dir),
                         "--max-epochs", str(stopped_at + 3), identity=swarm.directory / "a.key",
                         initial_peers=False)
    resumed.wait_for(rf"resumed from {checkpoint_dir} at epoch {stopped_at}\b")
    # alone, an epoch is ~30 local steps of ~1 ms: nothing to wait for
    resumed.wait_for_epoch(stopped_at + 1, timeout=SOLO_EPOCH_TIMEOUT)
    assert resumed.wait(EPOCH_TIMEOUT) == 0, resumed.describe()
    epochs = resumed.epochs()
    assert [e.epoch for e in epochs] == [stopped_at + 1, stopped_at + 2, stopped_at + 3], resumed.describe()
    # the first loss is measured on the checkpoint's weights: near where a stopped, far from a fresh init
    assert epochs[0].loss < min(a.epochs()[-1].loss + 0.2, FRESH_LOSS - 0.5), (a.epochs()[-1], resumed.describe())
    summary = resumed.summary()
    assert summary["epoch"] == stopped_at + 3 and not summary["interrupted"], resumed.describe()
    assert "state downloaded" not in resumed.stderr(), resumed.describe()

