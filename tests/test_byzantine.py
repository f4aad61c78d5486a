"""Dishonest peers in a real swarm on 127.0.0.1 (scripts/byzantine_peer.py): what honest peers refuse,
what the ledger flags, and that training goes on."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from p2ptrain.ledger.audit import verify
from p2ptrain.ledger.store import Ledger

if TYPE_CHECKING:
    from conftest import Swarm

BYZANTINE = str(Path(__file__).resolve().parent.parent / "scripts" / "byzantine_peer.py")


def flags_by_peer(ledger_path: str) -> dict[str, set[str]]:
    with Ledger(ledger_path, create=False) as ledger:
        report = verify(ledger.records())
    flags: dict[str, set[str]] = {}
    for problem in report.problems:
        flags.setdefault(problem.peer_name, set()).add(problem.code)
    return flags


@pytest.mark.timeout(400)
def test_nan_gradients_are_refused_and_flagged_and_an_inflated_claim_is_flagged(swarm: Swarm) -> None:
    swarm.bootstrap()
    common = ("--min-peers", "4", "--max-epochs", "15", "--aggregation", "centered-clip")
    honest = [swarm.join(name, *common, wait_up=False) for name in ("a", "b")]
    nan = swarm.join("nan", *common, wait_up=False, program=(BYZANTINE, "--attack", "nan"))
    inflate = swarm.join("inflate", *common, wait_up=False, program=(BYZANTINE, "--attack", "inflate"))

    codes = swarm.wait_all([*honest, nan, inflate], timeout=300)

    assert codes == [0, 0, 0, 0], [p.describe() for p in (*honest, nan, inflate)]
    for peer in honest:
        assert peer.summary()["accuracy"] >= 0.95, peer.describe()  # NaN parts never reached the model
    assert sum(peer.summary()["rejected_parts"] for peer in (*honest, nan, inflate)) > 0
    nan_name, inflate_name = nan.summary()["name"], inflate.summary()["name"]
    flags = flags_by_peer(honest[0].summary()["ledger"])
    assert "rejected_part" in flags.get(nan_name, set()), flags
    assert "claim_exceeds_weight" in flags.get(inflate_name, set()), flags
    for name in (honest[0].summary()["name"], honest[1].summary()["name"]):
        assert not flags.get(name), flags
