import itertools
import os

import pytest

from protocol.errors import ProtocolError
from protocol.secagg.errors import SecAggFormatError, SecAggTrustError
from protocol.secagg.shamir import (
    PRIME, Reconstructor, Share, chunk_count, lagrange_weights, recover_secret, split_secret,
)


def test_any_threshold_subset_recovers_a_32_byte_secret():
    secret = os.urandom(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]
    assert all(len(s.values) == chunk_count(32) == 3 for s in shares)
    for subset in itertools.combinations(shares, 3):
        assert recover_secret(list(subset), 3, 32) == secret
    assert recover_secret(shares, 3, 32) == secret  # extra shares are checked, not ignored


def test_fewer_than_threshold_shares_say_nothing_about_the_secret():
    # With t-1 shares, every secret is consistent: build the polynomial through them and any secret.
    a, b = os.urandom(15), os.urandom(15)
    share_a = split_secret(a, 2, [1, 2])[0]  # one share of a 2-of-n sharing
    # For any candidate secret b there is a line through (0, b) and share_a: so share_a fits b too.
    w = lagrange_weights([0, share_a.x], at=2)
    fake_other = (w[0] * int.from_bytes(b, "little") + w[1] * share_a.values[0]) % PRIME
    assert recover_secret([share_a, Share(2, (fake_other,))], 2, 15) == b


def test_odd_lengths_and_edge_values_round_trip():
    for secret in (b"\x00", b"\xff" * 15, b"\xff" * 16, bytes(range(200))):
        shares = split_secret(secret, 2, [7, 9, 11])
        assert recover_secret(shares[1:], 2, len(secret)) == secret


def test_a_wrong_extra_share_is_detected():
    shares = split_secret(os.urandom(32), 3, [1, 2, 3, 4])
    bad = Share(4, ((shares[3].values[0] + 1) % PRIME,) + shares[3].values[1:])
    with pytest.raises(SecAggTrustError):
        recover_secret(shares[:3] + [bad], 3, 32)


def test_reconstructor_reuses_weights_across_secrets():
    secrets_ = [os.urandom(32) for _ in range(5)]
    xs = [3, 5, 8, 13]
    rebuild = Reconstructor(xs, 3)
    for s in secrets_:
        assert rebuild.recover(split_secret(s, 3, xs), 32) == s


def test_share_bytes_round_trip_and_strict_parse():
    share = split_secret(os.urandom(32), 2, [1, 2])[1]
    raw = share.to_bytes()
    assert Share.from_bytes(raw, chunks=3) == share
    for cut in range(len(raw)):
        with pytest.raises(SecAggFormatError):
            Share.from_bytes(raw[:cut])
    with pytest.raises(SecAggFormatError):
        Share.from_bytes(raw + b"\0")
    with pytest.raises(SecAggFormatError):
        Share.from_bytes(raw, chunks=2)
    with pytest.raises(SecAggFormatError):  # x = 0 would be the secret itself
        Share.from_bytes(b"\0\0" + raw[2:])
    with pytest.raises(SecAggFormatError):  # value outside the field
        Share.from_bytes(raw[:3] + (PRIME).to_bytes(16, "little") + raw[19:])
    assert issubclass(SecAggFormatError, ProtocolError)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError):
        split_secret(b"x", 4, [1, 2, 3])
    with pytest.raises(ValueError):
        split_secret(b"x", 2, [1, 1])
    with pytest.raises(ValueError):
        split_secret(b"x", 2, [0, 1])
    with pytest.raises(ValueError):
        recover_secret(split_secret(b"x", 2, [1, 2])[:1], 2, 1)
