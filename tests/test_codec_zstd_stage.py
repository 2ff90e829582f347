"""zstd stage: lossless, and defensive against bombs, trailing data, truncation, corruption."""
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from protocol.codec.zstd_stage import ZstdStage
from protocol.errors import CodecError, Reason


@settings(deadline=None, max_examples=50)
@given(st.binary(max_size=3000), st.sampled_from([1, 3, 19]))
def test_round_trip_is_exact(data, level):
    stage = ZstdStage(level)
    assert stage.decode(stage.encode(data), len(data)) == data


def test_decompression_bomb_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 50_000_000)
    assert len(bomb) < 5000
    with pytest.raises(CodecError) as info:
        ZstdStage().decode(bomb, 10_000)
    assert info.value.reason is Reason.BAD_PAYLOAD and "declares 50000000" in info.value.detail


def test_frames_without_size_or_checksum_are_refused():
    no_size = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True)
    with pytest.raises(CodecError, match="content size"):
        ZstdStage().decode(no_size.compressobj().compress(b"abc" * 100) + no_size.compressobj().flush(), 10**6)
    no_checksum = zstandard.ZstdCompressor(write_checksum=False).compress(b"abc" * 100)
    with pytest.raises(CodecError, match="checksum"):
        ZstdStage().decode(no_checksum, 10**6)


def test_trailing_truncated_and_corrupted_frames_are_refused():
    stage = ZstdStage()
    data = bytes(range(256)) * 20
    frame = stage.encode(data)
    with pytest.raises(CodecError, match="unexpected bytes"):
        stage.decode(frame + b"\x00", len(data))
    with pytest.raises(CodecError, match="unexpected bytes"):
        stage.decode(frame + frame, len(data))
    for cut in (0, 3, 10, len(frame) // 2, len(frame) - 1):
        with pytest.raises(CodecError):
            stage.decode(frame[:cut], len(data))
    corrupted = bytearray(frame)
    corrupted[-1] ^= 0xFF  # the checksum
    with pytest.raises(CodecError):
        stage.decode(bytes(corrupted), len(data))
    with pytest.raises(CodecError, match="not a zstd frame"):
        stage.decode(b"PK\x03\x04 not zstd", 100)


def test_spec_and_levels():
    assert ZstdStage().spec == "zstd" and ZstdStage(19).spec == "zstd:19"
    with pytest.raises(ValueError):
        ZstdStage(0)
