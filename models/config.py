"""Shape of the keyboard language model (the CIFG-LSTM of BENCHMARK.md).

Pure Python on purpose: devices read the configuration out of a training bundle
without TensorFlow, and the aggregator needs the parameter count to size buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ModelConfig"]


GRAPH_VERSION = 2
"""Bumped whenever the exported training graph changes (signature inputs, ops), so cached
bundles made by older code are not reused."""


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the tied-embedding CIFG language model.

    `batch_size` is the STATIC batch of the exported `train` signature: the
    TFLite training graph only works with a fixed batch (see DESIGN.md), so
    smaller batches are padded with all-PAD rows, which the loss ignores.
    """

    vocab_size: int = 5004
    embed_dim: int = 96
    units: int = 256
    seq_len: int = 20
    batch_size: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"ModelConfig.{f.name} must be a positive int, got {value!r}"
                )
        if self.vocab_size < 5:
            raise ValueError(
                f"ModelConfig.vocab_size must be at least 5 (4 special ids + 1 word), "
                f"got {self.vocab_size}"
            )

    @property
    def param_count(self) -> int:
        """Number of float parameters (781,068 for the defaults).

        embedding V*E; CIFG gates (input i, candidate g, output o; f = 1 - i, no
        peepholes): (E + U) * 3U kernels + 3U bias; projection U*E without bias;
        output bias V (the output matrix is the transposed embedding).
        """
        v, e, u = self.vocab_size, self.embed_dim, self.units
        return v * e + (e + u) * 3 * u + 3 * u + u * e + v

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Strict inverse of `to_dict`: a bundle written by another version must
        not be silently misread, so unknown and missing keys are errors."""
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError(
                    f"unknown ModelConfig key {key!r}; expected exactly {names}"
                )
        for name in names:
            if name not in d:
                raise ValueError(
                    f"missing ModelConfig key {name!r}; expected exactly {names}"
                )
        return cls(**{name: d[name] for name in names})
