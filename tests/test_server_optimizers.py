"""Tests for aggregator/server_optimizers.py: the first steps of each optimizer against a
hand computation of Reddi et al. (2021) Algorithm 2, checkpoints, and argument errors."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from aggregator.server_optimizers import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    make_server_optimizer,
    server_optimizer_from_state,
)

DIM = 1_000


def _weights_and_deltas(steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(DIM).astype(np.float32)
    # Large then small deltas, so Yogi's sign(v - Δ²) takes both signs over the steps.
    scales = [1.0, 0.02, 0.5, 0.001, 0.3][:steps]
    deltas = [(s * rng.standard_normal(DIM)).astype(np.float32) for s in scales]
    return w0, deltas


def _run(opt, w0: np.ndarray, deltas: list[np.ndarray]) -> list[np.ndarray]:
    opt.init(w0)
    out, w = [], w0
    for d in deltas:
        w = opt.apply(w, d)
        out.append(w)
    return out


def _savez_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --- the formulas, by hand in float64 -------------------------------------------------


def test_fedavg_with_lr_one_is_weights_plus_delta_exactly():
    w0, deltas = _weights_and_deltas(3)
    opt = FedAvg()
    opt.init(w0)
    new = opt.apply(w0, deltas[0])
    np.testing.assert_array_equal(new, w0 + deltas[0])
    assert new.dtype == np.float32 and new is not w0


def test_fedavg_scales_by_lr():
    w0, deltas = _weights_and_deltas(2)
    steps = _run(FedAvg(lr=0.5), w0, deltas)
    expected = w0.astype(np.float64) + 0.5 * deltas[0] + 0.5 * deltas[1]
    np.testing.assert_allclose(steps[-1], expected, rtol=1e-6, atol=1e-6)


def test_fedavgm_matches_heavy_ball_momentum():
    w0, deltas = _weights_and_deltas(4)
    lr, mu = 0.7, 0.9
    steps = _run(FedAvgM(lr=lr, momentum=mu), w0, deltas)
    m = np.zeros(DIM)
    x = w0.astype(np.float64)
    for d, got in zip(deltas, steps):
        m = mu * m + d
        x = x + lr * m
        np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)


def _adaptive_reference(kind: str, w0, deltas, lr, b1, b2, tau, v0):
    m = np.zeros(DIM)
    v = np.full(DIM, v0, dtype=np.float64)
    x = w0.astype(np.float64)
    out = []
    for d in deltas:
        d = d.astype(np.float64)
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d**2
        elif kind == "yogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        x = x + lr * m / (np.sqrt(v) + tau)
        out.append(x.copy())
    return out


@pytest.mark.parametrize(
    "cls, kind, kwargs",
    [
        (FedAdam, "adam", {}),
        (FedAdam, "adam", {"lr": 0.1, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}),
        (FedYogi, "yogi", {}),
        (FedYogi, "yogi", {"lr": 0.03, "beta1": 0.0, "beta2": 0.5, "tau": 1e-1}),
        (FedAdagrad, "adagrad", {}),
        (FedAdagrad, "adagrad", {"lr": 0.2, "beta1": 0.9, "tau": 1e-2}),
    ],
)
def test_adaptive_steps_match_the_paper_by_hand(cls, kind, kwargs):
    w0, deltas = _weights_and_deltas(5)
    opt = cls(**kwargs)
    steps = _run(opt, w0, deltas)
    hp = {"lr": opt.lr, "b1": opt.beta1, "b2": opt.beta2, "tau": opt.tau}
    expected = _adaptive_reference(kind, w0, deltas, v0=opt.tau**2, **hp)
    for got, want in zip(steps, expected):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert opt.step == 5


def test_yogi_differs_from_adam_once_v_exceeds_delta_squared():
    w0, deltas = _weights_and_deltas(2)  # a large delta, then a small one
    adam, yogi = FedAdam(), FedYogi()
    for opt in (adam, yogi):
        _run(opt, w0, deltas)
    v_adam, v_yogi = adam.state()["v"], yogi.state()["v"]
    d0, d1 = (d.astype(np.float64) for d in deltas)
    tau2 = 1e-6
    # Step 1 from v_{-1} = tau²: where d0² > tau², Yogi's v grows like Adam's (+0.01 d0²).
    v_yogi_1 = tau2 - 0.01 * d0**2 * np.sign(tau2 - d0**2)
    # Step 2 with a small d1: Yogi's v shrinks ADDITIVELY by 0.01 d1², Adam's by a factor 0.99.
    np.testing.assert_allclose(v_yogi, v_yogi_1 - 0.01 * d1**2 * np.sign(v_yogi_1 - d1**2), rtol=1e-5)
    np.testing.assert_allclose(v_adam, 0.99 * (0.99 * tau2 + 0.01 * d0**2) + 0.01 * d1**2, rtol=1e-5)
    shrinking = v_yogi_1 > d1**2
    assert shrinking.mean() > 0.5  # the case this test is about actually occurs
    np.testing.assert_allclose(v_yogi[shrinking], (v_yogi_1 - 0.01 * d1**2)[shrinking], rtol=1e-5)
    assert not np.allclose(v_adam, v_yogi, rtol=1e-3)


def test_second_moment_starts_at_tau_squared_as_the_paper_requires():
    w0, _ = _weights_and_deltas(1)
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        opt = make_server_optimizer(name, tau=0.01)
        opt.init(w0)
        state = opt.state()
        np.testing.assert_array_equal(state["v"], np.full(DIM, np.float32(1e-4)))
        np.testing.assert_array_equal(state["m"], np.zeros(DIM, np.float32))
        assert state["v"].dtype == np.float32
    flower_like = FedYogi(initial_v=0.0)
    flower_like.init(w0)
    assert not flower_like.state()["v"].any()


def test_fedadagrad_defaults_to_no_momentum_and_takes_no_beta2():
    opt = make_server_optimizer("fedadagrad")
    assert opt.beta1 == 0.0 and opt.lr == 0.1
    assert "beta2" not in opt.hyperparameters()
    with pytest.raises(ValueError, match="'beta2'"):
        make_server_optimizer("fedadagrad", beta2=0.9)


def test_defaults_are_those_asked_for():
    adam = make_server_optimizer("fedadam")
    assert (adam.lr, adam.beta1, adam.beta2, adam.tau) == (0.01, 0.9, 0.99, 1e-3)
    avgm = make_server_optimizer("FedAvgM")
    assert (avgm.lr, avgm.momentum) == (1.0, 0.9)
    assert make_server_optimizer("fedavg").lr == 1.0


# --- state ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_checkpoint_then_resume_is_bit_exact(name):
    w0, deltas = _weights_and_deltas(5, seed=2)
    straight = _run(make_server_optimizer(name), w0, deltas)[-1]

    first = make_server_optimizer(name)
    w = _run(first, w0, deltas[:2])[-1]
    saved = _savez_round_trip(first.state())
    del first

    for resumed in (make_server_optimizer(name), None):
        if resumed is None:
            resumed = server_optimizer_from_state(saved)
        else:
            resumed.load_state(saved)
        assert resumed.step == 2
        x = w
        for d in deltas[2:]:
            x = resumed.apply(x, d)
        np.testing.assert_array_equal(x, straight)


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_state_is_plain_float32_data_and_a_snapshot(name):
    w0, deltas = _weights_and_deltas(2)
    opt = make_server_optimizer(name)
    _run(opt, w0, deltas[:1])
    state = opt.state()
    assert state["name"] == name and state["dim"] == DIM and state["step"] == 1
    for key, value in state.items():
        assert isinstance(value, (np.ndarray, float, int, str)), key
        if isinstance(value, np.ndarray):
            assert value.dtype == np.float32 and value.shape == (DIM,)
    copies = {k: v.copy() for k, v in state.items() if isinstance(v, np.ndarray)}
    opt.apply(w0, deltas[1])
    for key, value in copies.items():
        np.testing.assert_array_equal(state[key], value)


def test_loading_another_optimizers_state_is_refused():
    w0, _ = _weights_and_deltas(1)
    adam = FedAdam()
    adam.init(w0)
    with pytest.raises(ValueError, match="'fedadam' optimizer state"):
        FedYogi().load_state(adam.state())
    state = adam.state()
    state["m"] = state["m"][:10]
    with pytest.raises(ValueError, match="buffer 'm'"):
        FedAdam().load_state(state)
    del state["m"]
    with pytest.raises(ValueError, match="lacks buffer 'm'"):
        FedAdam().load_state(state)


def test_changed_hyperparameters_on_resume_are_kept_with_a_warning(caplog):
    w0, deltas = _weights_and_deltas(2)
    adam = FedAdam(lr=0.01)
    _run(adam, w0, deltas[:1])
    lowered = FedAdam(lr=0.001)
    with caplog.at_level(logging.WARNING, logger="aggregator.server_optimizers"):
        lowered.load_state(adam.state())
    assert "lr=0.01" in caplog.text
    assert lowered.lr == 0.001


# --- apply's contract -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_apply_leaves_its_inputs_alone(name):
    w0, deltas = _weights_and_deltas(2)
    w_copy, d_copy = w0.copy(), deltas[0].copy()
    opt = make_server_optimizer(name)
    opt.init(w0)
    new = opt.apply(w0, deltas[0])
    np.testing.assert_array_equal(w0, w_copy)
    np.testing.assert_array_equal(deltas[0], d_copy)
    assert not np.shares_memory(new, w0) and not np.shares_memory(new, deltas[0])


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_non_finite_delta_is_refused_before_any_state_changes(name):
    w0, deltas = _weights_and_deltas(2)
    opt = make_server_optimizer(name)
    _run(opt, w0, deltas[:1])
    before = opt.state()
    bad = deltas[1].copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.apply(w0, bad)
    after = opt.state()
    assert after["step"] == before["step"]
    for key in opt.buffer_names:
        np.testing.assert_array_equal(after[key], before[key])


def test_apply_before_init_and_wrong_shapes_are_clear_errors():
    opt = FedAdam()
    with pytest.raises(RuntimeError, match=r"init\(weights\)"):
        opt.apply(np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="not initialised"):
        opt.state()
    opt.init(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="delta has 4 values"):
        opt.apply(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="1-D float32"):
        opt.apply(np.zeros((3, 1), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="1-D float32"):
        opt.init([0.0, 1.0])  # type: ignore[arg-type]


# --- factory errors -------------------------------------------------------------------


def test_make_server_optimizer_builds_every_name():
    for name, cls in SERVER_OPTIMIZERS.items():
        assert type(make_server_optimizer(name)) is cls
    assert set(SERVER_OPTIMIZERS) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}


@pytest.mark.parametrize(
    "name, kwargs, problem",
    [
        ("sgd", {}, "unknown server optimizer 'sgd'; known: fedavg, fedavgm"),
        ("fedadam", {"eta": 0.1}, "does not take 'eta'; it takes lr, beta1, beta2, tau, initial_v"),
        ("fedavg", {"momentum": 0.9}, "fedavg does not take 'momentum'"),
        ("fedadam", {"lr": 0.0}, "lr must be in (0.0, inf)"),
        ("fedadam", {"beta1": 1.0}, "beta1 must be in [0.0, 1.0)"),
        ("fedyogi", {"beta2": -0.1}, "beta2 must be in [0.0, 1.0)"),
        ("fedadagrad", {"tau": 0.0}, "tau must be in (0.0, inf)"),
        ("fedavgm", {"momentum": 1.5}, "momentum must be in [0.0, 1.0)"),
        ("fedadam", {"lr": "fast"}, "lr must be a number"),
        ("fedadam", {"initial_v": -1.0}, "initial_v must be in [0.0, inf)"),
    ],
)
def test_bad_names_and_arguments_raise_value_error_naming_the_problem(name, kwargs, problem):
    with pytest.raises(ValueError) as info:
        make_server_optimizer(name, **kwargs)
    assert problem in str(info.value)
