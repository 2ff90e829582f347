import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.envelope import HEADER_SIZE, Envelope, Kind, decode_envelope
from protocol.errors import EnvelopeError, Reason


def sample(**overrides) -> Envelope:
    fields = dict(kind=Kind.UPDATE, fleet="demo", device="dev-1", round=7, base_version=6, example_count=42,
                  codec="q8", meta={"train_loss": 3.5}, payload=bytes(range(256)) * 4)
    fields.update(overrides)
    return Envelope(**fields)


def test_round_trip_keeps_every_field():
    env = sample()
    assert decode_envelope(env.encode()) == env


def test_empty_device_meta_and_payload():
    env = Envelope(Kind.PLAN, "demo", meta={"a": 1})
    assert decode_envelope(env.encode()) == env


@pytest.mark.parametrize("cut", [0, 1, HEADER_SIZE - 1, HEADER_SIZE + 3, -1])
def test_truncated_is_rejected(cut):
    data = sample().encode()
    with pytest.raises(EnvelopeError) as err:
        decode_envelope(data[:cut] if cut >= 0 else data[:-1])
    assert err.value.reason is Reason.TRUNCATED


def test_trailing_bytes_are_rejected():
    with pytest.raises(EnvelopeError, match="unexpected bytes"):
        decode_envelope(sample().encode() + b"x")


def test_flipped_payload_byte_fails_checksum():
    data = bytearray(sample().encode())
    data[-10] ^= 0xFF
    with pytest.raises(EnvelopeError) as err:
        decode_envelope(bytes(data))
    assert err.value.reason is Reason.BAD_CHECKSUM


def test_bad_magic_version_and_kind():
    data = bytearray(sample().encode())
    with pytest.raises(EnvelopeError, match="not a fedboard message"):
        decode_envelope(b"XXXX" + bytes(data[4:]))
    bad_version = bytes(data[:4]) + bytes([99]) + bytes(data[5:])
    with pytest.raises(EnvelopeError) as err:
        decode_envelope(bad_version)
    assert err.value.reason is Reason.BAD_VERSION
    with pytest.raises(EnvelopeError) as err:
        decode_envelope(bytes(data), expect=Kind.PLAN)
    assert err.value.reason is Reason.BAD_KIND


def test_oversized_payload_refused_before_reading():
    data = sample(payload=b"x" * 1000).encode()
    with pytest.raises(EnvelopeError) as err:
        decode_envelope(data, max_payload=999)
    assert err.value.reason is Reason.TOO_LARGE
    # a header that announces a huge payload is refused on its own, even when the bytes are missing
    header = bytearray(data[:HEADER_SIZE])
    struct.pack_into("<I", header, 24, 2**31)
    with pytest.raises(EnvelopeError) as err:
        decode_envelope(bytes(header))
    assert err.value.reason is Reason.TOO_LARGE


def test_invalid_ids_are_refused_on_encode():
    with pytest.raises(EnvelopeError, match="not a valid id"):
        sample(device="a/b").encode()
    with pytest.raises(EnvelopeError, match="round"):
        sample(round=-1).encode()


def test_non_object_meta_is_rejected():
    env = sample(meta={})
    data = bytearray(env.encode())
    # rebuild by hand with a JSON list as metadata
    import zlib

    from protocol import envelope as E

    meta = b"[1,2]"
    header = bytearray(E._FIXED.pack(E.MAGIC, 1, Kind.UPDATE, 0, 1, 1, 1, len(meta), 0, 0, 4, 0, 0, 0))
    body = b"demo" + meta
    crc = zlib.crc32(body, zlib.crc32(bytes(header)))
    struct.pack_into("<I", header, E._CRC_OFFSET, crc)
    with pytest.raises(EnvelopeError, match="JSON object"):
        decode_envelope(bytes(header) + body)
    assert data  # the original still decodes
    decode_envelope(bytes(data))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_envelope_error(blob):
    try:
        decode_envelope(blob)
    except EnvelopeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_any_single_byte_corruption_is_detected(pos, value):
    data = bytearray(sample().encode())
    pos %= len(data)
    if data[pos] == value:
        return
    data[pos] = value
    with pytest.raises(EnvelopeError):
        decode_envelope(bytes(data))


# -- found by bench/fuzz_campaign.py ---------------------------------------------------------------
def _with_meta(meta: bytes) -> bytes:
    """A CHECKIN envelope whose metadata block is `meta`, with its lengths and CRC made valid."""
    import zlib

    env = bytearray(Envelope(Kind.CHECKIN, "f", "d", meta={"a": 1}).encode())
    head = list(struct.unpack_from("<4sBBHIIIIII4B", env, 0))
    ids = bytes(env[HEADER_SIZE:HEADER_SIZE + head[10] + head[11] + head[12]])
    head[7], head[9] = len(meta), 0
    header = bytearray(struct.pack("<4sBBHIIIIII4B", *head))
    crc = zlib.crc32(ids + meta, zlib.crc32(header))
    header[HEADER_SIZE - 8:HEADER_SIZE - 4] = struct.pack("<I", crc)
    return bytes(header) + ids + meta


@pytest.mark.parametrize("meta", [b'{"a":' + b"9" * 5000 + b"}",  # int() refuses 4,300+ digits: ValueError
                                  b'{"a":' + b"[" * 7000 + b"]" * 7000 + b"}"])  # RecursionError (TF raises the limit to 3,000)
def test_metadata_json_that_breaks_the_json_module_is_an_envelope_error(meta):
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(_with_meta(meta))
    assert info.value.reason is Reason.BAD_FIELD and "metadata is not valid JSON" in str(info.value)
