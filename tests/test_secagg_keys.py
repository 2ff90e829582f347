import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.secagg import keys as K
from protocol.secagg.errors import SecAggFormatError, SecAggTrustError


def test_agreement_is_symmetric_and_bound_to_purpose_round_and_pair():
    a, b = K.KeyPair.generate(), K.KeyPair.generate()
    ab = K.agree(a.private, b.public, purpose=K.PURPOSE_MASK, round_id=3, a="alice", b="bob")
    ba = K.agree(b.private, a.public, purpose=K.PURPOSE_MASK, round_id=3, a="bob", b="alice")
    assert ab == ba and len(ab) == 32
    assert ab != K.agree(a.private, b.public, purpose=K.PURPOSE_ENCRYPT, round_id=3, a="alice", b="bob")
    assert ab != K.agree(a.private, b.public, purpose=K.PURPOSE_MASK, round_id=4, a="alice", b="bob")
    assert ab != K.agree(a.private, b.public, purpose=K.PURPOSE_MASK, round_id=3, a="alice", b="carol")


def test_private_key_round_trips_through_raw_bytes():
    pair = K.KeyPair.generate()
    again = K.KeyPair.from_private_bytes(pair.private_bytes())
    assert again.public == pair.public
    with pytest.raises(SecAggFormatError):
        K.KeyPair.from_private_bytes(b"short")


def test_low_order_public_key_is_refused():
    pair = K.KeyPair.generate()
    with pytest.raises(SecAggTrustError):
        K.agree(pair.private, bytes(32), purpose=K.PURPOSE_MASK, round_id=1, a="a", b="b")
    with pytest.raises(SecAggFormatError):
        K.agree(pair.private, b"\x01" * 31, purpose=K.PURPOSE_MASK, round_id=1, a="a", b="b")


def test_share_encryption_authenticates_content_and_binding():
    key = bytes(range(32))
    aad = K.share_aad(5, "alice", "bob")
    blob = K.encrypt(key, b"shares", aad)
    assert K.decrypt(key, blob, aad, what="x") == b"shares"
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad_blob, bad_aad in ((flipped, aad), (blob, K.share_aad(5, "alice", "carol")),
                              (blob, K.share_aad(6, "alice", "bob"))):
        with pytest.raises(SecAggTrustError):
            K.decrypt(key, bad_blob, bad_aad, what="x")
    with pytest.raises(SecAggFormatError):
        K.decrypt(key, blob[:20], aad, what="x")


def test_advertisement_signatures():
    identity = Ed25519PrivateKey.generate()
    c, s = K.KeyPair.generate().public, K.KeyPair.generate().public
    sig = K.sign_advertisement(identity, 9, "dev-1", c, s)
    K.verify_advertisement(identity.public_key(), 9, "dev-1", c, s, sig)
    for args in ((10, "dev-1", c, s), (9, "dev-2", c, s), (9, "dev-1", s, c)):
        with pytest.raises(SecAggTrustError):
            K.verify_advertisement(identity.public_key(), *args, sig)
    with pytest.raises(SecAggTrustError):
        K.verify_advertisement(identity.public_key(), 9, "dev-1", c, s, b"")
