"""Export: the bundle trains in ai-edge-litert exactly as the TF module does.

THE equivalence tests live here (they need both TF and the interpreter); the
no-TensorFlow training test is in tests/test_runtime.py.
"""

import time

import numpy as np
import pytest
import tensorflow as tf

from models.bundle import read_bundle
from models.cifg import build_training_module, masked_cross_entropy
from models.config import ModelConfig
from models.export import export_bundle, export_float_inference, export_int8_inference, make_bundle
from models.runtime import InferenceModel, LiteRTModel

CONFIG = ModelConfig(vocab_size=64, embed_dim=12, units=24, seq_len=6, batch_size=4)


def vocab(n: int) -> dict:
    return {"format": "fedboard-vocab/1", "words": ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(n - 4)]}


def windows(rng: np.random.Generator, n: int, config: ModelConfig = CONFIG) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(2, config.vocab_size, size=(n, config.seq_len + 1), dtype=np.int32)
    return ids[:, :-1].copy(), ids[:, 1:].copy()


@pytest.fixture(scope="module")
def bundle():
    return make_bundle(CONFIG, vocab(64), seed=3)


def test_export_writes_a_readable_bundle(tmp_path):
    path = export_bundle(CONFIG, vocab(64), tmp_path / "b.fbz", seed=3)
    b = read_bundle(path)
    assert b.config == CONFIG and b.vocab_json == vocab(64)
    np.testing.assert_array_equal(b.initial_weights, build_training_module(CONFIG, seed=3).get_weights()["weights"].numpy())
    given = np.arange(CONFIG.param_count, dtype=np.float32) / CONFIG.param_count
    b2 = read_bundle(export_bundle(CONFIG, vocab(64), tmp_path / "c.fbz", initial_weights=given))
    np.testing.assert_array_equal(b2.initial_weights, given)
    with pytest.raises(ValueError, match="initial_weights"):
        make_bundle(CONFIG, vocab(64), initial_weights=given[:-1])


def test_litert_sgd_matches_tensorflow(bundle):
    module = build_training_module(CONFIG, seed=3)
    model = LiteRTModel(bundle)
    np.testing.assert_array_equal(model.get_weights(), module.get_weights()["weights"].numpy())
    rng = np.random.default_rng(0)
    for step in range(5):
        x, y = windows(rng, CONFIG.batch_size)
        tf_loss = float(module.train(tf.constant(x), tf.constant(y), tf.constant(0.5), tf.constant(0.0), tf.constant(0.0))["loss"])
        lite_loss = model.train_step(x, y, lr=0.5)
        assert abs(tf_loss - lite_loss) < 1e-5, (step, tf_loss, lite_loss)
    np.testing.assert_allclose(model.get_weights(), module.get_weights()["weights"].numpy(), atol=1e-5)


def test_litert_infer_matches_tensorflow(bundle):
    module = build_training_module(CONFIG, seed=3)
    model = LiteRTModel(bundle, infer_batch=3)
    x, _ = windows(np.random.default_rng(1), 7)
    np.testing.assert_allclose(model.logits(x), module.infer(tf.constant(x))["logits"].numpy(), atol=1e-5)


def test_padded_partial_batch_is_the_unpadded_step(bundle):
    module = build_training_module(CONFIG, seed=3)
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(2), 3)  # batch_size is 4: one PAD row is added
    y[0, -2:] = 0  # and PAD targets inside a row are ignored too
    lr = 0.3
    with tf.GradientTape() as tape:
        tf_loss = masked_cross_entropy(module.logits(tf.constant(x)), tf.constant(y), CONFIG.vocab_size)
    grads = tape.gradient(tf_loss, module.weights)
    expected = np.concatenate(
        [(w.numpy() - lr * tf.convert_to_tensor(g).numpy()).reshape(-1) for w, g in zip(module.weights, grads)])
    lite_loss = model.train_step(x, y, lr=lr)
    assert abs(float(tf_loss) - lite_loss) < 1e-5
    np.testing.assert_allclose(model.get_weights(), expected, atol=1e-5)


