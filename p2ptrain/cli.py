"""The ``p2ptrain`` command. Only this module prints; everything else logs or returns values.

Each sub-command is a ``cmd_<name>(args) -> int`` function registered in ``build_parser``.
A :class:`UserError` becomes one red line on stderr and a non-zero exit; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from p2ptrain.config import AGGREGATIONS, COMPRESSIONS
from p2ptrain.errors import UserError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def cmd_identity(args: argparse.Namespace) -> int:
    from p2ptrain.identity import Identity, default_home

    identity = Identity.load_or_create(args.identity or default_home() / "identity.key")
    info = {"peer_id": identity.peer_id, "name": identity.name, "public_key": identity.public_key.hex(),
            "path": str(identity.path)}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            console.print(f"[bold]{key:<11}[/] {value}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from p2ptrain.checkpoint import load_checkpoint
    from p2ptrain.metrics import evaluate
    from p2ptrain.tasks import load_task

    checkpoint = load_checkpoint(args.checkpoint)
    task = load_task(args.task or checkpoint.task, args.data_dir)
    model = task.make_model()
    checkpoint.apply(model)
    # Task has no class_names field yet; picked up here as soon as it does
    metrics = evaluate(model, task, class_names=getattr(task, "class_names", None))
    if args.json:
        print(json.dumps({**metrics.to_dict(), "epoch": checkpoint.epoch, "task": task.name}))
    else:
        console.print(f"[bold]{task.name}[/] checkpoint {checkpoint.directory}, global epoch {checkpoint.epoch}",
                      soft_wrap=True)
        console.print(metrics)
    return 0


BOOTSTRAP_PORT = 31337  # a fixed default so the bootstrap's address survives restarts


def setup_logging(args: argparse.Namespace) -> None:
    """Our INFO logs and hivemind's warnings on stderr; hivemind's tracebacks only with --debug."""
    import logging

    from hivemind.utils.logging import use_hivemind_log_handler
    from rich.logging import RichHandler

    use_hivemind_log_handler("nowhere")
    quiet, plain = getattr(args, "quiet", False), getattr(args, "log_format", "rich") == "plain"
    handler: logging.Handler
    if plain or not console.is_terminal:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        # the same console as the live status line, so log lines scroll above it instead of through it
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=args.debug)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda record: not getattr(record, "routine", False))
    if not args.debug:
        handler.addFilter(_no_hivemind_tracebacks)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler], force=True)
    logging.getLogger("p2ptrain").setLevel(logging.WARNING if quiet else logging.DEBUG if args.debug else logging.INFO)
    logging.getLogger("hivemind").setLevel(logging.DEBUG if args.debug else logging.ERROR if quiet else logging.WARNING)
    # hivemind's shutdown leaves pending asyncio tasks behind; asyncio reports each one as an error
    logging.getLogger("asyncio").setLevel(logging.DEBUG if args.debug else logging.CRITICAL)


def _no_hivemind_tracebacks(record) -> bool:
    if record.name.startswith("hivemind"):
        record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _settings(args: argparse.Namespace):
    from p2ptrain.config import resolve

    return resolve(getattr(args, "config", None), vars(args))


def _print_started(started, *, role: str) -> None:
    console.print(f"[bold green]{role} {started.name}[/] ({started.peer_id}) is up.")
    if started.new_swarm:
        console.print("Started a new swarm. Others join with:")
    else:
        console.print("Joined the swarm. Others can also join through this peer:")
    console.print(f"  {started.join_line}", soft_wrap=True)


def _live_status(args: argparse.Namespace, status: dict):
    """A status line redrawn twice a second on a terminal; nothing for --quiet, plain logs or pipes."""
    from contextlib import nullcontext

    from rich.live import Live
    from rich.text import Text

    from p2ptrain.dashboard import PeerStatusLine

    if getattr(args, "quiet", False) or args.log_format == "plain" or not console.is_terminal:
        return nullcontext()

    def render():
        return PeerStatusLine(status["get"]()) if "get" in status else Text("joining the swarm…", style="dim")

    return Live(get_renderable=render, console=console, refresh_per_second=2, transient=True)


def cmd_join(args: argparse.Namespace) -> int:
    from p2ptrain.peer import run_join

    setup_logging(args)
    settings = _settings(args)
    status: dict = {}
    with _live_status(args, status):
        finished = run_join(settings, on_started=lambda s: _print_started(s, role="peer"),
                            on_status=lambda get: status.update(get=get))
    summary = {"name": finished.name, "epoch": finished.epoch, "accuracy": finished.accuracy,
               "checkpoint": finished.checkpoint_dir, "interrupted": finished.interrupted,
               "steps": finished.stats["steps"], "samples": finished.stats["samples"],
               "compute_seconds": round(finished.stats["compute_seconds"], 3),
               "training_seconds": round(finished.stats["training_seconds"], 3),
               "rounds": finished.stats["rounds"], "rounds_averaged": finished.stats["rounds_averaged"],
               "time_to_accuracy": finished.stats["time_to_accuracy"],
               "eval_seconds": round(finished.stats["eval_seconds"], 3),
               "rejected_parts": finished.stats["rejected_parts"],
               "ledger": finished.ledger, "ledger_clean": finished.stats["ledger_clean"]}
    if args.json:
        print(json.dumps(summary))
    else:
        verb = "stopped" if finished.interrupted else "finished"
        accuracy = f"{finished.accuracy:.4f}" if finished.accuracy is not None else "n/a"
        console.print(f"{verb} at epoch {finished.epoch}: test accuracy {accuracy}; "
                      f"{finished.stats['rounds_averaged']}/{finished.stats['rounds']} rounds averaged with peers; "
                      f"checkpoint in {finished.checkpoint_dir}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from p2ptrain.peer import run_bootstrap

    setup_logging(args)
    settings = _settings(args)
    if settings.port == 0 and not settings.host_maddrs:  # neither flags nor profile chose where to listen
        settings.port = BOOTSTRAP_PORT
    run_bootstrap(settings, on_started=lambda s: _print_started(s, role="bootstrap peer"))
    console.print("bootstrap peer stopped")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    import time

    from rich.live import Live

    from p2ptrain.dashboard import Dashboard
    from p2ptrain.monitor import Collector
    from p2ptrain.swarm import start_dht

    setup_logging(args)
    vars(args).setdefault("join_timeout", 20.0)
    settings = _settings(args)
    if not settings.initial_peers:
        raise UserError("the monitor needs --initial-peers: the address of any peer in the swarm")
    dht = start_dht(settings, None, client_mode=True)
    server = None
    try:
        collector = Collector(dht, settings.run_id)
        if args.once or args.json:
            snapshot = collector.refresh()
            deadline = time.monotonic() + args.wait
            while not snapshot.peers and time.monotonic() < deadline:  # heartbeats arrive every 2 s
                time.sleep(0.5)
                snapshot = collector.refresh()
            if args.json:
                print(json.dumps(snapshot.to_dict(), allow_nan=False, default=str))
            else:
                console.print(Dashboard(snapshot, max_peers=len(snapshot.peers)))
            return 0
        latest = {"snapshot": collector.refresh()}
        if args.prometheus:
            server = _serve_prometheus(args.prometheus_host, args.prometheus, lambda: latest["snapshot"])
        with Live(get_renderable=lambda: Dashboard(latest["snapshot"]), console=console, screen=console.is_terminal,
                  refresh_per_second=2), _quit_keys() as quit_requested:
            while not quit_requested.wait(1.0):
                latest["snapshot"] = collector.refresh()
        return 0
    finally:
        if server is not None:
            server.shutdown()
        dht.shutdown()


def _serve_prometheus(host: str, port: int, get_snapshot):
    """Serve ``to_prometheus(snapshot)`` at http://host:port/metrics from a background thread."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from p2ptrain.snapshot import to_prometheus

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = to_prometheus(get_snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):  # no access log on the dashboard's terminal
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot serve Prometheus metrics on {host}:{port}: {e.strerror}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _quit_keys():
    """An Event set by 'q' on the terminal or by Ctrl-C / SIGTERM."""
    import contextlib
    import signal
    import termios
    import threading
    import tty

    @contextlib.contextmanager
    def watch():
        quit_requested = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: quit_requested.set())
        saved = None
        if sys.stdin.isatty():
            saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin)

            def read_keys():
                while not quit_requested.is_set():
                    if sys.stdin.read(1) in ("q", "Q"):
                        quit_requested.set()

            threading.Thread(target=read_keys, daemon=True).start()
        try:
            yield quit_requested
        finally:
            if saved is not None:
                termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)

    return watch()


