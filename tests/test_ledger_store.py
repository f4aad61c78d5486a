"""The SQLite ledger: append-only, canonical order, all-or-nothing import, bad files, kill -9."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2ptrain.errors import UserError
from p2ptrain.identity import Identity
from p2ptrain.ledger import Ledger, LedgerWriter, default_ledger_path, read_jsonl, verify
from p2ptrain.ledger.simulate import make_peers, run_round

RUN = "store-run"


@pytest.fixture
def three(tmp_path):
    """Three peers with their own ledgers after three rounds with every record exchanged."""
    peers = make_peers(tmp_path, 3, RUN)
    for epoch in range(3):
        run_round(peers, epoch)
    yield peers
    for peer in peers:
        peer.ledger.close()


def test_default_ledger_path(tmp_path):
    assert default_ledger_path(tmp_path, "run", "brave-amber-otter") == \
        tmp_path / "runs" / "run" / "brave-amber-otter" / "ledger.sqlite"


def test_peers_converge_to_the_same_ledger(three, tmp_path):
    assert all(len(peer.ledger) == 18 for peer in three)
    for i, peer in enumerate(three):
        peer.ledger.export_jsonl(tmp_path / f"{i}.jsonl")
    texts = {(tmp_path / f"{i}.jsonl").read_bytes() for i in range(3)}
    assert len(texts) == 1  # same records -> byte-identical exports, whatever order they arrived in
    assert verify(three[0].ledger.entries()).ok


def test_records_come_back_in_canonical_order(three):
    records = three[0].ledger.records()
    keys = [(r.epoch, r.public_key.hex(), r.seq) for r in records]
    assert keys == sorted(keys)


def test_append_only(three):
    path = three[0].ledger.path
    with sqlite3.connect(path) as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE records SET epoch = 9")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM records")


def test_append_refuses_duplicates_and_other_runs(three, tmp_path):
    ledger = three[0].ledger
    record = ledger.records()[0]
    with pytest.raises(ValueError, match="already"):
        ledger.append(record)
    other = Ledger(tmp_path / "other.sqlite", run_id="other")
    with pytest.raises(ValueError, match="run"):
        other.append(record)


def test_add_verified_skips_bad_and_known_records(three, tmp_path):
    import dataclasses

    records = three[0].ledger.records()
    fresh = Ledger(tmp_path / "fresh.sqlite", run_id=RUN)
    tampered = dataclasses.replace(records[0], epoch=records[0].epoch + 1)
    assert fresh.add_verified([tampered, *records[:5]]) == 5
    assert fresh.add_verified(records) == len(records) - 5
    assert len(fresh) == len(records)


def test_run_id_is_kept_and_checked(tmp_path):
    Ledger(tmp_path / "l.sqlite", run_id="a").close()
    assert Ledger(tmp_path / "l.sqlite").run_id == "a"
    with pytest.raises(UserError, match="belongs to run 'a'"):
        Ledger(tmp_path / "l.sqlite", run_id="b")


def test_export_import_round_trip(three, tmp_path):
    three[0].ledger.export_jsonl(tmp_path / "all.jsonl")
    target = Ledger(tmp_path / "target.sqlite")
    assert target.import_jsonl(tmp_path / "all.jsonl") == (18, 0)
    assert target.run_id == RUN
    assert target.import_jsonl(tmp_path / "all.jsonl") == (0, 18)
    assert [r.hash for r in target.records()] == [r.hash for r in three[0].ledger.records()]


@pytest.mark.parametrize("bad_line, message", [
    ('{"not": "a record"}', "line 19: not a ledger record"),
    ("garbage", "line 19: not JSON"),
    (None, "line 19: unknown schema version 7"),
    ("signature", "line 19: the claim's signature does not verify; nothing imported"),
])
def test_import_is_all_or_nothing(three, tmp_path, bad_line, message):
    source = three[0].ledger
    source.export_jsonl(tmp_path / "all.jsonl")
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    obj = json.loads(lines[0])
    if bad_line is None:
        obj["version"] = 7
        bad_line = json.dumps(obj)
    elif bad_line == "signature":
        obj["samples"] += 1
        bad_line = json.dumps(obj)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines + [bad_line]) + "\n")
    target = Ledger(tmp_path / "target.sqlite", run_id=RUN)
    target.add_verified(source.records()[:3])
    before = [r.hash for r in target.records()]
    with pytest.raises(UserError, match=message):
        target.import_jsonl(tmp_path / "bad.jsonl")
    assert [r.hash for r in target.records()] == before


def test_import_refuses_another_run(three, tmp_path):
    three[0].ledger.export_jsonl(tmp_path / "all.jsonl")
    target = Ledger(tmp_path / "target.sqlite", run_id="different")
    with pytest.raises(UserError, match="line 1: record of run 'store-run'"):
        target.import_jsonl(tmp_path / "all.jsonl")
    assert len(target) == 0


def test_truncated_jsonl_is_named(three, tmp_path):
    three[0].ledger.export_jsonl(tmp_path / "all.jsonl")
    data = (tmp_path / "all.jsonl").read_bytes()
    (tmp_path / "cut.jsonl").write_bytes(data[: len(data) - 40])
    with pytest.raises(UserError, match="line 18: .*truncated"):
        read_jsonl(tmp_path / "cut.jsonl")


def test_bad_ledger_files(tmp_path):
    with pytest.raises(UserError, match="directory .* does not exist") as e:
        Ledger(tmp_path / "missing" / "ledger.sqlite")
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="no ledger at"):
        Ledger(tmp_path / "absent.sqlite", create=False)
    (tmp_path / "garbled.sqlite").write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="not a p2ptrain ledger"):
        Ledger(tmp_path / "garbled.sqlite", create=False)
    (tmp_path / "empty.sqlite").write_bytes(b"")
    with pytest.raises(UserError, match="not a p2ptrain ledger"):
        Ledger(tmp_path / "empty.sqlite", create=False)


def test_truncated_sqlite_ledger(three, tmp_path):
    path = three[0].ledger.path
    three[0].ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    (tmp_path / "cut.sqlite").write_bytes(data[:4096 + 100])
    with pytest.raises(UserError, match="cannot read ledger"):
        Ledger(tmp_path / "cut.sqlite", create=False).records()


# The child signs with the raw key (p2ptrain.identity would import hivemind: 2-4 s a start).
WRITER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from p2ptrain.ledger import Ledger, LedgerWriter

    class Signer:
        def __init__(self, raw):
            self.key = Ed25519PrivateKey.from_private_bytes(raw)
            self.public_key = self.key.public_key().public_bytes_raw()
        def sign(self, data):
            return self.key.sign(data)

    identity = Signer(bytes.fromhex(os.environ["LEDGER_TEST_KEY"]))
    writer = LedgerWriter(identity, "kill-run", Ledger(Path(sys.argv[1]), run_id="kill-run"))
    epoch = writer.ledger.last_record(identity.public_key)
    epoch = 0 if epoch is None else epoch.epoch + 1
    while True:
        writer.claim(epoch, 64, 0.1, {"seed": epoch}, "a" * 64, "b" * 64, 1.0)
        writer.cosign(epoch, {identity.public_key: 64}, "c" * 64)
        if epoch % 50 == 0:
            print(epoch, flush=True)
        epoch += 1
""")


