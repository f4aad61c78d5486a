"""Communication-efficient modes in a real 2-peer swarm on 127.0.0.1: local updates with 8-bit compression
reach the digits bar, every round is averaged, and the ledger still verifies (claims ride the rounds)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from p2ptrain.ledger.audit import verify
from p2ptrain.ledger.store import Ledger

if TYPE_CHECKING:
    from conftest import Swarm


@pytest.mark.timeout(400)
def test_local_updates_with_8bit_compression_reach_the_digits_bar(swarm: Swarm) -> None:
    swarm.bootstrap()
    peers = [swarm.join(name, "--min-peers", "2", "--max-epochs", "15", "--local-updates", "--compression", "8bit",
                        wait_up=False) for name in ("a", "b")]

    codes = swarm.wait_all(peers, timeout=300)

    assert codes == [0, 0], [p.describe() for p in peers]
    for peer in peers:
        summary = peer.summary()
        assert summary["epoch"] == 15 and summary["accuracy"] >= 0.95, peer.describe()
        assert summary["rounds_averaged"] >= 0.8 * summary["rounds"], peer.describe()
        with Ledger(summary["ledger"], create=False) as ledger:
            report = verify(ledger.records())
        assert report.ok and len(report.claims) >= 2 * 12, [p.describe() for p in report.problems]