def _add_network_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="addresses of peers already in the swarm")
    g.add_argument("--run-id", help="name of the training run (default: p2ptrain)")
    g.add_argument("--identity", type=Path, help="key file (default: ~/.p2ptrain/identity.key)")
    g.add_argument("--port", type=int, help="TCP port to listen on (default: any free port)")
    g.add_argument("--host-maddrs", nargs="+", metavar="MADDR", help="listen addresses, overriding --port")
    g.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", help="public addresses to announce")
    g.add_argument("--config", type=Path, metavar="FILE", help="a TOML profile, e.g. peers/trainer.toml")
    g.add_argument("--client-mode", action="store_true", help="behind NAT: connect out only")
    g.add_argument("--join-timeout", type=float, metavar="SECONDS", help="keep retrying initial peers this long")
    g.add_argument("--allowlist", type=Path, metavar="FILE", help="a closed run: the owner-signed list of allowed keys")
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="only warnings and errors")
    g.add_argument("--log-format", choices=["rich", "plain"], default="rich", help="plain: one line per event")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--auxiliary", action="store_true", help="help average, compute no gradients")
    g.add_argument("--task", help="digits-mlp (default), fashion-mlp, or package.module:factory")
    g.add_argument("--data-dir", type=Path, help="where the task's data lives")
    g.add_argument("--batch-size", type=int, help="local batch size (default: the task's)")
    g.add_argument("--target-batch-size", type=int, help="samples the swarm accumulates per global epoch")
    g.add_argument("--max-epochs", type=int, help="stop at this global epoch")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--seed", type=int, help="seed for the initial weights (same for every peer)")
    g.add_argument("--checkpoint-dir", type=Path, help="default: ~/.p2ptrain/runs/<run>/<name>/checkpoint")
    g.add_argument("--checkpoint-every", type=int, metavar="EPOCHS", help="checkpoint interval (default: 10)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    g.add_argument("--ledger", type=Path, metavar="PATH", help="ledger file (default: ~/.p2ptrain/runs/<run>/<name>/ledger.sqlite)")
    g.add_argument("--delay-updates", action=argparse.BooleanOptionalAction,
                   help="overlap averaging with the next epoch's compute (one stale step)")
    g.add_argument("--local-updates", action=argparse.BooleanOptionalAction,
                   help="step locally on every batch; average the epoch's change (DiLoCo-style outer step)")
    g.add_argument("--compression", choices=COMPRESSIONS, help="what averaging sends: none (float32), fp16, 8bit")
    g.add_argument("--aggregation", choices=AGGREGATIONS,
                   help="mean (default), or centered-clip: robust to peers sending bad gradients")
    g.add_argument("--stop-at-accuracy", type=float, metavar="A",
                   help="leave once the test accuracy reaches A (checked every epoch; for benchmarks)")
    g.add_argument("--matchmaking-time", type=float, metavar="SECONDS", help="time to gather an averaging group")
    g.add_argument("--averaging-timeout", type=float, metavar="SECONDS", help="give up on a round after this")
    g.add_argument("--min-peers", type=int, help="wait for this many training peers before starting (default: 1)")
    g.add_argument("--torch-threads", type=int, help="torch threads for this peer (default: 1)")
    g.add_argument("--json", action="store_true", help="print a JSON summary at the end")


# ---- allowlist -------------------------------------------------------------------------------------------

def _allowlist_identity(args: argparse.Namespace, *, create: bool):
    from p2ptrain.identity import Identity, default_home

    path = args.identity or default_home() / "identity.key"
    if not create and not path.exists():
        raise UserError(f"no identity at {path}: only the owner's key can sign the allowlist (--identity FILE)")
    return Identity.load_or_create(path) if create else Identity.load(path)


def _print_allowlist(allowlist, path: Path, as_json: bool, note: str = "") -> None:
    from p2ptrain.identity import peer_id_of
    from p2ptrain.names import readable_name

    entries = [("owner", allowlist.owner, readable_name(allowlist.owner))]
    entries += [("peer", m.public_key, m.name) for m in allowlist.members]
    if as_json:
        print(json.dumps({"file": str(path), "run_id": allowlist.run_id, "version": allowlist.version,
                          "owner": allowlist.owner.hex(), "owner_peer_id": peer_id_of(allowlist.owner),
                          "peers": [{"role": role, "name": name, "peer_id": peer_id_of(key), "public_key": key.hex()}
                                    for role, key, name in entries]}))
        return
    if note:
        console.print(note, soft_wrap=True)
    console.print(f"{path}: run {allowlist.run_id}, version {allowlist.version}, {len(entries)} keys, "
                  f"signature valid", soft_wrap=True, markup=False)
    for role, key, name in entries:
        console.print(f"  {role:<5} {name:<24} {peer_id_of(key)}  {key.hex()}", soft_wrap=True, markup=False)


def cmd_allowlist_create(args: argparse.Namespace) -> int:
    from p2ptrain.allowlist import Allowlist, parse_peer, write

    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} already exists: change it with `p2ptrain allowlist add/remove`, "
                        f"or replace it with --force")
    members = [parse_peer(p) for p in args.add]
    allowlist = Allowlist.create(_allowlist_identity(args, create=True), args.run_id, members)
    write(allowlist, args.output)
    _print_allowlist(allowlist, args.output, args.json, note=f"created {args.output}")
    return 0


