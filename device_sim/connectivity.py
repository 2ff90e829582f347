"""Which link a device has: wired / wifi / cellular / offline as a continuous-time Markov chain.

A scenario states what people think in: the share of time on each link (the "network mix",
optionally a different one at night, when phones sit on home wifi) and how long one stay on a
link lasts on average. `build_chain` turns that into jump probabilities whose long-run time
shares are exactly the stated ones. Dwell times are kept too, unless they contradict the
shares (a link would need more visits than all other links together can separate): then that
link's stays are lengthened, never the shares changed.

The chain is generated per local day from (seed, device, day), carrying the state across
midnight; exponential stays are memoryless, so cutting them at regime changes and midnights
changes nothing statistically. Only the latest days are kept; older ones are regenerated on
demand.
"""
from __future__ import annotations

import bisect
import functools
import logging
import math
from dataclasses import dataclass, fields

import numpy as np

from device_sim.clock import local_day, local_to_sim
from device_sim.timeline import Stream, device_rng

log = logging.getLogger(__name__)

LINKS = ("wired", "wifi", "cellular", "offline")
WIRED, WIFI, CELLULAR, OFFLINE = range(4)


@dataclass(frozen=True)
class PerLink:
    """One number per link kind (a share, a dwell time, a bandwidth...)."""

    wired: float = 0.0
    wifi: float = 0.0
    cellular: float = 0.0
    offline: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))

    def values(self) -> tuple[float, float, float, float]:
        return (self.wired, self.wifi, self.cellular, self.offline)

    def __getitem__(self, link: int) -> float:
        return self.values()[link]


def _check_shares(name: str, shares: PerLink) -> None:
    total = sum(shares.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name} shares must sum to 1, got {total:.6g} "
                         f"({', '.join(f'{k}={v:g}' for k, v in zip(LINKS, shares.values()) if v)})")


@dataclass(frozen=True)
class NetworkSpec:
    """The link mix of one kind of device.

    `day` / `night`: share of time on each link (each sums to 1); `night` applies in local
    hours [night_start_h, night_end_h) (wrapping midnight) and defaults to `day`.
    `dwell_min`: mean length of one stay on a link. `bandwidth_mbps` / `latency_ms`: per link;
    each device draws a lifelong bandwidth factor, lognormal with `bandwidth_sigma`.
    Cellular is metered; wired and wifi are not.
    """

    day: PerLink = PerLink(wifi=0.5, cellular=0.45, offline=0.05)
    night: PerLink | None = None
    night_start_h: float = 23.0
    night_end_h: float = 7.0
    dwell_min: PerLink = PerLink(wired=720.0, wifi=60.0, cellular=45.0, offline=10.0)
    bandwidth_mbps: PerLink = PerLink(wired=100.0, wifi=30.0, cellular=10.0, offline=0.0)
    latency_ms: PerLink = PerLink(wired=5.0, wifi=20.0, cellular=60.0, offline=0.0)
    bandwidth_sigma: float = 0.5

    def __post_init__(self) -> None:
        _check_shares("day", self.day)
        if self.night is not None:
            _check_shares("night", self.night)
        for name in ("night_start_h", "night_end_h"):
            if not 0.0 <= getattr(self, name) <= 24.0:
                raise ValueError(f"{name} must be an hour in [0, 24], got {getattr(self, name)}")
        if not self.bandwidth_sigma >= 0:
            raise ValueError(f"bandwidth_sigma must be >= 0, got {self.bandwidth_sigma}")
        for link, name in enumerate(LINKS):
            used = self.day[link] > 0 or (self.night is not None and self.night[link] > 0)
            if used and not self.dwell_min[link] > 0:
                raise ValueError(f"dwell_min.{name} must be > 0 because {name} has a share of time")
            if used and link != OFFLINE and not self.bandwidth_mbps[link] > 0:
                raise ValueError(f"bandwidth_mbps.{name} must be > 0 because {name} has a share of time")

    def regimes(self) -> list[tuple[float, float, PerLink]]:
        """[(from_h, to_h, shares)] covering one local day [0, 24)."""
        if self.night is None or self.night_start_h == self.night_end_h:
            return [(0.0, 24.0, self.day)]
        cuts = sorted({0.0, 24.0, self.night_start_h, self.night_end_h})
        out = []
        for a, b in zip(cuts, cuts[1:]):
            mid = (a + b) / 2
            if self.night_start_h > self.night_end_h:
                night = mid >= self.night_start_h or mid < self.night_end_h
            else:
                night = self.night_start_h <= mid < self.night_end_h
            out.append((a, b, self.night if night else self.day))
        return out

    def long_run_shares(self) -> PerLink:
        """Share of a whole day on each link (day and night regimes weighted by their hours)."""
        total = np.zeros(4)
        for a, b, shares in self.regimes():
            total += (b - a) / 24.0 * np.array(shares.values())
        return PerLink(*total.tolist())


