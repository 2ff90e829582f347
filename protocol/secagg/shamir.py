"""Shamir t-of-n secret sharing of short byte strings over GF(2^127 - 1).

Why this field: 2^127 - 1 is a Mersenne prime, so Python's big ints reduce modulo it fast,
and 15-byte chunks (120 bits) fit below it with room to spare. A 32-byte secret (an X25519
private key, a self-mask seed) is cut into 3 chunks (15 + 15 + 2 bytes); each chunk is the
constant term of its own random polynomial of degree t - 1, and a share holds the value of
every chunk's polynomial at the share's x. Any t shares give the secret back (Lagrange
interpolation at 0); t - 1 shares are independent of it (information-theoretic).

Shares are the points x = 1, 2, ..., n (the devices' positions in the sorted key roster);
x = 0 would be the secret itself and is refused.

Coefficients come from `secrets` (the OS CSPRNG). Everything is plain Python ints: a round of
50 devices shares 100 secrets of 3 chunks at 50 points, about 10^5 multiplications; the
Lagrange weights depend only on the set of x's, so `Reconstructor` computes them once for all
the secrets of a round.
"""
from __future__ import annotations

import secrets as _secrets
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import Reason
from protocol.secagg.errors import format_error, trust_error

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15
ELEMENT_BYTES = 16
MAX_X = 0xFFFF
MAX_SECRET_BYTES = 255


def chunk_count(length: int) -> int:
    """Field elements needed for a secret of ``length`` bytes."""
    return -(-length // CHUNK_BYTES)


@dataclass(frozen=True)
class Share:
    """One point of every chunk polynomial: ``values[i] = f_i(x)``."""

    x: int
    values: tuple[int, ...]

    def to_bytes(self) -> bytes:
        """u16 x, u8 chunk count, then 16 little-endian bytes per value."""
        head = self.x.to_bytes(2, "little") + bytes((len(self.values),))
        return head + b"".join(v.to_bytes(ELEMENT_BYTES, "little") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes, *, chunks: int | None = None) -> Share:
        """Strict parse; `SecAggFormatError` if the bytes are not one share (of ``chunks``)."""
        data = bytes(data)
        if len(data) < 3:
            raise format_error(Reason.TRUNCATED, f"a share needs at least 3 bytes, got {len(data)}")
        x = int.from_bytes(data[:2], "little")
        count = data[2]
        if chunks is not None and count != chunks:
            raise format_error(Reason.BAD_FIELD, f"share has {count} chunks, expected {chunks}")
        if len(data) != 3 + ELEMENT_BYTES * count:
            raise format_error(Reason.TRUNCATED if len(data) < 3 + ELEMENT_BYTES * count else Reason.BAD_FIELD,
                               f"share of {count} chunks must be {3 + ELEMENT_BYTES * count} bytes, got {len(data)}")
        if not 1 <= x <= MAX_X:
            raise format_error(Reason.BAD_FIELD, f"share x={x} is outside 1..{MAX_X}")
        values = tuple(int.from_bytes(data[3 + i * ELEMENT_BYTES: 3 + (i + 1) * ELEMENT_BYTES], "little")
                       for i in range(count))
        if any(v >= PRIME for v in values):
            raise format_error(Reason.BAD_FIELD, "share value is not an element of GF(2^127 - 1)")
        return cls(x, values)


def _chunks(secret: bytes) -> list[int]:
    return [int.from_bytes(secret[i:i + CHUNK_BYTES], "little") for i in range(0, len(secret), CHUNK_BYTES)]


def _check_threshold(threshold: int, n: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    if threshold > n:
        raise ValueError(f"threshold {threshold} is more than the {n} shares: the secret could never be recovered")


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError(f"share points must be distinct, got {list(xs)}")
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_X:
            raise ValueError(f"share points must be ints in 1..{MAX_X}, got {x!r}")


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at the points ``xs``: any ``threshold`` of them recover it."""
    secret = bytes(secret)
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(xs)
    _check_xs(xs)
    _check_threshold(threshold, len(xs))
    polys = [[c] + [_secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in _chunks(secret)]
    shares = []
    for x in xs:
        values = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % PRIME
            values.append(acc)
        shares.append(Share(x, tuple(values)))
    return shares


def lagrange_weights(xs: Sequence[int], at: int = 0) -> list[int]:
    """Weights w_i with f(at) = sum w_i f(x_i) for every polynomial of degree < len(xs)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return weights


class Reconstructor:
    """Recovers many secrets shared at the same points, checking every extra share.

    The first ``threshold`` points (sorted) interpolate; every further point must agree with
    that polynomial, otherwise someone sent a wrong share and `SecAggTrustError` says so
    (with exactly ``threshold`` shares a wrong one cannot be detected, only a wrong result).
    """

    def __init__(self, xs: Sequence[int], threshold: int) -> None:
        xs = sorted(xs)
        _check_xs(xs)
        _check_threshold(threshold, len(xs))
        self.threshold = threshold
        self.base = xs[:threshold]
        self.extra = xs[threshold:]
        self._at_zero = lagrange_weights(self.base, 0)
        self._at_extra = [lagrange_weights(self.base, x) for x in self.extra]

    def recover(self, shares: Sequence[Share], length: int, *, what: str = "secret") -> bytes:
        """The ``length``-byte secret from shares at exactly this reconstructor's points."""
        by_x = {s.x: s for s in shares}
        if len(by_x) != len(shares) or sorted(by_x) != sorted(self.base + self.extra):
            raise ValueError(f"shares are at points {sorted(s.x for s in shares)}, "
                             f"the reconstructor was built for {sorted(self.base + self.extra)}")
        chunks = chunk_count(length)
        for s in shares:
            if len(s.values) != chunks:
                raise format_error(Reason.BAD_FIELD, f"share of {what} at x={s.x} has {len(s.values)} chunks, "
                                                     f"a {length}-byte secret has {chunks}")
        out = bytearray()
        for c in range(chunks):
            ys = [by_x[x].values[c] for x in self.base]
            value = sum(w * y for w, y in zip(self._at_zero, ys)) % PRIME
            for x, weights in zip(self.extra, self._at_extra):
                if sum(w * y for w, y in zip(weights, ys)) % PRIME != by_x[x].values[c]:
                    raise trust_error(f"the shares of {what} do not lie on one polynomial (the share at x={x} "
                                      "disagrees): a device sent a wrong share")
            size = min(CHUNK_BYTES, length - c * CHUNK_BYTES)
            if value >> (8 * size):
                raise trust_error(f"the shares of {what} reconstruct to a value that is not a {length}-byte secret")
            out += value.to_bytes(size, "little")
        return bytes(out)


def recover_secret(shares: Sequence[Share], threshold: int, length: int) -> bytes:
    """Recover a ``length``-byte secret from at least ``threshold`` shares (all are checked)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares are fewer than the threshold {threshold}")
    return Reconstructor([s.x for s in shares], threshold).recover(shares, length)
