import numpy as np
import pytest

from device_sim.clock import DAY_S, DEFAULT_START_S, HOUR_S
from device_sim.connectivity import (CELLULAR, LINKS, OFFLINE, WIFI, WIRED, ConnectivityModel, NetworkSpec, PerLink,
                                     build_chain, stationary_time_shares)

PHONE_DAY = PerLink(wifi=0.5, cellular=0.45, offline=0.05)
DWELL = PerLink(wired=720, wifi=60, cellular=45, offline=10)


@pytest.mark.parametrize("shares, dwell, lengthened", [
    (PHONE_DAY, DWELL, ()),
    (PerLink(wired=0.85, wifi=0.13, offline=0.02), PerLink(wired=720, wifi=360, offline=20), ()),
    (PerLink(wired=0.98, offline=0.02), PerLink(wired=1440, offline=20), ("offline",)),
    (PerLink(wifi=0.88, cellular=0.1, offline=0.02), PerLink(wifi=240, cellular=60, offline=15), ("wifi",)),
    (PerLink(wifi=0.25, cellular=0.25, offline=0.25, wired=0.25), PerLink(wired=5, wifi=50, cellular=500, offline=5000), ("wired",)),
])
def test_chain_time_shares_are_exactly_the_stated_ones(shares, dwell, lengthened):
    chain = build_chain(shares, dwell)
    assert stationary_time_shares(chain) == pytest.approx(np.array(shares.values()), abs=1e-9)
    assert chain.lengthened == lengthened
    for link in range(4):
        if shares[link] > 0 and LINKS[link] not in lengthened:
            assert chain.mean_stay_s[link] == pytest.approx(dwell[link] * 60)
        if shares[link] > 0:
            assert chain.jump[link, link] == 0
            assert chain.jump[link].sum() == pytest.approx(1.0)


def test_a_single_link_never_changes():
    chain = build_chain(PerLink(wired=1.0), DWELL)
    assert np.isinf(chain.mean_stay_s[WIRED])
    model = ConnectivityModel(NetworkSpec(day=PerLink(wired=1.0)), 0, 0, 0.0, DEFAULT_START_S)
    assert model.changes(DEFAULT_START_S, DEFAULT_START_S + 3 * DAY_S) == []
    assert model.link_at(DEFAULT_START_S + 1e5) == WIRED


def long_run(spec, days=120, devices=4, offset_s=0.0):
    time_in = np.zeros(4)
    stays = {k: [] for k in range(4)}
    for index in range(devices):
        model = ConnectivityModel(spec, 11, index, offset_s, DEFAULT_START_S)
        t0 = DEFAULT_START_S
        t1 = t0 + days * DAY_S
        last_t, last = t0, model.link_at(t0)
        for t, link in model.changes(t0, t1) + [(t1, -1)]:
            time_in[last] += t - last_t
            if last_t > t0 and link >= 0:
                stays[last].append(t - last_t)
            last_t, last = t, link
    return time_in / time_in.sum(), {k: np.mean(v) / 60 for k, v in stays.items() if v}


def test_simulated_links_match_the_configured_mix_and_stays():
    spec = NetworkSpec(day=PHONE_DAY, night=None, dwell_min=DWELL)
    shares, stays = long_run(spec)
    assert shares == pytest.approx(np.array(PHONE_DAY.values()), abs=0.02)
    assert stays[WIFI] == pytest.approx(60, rel=0.1)
    assert stays[CELLULAR] == pytest.approx(45, rel=0.1)
    assert stays[OFFLINE] == pytest.approx(10, rel=0.15)


def test_night_regime_applies_in_local_night_hours():
    spec = NetworkSpec(day=PerLink(wifi=0.2, cellular=0.8), night=PerLink(wifi=0.95, cellular=0.05),
                       night_start_h=23, night_end_h=7, dwell_min=PerLink(wifi=30, cellular=30))
    offset_s = 8 * HOUR_S
    at_night, at_noon = [], []
    for index in range(10):
        model = ConnectivityModel(spec, 0, index, offset_s, DEFAULT_START_S)
        for d in range(1, 30):
            midnight = DEFAULT_START_S + d * DAY_S - offset_s
            at_night.append(model.link_at(midnight + 3 * HOUR_S) == WIFI)
            at_noon.append(model.link_at(midnight + 13 * HOUR_S) == WIFI)
    assert np.mean(at_night) > 0.85
    assert np.mean(at_noon) < 0.35
    assert spec.long_run_shares().wifi == pytest.approx(8 / 24 * 0.95 + 16 / 24 * 0.2)


def test_the_timeline_does_not_depend_on_the_order_of_reads():
    spec = NetworkSpec()
    t0 = DEFAULT_START_S
    forward = ConnectivityModel(spec, 3, 7, -5 * HOUR_S, t0)
    expected = forward.changes(t0, t0 + 6 * DAY_S)
    jumpy = ConnectivityModel(spec, 3, 7, -5 * HOUR_S, t0)
    jumpy.link_at(t0 + 5.5 * DAY_S)           # far ahead first: older days get evicted
    assert jumpy.changes(t0, t0 + 6 * DAY_S) == expected  # ... and are replayed identically
    probes = np.random.default_rng(0).uniform(t0, t0 + 6 * DAY_S, 300)
    for t in probes:
        before = [link for when, link in expected if when <= t]
        assert jumpy.link_at(t) == (before[-1] if before else forward.link_at(t0))
    assert jumpy.first_change(t0, t0 + 6 * DAY_S) == expected[0]
    assert jumpy.first_change(expected[0][0], expected[0][0] + 1e-3) is None
    other_seed = ConnectivityModel(spec, 4, 7, -5 * HOUR_S, t0).changes(t0, t0 + 6 * DAY_S)
    assert other_seed != expected


def test_network_spec_is_checked():
    with pytest.raises(ValueError, match="day shares must sum to 1"):
        NetworkSpec(day=PerLink(wifi=0.5))
    with pytest.raises(ValueError, match="dwell_min.wifi"):
        NetworkSpec(dwell_min=PerLink(wired=1, wifi=0, cellular=1, offline=1))
    with pytest.raises(ValueError, match="bandwidth_mbps.cellular"):
        NetworkSpec(bandwidth_mbps=PerLink(wifi=1))
    with pytest.raises(ValueError, match="wifi"):
        PerLink(wifi=-1)