@dataclass(frozen=True)
class Chain:
    """A CTMC over the links: time shares, effective mean stays (s), jump probabilities.

    The `*_row(s)` tuples are the same numbers as plain floats, for fast sampling in loops.
    """

    shares: np.ndarray
    mean_stay_s: np.ndarray
    jump: np.ndarray
    lengthened: tuple[str, ...]
    share_row: tuple[float, ...]
    jump_rows: tuple[tuple[float, ...], ...]
    stay_row: tuple[float, ...]

    def sample_share(self, u: float) -> int:
        return min(bisect.bisect_right(self.share_row, u), 3)

    def sample_jump(self, state: int, u: float) -> int:
        return min(bisect.bisect_right(self.jump_rows[state], u), 3)


@functools.lru_cache(maxsize=256)
def build_chain(shares: PerLink, dwell_min: PerLink) -> Chain:
    """The chain whose long-run time shares equal `shares` and whose stays last `dwell_min`.

    Visit rates f_i = share_i / dwell_i must form a symmetric flow (every stay ends by moving
    to another link): we look for a symmetric M with zero diagonal and row sums f (Sinkhorn
    scaling), and jump i -> j with probability M_ij / f_i. If one link needs at least as many
    visits as all others together, the others all return to it and its stays are lengthened
    until the flow balances.
    """
    pi = np.array(shares.values(), dtype=float)
    stay = np.array(dwell_min.values(), dtype=float) * 60.0
    active = np.flatnonzero(pi > 0)
    jump = np.zeros((4, 4))
    lengthened: list[str] = []
    if len(active) == 1:
        stay = np.where(pi > 0, math.inf, stay)
    else:
        f = np.zeros(4)
        f[active] = pi[active] / stay[active]
        top = int(active[np.argmax(f[active])])
        rest = f.sum() - f[top]
        if f[top] >= rest * (1 - 1e-9):
            if f[top] > rest * (1 + 1e-9):
                lengthened.append(LINKS[top])
                log.debug("network mix %s: %s stays lengthened from %.1f to %.1f min to keep the shares",
                          shares, LINKS[top], stay[top] / 60, pi[top] / rest / 60)
            stay[top] = pi[top] / rest
            for j in active:
                if j != top:
                    jump[top, j] = f[j] / rest
                    jump[j, top] = 1.0
        else:
            m = np.outer(f, f)
            np.fill_diagonal(m, 0.0)
            for _ in range(100_000):
                rows = m.sum(axis=1)
                err = np.max(np.abs(rows[active] - f[active]) / f[active])
                if err < 1e-12:
                    break
                scale = np.zeros(4)
                scale[active] = np.sqrt(f[active] / rows[active])
                m *= np.outer(scale, scale)
            jump[active] = m[active] / m[active].sum(axis=1, keepdims=True)
    cum_jump = np.cumsum(jump, axis=1)
    cum_jump[:, -1] = 1.0
    cum_shares = np.cumsum(pi)
    cum_shares[-1] = 1.0
    for array in (pi, stay, jump):
        array.setflags(write=False)
    return Chain(pi, stay, jump, tuple(lengthened), tuple(cum_shares.tolist()),
                 tuple(tuple(row) for row in cum_jump.tolist()), tuple(stay.tolist()))


def stationary_time_shares(chain: Chain) -> np.ndarray:
    """Time shares implied by the chain's jumps and stays (a check on `build_chain`)."""
    active = np.flatnonzero(chain.shares > 0)
    if len(active) == 1:
        out = np.zeros(4)
        out[active] = 1.0
        return out
    p = chain.jump[np.ix_(active, active)]
    w, v = np.linalg.eig(p.T)
    nu = np.real(v[:, np.argmin(np.abs(w - 1))])
    nu = nu / nu.sum()
    time = nu * chain.mean_stay_s[active]
    out = np.zeros(4)
    out[active] = time / time.sum()
    return out


