"""Render docs/BENCHMARKS.md from the benchmarks' JSON results.

    python scripts/bench/report.py [--results docs/bench] [--out docs/BENCHMARKS.md]

Reads ``RESULTS/*.json``: ``run.json`` (run_all.py: stages, times), ``allreduce.json``, ``training.json``,
``dht.json``, ``ledger.json``, ``memory.json`` (scripts/bench/), and whatever else is there (``wan.json``,
``chaos.json``, ``cheaters.json`` come from other scripts: they are rendered as generic tables). A missing
or unreadable file becomes a line saying so, never an error. Adds the machine, the date, the commands
and a table of the project's targets with where each stands.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OWN = ("allreduce", "training", "dht", "ledger", "memory")


# --- machine -----------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    return {"CPU": _cpu_model(), "cores": str(os.cpu_count()), "RAM": _ram(), "kernel": platform.release(),
            "OS": _os_name(), "Python": platform.python_version(), "torch": _version("torch"),
            "hivemind": _version("hivemind"), "p2ptrain": _version("p2ptrain"),
            "load average when rendered": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        return platform.system()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# --- formatting --------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def sec(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f} s"


def ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.1f} ms"


def pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


# --- sections ----------------------------------------------------------------------------------

def section_allreduce(r: dict) -> str:
    rows = [[c["peers"], f"{c['size_mb']:g} MB", c["variant"], sec(_get(c, "p2ptrain", "round_s", "median")),
             sec(_get(c, "p2ptrain", "allreduce_s", "median")), sec(_get(c, "gloo", "allreduce_s", "median"), 4),
             ratio(c.get("ratio_round")), ratio(c.get("ratio_allreduce")), pct(_get(c, "p2ptrain", "full_group_share"), 0)]
            for c in r.get("cases", [])]
    return "\n\n".join([
        (f"Averager: {r.get('averager', 'n/a')}; {r.get('rounds_per_case', '?')} timed rounds per case after a "
         f"warm-up, medians; the round lasts until the slowest member returns. Variants p2ptrain supported at run "
         f"time: {', '.join(r.get('variants_supported', [])) or 'n/a'}."),
        table(["N", "S", "variant", "p2ptrain round (matchmaking + all-reduce)", "p2ptrain all-reduce only",
               "gloo all_reduce", "ratio round / gloo", "ratio all-reduce / gloo", "full groups"], rows)])


def section_training(r: dict) -> str:
    target = r.get("target", 0.88)
    rows = [[row["label"], sec(row.get("time_to_target"), 1), pct(row.get("utilisation")),
             pct(row.get("final_accuracy"), 2), row.get("samples"), row.get("epochs"),
             sec(row.get("training_seconds"), 1), sec(row.get("wall_seconds"), 0),
             "stopped at limit" if row.get("stopped_at_limit") else ""]
            for row in r.get("rows", {}).values()]
    ratios = r.get("ratios", {})
    parts = [
        (f"Task {r.get('task')}, target test accuracy {pct(target, 0)}, one torch thread per process, budget "
         f"{r.get('budget_seconds', 0):.0f} s for all rows. Time to target is training time with evaluation "
         f"excluded (the slowest peer's); utilisation = forward/backward seconds / training seconds (mean over "
         f"peers); epochs = global epochs (p2ptrain) or optimizer steps (DDP); wall includes start-up. DDP "
         f"trains the same model from the same seed with the task's micro-batch, optimizer and learning rate, "
         f"one gradient all-reduce per step; its global batch matches the task's mode (local updates: one "
         f"micro-batch per rank per step, as each swarm peer steps on every batch; otherwise the task's target "
         f"batch size per step) and it tests every target batch size of samples, the swarm's cadence."),
        table(["mode", f"time to {pct(target, 0)}", "utilisation", "final accuracy", "samples", "epochs/steps",
               "training", "wall", ""], rows),
        table(["ratio", "value"], [["2-peer swarm / 1 peer (time to target)", ratio(ratios.get("swarm_vs_one"))],
                                   ["2-peer swarm / DDP (time to target)", ratio(ratios.get("swarm_vs_ddp"))],
                                   ["DDP / 1 peer (time to target)", ratio(ratios.get("ddp_vs_one"))]]
              + [[f"final accuracy − 1 peer: {r['rows'][k]['label']}", f"{100 * v:+.2f} points"]
                 for k, v in ratios.get("accuracy_minus_one", {}).items() if k != "one"])]
    if r.get("skipped"):
        parts.append("Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in r["skipped"].items()) + ".")
    return "\n\n".join(parts)


def section_dht(r: dict) -> str:
    rows = [[c["peers"], c["processes"], pct(c.get("join_success"), 0), sec(_get(c, "join_s", "mean"), 2), sec(_get(c, "join_s", "p95"), 2),
             sec(_get(c, "join_s", "max"), 2), ms(_get(c, "store_s", "mean")), ms(_get(c, "store_s", "p95")),
             pct(c.get("store_success")), ms(_get(c, "get_s", "mean")), ms(_get(c, "get_s", "p95")),
             pct(c.get("get_success")),
             f"{_get(c, 'memory_mb_per_node', 'python')} + {_get(c, 'memory_mb_per_node', 'p2pd')} MiB"]
            for c in r.get("cases", [])]
    return "\n\n".join([
        ("hivemind DHTNodes, each with its own p2pd and identity, shared out over a few worker processes (one "
         "asyncio loop each); every node joins through the first one. Keys in p2ptrain's style "
         "(`{run}_peers`, `{run}_ledger_{epoch}`, subkey = the peer); gets read records other nodes stored."),
        table(["peers", "processes", "joined", "join mean", "join p95", "join max", "store mean", "store p95", "store ok",
               "get mean", "get p95", "get ok", "RSS per node (Python share + p2pd)"], rows)])


def section_ledger(r: dict) -> str:
    v, rd = r.get("verify", {}), r.get("round", {})
    rows = [["records verified per CPU-second", f"{v.get('records_per_s_cpu', 0):,.0f}", "≥ 10,000"],
            ["records verified per wall second", f"{v.get('records_per_s_wall', 0):,.0f}", ""],
            ["ledger time per round, CPU (mean / median / p95)",
             " / ".join(f"{_get(rd, 'cpu_ms', k) or 0:.2f} ms" for k in ("mean", "median", "p95")), "< 5 ms"],
            ["ledger time per round, wall (mean / median / p95)",
             " / ".join(f"{_get(rd, 'wall_ms', k) or 0:.2f} ms" for k in ("mean", "median", "p95")), "< 5 ms"]]
    return (f"{v.get('records', '?')} records, {rd.get('rounds', '?')} rounds of a {rd.get('group_size', '?')}-peer "
            f"group; {r.get('cpu', '')}; Ed25519 via {r.get('signature_backend', '?')}.\n\n"
            + table(["measure", "value", "target"], rows))


def section_memory(r: dict) -> str:
    mean = r.get("per_peer_mean_of_peaks", {})
    names = {"python": "p2ptrain join (Python)", "workers": "hivemind workers (DHT, averagers; forked)",
             "p2pd": "p2pd daemon", "total": "total per peer"}
    rows = [[names.get(k, k), f"{v['rss_mb']:.0f} MiB", f"{v['pss_mb']:.0f} MiB", f"{v['processes']:.0f}"]
            for k, v in mean.items()]
    return (f"{r.get('task')}, {r.get('peers')} peers ({r.get('source', 'memory.py')}); peak over "
            f"{r.get('samples')} samples, mean over peers. RSS counts pages the forked workers share with the "
            f"peer again in each process; PSS splits them and adds up: read the PSS total. Component peaks "
            f"happen at different moments, so they need not add up to the total's peak.\n\n"
            + table(["component", "RSS", "PSS", "processes"], rows))


def section_generic(r: Any) -> str:
    """Someone else's JSON: scalars as key/value rows, lists of objects as tables, nested objects flattened."""
    if not isinstance(r, dict):
        return f"```\n{json.dumps(r, indent=1)[:4000]}\n```"
    scalars = [[k, v] for k, v in _flatten(r).items()]
    parts = [table(["key", "value"], scalars)] if scalars else []
    for key, value in r.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            flat = [_flatten(x) for x in value]
            header = list(dict.fromkeys(k for row in flat for k in row))
            parts.append(f"`{key}`:\n\n" + table(header, [[row.get(h) for h in header] for row in flat]))
    return "\n\n".join(parts) or "(empty)"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            continue  # rendered as its own table
        elif isinstance(v, list):
            out[name] = ", ".join(map(_cell, v))
        else:
            out[name] = v
    return out


