"""Round-level properties of secure aggregation (the issue's "must show")."""
import numpy as np
import pytest
from scipy import stats

from protocol.secagg.driver import run_secagg_round, simulate_secagg_round
from protocol.secagg.errors import SecAggAbortedError
from protocol.secagg.quantize import shared_coordinates, sum_error_bound, to_ring

P_FLOOR = 1e-4  # a correct implementation fails a test this strict once in 10,000 runs


def _updates(n, dim, seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return {f"dev-{i:02d}": (rng.standard_normal(dim) * scale).astype(np.float32) for i in range(n)}


def _chi2_p(values, bins):
    counts = np.bincount(values, minlength=bins)
    assert counts.size == bins
    return stats.chisquare(counts).pvalue


@pytest.mark.parametrize("bits", [32, 16])
def test_one_devices_masked_update_is_indistinguishable_from_uniform(bits):
    dim = 1 << 16
    t = simulate_secagg_round(_updates(4, dim), threshold=3, bits=bits, value_range=0.05)
    device = "dev-01"
    masked = t.masked[device].astype(np.int64)
    assert masked.max() < 2**bits
    # what the server sees: chi-square on the top and bottom 8 bits, KS on the whole value
    assert _chi2_p(masked >> (bits - 8), 256) > P_FLOOR
    assert _chi2_p(masked & 255, 256) > P_FLOOR
    assert stats.kstest(masked / 2**bits, "uniform").pvalue > P_FLOOR
    # the same device's quantized update WITHOUT the masks is nowhere near uniform
    plain = to_ring(t.quantized[device], t.params).astype(np.int64)
    assert _chi2_p(plain >> (bits - 8), 256) < 1e-30
    assert stats.kstest(plain / 2**bits, "uniform").pvalue < 1e-30


def test_masked_views_of_opposite_updates_cannot_be_told_apart():
    dim = 1 << 15
    updates = {"a": np.full(dim, -0.05, np.float32), "b": np.full(dim, 0.05, np.float32),
               "c": np.zeros(dim, np.float32)}
    t = simulate_secagg_round(updates, threshold=2, value_range=0.05)
    assert stats.ks_2samp(t.masked["a"], t.masked["b"]).pvalue > P_FLOOR
    assert np.array_equal(t.result.int_sum, t.expected_int_sum())


def test_a_third_of_the_cohort_drops_after_sending_masked_updates():
    updates = _updates(12, 3000, seed=1)
    dropped = {"dev-01", "dev-04", "dev-07", "dev-10"}
    t = simulate_secagg_round(updates, threshold=8, dropouts_after_masking=dropped, value_range=0.05)
    # their inputs arrived, so they are in the sum; the unmasking went on without them
    assert len(t.result.survivors) == 12 and len(t.result.responders) == 8
    assert not set(t.result.responders) & dropped
    assert t.result.int_sum.dtype == np.int64
    assert np.array_equal(t.result.int_sum, t.expected_int_sum())  # exact integer equality
    plain = np.sum([np.clip(updates[d].astype(np.float64), -0.05, 0.05) for d in updates], axis=0)
    assert np.abs(t.float_sum - plain).max() <= sum_error_bound(12, t.params)


def test_a_third_drops_after_sharing_keys_and_their_pairwise_masks_are_removed():
    updates = _updates(12, 3000, seed=2)
    gone = {"dev-00", "dev-03", "dev-06", "dev-11"}
    t = simulate_secagg_round(updates, threshold=8, dropouts_before_masking=gone, value_range=0.05, bits=20)
    assert set(t.result.dropped) == gone
    assert np.array_equal(t.result.int_sum, t.expected_int_sum())
    plain = np.sum([np.clip(updates[d], -0.05, 0.05) for d in t.result.survivors], axis=0, dtype=np.float64)
    assert np.abs(t.float_sum - plain).max() <= sum_error_bound(8, t.params)


def test_both_kinds_of_dropout_together_and_the_float_driver():
    updates = _updates(9, 500, seed=3)
    total = run_secagg_round(updates, 5, {"dev-02", "dev-05"}, dropouts_before_masking={"dev-08"},
                             value_range=0.05, bits=24)
    survivors = [d for d in updates if d != "dev-08"]
    plain = np.sum([np.clip(updates[d], -0.05, 0.05) for d in survivors], axis=0, dtype=np.float64)
    params_step = 0.05 / (((1 << 23) - 1) // 9)
    assert np.abs(total - plain).max() <= 8 * params_step


def test_too_many_dropouts_fail_the_round_cleanly():
    updates = _updates(6, 100)
    with pytest.raises(SecAggAbortedError):
        simulate_secagg_round(updates, 4, dropouts_after_masking={"dev-00", "dev-01", "dev-02"})


def test_secure_sum_over_shared_random_coordinates():
    dim, keep = 20_000, 1_000
    updates = _updates(5, dim, seed=4)
    index = shared_coordinates(b"round-seed".ljust(32, b"\0"), dim, keep)
    t = simulate_secagg_round({d: u[index] for d, u in updates.items()}, threshold=3, value_range=0.05)
    assert t.params.dim == keep and t.up_bytes["mask"]["dev-00"] < 4 * keep + 64
    full = np.zeros(dim)
    full[index] = t.float_sum
    plain = np.sum([np.clip(u, -0.05, 0.05) for u in updates.values()], axis=0, dtype=np.float64)
    assert np.abs(full[index] - plain[index]).max() <= sum_error_bound(5, t.params)


def test_transcript_accounts_bytes_and_seconds_per_phase():
    t = simulate_secagg_round(_updates(4, 1000), threshold=3, dropouts_after_masking={"dev-03"})
    assert set(t.up_bytes) == {"advertise", "share", "mask", "unmask"}
    assert t.up_bytes["mask"]["dev-00"] == 10 + 7 + 5 + 4 * 1000
    assert "dev-03" not in t.up_bytes["unmask"]
    assert all(s >= 0 for s in t.server_s.values()) and len(t.client_s["mask"]) == 4
