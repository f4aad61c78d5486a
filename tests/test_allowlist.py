"""Closed swarms (``--allowlist``): the signed file, the DHT validator, the averagers, the CLI and a real swarm.

Most tests need no network: validators are fed ``DHTRecord``s directly. Two start real DHT nodes and
averagers in this process; one starts real ``p2ptrain`` processes on 127.0.0.1.
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord

from p2ptrain.allowlist import (
    Allowlist,
    AllowlistValidator,
    Member,
    admit,
    allowlist_key,
    fetch,
    load,
    parse,
    parse_peer,
    publish,
    write,
)
from p2ptrain.errors import UserError
from p2ptrain.identity import Identity

if TYPE_CHECKING:
    from conftest import Swarm

RUN = "closed-run"
LOCAL = "/ip4/127.0.0.1/tcp/0"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Identity]:
    return {name: Identity.generate(tmp_path / f"{name}.key") for name in ("owner", "member", "stranger")}


@pytest.fixture
def allowlist(keys: dict[str, Identity]) -> Allowlist:
    return Allowlist.create(keys["owner"], RUN, [Member(keys["member"].public_key, "member")])


# --- the file ---------------------------------------------------------------------------------------------


def test_round_trip_and_membership(allowlist: Allowlist, keys: dict[str, Identity], tmp_path: Path) -> None:
    write(allowlist, tmp_path / "list.json")
    loaded = load(tmp_path / "list.json", RUN)
    assert loaded == allowlist and loaded.verify()
    assert loaded.allows(keys["owner"].public_key) and loaded.allows(keys["member"].public_key)
    assert not loaded.allows(keys["stranger"].public_key)


@pytest.mark.parametrize("tamper", [
    lambda o: o["peers"].append({"public_key": "ab" * 32, "name": "intruder"}),
    lambda o: o.update(version=o["version"] + 1),
    lambda o: o.update(run_id="another-run"),
    lambda o: o.update(signature="00" * 64),
], ids=["added-peer", "version", "run-id", "signature"])
def test_tampered_file_is_refused(allowlist: Allowlist, tmp_path: Path, tamper) -> None:
    obj = json.loads(allowlist.to_bytes())
    tamper(obj)
    obj["peers"].sort(key=lambda p: p["public_key"])
    (tmp_path / "list.json").write_text(json.dumps(obj))
    with pytest.raises(UserError, match="is invalid"):
        load(tmp_path / "list.json")


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not JSON"), (b'{"format": "p2ptrain-allowlist-v1"}', "expected exactly the fields"),
    (b"", "not JSON"),
])
def test_malformed_file(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "list.json").write_bytes(content)
    with pytest.raises(UserError, match=reason):
        load(tmp_path / "list.json")


def test_wrong_run_and_missing_file(allowlist: Allowlist, tmp_path: Path) -> None:
    write(allowlist, tmp_path / "list.json")
    with pytest.raises(UserError, match=f"is for run '{RUN}', not 'other'"):
        load(tmp_path / "list.json", "other")
    with pytest.raises(UserError, match="cannot read allowlist"):
        load(tmp_path / "missing.json")


def test_updates_only_by_the_owner_and_versions_increase(allowlist: Allowlist, keys: dict[str, Identity]) -> None:
    with pytest.raises(UserError, match="only the owner can change"):
        allowlist.updated(keys["member"], add=[Member(keys["stranger"].public_key, "x")])
    # someone re-signing the owner's list with their own key makes another owner's list, which verifies
    # as such but is no update of this one (validators and fetch() compare owners)
    forged = Allowlist.create(keys["stranger"], RUN, [Member(keys["stranger"].public_key, "x")], version=99)
    assert forged.owner != allowlist.owner
    v2 = allowlist.updated(keys["owner"], add=[Member(keys["stranger"].public_key, "now-in")])
    v3 = v2.updated(keys["owner"], remove=[keys["member"].public_key])
    assert (v2.version, v3.version) == (2, 3) and v2.allows(keys["stranger"].public_key)
    assert not v3.allows(keys["member"].public_key) and parse(v3.to_bytes()) == v3


def test_peers_by_peer_id_or_public_key(keys: dict[str, Identity]) -> None:
    member = keys["member"]
    assert parse_peer(member.peer_id).public_key == member.public_key
    assert parse_peer(f"{member.public_key.hex()}=alice") == Member(member.public_key, "alice")
    assert parse_peer(member.peer_id).name == member.name
    for bad in ("12D3KooWnope", "xyz", "ab" * 31):
        with pytest.raises(UserError, match="neither a peer id"):
            parse_peer(bad)


# --- the DHT validator, fed records directly -------------------------------------------------------------


def _record(key: str, subkey, value, expiration: float = 1e10) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), msgpack.packb(subkey, use_bin_type=True),
                     msgpack.packb(value, use_bin_type=True), expiration)


def _validator(allowlist: Allowlist | None, identity: Identity | None = None) -> AllowlistValidator:
    return AllowlistValidator(RUN, allowlist, identity.private_key.private_bytes_raw() if identity else None)


def _signed(record: DHTRecord, writer: AllowlistValidator) -> DHTRecord:
    return DHTRecord(record.key, record.subkey, writer.sign_value(record), record.expiration_time)


def test_validator_binds_run_records_to_allowlisted_writers(allowlist: Allowlist, keys: dict[str, Identity]) -> None:
    node = _validator(allowlist, keys["owner"])
    member = _validator(allowlist, keys["member"])
    stranger = _validator(Allowlist.create(keys["stranger"], RUN), keys["stranger"])  # signs with its own key
    heartbeat = _record(f"{RUN}_peers", keys["member"].public_key.hex(), {"epoch": 1})
    signed = _signed(heartbeat, member)
    assert node.validate(signed) and node.strip_value(signed) == heartbeat.value
    assert not node.validate(heartbeat)  # unsigned
    assert not node.validate(_signed(_record(f"{RUN}_peers", keys["stranger"].public_key.hex(), {}), stranger))
    # a stranger's signature on a member's subkey, and a member writing another member's subkey
    assert not node.validate(_signed(heartbeat, stranger))
    assert not node.validate(_signed(_record(f"{RUN}_peers", keys["owner"].public_key.hex(), {}), member))
    # the signature covers the value and the expiration
    assert not node.validate(DHTRecord(signed.key, signed.subkey, b"\x01" + signed.value, signed.expiration_time))
    assert not node.validate(DHTRecord(signed.key, signed.subkey, signed.value, signed.expiration_time + 1))
    # averager declarations: subkey = the writer's peer id bytes; progress: any allowlisted writer
    from hivemind.p2p import PeerID
    declare = _record(f"{RUN}_grad_averager.0b", PeerID.from_base58(keys["member"].peer_id).to_bytes(), True)
    assert node.validate(_signed(declare, member)) and not node.validate(declare)
    progress = _record(f"{RUN}_progress", b"[owner:some-rsa-key]", {"epoch": 3})
    assert node.validate(_signed(progress, member)) and not node.validate(_signed(progress, stranger))
    # other runs' keys pass untouched, unsigned
    assert node.validate(_record("another-run_peers", "x", 1))


def test_validator_without_a_list_only_strips(allowlist: Allowlist, keys: dict[str, Identity]) -> None:
    reader = _validator(None)  # a monitor, an open run, a stranger
    record = _record(f"{RUN}_peers", keys["member"].public_key.hex(), {"epoch": 1})
    signed = _signed(record, _validator(allowlist, keys["member"]))
    assert reader.validate(signed) and reader.strip_value(signed) == record.value
    assert reader.sign_value(record) == record.value


def test_validator_adopts_newer_lists_of_the_same_owner_only(allowlist: Allowlist, keys: dict[str, Identity]) -> None:
    node = _validator(allowlist, keys["owner"])
    v2 = allowlist.updated(keys["owner"], add=[Member(keys["stranger"].public_key, "new")])
    forged = Allowlist.create(keys["stranger"], RUN, version=50)
    assert not node.validate(_record(allowlist_key(RUN), forged.version, forged.to_bytes()))
    assert not node.validate(_record(allowlist_key(RUN), 7, v2.to_bytes()))  # subkey must be the version
    assert node.allowlist == allowlist
    assert node.validate(_record(allowlist_key(RUN), v2.version, v2.to_bytes()))
    assert node.allowlist == v2 and node.allows(keys["stranger"].public_key)
    assert node.validate(_record(allowlist_key(RUN), 1, allowlist.to_bytes())) and node.allowlist == v2  # older: kept


class _FakeDHT:
    """Just enough of hivemind.DHT for publish/fetch: one dictionary per key, no network."""

    def __init__(self):
        self.data: dict[str, dict] = {}

    def store(self, key, value, expiration_time, subkey=None, return_future=False):
        from concurrent.futures import Future

        from hivemind.utils import ValueWithExpiration
        self.data.setdefault(key, {})[subkey] = ValueWithExpiration(value, expiration_time)
        future = Future()
        future.set_result(True)
        return future

    def get(self, key, latest=False, return_future=False):
        from concurrent.futures import Future

        from hivemind.utils import ValueWithExpiration
        future = Future()
        future.set_result(ValueWithExpiration(dict(self.data[key]), 0.0) if key in self.data else None)
        return future


def test_keeper_republishes_adopts_and_leaves_when_removed(allowlist: Allowlist, keys: dict[str, Identity]) -> None:
    import threading

    from p2ptrain.allowlist import Keeper

    dht, removed = _FakeDHT(), threading.Event()
    keeper = Keeper(dht, keys["member"], allowlist, on_removed=removed.set, period=0.01)
    keeper.start()
    try:
        deadline = time.monotonic() + 10
        while fetch(dht, RUN) != allowlist and time.monotonic() < deadline:  # republished
            time.sleep(0.01)
        assert fetch(dht, RUN) == allowlist
        v2 = allowlist.updated(keys["owner"], add=[Member(keys["stranger"].public_key, "new")])
        publish(dht, v2)
        publish(dht, Allowlist.create(keys["stranger"], RUN, version=9))  # another key's list: ignored
        while keeper.allowlist != v2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert keeper.allowlist == v2 and not removed.is_set()
        publish(dht, v2.updated(keys["owner"], remove=[keys["member"].public_key]))
        assert removed.wait(10)
    finally:
        keeper.stop()
    # a restart with the old file, after the removal, is refused
    with pytest.raises(UserError, match="was removed from its allowlist in version 3"):
        admit(dht, RUN, keys["member"], allowlist)
    # a peer of an open run (no list in the DHT) is let through
    assert admit(_FakeDHT(), RUN, keys["stranger"], None) is None


# --- real DHT nodes and averagers in this process ---------------------------------------------------------


def _dht(identity: Identity, allowlist: Allowlist | None, initial_peers: list[str] = ()):
    import hivemind

    from p2ptrain.ledger.dht import Ed25519RecordValidator

    return hivemind.DHT(initial_peers=list(initial_peers), start=True, host_maddrs=[LOCAL],
                        identity_path=str(identity.path), check_if_identity_free=False,
                        record_validators=[Ed25519RecordValidator(RUN), _validator(allowlist, identity)])


@pytest.mark.timeout(120)
def test_real_dht_and_averagers_refuse_a_stranger(allowlist: Allowlist, keys: dict[str, Identity],
                                                   tmp_path: Path) -> None:
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager
    from hivemind.p2p import PeerID
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from p2ptrain.allowlist import AllowlistAveragerMixin, AllowlistOptimizerMixin, _dht_allows, closed

    dhts, averagers = [], []
    log = logging.FileHandler(tmp_path / "averagers.log")  # the averagers' processes inherit it
    logging.getLogger("p2ptrain.allowlist").addHandler(log)
    try:
        owner = _dht(keys["owner"], allowlist)
        dhts.append(owner)
        address = [str(a) for a in owner.get_visible_maddrs()]
        member, stranger = _dht(keys["member"], allowlist, address), _dht(keys["stranger"], None, address)
        dhts += [member, stranger]
        assert publish(owner, allowlist)

        # heartbeats: the stranger's store is refused by the swarm, the member's arrives stripped of its signature
        for name, dht in (("member", member), ("stranger", stranger)):
            dht.store(f"{RUN}_peers", subkey=keys[name].public_key.hex(), value={"who": name},
                      expiration_time=get_dht_time() + 60)
        # a node without the list (a monitor) reads members' records, their writer signatures stripped
        seen = stranger.get(f"{RUN}_peers", latest=True)
        assert seen.value[keys["member"].public_key.hex()].value == {"who": "member"}
        stranger.store(f"{RUN}_peers", subkey=keys["member"].public_key.hex(), value={"who": "spoofed"},
                       expiration_time=get_dht_time() + 120)
        seen = owner.get(f"{RUN}_peers", latest=True)
        assert {k: v.value for k, v in seen.value.items()} == {keys["member"].public_key.hex(): {"who": "member"}}

        # the stranger finds the list and is told so
        assert fetch(stranger, RUN) == allowlist
        with pytest.raises(UserError, match=f"run {RUN} is closed: your key {keys['stranger'].peer_id}"):
            admit(stranger, RUN, keys["stranger"], None)

        # averagers: the members share state with each other, never with the stranger
        def averager(dht, cls, value: float):
            made = cls(averaged_tensors=[torch.full((4,), value)], dht=dht, prefix=f"{RUN}_state_averager",
                       min_matchmaking_time=1.0, request_timeout=0.5, start=True)
            averagers.append(made)
            return made

        closed_class = closed(DecentralizedAverager)
        averager(owner, closed_class, 1.0)
        averager(member, closed_class, 2.0)
        outsider = averager(stranger, DecentralizedAverager, 3.0)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # averagers ignore Ctrl-C in their host
        member_averager = averagers[1]
        for _ in range(20):  # declarations for state download are published in the background
            if member_averager.load_state_from_peers(timeout=5) is not None:
                break
        else:
            pytest.fail("the member could not download the owner's state")
        assert outsider.load_state_from_peers(timeout=5) is None  # both members refuse the stranger
        # ... themselves: the classes have the same RPC names, so the stranger did reach them
        log.flush()
        refusal = f"refused averaging with {keys['stranger'].peer_id}: not on the allowlist"
        assert refusal in (tmp_path / "averagers.log").read_text()

        # an update: anyone may carry the owner's new version into the DHT (as `allowlist publish` does with a
        # throwaway key); the members' DHT processes adopt it as it passes their validators
        stranger_id = PeerID.from_base58(keys["stranger"].peer_id).to_bytes()
        assert not member.run_coroutine(partial(_dht_allows, stranger_id))
        v2 = allowlist.updated(keys["owner"], add=[Member(keys["stranger"].public_key, "welcome")])
        assert publish(stranger, v2)
        assert fetch(member, RUN, allowlist.owner) == v2
        assert member.run_coroutine(partial(_dht_allows, stranger_id))

        # the optimizer mixin the trainer uses gives both of hivemind.Optimizer's averagers the checks
        class ClosedOptimizer(AllowlistOptimizerMixin, hivemind.Optimizer):
            pass

        model = torch.nn.Linear(2, 1)
        optimizer = ClosedOptimizer(dht=owner, run_id="unrelated", params=model.parameters(), target_batch_size=4,
                                    optimizer=partial(torch.optim.SGD, lr=0.1), batch_size_per_step=1,
                                    client_mode=False, tracker_opts={"private_key": RSAPrivateKey()})
        averagers += [optimizer.state_averager, optimizer.grad_averager]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert isinstance(optimizer.state_averager, AllowlistAveragerMixin)
        assert isinstance(optimizer.grad_averager, AllowlistAveragerMixin)
        assert type(optimizer.state_averager).__name__ == "TrainingStateAverager"  # same RPC names as hivemind's
        optimizer.tracker.shutdown()
    finally:
        logging.getLogger("p2ptrain.allowlist").removeHandler(log)
        for made in averagers:
            made.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_optimizer_mixin_closes_both_averagers() -> None:
    from hivemind.optim.grad_averager import GradientAverager
    from hivemind.optim.state_averager import TrainingStateAverager

    from p2ptrain.allowlist import AllowlistAveragerMixin, closed

    for base in (GradientAverager, TrainingStateAverager):
        made = closed(base)
        assert issubclass(made, AllowlistAveragerMixin) and issubclass(made, base) and closed(base) is made
        assert closed(made) is made


# --- the CLI ------------------------------------------------------------------------------------------------


def _cli(work_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2ptrain", *args], capture_output=True, text=True, timeout=120,
                          cwd=work_dir, check=False)


def test_cli_create_add_remove_show(work_dir: Path, keys: dict[str, Identity], capsys) -> None:
    from p2ptrain.cli import main

    path, owner = work_dir / "list.json", str(keys["owner"].path)
    assert main(["allowlist", "create", "--identity", owner, "--run-id", RUN, "--add",
                 f"{keys['member'].peer_id}=alice", "-o", str(path)]) == 0
    assert main(["allowlist", "add", str(path), keys["stranger"].public_key.hex(), "--identity", owner]) == 0
    assert main(["allowlist", "remove", str(path), keys["member"].peer_id, "--identity", owner]) == 0
    capsys.readouterr()
    assert main(["allowlist", "show", str(path), "--json", "--run-id", RUN]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 3 and shown["owner_peer_id"] == keys["owner"].peer_id
    assert [p["peer_id"] for p in shown["peers"]] == [keys["owner"].peer_id, keys["stranger"].peer_id]
    # not the owner, an existing file, a peer not on the list: one line each, nothing changed
    assert main(["allowlist", "add", str(path), keys["member"].peer_id, "--identity", str(keys["member"].path)]) == 2
    assert main(["allowlist", "create", "--identity", owner, "-o", str(path)]) == 2
    assert main(["allowlist", "remove", str(path), keys["member"].peer_id, "--identity", owner]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "only the owner" in errors[0] and "already exists" in errors[1]
    assert "is not on" in errors[2] and load(path).version == 3


def test_cli_bad_file_and_stranger_with_the_file(work_dir: Path, keys: dict[str, Identity],
                                                 allowlist: Allowlist) -> None:
    (work_dir / "bad.json").write_text('{"format": "p2ptrain-allowlist-v1", "run_id": 5}')
    result = _cli(work_dir, "allowlist", "show", str(work_dir / "bad.json"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1 and f"allowlist {work_dir / 'bad.json'} is invalid" in result.stderr

    write(allowlist, work_dir / "list.json")  # a stranger holding the file is refused before any network
    result = _cli(work_dir, "join", "--allowlist", str(work_dir / "list.json"), "--run-id", RUN, "--identity",
                  str(keys["stranger"].path), "--host-maddrs", LOCAL, "--log-format", "plain")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "this run is closed: your key" in result.stderr and keys["stranger"].peer_id in result.stderr


# --- a real closed swarm ------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_closed_swarm_trains_and_refuses_a_stranger(swarm: Swarm, cli) -> None:
    directory = swarm.directory
    owner = Identity.generate(directory / "a.key")
    members = [Member(Identity.generate(directory / name).public_key, name) for name in ("b.key", "bootstrap.key")]
    write(Allowlist.create(owner, RUN, members), directory / "list.json")
    closed_flags = ("--run-id", RUN, "--allowlist", str(directory / "list.json"))

    boot = swarm.start("bootstrap", "bootstrap", "--host-maddrs", LOCAL, "--identity", str(directory / "bootstrap.key"),
                       "--log-format", "plain", *closed_flags)
    swarm.address = boot.wait_for(r"p2ptrain join --initial-peers (\S+)", stream="stdout").group(1)
    trainers = [swarm.join(name, "--min-peers", "2", "--max-epochs", "3", *closed_flags, wait_up=False)
                for name in ("a", "b")]
    stranger = swarm.join("stranger", "--run-id", RUN, wait_up=False)

    assert stranger.wait(180) != 0, stranger.describe()
    error = [line for line in stranger.stderr().splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"run {RUN} is closed: your key" in error[0], stranger.describe()
    assert "Traceback" not in stranger.stderr()

    for trainer, code in zip(trainers, swarm.wait_all(trainers, timeout=240)):
        assert code == 0, trainer.describe()
        epochs = trainer.epochs()
        assert epochs and all(e.group_size <= 2 for e in epochs), trainer.describe()
        assert any(e.group_size == 2 for e in epochs), trainer.describe()

    # the owner adds the stranger and hands the new version to the running swarm (the bootstrap is still up)
    newcomer = Identity.load(directory / "stranger.key")
    write(load(directory / "list.json").updated(owner, add=[Member(newcomer.public_key, "newcomer")]),
          directory / "list-v2.json")
    published = cli("allowlist", "publish", str(directory / "list-v2.json"), "--initial-peers", swarm.address)
    assert published.returncode == 0 and "published version 2" in published.stdout, published.stderr
    again = cli("join", "--run-id", RUN, "--identity", str(directory / "stranger.key"), "--host-maddrs", LOCAL,
                "--initial-peers", swarm.address, "--log-format", "plain")
    assert again.returncode != 0 and "is on its allowlist" in again.error_line() and "version 2" in again.stderr
