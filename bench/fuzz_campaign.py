"""Fuzz campaign over every parser a network peer (or a config file) can reach.

Each target starts from VALID inputs made by the project's own encoders (envelopes of every
kind, codec payloads of every stage, signed model messages, secure-aggregation messages,
whole update messages, the shipped config files) and feeds the parser structured mutations
of them: bit flips, boundary bytes, truncation, splicing of two inputs, inserted and
deleted ranges, length fields that lie (0, 1, 2^31, 2^32-1, ...), oversized varints, and,
for JSON and TOML, wrong types, missing and unknown keys, NaN/inf, huge integers, deep
nesting and odd unicode. Checksums (envelope CRC-32, zstd frame checksum, manifest
signature) are recomputed on most mutants, so the mutation reaches the parser behind them
instead of being stopped at the door every time.

Allowed outcomes: success, or the target's typed error (a `ProtocolError` subclass with a
`Reason`; for config files the loader's config error). Anything else is a crash, and an input
that runs past the per-input deadline (SIGALRM) is a hang; both are listed with a
reproducer (seed, target, input number). Some targets also check a property on success
(decoded vectors finite and of the announced size; `decode_accumulate` leaving its
accumulator untouched when it raises; canonical codec specs re-parsing to themselves).

The device-side targets also carry a memory bound: every input runs under tracemalloc and an
input whose parse holds more than the bound at its peak is counted as a crash ("memory"), so a
zip bomb or an endless line that a parser inflates before refusing it fails the campaign even
when the machine has the memory to survive it. The process's peak RSS is reported as well.

Mutation is seeded (`random.Random(f"{seed}:{target}")`), so a crash reported at input k of
a target is reproduced by the same command. Not coverage-guided: atheris (which would be) has a
CPython 3.11 wheel but is not a dependency of the project; tests/test_fuzz_campaign.py keeps a
300-inputs-a-target version of this campaign in CI.

Run: ``python bench/fuzz_campaign.py [--per-target 10000] [--seed 1] [--only NAME ...] [--out FILE.json] [-v]``
"""
from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from protocol.codec import parse_codec  # noqa: E402
from protocol.envelope import HEADER_SIZE, Envelope, Kind, decode_envelope  # noqa: E402
from protocol.errors import ProtocolError  # noqa: E402

log = logging.getLogger(__name__)

REFERENCE_DIM = 781_068  # parameters of the benchmark's reference model
DEFAULT_DEADLINE_S = 2.0
FLEET = "fuzz"
_CRC_OFFSET = HEADER_SIZE - 8  # crc32 sits before the four one-byte id lengths


class Hang(BaseException):
    """Raised by SIGALRM when one input runs past its deadline (BaseException: parsers cannot swallow it)."""


class PropertyViolation(Exception):
    """A parser accepted an input but returned something that breaks its contract."""


# -- mutation of bytes -------------------------------------------------------------------------
_INTERESTING_U8 = (0, 1, 0x7F, 0x80, 0xFF)
_INTERESTING_INTS = (0, 1, 2, 7, 8, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1,
                     2**63 - 1, 2**64 - 1)


def _offset(rng: random.Random, n: int) -> int:
    """Mostly near the start (headers, length fields), sometimes anywhere."""
    if n <= 0:
        return 0
    return rng.randrange(min(n, 96)) if rng.random() < 0.6 else rng.randrange(n)


