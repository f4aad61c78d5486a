"""`p2ptrain ledger ...` run as a real command: exit codes 0/1/2, one-line errors, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2ptrain.identity import Identity
from p2ptrain.ledger import Ledger, LedgerWriter, default_ledger_path
from p2ptrain.ledger.simulate import make_peers, run_round

RUN = "p2ptrain"  # the CLI's default run id


@pytest.fixture
def home(tmp_path):
    """A P2PTRAIN_HOME whose own identity has a ledger at the default path, 3 peers x 3 clean rounds."""
    home = tmp_path / "home"
    me = Identity.generate(home / "identity.key")
    path = default_ledger_path(home, RUN, me.name)
    path.parent.mkdir(parents=True)
    ledger = Ledger(path, run_id=RUN)
    others = make_peers(tmp_path, 2, RUN, shared_ledger=ledger)
    peers = [type(others[0])(me, ledger, LedgerWriter(me, RUN, ledger)), *others]
    for epoch in range(3):
        run_round(peers, epoch, heldout_loss=1.0 - 0.1 * epoch)
    ledger.close()
    return home, path, me


def ledger_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PTRAIN_HOME": str(home), "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "p2ptrain", "ledger", *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_error_line(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr


def test_show_uses_the_join_peers_default_ledger(home):
    home, path, me = home
    result = ledger_cli(home, "show")
    assert result.returncode == 0, result.stderr
    assert f"{path}: 18 records" in result.stdout and me.name in result.stdout
    mine = json.loads(ledger_cli(home, "show", "--ledger", path, "--peer", me.name, "--json").stdout)
    assert len(mine["records"]) == 6 and {r["peer"] for r in mine["records"]} == {me.name}
    one_error_line(ledger_cli(home, "show", "--ledger", path, "--peer", "nobody-at-all"), 2,
                   "no records of peer 'nobody-at-all'")


def test_verify_clean_ledger_exits_0(home):
    home, path, _ = home
    result = ledger_cli(home, "verify", "--ledger", path)
    assert result.returncode == 0 and "clean" in result.stdout
    report = json.loads(ledger_cli(home, "verify", "--ledger", path, "--json").stdout)
    assert report["ok"] and report["records"] == 18 and report["receipts"] == 3 and report["problems"] == []


def test_verify_exported_file_and_tampering(home, tmp_path):
    home, path, me = home
    export = tmp_path / "ledger.jsonl"
    result = ledger_cli(home, "export", export, "--ledger", path)
    assert result.returncode == 0 and "exported 18 records" in result.stdout
    assert ledger_cli(home, "verify", export).returncode == 0
    lines = export.read_text().splitlines()
    lines.append(lines[3])  # a duplicated record
    obj = json.loads(lines[0])
    obj["samples"] *= 10
    lines[0] = json.dumps(obj)  # an altered claim
    export.write_text("\n".join(lines) + "\n")
    result = ledger_cli(home, "verify", export)
    assert result.returncode == 1, result.stderr
    assert "2 problems" in result.stdout
    assert "line 1: bad_signature" in result.stdout and "line 19: duplicate" in result.stdout
    report = json.loads(ledger_cli(home, "verify", export, "--json").stdout)
    assert {p["code"] for p in report["problems"]} == {"bad_signature", "duplicate"}
    assert all(p["peer"] for p in report["problems"])
    report = json.loads(ledger_cli(home, "verify", export, "--run-id", "another", "--json").stdout)
    assert {p["code"] for p in report["problems"]} >= {"other_run"}


@pytest.mark.parametrize("content, message", [
    (b'{"version": 1, "kind": "claim"}\n', "line 1: claim record has missing fields"),
    (b'{"version": 3, "kind": "claim"}\n', "line 1: unknown schema version 3"),
    (b"hello\n", "line 1: not JSON"),
    (b"\x00\x01garbage", "line 1: not JSON"),
])
def test_unreadable_files_exit_2(home, tmp_path, content, message):
    home, _, _ = home
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    one_error_line(ledger_cli(home, "verify", bad), 2, message)


def test_bad_ledger_paths_exit_2(home, tmp_path):
    home, path, _ = home
    one_error_line(ledger_cli(home, "verify", "--ledger", tmp_path / "missing" / "l.sqlite"), 2, "does not exist")
    one_error_line(ledger_cli(home, "fairness", "--ledger", tmp_path / "none.sqlite"), 2, "no ledger at")
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(path.read_bytes()[:5000])
    one_error_line(ledger_cli(home, "show", "--ledger", truncated), 2, "cannot read ledger")
    one_error_line(ledger_cli(tmp_path / "empty-home", "show"), 2, "no identity at")
    one_error_line(ledger_cli(home, "verify", "a.jsonl", "--ledger", path), 2, "not both")
    one_error_line(ledger_cli(home, "verify", "--ledger", path, "--run-id", "another"), 2,
                   "belongs to run 'p2ptrain', not 'another'")


def test_fairness(home):
    home, path, me = home
    result = ledger_cli(home, "fairness", "--ledger", path)
    assert result.returncode == 0, result.stderr
    assert me.name in result.stdout and "Gini" in result.stdout and "0 flagged peers" in result.stdout
    report = json.loads(ledger_cli(home, "fairness", "--ledger", path, "--json").stdout)
    assert report["total_attested_samples"] == 3 * (100 + 110 + 120)
    assert [p["samples_attested"] for p in report["peers"]] == [360, 330, 300]
    assert report["flagged"] == [] and 0 < report["gini"] < 0.1
    assert report["heldout_first"] == 1.0


def test_import_all_or_nothing(home, tmp_path):
    home, path, _ = home
    export = tmp_path / "all.jsonl"
    ledger_cli(home, "export", export, "--ledger", path)
    target = tmp_path / "other.sqlite"
    result = ledger_cli(home, "import", export, "--ledger", target, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["added"] == 18
    result = ledger_cli(home, "import", export, "--ledger", target)
    assert "imported 0 new records" in result.stdout and "18 already present" in result.stdout

    fresh = tmp_path / "fresh.sqlite"
    Ledger(fresh, run_id=RUN).close()
    lines = export.read_text().splitlines()
    export.write_text("\n".join(lines[:5] + ['{"version": 1}'] + lines[5:]) + "\n")
    one_error_line(ledger_cli(home, "import", export, "--ledger", fresh), 2, "line 6:")
    assert len(Ledger(fresh, create=False)) == 0
    one_error_line(ledger_cli(home, "import", tmp_path / "nothing.jsonl", "--ledger", fresh), 2, "cannot read")
    one_error_line(ledger_cli(home, "import", export, "--ledger", tmp_path / "no" / "dir.sqlite"), 2, "does not exist")
