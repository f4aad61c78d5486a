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
