"""The Ed25519 validator and publish / fetch against real in-process hivemind DHTs on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from p2ptrain.bookkeeper import Bookkeeper
from p2ptrain.identity import Identity
from p2ptrain.ledger import Ledger, sign
from p2ptrain.ledger.audit import verify
from p2ptrain.ledger.writer import LedgerWriter
from p2ptrain.ledger.dht import Ed25519RecordValidator, fetch, ledger_key, ledger_key_id, publish, subkey_of, sync
from p2ptrain.ledger.simulate import make_peers, run_round

RUN = "dht-run"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Signed records of two peers (X, Y) in two rounds; returns (peers, claims, receipts) of round 0 and 1."""
    peers = make_peers(tmp_path_factory.mktemp("dht"), 2, RUN)
    rounds = [run_round(peers, epoch) for epoch in range(2)]
    return peers, rounds


def dht_record(record, *, key=None, subkey=None, value=None) -> DHTRecord:
    """The record as a validator sees it: hashed key, msgpack'd subkey and value."""
    return DHTRecord(key=key or ledger_key_id(record.run_id, record.epoch),
                     subkey=MSGPackSerializer.dumps(subkey or subkey_of(record)),
                     value=MSGPackSerializer.dumps(value if value is not None else record.to_wire()),
                     expiration_time=get_dht_time() + 60)


# ---- the validator alone (no network) --------------------------------------------------------------------

def test_validator_accepts_a_record_under_its_signers_subkey(records):
    peers, [(claims, receipts, _), _] = records
    validator = Ed25519RecordValidator(RUN)
    assert validator.validate(dht_record(claims[0])) and validator.validate(dht_record(receipts[1]))


def test_validator_refuses_forgeries(records):
    peers, [(claims, receipts, _), (claims1, _, _)] = records
    x, y = peers
    validator = Ed25519RecordValidator(RUN)
    claim_x = claims[0]
    # signed by X, stored under Y's subkey
    assert not validator.validate(dht_record(claim_x, subkey=subkey_of(claims[1])))
    # Y's public key with X's signature, under Y's subkey
    as_y = dataclasses.replace(claim_x, public_key=y.identity.public_key)
    assert not validator.validate(dht_record(as_y, subkey=subkey_of(as_y), value=as_y.to_wire()))
    # altered after signing
    altered = dataclasses.replace(claim_x, samples=claim_x.samples + 1)
    assert not validator.validate(dht_record(altered))
    # a valid record replayed under another epoch's key, or under its signer's subkey for another seq
    assert not validator.validate(dht_record(claim_x, key=ledger_key_id(RUN, 1)))
    assert not validator.validate(dht_record(claim_x, subkey=subkey_of(claims1[0])))
    # not a record at all, under an owner-marked subkey
    for value in (b"{}", b"junk", 5, {"a": 1}):
        assert not validator.validate(dht_record(claim_x, value=value))
    assert not validator.validate(dht_record(claim_x, subkey=f"[ed25519:{'0' * 64}]claim:0 extra"))


def test_validator_refuses_other_content_under_ledger_keys_and_passes_other_keys(records):
    validator = Ed25519RecordValidator(RUN)
    junk = DHTRecord(ledger_key_id(RUN, 5), MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(b"x"), 1e12)
    assert not validator.validate(junk)  # a plain value would evict the epoch's records from a node
    other = DHTRecord(DHTID.generate(source=f"{RUN}_progress").to_bytes(), MSGPackSerializer.dumps("sub"),
                      MSGPackSerializer.dumps(b"x"), 1e12)
    assert validator.validate(other)
    # ledger keys far ahead are learned from valid records
    far = Ed25519RecordValidator()
    far_junk = dataclasses.replace(junk, key=ledger_key_id(RUN, 1))
    assert far.validate(far_junk)
    peers, [(claims, _, _), _] = records
    assert far.validate(dht_record(claims[0]))  # epoch 0 of RUN: now epochs 0..64 are known ledger keys
    assert not far.validate(far_junk)


