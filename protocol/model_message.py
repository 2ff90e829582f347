"""The global-model message: a signed manifest and the weights payload in ONE envelope.

One retained message rather than two, so a device can never pair the manifest of version
n with the weights of version n-1. The manifest (see protocol.signing) names the weights
payload's sha256; the device verifies signature and hash before decoding anything.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.envelope import Envelope, Kind
from protocol.errors import EnvelopeError, Reason

_LEN = struct.Struct("<I")
MAX_MANIFEST_BYTES = 64 * 1024
# The codec name an inference model's manifest carries (kind INFERENCE_MODEL, payload: TFLite bytes);
# a device serves such a message only under this name, so a training model is never taken for one.
INFERENCE_CODEC = "tflite-int8"


@dataclass(frozen=True)
class ModelMessage:
    """Version, downlink codec, signed manifest bytes and encoded weights."""

    fleet: str
    version: int
    codec: str
    signed_manifest: bytes
    weights_payload: bytes
    base_version: int = 0  # for a delta: the version it applies to

    def to_envelope(self, kind: Kind = Kind.MODEL) -> Envelope:
        if len(self.signed_manifest) > MAX_MANIFEST_BYTES:
            raise EnvelopeError(Reason.TOO_LARGE, "signed manifest exceeds 64 KB")
        payload = _LEN.pack(len(self.signed_manifest)) + self.signed_manifest + self.weights_payload
        return Envelope(kind, self.fleet, round=self.base_version, base_version=self.version,
                        codec=self.codec, payload=payload)

    @staticmethod
    def from_envelope(env: Envelope) -> "ModelMessage":
        if env.kind not in (Kind.MODEL, Kind.INFERENCE_MODEL):
            raise EnvelopeError(Reason.BAD_KIND, f"expected a model message, got {env.kind.name}")
        data = env.payload
        if len(data) < _LEN.size:
            raise EnvelopeError(Reason.TRUNCATED, "model message shorter than its manifest length")
        (n,) = _LEN.unpack_from(data, 0)
        if n > MAX_MANIFEST_BYTES or _LEN.size + n > len(data):
            raise EnvelopeError(Reason.TRUNCATED, f"manifest length {n} does not fit the {len(data)}-byte payload")
        return ModelMessage(env.fleet, env.base_version, env.codec, data[_LEN.size:_LEN.size + n],
                            data[_LEN.size + n:], base_version=env.round)
