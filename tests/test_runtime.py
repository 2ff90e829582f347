"""LiteRTModel: on-device training through ai-edge-litert, with TensorFlow blocked."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.config import ModelConfig
from models.runtime import LiteRTModel, TrainResult, top_k_from_logits

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=80, embed_dim=12, units=24, seq_len=8, batch_size=4)


def vocab(n: int) -> dict:
    return {"format": "fedboard-vocab/1", "words": ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(n - 4)]}


def windows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(2, CONFIG.vocab_size, size=(n, CONFIG.seq_len + 1), dtype=np.int32)
    return ids[:, :-1].copy(), ids[:, 1:].copy()


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    from models.export import export_bundle  # TensorFlow, in this process only

    return export_bundle(CONFIG, vocab(CONFIG.vocab_size), tmp_path_factory.mktemp("rt") / "b.fbz", seed=1)


@pytest.fixture(scope="module")
def bundle(bundle_path):
    from models.bundle import read_bundle

    return read_bundle(bundle_path)


NO_TF_TRAINING = r"""
import importlib.abc, json, sys

class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError("TensorFlow is blocked in this process: " + name)
        return None

sys.meta_path.insert(0, BlockTensorFlow())
import numpy as np
from models.bundle import read_bundle
from models.runtime import LiteRTModel

bundle = read_bundle(sys.argv[1])
model = LiteRTModel(bundle)
rng = np.random.default_rng(0)
c = bundle.config
ids = rng.integers(2, c.vocab_size, size=(c.batch_size, c.seq_len + 1)).astype(np.int32)
x, y = ids[:, :-1], ids[:, 1:]
losses = [model.train_step(x, y, lr=3.0) for _ in range(30)]
w = model.get_weights()
model.set_weights(w)
print(json.dumps({
    "losses": losses,
    "roundtrip": bool(np.array_equal(model.get_weights(), w)),
    "moved": float(np.abs(w - bundle.initial_weights).max()),
    "tf_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")),
}))
"""


def test_trains_in_a_process_where_tensorflow_cannot_be_imported(bundle_path):
    """THE key property: a device trains the exported bundle with ai-edge-litert alone."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TF_TRAINING, str(bundle_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tf_loaded"] == []
    losses = out["losses"]
    assert losses[0] == pytest.approx(np.log(CONFIG.vocab_size), abs=0.3)
    assert losses[-1] < 0.8 * losses[0], losses  # memorizing one batch: the loss falls clearly
    assert all(b < a for a, b in zip(losses[:10], losses[1:11]))
    assert out["roundtrip"] and out["moved"] > 0


def test_weights_round_trip_bit_exact(bundle):
    model = LiteRTModel(bundle)
    np.testing.assert_array_equal(model.get_weights(), bundle.initial_weights)
    w = np.random.default_rng(3).standard_normal(model.dim).astype(np.float32)
    model.set_weights(w)
    got = model.get_weights()
    assert got.dtype == np.float32 and got.shape == (CONFIG.param_count,)
    assert got.tobytes() == w.tobytes()
    got[:] = 0  # a copy: the model is unaffected
    assert model.get_weights().tobytes() == w.tobytes()


