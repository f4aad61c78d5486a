"""p2ptrain's averaging round vs torch.distributed gloo all_reduce, same bytes, same number of processes.

    python scripts/bench/allreduce.py [--sizes-mb 4 40] [--peers 2 4] [--rounds 5] [--json] [--out FILE]
        [--variants none fp16 8bit centered-clip]

For each (N peers, S bytes), in one run:

- p2ptrain: N processes on 127.0.0.1, each with its own hivemind DHT and the averager class p2ptrain's
  trainer uses (``p2ptrain.trainer.GatheringGradientAverager``, a ``hivemind.optim.grad_averager.
  GradientAverager``) over one float32 gradient of S bytes, built with the trainer's round settings
  (matchmaking time, request timeout, averaging timeout, next-chunk timeout from ``p2ptrain.config``) and a
  small all-gather payload like the trainer's signed claim. Peers start each round together (a barrier);
  per round: ``round_s`` (``step()`` called until it returns: matchmaking + all-reduce) and
  ``allreduce_s`` (from the moment the averager enters its RUNNING_ALLREDUCE stage until it returns,
  read from hivemind's shared StepControl).
- gloo: N processes, ``torch.distributed.all_reduce`` of a float32 tensor of S bytes, barrier, then timed.

Variants (rows besides plain float32 mean, when p2ptrain supports them): ``fp16`` / ``8bit`` (the
trainer's ``--compression`` codecs, ``p2ptrain.compression.GRADIENTS``), ``centered-clip`` (``--aggregation centered-clip``); they run for the
largest N and S only, to keep the run short. Worker output (hivemind's shutdown noise) is discarded unless
``--verbose``: a worker's error travels back and is printed as one line. The first
round of each case is a warm-up and is not counted. Prints a table, or one JSON object with ``--json``;
``--out FILE`` also writes the JSON there.
"""
from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # before hivemind is imported: rounds are counted, not logged
LOCAL = "/ip4/127.0.0.1/tcp/0"
CLAIM_BYTES = 600  # about the size of a signed claim riding each round's all-gather
STARTUP_TIMEOUT = 120.0  # a DHT + averager start is slow when the 2 cores are busy
POLL = 0.001  # seconds between reads of the averager's stage
VERBOSE = False  # --verbose: keep the workers' stderr


# --- p2ptrain side -----------------------------------------------------------------------------

def available_variants() -> list[str]:
    """The variants the installed p2ptrain supports (compression and aggregation are being added)."""
    from p2ptrain import trainer

    found = ["none"]
    found += [c for c in ("fp16", "8bit") if c in _codecs()]
    if "aggregation" in inspect.signature(trainer.GatheringGradientAverager.__init__).parameters:
        found.append("centered-clip")
    return found


def _codecs() -> dict:
    """The trainer's ``--compression`` codecs for gradients (``p2ptrain.compression.GRADIENTS``), if any."""
    try:
        from p2ptrain.compression import GRADIENTS
    except ImportError:
        return {}
    return GRADIENTS


def make_averager(params, dht, variant: str):
    """The trainer's gradient averager with the trainer's round settings."""
    from p2ptrain import trainer
    from p2ptrain.config import Settings

    s = Settings()
    kwargs: dict[str, Any] = {
        "dht": dht, "prefix": "bench_grad_averager", "min_matchmaking_time": s.matchmaking_time,
        "request_timeout": s.matchmaking_time / 2, "allreduce_timeout": s.averaging_timeout,
        "next_chunk_timeout": s.matchmaking_time, "client_mode": False, "start": True}
    if variant in ("fp16", "8bit"):
        kwargs["compression"] = _codecs()[variant]
    if variant == "centered-clip":
        kwargs["aggregation"] = "centered-clip"
    return trainer.GatheringGradientAverager(params, **kwargs)


def quiet_worker(verbose: bool) -> None:
    """Send this worker's (and its DHT and p2pd processes') stderr to /dev/null."""
    if not verbose:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)


