"""Run a TFLite signature without the runtime's unconditional input resize.

ai-edge-litert's `SignatureRunner.__call__` resizes every input to the shape of the value
given, then re-plans the arena, on every call. On aarch64 (ai-edge-litert 2.1.0 .. 2.3.0) a
resize of a 0-d input (a scalar such as the `train` signature's `lr`, `mu`, `clip`) clears
4n - 4 bytes for n = 0 elements: `memset` with a huge length, SIGSEGV at the first training
step of every Raspberry Pi. The x86 build clears 4n bytes and survives, so this is invisible
on a developer machine.

`SignatureCall` calls the same interpreter functions in the same order, but resizes an input
only when its shape really changes (the dynamic batch of `infer`), never a 0-d one, and
re-plans the arena only after a resize. That also spares every training step a needless
arena plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SignatureCall"]


class SignatureCall:
    """One signature of a loaded interpreter, callable as `call(name=array, ...) -> {name: array}`."""

    def __init__(self, interpreter: Any, signature_key: str) -> None:
        signatures = interpreter._get_full_signature_list()  # the runtime's own signature table
        if signature_key not in signatures:
            raise ValueError(f"the model has no signature {signature_key!r} (it has {sorted(signatures)})")
        definition = signatures[signature_key]
        # The native wrapper: the public SignatureRunner uses exactly these calls.
        self._wrapper = interpreter._interpreter
        self.signature_key = signature_key
        self._inputs: dict[str, int] = dict(definition["inputs"])
        self._outputs: list[tuple[str, int]] = list(definition["outputs"].items())
        self._subgraph = self._wrapper.GetSubgraphIndexFromSignature(signature_key)
        self._shapes: dict[str, tuple[int, ...]] = {
            name: tuple(int(d) for d in self._wrapper.TensorSize(index, self._subgraph))
            for name, index in self._inputs.items()
        }
        self._allocated = False

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The current shape of every input tensor (after the last resize)."""
        return dict(self._shapes)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if set(inputs) != set(self._inputs):
            raise ValueError(
                f"signature {self.signature_key!r} takes inputs {sorted(self._inputs)}, got {sorted(inputs)}"
            )
        resized = False
        for name, value in inputs.items():
            shape = tuple(np.shape(value))
            if shape == self._shapes[name]:
                continue
            if not shape or not self._shapes[name]:
                # A scalar input keeps its shape: resizing a 0-d tensor is the aarch64 crash.
                raise ValueError(
                    f"input {name!r} of signature {self.signature_key!r} has shape {self._shapes[name]}, "
                    f"got {shape}"
                )
            self._wrapper.ResizeInputTensor(
                self._inputs[name], np.array(shape, dtype=np.int32), False, self._subgraph
            )
            self._shapes[name] = shape
            resized = True
        if resized or not self._allocated:
            self._wrapper.AllocateTensors(self._subgraph)
            self._allocated = True
        for name, value in inputs.items():
            self._wrapper.SetTensor(self._inputs[name], value, self._subgraph)
        self._wrapper.Invoke(self._subgraph)
        return {name: self._wrapper.GetTensor(index, self._subgraph) for name, index in self._outputs}
