"""verify catches each kind of tampering and names it; the fairness report counts only attested work."""
from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest

from p2ptrain.identity import Identity
from p2ptrain.ledger import Ledger, LedgerWriter, fairness, from_json, gini, sign, verify
from p2ptrain.ledger.audit import PROBLEM_CODES
from p2ptrain.ledger.simulate import make_peers, run_round

RUN = "audit-run"


@pytest.fixture
def swarm(tmp_path):
    """3 peers, 4 clean rounds, everything in one shared ledger; returns (peers, exported JSONL lines)."""
    ledger = Ledger(tmp_path / "ledger.sqlite", run_id=RUN)
    peers = make_peers(tmp_path, 3, RUN, shared_ledger=ledger)
    for epoch in range(4):
        run_round(peers, epoch, heldout_loss=2.0 - 0.25 * epoch)
    ledger.export_jsonl(tmp_path / "clean.jsonl")
    lines = (tmp_path / "clean.jsonl").read_text().splitlines()
    return peers, lines


def audit(lines):
    return verify([(from_json(line), f"line {i}") for i, line in enumerate(lines, 1)])


def codes(report):
    return {p.code for p in report.problems}


def find(lines, peer, seq):
    """Index of the line holding ``peer``'s record number ``seq``."""
    key = peer.identity.public_key.hex()
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if obj["public_key"] == key and obj["seq"] == seq:
            return i
    raise LookupError(seq)


def the_problem(report, code):
    found = [p for p in report.problems if p.code == code]
    assert found, f"no {code} in {[p.describe() for p in report.problems]}"
    return found[0]


def test_clean_ledger_verifies(swarm):
    _, lines = swarm
    report = audit(lines)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.summary() == {"ok": True, "run_id": RUN, "records": 24, "peers": 3, "claims": 12, "receipts": 4,
                                "cosignatures": 12, "problems": 0, "pending": 0}


def test_byte_flipped_inside_a_record(swarm):
    peers, lines = swarm
    i = find(lines, peers[1], 2)
    at = lines[i].index('"grad_digest":"') + len('"grad_digest":"') + 5
    flipped = lines[i][:at] + ("0" if lines[i][at] != "0" else "1") + lines[i][at + 1:]
    report = audit(lines[:i] + [flipped] + lines[i + 1:])
    problem = the_problem(report, "bad_signature")
    assert problem.peer == peers[1].identity.public_key and problem.where == f"line {i + 1}" and problem.seq == 2
    assert "signature does not verify" in problem.describe() and peers[1].identity.name in problem.describe()
    assert "chain_gap" not in codes(report)  # an altered record is reported once, not also as a hole


def test_byte_flipped_inside_a_row_of_the_sqlite_ledger(swarm, tmp_path):
    peers, _ = swarm
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER records_no_update")  # what an editor of the file can do
        row_id, text = db.execute("SELECT id, json FROM records WHERE kind = 'claim' AND seq = 4 AND public_key = ?",
                                  (peers[0].identity.public_key.hex(),)).fetchone()
        db.execute("UPDATE records SET json = ? WHERE id = ?", (text.replace('"samples":100', '"samples":900'), row_id))
    with Ledger(path, create=False) as ledger:
        report = verify(ledger.entries(), run_id=ledger.run_id)
    problem = the_problem(report, "bad_signature")
    assert problem.where == f"row {row_id}" and problem.peer == peers[0].identity.public_key


def test_record_removed_from_the_middle_of_a_chain(swarm):
    peers, lines = swarm
    i = find(lines, peers[2], 3)
    report = audit(lines[:i] + lines[i + 1:])
    problem = the_problem(report, "chain_gap")
    assert problem.peer == peers[2].identity.public_key and "seq 3" in problem.message


def test_two_records_swapped(swarm):
    peers, lines = swarm
    i, j = find(lines, peers[0], 4), find(lines, peers[0], 6)
    lines[i], lines[j] = lines[j], lines[i]
    reordered = [p for p in audit(lines).problems if p.code == "chain_reordered"]
    assert {p.peer for p in reordered} == {peers[0].identity.public_key}
    assert any("seq 4 comes after seq 6" in p.message for p in reordered)


def test_swapped_rows_in_the_sqlite_ledger(swarm, tmp_path):
    peers, _ = swarm
    path = tmp_path / "ledger.sqlite"
    key = peers[0].identity.public_key.hex()
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER records_no_update")
        (a, ta), (b, tb) = db.execute("SELECT id, json FROM records WHERE public_key = ? AND seq IN (2, 3) "
                                      "ORDER BY seq", (key,)).fetchall()
        db.execute("UPDATE records SET json = ? WHERE id = ?", (tb, a))
        db.execute("UPDATE records SET json = ? WHERE id = ?", (ta, b))
    with Ledger(path, create=False) as ledger:
        assert "chain_reordered" in codes(verify(ledger.entries(), run_id=ledger.run_id))


def test_claim_resigned_with_another_key(swarm):
    peers, lines = swarm
    i = find(lines, peers[0], 2)
    claim = from_json(lines[i])
    forged = dataclasses.replace(claim, signature=peers[1].identity.sign(claim.signing_bytes))
    problem = the_problem(audit(lines[:i] + [forged.to_json()] + lines[i + 1:]), "bad_signature")
    assert problem.peer == peers[0].identity.public_key and problem.epoch == 1


def test_claim_taken_over_by_another_key(swarm):
    """Peer 1 re-signs peer 0's claim as its own: its chain forks and the epoch is claimed twice."""
    peers, lines = swarm
    claim = from_json(lines[find(lines, peers[0], 2)])
    mine = from_json(lines[find(lines, peers[1], 2)])
    stolen = sign(dataclasses.replace(claim, public_key=peers[1].identity.public_key, seq=mine.seq,
                                      prev_hash=mine.prev_hash, samples=claim.samples * 2), peers[1].identity)
    report = audit(lines + [stolen.to_json()])
    assert {"chain_fork", "double_claim", "claim_exceeds_weight"} <= codes(report)
    assert the_problem(report, "double_claim").peer == peers[1].identity.public_key


