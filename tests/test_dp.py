import math

import numpy as np
import pytest

from aggregator.aggregation import DuplicateUpdateError, EmptyAggregationError, WeightedMean, make_aggregator
from aggregator.dp import DPConfig, DPFedAvgAggregator, is_dp_spec, make_any_aggregator, make_dp_aggregator
from protocol.codec import parse_codec


def _agg(**kw):
    base = dict(clip=1.0, noise_multiplier=0.0, expected_clients=1, seed=0)
    base.update(kw)
    return make_dp_aggregator(**base)


def test_every_update_is_clipped_to_the_bound_and_small_ones_pass_unchanged():
    agg = _agg(clip=2.0)
    agg.reset(1000)
    big = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 10
    agg.add(big, 1.0, client_id="a")
    assert np.linalg.norm(agg.result()) == pytest.approx(2.0, rel=1e-6)
    assert agg.clipped_count == 1
    agg.reset(1000)
    small = big / np.linalg.norm(big) * 0.5
    agg.add(small, 1.0)
    np.testing.assert_allclose(agg.result(), small, rtol=1e-6)
    assert agg.clipped_count == 0


def test_sum_divided_by_the_fixed_expected_cohort_not_the_actual_count():
    agg = _agg(clip=10.0, expected_clients=8)
    agg.reset(4)
    for i in range(3):
        agg.add(np.full(4, 1.0, np.float32), 100.0 * (i + 1), client_id=str(i))  # weights ignored: unweighted
    np.testing.assert_allclose(agg.result(), np.full(4, 3.0 / 8.0), rtol=1e-6)
    assert agg.count == 3 and agg.total_weight == 3.0