def cmd_allowlist_change(args: argparse.Namespace) -> int:
    from p2ptrain.allowlist import load, parse_peer, write

    allowlist = load(args.file)
    peers = [parse_peer(p) for p in args.peers]
    owner = _allowlist_identity(args, create=False)
    if args.allowlist_command == "add":
        updated = allowlist.updated(owner, add=peers)
    else:
        missing = [p.public_key for p in peers if not allowlist.allows(p.public_key)]
        if missing:
            from p2ptrain.identity import peer_id_of
            raise UserError(f"{peer_id_of(missing[0])} is not on {args.file}; nothing was changed")
        updated = allowlist.updated(owner, remove=[p.public_key for p in peers])
    write(updated, args.file)
    _print_allowlist(updated, args.file, args.json, note=f"{args.file}: version {allowlist.version} -> "
                     f"{updated.version}; hand it to a running swarm with `p2ptrain allowlist publish {args.file} "
                     f"--initial-peers …`")
    return 0


def cmd_allowlist_publish(args: argparse.Namespace) -> int:
    from p2ptrain.allowlist import REFRESH, fetch, load, publish
    from p2ptrain.config import Settings
    from p2ptrain.swarm import start_dht

    setup_logging(args)
    allowlist = load(args.file)
    settings = Settings(run_id=allowlist.run_id, initial_peers=args.initial_peers, join_timeout=args.join_timeout)
    dht = start_dht(settings, None, client_mode=True)  # a throwaway key: the list carries the owner's signature
    try:
        if not publish(dht, allowlist):
            raise UserError(f"no peer of the swarm accepted {args.file}: are they running run {allowlist.run_id} "
                            f"with a list by the same owner ({allowlist.describe()})?")
        newest = fetch(dht, allowlist.run_id, allowlist.owner)
    finally:
        dht.shutdown()
    if newest is not None and newest.version > allowlist.version:
        console.print(f"published version {allowlist.version}, but the swarm already has version {newest.version}, "
                      f"which stays in force", soft_wrap=True)
    else:
        console.print(f"published version {allowlist.version} of run {allowlist.run_id}'s allowlist; running peers "
                      f"enforce it within {REFRESH:.0f}s", soft_wrap=True)
    return 0


