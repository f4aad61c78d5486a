"""A dishonest ``p2ptrain join``: the real peer with one attack patched in, for scripts/cheaters.py and tests.

    python scripts/byzantine_peer.py --attack scale|flip|inflate|nan  JOIN ARGUMENTS...

- ``scale``: what it sends into each averaging round is its honest gradient times 100;
- ``flip``:  ... times -1 (sign-flipped);
- ``nan``:   ... with NaN in it;
- ``inflate``: trains honestly but its signed claims state 10x the samples it processed.

The attacks sit where a modified client would put them: after the peer's own gradients are final and
before they leave (``load_accumulators_into_averager_``), and in the claim it signs. Everything else,
including the ledger it keeps and the checks it runs on others, is the real peer.
"""
from __future__ import annotations

import argparse
import sys

import torch

ATTACKS = ("scale", "flip", "nan", "inflate")
SCALE = 100.0
INFLATION = 10


def patch(attack: str) -> None:
    from p2ptrain.bookkeeper import Bookkeeper
    from p2ptrain.trainer import GatheringGradientAverager

    if attack == "inflate":
        honest_claim = Bookkeeper.claim
        Bookkeeper.claim = lambda self, epoch, samples, gradients: {
            **honest_claim(self, epoch, samples * INFLATION, gradients), "weight": samples}
        return
    honest_load = GatheringGradientAverager.load_accumulators_into_averager_

    @torch.no_grad()
    def load_and_corrupt(self):
        honest_load(self)
        with self.get_tensors() as tensors:
            for tensor in tensors:
                if attack == "nan":
                    tensor.view(-1)[::7] = float("nan")
                else:
                    tensor.mul_(SCALE if attack == "scale" else -1.0)

    GatheringGradientAverager.load_accumulators_into_averager_ = load_and_corrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    args, rest = parser.parse_known_args(argv)
    patch(args.attack)
    from p2ptrain.cli import main as p2ptrain_main

    return p2ptrain_main(rest)


if __name__ == "__main__":
    sys.exit(main())