def test_fedprox_step_matches_tensorflow(bundle):
    module = build_training_module(CONFIG, seed=3)
    model = LiteRTModel(bundle)
    anchor = bundle.initial_weights + np.random.default_rng(5).normal(0, 0.1, CONFIG.param_count).astype(np.float32)
    module.set_anchor(tf.constant(anchor))
    model.set_anchor(anchor)
    rng = np.random.default_rng(4)
    mu = 0.7
    for _ in range(3):
        x, y = windows(rng, CONFIG.batch_size)
        tf_loss = float(module.train(tf.constant(x), tf.constant(y), tf.constant(0.2), tf.constant(mu), tf.constant(0.0))["loss"])
        assert abs(model.train_step(x, y, lr=0.2, mu=mu) - tf_loss) < 1e-4
    np.testing.assert_allclose(model.get_weights(), module.get_weights()["weights"].numpy(), atol=1e-5)


def learnable_windows(rng: np.random.Generator, n: int, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sequences with a deterministic successor rule, so a model gets confident."""
    words = config.vocab_size - 4
    start = rng.integers(0, words, size=(n, 1))
    ids = (start + 7 * np.arange(config.seq_len + 1)) % words + 4
    return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)


def test_int8_inference_is_smaller_and_agrees_with_float():
    config = ModelConfig(vocab_size=200, embed_dim=16, units=32, seq_len=6, batch_size=8)
    model = LiteRTModel(make_bundle(config, vocab(200), seed=0))
    rng = np.random.default_rng(0)
    x, y = learnable_windows(rng, 256, config)
    model.train(x, y, epochs=6, lr=1.0, rng=rng)
    weights = model.get_weights()
    int8 = export_int8_inference(model.bundle, weights)
    float_model = export_float_inference(model.bundle, weights)
    quantized = InferenceModel(int8, config)
    test_x, _ = learnable_windows(np.random.default_rng(1), 64, config)
    np.testing.assert_allclose(InferenceModel(float_model, config).logits(test_x), model.logits(test_x), atol=1e-5)
    agree = float(np.mean(quantized.top_k(test_x, 1) == model.top_k(test_x, 1)))
    print(f"int8 {len(int8)} B vs float {len(float_model)} B; top-1 agreement {agree:.4f}")
    assert len(int8) < 0.7 * len(float_model)  # small tensors (< 1024 values) stay float
    assert agree > 0.95


def test_reference_model_exports_and_trains(tmp_path):
    """The full-size default model: export time, bundle size, one litert step, int8 size."""
    config = ModelConfig()
    start = time.perf_counter()
    path = export_bundle(config, vocab(config.vocab_size), tmp_path / "ref.fbz")
    export_s = time.perf_counter() - start
    size = path.stat().st_size
    bundle = read_bundle(path)
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(0), 16, config)
    loss = model.train_step(x, y, lr=1.0)
    int8 = export_int8_inference(bundle, model.get_weights())
    float_model = export_float_inference(bundle, model.get_weights())
    x_test, _ = windows(np.random.default_rng(1), 32, config)
    agree = float(np.mean(InferenceModel(int8, config).top_k(x_test, 1) == model.top_k(x_test, 1)))
    print(f"reference export {export_s:.1f} s; bundle {size} B; first loss {loss:.3f}; "
          f"int8 model {len(int8)} B vs float {len(float_model)} B; top-1 agreement (1 step) {agree:.4f}")
    assert abs(loss - np.log(config.vocab_size)) < 0.5  # near-uniform start
    assert size < 4 * config.param_count * 1.2  # the graph's zero-initialized variables compress away
    assert len(int8) < 4 * config.param_count / 3.5  # one int8 copy of the tied embedding
    assert len(export_int8_inference(bundle, model.get_weights(), per_channel=True)) < len(float_model) / 2
