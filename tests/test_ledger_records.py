"""Ledger records: canonical encoding, signatures, strict parsing of untrusted JSON."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.identity import Identity
from p2ptrain.ledger import records as records_module
from p2ptrain.ledger.records import (DOMAIN, SCHEMA_VERSION, ZERO_HASH, Claim, ReceiptSignature, RecordError,
                                     assemble_receipts, from_json, sign)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return [Identity.generate(d / f"{i}.key") for i in range(3)]


def make_claim(identity, **changes) -> Claim:
    fields = dict(run_id="run-1", public_key=identity.public_key, seq=0, prev_hash=ZERO_HASH, timestamp=1700000000.5,
                  epoch=3, samples=128, compute_seconds=2.25, data_assignment=(("seed", 7), ("steps", 4)),
                  model_digest="a" * 64, grad_digest="b" * 64, mean_loss=0.75, heldout_loss=None)
    fields.update(changes)
    return sign(Claim(**fields), identity)


def make_receipt(identity, members, **changes) -> ReceiptSignature:
    fields = dict(run_id="run-1", public_key=identity.public_key, seq=1, prev_hash="c" * 64, timestamp=1700000001.0,
                  epoch=3, group_id="ab" * 16, members=tuple(sorted(members.items())), result_digest="d" * 64)
    fields.update(changes)
    return sign(ReceiptSignature(**fields), identity)


def test_claim_round_trips_and_verifies(keys):
    claim = make_claim(keys[0])
    assert claim.verify()
    again = from_json(claim.to_json())
    assert again == claim and again.hash == claim.hash and again.verify()
    assert claim.signing_bytes.startswith(DOMAIN)
    assert json.loads(claim.to_json())["version"] == SCHEMA_VERSION


def test_canonical_bytes_do_not_depend_on_key_order_or_int_floats(keys):
    claim = make_claim(keys[0], compute_seconds=2.0)
    obj = json.loads(claim.to_json())
    shuffled = dict(reversed(list(obj.items())))
    shuffled["compute_seconds"] = 2  # another encoder may write 2.0 as 2
    assert from_json(json.dumps(shuffled)).hash == claim.hash
    assert from_json(json.dumps(shuffled)).verify()


def test_any_change_breaks_the_signature(keys):
    claim = make_claim(keys[0])
    for change in (dict(samples=129), dict(epoch=4), dict(run_id="run-2"), dict(grad_digest="c" * 64),
                   dict(data_assignment=(("seed", 8), ("steps", 4))), dict(public_key=keys[1].public_key)):
        assert not dataclasses.replace(claim, **change).verify(), change


def test_signature_of_another_key_does_not_verify(keys):
    claim = make_claim(keys[0])
    forged = dataclasses.replace(claim, signature=keys[1].sign(claim.signing_bytes))
    assert not forged.verify()
    with pytest.raises(ValueError):
        sign(claim, keys[1])


def test_receipt_shared_body_is_the_same_for_every_member(keys):
    members = {k.public_key: 100 * (i + 1) for i, k in enumerate(keys)}
    signatures = [make_receipt(k, members, result_digest=f"{i}" * 64) for i, k in enumerate(keys)]
    assert all(s.verify() for s in signatures)
    assert len({s.receipt_id for s in signatures}) == 1
    assert len({s.hash for s in signatures}) == 3
    [receipt] = assemble_receipts(signatures)
    assert receipt.missing == [] and receipt.weights == members
    [partial] = assemble_receipts(signatures[:2])
    assert partial.missing == [keys[2].public_key]


def test_receipt_signer_must_be_a_member(keys):
    with pytest.raises(RecordError, match="member"):
        make_receipt(keys[0], {keys[1].public_key: 5})


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(version=2), "unknown schema version 2"),
    (lambda o: o.update(version="1"), "unknown schema version '1'"),
    (lambda o: o.pop("version"), "no schema version"),
    (lambda o: o.update(kind="vote"), "unknown record kind"),
    (lambda o: o.update(extra=1), "unknown fields"),
    (lambda o: o.pop("samples"), "missing fields"),
    (lambda o: o.update(samples=1.0), "samples must be an integer"),
    (lambda o: o.update(samples=True), "samples must be an integer"),
    (lambda o: o.update(samples=-1), "samples must be an integer"),
    (lambda o: o.update(epoch=2**64), "epoch must be an integer"),
    (lambda o: o.update(compute_seconds=-0.5), "compute_seconds must be a finite non-negative"),
    (lambda o: o.update(public_key="zz" * 32), "public_key must be 64 lowercase hex digits"),
    (lambda o: o.update(public_key="AB" * 32), "lowercase"),
    (lambda o: o.update(signature="00"), "signature must be 128 lowercase hex digits"),
    (lambda o: o.update(model_digest="a" * 63), "model_digest must be 64 lowercase hex"),
    (lambda o: o.update(run_id="[signature:x]"), "run_id"),
    (lambda o: o.update(data_assignment={"Seed": 1}), "data_assignment names"),
    (lambda o: o.update(data_assignment={"seed": [1]}), "data_assignment\\[seed\\]"),
    (lambda o: o.update(data_assignment=[1]), "data_assignment must be an object"),
    (lambda o: o.update(prev_hash="1" * 64), "prev_hash must be all zeros exactly"),
])
def test_strict_parsing_rejects_bad_fields_with_a_reason(keys, mutate, message):
    obj = json.loads(make_claim(keys[0]).to_json())
    mutate(obj)
    with pytest.raises(RecordError, match=message):
        from_json(json.dumps(obj))


@pytest.mark.parametrize("text", [b"", b"[1, 2]", b"{not json", b"\xff\xfe", b'"claim"', b"null"])
def test_non_records_are_rejected(text):
    with pytest.raises(RecordError):
        from_json(text)


def test_nan_cannot_be_signed(keys):
    with pytest.raises(RecordError, match="mean_loss"):
        make_claim(keys[0], mean_loss=math.nan)


def test_receipt_members_must_be_sorted_and_unique(keys):
    obj = json.loads(make_receipt(keys[0], {k.public_key: 1 for k in keys}).to_json())
    obj["members"] = list(reversed(obj["members"]))
    with pytest.raises(RecordError, match="sorted"):
        from_json(json.dumps(obj))
    obj["members"] = [obj["members"][0], obj["members"][0]]
    with pytest.raises(RecordError, match="sorted"):
        from_json(json.dumps(obj))


def test_libsodium_and_openssl_agree(keys, monkeypatch):
    claim = make_claim(keys[0])
    bad = dataclasses.replace(claim, samples=1)
    fast = (from_json(claim.to_json()).verify(), from_json(bad.to_json()).verify())
    monkeypatch.setattr(records_module, "_fast_verify", None)
    assert (from_json(claim.to_json()).verify(), from_json(bad.to_json()).verify()) == fast == (True, False)


@settings(max_examples=50, deadline=None)
@given(samples=st.integers(0, 2**63 - 1), seconds=st.floats(0, 1e12, allow_nan=False),
       loss=st.none() | st.floats(-1e6, 1e6, allow_nan=False), epoch=st.integers(0, 2**63 - 1),
       seed=st.integers(-2**63 + 1, 2**63 - 1), tag=st.from_regex(r"[A-Za-z0-9_.:/+=-]{0,20}", fullmatch=True))
def test_any_valid_claim_round_trips(keys, samples, seconds, loss, epoch, seed, tag):
    claim = make_claim(keys[0], samples=samples, compute_seconds=seconds, mean_loss=loss, epoch=epoch,
                       data_assignment=(("seed", seed), ("tag", tag)))
    again = from_json(claim.to_wire())
    assert again == claim and again.verify()


def test_both_backends_refuse_a_signers_small_order_tricks(keys, monkeypatch):
    """R = identity with S = k * a passes OpenSSL's check but not libsodium's; we refuse it on both paths."""
    import hashlib

    identity = keys[0]
    claim = make_claim(identity)
    order = 2**252 + 27742317777372353535851937790883648493
    h = hashlib.sha512(identity.private_key.private_bytes_raw()).digest()
    a = (int.from_bytes(h[:32], "little") & ((1 << 254) - 8)) | (1 << 254)
    r = (1).to_bytes(32, "little")
    k = int.from_bytes(hashlib.sha512(r + identity.public_key + claim.signing_bytes).digest(), "little") % order
    trick = dataclasses.replace(claim, signature=r + (k * a % order).to_bytes(32, "little"))
    assert records_module._openssl_verify(trick.signature, trick.signing_bytes, identity.public_key)  # the trap
    assert not from_json(trick.to_json()).verify()
    monkeypatch.setattr(records_module, "_fast_verify", None)
    assert not from_json(trick.to_json()).verify()
    assert from_json(claim.to_json()).verify()


def test_public_names_and_no_network_imports():
    """Everything in __all__ exists, and the ledger core loads without hivemind or torch (only dht.py needs them)."""
    import subprocess
    import sys

    import p2ptrain.ledger as ledger

    assert all(hasattr(ledger, name) for name in ledger.__all__)
    code = "import sys, p2ptrain.ledger; print(sorted({'hivemind', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
