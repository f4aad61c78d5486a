"""DHT on loopback: time to join, store/get latency and success with 32 and 64 peers.

    python scripts/bench/dht.py [--peers 32 64] [--processes 4] [--ops 5] [--json] [--out FILE]

A peer here is a hivemind ``DHTNode`` with its own p2pd daemon and identity, exactly the DHT side of a
p2ptrain peer (default node settings, no record validators). 64 ``hivemind.DHT`` objects would be 64 Python
processes on top of 64 daemons on 2 cores, so ``--processes`` worker processes each run an even share of the
nodes in one asyncio loop (the daemons are separate processes either way).

1. join: the first node starts alone; every other node starts with the first one's address as its initial
   peer (``DHTNode.create``: launch p2pd, connect, bootstrap the routing table by looking up its own id).
   Each worker starts its nodes one after another; the workers run at the same time. Time per node; a node
   that fails to join (p2pd gets 60 s to start) counts against ``join_success`` and takes no further part.
2. store: each node stores ``--ops`` records in the style of p2ptrain's keys: a heartbeat under
   ``{run}_peers`` with its peer id as subkey, and a ledger record under ``{run}_ledger_{epoch}`` with its
   peer id as subkey (one at a time per worker). Success: the store was accepted.
3. get (after a barrier): each node reads ``--ops`` records that *other* nodes stored (``latest=True``).
   Success: the other node's subkey is in the result.

Reports, per swarm size: join time (mean, p95, max), store and get latency (mean, p95) and success rate,
and the memory of the worker processes and daemons at the end (RSS, MiB per node).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # expected failures are counted, not logged
LOCAL = "/ip4/127.0.0.1/tcp/0"
RUN = "bench"
TTL = 120.0
PHASE_TIMEOUT = 300.0
DAEMON_STARTUP = 60.0  # hivemind's 15 s is too short for p2pd when 2 cores are busy
MB = 1024 * 1024


def _key(kind: str, i: int) -> str:
    return f"{RUN}_peers" if kind == "peers" else f"{RUN}_ledger_{i}"


async def _start_nodes(ids: list[int], initial: list[str], strict: bool = False):
    """Start nodes one after another; a node that fails to join is counted, not fatal (unless ``strict``)."""
    from hivemind.dht.node import DHTNode

    nodes, join_s, failed = {}, {}, []
    for i in ids:
        begin = time.perf_counter()
        try:
            nodes[i] = await DHTNode.create(initial_peers=initial, host_maddrs=[LOCAL],
                                            startup_timeout=DAEMON_STARTUP)
        except Exception:
            if strict:
                raise
            failed.append(i)
            continue
        join_s[i] = time.perf_counter() - begin
    return nodes, join_s, failed


async def _store(nodes: dict, ops: int) -> list[tuple[float, bool]]:
    from hivemind.utils import get_dht_time

    results = []
    for op in range(ops):
        for i, node in nodes.items():
            kind = "peers" if op % 2 == 0 else "ledger"
            value = {"peer": i, "epoch": op, "samples": 1000, "pad": "x" * 200}  # ~ a heartbeat / a record
            begin = time.perf_counter()
            ok = await node.store(_key(kind, op), value, get_dht_time() + TTL, subkey=f"peer{i}")
            results.append((time.perf_counter() - begin, bool(ok)))
    return results


async def _get(nodes: dict, ops: int, joined: list[int]) -> list[tuple[float, bool]]:
    rng, results = random.Random(0), []
    for op in range(ops):
        for i, node in nodes.items():
            other = rng.choice([j for j in joined if j != i])
            kind = "peers" if op % 2 == 0 else "ledger"
            begin = time.perf_counter()
            found = await node.get(_key(kind, op), latest=True)
            elapsed = time.perf_counter() - begin
            ok = found is not None and isinstance(found.value, dict) and f"peer{other}" in found.value
            results.append((elapsed, ok))
    return results


def worker(ids: list[int], ops: int, root_addrs, barrier, out, joined) -> None:
    """Run nodes ``ids``; node 0 (the root) sends its address on ``out``, every worker reads it from ``root_addrs``."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # p2pd's and hivemind's shutdown noise; errors travel on ``out``
    # the nodes answer other nodes from this loop, so it must keep running while the worker waits at barriers
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    try:
        nodes, join_s = {}, {}
        if ids[0] == 0:
            nodes, join_s, _ = run(_start_nodes([0], [], strict=True))
            out.put(("addrs", 0, [str(a) for a in run(nodes[0].get_visible_maddrs())]))
        initial = root_addrs.get(timeout=PHASE_TIMEOUT)
        barrier.wait(PHASE_TIMEOUT)
        more, more_join, failed = run(_start_nodes([i for i in ids if i != 0], initial))
        nodes.update(more)
        join_s.update(more_join)
        for i in nodes:
            joined[i] = 1
        barrier.wait(PHASE_TIMEOUT)
        stores = run(_store(nodes, ops))
        barrier.wait(PHASE_TIMEOUT)
        gets = run(_get(nodes, ops, [i for i in range(len(joined)) if joined[i]]))
        out.put(("done", ids[0], {"join": [join_s[i] for i in ids if i in join_s and i != 0], "failed": failed,
                                  "store": stores, "get": gets, "rss": _memory(os.getpid())}))
        barrier.wait(PHASE_TIMEOUT)  # nobody leaves while others still ask it
        for node in nodes.values():
            run(node.shutdown())
    except Exception as e:  # noqa: BLE001  (any failure goes back to the parent as one line)
        out.put(("error", ids[0], f"{type(e).__name__}: {e}"))
        barrier.abort()