def test_bounded_weights():
    agg = _agg(clip=10.0, expected_clients=2, weight_cap=100.0, expected_weight=1.5)
    agg.reset(2)
    agg.add(np.ones(2, np.float32), 50.0)    # weight 0.5
    agg.add(np.ones(2, np.float32), 900.0)   # capped at 1
    np.testing.assert_allclose(agg.result(), np.full(2, 1.5 / 1.5), rtol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_std_matches_z_times_clip_over_the_denominator(adaptive):
    z, clip, expected, dim = 1.3, 0.7, 10, 200_000
    agg = _agg(clip=clip, noise_multiplier=z, expected_clients=expected, adaptive=adaptive, count_stddev=2.0)
    agg.reset(dim)
    for i in range(4):
        agg.add(np.zeros(dim, np.float32), 1.0, client_id=str(i))
    out = agg.result().astype(np.float64)
    z_upd = z if not adaptive else (z ** -2 - 4.0 ** -2) ** -0.5
    assert agg.noise_std == pytest.approx(z_upd * clip / expected)
    assert out.std() == pytest.approx(z_upd * clip / expected, rel=0.01)
    assert abs(out.mean()) < 5 * out.std() / math.sqrt(dim)
    assert agg.round_report()["noise_std"] == pytest.approx(agg.noise_std)


def test_noise_is_fixed_within_a_round_and_fresh_across_rounds():
    agg = _agg(noise_multiplier=1.0, seed=None)
    agg.reset(100)
    agg.add(np.zeros(100, np.float32), 1.0)
    first = agg.result()
    assert np.array_equal(first, agg.result())  # asking twice does not average the noise away
    agg.reset(100)
    agg.add(np.zeros(100, np.float32), 1.0)
    assert not np.array_equal(first, agg.result())
    a, b = _agg(noise_multiplier=1.0, seed=5), _agg(noise_multiplier=1.0, seed=5)
    for x in (a, b):
        x.reset(50)
        x.add(np.zeros(50, np.float32), 1.0)
    assert np.array_equal(a.result(), b.result())


def test_adaptive_clipping_moves_the_clip_to_the_target_quantile():
    rng = np.random.default_rng(1)
    dim, per_round = 32, 40
    direction = np.ones(dim, np.float32) / math.sqrt(dim)
    for start in (0.1, 50.0):
        agg = _agg(clip=start, adaptive=True, target_quantile=0.5, clip_lr=0.2, expected_clients=per_round,
                   count_stddev=1.0)
        for _ in range(80):
            agg.reset(dim)
            for i in range(per_round):  # norms uniform on [0, 10]: the median is 5
                agg.add(direction * np.float32(rng.uniform(0, 10)), 1.0, client_id=str(i))
            agg.result()
        agg.reset(dim)  # the last release moves the clip at the start of the next round
        assert 4.0 < agg.clip < 6.0, (start, agg.clip)
    q = _agg(clip=5.0, adaptive=True, target_quantile=0.9, expected_clients=per_round, count_stddev=1.0)
    for _ in range(60):
        q.reset(dim)
        for i in range(per_round):
            q.add(direction * np.float32(rng.uniform(0, 10)), 1.0, client_id=str(i))
        q.result()
    q.reset(dim)
    assert 8.0 < q.clip < 10.5


def test_abandoned_round_does_not_move_the_clip():
    agg = _agg(clip=1.0, adaptive=True, expected_clients=2, count_stddev=1.0)
    agg.reset(3)
    agg.add(np.full(3, 10.0, np.float32), 1.0)
    agg.reset(3)  # no result(): nothing was released
    assert agg.clip == 1.0


def test_checkpoint_resumes_bit_for_bit_and_carries_the_pending_clip():
    spec = "dp:clip=0.5,noise=1.1,expected=5,adaptive,count_stddev=1,seed=7|mean"
    agg = make_dp_aggregator(spec)
    agg.reset(500)
    rng = np.random.default_rng(2)
    updates = [rng.standard_normal(500).astype(np.float32) for _ in range(4)]
    for i, u in enumerate(updates[:2]):
        agg.add(u, 1.0, client_id=f"c{i}")
    state = {k: (np.asarray(v) if not isinstance(v, np.ndarray) else v) for k, v in agg.state().items()}
    resumed = make_dp_aggregator(spec)
    resumed.load_state(state)
    for x in (agg, resumed):
        for i, u in enumerate(updates[2:]):
            x.add(u, 1.0, client_id=f"d{i}")
    assert np.array_equal(agg.result(), resumed.result())
    assert resumed.contains("c0") and resumed.count == 4
    resumed2 = make_dp_aggregator(spec)
    resumed2.load_state(agg.state())
    agg.reset(500)
    resumed2.reset(500)
    assert agg.clip == resumed2.clip != 0.5
    with pytest.raises(ValueError, match="must not change"):
        make_dp_aggregator(spec.replace("noise=1.1", "noise=1.2")).load_state(state)


def test_decoding_into_the_aggregator_still_clips():
    codec = parse_codec("q8")
    x = np.random.default_rng(3).standard_normal(2000).astype(np.float32)
    payload = codec.encode(x, rng=np.random.default_rng(0)).payload
    agg = _agg(clip=1.0)
    agg.reset(2000)
    assert agg.accumulator() is None
    agg.add_decoded_into(lambda acc, w: codec.decode_accumulate(payload, acc, w), 3.0, client_id="x")
    assert np.linalg.norm(agg.result()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(DuplicateUpdateError):
        agg.add(x, 1.0, client_id="x")


def test_pre_summed_updates_from_secure_aggregation():
    rng = np.random.default_rng(4)
    ups = [rng.standard_normal(64).astype(np.float32) * 0.1 for _ in range(5)]
    one = _agg(clip=10.0, expected_clients=5, adaptive=True, count_stddev=1e-9)
    one.reset(64)
    for i, u in enumerate(ups):
        one.add(u, 1.0, client_id=str(i))
    pre = _agg(clip=10.0, expected_clients=5, adaptive=True, count_stddev=1e-9)
    pre.reset(64)
    pre.add_aggregate(np.sum(ups, axis=0, dtype=np.float64), 5, unclipped_count=5,
                      client_ids=[str(i) for i in range(5)])
    np.testing.assert_allclose(one.result(), pre.result(), rtol=1e-5, atol=1e-7)
    assert pre.round_report()["next_clip"] == pytest.approx(one.round_report()["next_clip"])
    with pytest.raises(ValueError, match="unclipped_count"):
        pre.add_aggregate(np.zeros(64), 1)
    with pytest.raises(DuplicateUpdateError):
        pre.add_aggregate(np.zeros(64), 1, unclipped_count=1, client_ids=["3"])


def test_specs_and_keywords_build_the_same_aggregator():
    a = make_dp_aggregator("dp:clip=1.0,noise=1.0,expected=20")
    b = make_dp_aggregator(clip=1.0, noise_multiplier=1.0, expected_clients=20)
    assert a.spec == b.spec == "dp:clip=1,noise=1,expected=20|mean"
    assert make_dp_aggregator(a.spec).spec == a.spec
    c = make_any_aggregator("dp:clip=0.5,noise=1.1,expected=20,adaptive,quantile=0.6|mean:float32")
    assert isinstance(c, DPFedAvgAggregator) and c.config.adaptive and c.config.target_quantile == 0.6
    assert make_any_aggregator(c.spec).spec == c.spec
    assert isinstance(make_any_aggregator("clip:10|mean"), type(make_aggregator("clip:10|mean")))
    assert is_dp_spec(" DP:clip=1,noise=1,expected=2") and not is_dp_spec("mean")
    for bad in ("dp:clip=1,noise=1", "dp:clip=1,noise=1,expected=20,bogus=3", "dp:clip=x,noise=1,expected=2",
                "dp:clip=1,clip=2,noise=1,expected=2", "dp:clip=1,noise=1,expected=20|trimmed:0.1",
                "dp:clip=-1,noise=1,expected=2", "dp:clip=1,noise=4,expected=20,adaptive"):
        with pytest.raises(ValueError):
            make_dp_aggregator(bad)
    with pytest.raises(ValueError):
        make_dp_aggregator("dp:clip=1,noise=1,expected=2", clip=1.0)
    with pytest.raises(ValueError):
        DPFedAvgAggregator(WeightedMean(), DPConfig(1.0, 1.0, 0))


def test_empty_round_has_nothing_to_release():
    agg = _agg()
    agg.reset(3)
    with pytest.raises(EmptyAggregationError):
        agg.result()


def test_the_adaptive_clip_survives_a_restart_between_rounds():
    agg = _agg(clip=1.0, adaptive=True, expected_clients=2, count_stddev=1.0)
    agg.reset(3)
    agg.add(np.full(3, 10.0, np.float32), 1.0)
    agg.result()
    saved = agg.next_clip
    assert saved > 1.0  # every update was above the clip: it grows
    fresh = _agg(clip=1.0, adaptive=True, expected_clients=2, count_stddev=1.0)
    fresh.set_clip(saved)
    fresh.reset(3)
    agg.reset(3)
    assert fresh.clip == agg.clip == saved
    with pytest.raises(ValueError):
        fresh.set_clip(0.0)
