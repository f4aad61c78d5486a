"""torchrun-style data-parallel training with gloo: the baseline p2ptrain's swarm is compared against.

    # one rank per process, configured by the environment (torchrun, or one rank per network namespace):
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 python scripts/bench/ddp_train.py [options]
    torchrun --nproc-per-node 2 scripts/bench/ddp_train.py [options]
    # or let the script start N local ranks on 127.0.0.1 itself:
    python scripts/bench/ddp_train.py --nproc 2 [--task fashion-mlp] [--target 0.88] [--time-limit 300]

Trains the task's model as a swarm does, only with a central all-reduce: each rank computes micro-batches
of the task's batch size (each rank walks its own deterministic permutation, like a swarm peer),
accumulates gradients until the ranks together hold ``--global-batch`` samples, all-reduces them once
(gloo, a mean) and takes one step of the task's optimizer at the task's learning rate. Default global
batch: the task's batch size x world size when the task trains with local updates (a swarm peer then
steps on every batch), else the task's swarm-wide target batch size (one step per global epoch). The ranks
test on the full test set (each half of it; evaluation time is left off the training clock) every
``--eval-every`` steps, by default whenever the task's target batch size of samples has passed (the
cadence at which swarm peers check ``--stop-at-accuracy``), and stop together once accuracy reaches
``--target`` or the clock passes ``--time-limit``.

Rank 0 prints ONE JSON object on stdout: time_to_target (training seconds, evaluation excluded; null if
not reached), utilisation (forward/backward seconds / training wall seconds), final_accuracy, samples
(all ranks), steps (optimizer steps), bytes_per_step (gradient bytes all-reduced per step), wall_seconds
(training seconds, evaluation excluded), eval_seconds, world_size, global_batch, lr, task, target,
reached. Other ranks print nothing on stdout. Exit 0 also when the target is not reached.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from p2ptrain.errors import UserError
from p2ptrain.tasks import Task, load_task

RUN_ID = "ddp"  # seeds each rank's batch permutation, as a run id does for swarm peers


@dataclass
class Clock:
    """Training time: wall seconds since start minus time spent evaluating."""

    started: float = 0.0
    eval_seconds: float = 0.0
    compute_seconds: float = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="fashion-mlp", help="p2ptrain task (default: fashion-mlp)")
    p.add_argument("--data-dir", default=None, help="the task's data (default: the task's)")
    p.add_argument("--target", type=float, default=0.88, help="stop at this test accuracy (default: 0.88)")
    p.add_argument("--time-limit", type=float, default=600.0, help="stop after this many training seconds (600)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--global-batch", type=int, default=None,
                   help="samples per optimizer step, all ranks together (default: see above)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per forward/backward (task's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="optimizer steps between evaluations (default: every target batch size of samples)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1)")
    p.add_argument("--seed", type=int, default=0, help="initial weights (0, as p2ptrain)")
    p.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo)")
    p.add_argument("--nproc", type=int, default=None,
                   help="start this many local ranks on 127.0.0.1 instead of reading RANK/WORLD_SIZE")
    return p.parse_args(argv)


# --- launching local ranks ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], nproc: int) -> int:
    """Run ``nproc`` ranks of this script on 127.0.0.1; pass rank 0's stdout through."""
    rest = _without_nproc(argv)
    env = dict(os.environ, WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, __file__, *rest], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL)
             for r in range(nproc)]
    try:
        out, _ = procs[0].communicate()
        codes = [procs[0].returncode] + [p.wait() for p in procs[1:]]
    finally:
        for p in procs:  # one rank failed: the others would wait for it in the next collective
            if p.poll() is None:
                p.kill()
                p.wait()
    sys.stdout.write(out.decode())
    return next((c for c in codes if c), 0)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


# --- one rank ----------------------------------------------------------------------------------

def evaluate(model: torch.nn.Module, task: Task, rank: int, world: int, clock: Clock) -> float:
    """Full test-set accuracy; each rank tests its share and the counts are summed. Off the clock."""
    begin = time.perf_counter()
    inputs, labels = task.test
    share = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    with torch.no_grad():
        correct = (model(task.prepare(inputs[share])).argmax(1) == labels[share]).sum().double()
    dist.all_reduce(correct)
    clock.eval_seconds += time.perf_counter() - begin
    return float(correct) / len(labels)


def train_rank(args: argparse.Namespace) -> dict:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    task = load_task(args.task, args.data_dir)
    micro = args.batch_size or task.batch_size
    local = getattr(task, "local_updates", False)
    global_batch = args.global_batch or (micro * world if local else task.target_batch_size)
    lr = args.lr or task.lr
    dist.init_process_group(args.backend, rank=rank, world_size=world)  # env:// (MASTER_ADDR, MASTER_PORT)
    torch.manual_seed(args.seed)  # the same initial weights on every rank, as every swarm peer
    model = task.make_model()
    opt = task.make_optimizer(model.parameters(), lr)
    params = [p for p in model.parameters() if p.requires_grad]
    per_rank = max(1, global_batch // world)
    clock, local_step, step, samples, evaluated_at = Clock(), 0, 0, 0, 0
    accuracy, reached_at = None, None
    dist.barrier()
    clock.start()
    while True:
        taken = 0
        while taken < per_rank:  # accumulate this rank's share of the global batch
            n = min(micro, per_rank - taken)
            inputs, labels = task.batch(RUN_ID, f"rank{rank}", local_step, n)
            begin = time.perf_counter()
            (task.loss(model(inputs), labels) * (len(labels) / per_rank)).backward()
            clock.compute_seconds += time.perf_counter() - begin
            taken += len(labels)
            local_step += 1
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one all-reduce per step, as DDP's buckets
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        opt.step()
        opt.zero_grad()
        step += 1
        samples += taken * world
        stop_for_time = _agree(clock.training_seconds() >= args.time_limit)
        due = step % args.eval_every == 0 if args.eval_every else samples - evaluated_at >= task.target_batch_size
        if due or stop_for_time or step == args.max_steps:
            accuracy, evaluated_at = evaluate(model, task, rank, world, clock), samples
            if accuracy >= args.target and reached_at is None:
                reached_at = clock.training_seconds()
        if reached_at is not None or stop_for_time or (args.max_steps and step >= args.max_steps):
            break
    wall = clock.training_seconds()
    dist.barrier()  # leave together: a rank tearing down gloo while another still talks aborts the latter
    dist.destroy_process_group()
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"task": task.name, "world_size": world, "target": args.target, "reached": reached_at is not None,
            "time_to_target": reached_at, "utilisation": clock.compute_seconds / wall if wall else None,
            "final_accuracy": accuracy, "samples": samples, "steps": step, "bytes_per_step": grad_bytes,
            "wall_seconds": wall, "eval_seconds": clock.eval_seconds, "compute_seconds": clock.compute_seconds,
            "global_batch": per_rank * world, "batch_size": micro, "lr": lr, "threads": args.threads,
            "backend": args.backend}


def _agree(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must leave the loop at the same step."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.nproc:
        return launch_local(argv, args.nproc)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("error: set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (or run under torchrun, or pass --nproc N)",
              file=sys.stderr)
        return 2
    try:
        result = train_rank(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