def test_set_weights_rejects_wrong_input(bundle):
    model = LiteRTModel(bundle)
    p = model.dim
    with pytest.raises(ValueError, match="float32"):
        model.set_weights(np.zeros(p, np.float64))
    with pytest.raises(ValueError, match="shape"):
        model.set_weights(np.zeros(p + 1, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        model.set_anchor(np.full(p, np.inf, np.float32))
    np.testing.assert_array_equal(model.get_weights(), bundle.initial_weights)


def test_train_step_input_checks(bundle):
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(0), 5)
    with pytest.raises(ValueError, match="1..4 rows"):
        model.train_step(x, y, lr=0.1)  # more rows than the static batch
    with pytest.raises(ValueError, match="outside 0..79"):
        model.train_step(x[:2] + 100, y[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        model.train_step(x[:, :5], y[:, :5], lr=0.1)
    with pytest.raises(ValueError, match="integer"):
        model.train_step(x[:2].astype(np.float32), y[:2], lr=0.1)


def test_partial_batch_gives_the_same_step_as_a_padded_one(bundle):
    """Padding is internal: 3 rows, or the same 3 rows plus an explicit PAD row, are one step."""
    x, y = windows(np.random.default_rng(1), 3)
    a, b = LiteRTModel(bundle), LiteRTModel(bundle)
    loss_a = a.train_step(x, y, lr=0.5)
    padded_x = np.vstack([x, np.zeros((1, CONFIG.seq_len), np.int32)])
    padded_y = np.vstack([y, np.zeros((1, CONFIG.seq_len), np.int32)])
    loss_b = b.train_step(padded_x, padded_y, lr=0.5)
    assert loss_a == loss_b
    np.testing.assert_array_equal(a.get_weights(), b.get_weights())


def test_train_epochs_steps_and_determinism(bundle):
    x, y = windows(np.random.default_rng(2), 10)  # 3 steps per epoch (4 + 4 + 2)
    a, b = LiteRTModel(bundle), LiteRTModel(bundle)
    ra = a.train(x, y, epochs=2, lr=0.5, rng=np.random.default_rng(9))
    rb = b.train(x, y, epochs=2, lr=0.5, rng=np.random.default_rng(9))
    assert isinstance(ra, TrainResult)
    assert (ra.steps, ra.examples, ra.stopped) == (6, 20, False)
    assert ra == rb
    np.testing.assert_array_equal(a.get_weights(), b.get_weights())
    assert ra.last_loss < ra.first_loss
    assert min(ra.first_loss, ra.last_loss) <= ra.mean_loss <= max(ra.first_loss, ra.last_loss) + 1


def test_should_stop_is_asked_before_every_step(bundle):
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(3), 12)
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 4

    result = model.train(x, y, epochs=5, lr=0.1, rng=np.random.default_rng(0), should_stop=should_stop)
    assert (result.steps, result.examples, result.stopped) == (4, 16, True)
    assert len(asked) == 5
    stopped_at_once = model.train(x, y, epochs=1, lr=0.1, rng=np.random.default_rng(0), should_stop=lambda: True)
    assert stopped_at_once.steps == 0 and stopped_at_once.stopped and np.isnan(stopped_at_once.mean_loss)


def test_max_steps_caps_training(bundle):
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(4), 12)
    result = model.train(x, y, epochs=10, lr=0.1, rng=np.random.default_rng(0), max_steps=7)
    assert (result.steps, result.examples, result.stopped) == (7, 28, False)


def test_fedprox_pulls_towards_the_anchor(bundle):
    x, y = windows(np.random.default_rng(5), 8)
    anchor = bundle.initial_weights
    plain, prox = LiteRTModel(bundle), LiteRTModel(bundle)
    plain.train(x, y, epochs=5, lr=0.5, rng=np.random.default_rng(0))
    prox.train(x, y, epochs=5, lr=0.5, rng=np.random.default_rng(0), mu=1.0)
    assert np.linalg.norm(prox.get_weights() - anchor) < 0.9 * np.linalg.norm(plain.get_weights() - anchor)


def test_logits_chunking_and_top_k(bundle):
    x, _ = windows(np.random.default_rng(6), 11)
    whole = LiteRTModel(bundle, infer_batch=64).logits(x)
    chunked_model = LiteRTModel(bundle, infer_batch=4)
    chunked = chunked_model.logits(x)
    assert whole.shape == (11, CONFIG.seq_len, CONFIG.vocab_size) and whole.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    top = chunked_model.top_k(x, k=3)
    assert top.shape == (11, CONFIG.seq_len, 3)
    np.testing.assert_array_equal(top, np.argsort(-chunked, axis=-1, kind="stable")[..., :3])
    starts = [s for s, _ in chunked_model.iter_logits(x)]
    assert starts == [0, 4, 8]


def test_top_k_from_logits_orders_best_first():
    logits = np.array([[0.1, 5.0, -1.0, 3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(top_k_from_logits(logits, 3), [[1, 4, 3]])
    with pytest.raises(ValueError):
        top_k_from_logits(logits, 6)


def test_anchor_defaults_to_the_bundle_weights_when_fedprox_needs_it(bundle):
    """The anchor is set on first need: mu > 0 without set_anchor pulls towards the bundle's weights."""
    x, y = windows(np.random.default_rng(7), 8)
    implicit, explicit, elsewhere = LiteRTModel(bundle), LiteRTModel(bundle), LiteRTModel(bundle)
    explicit.set_anchor(bundle.initial_weights)
    elsewhere.set_anchor(bundle.initial_weights + np.float32(0.5))
    for model in (implicit, explicit, elsewhere):
        model.train(x, y, epochs=3, lr=0.5, rng=np.random.default_rng(0), mu=1.0)
    np.testing.assert_array_equal(implicit.get_weights(), explicit.get_weights())
    assert not np.array_equal(implicit.get_weights(), elsewhere.get_weights())


def test_close_frees_the_interpreter_and_refuses_later_use(bundle):
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(8), 4)
    model.train_step(x, y, lr=0.1)
    assert not model.closed
    model.close()
    model.close()  # twice is harmless
    assert model.closed
    for call in (model.get_weights, lambda: model.train_step(x, y, lr=0.1), lambda: model.logits(x),
                 lambda: model.set_weights(bundle.initial_weights)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


class _ResizeSpy:
    """Wraps the interpreter's native wrapper and records every input resize it is asked for."""

    def __init__(self, wrapper) -> None:
        self._wrapper = wrapper
        self.resizes: list[tuple[int, tuple[int, ...]]] = []

    def ResizeInputTensor(self, index, shape, strict, subgraph):  # noqa: N802 (the runtime's name)
        self.resizes.append((int(index), tuple(int(d) for d in np.asarray(shape))))
        return self._wrapper.ResizeInputTensor(index, shape, strict, subgraph)

    def __getattr__(self, name):
        return getattr(self._wrapper, name)


def test_no_signature_input_is_ever_resized_to_zero_dimensions(bundle, monkeypatch):
    """The aarch64 LiteRT build segfaults resizing a 0-d input (memset of 4n - 4 bytes for n = 0).

    The `train` signature has 0-d inputs (lr, mu, clip): the runtime must never ask the
    interpreter to resize them, in any signature, on any path a device takes."""
    from ai_edge_litert.interpreter import Interpreter

    spies: list[_ResizeSpy] = []
    real_init = Interpreter.__init__

    def spying_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        spy = _ResizeSpy(self._interpreter)
        self._interpreter = spy
        spies.append(spy)

    details = Interpreter(model_content=bundle.tflite).get_signature_runner("train").get_input_details()
    train_inputs = {name: tuple(d["shape"]) for name, d in details.items()}
    monkeypatch.setattr(Interpreter, "__init__", spying_init)
    model = LiteRTModel(bundle, infer_batch=3)
    scalars = sorted(name for name, shape in train_inputs.items() if shape == ())
    assert scalars == ["clip", "lr", "mu"], train_inputs  # what makes the hazard real
    rng = np.random.default_rng(0)
    x, y = windows(rng, 10)
    model.train(x, y, epochs=1, lr=0.1, rng=rng, mu=0.01, clip=1.0)  # includes a padded last batch
    model.train_step(x[:1], y[:1], lr=0.2)
    model.set_anchor(model.get_weights())
    model.set_weights(model.get_weights())
    model.logits(x[:7])  # chunks of 3, 3, 1: the dynamic infer batch resizes
    model.top_k(x[:2])
    assert len(spies) == 1
    resizes = spies[0].resizes
    assert resizes, "the dynamic infer batch should have been resized at least once"
    assert all(len(shape) > 0 and min(shape) > 0 for _, shape in resizes), resizes


def test_a_scalar_input_given_as_a_vector_is_refused_not_resized(bundle):
    model = LiteRTModel(bundle)
    x, y = windows(np.random.default_rng(1), CONFIG.batch_size)
    with pytest.raises(ValueError, match="input 'lr'"):
        model._train(x=x, y=y, lr=np.array([0.1], np.float32), mu=np.float32(0), clip=np.float32(0))