def _memory(pid: int) -> dict:
    import psutil

    me = psutil.Process(pid)
    python = me.memory_info().rss
    daemons = sum(c.memory_info().rss for c in me.children(recursive=True) if "p2pd" in c.name())
    return {"python_mb": python / MB, "p2pd_mb": daemons / MB}


def bench(peers: int, processes: int, ops: int, timeout: float) -> dict:
    ctx = mp.get_context("fork")  # before any hivemind import here: nothing to inherit but the code
    processes = max(1, min(processes, peers))
    shares = [list(range(w, peers, processes)) for w in range(processes)]
    root_addrs, out, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(processes)
    joined = ctx.Array("b", peers)  # which nodes joined: gets only look for records of those
    procs = [ctx.Process(target=worker, args=(ids, ops, root_addrs, barrier, out, joined)) for ids in shares]
    began = time.monotonic()
    procs[0].start()
    kind, _, addrs = out.get(timeout=PHASE_TIMEOUT)
    if kind == "error":
        raise RuntimeError(f"DHT worker 0: {addrs}")
    for _ in range(processes):
        root_addrs.put(addrs)  # one copy for each worker, the root's own included
    for p in procs[1:]:
        p.start()
    results = {}
    try:
        while len(results) < processes:
            kind, wid, payload = out.get(timeout=max(1.0, began + timeout - time.monotonic()))
            if kind == "error":
                raise RuntimeError(f"DHT worker {wid}: {payload}")
            results[wid] = payload
    finally:
        stop_by = time.monotonic() + 20  # all workers together, so a stop on SIGTERM stays quick
        for p in procs:
            p.join(timeout=max(0.1, stop_by - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return _summarise(peers, processes, ops, list(results.values()), time.monotonic() - began)


def _summarise(peers: int, processes: int, ops: int, parts: list[dict], wall: float) -> dict:
    joins = [t for p in parts for t in p["join"]]
    stores = [r for p in parts for r in p["store"]]
    gets = [r for p in parts for r in p["get"]]
    python_mb = sum(p["rss"]["python_mb"] for p in parts)
    p2pd_mb = sum(p["rss"]["p2pd_mb"] for p in parts)
    failed = sum(len(p["failed"]) for p in parts)
    return {"peers": peers, "processes": processes, "ops_per_node": ops, "wall_seconds": round(wall, 1),
            "join_s": _stats(joins), "join_success": (peers - failed) / peers, "store_s": _stats([t for t, _ in stores]),
            "store_success": sum(ok for _, ok in stores) / len(stores) if stores else None,
            "get_s": _stats([t for t, _ in gets]),
            "get_success": sum(ok for _, ok in gets) / len(gets) if gets else None,
            "memory_mb_per_node": {"python": round(python_mb / peers, 1), "p2pd": round(p2pd_mb / peers, 1)}}


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "p95": ordered[int(0.95 * (len(ordered) - 1))],
            "max": ordered[-1], "n": len(ordered)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, nargs="+", default=[32, 64], help="swarm sizes (32 64)")
    p.add_argument("--processes", type=int, default=4, help="worker processes sharing the nodes (4)")
    p.add_argument("--ops", type=int, default=4, help="stores and gets per node (4)")
    p.add_argument("--timeout", type=float, default=240.0, help="limit per swarm size in seconds (240)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally that stops the workers
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    cases = []
    result = {"benchmark": "dht", "cases": cases, "load_average": os.getloadavg()[0], "complete": False,
              "command": "python scripts/bench/dht.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for n in args.peers:
        try:
            case = bench(n, args.processes, args.ops, args.timeout)
        except (RuntimeError, queue.Empty, mp.ProcessError) as e:
            print(f"error: {n} peers: {e or 'timed out'}", file=sys.stderr)
            return 1
        cases.append(case)
        write_json(args.out, result)  # what is measured survives a stop at the time budget
        log(f"  {n} peers: {case['join_success']:.0%} joined in {case['join_s']['mean']:.2f} s mean / "
            f"{case['join_s']['p95']:.2f} s p95, "
            f"store {case['store_s']['mean'] * 1e3:.0f} ms ({case['store_success']:.0%}), "
            f"get {case['get_s']['mean'] * 1e3:.0f} ms ({case['get_success']:.0%}), wall {case['wall_seconds']:.0f} s")
    result.update(complete=True, load_average=max(result["load_average"], os.getloadavg()[0]))
    write_json(args.out, result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
