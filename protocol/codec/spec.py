"""Parse a codec spec string such as `clip:5|ef|topk:0.02|q4|zstd` into stage objects.

Grammar (also in the package docstring): stages separated by `|`; each stage is `name` or
`name:item,item,...` where an item is `key=value`, a bare flag (`det`, `unbiased`) or, first,
the stage's one positional value (`topk:0.01` = `topk:k=0.01`). Spaces around `|`, `:`, `,`
and `=` are ignored; names are case-insensitive. Every error names the part of the spec that
is wrong and says what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocol.codec.floats import Float16Coder, Float32Coder
from protocol.codec.quantize import DEFAULT_BLOCK, UniformQuantizer
from protocol.codec.sign import SignCoder
from protocol.codec.sparsify import RandK, TopK
from protocol.codec.stages import ByteCoder, Layout, Stage, Transform, ValueCoder
from protocol.codec.transforms import ClipStage, ErrorFeedback
from protocol.codec.zstd_stage import DEFAULT_LEVEL, MAX_LEVEL, MIN_LEVEL, ZstdStage
from protocol.errors import CodecError, Reason

MAX_SPEC_LENGTH = 256
MAX_BLOCK = 1 << 20
ORDER_HELP = ("stages go in this order: [clip:C] [ef] (either order, each at most once), then at most one "
              "sparsifier [topk:F | randk:F], then at most one value coder [f32 | f16 | q1 | q2 | q4 | q8 | "
              "q:bits=N | sign] (default f32), then optionally [zstd | zstd:LEVEL] last")
STAGE_HELP = ("known stages: f32, f16, q1, q2, q4, q8, q:bits=N (N in 1,2,4,8; options block=B, det), "
              "sign (option block=B), topk:F, randk:F (flag unbiased), clip:C, ef, zstd, zstd:LEVEL")


def spec_error(spec: str, part: str, problem: str) -> CodecError:
    where = f"codec spec {spec!r}" + (f", stage {part!r}" if part != spec.strip() else "")
    return CodecError(Reason.BAD_CODEC, f"{where}: {problem}")


def _looks_like_value(item: str) -> bool:
    return not item.isalpha() or item in ("nan", "inf", "infinity")


@dataclass
class StageText:
    """One `|`-separated part of a spec, split into name, positional value, options and flags."""

    spec: str
    text: str
    name: str
    positional: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)

    def error(self, problem: str) -> CodecError:
        return spec_error(self.spec, self.text, problem)

    def accept(self, *, positional: str | None = None, keys: tuple[str, ...] = (),
               flags: tuple[str, ...] = ()) -> None:
        """Check the items against what the stage takes; fold the positional value into options."""
        if self.positional is not None:
            if positional is None:
                raise self.error(f"'{self.name}' takes no value{self._takes(keys, flags)}")
            if positional in self.options:
                raise self.error(f"{positional} given twice")
            self.options[positional] = self.positional
        allowed = set(keys) | ({positional} if positional else set())
        for key in self.options:
            if key not in allowed:
                raise self.error(f"unknown option {key!r}{self._takes(tuple(sorted(allowed)), flags)}")
        for flag in self.flags:
            if flag not in flags:
                raise self.error(f"unknown flag {flag!r}{self._takes(tuple(sorted(allowed)), flags)}")

    def _takes(self, keys: tuple[str, ...], flags: tuple[str, ...]) -> str:
        parts = [f"{k}=..." for k in keys] + list(flags)
        return f"; '{self.name}' accepts: {', '.join(parts)}" if parts else f"; '{self.name}' takes no options"

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        raw = self.options.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self.error(f"{key} must be an integer from {low} to {high}, got {raw!r}") from None
        if not low <= value <= high:
            raise self.error(f"{key} must be an integer from {low} to {high}, got {value}")
        return value

    def number(self, key: str, what: str) -> float:
        raw = self.options.get(key)
        if raw is None:
            raise self.error(f"missing {what}")
        try:
            value = float(raw)
        except ValueError:
            raise self.error(f"{what} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise self.error(f"{what} must be finite, got {raw!r}")
        return value


def split_stage(spec: str, text: str) -> StageText:
    name, colon, rest = text.partition(":")
    name = name.strip().lower()
    stage = StageText(spec, text.strip(), name)
    if not name:
        raise spec_error(spec, text.strip(), f"empty stage name; {STAGE_HELP}")
    if colon and not rest.strip():
        raise stage.error("nothing after ':'")
    if not colon:
        return stage
    for position, item in enumerate(rest.split(",")):
        item = item.strip().lower()
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not item:
            raise stage.error("empty item between commas")
        if eq:
            if not key or not value:
                raise stage.error(f"item {item!r} must be key=value")
            if key in stage.options:
                raise stage.error(f"{key} given twice")
            stage.options[key] = value
        elif position == 0 and _looks_like_value(key):
            stage.positional = key
        elif key.isalpha():
            stage.flags.add(key)
        else:
            raise stage.error(f"value {key!r} must come first (or be written key=value)")
    return stage


def _amount(stage: StageText) -> float:
    amount = stage.number("k", f"'{stage.name}' needs a fraction 0 < F < 1 or a count >= 1, e.g. {stage.name}:0.01")
    if amount >= 1 and not amount.is_integer():
        raise stage.error(f"a count must be a whole number, got {amount}; a fraction must be 0 < F < 1")
    if amount <= 0:
        raise stage.error(f"must be a fraction 0 < F < 1 or a count >= 1, got {amount}")
    return amount


def _quantizer(stage: StageText, bits: int | None) -> UniformQuantizer:
    keys = ("block",) if bits is not None else ("bits", "block")
    stage.accept(keys=keys, flags=("det",))
    if bits is None:
        if "bits" not in stage.options:
            raise stage.error("'q' needs bits=N with N in 1, 2, 4, 8 (or write q1, q2, q4, q8)")
        bits = stage.integer("bits", 8, 1, 8)
    if bits not in (1, 2, 4, 8):
        raise stage.error(f"bits must be 1, 2, 4 or 8, got {bits}")
    block = stage.integer("block", DEFAULT_BLOCK, 1, MAX_BLOCK)
    return UniformQuantizer(bits, block, deterministic="det" in stage.flags)


def build_stage(stage: StageText) -> Stage:
    name = stage.name
    if name in ("f32", "f16", "ef"):
        stage.accept()
        return {"f32": Float32Coder, "f16": Float16Coder, "ef": ErrorFeedback}[name]()
    if name in ("q1", "q2", "q4", "q8"):
        return _quantizer(stage, int(name[1:]))
    if name == "q":
        return _quantizer(stage, None)
    if name == "sign":
        stage.accept(keys=("block",))
        return SignCoder(stage.integer("block", DEFAULT_BLOCK, 1, MAX_BLOCK))
    if name == "topk":
        stage.accept(positional="k")
        return TopK(_amount(stage))
    if name == "randk":
        stage.accept(positional="k", flags=("unbiased",))
        return RandK(_amount(stage), unbiased="unbiased" in stage.flags)
    if name == "clip":
        stage.accept(positional="norm")
        norm = stage.number("norm", "'clip' needs the L2 norm bound, e.g. clip:5")
        if norm <= 0:
            raise stage.error(f"the norm bound must be > 0, got {norm}")
        return ClipStage(norm)
    if name == "zstd":
        stage.accept(positional="level")
        return ZstdStage(stage.integer("level", DEFAULT_LEVEL, MIN_LEVEL, MAX_LEVEL))
    raise stage.error(f"unknown stage '{name}'; {STAGE_HELP}")


@dataclass
class ParsedSpec:
    transforms: list[Transform]
    layout: Layout | None
    values: ValueCoder | None
    byte_coder: ByteCoder | None


def parse_stages(spec: str) -> ParsedSpec:
    """Split, build and order-check the stages of `spec` (raises CodecError(BAD_CODEC))."""
    if not isinstance(spec, str):
        raise CodecError(Reason.BAD_CODEC, f"codec spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise CodecError(Reason.BAD_CODEC, f"empty codec spec; try 'f32' or 'q8'. {STAGE_HELP}")
    if len(spec) > MAX_SPEC_LENGTH:
        raise CodecError(Reason.BAD_CODEC, f"codec spec is {len(spec)} characters, at most {MAX_SPEC_LENGTH}")
    parsed = ParsedSpec([], None, None, None)
    phase = 0  # 0 transforms, 1 sparsifier, 2 value coder, 3 byte coder
    for text in spec.split("|"):
        stage = build_stage(split_stage(spec, text))
        part = text.strip()
        if isinstance(stage, Transform):
            if phase > 0:
                raise spec_error(spec, part, f"comes too late; {ORDER_HELP}")
            if any(type(t) is type(stage) for t in parsed.transforms):
                raise spec_error(spec, part, f"'{stage.spec.split(':')[0]}' appears twice; {ORDER_HELP}")
            parsed.transforms.append(stage)
        elif isinstance(stage, Layout):
            if phase >= 1:
                raise spec_error(spec, part, f"only one sparsifier, before the value coder; {ORDER_HELP}")
            parsed.layout, phase = stage, 1
        elif isinstance(stage, ValueCoder):
            if phase >= 2:
                raise spec_error(spec, part, f"only one value coder, before zstd; {ORDER_HELP}")
            parsed.values, phase = stage, 2
        else:
            if phase >= 3:
                raise spec_error(spec, part, f"zstd may appear once; {ORDER_HELP}")
            parsed.byte_coder, phase = stage, 3
    _check_error_feedback(spec, parsed)
    return parsed


def _check_error_feedback(spec: str, parsed: ParsedSpec) -> None:
    """Refuse `ef` in front of a stage that makes the residual grow without bound.

    Error feedback converges only when what follows it is a contraction, ||C(x) - x|| < ||x||
    (Stich et al. 2018; Karimireddy et al. 2019). Measured here: with `ef|q1` and
    `ef|randk:0.1,unbiased` the residual passes 1e30 within 130-180 rounds.
    """
    positions = [i for i, t in enumerate(parsed.transforms) if isinstance(t, ErrorFeedback)]
    if not positions:
        return
    after_ef = parsed.transforms[positions[0] + 1:] + [parsed.layout, parsed.values]
    for stage in after_ef:
        if stage is not None and not stage.ef_safe:
            hint = ("use 'sign', 'q1:det' or 'q2' instead" if stage.spec.startswith("q1")
                    else "drop 'unbiased': error feedback already corrects the bias")
            raise spec_error(spec, stage.spec, "error feedback diverges with this stage (its error can exceed "
                                               f"the update, so the residual grows every round); {hint}")