def test_claim_copied_from_another_run(swarm, tmp_path):
    peers, lines = swarm
    other = Ledger(tmp_path / "other.sqlite", run_id="other-run")
    copied = LedgerWriter(peers[0].identity, "other-run", other).claim(1, 100, 1.0, {"seed": 1}, "a" * 64,
                                                                       "b" * 64, 0.5)
    report = audit(lines + [copied.to_json()])
    problem = the_problem(report, "other_run")
    assert problem.peer == peers[0].identity.public_key and "'other-run'" in problem.message
    assert problem.where == f"line {len(lines) + 1}"


def test_claim_ten_times_its_allreduce_weight(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    peers = make_peers(tmp_path, 3, RUN, shared_ledger=ledger)
    claims = [p.writer.claim(0, n, 1.0, {"seed": 0}, "a" * 64, "b" * 64, 0.5) for p, n in zip(peers, (100, 1000, 100))]
    weights = {p.identity.public_key: 100 for p in peers}  # the all-reduce used 100 samples from each
    for p in peers:
        p.writer.cosign(0, weights, "c" * 64)
    report = verify(ledger.records())
    [problem] = report.problems
    assert problem.code == "claim_exceeds_weight" and problem.peer == peers[1].identity.public_key
    assert "claims 1000 samples but its group used weight 100" in problem.message and "10.0x" in problem.message
    assert problem.record == claims[1].hash
    flags = {p.name: p.flags for p in fairness(report).peers}
    assert flags[peers[1].identity.name] == ("claim_exceeds_weight",)
    assert fairness(report).flagged == (peers[1].identity.name,)


def test_receipt_with_a_forged_cosignature(swarm, tmp_path):
    peers, lines = swarm
    i = find(lines, peers[2], 5)  # peer 2's co-signature of epoch 2
    genuine = from_json(lines[i])
    forger = Identity.generate(tmp_path / "forger.key")
    forged = dataclasses.replace(genuine, signature=forger.sign(genuine.signing_bytes))
    report = audit(lines[:i] + [forged.to_json()] + lines[i + 1:])
    bad = the_problem(report, "bad_signature")
    assert bad.peer == peers[2].identity.public_key and bad.kind == "receipt"
    missing = the_problem(report, "missing_cosignature")
    assert missing.peer == peers[2].identity.public_key and "2/3 signed" in missing.message


def test_receipt_missing_a_cosignature(swarm):
    peers, lines = swarm
    i = find(lines, peers[1], 7)
    report = audit(lines[:i] + lines[i + 1:])
    assert the_problem(report, "missing_cosignature").peer == peers[1].identity.public_key


def test_duplicated_record(swarm):
    peers, lines = swarm
    i = find(lines, peers[0], 0)
    report = audit(lines + [lines[i]])
    [problem] = report.problems
    assert problem.code == "duplicate" and problem.where == f"line {len(lines) + 1}"
    assert f"first at line {i + 1}" in problem.message


def test_claim_without_receipt(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    [peer] = make_peers(tmp_path, 1, RUN, shared_ledger=ledger)
    first = peer.writer.claim(0, 50, 1.0, {}, "a" * 64, "b" * 64, None)
    # the peer's newest record: its round may still be running, so the claim is pending, not a problem
    report = verify(ledger.records())
    assert report.ok and [(p.code, p.record) for p in report.pending] == [("round_pending", first.hash)]
    # once the peer signed something after it, the round is over and the claim was never attested
    second = peer.writer.claim(1, 50, 1.0, {}, "a" * 64, "b" * 64, None)
    report = verify(ledger.records())
    assert [(p.code, p.record) for p in report.problems] == [("claim_without_receipt", first.hash)]
    assert [p.record for p in report.pending] == [second.hash]


def test_fork_in_a_chain(swarm):
    peers, lines = swarm
    claim = from_json(lines[find(lines, peers[0], 6)])
    fork = sign(dataclasses.replace(claim, samples=claim.samples - 1), peers[0].identity)
    report = audit(lines + [fork.to_json()])
    assert {"chain_fork", "double_claim"} <= codes(report)


def test_every_problem_code_is_documented(swarm):
    peers, lines = swarm
    report = audit(lines[1:] + lines[:1])
    assert codes(report) <= set(PROBLEM_CODES)


def test_fairness_report(swarm):
    peers, lines = swarm
    report = fairness([from_json(line) for line in lines])
    assert report.total_attested == 4 * (100 + 110 + 120)
    assert [p.name for p in report.peers] == [peers[2].identity.name, peers[1].identity.name, peers[0].identity.name]
    top = report.peers[0]
    assert (top.samples_claimed, top.samples_attested, top.epochs_joined) == (480, 480, 4)
    assert top.share == pytest.approx(480 / 1320)
    assert top.heldout_delta == pytest.approx(0.25)  # held-out loss fell 0.25 per round
    assert (report.heldout_first, report.heldout_last) == (2.0, 1.25)
    assert report.gini == pytest.approx(gini([400, 440, 480]))
    assert not report.flagged


def test_a_peer_cannot_attest_itself(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    [solo] = make_peers(tmp_path, 1, RUN, shared_ledger=ledger)
    run_round([solo], 0, [500])
    [share] = fairness(ledger.records()).peers
    assert (share.samples_claimed, share.samples_attested, share.share) == (500, 0, 0.0)


def test_gini():
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)
    assert gini([1, 3]) == pytest.approx(0.25)