def test_validators_compose_with_hiveminds_own(records):
    peers, [(claims, _, _), _] = records
    rsa = RSASignatureValidator(RSAPrivateKey())
    composite = CompositeValidator([Ed25519RecordValidator(RUN), SchemaValidator(TrainingProgressSchema, prefix=RUN),
                                    rsa, Ed25519RecordValidator(RUN)])
    assert len(composite._validators) == 3  # the two ledger validators merged
    ledger_entry = dht_record(claims[0])
    signed = dataclasses.replace(ledger_entry, value=composite.sign_value(ledger_entry))
    assert signed.value == ledger_entry.value and composite.validate(signed)
    assert composite.strip_value(signed) == ledger_entry.value
    progress = LocalTrainingProgress(peer_id=b"peer", epoch=1, samples_accumulated=5, samples_per_second=1.0,
                                     time=1.0, client_mode=True)
    record = DHTRecord(DHTID.generate(source=f"{RUN}_progress").to_bytes(),
                       MSGPackSerializer.dumps(rsa.local_public_key), MSGPackSerializer.dumps(progress.dict()),
                       get_dht_time() + 60)
    record = dataclasses.replace(record, value=composite.sign_value(record))
    assert composite.validate(record)


# ---- real DHTs -----------------------------------------------------------------------------------------------

def _local_entries(node, key: str):
    """Runs inside a DHT process: the subkeys this node itself stores under ``key``."""
    stored = node.protocol.storage.get(DHTID.generate(source=key))
    if stored is None:
        return None
    value = stored.value
    return sorted(subkey for subkey, _ in value.items()) if isinstance(value, DictionaryDHTValue) else ["<plain value>"]


async def _local_entries_coroutine(dht, node, key):
    return _local_entries(node, key)