def p2p_worker(rank: int, floats: int, rounds: int, variant: str, initial_peers: list[str], barrier, out,
               verbose: bool = False) -> None:
    """One averaging peer: a DHT, the averager, ``rounds`` timed rounds; puts its timings on ``out``."""
    quiet_worker(verbose)
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # a spawned child inherits "spawn"; hivemind's processes need fork
    try:
        dht = hivemind.DHT(start=True, host_maddrs=[LOCAL], initial_peers=initial_peers)
        if rank == 0:
            out.put(("addrs", [str(a) for a in dht.get_visible_maddrs()]))
        param = torch.nn.Parameter(torch.zeros(floats))
        averager = make_averager([param], dht, variant)
        averager.gather = os.urandom(CLAIM_BYTES)
        barrier.wait(STARTUP_TIMEOUT)
        timings = []
        for _ in range(rounds):
            param.grad = torch.randn(floats)
            averager.accumulate_grads_(batch_size=1)
            barrier.wait(STARTUP_TIMEOUT)
            begin = time.perf_counter()
            control = averager.step(wait=False, timeout=30.0)
            began_allreduce = None
            while not control.done():
                if began_allreduce is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                    began_allreduce = time.perf_counter()
                time.sleep(POLL)
            end = time.perf_counter()
            try:
                group = len(control.result())
            except Exception:  # noqa: BLE001  (a failed round counts as a failure, not a crash)
                group = 0
            timings.append({"round_s": end - begin, "allreduce_s": end - began_allreduce if began_allreduce else None,
                            "group": group})
        out.put(("timings", rank, timings))
        barrier.wait(STARTUP_TIMEOUT)  # nobody leaves while another still averages with it
        averager.shutdown()
        dht.shutdown()
    except Exception as e:  # noqa: BLE001  (any failure goes back to the parent as one line)
        out.put(("error", rank, f"{type(e).__name__}: {e}"))
        barrier.abort()


def bench_p2p(peers: int, size: int, rounds: int, variant: str, timeout: float) -> dict:
    ctx = mp.get_context("spawn")  # not daemonic: a peer starts its own DHT process; _stop reaps them
    barrier, out = ctx.Barrier(peers), ctx.Queue()
    floats = size // 4
    procs = [ctx.Process(target=p2p_worker, args=(0, floats, rounds + 1, variant, [], barrier, out, VERBOSE))]
    procs[0].start()
    try:
        kind, *rest = out.get(timeout=STARTUP_TIMEOUT)
        if kind == "error":
            raise RuntimeError(f"peer 0: {rest[1]}")
        addrs = rest[0]
        for r in range(1, peers):
            procs.append(ctx.Process(target=p2p_worker, args=(r, floats, rounds + 1, variant, addrs, barrier, out, VERBOSE)))
            procs[-1].start()
        per_peer = {}
        deadline = time.monotonic() + timeout
        while len(per_peer) < peers:
            kind, rank, payload = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "error":
                raise RuntimeError(f"peer {rank}: {payload}")
            per_peer[rank] = payload[1:]  # drop the warm-up round
    finally:
        _stop(procs)
    return _summarise_p2p(per_peer, peers)


def _summarise_p2p(per_peer: dict[int, list[dict]], peers: int) -> dict:
    rounds = [t for timings in per_peer.values() for t in timings]
    ok = [t for t in rounds if t["group"] == peers]
    # a round lasts until its slowest member returns: per round, the max over peers
    by_round = list(zip(*per_peer.values()))
    round_s = [max(t["round_s"] for t in r) for r in by_round if all(t["group"] == peers for t in r)]
    allreduce_s = [max(t["allreduce_s"] for t in r) for r in by_round
                   if all(t["group"] == peers and t["allreduce_s"] is not None for t in r)]
    return {"rounds": len(by_round), "full_group_share": len(ok) / len(rounds) if rounds else 0.0,
            "round_s": _stats(round_s), "allreduce_s": _stats(allreduce_s)}


