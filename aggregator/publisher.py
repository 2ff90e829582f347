"""Global-model publishing: encode for the downlink, sign, and make it exactly reproducible.

The weights the aggregator keeps are the weights a device will decode:
- full model only: after a lossy downlink codec (f16, q8) the aggregator adopts the decoded
  vector itself, so server and fleet never drift apart;
- with the delta downlink: the new global model is DEFINED as
  ``W_v = W_{v-1} + decode(encode(W_proposed - W_{v-1}))`` (float32 addition, the same
  operation on both sides), and the full message carries W_v losslessly. A device holding
  W_{v-1} rebuilds W_v bit for bit from the small delta; any other device takes the full
  model and gets the same bits.
Every manifest carries the sha256 of the float32 weights a device must end up with
(`extra.weights_f32_sha256`); a delta's manifest also names the base it applies to
(`base_version`, `extra.base_f32_sha256`), so a device can check before and after.
"""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass

import numpy as np

from models.bundle import Bundle
from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind
from protocol.model_message import INFERENCE_CODEC, ModelMessage
from protocol.signing import ModelManifest, sign_manifest

INT8_CODEC = INFERENCE_CODEC


@dataclass(frozen=True)
class PublishedModel:
    version: int
    weights: np.ndarray        # exactly what devices reconstruct
    envelope_bytes: bytes      # the retained message
    payload_bytes: int


@dataclass(frozen=True)
class Release:
    """One new global version: the full message, and the delta message when it is on."""

    full: PublishedModel
    delta: PublishedModel | None = None

    @property
    def weights(self) -> np.ndarray:
        return self.full.weights


def weights_digest(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).hexdigest()


def _signed_envelope(*, fleet: str, model_id: str, version: int, codec: str, payload: bytes, private_key: object,
                     extra: dict, base_version: int | None = None, kind: Kind = Kind.MODEL) -> bytes:
    manifest = ModelManifest(
        fleet=fleet, model_id=model_id, version=version, weights_sha256=hashlib.sha256(payload).hexdigest(),
        codec=codec, payload_len=len(payload), base_version=base_version, created_at=time.time(), extra=extra,
    )
    signed = sign_manifest(private_key, manifest)
    message = ModelMessage(fleet, version, codec, signed.to_bytes(), payload, base_version=base_version or 0)
    return message.to_envelope(kind).encode()


def build_model_message(
    *, fleet: str, model_id: str, version: int, weights: np.ndarray, codec_spec: str, private_key: object,
    extra: dict | None = None,
) -> PublishedModel:
    """Encode `weights` with the downlink codec, sign the manifest, wrap it in an envelope."""
    codec = parse_codec(codec_spec)
    payload = codec.encode(np.ascontiguousarray(weights, dtype=np.float32),
                           rng=np.random.default_rng(version)).payload
    exact = codec.decode(payload, weights.size)
    data = _signed_envelope(fleet=fleet, model_id=model_id, version=version, codec=codec.spec, payload=payload,
                            private_key=private_key, extra={"weights_f32_sha256": weights_digest(exact), **(extra or {})})
    return PublishedModel(version, exact, data, len(payload))


def apply_delta(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """W_{v-1} + decoded delta in float32: the one definition both sides use."""
    return np.add(np.asarray(base, dtype=np.float32), np.asarray(delta, dtype=np.float32), dtype=np.float32)


def build_release(
    *, fleet: str, model_id: str, version: int, proposed: np.ndarray, previous: PublishedModel | None,
    full_codec: str, delta_codec: str, private_key: object, extra: dict | None = None,
) -> Release:
    """The messages of global version `version` from the optimizer's `proposed` weights.

    Without a delta codec (or without a previous version) this is `build_model_message`.
    With one, the delta against `previous` is encoded first and the new weights are what it
    decodes to on top of `previous.weights`; the full message must then be lossless.
    """
    extra = dict(extra or {})
    if not delta_codec or previous is None:
        return Release(build_model_message(fleet=fleet, model_id=model_id, version=version, weights=proposed,
                                           codec_spec=full_codec, private_key=private_key, extra=extra))
    full = parse_codec(full_codec)
    if not full.is_lossless:
        raise ValueError(f"a delta downlink needs a lossless full-model codec, not {full.spec!r}")
    codec = parse_codec(delta_codec)
    base = previous.weights
    change = np.subtract(np.asarray(proposed, dtype=np.float32), base, dtype=np.float32)
    payload = codec.encode(change, rng=np.random.default_rng(version)).payload
    weights = apply_delta(base, codec.decode(payload, base.size))
    digest = weights_digest(weights)
    delta_bytes = _signed_envelope(
        fleet=fleet, model_id=model_id, version=version, codec=codec.spec, payload=payload, private_key=private_key,
        base_version=previous.version, extra={"weights_f32_sha256": digest, "base_f32_sha256": weights_digest(base),
                                              **extra})
    full_message = build_model_message(fleet=fleet, model_id=model_id, version=version, weights=weights,
                                       codec_spec=full.spec, private_key=private_key, extra=extra)
    assert np.array_equal(full_message.weights, weights), "lossless codec changed the weights"
    return Release(full_message, PublishedModel(version, weights, delta_bytes, len(payload)))


def build_inference_message(*, fleet: str, model_id: str, version: int, tflite: bytes, weights: np.ndarray,
                            private_key: object, extra: dict | None = None) -> bytes:
    """The int8 inference model of global version `version`, signed like a model (kind INFERENCE_MODEL)."""
    return _signed_envelope(fleet=fleet, model_id=model_id, version=version, codec=INT8_CODEC, payload=tflite,
                            private_key=private_key, kind=Kind.INFERENCE_MODEL,
                            extra={"weights_f32_sha256": weights_digest(weights), **(extra or {})})


@functools.lru_cache(maxsize=4)
def bundle_file_bytes(bundle: Bundle) -> bytes:
    """The bundle's zip bytes, made once: what is retained and what the signed model names."""
    return bundle.to_bytes()


def bundle_extra(bundle: Bundle) -> dict:
    """What a signed model says about its training bundle: its identity, and the sha256 and size
    of its BYTES, which a device checks before it opens the zip (no inflating what nobody signed)."""
    data = bundle_file_bytes(bundle)
    return {"bundle_sha256": bundle.sha256, "bundle_file_sha256": hashlib.sha256(data).hexdigest(),
            "bundle_file_bytes": len(data)}


def bundle_envelope(fleet: str, bundle_bytes: bytes, model_id: str) -> bytes:
    """The training bundle as a retained message, for devices that do not have it yet."""
    return Envelope(Kind.BUNDLE, fleet, codec="bundle", meta={"model_id": model_id}, payload=bundle_bytes).encode()