def cmd_allowlist_show(args: argparse.Namespace) -> int:
    from p2ptrain.allowlist import load

    _print_allowlist(load(args.file, args.run_id), args.file, args.json)
    return 0


def _add_allowlist_parser(sub: argparse._SubParsersAction) -> None:
    allowlist = sub.add_parser("allowlist", help="create, change and show the signed list of keys of a closed run")
    commands = allowlist.add_subparsers(dest="allowlist_command", required=True, metavar="ACTION")
    peers_help = "peer id (12D3KooW…) or public key hex, optionally =NAME"

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument("--identity", type=Path, help="the owner's key file (default: ~/.p2ptrain/identity.key)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)
        return p

    p = add("create", cmd_allowlist_create, "a new list for a run, signed by --identity (the run owner)")
    p.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the run the list closes (default: p2ptrain)")
    p.add_argument("--add", nargs="+", default=[], metavar="PEER", help=peers_help)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="where to write the list")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    for name, verb in (("add", "add peers to"), ("remove", "remove peers from")):
        p = add(name, cmd_allowlist_change, f"{verb} the list: a new version signed by the owner")
        p.add_argument("file", type=Path, metavar="FILE")
        p.add_argument("peers", nargs="+", metavar="PEER", help=peers_help)
    p = add("publish", cmd_allowlist_publish, "hand a new version to a running swarm (peers adopt it within 30 s)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="address of any peer in the swarm")
    p.add_argument("--join-timeout", type=float, default=20.0, metavar="SECONDS", help="keep retrying this long")
    p = add("show", cmd_allowlist_show, "verify the list's signature and print it")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--run-id", help="also check that the list is for this run")


# ---- ledger ----------------------------------------------------------------------------------------------

DEFAULT_RUN_ID = "p2ptrain"


def _ledger_path(args: argparse.Namespace) -> Path:
    """--ledger PATH, or the file a `join` peer writes: <home>/runs/<run id>/<peer name>/ledger.sqlite."""
    if args.ledger is not None:
        return args.ledger
    from p2ptrain.identity import Identity, default_home  # imports hivemind (2 s): only when needed
    from p2ptrain.ledger.store import default_ledger_path

    key = args.identity or default_home() / "identity.key"
    if not key.exists():
        raise UserError(f"no identity at {key}, so no default ledger; pass --ledger PATH or --identity FILE")
    return default_ledger_path(default_home(), args.run_id or DEFAULT_RUN_ID, Identity.load(key).name)


def _ledger_entries(path: Path, run_id: str | None) -> tuple[list, str | None, str]:
    """(records with where each is stored, the run id, a label) from an SQLite ledger or a JSONL file.

    ``run_id`` (--run-id, if given) is the run the records must belong to; an SQLite ledger of another run is
    refused, a JSONL file's records of another run are reported by verify.
    """
    from p2ptrain.ledger.store import Ledger, is_sqlite, read_jsonl

    if path.is_file() and not is_sqlite(path):
        records = read_jsonl(path)
        return [(record, f"line {number}") for number, record in enumerate(records, 1)], run_id, f"{path} (JSONL)"
    with Ledger(path, create=False, run_id=run_id) as ledger:
        return ledger.entries(), ledger.run_id, str(path)


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from p2ptrain.names import readable_name

    entries, run_id, label = _ledger_entries(_ledger_path(args), args.run_id)
    records = [record for record, _ in entries]
    if args.peer:
        wanted = args.peer.lower()
        records = [r for r in records if readable_name(r.public_key) == wanted or r.public_key.hex().startswith(wanted)]
        if not records:
            raise UserError(f"no records of peer {args.peer!r} in {label}")
    if args.json:
        print(json.dumps({"ledger": label, "run_id": run_id, "records": [
            {**r.to_dict(), "hash": r.hash, "peer": readable_name(r.public_key)} for r in records]}))
        return 0
    console.print(f"{label}: {len(records)} records", soft_wrap=True)
    table = Table(box=None)
    for column in ("epoch", "kind", "peer", "seq", "samples", "detail", "hash"):
        table.add_column(column, justify="right" if column in ("epoch", "seq", "samples") else "left",
                         no_wrap=column != "detail")
    for r in records:
        if r.kind == "claim":
            samples, detail = r.samples, f"{r.compute_seconds:.1f} s, loss {r.mean_loss}"
        else:
            samples, detail = r.weights[r.public_key], f"group {r.group_id[:8]} of {len(r.members)}"
        table.add_row(str(r.epoch), r.kind, readable_name(r.public_key), str(r.seq), str(samples), detail, r.hash[:8])
    console.print(table)
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from p2ptrain.ledger.audit import verify

    if args.source is not None and args.ledger is not None:
        raise UserError("give either FILE or --ledger PATH, not both")
    if args.source is not None:
        args.ledger = args.source
    entries, run_id, label = _ledger_entries(_ledger_path(args), args.run_id)
    report = verify(entries, run_id=run_id)
    summary = report.summary()
    if args.json:
        print(json.dumps({"ledger": label, **summary, "problems": [p.to_dict() for p in report.problems],
                          "pending": [p.to_dict() for p in report.pending]}))
        return 0 if report.ok else 1
    console.print(f"{label} (run {report.run_id}): {summary['records']} records from {summary['peers']} peers, "
                  f"{summary['claims']} claims, {summary['receipts']} receipts "
                  f"({summary['cosignatures']} co-signatures)", soft_wrap=True)
    if report.pending:
        console.print(f"{len(report.pending)} round{'s' if len(report.pending) != 1 else ''} pending (a peer's newest "
                      f"claim has no receipt yet; it earns no credit until one attests it):")
        for entry in report.pending:
            console.print(f"  {entry.describe()}", soft_wrap=True, markup=False)
    if report.ok:
        console.print("[green]clean:[/] every signature, chain and claim checks out")
        return 0
    console.print(f"[red]{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}:[/]")
    for problem in report.problems:
        console.print(f"  {problem.describe()}", soft_wrap=True, markup=False)
    return 1


def cmd_ledger_fairness(args: argparse.Namespace) -> int:
    from rich.table import Table

    from p2ptrain.ledger.fairness import fairness

    entries, run_id, label = _ledger_entries(_ledger_path(args), args.run_id)
    report = fairness(entries, run_id=run_id)
    if args.json:
        print(json.dumps({"ledger": label, **report.to_dict()}))
        return 0
    console.print(f"{label} (run {report.audit.run_id}): work per peer", soft_wrap=True)
    table = Table(box=None)
    for column in ("peer", "claimed", "attested", "compute", "epochs", "share", "held-out Δ", "flags"):
        table.add_column(column, justify="left" if column in ("peer", "flags") else "right", no_wrap=column != "flags")
    for p in report.peers:
        delta = "" if p.heldout_delta is None else f"{p.heldout_delta:+.4f}"
        table.add_row(p.name, str(p.samples_claimed), str(p.samples_attested), f"{p.compute_seconds:.1f} s",
                      str(p.epochs_joined), f"{100 * p.share:.1f}%", delta, ", ".join(p.flags))
    console.print(table)
    console.print(f"swarm: {report.total_attested} attested samples, Gini of work shares {report.gini:.3f}, "
                  f"{len(report.flagged)} flagged peer{'s' if len(report.flagged) != 1 else ''}"
                  + (f" ({', '.join(report.flagged)})" if report.flagged else ""), soft_wrap=True)
    console.print("did the work: 'attested' counts samples that groupmates co-signed in a receipt; "
                  "the work helped: 'held-out Δ' is the mean drop of held-out loss over the rounds a peer joined "
                  + ("(blank where peers report none)" if report.heldout_first is not None else
                     "(no peer reported a held-out loss)"), soft_wrap=True, style="dim")
    return 0


def cmd_ledger_export(args: argparse.Namespace) -> int:
    from p2ptrain.ledger.store import Ledger

    path = _ledger_path(args)
    with Ledger(path, create=False) as ledger:
        count = ledger.export_jsonl(args.file)
    if args.json:
        print(json.dumps({"ledger": str(path), "file": str(args.file), "records": count}))
    else:
        console.print(f"exported {count} records from {path} to {args.file}", soft_wrap=True)
    return 0


def cmd_ledger_import(args: argparse.Namespace) -> int:
    from p2ptrain.ledger.store import Ledger

    path = _ledger_path(args)
    with Ledger(path, create=True, run_id=args.run_id) as ledger:
        added, present = ledger.import_jsonl(args.file)
    if args.json:
        print(json.dumps({"ledger": str(path), "file": str(args.file), "added": added, "already_present": present}))
    else:
        console.print(f"imported {added} new records into {path} ({present} already present)", soft_wrap=True)
    return 0


def _add_ledger_parser(sub: argparse._SubParsersAction) -> None:
    ledger = sub.add_parser("ledger", help="show, verify, export and import the contribution ledger")
    commands = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument("--ledger", type=Path, metavar="PATH",
                       help="ledger file (default: ~/.p2ptrain/runs/<run id>/<peer name>/ledger.sqlite)")
        p.add_argument("--identity", type=Path, help="key file naming the peer (default: ~/.p2ptrain/identity.key)")
        p.add_argument("--run-id", help="run whose ledger to use (default: p2ptrain)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)
        return p

    p = add("show", cmd_ledger_show, "list the ledger's records")
    p.add_argument("--peer", metavar="NAME", help="only this peer's records (three-word name or public key prefix)")
    p = add("verify", cmd_ledger_verify, "check signatures, hash chains and claims against receipts (exit 1: problems)")
    p.add_argument("source", nargs="?", type=Path, metavar="FILE", help="a ledger file or JSONL export to check")
    add("fairness", cmd_ledger_fairness, "work per peer, shares of attested work and their Gini coefficient")
    p = add("export", cmd_ledger_export, "write the ledger as JSONL that anyone can verify offline")
    p.add_argument("file", type=Path, metavar="FILE.jsonl")
    p = add("import", cmd_ledger_import, "add the records of a JSONL file to the ledger (all or nothing)")
    p.add_argument("file", type=Path, metavar="FILE.jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2ptrain", description="Train one model together, peer to peer.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("identity", help="show (and create if missing) this peer's key, id and name")
    p.add_argument("--identity", type=Path, help="key file (default: ~/.p2ptrain/identity.key)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("evaluate", help="test a checkpoint: accuracy, per-class precision/recall/F1, confusion matrix")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="a checkpoint directory")
    p.add_argument("--task", help="task to evaluate on (default: the one recorded in the checkpoint)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="where the task's data lives")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("join", help="train with a swarm (or start a new one)", argument_default=argparse.SUPPRESS)
    _add_network_options(p)
    _add_training_options(p)
    p.set_defaults(func=cmd_join, json=False)

    p = sub.add_parser("monitor", help="watch a swarm live in the terminal (trains nothing)",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="address of any peer in the swarm")
    p.add_argument("--run-id", help="the run to watch (default: p2ptrain)")
    p.add_argument("--config", type=Path, metavar="FILE", help="a TOML profile (run_id, initial_peers)")
    p.add_argument("--join-timeout", type=float, metavar="SECONDS", help="keep retrying initial peers (default 20)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    p.add_argument("--wait", type=float, default=6.0, metavar="SECONDS",
                   help="with --once/--json: wait this long for the first heartbeats (default 6)")
    p.add_argument("--prometheus", type=int, metavar="PORT", help="also serve the figures in Prometheus format")
    p.add_argument("--prometheus-host", default="127.0.0.1", help="address for --prometheus (default 127.0.0.1)")
    p.add_argument("--log-format", choices=["rich", "plain"], default="rich", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_monitor, once=False, json=False, prometheus=None)

    p = sub.add_parser("bootstrap", help="run a DHT-only peer with a stable address for others to join through",
                       argument_default=argparse.SUPPRESS)
    _add_network_options(p)
    p.set_defaults(func=cmd_bootstrap)
    _add_ledger_parser(sub)
    _add_allowlist_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        err_console.print(f"[red]error:[/] {e}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # a bug: one line unless --debug
        if args.debug:
            raise
        err_console.print(f"[red]internal error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)",
                          soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