def _stop(procs) -> None:
    stop_by = time.monotonic() + 10  # all workers together, so a stop on SIGTERM stays quick
    for p in procs:
        p.join(timeout=max(0.1, stop_by - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


# --- gloo side ---------------------------------------------------------------------------------

def gloo_worker(rank: int, world: int, port: int, floats: int, rounds: int, out, verbose: bool = False) -> None:
    quiet_worker(verbose)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        tensor = torch.randn(floats)
        timings = []
        for _ in range(rounds):
            dist.barrier()
            begin = time.perf_counter()
            dist.all_reduce(tensor)
            timings.append(time.perf_counter() - begin)
        dist.barrier()
        dist.destroy_process_group()
        out.put(("timings", rank, timings))
    except Exception as e:  # noqa: BLE001  (any failure goes back to the parent as one line)
        out.put(("error", rank, f"{type(e).__name__}: {e}"))


def bench_gloo(world: int, size: int, rounds: int, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=gloo_worker, args=(r, world, port, size // 4, rounds + 1, out, VERBOSE), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        per_rank = {}
        deadline = time.monotonic() + timeout
        while len(per_rank) < world:
            kind, rank, payload = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "error":
                raise RuntimeError(f"gloo rank {rank}: {payload}")
            per_rank[rank] = payload[1:]
    finally:
        _stop(procs)
    return {"rounds": rounds, "allreduce_s": _stats([max(r) for r in zip(*per_rank.values())])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the run -----------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "min": ordered[0],
            "max": ordered[-1], "n": len(ordered)}


def run(sizes_mb: list[float], peers: list[int], rounds: int, variants: list[str], timeout: float,
        log=print, save=lambda result: None) -> dict:
    """All cases; ``save`` gets the result so far after each one (a run stopped at its budget keeps them)."""
    supported = available_variants()
    cases = []
    result = {"benchmark": "allreduce", "rounds_per_case": rounds, "variants_supported": supported,
              "averager": "p2ptrain.trainer.GatheringGradientAverager (hivemind GradientAverager)",
              "load_average": os.getloadavg()[0], "cases": cases, "complete": False}
    for n in peers:
        for mb in sizes_mb:
            size = int(mb * 1e6) // 4 * 4
            gloo = bench_gloo(n, size, rounds, timeout)
            log(f"  gloo      N={n} S={mb:g} MB: {gloo['allreduce_s']['median']:.4f} s")
            largest = (n, mb) == (max(peers), max(sizes_mb))  # extra variants only there: the time budget
            for variant in [v for v in variants if v in supported and (v == "none" or largest)]:
                p2p = bench_p2p(n, size, rounds, variant, timeout)
                case = {"peers": n, "bytes": size, "size_mb": mb, "variant": variant, "p2ptrain": p2p, "gloo": gloo,
                        "ratio_round": _ratio(p2p["round_s"], gloo["allreduce_s"]),
                        "ratio_allreduce": _ratio(p2p["allreduce_s"], gloo["allreduce_s"])}
                cases.append(case)
                save(result)
                log(f"  p2ptrain  N={n} S={mb:g} MB {variant}: round {_fmt(p2p['round_s'])} s, "
                    f"all-reduce {_fmt(p2p['allreduce_s'])} s, full groups {p2p['full_group_share']:.0%}, "
                    f"ratio {case['ratio_round'] or float('nan'):.1f}x / {case['ratio_allreduce'] or float('nan'):.1f}x")
    result.update(complete=True, load_average=max(result["load_average"], os.getloadavg()[0]))
    return result


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def _ratio(p2p: dict | None, gloo: dict | None) -> float | None:
    return p2p["median"] / gloo["median"] if p2p and gloo and gloo["median"] > 0 else None


def _fmt(stats: dict | None) -> str:
    return "n/a" if stats is None else f"{stats['median']:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 40], help="tensor sizes in MB (4 40)")
    p.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="numbers of processes (2 4)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case, after one warm-up (5)")
    p.add_argument("--variants", nargs="+", default=["none"],
                   choices=["none", "fp16", "8bit", "centered-clip"], help="p2ptrain rows (none)")
    p.add_argument("--timeout", type=float, default=180.0, help="limit per case in seconds (180)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--verbose", action="store_true", help="show the worker processes' stderr")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally that stops the workers
    global VERBOSE
    VERBOSE = args.verbose
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    command = "python scripts/bench/allreduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save = lambda result: write_json(args.out, dict(result, command=command))
    try:
        result = run(args.sizes_mb, args.peers, args.rounds, args.variants, args.timeout, log, save)
    except (RuntimeError, queue.Empty) as e:
        print(f"error: {e or 'a case timed out'}", file=sys.stderr)
        return 1
    result["command"] = command
    save(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
