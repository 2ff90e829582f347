"""The self-describing TFLite training bundle: one file a device needs to train.

A bundle is a zip with four members:

- ``manifest.json``: format version, model config, weight layout, and the sha256
  and size of every other member;
- ``model.tflite``: the training graph (signatures train, infer, get_weights,
  set_weights, set_anchor); its variables are exported as zeros so the graph
  compresses to almost nothing, the real starting point is ``weights.f32``;
- ``vocab.json``: the vocabulary (``fedboard-vocab/1``), so a device tokenizes
  exactly as the model was trained;
- ``weights.f32``: the initial flat weight vector, little-endian float32.

The bundle's identity (``sha256``, ``model_id``) is the sha256 of the canonical
manifest bytes, which hold the member hashes, so it covers every byte that
matters. Reading verifies all of it and raises `BundleError` on anything wrong.

Reading is bounded, because a zip is a decompression bomb waiting to happen (a 429 kB
bundle whose manifest inflated to 400 MB drove a device to 863 MB): the bundle's bytes are
checked against a signed digest first when the caller has one (`expected_sha256`), the
manifest may inflate to `MAX_MANIFEST_BYTES` at most, and every other member is inflated in
small chunks and refused the moment it passes the size the manifest gives for it.

numpy and the standard library only: devices read bundles without TensorFlow.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import math
import mmap
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig

__all__ = [
    "BUNDLE_FORMAT",
    "MAX_BUNDLE_BYTES",
    "MAX_MANIFEST_BYTES",
    "Bundle",
    "BundleError",
    "WeightSpec",
    "read_bundle",
    "release_zero_pages",
    "weight_layout",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "fedboard-bundle/1"
VOCAB_FORMAT = "fedboard-vocab/1"
MANIFEST = "manifest.json"
TFLITE = "model.tflite"
VOCAB = "vocab.json"
WEIGHTS = "weights.f32"
_MEMBERS = (TFLITE, VOCAB, WEIGHTS)
# A bundle of the reference model is about 3.2 MB (members 6.4 + 3.1 MB inflated, manifest
# 1.5 kB); refuse anything absurd (a corrupt or hostile zip) before it is held in memory.
_MAX_MEMBER_BYTES = 128 * 1024 * 1024     # one member, inflated
_MAX_INFLATED_BYTES = 192 * 1024 * 1024   # all members together: a device's MemoryMax is 300 MB
MAX_MANIFEST_BYTES = 1024 * 1024      # what manifest.json may inflate to
MAX_BUNDLE_BYTES = 64 * 1024 * 1024   # a bundle file (compressed), as the envelope allows
_INFLATE_CHUNK = 64 * 1024            # the most a single read inflates at once
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so equal bundles are equal bytes


class BundleError(ValueError):
    """A training bundle is malformed, corrupt, or inconsistent."""


@dataclass(frozen=True)
class WeightSpec:
    """Where one named weight tensor lives in the flat float32 vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset, "size": self.size}

    @classmethod
    def from_dict(cls, d: Any) -> "WeightSpec":
        try:
            return cls(
                name=str(d["name"]),
                shape=tuple(int(s) for s in d["shape"]),
                offset=int(d["offset"]),
                size=int(d["size"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bad layout entry {d!r}: {exc}") from exc


def weight_layout(config: ModelConfig) -> tuple[WeightSpec, ...]:
    """The flat-vector layout of the CIFG model, in the order of `get_weights`.

    Gate blocks inside the 3*units axis are ordered (input i, candidate g, output o);
    the forget gate is 1 - i.
    """
    v, e, u = config.vocab_size, config.embed_dim, config.units
    shapes = (
        ("embedding", (v, e)),
        ("cifg/kernel", (e, 3 * u)),
        ("cifg/recurrent_kernel", (u, 3 * u)),
        ("cifg/bias", (3 * u,)),
        ("projection", (u, e)),
        ("output_bias", (v,)),
    )
    specs, offset = [], 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        specs.append(WeightSpec(name, shape, offset, size))
        offset += size
    return tuple(specs)


def _check_layout(layout: tuple[WeightSpec, ...], param_count: int) -> None:
    offset = 0
    for spec in layout:
        if spec.offset != offset:
            raise BundleError(
                f"layout entry {spec.name!r} starts at {spec.offset}, expected {offset} "
                "(entries must be contiguous and in order)"
            )
        if spec.size != math.prod(spec.shape):  # exact integers: no int64 overflow on hostile shapes
            raise BundleError(f"layout entry {spec.name!r}: size {spec.size} != prod{spec.shape}")
        offset += spec.size
    if offset != param_count:
        raise BundleError(
            f"layout covers {offset} parameters but the config has {param_count}; "
            "the bundle was built for a different model"
        )


def _check_vocab(vocab_json: Any, config: ModelConfig) -> None:
    if not isinstance(vocab_json, dict):
        raise BundleError(f"vocab_json must be a dict, got {type(vocab_json).__name__}")
    words = vocab_json.get("words")
    if not isinstance(words, list):
        raise BundleError("vocab_json has no 'words' list (expected fedboard-vocab/1)")
    if len(words) != config.vocab_size:
        raise BundleError(
            f"vocabulary has {len(words)} words but the model's vocab_size is {config.vocab_size}"
        )


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_bytes(weights: np.ndarray) -> memoryview:
    """The weights as little-endian float32 bytes, without a copy when they already are."""
    return memoryview(np.ascontiguousarray(weights, dtype="<f4")).cast("B")


_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def release_zero_pages(data: bytes) -> int:
    """Give the all-zero memory pages inside `data` back to the kernel; returns the bytes freed.

    A training bundle's graph carries the initial values of its variables, which are exported
    as zeros: 6.2 of the reference model's 6.4 MB. The interpreter keeps the graph bytes for
    its whole life but reads those zeros once. madvise(MADV_DONTNEED) on a private anonymous
    page makes the next read see a zero page again, so the content of `data` cannot change;
    the pages just stop counting in the process's RSS. Linux and CPython only (elsewhere a
    no-op returning 0): CPython's bytes keep their content inside the object.
    """
    page = mmap.PAGESIZE
    if sys.platform != "linux" or sys.implementation.name != "cpython" or len(data) < 4 * page:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    if not id(data) < address < id(data) + sys.getsizeof(data):
        return 0  # not the object's own buffer: touch nothing
    first = -(-address // page) * page
    count = (address + len(data) - first) // page
    view = np.frombuffer(data, dtype=np.uint8, count=count * page, offset=first - address)
    zero = ~view.view(np.uint64).reshape(count, page // 8).any(axis=1)
    if not zero.any():
        return 0
    # runs of consecutive zero pages: one madvise call each
    edges = np.flatnonzero(np.diff(np.concatenate(([False], zero, [False])).astype(np.int8)))
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):
        if madvise(first + start * page, (stop - start) * page, _MADV_DONTNEED) == 0:
            released += (stop - start) * page
    return released


@dataclass(frozen=True, eq=False)
class Bundle:
    """An immutable, verified training bundle. Build one with `Bundle.create`.

    Equality and hashing go by `sha256`, which covers every member.
    """

    config: ModelConfig
    vocab_json: dict
    tflite: bytes
    layout: tuple[WeightSpec, ...]
    initial_weights: np.ndarray
    sha256: str

    def __post_init__(self) -> None:
        p = self.config.param_count
        _check_layout(self.layout, p)
        _check_vocab(self.vocab_json, self.config)
        w = self.initial_weights
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.shape != (p,):
            raise BundleError(
                f"initial_weights must be float32[{p}], got "
                f"{getattr(w, 'dtype', type(w).__name__)}{list(getattr(w, 'shape', ()))}"
            )
        if not np.all(np.isfinite(w)):
            raise BundleError("initial_weights contain NaN or infinity")
        if not isinstance(self.tflite, bytes) or self.tflite[4:8] != b"TFL3":
            raise BundleError("model.tflite is not a TFLite flatbuffer (no TFL3 identifier)")
        w.setflags(write=False)  # the bundle's hash covers these bytes
        expected = _sha256(self._manifest_bytes())
        if self.sha256 != expected:
            raise BundleError(
                f"bundle sha256 {self.sha256!r} does not match its contents ({expected!r})"
            )

    # ------------------------------------------------------------------ build
    @classmethod
    def create(
        cls,
        config: ModelConfig,
        vocab_json: dict,
        tflite: bytes,
        initial_weights: np.ndarray,
        layout: tuple[WeightSpec, ...] | None = None,
    ) -> "Bundle":
        """Assemble a bundle and compute its identity."""
        layout = weight_layout(config) if layout is None else tuple(layout)
        weights = np.array(initial_weights, dtype=np.float32, copy=True)
        proto = object.__new__(cls)
        for name, value in (
            ("config", config),
            ("vocab_json", vocab_json),
            ("tflite", bytes(tflite)),
            ("layout", layout),
            ("initial_weights", weights),
        ):
            object.__setattr__(proto, name, value)
        sha = _sha256(proto._manifest_bytes())
        return cls(config, vocab_json, bytes(tflite), layout, weights, sha)

    def with_initial_weights(self, weights: np.ndarray) -> "Bundle":
        """The same graph and vocabulary starting from other weights (a new model id)."""
        return Bundle.create(self.config, self.vocab_json, self.tflite, weights, self.layout)

    # ----------------------------------------------------------------- access
    @property
    def param_count(self) -> int:
        return self.config.param_count

    @property
    def model_id(self) -> str:
        return "cifg-" + self.sha256[:12]

    def split_weights(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (no copies) of a flat weight vector, shaped per the layout."""
        if weights.shape != (self.param_count,):
            raise ValueError(f"expected a flat vector of {self.param_count}, got shape {weights.shape}")
        return {s.name: weights[s.offset : s.offset + s.size].reshape(s.shape) for s in self.layout}

    # --------------------------------------------------------- serialization
    def _member_bytes(self) -> dict[str, bytes | memoryview]:
        return {
            TFLITE: self.tflite,
            VOCAB: _canonical_json(self.vocab_json),
            WEIGHTS: _weights_bytes(self.initial_weights),
        }

    def _manifest_bytes(self) -> bytes:
        members = self._member_bytes()
        manifest = {
            "format": BUNDLE_FORMAT,
            "model": "cifg",
            "config": self.config.to_dict(),
            "param_count": self.config.param_count,
            "layout": [s.to_dict() for s in self.layout],
            "weights_dtype": "<f4",
            "members": {
                name: {"sha256": _sha256(data), "size": len(data)} for name, data in members.items()
            },
        }
        return _canonical_json(manifest)

    def to_bytes(self) -> bytes:
        """Deterministic zip bytes (equal bundles give equal bytes)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            members = {MANIFEST: self._manifest_bytes(), **self._member_bytes()}
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, data, compresslevel=6)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None) -> "Bundle":
        """Parse and verify a bundle; raises `BundleError` saying what is wrong.

        `expected_sha256` (the sha256 of the bundle's BYTES, as a signed model names it) is
        checked before the zip is opened, so a substituted bundle never gets inflated at all.
        """
        if expected_sha256 is not None and _sha256(data) != expected_sha256:
            raise BundleError(f"bundle bytes have sha256 {_sha256(data)[:16]}..., the signed model names "
                              f"{str(expected_sha256)[:16]}...: refusing it unopened")
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError) as exc:
            raise BundleError(f"not a training bundle (not a zip file): {exc}") from exc
        with zf:
            names = set(zf.namelist())
            missing = [m for m in (MANIFEST, *_MEMBERS) if m not in names]
            if missing:
                raise BundleError(f"bundle is missing member(s) {missing}; found {sorted(names)}")
            extra = sorted(names - {MANIFEST, *_MEMBERS})
            if extra:
                raise BundleError(f"bundle has unexpected member(s) {extra}")
            manifest_bytes = _read_member(zf, MANIFEST, None, limit=MAX_MANIFEST_BYTES)
            try:
                manifest = json.loads(manifest_bytes)
            except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4,300+-digit ints, deep nesting
                raise BundleError(f"manifest.json is not valid JSON: {exc}") from exc
            if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
                got = manifest.get("format") if isinstance(manifest, dict) else None
                raise BundleError(f"unsupported bundle format {got!r}; this reader knows {BUNDLE_FORMAT!r}")
            try:
                config = ModelConfig.from_dict(manifest["config"])
                layout = tuple(WeightSpec.from_dict(d) for d in manifest["layout"])
                member_info = manifest["members"]
                _check_layout(layout, config.param_count)  # before anything the manifest sizes is inflated
                declared = {name: int(member_info[name]["size"]) for name in _MEMBERS}
                if sum(declared.values()) > _MAX_INFLATED_BYTES:
                    raise BundleError(f"manifest says the members inflate to {sum(declared.values())} bytes, over "
                                      f"the {_MAX_INFLATED_BYTES}-byte limit")
                if declared[WEIGHTS] != 4 * config.param_count:
                    raise BundleError(f"manifest says weights.f32 is {declared[WEIGHTS]} bytes, "
                                      f"expected 4 * {config.param_count}")
                contents = {}
                for name in _MEMBERS:
                    info = member_info[name]
                    blob = _read_member(zf, name, declared[name])
                    if _sha256(blob) != info["sha256"]:
                        raise BundleError(
                            f"member {name} is corrupt: sha256 {_sha256(blob)} != manifest {info['sha256']}"
                        )
                    contents[name] = blob
            except BundleError:
                raise
            except (KeyError, TypeError, ValueError, OverflowError, NotImplementedError) as exc:
                raise BundleError(f"manifest.json is incomplete or malformed: {exc!r}"[:300]) from exc
        if len(contents[WEIGHTS]) != 4 * config.param_count:
            raise BundleError(
                f"weights.f32 holds {len(contents[WEIGHTS])} bytes, expected 4 * {config.param_count}"
            )
        try:
            vocab_json = json.loads(contents[VOCAB])
        except (ValueError, RecursionError) as exc:
            raise BundleError(f"vocab.json is not valid JSON: {exc}") from exc
        # a read-only view of the member's bytes (no copy) on little-endian machines
        weights = np.frombuffer(contents[WEIGHTS], dtype="<f4")
        if weights.dtype != np.float32:
            weights = weights.astype(np.float32)
        bundle = cls(config, vocab_json, contents[TFLITE], layout, weights, _sha256(manifest_bytes))
        released = release_zero_pages(bundle.tflite)
        logger.debug("bundle %s: %d bytes of zero pages in the graph released", bundle.model_id, released)
        return bundle

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename), so a reader never sees half a bundle."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> "Bundle":
        return read_bundle(path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bundle) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        return (
            f"Bundle(model_id={self.model_id!r}, params={self.param_count}, "
            f"tflite={len(self.tflite)} B, config={self.config})"
        )


def _read_member(zf: zipfile.ZipFile, name: str, expected_size: int | None,
                 limit: int = _MAX_MEMBER_BYTES) -> bytes:
    """A member's bytes, never holding more than min(expected_size, limit) + one chunk.

    zipfile's `read()` inflates a whole member in one call whatever its header claims, so
    the member is read in `_INFLATE_CHUNK` steps and refused as soon as it outgrows its bound.
    """
    bound = limit if expected_size is None else expected_size
    if not 0 <= bound <= limit:
        raise BundleError(f"member {name}: the manifest says {bound} bytes, over the {limit}-byte limit")
    info = zf.getinfo(name)
    if info.file_size > bound:
        what = "the manifest says" if expected_size is not None else "the limit is"
        raise BundleError(f"member {name} claims {info.file_size} bytes, {what} {bound}")
    if expected_size is not None and info.file_size != expected_size:
        raise BundleError(f"member {name} is {info.file_size} bytes but the manifest says {expected_size}")
    parts, held = [], 0
    try:
        with zf.open(info) as handle:
            while chunk := handle.read(_INFLATE_CHUNK):
                held += len(chunk)
                if held > bound:  # only a header that lies gets here: zipfile stops at file_size
                    raise BundleError(f"member {name} inflates past {bound} bytes (a zip bomb?)")
                parts.append(chunk)
    except BundleError:
        raise
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError: a damaged archive
        raise BundleError(f"member {name} cannot be read (damaged archive): {exc}") from exc
    if held != info.file_size:
        raise BundleError(f"member {name} inflates to {held} bytes, its zip header says {info.file_size}")
    return b"".join(parts)


def read_bundle(path: str | Path, *, expected_sha256: str | None = None) -> Bundle:
    """Read and verify a bundle file (at most `MAX_BUNDLE_BYTES`; see `Bundle.from_bytes`)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{path} is larger than {MAX_BUNDLE_BYTES} bytes: not a training bundle")
    try:
        return Bundle.from_bytes(data, expected_sha256=expected_sha256)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc
