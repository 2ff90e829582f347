import pytest

from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.errors import EnvelopeError
from protocol.model_message import ModelMessage


def test_round_trip():
    msg = ModelMessage("demo", 5, "f16", b"manifest-bytes", b"\x01\x02" * 100, base_version=4)
    back = ModelMessage.from_envelope(decode_envelope(msg.to_envelope().encode()))
    assert back == msg


def test_manifest_length_beyond_payload_refused():
    env = Envelope(Kind.MODEL, "demo", base_version=1, codec="f32", payload=b"\xff\xff\x00\x00abc")
    with pytest.raises(EnvelopeError, match="does not fit"):
        ModelMessage.from_envelope(env)


def test_wrong_kind_refused():
    with pytest.raises(EnvelopeError):
        ModelMessage.from_envelope(Envelope(Kind.UPDATE, "demo", payload=b"\0\0\0\0"))
