"""`zstd` / `zstd:level`: lossless entropy coding of the whole payload, always the last stage.

Frames are written with their content size and a 4-byte checksum. Decoding is defensive:
the frame must declare its size, the size must not exceed what this codec can produce for
the expected vector (the caller's bound), the frame must end exactly at the end of the data
and the checksum must match. So a hostile frame cannot make the server allocate more than
the bound (a decompression bomb) or hide trailing bytes.
"""
from __future__ import annotations

import threading

import zstandard

from protocol.codec.container import bad_payload, truncated
from protocol.codec.stages import ByteCoder
from protocol.errors import CodecError, Reason

DEFAULT_LEVEL = 3
MIN_LEVEL = 1
MAX_LEVEL = 22
_FRAME_HEADER_MIN = 6  # magic (4) + frame header descriptor + at least one more byte


class ZstdStage(ByteCoder):
    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        if not MIN_LEVEL <= level <= MAX_LEVEL:
            raise ValueError(f"zstd level must be {MIN_LEVEL}..{MAX_LEVEL}, got {level}")
        self.level = level
        self._local = threading.local()  # zstd contexts are not thread-safe; reuse per thread

    @property
    def spec(self) -> str:
        return "zstd" if self.level == DEFAULT_LEVEL else f"zstd:{self.level}"

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
            self._local.cctx = cctx
        return cctx

    def encode(self, data: bytes) -> bytes:
        return self._compressor().compress(data)

    def decode(self, data: bytes, max_len: int) -> bytes:
        if len(data) < _FRAME_HEADER_MIN:
            raise truncated("zstd frame header", _FRAME_HEADER_MIN, len(data))
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise bad_payload(f"not a zstd frame: {exc}") from None
        size = params.content_size
        if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
            raise bad_payload("zstd frame does not declare its content size")
        if size > max_len:
            raise bad_payload(f"zstd frame declares {size} bytes, more than the {max_len} this codec "
                              "can produce for the expected vector size")
        if params.window_size > max(1 << 20, 2 * max_len):
            raise bad_payload(f"zstd frame asks for a {params.window_size}-byte window")
        if not params.has_checksum:
            raise bad_payload("zstd frame has no checksum")
        dobj = zstandard.ZstdDecompressor().decompressobj(write_size=max(size, 1))
        try:
            out = dobj.decompress(data)
        except zstandard.ZstdError as exc:
            raise bad_payload(f"zstd frame does not decompress: {exc}") from None
        if not dobj.eof:
            raise CodecError(Reason.TRUNCATED, "zstd frame is cut short")
        if dobj.unused_data:
            raise bad_payload(f"{len(dobj.unused_data)} unexpected bytes after the zstd frame")
        if len(out) != size:
            raise bad_payload(f"zstd frame declared {size} bytes and produced {len(out)}")
        return out
