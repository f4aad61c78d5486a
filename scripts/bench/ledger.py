"""Benchmark the contribution ledger on one core.

1. verification throughput: parse + fully audit N records (signatures, chains, claims vs receipts) from
   their JSON text, as `p2ptrain ledger verify FILE.jsonl` does (target >= 10,000 records/s);
2. the ledger's added time per round on one peer: sign + append its claim, check 3 groupmates' claims from
   the all-gather, co-sign + append the receipt (target < 5 ms).

Usage: python scripts/bench/ledger.py [--records 20000] [--rounds 300] [--json] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from p2ptrain.ledger import Ledger, LedgerWriter, read_jsonl, verify
from p2ptrain.ledger.records import VERIFY_BACKEND
from p2ptrain.ledger.simulate import digest, make_peers


def pin_to_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to cpu {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def make_records(directory: Path, count: int, group: int = 4) -> Path:
    """A JSONL export of ``count`` records of a ``group``-peer swarm (a claim and a co-signature per peer per epoch)."""
    ledger = Ledger(directory / "bench.sqlite", run_id="bench")
    peers = make_peers(directory, group, "bench", shared_ledger=ledger)
    weights = {p.identity.public_key: 256 for p in peers}
    for epoch in range(count // (2 * group)):
        for p in peers:
            p.writer.claim(epoch, 256, 1.0, {"seed": epoch, "steps": 8}, digest(f"m{epoch}"), digest("g"), 0.5)
        for p in peers:
            p.writer.cosign(epoch, weights, digest(f"avg{epoch}"))
    ledger.export_jsonl(directory / "bench.jsonl")
    ledger.close()
    return directory / "bench.jsonl"


def bench_verify(path: Path) -> dict:
    """What `p2ptrain ledger verify FILE.jsonl` does, minus printing: read, parse, check everything."""
    wall, cpu = time.perf_counter(), time.process_time()
    report = verify(read_jsonl(path))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not report.ok:
        raise SystemExit(f"benchmark ledger did not verify: {report.problems[0].describe()}")
    return {"records": report.records, "wall_s": wall, "cpu_s": cpu, "records_per_s_wall": report.records / wall,
            "records_per_s_cpu": report.records / cpu}


def bench_round(directory: Path, rounds: int, group: int = 4) -> dict:
    """Time one peer's ledger work per round; its groupmates' claims are prepared outside the timing."""
    peers = make_peers(directory, group, "bench-round")
    me, mates = peers[0], peers[1:]
    wall, cpu = [], []
    for epoch in range(rounds):
        mate_claims = [m.writer.claim(epoch, 256, 1.0, {"seed": epoch}, digest("m"), digest("g"), 0.5) for m in mates]
        start, start_cpu = time.perf_counter(), time.process_time()
        mine = me.writer.claim(epoch, 256, 1.0, {"seed": epoch, "steps": 8}, digest("m"), digest("g"), 0.5)
        gathered = {me.identity.peer_id: LedgerWriter.gather_payload(mine, 256)}
        gathered.update({m.identity.peer_id: LedgerWriter.gather_payload(c, 256) for m, c in zip(mates, mate_claims)})
        check = me.writer.check_groupmate_claims(epoch, gathered)
        me.writer.cosign(epoch, check.members, digest(f"avg{epoch}"))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        assert not check.problems
        for m in mates:  # keep their chains consistent; not timed
            m.writer.cosign(epoch, check.members, digest(f"avg{epoch}"))
    return {"rounds": rounds, "group_size": group, "wall_ms": _stats(wall), "cpu_ms": _stats(cpu)}


def _stats(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"mean": 1e3 * statistics.fmean(ordered), "median": 1e3 * statistics.median(ordered),
            "p95": 1e3 * ordered[int(0.95 * (len(ordered) - 1))], "max": 1e3 * ordered[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="records to verify (default: 20000)")
    parser.add_argument("--rounds", type=int, default=300, help="rounds to time (default: 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON here (for scripts/bench/report.py)")
    args = parser.parse_args(argv)
    pinned = pin_to_one_core()
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("v", "r"):
            (Path(tmp) / sub).mkdir()
        path = make_records(Path(tmp) / "v", args.records)
        result = {"cpu": pinned, "signature_backend": VERIFY_BACKEND, "load_average": os.getloadavg()[0],
                  "verify": bench_verify(path)}
        result["round"] = bench_round(Path(tmp) / "r", args.rounds)
    v, r = result["verify"], result["round"]
    result["targets_met"] = {"verify_10k_per_s": v["records_per_s_cpu"] >= 10000,
                             "round_under_5ms": r["cpu_ms"]["p95"] < 5 and r["wall_ms"]["median"] < 5}
    result["benchmark"] = "ledger"
    result["command"] = "python scripts/bench/ledger.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"ledger benchmark ({pinned}; Ed25519 via {VERIFY_BACKEND}; load average {result['load_average']:.1f})")
    print(f"verify: {v['records']} records parsed + audited in {v['cpu_s']:.2f} s CPU ({v['wall_s']:.2f} s wall): "
          f"{v['records_per_s_cpu']:,.0f} records/s per CPU-second ({v['records_per_s_wall']:,.0f}/s wall); "
          f"target >= 10,000/s")
    for clock in ("cpu", "wall"):
        t = r[f"{clock}_ms"]
        print(f"round ({clock:4s}): claim + check 3 groupmate claims + co-sign, {r['rounds']} rounds: mean "
              f"{t['mean']:.2f} ms, median {t['median']:.2f} ms, p95 {t['p95']:.2f} ms, max {t['max']:.2f} ms; "
              f"target < 5 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
