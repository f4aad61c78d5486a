"""Robust aggregation (p2ptrain/robust.py): the math on known tensors, then real hivemind averaging rounds
on 127.0.0.1 where one peer sends garbage, and compressed rounds within their expected error."""
from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression, NoCompression

from p2ptrain.compression import Uniform8Bit
from p2ptrain.robust import Gathered, RobustAveraging, RobustReducer, centered_clip, screen


def honest_and_attackers(n_honest: int = 5, dim: int = 1000, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=generator)
    honest = center + 0.3 * torch.randn(n_honest, dim, generator=generator)
    return center, honest


def test_centered_clip_equals_mean_without_outliers():
    _, honest = honest_and_attackers()
    weights = torch.ones(len(honest))
    robust = centered_clip(honest, weights, iterations=50)
    assert (robust - honest.mean(0)).norm() < 0.05 * honest.mean(0).norm()


def test_centered_clip_resists_scaled_and_flipped_parts_where_the_mean_does_not():
    center, honest = honest_and_attackers()
    parts = torch.cat([honest, 100 * honest[:1], -honest[1:2]])  # x100 and sign-flipped senders
    weights = torch.ones(len(parts))
    honest_mean = honest.mean(0)
    mean_error = (parts.mean(0) - honest_mean).norm() / honest_mean.norm()
    robust_error = (centered_clip(parts, weights) - honest_mean).norm() / honest_mean.norm()
    assert mean_error > 10
    assert robust_error < 0.25


def test_centered_clip_caps_a_huge_announced_weight():
    _, honest = honest_and_attackers()
    parts = torch.cat([honest, 50 * honest[:1]])
    weights = torch.tensor([1.0] * len(honest) + [1e9])
    error = (centered_clip(parts, weights) - honest.mean(0)).norm() / honest.mean(0).norm()
    assert error < 0.5


def test_screen_rejects_non_finite_parts_weights_and_absurd_norms_but_not_x100():
    _, honest = honest_and_attackers(4)
    nan_part, inf_part = honest[0].clone(), honest[0].clone()
    nan_part[3], inf_part[7] = float("nan"), float("inf")
    parts = torch.stack([*honest, nan_part, inf_part, 1e6 * honest[0], 100 * honest[1], honest[2]])
    weights = torch.tensor([32.0] * 8 + [float("nan")], dtype=torch.float64)
    reasons = screen(parts, weights)
    assert reasons[:4] == [None] * 4
    assert "NaN or Inf" in reasons[4] and "NaN or Inf" in reasons[5]
    assert "norm" in reasons[6]
    assert reasons[7] is None  # x100 is CenteredClip's job, not an absurd norm
    assert "weight" in reasons[8]


def test_screen_keeps_a_real_gradient_next_to_a_peer_that_accumulated_nothing():
    _, honest = honest_and_attackers(1)
    parts = torch.stack([honest[0], torch.zeros_like(honest[0])])
    assert screen(parts, torch.tensor([64.0, 0.0], dtype=torch.float64)) == [None, None]


@pytest.mark.parametrize("aggregation", ["mean", "centered-clip"])
def test_reducer_aggregates_kept_parts_and_reports_rejected_senders(aggregation):
    parts = [torch.full((6,), 1.0), torch.full((6,), 3.0), torch.full((6,), float("nan"))]
    rejected = []

    async def reduce():
        reducer = RobustReducer([torch.Size([6])], 3, aggregation=aggregation,
                                on_reject=lambda sender, reason: rejected.append(sender))
        return await asyncio.gather(*(reducer.accumulate_part(i, 0, part, weight=1.0) for i, part in enumerate(parts)))

    results = asyncio.run(reduce())
    assert rejected == [2]
    for result in results:
        assert torch.allclose(result, torch.full((6,), 2.0))


class RobustAverager(RobustAveraging, DecentralizedAverager):
    pass


