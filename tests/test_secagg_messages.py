import numpy as np
import pytest

from protocol.errors import Reason
from protocol.secagg.errors import SecAggFormatError
from protocol.secagg.messages import (
    AdvertiseKeys, KeyRoster, MaskedInput, MessageType, ShareBundle, ShareKeys, UnmaskRequest, UnmaskResponse,
    decode_message, decode_share_plaintext, encode_share_plaintext, message_type,
)
from protocol.secagg.params import SecAggParams

PARAMS = SecAggParams(round_id=4, dim=6, threshold=2, max_clients=3, bits=16, value_range=0.5)


def _adv(device, round_id=4, signed=False):
    return AdvertiseKeys(round_id, device, bytes([1]) * 32, bytes([2]) * 32, b"s" * 64 if signed else b"")


def _examples():
    return [
        _adv("dev-a", signed=True),
        KeyRoster(PARAMS, (_adv("a"), _adv("b", signed=True), _adv("c"))),
        ShareKeys(4, "a", {"b": b"x" * 130, "c": b"y" * 130}),
        ShareBundle(4, "b", {"a": b"x" * 130, "c": b"z" * 130}),
        MaskedInput(4, "a", 16, np.array([0, 1, 65535, 7, 8, 9], dtype=np.uint32)),
        UnmaskRequest(4, ("a", "c")),
        UnmaskResponse(4, "a", {"a": b"m" * 51, "c": b"n" * 51}, {"b": b"k" * 51}),
    ]


def test_every_message_round_trips_and_names_its_type():
    for msg in _examples():
        data = msg.to_bytes()
        again = type(msg).from_bytes(data)
        assert again.to_bytes() == data
        assert type(decode_message(data)) is type(msg)
        assert message_type(data).name.replace("_", "").lower() == type(msg).__name__.lower()
    masked = MaskedInput.from_bytes(_examples()[4].to_bytes())
    assert masked.values.dtype == np.uint32 and masked.values.tolist() == [0, 1, 65535, 7, 8, 9]
    assert len(_examples()[4].to_bytes()) == 10 + 2 + 5 + 6 * 2  # header, id, bits+count, 2 bytes a value


def test_every_truncation_and_any_trailing_byte_is_a_format_error():
    for msg in _examples():
        data = msg.to_bytes()
        for cut in range(len(data)):
            with pytest.raises(SecAggFormatError):
                type(msg).from_bytes(data[:cut])
        with pytest.raises(SecAggFormatError):
            type(msg).from_bytes(data + b"\0")


def test_header_checks():
    data = _examples()[0].to_bytes()
    with pytest.raises(SecAggFormatError) as info:
        AdvertiseKeys.from_bytes(b"XXXX" + data[4:])
    assert info.value.reason is Reason.BAD_MAGIC
    with pytest.raises(SecAggFormatError) as info:
        AdvertiseKeys.from_bytes(data[:4] + b"\x09" + data[5:])
    assert info.value.reason is Reason.BAD_VERSION
    with pytest.raises(SecAggFormatError) as info:
        ShareKeys.from_bytes(data)  # an AdvertiseKeys where ShareKeys was expected
    assert info.value.reason is Reason.BAD_KIND
    with pytest.raises(SecAggFormatError):
        decode_message(data[:5] + bytes([99]) + data[6:])
    with pytest.raises(SecAggFormatError):
        decode_message("not bytes")  # type: ignore[arg-type]


def test_malformed_bodies_are_refused():
    # masked value at or above 2^bits
    data = bytearray(MaskedInput(4, "a", 12, np.array([1, 2], np.uint32)).to_bytes())
    data[-2:] = (4096).to_bytes(2, "little")
    with pytest.raises(SecAggFormatError):
        MaskedInput.from_bytes(bytes(data))
    with pytest.raises(SecAggFormatError) as info:
        MaskedInput.from_bytes(_examples()[4].to_bytes(), expect_dim=7)
    assert info.value.reason is Reason.WRONG_SIZE
    # unsorted or repeated ids
    req = bytearray(UnmaskRequest(4, ("a", "b")).to_bytes())
    req[-1:], req[-3:-2] = b"a", b"b"
    with pytest.raises(SecAggFormatError):
        UnmaskRequest.from_bytes(bytes(req))
    # an id that is not a valid device id
    bad = bytearray(_adv("dev-a").to_bytes())
    bad[11] = ord("/")
    with pytest.raises(SecAggFormatError):
        AdvertiseKeys.from_bytes(bytes(bad))
    # a signature of the wrong length
    raw = bytearray(_adv("d").to_bytes())
    raw[-1] = 3
    with pytest.raises(SecAggFormatError):
        AdvertiseKeys.from_bytes(bytes(raw) + b"abc")


def test_writers_refuse_what_could_not_be_parsed():
    with pytest.raises(SecAggFormatError):
        AdvertiseKeys(1, "a", b"short", bytes(32)).to_bytes()
    with pytest.raises(SecAggFormatError):
        AdvertiseKeys(1, "bad id", bytes(32), bytes(32)).to_bytes()
    with pytest.raises(SecAggFormatError):
        MaskedInput(1, "a", 8, np.array([256])).to_bytes()
    with pytest.raises(SecAggFormatError):
        KeyRoster(PARAMS, (_adv("a", round_id=5),)).to_bytes()
    with pytest.raises(SecAggFormatError):
        ShareKeys(2**32, "a").to_bytes()


def test_share_plaintext_round_trip():
    plain = encode_share_plaintext("a", "b", b"k" * 51, b"m" * 51)
    assert decode_share_plaintext(plain) == ("a", "b", b"k" * 51, b"m" * 51)
    with pytest.raises(SecAggFormatError):
        decode_share_plaintext(plain[:-1])
    assert MessageType.MASKED_INPUT == 5
