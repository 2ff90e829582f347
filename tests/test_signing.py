"""Model signing: keys, strict manifests, and ModelTrust refusing forged, tampered and replayed models."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import Reason, TrustError
from protocol.signing import (
    MAX_MANIFEST_BYTES,
    ModelManifest,
    ModelTrust,
    SignedManifest,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_key,
    sign,
    sign_manifest,
    verify,
    write_keypair,
)

PAYLOAD = os.urandom(4096)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private_path, public_path = write_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(private_path), load_public_key(public_path)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    private_path, public_path = write_keypair(tmp_path_factory.mktemp("attacker"), "attacker")
    return load_private_key(private_path), load_public_key(public_path)


def manifest(version: int = 5, payload: bytes = PAYLOAD, **changes) -> ModelManifest:
    fields = dict(fleet="pi-lab", model_id="cifg-96-256", version=version,
                  weights_sha256=hashlib.sha256(payload).hexdigest(), codec="float32+zstd",
                  payload_len=len(payload), base_version=None, created_at=1_700_000_000.25,
                  extra={"round": 12, "top3": 0.17, "notes": ["é", None, True]})
    fields.update(changes)
    return ModelManifest(**fields)


def trust(keys, last_version=None, model_id="cifg-96-256") -> ModelTrust:
    return ModelTrust(keys[1], "pi-lab", model_id, last_version=last_version)


# -- keys ---------------------------------------------------------------------------------------
def test_write_keypair_makes_a_private_0600_key_and_refuses_to_overwrite(tmp_path):
    private_path, public_path = write_keypair(tmp_path, "agg")
    assert (private_path.name, public_path.name) == ("agg.key", "agg.pub")
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    first = private_path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_keypair(tmp_path, "agg")
    assert private_path.read_bytes() == first
    write_keypair(tmp_path, "agg", overwrite=True)
    assert private_path.read_bytes() != first
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600


def test_sign_and_verify_raw_bytes(keys):
    signature = sign(keys[0], b"hello")
    assert len(signature) == 64
    verify(keys[1], b"hello", signature)
    with pytest.raises(TrustError) as info:
        verify(keys[1], b"hellO", signature)
    assert info.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(TrustError):
        verify(keys[1], b"hello", signature[:10])


def test_generate_keypair_gives_pem(keys):
    private_pem, public_pem = generate_keypair()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(key_fingerprint(keys[1])) == 16


def test_loading_the_wrong_file_says_what_is_wrong(tmp_path):
    private_path, public_path = write_keypair(tmp_path)
    with pytest.raises(TrustError, match="PRIVATE key"):
        load_public_key(private_path)  # a device given the wrong file
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_private_key(public_path)
    junk = tmp_path / "junk.pub"
    junk.write_bytes(b"not a key")
    with pytest.raises(TrustError, match="not a PEM public key"):
        load_public_key(junk)
    with pytest.raises(FileNotFoundError, match="missing.pub"):
        load_public_key(tmp_path / "missing.pub")


def test_non_ed25519_key_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pub"
    path.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(TrustError, match="not an Ed25519"):
        load_public_key(path)


# -- manifests ----------------------------------------------------------------------------------
def test_canonical_bytes_are_deterministic_sorted_compact_json():
    m = manifest()
    data = m.canonical_bytes()
    obj = json.loads(data)
    assert list(obj) == sorted(obj) and b" " not in data
    assert ModelManifest.from_json(data) == m
    assert ModelManifest.from_json(m.to_json()).canonical_bytes() == data


@pytest.mark.parametrize("mutate, field", [
    (lambda o: o.pop("codec"), "missing ['codec']"),
    (lambda o: o.update(evil=1), "unknown ['evil']"),
    (lambda o: o.update(version="5"), "version"),
    (lambda o: o.update(version=True), "version"),
    (lambda o: o.update(payload_len=-1), "payload_len"),
    (lambda o: o.update(weights_sha256="ABC"), "weights_sha256"),
    (lambda o: o.update(fleet="a/b"), "fleet"),
    (lambda o: o.update(model_id="#"), "model_id"),
    (lambda o: o.update(base_version=5), "base_version"),  # a delta must start from an older version
    (lambda o: o.update(created_at=None), "created_at"),
    (lambda o: o.update(extra=[1]), "extra"),
])
def test_from_json_is_strict(mutate, field):
    obj = json.loads(manifest().to_json())
    mutate(obj)
    with pytest.raises(TrustError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ModelManifest.from_json(json.dumps(obj))


def test_from_json_refuses_duplicates_nan_deep_nesting_and_oversize():
    text = manifest().to_json()
    with pytest.raises(TrustError, match="duplicate"):
        ModelManifest.from_json(text[:-1] + ',"codec":"raw"}')
    with pytest.raises(TrustError):
        ModelManifest.from_json(text.replace('"created_at":1700000000.25', '"created_at":NaN'))
    with pytest.raises(TrustError, match="nested"):
        ModelManifest.from_json(text.replace('"extra":{', '"extra":{"x":' + "[" * 20 + "]" * 20 + ','))
    with pytest.raises(TrustError):
        ModelManifest.from_json("[" * 50_000)
    with pytest.raises(TrustError) as info:
        ModelManifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1))
    assert info.value.reason is Reason.TOO_LARGE


def test_signed_manifest_round_trips_through_bytes(keys):
    signed = sign_manifest(keys[0], manifest())
    again = SignedManifest.from_bytes(signed.to_bytes())
    assert again == signed
    assert again.verify(keys[1]) == manifest()


# -- ModelTrust ---------------------------------------------------------------------------------
def refused(model_trust: ModelTrust, signed, payload: bytes) -> Reason:
    before = model_trust.last_version
    with pytest.raises(TrustError) as info:
        model_trust.accept(signed, payload)
    assert model_trust.last_version == before  # a refusal changes nothing
    return info.value.reason


def test_valid_model_is_accepted_and_becomes_the_last_version(keys, caplog):
    caplog.set_level(logging.INFO, logger="protocol.signing")
    t = trust(keys)
    assert t.accept(sign_manifest(keys[0], manifest(5)), PAYLOAD) == manifest(5)
    assert t.last_version == 5
    assert "accepted model cifg-96-256 v5" in caplog.text


def test_forged_signature_is_refused(keys, other_keys, caplog):
    caplog.set_level(logging.WARNING, logger="protocol.signing")
    forged = sign_manifest(other_keys[0], manifest())
    assert refused(trust(keys), forged, PAYLOAD) is Reason.BAD_SIGNATURE
    assert "refused model" in caplog.text and "bad_signature" in caplog.text


def test_tampered_manifest_is_refused(keys):
    signed = sign_manifest(keys[0], manifest(5))
    bigger = SignedManifest(dataclasses.replace(signed.manifest, version=99), signed.signature)
    assert refused(trust(keys), bigger, PAYLOAD) is Reason.BAD_SIGNATURE
    # the same tampering in the wire bytes
    wire = signed.to_bytes().replace(b'"version":5', b'"version":9')
    assert refused(trust(keys), SignedManifest.from_bytes(wire), PAYLOAD) is Reason.BAD_SIGNATURE


def test_unsigned_manifest_is_refused(keys):
    t = trust(keys)
    assert refused(t, SignedManifest(manifest(), b""), PAYLOAD) is Reason.BAD_SIGNATURE
    assert refused(t, SignedManifest(manifest(), bytes(64)), PAYLOAD) is Reason.BAD_SIGNATURE
    assert refused(t, manifest(), PAYLOAD) is Reason.BAD_SIGNATURE  # a bare manifest
    with pytest.raises(TrustError) as info:
        SignedManifest.from_bytes(manifest().canonical_bytes())  # JSON without signature on the wire
    assert info.value.reason is Reason.BAD_MAGIC


def test_payload_with_a_different_hash_or_length_is_refused(keys):
    signed = sign_manifest(keys[0], manifest())
    tampered = bytearray(PAYLOAD)
    tampered[100] ^= 1
    t = trust(keys)
    assert refused(t, signed, bytes(tampered)) is Reason.BAD_HASH
    assert refused(t, signed, PAYLOAD + b"x") is Reason.BAD_HASH
    assert t.accept(signed, PAYLOAD).version == 5


def test_replayed_older_version_is_refused(keys):
    t = trust(keys, last_version=None)
    t.accept(sign_manifest(keys[0], manifest(7)), PAYLOAD)
    assert refused(t, sign_manifest(keys[0], manifest(3)), PAYLOAD) is Reason.OLD_VERSION
    assert t.accept(sign_manifest(keys[0], manifest(8)), PAYLOAD).version == 8


def test_persisted_last_version_is_honoured_after_a_restart(keys):
    restarted = trust(keys, last_version=10)
    assert refused(restarted, sign_manifest(keys[0], manifest(10)), PAYLOAD) is Reason.OLD_VERSION
    assert restarted.accept(sign_manifest(keys[0], manifest(11)), PAYLOAD).version == 11


def test_other_fleet_or_model_is_refused(keys):
    assert refused(trust(keys), sign_manifest(keys[0], manifest(fleet="other")), PAYLOAD) is Reason.WRONG_MODEL
    assert refused(trust(keys), sign_manifest(keys[0], manifest(model_id="mlp")), PAYLOAD) is Reason.WRONG_MODEL
    any_model = trust(keys, model_id=None)
    assert any_model.accept(sign_manifest(keys[0], manifest(model_id="mlp")), PAYLOAD).model_id == "mlp"


def test_delta_must_apply_to_the_version_the_device_holds(keys):
    t = trust(keys, last_version=4)
    stale = sign_manifest(keys[0], manifest(6, base_version=5))
    assert refused(t, stale, PAYLOAD) is Reason.STALE_BASE
    assert t.accept(sign_manifest(keys[0], manifest(5, base_version=4)), PAYLOAD).base_version == 4


@pytest.mark.parametrize("data, reason", [
    (b"", Reason.BAD_MAGIC),
    (b"FBSM", Reason.TRUNCATED),
    (b"FBSM\x02" + bytes(64) + b"{}", Reason.BAD_VERSION),
    (b"FBSM\x01" + bytes(64) + b"\xff\xfe", Reason.BAD_FIELD),
    (b"FBSM\x01" + bytes(64) + b" " * (MAX_MANIFEST_BYTES + 1), Reason.TOO_LARGE),
])
def test_garbage_wire_bytes_give_a_typed_reason(data, reason):
    with pytest.raises(TrustError) as info:
        SignedManifest.from_bytes(data)
    assert info.value.reason is reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_trust_error(data):
    with pytest.raises(TrustError):
        SignedManifest.from_bytes(data)
    with pytest.raises(TrustError):
        SignedManifest.from_bytes(b"FBSM\x01" + data)


_SIGNED_WIRE: list[bytes] = []


def _wire(keys) -> bytes:
    if not _SIGNED_WIRE:
        _SIGNED_WIRE.append(sign_manifest(keys[0], manifest()).to_bytes())
    return _SIGNED_WIRE[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_signed_bytes_never_verify_and_only_raise_trust_error(keys, data):
    """Flip, insert or delete bytes anywhere in a real signed manifest: never accepted."""
    wire = bytearray(_wire(keys))
    position = data.draw(st.integers(0, len(wire) - 1))
    action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    if action == "flip":
        wire[position] ^= data.draw(st.integers(1, 255))
    elif action == "insert":
        wire[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        del wire[position]
    try:
        signed = SignedManifest.from_bytes(bytes(wire))
    except TrustError:
        return
    if signed.manifest == manifest() and signed.signature == _wire(keys)[5:69]:
        return  # the edit hit insignificant JSON (e.g. whitespace): same signed content, fine
    with pytest.raises(TrustError):
        trust(keys).accept(signed, PAYLOAD)


def test_protocol_signing_imports_only_protocol_errors_and_no_tensorflow():
    code = ("import sys, protocol.signing; "
            "mine = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('models', 'edge_client', 'aggregator', 'device_sim', 'tensorflow', 'keras') "
            "or (m.startswith('protocol.') and m not in ('protocol.signing', 'protocol.errors'))); "
            "assert not mine, mine")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr


def test_same_version_again_is_accepted_only_with_the_same_content():
    """A device that dropped its copy may fetch the same version again; other content is a replay."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    from protocol.signing import ModelManifest, ModelTrust, generate_keypair, sha256_hex, sign_manifest

    priv_pem, pub_pem = generate_keypair()
    priv, pub = load_pem_private_key(priv_pem, None), load_pem_public_key(pub_pem)

    def signed(version, payload):
        return sign_manifest(priv, ModelManifest("demo", "m1", version, sha256_hex(payload), "f32", len(payload)))

    trust = ModelTrust(pub, "demo")
    trust.accept(signed(3, b"abc"), b"abc")
    assert trust.accept(signed(3, b"abc"), b"abc").version == 3
    with pytest.raises(TrustError) as err:
        trust.accept(signed(3, b"xyz"), b"xyz")
    assert err.value.reason is Reason.OLD_VERSION


# -- found by bench/fuzz_campaign.py ---------------------------------------------------------------
def test_created_at_beyond_float_range_is_a_trust_error_not_an_overflow():
    import json as _json

    from protocol.errors import Reason, TrustError
    from protocol.signing import ModelManifest

    doc = {"fleet": "f", "model_id": "m", "version": 1, "weights_sha256": "0" * 64, "codec": "f32",
           "payload_len": 4, "base_version": None, "created_at": 10**400, "extra": {}}
    with pytest.raises(TrustError) as info:
        ModelManifest.from_json(_json.dumps(doc))
    assert info.value.reason is Reason.BAD_FIELD and "created_at" in str(info.value) and len(str(info.value)) < 200