class _Draws:
    """Uniform and exponential variates drawn from one Generator in blocks (fast in loops);
    the sequence is fixed by the Generator's seed, so it is as deterministic as single draws."""

    __slots__ = ("_rng", "_u", "_e", "_i", "_j")

    def __init__(self, rng: np.random.Generator, block: int = 64) -> None:
        self._rng = rng
        self._u = rng.random(block).tolist()
        self._e = rng.standard_exponential(block).tolist()
        self._i = self._j = 0

    def uniform(self) -> float:
        if self._i == len(self._u):
            self._u, self._i = self._rng.random(len(self._u)).tolist(), 0
        self._i += 1
        return self._u[self._i - 1]

    def exponential(self) -> float:
        if self._j == len(self._e):
            self._e, self._j = self._rng.standard_exponential(len(self._e)).tolist(), 0
        self._j += 1
        return self._e[self._j - 1]


DayTrack = tuple[np.ndarray, np.ndarray]  # (times float64, link int8): link from times[i] on


class ConnectivityModel:
    """The link of one device over time: `link_at(t)`, `changes(t0, t1)`."""

    __slots__ = ("spec", "seed", "index", "offset_s", "origin_day", "_days", "_next_day", "_next_state")

    def __init__(self, spec: NetworkSpec, seed: int, index: int, utc_offset_s: float, origin_s: float) -> None:
        self.spec = spec
        self.seed = seed
        self.index = index
        self.offset_s = utc_offset_s
        self.origin_day = local_day(origin_s, utc_offset_s)
        self._days: dict[int, DayTrack] = {}
        self._next_day = self.origin_day
        self._next_state = -1  # drawn on the origin day

    def _generate(self, day: int, state: int) -> tuple[DayTrack, int]:
        draws = _Draws(device_rng(self.seed, self.index, Stream.NETWORK, day))
        regimes = self.spec.regimes()
        if state < 0:
            state = build_chain(regimes[0][2], self.spec.dwell_min).sample_share(draws.uniform())
        times = [local_to_sim(day, 0.0, self.offset_s)]
        links = [state]
        for from_h, to_h, shares in regimes:
            chain = build_chain(shares, self.spec.dwell_min)
            t = local_to_sim(day, from_h, self.offset_s)
            end = local_to_sim(day, to_h, self.offset_s)
            if chain.shares[state] == 0:  # this link does not exist in the new regime
                state = chain.sample_share(draws.uniform())
                times.append(t)
                links.append(state)
            stays = chain.stay_row
            while True:
                stay = stays[state]
                if stay == math.inf:
                    break
                t += stay * draws.exponential()
                if t >= end:
                    break
                state = chain.sample_jump(state, draws.uniform())
                times.append(t)
                links.append(state)
        track = (np.array(times, dtype=np.float64), np.array(links, dtype=np.int8))
        return track, state

    def day(self, day: int) -> DayTrack:
        """The link track of local day `day`: the link at local midnight, then every change."""
        hit = self._days.get(day)
        if hit is not None:
            return hit
        if day < self.origin_day:
            first = self.day(self.origin_day)
            return (np.array([local_to_sim(day, 0.0, self.offset_s)]), first[1][:1])
        if day < self._next_day:  # an old day that was evicted: replay from the origin
            state = -1
            for d in range(self.origin_day, day + 1):
                track, state_out = self._generate(d, state)
                state = state_out
            return track
        track = None
        while self._next_day <= day:
            track, self._next_state = self._generate(self._next_day, self._next_state)
            if len(self._days) >= 3:
                self._days.pop(next(iter(self._days)))
            self._days[self._next_day] = track
            self._next_day += 1
        assert track is not None
        return track

    def link_at(self, t: float) -> int:
        times, links = self.day(local_day(t, self.offset_s))
        i = int(times.searchsorted(t, side="right")) - 1
        return int(links[max(i, 0)])

    def first_change(self, t0: float, t1: float) -> tuple[float, int] | None:
        """The first (t, new link) with t0 < t < t1, or None; stops at the first day that has one."""
        prev = self.link_at(t0)
        for d in range(local_day(t0, self.offset_s), local_day(t1, self.offset_s) + 1):
            times, links = self.day(d)
            for t, link in zip(times.tolist(), links.tolist()):
                if t <= t0:
                    continue
                if t >= t1:
                    return None
                if link != prev:
                    return t, link
        return None

    def changes(self, t0: float, t1: float) -> list[tuple[float, int]]:
        """Every (t, new link) with t0 < t < t1, in order."""
        out: list[tuple[float, int]] = []
        if t1 <= t0:
            return out
        prev = self.link_at(t0)
        for d in range(local_day(t0, self.offset_s), local_day(t1, self.offset_s) + 1):
            times, links = self.day(d)
            for t, link in zip(times.tolist(), links.tolist()):
                if t <= t0:
                    continue
                if t >= t1:
                    return out
                if link != prev:
                    out.append((t, link))
                    prev = link
        return out