# --- targets -----------------------------------------------------------------------------------

def targets(results: dict[str, dict]) -> list[list[str]]:
    tr, ar, led = results.get("training") or {}, results.get("allreduce") or {}, results.get("ledger") or {}
    rows = []

    def add(name: str, measured: str, met: bool | None) -> None:
        rows.append([name, measured, "n/a" if met is None else ("met" if met else "not met")])

    swarm = _get(tr, "rows", "swarm") or {}
    u = swarm.get("utilisation")
    add("compute utilisation of a swarm peer ≥ 90% (loopback)", pct(u), None if u is None else u >= 0.9)
    v = _get(tr, "ratios", "swarm_vs_one")
    add("2-peer swarm time to 88% ≤ 0.6× 1 peer", ratio(v), None if v is None else v <= 0.6)
    v = _get(tr, "ratios", "swarm_vs_ddp")
    add("swarm time to 88% ≤ 1.2× DDP (loopback)", ratio(v), None if v is None else v <= 1.2)
    plain = [c for c in ar.get("cases", []) if c.get("variant") == "none" and c.get("ratio_round") is not None]
    if plain:
        worst = max(plain, key=lambda c: c["ratio_round"])
        add("averaging round ≤ 3× gloo, same bytes (loopback)",
            f"{worst['ratio_round']:.1f}x worst (N={worst['peers']}, {worst['size_mb']:g} MB); all-reduce alone "
            f"{max(c['ratio_allreduce'] or 0 for c in plain):.1f}x worst",
            all(c["ratio_round"] <= 3 for c in plain))
    else:
        add("averaging round ≤ 3× gloo, same bytes (loopback)", "n/a", None)
    # rows that stopped short of the target (a limit, or a mode that cannot reach it) are named, not compared
    short = [k for k, r in (tr.get("rows") or {}).items() if k != "one" and r.get("time_to_target") is None]
    deltas = {k: d for k, d in (_get(tr, "ratios", "accuracy_minus_one") or {}).items()
              if k != "one" and k not in short}
    if deltas and _get(tr, "rows", "one", "time_to_target") is None:
        add("final accuracy of every mode within 0.5 points of 1 peer", "n/a: the 1-peer run did not reach the "
            "target in its time", None)
    elif deltas:
        worst = max(deltas, key=lambda k: abs(deltas[k]))
        add("final accuracy of every mode within 0.5 points of 1 peer",
            f"{100 * deltas[worst]:+.2f} points worst ({worst}); rows stop at the target, so sample counts differ"
            + (f"; not compared (target not reached): {', '.join(short)}" if short else ""),
            all(abs(d) <= 0.005 for d in deltas.values()))
    else:
        add("final accuracy of every mode within 0.5 points of 1 peer", "n/a", None)
    met = led.get("targets_met") or {}
    if met:
        add("ledger: ≥ 10,000 records verified per CPU-second",
            f"{_get(led, 'verify', 'records_per_s_cpu') or 0:,.0f}/s", met.get("verify_10k_per_s"))
        add("ledger: < 5 ms added per round", f"{_get(led, 'round', 'cpu_ms', 'p95') or 0:.2f} ms CPU p95",
            met.get("round_under_5ms"))
    return rows