@pytest.mark.timeout(120)
def test_kill_9_while_writing_leaves_a_ledger_whose_chain_verifies_and_continues(tmp_path):
    key = tmp_path / "peer.key"
    identity = Identity.generate(key)
    path = tmp_path / "ledger.sqlite"
    for attempt in range(3):
        raw_key = identity.private_key.private_bytes_raw().hex()
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "LEDGER_TEST_KEY": raw_key})
        try:
            for _ in range(2):  # let it write ~100 epochs, then kill it mid-write
                assert process.stdout.readline(), "writer died"
            time.sleep(0.01 * attempt)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=30)
            process.stdout.close()
        assert process.returncode == -signal.SIGKILL

        ledger = Ledger(path, create=False)
        report = verify(ledger.entries(), run_id=ledger.run_id)
        # a kill between a claim and its co-signature leaves that claim pending (the chain's head); this bare
        # writer, unlike a peer's Bookkeeper, never closes it, so after a relaunch it is unattested: nothing else
        assert {p.code for p in report.problems} <= {"claim_without_receipt"}, [p.describe() for p in report.problems]
        assert len(report.pending) <= 1
        last = ledger.last_record(identity.public_key)
        assert last.seq == len(ledger) - 1
        ledger.close()

    ledger = Ledger(path, run_id="kill-run")
    writer = LedgerWriter(identity, "kill-run", ledger)
    record = writer.claim(last.epoch + 1, 64, 0.1, {}, "a" * 64, "b" * 64, 1.0)
    assert (record.seq, record.prev_hash) == (last.seq + 1, last.hash)
    assert not {p.code for p in verify(ledger.entries()).problems} - {"claim_without_receipt"}


def test_ledger_open_from_a_path_string(tmp_path):
    assert isinstance(Ledger(str(tmp_path / "x.sqlite")).path, Path)


def test_writes_from_two_threads_do_not_interleave(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    ledger = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    a, b = make_peers(tmp_path, 2, RUN, shared_ledger=ledger)

    def work(peer):
        for epoch in range(50):
            peer.writer.claim(epoch, 10, 0.1, {}, "a" * 64, "b" * 64, None)
            peer.writer.cosign(epoch, {a.identity.public_key: 10, b.identity.public_key: 10}, "c" * 64)
            ledger.records() if epoch % 10 == 0 else None

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, [a, b]))
    assert len(ledger) == 200 and verify(ledger.records()).ok


def test_default_ledger_path_refuses_run_ids_records_cannot_carry(tmp_path):
    for bad in ("../escape", "", "a b", "x" * 65, "-dash"):
        with pytest.raises(UserError, match="cannot name a ledger"):
            default_ledger_path(tmp_path, bad, "name")