def run_round(tensors_per_peer: list[list[torch.Tensor]], *, aggregation: str = "mean",
              compression=NoCompression()) -> tuple[list[list[torch.Tensor]], list[Gathered]]:
    """One real averaging round among len(tensors_per_peer) averagers on 127.0.0.1, in a child process;
    returns every peer's averaged tensors and what its round gathered ({peer: index}, with ``rejected``).

    A child process, because averagers' shared-memory tensors can abort the interpreter that built them
    while it garbage-collects after their processes are gone: a fault of the harness, not of the round.
    """
    directory = Path(__import__("tempfile").mkdtemp(prefix="robust-round-"))
    torch.save({"tensors": tensors_per_peer, "aggregation": aggregation, "compression": compression},
               directory / "in.pt")
    subprocess.run([sys.executable, __file__, str(directory)], timeout=120, capture_output=True)
    out = directory / "out.pt"
    assert out.exists(), "the averaging round did not finish"
    result = torch.load(out, weights_only=False)
    gathered = [Gathered({peer: index for peer, index in g}, dict(r)) for g, r in result["gathered"]]
    return result["results"], gathered


def _run_round_here(tensors_per_peer, *, aggregation, compression):
    root = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [root] + [hivemind.DHT(start=True, initial_peers=root.get_visible_maddrs(),
                                  host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in tensors_per_peer[1:]]
    averagers = []
    try:
        for dht, tensors in zip(dhts, tensors_per_peer):
            averagers.append(RobustAverager(tensors, dht=dht, prefix="robust-test", aggregation=aggregation,
                                            target_group_size=len(dhts), min_group_size=len(dhts),
                                            min_matchmaking_time=2.0, request_timeout=1.0, compression=compression,
                                            start=True))
        with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
            futures = [pool.submit(a.step, gather=i, timeout=60) for i, a in enumerate(averagers)]
            gathered = [f.result() for f in futures]
        results = []
        for averager in averagers:
            with averager.get_tensors() as tensors:
                results.append([t.clone() for t in tensors])
        return results, gathered
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_a_real_round_rejects_a_nan_sender_and_names_it():
    size = 30_000
    good = [[torch.full((size,), 1.0)], [torch.full((size,), 3.0)]]
    bad = [torch.full((size,), float("nan"))]
    results, gathered = run_round([*good, bad])
    for result in results[:2]:
        assert torch.allclose(result[0], torch.full((size,), 2.0))
    bad_peer = {peer for peer, index in gathered[0].items() if index == 2}
    # each reducer knows only what it refused: whoever reduced a span of the bad sender's tensor names it
    named = [g.rejected for g in gathered if g.rejected]
    assert named and all(set(r) == bad_peer and "NaN" in next(iter(r.values())) for r in named)
    assert all(len(g) == 3 for g in gathered)


def test_a_real_centered_clip_round_keeps_a_x100_sender_from_dominating():
    generator = torch.Generator().manual_seed(1)
    center = torch.randn(4000, generator=generator)
    honest = [center + 0.1 * torch.randn(4000, generator=generator) for _ in range(3)]
    results, gathered = run_round([[t] for t in honest] + [[100 * honest[0]]], aggregation="centered-clip")
    honest_mean = torch.stack(honest).mean(0)
    for result in results[:3]:
        assert (result[0] - honest_mean).norm() / honest_mean.norm() < 0.3
    assert not gathered[0].rejected


@pytest.mark.parametrize("compression, tolerance", [(Float16Compression(), 1e-3), (Uniform8Bit(), 0.05)])
def test_compressed_round_is_within_the_expected_error(compression, tolerance):
    generator = torch.Generator().manual_seed(2)
    tensors = [torch.randn(5000, generator=generator) for _ in range(2)]
    results, _ = run_round([[t] for t in tensors], compression=compression)
    exact = (tensors[0] + tensors[1]) / 2
    for result in results:
        relative = (result[0] - exact).norm() / exact.norm()
        assert relative < tolerance


if __name__ == "__main__":  # the child process of run_round
    directory = Path(sys.argv[1])
    spec = torch.load(directory / "in.pt", weights_only=False)
    results, gathered = _run_round_here(spec["tensors"], aggregation=spec["aggregation"],
                                        compression=spec["compression"])
    torch.save({"results": results, "gathered": [(list(g.items()), list(g.rejected.items())) for g in gathered]},
               directory / "out.pt")
