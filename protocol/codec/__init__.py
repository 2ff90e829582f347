"""The update codec: a short spec string names a pipeline that compresses float32 model updates.

    from protocol.codec import parse_codec
    codec = parse_codec("ef|topk:0.01|q4|zstd")
    result = codec.encode(delta, residual=saved_residual, rng=rng)   # on the device
    saved_residual = result.residual
    codec.decode_accumulate(result.payload, running_sum, weight)     # on the aggregator

Spec grammar
------------
Stages are separated by `|` and applied left to right on encode (right to left on decode).
A stage is `name` or `name:ITEM,ITEM,...`; an ITEM is `key=value`, a flag word, or (first
only) the stage's positional value. Stages must come in this order:

    [clip:C] [ef]            either order, each at most once (dense -> dense)
    [topk:F | randk:F]       at most one sparsifier (which coordinates travel)
    [f32 | f16 | qN | sign]  at most one value coder (default f32)
    [zstd | zstd:LEVEL]      optional, last (lossless, on the bytes)

Stages:
- `f32`            raw float32, lossless.
- `f16`            float16, saturated to +-65504; |err| <= max(2**-11 |x|, 2**-25).
- `q8` `q4` `q2` `q1`, or `q:bits=N` (N in 1, 2, 4, 8): uniform quantization with a float32
                   (min, step) pair per block, step = (max - min) / (2**N - 1). Options:
                   `block=B` (default 256, 1..1048576), `det` (round to nearest, biased;
                   |err| <= step/2). Default: stochastic rounding, unbiased, |err| <= step.
                   Costs N + 64/B bits per value (q8: 8.25, q4: 4.25 at B = 256).
- `sign`           1 bit per value + float32 mean |x| per block (`block=B`, default 256):
                   decodes sign(x) * mean|x| (1.125 bits per value). Biased: use with `ef`.
- `topk:F`         keep the F * n (0 < F < 1, rounded up) or F (integer >= 1) largest |x|;
                   indices as delta varints or a bitmap, the smaller per message.
- `randk:F`        keep F * n or F coordinates chosen from a seed sent in the payload
                   (8 bytes, no indices); flag `unbiased` scales by n / k on decode.
- `clip:C`         scale the vector to L2 norm C when longer; records whether it clipped.
- `ef`             error feedback: encode x + residual through the rest of the pipeline,
                   new residual = (x + residual) - decode(payload); kept on the device.
                   Refused in front of stochastic `q1` and `randk:F,unbiased`, whose error
                   can exceed the update (the residual would grow until it overflows).
                   `clip:C|ef` clips the update; `ef|clip:C` clips update + residual and
                   defers the clipped-off part to later rounds.
- `zstd`, `zstd:L` zstd level L (1..22, default 3) over the whole payload.
Sparsify + quantize quantizes only the kept values. The canonical spec (`Codec.spec`)
spells the value coder out and drops default options: `topk:1e-2|zstd:3` -> `topk:0.01|f32|zstd`.
Examples: `f32`, `q8`, `clip:5|ef|topk:0.02|q4|zstd`, `ef|sign|zstd`, `randk:0.1,unbiased|q8`.

Inputs must be 1-D, finite, with |x| <= 2**100 (~1.3e30). Payloads carry the vector length; decoding
never raises anything but `CodecError` on bad bytes and never returns a wrong-size array.
"""
from protocol.codec.pipeline import Codec, EncodeResult, bits_per_parameter, parse_codec

__all__ = ["Codec", "EncodeResult", "bits_per_parameter", "parse_codec"]
