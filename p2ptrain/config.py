"""Settings: one typed dataclass, filled from defaults < a TOML profile (``peers/*.toml``) < CLI flags."""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain.errors import UserError


@dataclass
class Settings:
    """Everything a peer needs to know. ``None`` means "the task's default" for training fields."""

    # --- network
    run_id: str = "p2ptrain"  # peers with the same run id train the same model together
    identity: Path | None = None  # default: <home>/identity.key
    initial_peers: list[str] = field(default_factory=list)
    port: int = 0  # 0: any free port
    host_maddrs: list[str] = field(default_factory=list)  # overrides --port
    announce_maddrs: list[str] = field(default_factory=list)
    client_mode: bool = False  # behind NAT: dial out only, never accept connections
    auxiliary: bool = False  # help with averaging, compute no gradients
    join_timeout: float = 60.0  # seconds to keep retrying unreachable initial peers
    min_peers: int = 1  # wait until this many training peers are in the swarm before the first step
    allowlist: Path | None = None  # a closed run: the owner-signed list of keys allowed in it (allowlist.py)

    # --- training
    task: str = "digits-mlp"
    data_dir: Path | None = None
    batch_size: int | None = None
    target_batch_size: int | None = None  # samples the whole swarm accumulates per global epoch
    max_epochs: int | None = None  # stop at this global epoch
    lr: float | None = None
    seed: int = 0
    checkpoint_dir: Path | None = None  # default: <run dir>/checkpoint
    checkpoint_every: int = 10  # global epochs between checkpoints (one is always written on exit)
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    ledger: Path | None = None  # default: <run dir>/ledger.sqlite
    delay_updates: bool | None = None  # overlap averaging with the next epoch's compute (default: the task's)
    local_updates: bool | None = None  # step locally every batch, average pseudo-gradients per epoch (default: the task's)
    compression: str = "none"  # what averaging sends: none (float32), fp16, 8bit
    aggregation: str = "mean"  # how a round combines peers' parts: mean, or centered-clip against Byzantine peers
    stop_at_accuracy: float | None = None  # leave once the full test set's accuracy reaches this (benchmarks)
    matchmaking_time: float = 1.0  # seconds to gather an averaging group
    averaging_timeout: float = 5.0  # give up on a round after this long: a peer that misses one moves on
    torch_threads: int = 1  # one thread per peer keeps several peers on one machine from fighting

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, Path) else v) for f in dataclasses.fields(self)
                for v in [getattr(self, f.name)]}


COMPRESSIONS = ("none", "fp16", "8bit")
AGGREGATIONS = ("mean", "centered-clip")
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _check_type(name: str, value: Any, source: str) -> Any:
    """Coerce ``value`` to the declared type of field ``name`` or raise a one-line UserError."""
    hint = typing.get_type_hints(Settings)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    target = args[0]
    origin = typing.get_origin(target)
    ok = False
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        expected = "a list of strings"
    elif target is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif target is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif target is float:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif target is Path:
        ok, expected = isinstance(value, str), "a path (string)"
        value = Path(value).expanduser() if ok else value
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise UserError(f"{source}: '{name}' must be {expected}, got {type(value).__name__} {value!r}")
    return value


def load_profile(path: Path) -> dict[str, Any]:
    """Read a TOML profile into checked ``{field: value}``; unknown or ill-typed keys are errors."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read profile {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"profile {path} is not valid TOML: {e}") from e
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"profile {path}: unknown key '{key}' (known: {', '.join(sorted(FIELDS))})")
        values[name] = _check_type(name, value, f"profile {path}")
    return values


def resolve(profile: Path | None, flags: dict[str, Any]) -> Settings:
    """Defaults < profile file < flags. ``flags`` holds only the options given on the command line."""
    values = load_profile(profile) if profile else {}
    values.update({k: v for k, v in flags.items() if v is not None and k in FIELDS})
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    for name in ("batch_size", "target_batch_size", "max_epochs", "checkpoint_every", "torch_threads", "min_peers"):
        value = getattr(s, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= s.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {s.port}")
    if s.lr is not None and not s.lr > 0:
        raise UserError(f"--lr must be positive, got {s.lr}")
    if s.join_timeout <= 0:
        raise UserError(f"--join-timeout must be positive, got {s.join_timeout}")
    for name, choices in (("compression", COMPRESSIONS), ("aggregation", AGGREGATIONS)):
        if getattr(s, name) not in choices:
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got {getattr(s, name)!r}")
    if s.local_updates and s.delay_updates:
        raise UserError("--local-updates and --delay-updates cannot be combined: a delayed outer step would "
                        "overwrite the local steps taken meanwhile")
    if s.stop_at_accuracy is not None and not 0 < s.stop_at_accuracy <= 1:
        raise UserError(f"--stop-at-accuracy must be in (0, 1], got {s.stop_at_accuracy}")
    if not s.run_id or not s.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--run-id may hold only letters, digits, '-', '_' and '.', got {s.run_id!r}")
