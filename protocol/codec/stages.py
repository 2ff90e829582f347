"""The four kinds of codec stage and the contract each one keeps.

A codec is a fixed-shape composition, like TensorFlow Federated's encoders:

    [transforms] -> layout -> value coder -> [byte coder]

- `Transform` (clip, ef): dense vector -> dense vector, may write a small section;
- `Layout` (dense, topk, randk): picks which coordinates travel and writes how to find them;
- `ValueCoder` (f32, f16, qN, sign): the travelling values -> bytes;
- `ByteCoder` (zstd): the whole payload -> bytes, lossless.

Each stage writes its own section in pipeline order and reads it back in the same order, so
decoding needs nothing but the spec, the payload and the expected vector size. Error
feedback is not a stage method: `Codec` wraps the stages after `ef` (see pipeline.py).
"""
from __future__ import annotations

import abc

import numpy as np

from protocol.codec.container import ByteReader, ByteWriter


class Stage(abc.ABC):
    """Anything with a canonical spec fragment such as `q4:block=128`."""

    #: False when the stage may return something FARTHER from x than 0 is (||C(x) - x|| > ||x||):
    #: behind `ef` such a stage makes the residual grow every round until it overflows.
    ef_safe: bool = True

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class Transform(Stage):
    """Dense -> dense before sparsification (clipping, error feedback)."""

    lossless: bool = False

    @abc.abstractmethod
    def encode(self, vec: np.ndarray, out: ByteWriter) -> np.ndarray:
        """The transformed vector (a new array if changed); writes this stage's section."""

    @abc.abstractmethod
    def read(self, reader: ByteReader) -> None:
        """Read and check this stage's section; the decoded vector needs no inverse step."""

    @abc.abstractmethod
    def max_section_bytes(self) -> int:
        ...


class Layout(Stage):
    """Which coordinates travel: all of them, or a sparse subset."""

    lossless: bool = False

    @abc.abstractmethod
    def count(self, n: int) -> int:
        """How many values travel for a vector of `n` coordinates."""

    @abc.abstractmethod
    def encode(self, vec: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> np.ndarray:
        """The travelling values (in increasing index order); writes the index section."""

    @abc.abstractmethod
    def decode(self, reader: ByteReader, n: int) -> tuple[np.ndarray | None, float]:
        """(sorted unique int64 indices, or None for all; factor to multiply the values by)."""

    @abc.abstractmethod
    def max_section_bytes(self, n: int) -> int:
        ...


class ValueCoder(Stage):
    """A float32 array <-> bytes, lossy or not."""

    lossless: bool = False

    @abc.abstractmethod
    def encode(self, values: np.ndarray, out: ByteWriter, rng: np.random.Generator) -> None:
        ...

    @abc.abstractmethod
    def decode(self, reader: ByteReader, count: int, scale: float = 1.0) -> np.ndarray:
        """`scale` times the `count` decoded values: float32, finite, possibly read-only.

        Folding `scale` in here lets the aggregator's weighted sum cost nothing extra for
        block-scaled coders (it just multiplies the per-block scales).
        """

    @abc.abstractmethod
    def max_section_bytes(self, count: int) -> int:
        ...


class ByteCoder(Stage):
    """Lossless bytes -> bytes on the whole payload; always the last stage."""

    @abc.abstractmethod
    def encode(self, data: bytes) -> bytes:
        ...

    @abc.abstractmethod
    def decode(self, data: bytes, max_len: int) -> bytes:
        """The original bytes; refuse (CodecError) anything that would exceed `max_len`."""


def format_number(value: float) -> str:
    """Shortest text that parses back to `value`: 5 not 5.0, 0.01 not 1e-02."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
