"""Global-model publishing: encode for the downlink, sign, and make it exactly reproducible.

The weights the aggregator keeps are the weights a device will decode: after a lossy
downlink codec (f16, q8) the aggregator adopts the decoded vector itself, so server and fleet
never drift apart, and the manifest carries the sha256 of those float32 bytes.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from protocol.codec import parse_codec
from protocol.envelope import Envelope, Kind
from protocol.model_message import ModelMessage
from protocol.signing import ModelManifest, sign_manifest


@dataclass(frozen=True)
class PublishedModel:
    version: int
    weights: np.ndarray        # exactly what devices reconstruct
    envelope_bytes: bytes      # the retained message
    payload_bytes: int


def weights_digest(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).hexdigest()


def build_model_message(
    *, fleet: str, model_id: str, version: int, weights: np.ndarray, codec_spec: str, private_key: object,
    extra: dict | None = None,
) -> PublishedModel:
    """Encode `weights` with the downlink codec, sign the manifest, wrap it in an envelope."""
    codec = parse_codec(codec_spec)
    payload = codec.encode(np.ascontiguousarray(weights, dtype=np.float32),
                           rng=np.random.default_rng(version)).payload
    exact = codec.decode(payload, weights.size)
    manifest = ModelManifest(
        fleet=fleet, model_id=model_id, version=version,
        weights_sha256=hashlib.sha256(payload).hexdigest(), codec=codec.spec, payload_len=len(payload),
        base_version=None, created_at=time.time(),
        extra={"weights_f32_sha256": weights_digest(exact), **(extra or {})},
    )
    signed = sign_manifest(private_key, manifest)
    message = ModelMessage(fleet, version, codec.spec, signed.to_bytes(), payload)
    data = message.to_envelope(Kind.MODEL).encode()
    return PublishedModel(version, exact, data, len(payload))


def bundle_envelope(fleet: str, bundle_bytes: bytes, model_id: str) -> bytes:
    """The training bundle as a retained message, for devices that do not have it yet."""
    return Envelope(Kind.BUNDLE, fleet, codec="bundle", meta={"model_id": model_id}, payload=bundle_bytes).encode()
