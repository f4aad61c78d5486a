"""Settings: defaults < TOML profile < command-line flags, strict profile checks, validation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2ptrain import cli
from p2ptrain.config import Settings, load_profile, resolve
from p2ptrain.errors import UserError


def profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    assert resolve(None, {}) == Settings()
    settings = Settings()
    assert settings.task == "digits-mlp" and settings.run_id == "p2ptrain" and settings.min_peers == 1


def test_profile_overrides_defaults_and_flags_override_profile(tmp_path: Path) -> None:
    path = profile(tmp_path, 'run_id = "fashion-run"\nmax_epochs = 10\nlr = 0.5\ninitial_peers = ["/ip4/1.2.3.4"]\n')
    settings = resolve(path, {"max_epochs": 20, "seed": 3})
    assert settings.max_epochs == 20  # flag beats profile
    assert settings.seed == 3  # flag beats default
    assert settings.run_id == "fashion-run" and settings.lr == 0.5  # profile beats default
    assert settings.initial_peers == ["/ip4/1.2.3.4"]
    assert settings.batch_size is None and settings.task == "digits-mlp"  # untouched defaults


def test_flags_not_given_leave_the_profile_alone(tmp_path: Path) -> None:
    """None values and argparse's extra attributes (func, json, debug...) are not settings."""
    path = profile(tmp_path, "max_epochs = 10\n")
    settings = resolve(path, {"max_epochs": None, "json": True, "debug": False, "func": print})
    assert settings.max_epochs == 10


def test_through_the_command_line_parser(tmp_path: Path) -> None:
    """Only the flags actually typed override the profile (join's options default to 'absent')."""
    path = profile(tmp_path, "max-epochs = 10\nlr = 0.5\ndelay-updates = true\nmin-peers = 3\n")
    args = cli.build_parser().parse_args(["join", "--config", str(path), "--max-epochs", "7", "--no-delay-updates"])
    settings = resolve(args.config, vars(args))
    assert settings.max_epochs == 7 and settings.delay_updates is False  # flags
    assert settings.lr == 0.5 and settings.min_peers == 3  # profile


def _captured_settings(monkeypatch: pytest.MonkeyPatch, command: str, argv: list[str]) -> Settings:
    """Run ``p2ptrain <command> ...`` in-process up to the point where it would start the peer."""
    import p2ptrain.peer

    captured: list[Settings] = []

    def fake_run(settings: Settings, **_) -> None:
        captured.append(settings)
        raise UserError("stopped by the test")

    monkeypatch.setattr(p2ptrain.peer, "run_join" if command == "join" else "run_bootstrap", fake_run)
    monkeypatch.setattr(cli, "setup_logging", lambda args: None)
    assert cli.main([command, *argv]) == 2
    assert len(captured) == 1
    return captured[0]


def test_bootstrap_port_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bootstrap's fixed default port is a default: a profile's port wins over it, a flag over both."""
    assert _captured_settings(monkeypatch, "bootstrap", []).port == cli.BOOTSTRAP_PORT
    path = profile(tmp_path, "port = 4000\n")
    assert _captured_settings(monkeypatch, "bootstrap", ["--config", str(path), "--port", "5000"]).port == 5000
    assert _captured_settings(monkeypatch, "bootstrap", ["--config", str(path)]).port == 4000


def test_join_uses_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = profile(tmp_path, 'task = "fashion-mlp"\nport = 4000\nmatchmaking-time = 2\n')
    settings = _captured_settings(monkeypatch, "join", ["--config", str(path), "--matchmaking-time", "3"])
    assert settings.task == "fashion-mlp" and settings.port == 4000 and settings.matchmaking_time == 3.0


def test_dashed_keys_and_coercions(tmp_path: Path) -> None:
    values = load_profile(profile(tmp_path, 'max-epochs = 5\njoin-timeout = 30\ncheckpoint-dir = "~/ck"\n'))
    assert values["max_epochs"] == 5
    assert values["join_timeout"] == 30.0 and isinstance(values["join_timeout"], float)  # an int is a number
    assert values["checkpoint_dir"] == Path.home() / "ck"


def test_unknown_key(tmp_path: Path) -> None:
    path = profile(tmp_path, "max_epoch = 5\n")
    with pytest.raises(UserError, match=r"unknown key 'max_epoch' \(known: .*max_epochs"):
        load_profile(path)


@pytest.mark.parametrize("line, message", [
    ('max_epochs = "ten"', "'max_epochs' must be an integer, got str 'ten'"),
    ("max_epochs = true", "'max_epochs' must be an integer"),  # a bool is not an integer here
    ("max_epochs = 2.5", "'max_epochs' must be an integer"),
    ('lr = "fast"', "'lr' must be a number"),
    ("client_mode = 1", "'client_mode' must be true or false"),
    ('initial_peers = "/ip4/1.2.3.4"', "'initial_peers' must be a list of strings"),
    ("initial_peers = [1, 2]", "'initial_peers' must be a list of strings"),
    ("data_dir = 3", "'data_dir' must be a path"),
    ("task = 3", "'task' must be a string"),
])
def test_wrong_type(tmp_path: Path, line: str, message: str) -> None:
    path = profile(tmp_path, line + "\n")
    with pytest.raises(UserError, match=re.escape(f"profile {path}: {message}")):
        load_profile(path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = profile(tmp_path, "max_epochs = = 5\n")
    with pytest.raises(UserError, match=re.escape(f"profile {path} is not valid TOML")):
        resolve(path, {})


def test_missing_profile(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read profile"):
        resolve(tmp_path / "nope.toml", {})


@pytest.mark.parametrize("flags, message", [
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"max_epochs": -1}, "--max-epochs must be at least 1"),
    ({"min_peers": 0}, "--min-peers must be at least 1"),
    ({"checkpoint_every": 0}, "--checkpoint-every must be at least 1"),
    ({"port": 70000}, "--port must be between 0 and 65535"),
    ({"lr": 0.0}, "--lr must be positive"),
    ({"lr": -1e-3}, "--lr must be positive"),
    ({"join_timeout": 0.0}, "--join-timeout must be positive"),
    ({"run_id": "my run"}, "--run-id may hold only"),
    ({"run_id": ""}, "--run-id may hold only"),
])
def test_validation(flags: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve(None, flags)


def test_validation_applies_to_profiles_too(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        resolve(profile(tmp_path, "batch-size = 0\n"), {})


def test_as_dict_is_json_ready(tmp_path: Path) -> None:
    import json

    settings = resolve(None, {"checkpoint_dir": tmp_path, "initial_peers": ["/ip4/127.0.0.1/tcp/1/p2p/x"]})
    data = json.loads(json.dumps(settings.as_dict()))
    assert data["checkpoint_dir"] == str(tmp_path) and data["initial_peers"] == ["/ip4/127.0.0.1/tcp/1/p2p/x"]