def fetch_until(dht, epochs, count, timeout=60.0):
    """Fetch until ``count`` records are seen (a replica may answer late on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        found = fetch(dht, RUN, epochs)
        if len(found) >= count or time.monotonic() > deadline:
            return found


@pytest.mark.timeout(120)
def test_forged_store_is_refused_by_other_peers_and_good_one_is_fetched(records, tmp_path):
    peers, [(claims, receipts, _), (claims1, receipts1, _)] = records
    x, y = peers
    honest = [None, None]
    attacker = behind_nat = None
    try:
        honest[0] = hivemind.DHT(start=True, host_maddrs=LOCAL, record_validators=[Ed25519RecordValidator(RUN)])
        honest[1] = hivemind.DHT(start=True, host_maddrs=LOCAL, initial_peers=honest[0].get_visible_maddrs(),
                                 record_validators=[Ed25519RecordValidator(RUN)])
        attacker = hivemind.DHT(start=True, host_maddrs=LOCAL, initial_peers=honest[0].get_visible_maddrs())

        # X signs a claim, the attacker stores it under Y's subkey of epoch 0 (and a plain value over epoch 5)
        forged = dataclasses.replace(claims[1], samples=10 * claims[1].samples)
        forged = sign(dataclasses.replace(forged, public_key=x.identity.public_key), x.identity)
        key0, key5 = ledger_key(RUN, 0), ledger_key(RUN, 5)
        attacker.store(key0, forged.to_wire(), get_dht_time() + 600, subkey=subkey_of(claims[1]))
        attacker.store(key5, b"junk", get_dht_time() + 10**6)
        # the attacker's own node (no validator) took both; every honest node refused them
        assert attacker.run_coroutine(partial(_local_entries_coroutine, key=key0)) == [subkey_of(claims[1])]
        assert attacker.run_coroutine(partial(_local_entries_coroutine, key=key5)) == ["<plain value>"]
        for dht in honest:
            assert dht.run_coroutine(partial(_local_entries_coroutine, key=key0)) is None
            assert dht.run_coroutine(partial(_local_entries_coroutine, key=key5)) is None
            assert fetch(dht, RUN, [0, 1, 5]) == []

        # the genuine records: published by one honest peer, fetched and verified by the other
        genuine = [*claims, *receipts, *claims1, *receipts1]
        assert publish(honest[0], genuine) > 0  # hivemind reports the first replica's answer: completeness below
        fetched = fetch_until(honest[1], [0, 1], len(genuine))
        assert sorted(r.hash for r in fetched) == sorted(r.hash for r in genuine)
        assert all(r.verify() for r in fetched)
        empty = Ledger(tmp_path / "late.sqlite", run_id=RUN)
        assert sync(honest[1], empty, RUN, range(2)) == 8 and sync(honest[1], empty, RUN, range(2)) == 0

        # a peer behind NAT (client mode: it serves no DHT requests) publishes its own records all the same
        behind_nat = hivemind.DHT(start=True, client_mode=True, initial_peers=honest[0].get_visible_maddrs(),
                                  record_validators=[Ed25519RecordValidator(RUN)])
        late = run_round(peers, 2)
        assert publish(behind_nat, [*late[0], *late[1]]) > 0
        assert len(fetch_until(honest[1], [2], 4)) == 4 and len(fetch_until(behind_nat, [0, 1, 2], 12)) == 12
    finally:
        for dht in [*honest, attacker, behind_nat]:
            if dht is not None:
                dht.shutdown()


@pytest.mark.timeout(120)
def test_a_relaunched_peer_publishes_what_a_crash_held_back_and_closes_its_open_round(tmp_path):
    """A SIGKILL after signing and before publishing, in the middle of a round: the next run of the peer
    publishes the records again and closes the round with a receipt of one, so every copy verifies clean."""
    identity = Identity.generate(tmp_path / "me.key")
    assignment = {"first_step": 0, "steps": 2, "batch_size": 32}
    with Ledger(tmp_path / "me.sqlite", run_id=RUN) as ledger:  # the first run: it signs, and dies
        writer = LedgerWriter(identity, RUN, ledger)
        writer.claim(0, 64, 0.1, assignment, "a" * 64, "b" * 64, 1.0)
        writer.cosign(0, {identity.public_key: 64}, "c" * 64)
        writer.claim(1, 64, 0.1, assignment, "a" * 64, "b" * 64, 1.0)
    assert verify(Ledger(tmp_path / "me.sqlite", run_id=RUN).records(), run_id=RUN).pending  # the open round
    relaunched = other = None
    try:
        relaunched = hivemind.DHT(start=True, host_maddrs=LOCAL, record_validators=[Ed25519RecordValidator(RUN)])
        other = hivemind.DHT(start=True, host_maddrs=LOCAL, initial_peers=relaunched.get_visible_maddrs(),
                             record_validators=[Ed25519RecordValidator(RUN)])
        with Ledger(tmp_path / "me.sqlite", run_id=RUN) as ledger:
            bookkeeper = Bookkeeper(identity, RUN, ledger, relaunched, batch_size=32)
            found = fetch_until(other, [0, 1], 4)
            assert bookkeeper.finish(2)  # its own copy verifies clean
            assert len(ledger) == 4
        assert sorted(r.kind for r in found) == ["claim", "claim", "receipt", "receipt"]
        fetched = verify(sorted(found, key=lambda r: r.seq), run_id=RUN)  # and so does what another peer fetched
        assert fetched.ok and not fetched.pending
        # a peer that leaves before it closed a round of its own still fetches every epoch up to its own
        with Ledger(tmp_path / "newcomer.sqlite", run_id=RUN) as ledger:
            newcomer = Bookkeeper(Identity.generate(tmp_path / "newcomer.key"), RUN, ledger, other, batch_size=32)
            assert newcomer.finish(2) and len(ledger) == 4
    finally:
        for dht in (relaunched, other):
            if dht is not None:
                dht.shutdown()