# --- the document ------------------------------------------------------------------------------

SECTIONS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "allreduce": ("All-reduce: p2ptrain's averaging round vs gloo", section_allreduce),
    "training": ("Training: time to target accuracy and compute utilisation", section_training),
    "dht": ("DHT: join time, store/get latency", section_dht),
    "ledger": ("Ledger: verification throughput, time per round", section_ledger),
    "memory": ("Memory per peer", section_memory),
}


def load(results_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    results, problems = {}, {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems[path.stem] = f"unreadable: {e}"
    return results, problems


def render(results_dir: Path) -> str:
    results, problems = load(results_dir)
    run = results.pop("run", {}) or {}
    date = run.get("finished") or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# Benchmarks", "",
           f"Generated by `make bench` (`scripts/bench/run_all.py`, then `scripts/bench/report.py`) on {date}."
           + (f" The whole run took {run['total_seconds']:.0f} s." if run.get("total_seconds") else ""),
           "Figures from a shared machine are rough: see the load averages.", "", "## Machine", "",
           table(["", ""], [[k, v] for k, v in machine().items()]), "", "## Targets", "",
           table(["target", "measured", "status"], targets(results)), "", "## Commands", "",
           "```", "make bench    # = .venv/bin/python scripts/bench/run_all.py"]
    for name in [*OWN, *sorted(k for k in results if k not in OWN)]:
        if name in results and isinstance(results[name], dict) and results[name].get("command"):
            out.append(results[name]["command"])
    out += ["```", ""]
    if run.get("stages"):
        out += [("Stages of the last `make bench` run (a section whose command above differs from the stage's "
                 "was measured by a separate run of that script):"), "",
                table(["stage", "seconds", "budget", "status"],
                      [[s["name"], f"{s['seconds']:.0f}", f"{s.get('budget', 0):.0f}", s.get("status", "")]
                       for s in run["stages"]]), ""]
    for name, (title, render_section) in SECTIONS.items():
        out += [f"## {title}", ""]
        if name in results:
            load_avg = results[name].get("load_average") if isinstance(results[name], dict) else None
            try:
                out.append(render_section(results[name]))
            except (KeyError, TypeError, ValueError) as e:
                out.append(f"(could not render {name}.json: {type(e).__name__}: {e})")
            if load_avg is not None:
                out += ["", f"Load average (1 min) during this benchmark: {load_avg:.1f}."]
            if isinstance(results[name], dict) and results[name].get("complete") is False:
                out += ["", ("**Partial**: the benchmark was stopped at its time budget; these are the cases "
                             "it finished.")]
        else:
            out.append(f"Not measured in this run ({problems.get(name, f'no {name}.json')}).")
        out.append("")
    for name in sorted({*results, *problems} - {*OWN, "run"}):
        body = section_generic(results[name]) if name in results else f"Could not be read ({problems[name]})."
        out += [f"## {name} (from {name}.json)", "", body, ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "bench", help="JSON results (docs/bench)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="the report (docs/BENCHMARKS.md)")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: no results directory {args.results}: run the benchmarks first (make bench)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
