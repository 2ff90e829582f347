"""The TF module: the CIFG math, the masked loss, FedProx, and the weight vector."""

import numpy as np
import pytest
import tensorflow as tf

from models.bundle import weight_layout
from models.cifg import EMBED_INIT, CIFGModule, build_training_module, initial_weights, masked_cross_entropy, unigram_log_prior
from models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=40, embed_dim=8, units=16, seq_len=5, batch_size=3)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_cifg_logits(config: ModelConfig, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference forward pass written from BENCHMARK.md's description, step by step."""
    p = {s.name: w[s.offset : s.offset + s.size].reshape(s.shape).astype(np.float64) for s in weight_layout(config)}
    u = config.units
    h = np.zeros((len(x), u))
    c = np.zeros((len(x), u))
    out = []
    for t in range(x.shape[1]):
        e = p["embedding"][x[:, t]]
        z = e @ p["cifg/kernel"] + h @ p["cifg/recurrent_kernel"] + p["cifg/bias"]
        i, g, o = sigmoid(z[:, :u]), np.tanh(z[:, u : 2 * u]), sigmoid(z[:, 2 * u :])
        f = 1.0 - i  # coupled input and forget gates
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append((h @ p["projection"]) @ p["embedding"].T + p["output_bias"])
    return np.stack(out, axis=1)


def test_forward_matches_the_numpy_reference():
    w = np.random.default_rng(0).normal(0, 0.3, CONFIG.param_count).astype(np.float32)
    module = CIFGModule(CONFIG, w)
    x = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_len)).astype(np.int32)
    got = module.infer(tf.constant(x))["logits"].numpy()
    assert got.shape == (4, CONFIG.seq_len, CONFIG.vocab_size)
    np.testing.assert_allclose(got, numpy_cifg_logits(CONFIG, w, x), rtol=1e-4, atol=1e-5)


def test_initial_weights_are_seeded_and_shaped():
    a, b, c = initial_weights(CONFIG, 0), initial_weights(CONFIG, 0), initial_weights(CONFIG, 1)
    assert a.dtype == np.float32 and a.shape == (CONFIG.param_count,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    parts = {s.name: a[s.offset : s.offset + s.size].reshape(s.shape) for s in weight_layout(CONFIG)}
    assert np.abs(parts["embedding"]).max() <= EMBED_INIT
    np.testing.assert_allclose(parts["cifg/bias"][: CONFIG.units], -1.0)  # f = 1 - i starts near 0.73
    np.testing.assert_array_equal(parts["output_bias"], 0.0)
    rec = parts["cifg/recurrent_kernel"]
    np.testing.assert_allclose(rec @ rec.T, np.eye(CONFIG.units), atol=1e-5)  # orthogonal rows


def test_output_prior_sets_the_output_bias_to_unigram_log_frequencies():
    counts = np.arange(CONFIG.vocab_size, dtype=np.int64)[::-1].copy()
    counts[0] = 0
    prior = unigram_log_prior(counts)
    assert abs(prior.mean()) < 1e-9 and prior[1] > prior[-1]  # more frequent ids start higher
    w = initial_weights(CONFIG, 0, output_prior=prior)
    spec = {s.name: s for s in weight_layout(CONFIG)}["output_bias"]
    np.testing.assert_allclose(w[spec.offset : spec.offset + spec.size], prior.astype(np.float32))
    with pytest.raises(ValueError, match="output_prior"):
        initial_weights(CONFIG, 0, output_prior=prior[:-1])


def test_gradient_clipping_bounds_the_step():
    """With clip c and lr 1, no weight moves by more than c in total L2 norm."""
    module = build_training_module(CONFIG, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(4, CONFIG.vocab_size, size=(CONFIG.batch_size, CONFIG.seq_len)).astype(np.int32)
    before = module.get_weights()["weights"].numpy()
    module.train(tf.constant(x), tf.constant(x), tf.constant(1.0), tf.constant(0.0), tf.constant(1e-3))
    moved = np.linalg.norm(module.get_weights()["weights"].numpy() - before)
    assert 0 < moved <= 1e-3 * (1 + 1e-4)


def test_get_and_set_weights_round_trip():
    module = build_training_module(CONFIG, seed=2)
    np.testing.assert_array_equal(module.get_weights()["weights"].numpy(), initial_weights(CONFIG, 2))
    w = np.random.default_rng(3).standard_normal(CONFIG.param_count).astype(np.float32)
    module.set_weights(tf.constant(w))
    np.testing.assert_array_equal(module.get_weights()["weights"].numpy(), w)
    with pytest.raises(ValueError):
        CIFGModule(CONFIG, w[:-1])


def test_masked_cross_entropy_ignores_pad_targets():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    y = np.array([[2, 0, 5], [0, 0, 1]], np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([log_probs[0, 0, 2], log_probs[0, 2, 5], log_probs[1, 2, 1]])  # OOV is trained on
    got = float(masked_cross_entropy(tf.constant(logits), tf.constant(y), 6))
    assert got == pytest.approx(expected, rel=1e-5)
    assert float(masked_cross_entropy(tf.constant(logits), tf.zeros((2, 3), tf.int32), 6)) == 0.0


def test_train_step_is_sgd_on_the_masked_loss():
    module = build_training_module(CONFIG, seed=5)
    w0 = module.get_weights()["weights"].numpy()
    rng = np.random.default_rng(6)
    x = rng.integers(2, CONFIG.vocab_size, (3, CONFIG.seq_len)).astype(np.int32)
    y = rng.integers(2, CONFIG.vocab_size, (3, CONFIG.seq_len)).astype(np.int32)
    with tf.GradientTape() as tape:
        loss = masked_cross_entropy(module.logits(tf.constant(x)), tf.constant(y), CONFIG.vocab_size)
    grad = np.concatenate([tf.convert_to_tensor(g).numpy().reshape(-1) for g in tape.gradient(loss, module.weights)])
    out = module.train(tf.constant(x), tf.constant(y), tf.constant(0.1), tf.constant(0.0), tf.constant(0.0))
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(module.get_weights()["weights"].numpy(), w0 - 0.1 * grad, atol=1e-6)


def test_fedprox_term_and_its_gradient():
    module = build_training_module(CONFIG, seed=7)
    w0 = module.get_weights()["weights"].numpy()
    anchor = w0 + np.random.default_rng(8).normal(0, 0.05, w0.shape).astype(np.float32)
    module.set_anchor(tf.constant(anchor))
    x = np.zeros((3, CONFIG.seq_len), np.int32)  # all PAD: the data loss and its gradient are 0
    mu, lr = 2.0, 0.1
    out = module.train(tf.constant(x), tf.constant(x), tf.constant(lr), tf.constant(mu), tf.constant(0.0))
    assert float(out["loss"]) == pytest.approx(0.5 * mu * np.sum((w0 - anchor) ** 2), rel=1e-4)
    np.testing.assert_allclose(module.get_weights()["weights"].numpy(), w0 - lr * mu * (w0 - anchor), atol=1e-6)