def _bitflip(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    if buf:
        i = _offset(rng, len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return buf


def _set_byte(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    if buf:
        buf[_offset(rng, len(buf))] = rng.choice(_INTERESTING_U8) if rng.random() < 0.7 else rng.randrange(256)
    return buf


def _length_lie(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    width = rng.choice((1, 2, 4, 4, 8))
    if len(buf) < width:
        return buf
    i = _offset(rng, len(buf) - width + 1)
    value = rng.choice(_INTERESTING_INTS + (len(buf), len(buf) - 1, len(buf) + 1, max(len(buf) - i, 0)))
    buf[i:i + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return buf


def _varint_lie(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    i = _offset(rng, len(buf))
    choice = rng.random()
    if choice < 0.3:
        lie = b"\xff" * rng.randrange(1, 14) + b"\x01"  # over-long varint
    elif choice < 0.6:
        lie = b"\x80" * rng.randrange(1, 12)  # unterminated
    else:
        value = rng.choice(_INTERESTING_INTS + (1 << 40, 1 << 56))
        out = bytearray()
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                break
        lie = bytes(out)
    buf[i:i + len(lie)] = lie
    return buf


def _truncate(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    return buf[:rng.randrange(len(buf) + 1)] if rng.random() < 0.5 else buf[:max(0, len(buf) - rng.randrange(1, 9))]


def _extend(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    kind = rng.random()
    if kind < 0.4:
        return buf + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    if kind < 0.7:
        return buf + b"\0" * rng.randrange(1, 64)
    return buf + buf[: rng.randrange(len(buf) + 1)]


def _insert(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    i = _offset(rng, len(buf) + 1)
    return buf[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9))) + buf[i:]


def _delete(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    if not buf:
        return buf
    i = _offset(rng, len(buf))
    return buf[:i] + buf[i + rng.randrange(1, 17):]


def _duplicate(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    if not buf:
        return buf
    i = _offset(rng, len(buf))
    j = min(len(buf), i + rng.randrange(1, 33))
    return buf[:j] + buf[i:j] * rng.randrange(1, 4) + buf[j:]


def _splice(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    if not other:
        return buf
    return buf[:rng.randrange(len(buf) + 1)] + bytearray(other[rng.randrange(len(other) + 1):])


def _random_bytes(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    return bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 80)))


def _text_bomb(rng: random.Random, buf: bytearray, other: bytes) -> bytearray:
    """Text that breaks naive JSON/TOML/number parsing: 5,000-digit numbers, deep nesting."""
    i = _offset(rng, len(buf) + 1)
    bomb = rng.choice((b"9" * 5000, b"1" * 4301, b"-" + b"7" * 400, b"1e99999", b"[" * 1500, b"{\"a\":" * 1200,
                       b"NaN", b"Infinity", b"\\ud800", b"\xc3\x28", b"\x00"))
    return buf[:i] + bomb + buf[i:]


_BYTE_OPS = (_text_bomb, _bitflip, _bitflip, _set_byte, _set_byte, _length_lie, _length_lie, _varint_lie, _truncate,
             _extend, _insert, _delete, _duplicate, _splice, _random_bytes)


def mutate_bytes(rng: random.Random, data: bytes, other: bytes = b"") -> bytes:
    """1 to 8 stacked byte-level mutations of `data` (`other`: a second valid input to splice in)."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        op = rng.choice(_BYTE_OPS)
        if op is _random_bytes and rng.random() < 0.8:
            op = _bitflip
        buf = op(rng, buf, other)
    return bytes(buf)


# -- mutation of JSON-like values --------------------------------------------------------------
def _deep(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


_ODD_STRINGS = ("", " ", "x", "é", "\u0000", "\ud800", "\U0001F600", "\u202e", "q8", "f32|zstd", "topk:0.01|q4",
                "a" * 5000, "../../etc/passwd", "NaN", "1e999", "-1", "0x10", "true", "dev-1", "fuzz", "/dev/zero",
                "\n[broker]\n", "\"", "\\", "%s%n")
_ODD_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 1, 3, 2**31, 2**32, 2**63, 2**64, -2**63, 10**400,
                                0.5, -0.0, 1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf"),
                                [], [1, 2], ["x"], {}, {"a": 1}, {"eval": {"correct1": 1}}) + _ODD_STRINGS


def odd_value(rng: random.Random) -> Any:
    pick = rng.random()
    if pick < 0.05:
        return _deep(rng.choice((50, 500, 950)))
    if pick < 0.1:
        return rng.randrange(-2**70, 2**70)
    return rng.choice(_ODD_VALUES)


def _copy_tables(value: Any, depth: int = 0) -> Any:
    """Copy the nested dicts (what mutation edits in place); share everything else."""
    if isinstance(value, dict) and depth < 10:
        return {k: _copy_tables(v, depth + 1) for k, v in value.items()}
    return value


def mutate_mapping(rng: random.Random, data: dict, *, keys: tuple[str, ...] = ()) -> tuple[Any, str]:
    """A mutated deep copy of a JSON/TOML mapping, and the dotted key that was changed."""
    root = _copy_tables(data)
    paths: list[tuple[dict, str, str]] = []

    def walk(node: dict, prefix: str, depth: int) -> None:
        for key, value in node.items():
            paths.append((node, key, f"{prefix}{key}"))
            if isinstance(value, dict) and depth < 8:
                walk(value, f"{prefix}{key}.", depth + 1)

    if not isinstance(root, dict):
        return root, ""
    walk(root, "", 0)
    if not paths or rng.random() < 0.02:
        return odd_value(rng), ""
    node, key, dotted = rng.choice(paths)
    action = rng.random()
    if action < 0.55:
        node[key] = odd_value(rng)
    elif action < 0.7:
        del node[key]
    elif action < 0.82:
        name = rng.choice(keys + ("unknown", "x" * 300, "", "é", "__class__", key.upper(), key + " "))
        node[name] = odd_value(rng)
        dotted = dotted.rsplit(".", 1)[0] + "." + name if "." in dotted else name
    elif action < 0.9:
        node[key] = {"nested": node[key]} if rng.random() < 0.5 else [node[key]]
    else:  # a plausible value from elsewhere in the same document (right type, wrong place)
        node[key] = _copy_tables(rng.choice([n[k] for n, k, _ in paths if k in n] or [None]))
    return root, dotted


def dumps_json(value: Any) -> bytes:
    """JSON bytes of `value` (NaN, lone surrogates and all); too-deep values become deeper text."""
    try:
        return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
    except RecursionError:
        return b'{"deep": ' + b"[" * 5000 + b"]" * 5000 + b"}"


# -- a small TOML writer (tomllib only reads) ----------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return '""'  # TOML has no null: the closest a user can write
    return json.dumps(str(value))


def to_toml(doc: Any) -> str:
    """TOML text for a mapping of tables (inline tables below the first level)."""
    try:
        return _to_toml(doc)
    except RecursionError:
        return "deep = " + "[" * 5000 + "]" * 5000 + "\n"


def _to_toml(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"value = {_toml_value(doc)}\n"
    plain = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [f"[{json.dumps(str(k))}]\n" + "".join(f"{json.dumps(str(kk))} = {_toml_value(vv)}\n" for kk, vv in v.items())
              for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(plain) + "\n" + "\n".join(tables)


# -- the harness ---------------------------------------------------------------------------------
@dataclass
class Target:
    """One parser under test: how to make a mutated input and how to feed it to the parser."""

    name: str
    parser: str                                   # what is exercised, for the table
    generate: Callable[[random.Random], Any]      # one mutated input
    run: Callable[[Any], Any]                     # parse; raise the typed error to reject
    allowed: tuple[type[BaseException], ...] = (ProtocolError,)
    memory_bound_mb: float | None = None          # most a single input may hold (tracemalloc peak)
    # config loaders: which mutated key the last input changed, and whether refusals named it
    key_checks: Counter = field(default_factory=Counter)
    unnamed_samples: list[str] = field(default_factory=list)

    def reason(self, exc: BaseException) -> str:
        reason = getattr(exc, "reason", None)
        if isinstance(reason, enum.Enum):
            return str(reason.value)
        return type(exc).__name__

    def is_allowed(self, exc: BaseException) -> bool:
        """The typed error, exactly: a UnicodeDecodeError is a ValueError but not a config error."""
        return isinstance(exc, self.allowed) and not isinstance(exc, (UnicodeError, OverflowError, RecursionError))

    def note_key(self, key: str, exc: BaseException) -> None:
        """Count whether a refusal of a structured mutation names the key that was changed."""
        if not key or "not valid TOML" in str(exc):  # the writer made text TOML cannot hold: no key to name
            return
        leaf = key.rsplit(".", 1)[-1]
        named = leaf in str(exc) or key.split(".", 1)[0] in str(exc)
        self.key_checks["named" if named else "unnamed"] += 1
        if not named and len(self.unnamed_samples) < 20:
            self.unnamed_samples.append(f"{key}: {str(exc)[:200]}")


@dataclass
class TargetStats:
    name: str
    parser: str
    inputs: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    crashes: list[dict] = field(default_factory=list)
    crash_count: int = 0
    hangs: int = 0
    max_s: float = 0.0
    wall_s: float = 0.0
    signatures: Counter = field(default_factory=Counter)  # crash type and where it was raised
    key_checks: dict = field(default_factory=dict)
    unnamed_samples: list[str] = field(default_factory=list)
    memory_bound_mb: float | None = None
    memory_violations: int = 0
    max_traced_mb: float = 0.0      # the largest tracemalloc peak of one input
    process_peak_rss_mb: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.name, "parser": self.parser, "inputs": self.inputs, "accepted": self.accepted,
                "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected.most_common()),
                "crashes": self.crash_count, "hangs": self.hangs, "max_s_per_input": round(self.max_s, 4),
                "wall_s": round(self.wall_s, 1), "crash_signatures": dict(self.signatures.most_common()),
                "crash_samples": self.crashes[:10],
                **({"memory_bound_mb": self.memory_bound_mb, "memory_violations": self.memory_violations,
                    "max_traced_mb_per_input": round(self.max_traced_mb, 2),
                    "process_peak_rss_mb": round(self.process_peak_rss_mb, 1)} if self.memory_bound_mb else {}),
                **({"refusals_naming_the_mutated_key": self.key_checks, "refusals_not_naming_it_samples":
                    self.unnamed_samples} if self.key_checks else {})}

    def add_key_checks(self, target: Target) -> None:
        self.key_checks = dict(target.key_checks)
        self.unnamed_samples = list(target.unnamed_samples)


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _describe(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes: {bytes(value[:160]).hex()}"
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply to print>"
    return text[:400]


def fuzz_target(target: Target, count: int, seed: int, deadline_s: float = DEFAULT_DEADLINE_S) -> TargetStats:
    """Feed `count` generated inputs to `target.run`; classify every outcome."""
    stats = TargetStats(target.name, target.parser, memory_bound_mb=target.memory_bound_mb)
    rng = random.Random(f"{seed}:{target.name}")
    traced = target.memory_bound_mb is not None and not tracemalloc.is_tracing()
    if traced:
        tracemalloc.start()
    outer_timer = signal.getitimer(signal.ITIMER_REAL)  # e.g. pytest-timeout's alarm: put it back after
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    started = time.perf_counter()
    try:
        for i in range(count):
            value = target.generate(rng)
            if traced:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, deadline_s)
            try:
                try:
                    target.run(value)
                    outcome = None
                except Hang:
                    outcome = "hang"
                except BaseException as exc:  # noqa: BLE001 - anything but the typed error is what we look for
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    if target.is_allowed(exc):
                        outcome = exc
                    else:
                        outcome = ("crash", exc, traceback.format_exc(limit=-3))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except Hang:  # the alarm went off just as the input ended, while it was being classified
                signal.setitimer(signal.ITIMER_REAL, 0)
                outcome = "hang"
            elapsed = time.perf_counter() - t0
            stats.inputs += 1
            stats.max_s = max(stats.max_s, elapsed)
            if traced:
                held_mb = (tracemalloc.get_traced_memory()[1] - base) / 2**20
                stats.max_traced_mb = max(stats.max_traced_mb, held_mb)
                if held_mb > target.memory_bound_mb:
                    stats.memory_violations += 1
                    stats.crash_count += 1
                    stats.signatures[f"memory: {held_mb:.0f} MB held, bound {target.memory_bound_mb:.0f} MB"] += 1
                    if len(stats.crashes) < 50:
                        stats.crashes.append({"kind": "memory", "held_mb": round(held_mb, 1), "input_no": i,
                                              "input": _describe(value)})
            if outcome is None:
                stats.accepted += 1
            elif outcome == "hang":
                stats.hangs += 1
                stats.crashes.append({"kind": "hang", "input_no": i, "input": _describe(value)})
            elif isinstance(outcome, tuple):
                _, exc, tb = outcome
                stats.crash_count += 1
                frames = traceback.extract_tb(exc.__traceback__)
                where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
                signature = f"{type(exc).__name__} at {where}"
                stats.signatures[signature] += 1
                if stats.signatures[signature] <= 2 and len(stats.crashes) < 50:
                    stats.crashes.append({"kind": type(exc).__name__, "error": str(exc)[:300], "input_no": i,
                                          "input": _describe(value), "traceback": tb[-1500:]})
            else:
                stats.rejected[target.reason(outcome)] += 1
    finally:
        if traced:
            tracemalloc.stop()
        signal.signal(signal.SIGALRM, previous)
        if outer_timer[0] > 0:
            remaining = outer_timer[0] - (time.perf_counter() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001), outer_timer[1])
    stats.wall_s = time.perf_counter() - started
    stats.process_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if target.key_checks:
        stats.add_key_checks(target)
    return stats


# -- helpers shared by the targets ---------------------------------------------------------------
def fix_crc(data: bytes) -> bytes:
    """Recompute an envelope's CRC-32 so that a mutant passes the checksum and reaches the rest."""
    import zlib

    if len(data) < HEADER_SIZE:
        return data
    header = bytearray(data[:HEADER_SIZE])
    header[_CRC_OFFSET:_CRC_OFFSET + 4] = b"\0\0\0\0"
    crc = zlib.crc32(data[HEADER_SIZE:], zlib.crc32(header))
    header[_CRC_OFFSET:_CRC_OFFSET + 4] = crc.to_bytes(4, "little")
    return bytes(header) + data[HEADER_SIZE:]


def rewrap(env: Envelope, **changes: Any) -> bytes:
    """`env` encoded with some fields changed, bypassing the encoder's own checks where needed."""
    import dataclasses

    return dataclasses.replace(env, **changes).encode()


def zstd_frame(body: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(body)


def split_zstd(spec: str) -> tuple[str, bool]:
    parts = [p for p in spec.split("|") if not p.strip().startswith("zstd")]
    return "|".join(parts) or "f32", len(parts) != len(spec.split("|"))


CODEC_SPECS = ("f32", "f16", "q8", "q4", "q2", "q1", "q1:det", "q4:block=64,det", "q:bits=8,block=1000", "sign",
               "sign:block=17", "topk:0.01", "topk:0.3|q8", "topk:7|f16", "randk:0.1|q4", "randk:0.5,unbiased|f32",
               "clip:5|q8", "clip:1|ef|topk:0.05|q4|zstd", "ef|sign|zstd", "q8|zstd", "f32|zstd:19",
               "topk:0.01|q8|zstd", "clip:0.5|f16|zstd")


@dataclass
class CodecSeed:
    spec: str
    n: int
    payload: bytes
    body: bytes  # the payload before zstd (== payload without zstd)


def codec_seeds(rng_seed: int = 7, sizes: tuple[int, ...] = (0, 1, 255, 256, 257, 1000, 3001)) -> list[CodecSeed]:
    seeds = []
    gen = np.random.default_rng(rng_seed)
    for spec in CODEC_SPECS:
        inner, zipped = split_zstd(spec)
        for n in sizes:
            vec = (gen.standard_normal(n) * gen.choice([1e-3, 1.0, 100.0])).astype(np.float32)
            body = parse_codec(inner).encode(vec, rng=np.random.default_rng(n)).payload
            payload = parse_codec(spec).encode(vec, rng=np.random.default_rng(n)).payload if zipped else body
            seeds.append(CodecSeed(spec, n, payload, body))
    return seeds


def mutate_codec_payload(rng: random.Random, seeds: list[CodecSeed]) -> tuple[str, int, bytes]:
    seed = rng.choice(seeds)
    other = rng.choice(seeds)
    _, zipped = split_zstd(seed.spec)
    if zipped and rng.random() < 0.6:  # reach the inner decoder through a valid zstd frame
        payload = zstd_frame(mutate_bytes(rng, seed.body, other.body))
    else:
        payload = mutate_bytes(rng, seed.payload, other.payload)
    n = seed.n if rng.random() < 0.85 else rng.choice((0, 1, max(seed.n - 1, 0), seed.n + 1, 2**31, 2**40 + 1))
    return seed.spec, n, payload


# -- the targets ------------------------------------------------------------------------------------
def _valid_envelopes() -> list[bytes]:
    from protocol.messages import Ack, Assignment, CheckIn, RoundPlan

    plan = RoundPlan(3, 2, "cifg", "q8", 20, 10.0, 300.0)
    payload = parse_codec("q8").encode(np.linspace(-1, 1, 300, dtype=np.float32), rng=np.random.default_rng(0)).payload
    return [plan.to_envelope(FLEET).encode(),
            CheckIn(3, 2, 50, "pi").to_envelope(FLEET, "dev-1").encode(),
            Assignment(3, True, 0.0, "").to_envelope(FLEET, "dev-1").encode(),
            Ack(3, False, "stale_base", "trained from 1").to_envelope(FLEET, "dev-1").encode(),
            Envelope(Kind.UPDATE, FLEET, "dev-1", 3, 2, 50, "q8", {"train_loss": 3.2, "steps": 4}, payload).encode(),
            Envelope(Kind.STATUS, FLEET, "dev-1", meta={"state": "online"}).encode(),
            Envelope(Kind.METRICS, FLEET).encode()]


def envelope_target() -> Target:
    seeds = _valid_envelopes()

    def generate(rng: random.Random) -> bytes:
        data = mutate_bytes(rng, rng.choice(seeds), rng.choice(seeds))
        return fix_crc(data) if rng.random() < 0.7 else data

    def run(data: bytes) -> None:
        env = decode_envelope(data, max_payload=1 << 20)
        if not isinstance(env.meta, dict):
            raise PropertyViolation("meta is not a dict")
        decode_envelope(data, max_payload=1 << 20, expect=env.kind)
        again = env.encode()  # what decodes must re-encode (the header fields were checked)
        if decode_envelope(again, max_payload=1 << 20).payload != env.payload:
            raise PropertyViolation("re-encoded envelope decodes to another payload")

    return Target("envelope", "protocol.envelope.decode_envelope (+ re-encode)", generate, run)


def messages_target() -> Target:
    from protocol.messages import Ack, Assignment, CheckIn, RoundPlan, UpdateMeta, from_dict, to_dict

    seeds: list[tuple[type, dict]] = [
        (RoundPlan, to_dict(RoundPlan(3, 2, "cifg", "clip:5|q8|zstd", 20, 10.0, 300.0, 2, 16, 0.5, 0.01, 100,
                                      "f16", 5.0, True))),
        (CheckIn, to_dict(CheckIn(3, 2, 50, "pi"))), (Assignment, to_dict(Assignment(3, False, 12.5, "window_closed"))),
        (Ack, to_dict(Ack(3, True, "", ""))),
        (UpdateMeta, to_dict(UpdateMeta(3.1, 4.0, 12, 1.5, 0.2, {"eval": {"correct1": 1, "correct3": 2, "scored": 5}}))),
    ]
    kinds = {RoundPlan: Kind.PLAN, CheckIn: Kind.CHECKIN, Assignment: Kind.ASSIGN, Ack: Kind.ACK, UpdateMeta: Kind.UPDATE}

    def generate(rng: random.Random) -> tuple[type, Any]:
        cls, data = rng.choice(seeds)
        keys = tuple(data)
        mutated = data
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutated, _ = mutate_mapping(rng, mutated if isinstance(mutated, dict) else data, keys=keys)
        if rng.random() < 0.35:  # through the wire: JSON text in an envelope, byte-mutated, CRC fixed
            text = dumps_json(mutated)
            if rng.random() < 0.5:
                text = mutate_bytes(rng, text)
            rnd = mutated.get("round_id", 3) if isinstance(mutated, dict) else 3
            rnd = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) and 0 <= rnd < 2**32 else 3
            env = Envelope(kinds[cls], FLEET, "dev-1", rnd, meta={"_": 0}).encode()
            env = _replace_meta(env, text)
            return cls, env
        return cls, mutated

    def run(item: tuple[type, Any]) -> None:
        cls, data = item
        if isinstance(data, bytes):
            env = decode_envelope(data, expect=kinds[cls])
            msg = cls.from_envelope(env) if hasattr(cls, "from_envelope") else from_dict(cls, env.meta)
        else:
            msg = from_dict(cls, data)
        if hasattr(msg, "to_envelope"):  # an accepted message must survive its own round trip
            args = (FLEET,) if cls is RoundPlan else (FLEET, "dev-1")
            msg.to_envelope(*args).encode()

    return Target("messages", "protocol.messages from_dict/from_envelope: RoundPlan CheckIn Assignment Ack UpdateMeta",
                  generate, run)


def _replace_meta(env_bytes: bytes, meta: bytes) -> bytes:
    """An envelope whose metadata block is `meta` (any bytes), with lengths and CRC fixed."""
    import struct

    fixed = struct.Struct("<4sBBHIIIIII4B")
    fields = list(fixed.unpack_from(env_bytes, 0))
    ids_len = fields[10] + fields[11] + fields[12]
    old_meta = fields[7]
    body = env_bytes[HEADER_SIZE:HEADER_SIZE + ids_len]
    payload = env_bytes[HEADER_SIZE + ids_len + old_meta:]
    fields[7] = len(meta)
    return fix_crc(fixed.pack(*fields) + body + meta + payload)


class _Keys:
    """One Ed25519 key pair for the model targets (made once)."""

    _pair = None

    @classmethod
    def pair(cls):
        if cls._pair is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            private = Ed25519PrivateKey.generate()
            cls._pair = (private, private.public_key())
        return cls._pair


def _manifest_dict(payload: bytes, codec: str, version: int = 5, base: int | None = None) -> dict:
    from protocol.signing import sha256_hex

    return {"fleet": FLEET, "model_id": "cifg", "version": version, "weights_sha256": sha256_hex(payload),
            "codec": codec, "payload_len": len(payload), "base_version": base, "created_at": 1.7e9,
            "extra": {"round": 4, "metrics": {"top3": 0.18}}}


def signing_target() -> Target:
    from protocol.signing import ModelManifest, SignedManifest, sign_manifest

    private, public = _Keys.pair()
    payload = b"\x01" * 100
    docs = [_manifest_dict(payload, "f32"), _manifest_dict(payload, "q8|zstd", 7, 6)]
    signed = [sign_manifest(private, ModelManifest(**d)).to_bytes() for d in docs]

    def generate(rng: random.Random) -> tuple[str, Any]:
        mode = rng.random()
        if mode < 0.4:
            return "bytes", mutate_bytes(rng, rng.choice(signed), rng.choice(signed))
        doc, _ = mutate_mapping(rng, rng.choice(docs), keys=tuple(docs[0]))
        text = dumps_json(doc).decode("utf-8", "surrogatepass")
        if mode < 0.55:
            text = mutate_bytes(rng, text.encode("utf-8", "surrogatepass")).decode("utf-8", "surrogateescape")
        if mode < 0.8:
            return "json", text
        return "signed", b"FBSM\x01" + bytes(64) + text.encode("utf-8", "surrogatepass")

    def run(item: tuple[str, Any]) -> None:
        mode, data = item
        if mode == "json":
            manifest = ModelManifest.from_json(data)
            if ModelManifest.from_json(manifest.to_json()) != manifest:
                raise PropertyViolation("manifest does not survive its own JSON")
            return
        sm = SignedManifest.from_bytes(data)
        sm.verify(public)

    return Target("signing", "protocol.signing SignedManifest.from_bytes/verify, ModelManifest.from_json",
                  generate, run)


def model_message_target() -> Target:
    from protocol.model_message import ModelMessage
    from protocol.signing import ModelManifest, ModelTrust, SignedManifest, sign_manifest

    private, public = _Keys.pair()
    dim = 500
    vec = np.linspace(-1, 1, dim, dtype=np.float32)
    seeds = []
    for codec, version, base in (("f32", 5, None), ("q8|zstd", 6, 5), ("f16", 9, None)):
        weights = parse_codec(codec).encode(vec, rng=np.random.default_rng(0)).payload
        doc = _manifest_dict(weights, codec, version, base)
        sm = sign_manifest(private, ModelManifest(**doc))
        seeds.append((doc, weights, ModelMessage(FLEET, version, codec, sm.to_bytes(), weights, base or 0)))

    def generate(rng: random.Random) -> bytes:
        doc, weights, msg = rng.choice(seeds)
        mode = rng.random()
        if mode < 0.35:  # a validly signed manifest with odd fields (a buggy or compromised signer)
            bad, _ = mutate_mapping(rng, doc, keys=tuple(doc))
            try:
                signed = sign_manifest(private, ModelManifest(**bad)).to_bytes()
            except Exception:  # noqa: BLE001 - the signer's own refusals (or bugs) are not under test here
                signed = b"FBSM\x01" + bytes(64) + dumps_json(bad)
            if rng.random() < 0.5:
                weights = mutate_bytes(rng, weights)
            return ModelMessage(FLEET, msg.version, msg.codec, signed, weights, msg.base_version).to_envelope().encode()
        if mode < 0.6:  # a mutated payload: manifest length prefix, manifest, weights
            env = msg.to_envelope()
            return fix_crc(rewrap(env, payload=mutate_bytes(rng, env.payload)))
        data = mutate_bytes(rng, msg.to_envelope().encode(), rng.choice(seeds)[2].to_envelope().encode())
        return fix_crc(data) if rng.random() < 0.8 else data

    def run(data: bytes) -> None:
        env = decode_envelope(data, max_payload=1 << 20, expect=(Kind.MODEL, Kind.INFERENCE_MODEL))
        msg = ModelMessage.from_envelope(env)
        signed = SignedManifest.from_bytes(msg.signed_manifest)
        trust = ModelTrust(public, FLEET, "cifg", last_version=5 if signed.manifest.base_version == 5 else None)
        manifest = trust.accept(signed, msg.weights_payload)
        weights = parse_codec(manifest.codec).decode(msg.weights_payload, dim)
        if weights.shape != (dim,) or not np.isfinite(weights).all():
            raise PropertyViolation("accepted model decodes to a wrong shape or non-finite weights")

    return Target("model_message", "protocol.model_message + ModelTrust.accept + weights decode", generate, run)


def codec_payload_target() -> Target:
    seeds = codec_seeds()

    def run(item: tuple[str, int, bytes]) -> None:
        spec, n, payload = item
        codec = parse_codec(spec)
        out = np.full(min(n, 1 << 16), 0.25, dtype=np.float32)
        try:
            if out.size == n:
                codec.decode_accumulate(payload, out, 0.5)
        except ProtocolError:
            if not (out == np.float32(0.25)).all():
                raise PropertyViolation("decode_accumulate changed its accumulator and then raised") from None
        vec = codec.decode(payload, n)
        if vec.shape != (n,) or vec.dtype != np.float32 or not np.isfinite(vec).all():
            raise PropertyViolation(f"decoded {vec.dtype}{vec.shape}, finite={np.isfinite(vec).all()}")

    return Target("codec_payload", "protocol.codec Codec.decode/decode_accumulate, every stage", 
                  lambda rng: mutate_codec_payload(rng, seeds), run)


_STAGES = ("f32", "f16", "q1", "q2", "q4", "q8", "q", "sign", "topk", "randk", "clip", "ef", "zstd", "Q8", "ZSTD",
           "q16", "x", "")
_NUMBERS = ("0", "1", "-1", "0.01", "1e-30", "1e999", "-0", "nan", "inf", "-inf", "infinity", "1_000", "0x10", "5",
            "256", "22", "23", "99999999999999999999999", "1" * 300, "٣", "５", "1.5", ".5", "5.", " 3 ", "")
_KEYS = ("k", "norm", "level", "bits", "block", "det", "unbiased", "x", "")


def random_spec(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4, 6))):
        stage = rng.choice(_STAGES)
        items = []
        for position in range(rng.choice((0, 0, 1, 1, 2, 3))):
            roll = rng.random()
            if roll < 0.4 and position == 0:
                items.append(rng.choice(_NUMBERS))
            elif roll < 0.8:
                items.append(f"{rng.choice(_KEYS)}={rng.choice(_NUMBERS)}")
            else:
                items.append(rng.choice(_KEYS))
        parts.append(stage + (":" + ",".join(items) if items else ""))
    spec = rng.choice(("|", " | ", "||", "|")).join(parts)
    if rng.random() < 0.3:
        spec = mutate_bytes(rng, spec.encode()).decode("utf-8", "replace")
    if rng.random() < 0.05:
        spec = rng.choice((spec * 40, "\x00", "q8\u202e", "|" * 300, spec + "\n"))
    return spec


def codec_spec_target() -> Target:
    def generate(rng: random.Random) -> Any:
        if rng.random() < 0.03:
            return odd_value(rng)
        if rng.random() < 0.3:
            return mutate_bytes(rng, rng.choice(CODEC_SPECS).encode()).decode("latin-1")
        return random_spec(rng)

    def run(spec: Any) -> None:
        codec = parse_codec(spec)
        if parse_codec(codec.spec) != codec or parse_codec(codec.spec).spec != codec.spec:
            raise PropertyViolation(f"canonical spec {codec.spec!r} does not re-parse to itself")
        vec = np.linspace(-1, 1, 37, dtype=np.float32)
        out = codec.decode(codec.encode(vec, rng=np.random.default_rng(0)).payload, 37)
        if out.shape != (37,) or not np.isfinite(out).all():
            raise PropertyViolation("a parsed codec does not round-trip a small vector")

    return Target("codec_spec", "protocol.codec.parse_codec (+ canonical re-parse, round trip)", generate, run)


def secagg_target() -> Target:
    from protocol.secagg.messages import (AdvertiseKeys, KeyRoster, MaskedInput, ShareBundle, ShareKeys,
                                          UnmaskRequest, UnmaskResponse, decode_message, decode_share_plaintext,
                                          encode_share_plaintext)
    from protocol.secagg.params import SecAggParams

    r = random.Random(3)
    key = lambda: bytes(r.randrange(256) for _ in range(32))  # noqa: E731
    ads = [AdvertiseKeys(4, f"dev-{i}", key(), key(), bytes(64) if i % 2 else b"") for i in range(3)]
    params = SecAggParams(4, 100, 2, 3, 32, 1.0)
    cts = {"dev-1": b"\x01" * 60, "dev-2": b"\x02" * 61}
    seeds = [a.to_bytes() for a in ads] + [
        KeyRoster(params, tuple(ads)).to_bytes(), ShareKeys(4, "dev-0", cts).to_bytes(),
        ShareBundle(4, "dev-0", cts).to_bytes(),
        MaskedInput(4, "dev-0", 32, np.arange(100, dtype=np.uint32) * 7919).to_bytes(),
        MaskedInput(4, "dev-0", 12, np.arange(100, dtype=np.uint32)).to_bytes(),
        MaskedInput(4, "dev-0", 7, np.arange(100, dtype=np.uint32) % 128).to_bytes(),
        UnmaskRequest(4, ("dev-0", "dev-1")).to_bytes(),
        UnmaskResponse(4, "dev-0", {"dev-1": b"\x05" * 40}, {"dev-2": b"\x06" * 40}).to_bytes()]
    plaintexts = [encode_share_plaintext("dev-0", "dev-1", b"k" * 40, b"m" * 40)]
    packed = [params.to_bytes()]

    def generate(rng: random.Random) -> tuple[str, bytes]:
        roll = rng.random()
        if roll < 0.8:
            return "message", mutate_bytes(rng, rng.choice(seeds), rng.choice(seeds))
        if roll < 0.9:
            return "plaintext", mutate_bytes(rng, plaintexts[0])
        return "params", mutate_bytes(rng, packed[0])

    def run(item: tuple[str, bytes]) -> None:
        kind, data = item
        if kind == "message":
            msg = decode_message(data)
            if isinstance(msg, MaskedInput):
                MaskedInput.from_bytes(data, expect_dim=100)
            if msg.to_bytes() != data:  # one encoding per message
                raise PropertyViolation(f"{type(msg).__name__} re-encodes to other bytes")
        elif kind == "plaintext":
            decode_share_plaintext(data)
        else:
            SecAggParams.from_bytes(data)

    return Target("secagg", "protocol.secagg.messages decode_message, share plaintext, SecAggParams", generate, run)


def intake_target(dim: int = REFERENCE_DIM) -> Target:
    from aggregator.evaluation import device_eval_counts
    from aggregator.intake import IntakeLimits, RoundState, decode_into, validate_update

    gen = np.random.default_rng(11)
    devices = {f"dev-{i}" for i in range(8)}
    limits = IntakeLimits(dim=dim, max_norm=1e3)
    seeds = []
    for spec in ("q8", "topk:0.01|q8|zstd", "f16|zstd", "sign"):
        inner, zipped = split_zstd(spec)
        vec = (gen.standard_normal(dim) * 0.01).astype(np.float32)
        body = parse_codec(inner).encode(vec, rng=np.random.default_rng(1)).payload
        payload = parse_codec(spec).encode(vec, rng=np.random.default_rng(1)).payload if zipped else body
        meta = {"train_loss": 3.0, "first_loss": 3.5, "steps": 4, "train_s": 1.0,
                "extra": {"eval": {"correct1": 1, "correct3": 2, "scored": 9}}}
        env = Envelope(Kind.UPDATE, FLEET, "dev-1", 3, 2, 50, spec, meta, payload)
        seeds.append((spec, env, body, zipped))
    acc = np.zeros(dim, dtype=np.float64)

    def generate(rng: random.Random) -> tuple[str, bytes]:
        spec, env, body, zipped = rng.choice(seeds)
        roll = rng.random()
        if roll < 0.45:  # the payload, inside a valid envelope
            if zipped and rng.random() < 0.6:
                payload = zstd_frame(mutate_bytes(rng, body))
            else:
                payload = mutate_bytes(rng, env.payload)
            return spec, rewrap(env, payload=payload)
        if roll < 0.7:  # header fields a device controls
            changes: dict[str, Any] = {}
            for _ in range(rng.choice((1, 1, 2))):
                name = rng.choice(("round", "base_version", "example_count", "device", "codec", "meta"))
                if name == "device":
                    changes[name] = rng.choice(("dev-7", "dev-99", "x" * 64, "dev-1"))
                elif name == "codec":
                    changes[name] = rng.choice(("q8", "q4", "f32", "topk:0.01|q8|zstd", "q8|zstd", "f16", ""))
                elif name == "meta":
                    changes[name], _ = mutate_mapping(rng, env.meta, keys=("eval", "train_loss", "extra"))
                    if not isinstance(changes[name], dict):
                        changes[name] = {"v": changes[name]}
                else:
                    changes[name] = rng.choice(_INTERESTING_INTS[:13])
            try:
                return spec, rewrap(env, **changes)
            except (ProtocolError, ValueError, TypeError):
                return spec, env.encode()
        data = mutate_bytes(rng, env.encode())
        return spec, fix_crc(data) if rng.random() < 0.8 else data

    def run(item: tuple[str, bytes]) -> None:
        spec, data = item
        env = decode_envelope(data, max_payload=64 << 20, expect=Kind.UPDATE)
        state = RoundState(round_id=3, base_version=2, codec=spec, cohort=set(devices))
        delta = validate_update(env, state, limits)
        if delta.shape != (dim,) or not np.isfinite(delta).all():
            raise PropertyViolation("validated update is not finite or of the wrong size")
        device_eval_counts(env.meta)
        # the server's own path: decode straight into the running sum
        acc[:] = 0.0
        decode_into(parse_codec(env.codec), env.payload)(acc, float(env.example_count))

    return Target("intake", f"aggregator.intake validate_update of whole UPDATE messages (dim {dim:,})", generate, run)


def bundle_target() -> Target:
    """The training bundle a device takes from the retained `model/bundle` topic (a zip)."""
    import io
    import zipfile

    from bench.aggregator_ingest import FAKE_TFLITE
    from models.bundle import Bundle, BundleError
    from models.config import ModelConfig

    config = ModelConfig(vocab_size=12, embed_dim=4, units=4, seq_len=4, batch_size=2)
    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(config.vocab_size - 4)]
    weights = (np.arange(config.param_count) / 64.0).astype(np.float32)
    seed = Bundle.create(config, {"format": "fedboard-vocab/1", "words": words}, FAKE_TFLITE, weights).to_bytes()
    with zipfile.ZipFile(io.BytesIO(seed)) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(members["manifest.json"])

    def rezip(parts: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in parts.items():
                zf.writestr(name, data)
        return buf.getvalue()

    def generate(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.35:
            return mutate_bytes(rng, seed, seed)
        parts = dict(members)
        if roll < 0.7:  # a manifest with odd fields, in a well-formed zip
            doc, _ = mutate_mapping(rng, manifest, keys=("config", "layout", "members", "format"))
            parts["manifest.json"] = dumps_json(doc) if rng.random() < 0.8 else mutate_bytes(rng, dumps_json(doc))
        else:  # a member's bytes changed (its sha256 in the manifest no longer matches, or the JSON breaks)
            name = rng.choice(sorted(parts))
            parts[name] = mutate_bytes(rng, parts[name])
            if rng.random() < 0.2:
                parts[rng.choice(("extra.bin", "../evil", name + "/"))] = b"x"
        return rezip(parts)

    return Target("bundle", "models.bundle.Bundle.from_bytes (retained model/bundle zip)", generate,
                  lambda data: Bundle.from_bytes(data), allowed=(BundleError,))


def bundle_bomb_target() -> Target:
    """Bundles built to exhaust memory: zip bombs (headers honest or lying), huge declared members.

    The device checks the signed digest of the bundle bytes first; these inputs reach the zip
    reader as a bundle the aggregator itself signed would (or `fedboard predict --bundle`).
    """
    from bench.bundle_bomb import ZipEntry, bomb_bundle, deflate_bomb, deflated, raw_zip, small_manifest
    from models.bundle import Bundle, BundleError

    sizes = (2**20, 16 * 2**20, 64 * 2**20, 400 * 2**20)
    huge = (2**27 + 1, 2**28, 2**31 - 1, 2**32 - 1, 2**40, -1)

    def generate(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.45:  # a bomb: the manifest or a member inflates far past what anything says
            data = bomb_bundle(rng.choice(("manifest", "manifest-honest", "member")), rng.choice(sizes))
            return mutate_bytes(rng, data) if rng.random() < 0.2 else data
        manifest, members = small_manifest(64)
        entries = {n: deflated(n, d) for n, d in members.items()}
        entries["model.tflite"] = deflated("model.tflite", b"\0\0\0\0TFL3" + b"\0" * 54)
        if roll < 0.75:  # huge members: the manifest (and maybe the zip header) claims sizes past the limits
            name = rng.choice(("model.tflite", "vocab.json", "weights.f32"))
            size = rng.choice(huge)
            manifest["members"][name]["size"] = size
            if rng.random() < 0.5:
                e = entries[name]
                entries[name] = ZipEntry(name, e.compressed, e.crc, size % 2**32)
        else:  # a bomb under another name, or beside a truthful manifest
            stream, crc = deflate_bomb(rng.choice(sizes), b"\0")
            name = rng.choice(("model.tflite", "extra.bin", "vocab.json"))
            entries[name] = ZipEntry(name, stream, crc, rng.choice((64, 2**20, 2**32 - 1)))
        parts = [deflated("manifest.json", json.dumps(manifest).encode()), *entries.values()]
        rng.shuffle(parts)
        return raw_zip(parts)

    return Target("bundle_bomb", "models.bundle.Bundle.from_bytes (zip bombs, huge members)", generate,
                  lambda data: Bundle.from_bytes(data), allowed=(BundleError,), memory_bound_mb=16.0)


def text_import_target(files: _ConfigFiles) -> Target:
    """`fedboard client add-text --file`: lines, tsv and jsonl exports, and files that are none of those."""
    from edge_client.textstore import TextStore

    store = TextStore(files.dir / "texts.db", max_rows=1000)
    seeds = {
        "lines": b"i am going to the park\nsee you at six\n\nthanks\n",
        "tsv": b"1700000000\ti am going to the park\tchat\n1700000060.5\tsee you at six\n",
        "jsonl": b'{"text": "i am going", "ts": 1700000000, "app": "chat"}\n{"text": "see you"}\n',
    }
    directory = files.dir / "a-directory"
    directory.mkdir(exist_ok=True)

    def generate(rng: random.Random) -> tuple[str, str]:
        fmt = rng.choice(tuple(seeds))
        roll = rng.random()
        if roll < 0.05:
            return "/dev/zero", fmt
        if roll < 0.08:
            return str(directory), fmt
        if roll < 0.25:  # no newline at all
            data = rng.choice((b"a", b"\xff", b"{", b"[", b" ")) * rng.choice((10**5, 10**6, 8 * 10**6))
        elif roll < 0.45:  # deep nesting, on one line or past the line limit
            depth = rng.choice((9, 100, 10_000, 50_000, 100_000))
            data = seeds["jsonl"] + (b"[" * depth + b"]" * depth if rng.random() < 0.5
                                     else b'{"text": ' * depth + b'"x"' + b"}" * depth) + b"\n"
        elif roll < 0.55:  # many short lines
            data = b"a b\n" * rng.choice((10**3, 10**4))
        else:
            data = mutate_bytes(rng, seeds[fmt], rng.choice(tuple(seeds.values())))
        return str(files.write(f"import.{fmt}", data)), fmt

    def run(item: tuple[str, str]) -> None:
        path, fmt = item
        store.import_file(Path(path), fmt)  # type: ignore[arg-type]

    return Target("text_import", "edge_client.textstore.TextStore.import_file (add-text --file)", generate, run,
                  allowed=(ValueError,), memory_bound_mb=16.0)


# -- config files ------------------------------------------------------------------------------------
class _ConfigFiles:
    """Writes each config mutant to one scratch file (tmpfs when there is one)."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="fedboard-fuzz-", dir=base))

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


def _config_generate(rng: random.Random, seeds: list[dict], texts: list[bytes]) -> tuple[bytes, str]:
    """A mutated config file, and the dotted key changed ("" for text-level mutations)."""
    roll = rng.random()
    if roll < 0.3:
        return mutate_bytes(rng, rng.choice(texts), rng.choice(texts)), ""
    doc: Any = rng.choice(seeds)
    rounds = rng.choice((1, 1, 1, 2, 3))
    key = ""
    for _ in range(rounds):
        doc, key = mutate_mapping(rng, doc if isinstance(doc, dict) else rng.choice(seeds))
    return to_toml(doc).encode("utf-8", "surrogatepass"), key if rounds == 1 else ""


def _config_run(target_ref: list[Target], load: Callable[[bytes], Any]) -> Callable[[tuple[bytes, str]], None]:
    def run(item: tuple[bytes, str]) -> None:
        data, key = item
        try:
            load(data)
        except BaseException as exc:
            if target_ref and target_ref[0].is_allowed(exc):
                target_ref[0].note_key(key, exc)
            raise
    return run


def client_config_target(files: _ConfigFiles) -> Target:
    import tomllib

    from edge_client.client_config import ConfigError, load_client_config

    text = (REPO / "edge_client/deploy/client.example.toml").read_bytes()
    doc = tomllib.loads(text.decode())
    minimal = {"device": {"id": "pi-1", "fleet": "home"}, "broker": {"host": "h"},
               "trust": {"aggregator_public_key": "k.pub"}}
    seeds, texts = [doc, minimal], [text, to_toml(minimal).encode()]

    ref: list[Target] = []
    run = _config_run(ref, lambda data: load_client_config(files.write("client.toml", data)))
    ref.append(Target("client_config", "edge_client.client_config.load_client_config (client.toml)",
                      lambda rng: _config_generate(rng, seeds, texts), run, allowed=(ConfigError,)))
    return ref[0]


AGGREGATOR_TOML = b"""[broker]
host = "broker.example.org"
port = 8883
username = "aggregator"
tls_ca = "ca.crt"
keepalive_s = 30

[aggregator]
fleet = "home"
bundle = "model.fbz"
key = "keys/aggregator.key"
checkpoint_dir = "state"
rounds = 0
metrics_port = 9100
clients_per_round = 20
over_selection = 1.3
codec = "clip:5|q8|zstd"
aggregation = "mean"
server_optimizer = "fedadam"
server_lr = 0.1
server_options = "tau=1e-3"
report_deadline_s = 300.0
downlink = "f32"
downlink_delta = "q8"
"""


def aggregator_config_target(files: _ConfigFiles) -> Target:
    import argparse as _argparse
    import tomllib

    from aggregator.commands import load_service_config, register

    parser = _argparse.ArgumentParser(prog="fedboard")
    register(parser.add_subparsers(dest="command"))
    doc = tomllib.loads(AGGREGATOR_TOML.decode())
    seeds, texts = [doc], [AGGREGATOR_TOML]

    def load(data: bytes) -> None:
        path = files.write("aggregator.toml", data)
        load_service_config(parser.parse_args(["aggregator", "--config", str(path)]))

    ref: list[Target] = []
    ref.append(Target("aggregator_config", "aggregator.commands.load_service_config -> AggregatorConfig (aggregator.toml)",
                      lambda rng: _config_generate(rng, seeds, texts), _config_run(ref, load),
                      allowed=(ValueError, FileNotFoundError)))
    return ref[0]


def scenario_target(files: _ConfigFiles) -> Target:
    import tomllib

    from device_sim.scenario import ScenarioError, builtin_scenarios, load_scenario

    texts = [p.read_bytes() for p in builtin_scenarios().values()]
    seeds = [tomllib.loads(t.decode()) for t in texts]

    ref: list[Target] = []
    run = _config_run(ref, lambda data: load_scenario(files.write("scenario.toml", data)))
    ref.append(Target("scenario_config", "device_sim.scenario.load_scenario (scenario TOML)",
                      lambda rng: _config_generate(rng, seeds, texts), run, allowed=(ScenarioError,)))
    return ref[0]


def all_targets(intake_dim: int = REFERENCE_DIM) -> list[Target]:
    files = _ConfigFiles()
    return [envelope_target(), messages_target(), model_message_target(), signing_target(), codec_payload_target(),
            codec_spec_target(), secagg_target(), intake_target(intake_dim), bundle_target(), bundle_bomb_target(),
            text_import_target(files), client_config_target(files), aggregator_config_target(files),
            scenario_target(files)]


def run_campaign(per_target: int, seed: int, only: list[str] | None = None, intake_dim: int = REFERENCE_DIM,
                 deadline_s: float = DEFAULT_DEADLINE_S) -> list[TargetStats]:
    logging.getLogger().setLevel(logging.CRITICAL)  # the parsers log every refusal: keep the table readable
    results = []
    for target in all_targets(intake_dim):
        if only and target.name not in only:
            continue
        results.append(fuzz_target(target, per_target, seed, deadline_s))
    return results


def format_table(results: list[TargetStats]) -> str:
    head = f"{'target':<18} {'inputs':>8} {'accepted':>9} {'rejected':>9} {'crashes':>8} {'hangs':>6} {'max s':>7}  rejected by reason (top 5)"
    lines = [head, "-" * len(head)]
    for s in results:
        top = ", ".join(f"{k} {v}" for k, v in s.rejected.most_common(5))
        lines.append(f"{s.name:<18} {s.inputs:>8,} {s.accepted:>9,} {sum(s.rejected.values()):>9,} "
                     f"{s.crash_count:>8} {s.hangs:>6} {s.max_s:>7.3f}  {top}")
    total = sum(s.inputs for s in results)
    lines.append(f"{'TOTAL':<18} {total:>8,} {sum(s.accepted for s in results):>9,} "
                 f"{sum(sum(s.rejected.values()) for s in results):>9,} {sum(s.crash_count for s in results):>8} "
                 f"{sum(s.hangs for s in results):>6} {max((s.max_s for s in results), default=0):>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-target", type=int, default=10_000, help="inputs per target (default 10,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="target names to run (default: all)")
    parser.add_argument("--intake-dim", type=int, default=REFERENCE_DIM, help="model size for the intake target")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per-input time bound")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every crash sample with its traceback")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run_campaign(args.per_target, args.seed, args.only, args.intake_dim, args.deadline_s)
    print(format_table(results))
    for s in results:
        for signature, n in s.signatures.most_common():
            print(f"[{s.name}] {n} x {signature}")
        if s.key_checks:
            print(f"[{s.name}] refusals of one-key mutations naming the key: {s.key_checks}")
        if s.memory_bound_mb:
            print(f"[{s.name}] most held by one input {s.max_traced_mb:.1f} MB (bound {s.memory_bound_mb:.0f} MB, "
                  f"{s.memory_violations} over); process peak RSS so far {s.process_peak_rss_mb:.0f} MB")
    if args.verbose:
        for s in results:
            for c in s.crashes:
                print(f"\n[{s.name}] {c['kind']} at input {c['input_no']}: {c.get('error', '')}\n"
                      f"input {c['input']}\n{c.get('traceback', '')}")
    report = {"bench": "fuzz_campaign", "seed": args.seed, "per_target": args.per_target,
              "deadline_s": args.deadline_s, "intake_dim": args.intake_dim,
              "inputs_total": sum(s.inputs for s in results),
              "crashes_total": sum(s.crash_count for s in results), "hangs_total": sum(s.hangs for s in results),
              "memory_violations_total": sum(s.memory_violations for s in results),
              "wall_s": round(time.perf_counter() - started, 1), "targets": [s.as_dict() for s in results],
              "command": "python bench/fuzz_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["crashes_total"] or report["hangs_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
