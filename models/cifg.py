"""The reference CIFG-LSTM keyboard language model as a TFLite-trainable tf.Module.

Written so that its training step converts to TFLite *builtin* ops only and so
trains on devices through ai-edge-litert without TensorFlow (DESIGN.md, "Facts
measured here"): a static train batch, a Python-unrolled recurrence over
`tf.unstack`ed time steps, no strided-slice or ReLU gradients, the embedding
gradient densified with `tf.convert_to_tensor`, and SGD written with
`assign_sub`. Weights travel as ONE flat float32 vector in the order of
`models.bundle.weight_layout`.

Imports TensorFlow: only the server side builds and exports models.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from models.bundle import WeightSpec, weight_layout
from models.config import ModelConfig

__all__ = ["CIFGModule", "build_training_module", "initial_weights", "masked_cross_entropy", "unigram_log_prior"]

logger = logging.getLogger(__name__)

PAD_ID = 0
# f = 1 - i, so an input-gate bias of -1 starts the cell remembering
# (f ~ 0.73), the CIFG counterpart of Keras' unit_forget_bias=True.
INPUT_GATE_BIAS = -1.0


EMBED_INIT = 0.3
"""Half-width of the uniform embedding init. With tied output weights, Keras' 0.05 keeps the
logits (and so the gradient into the LSTM) tiny and SGD sits on a unigram plateau for
hundreds of steps; 0.3 leaves it in tens (measured on the built-in corpus, lr 5, clip 5)."""


def unigram_log_prior(counts: np.ndarray) -> np.ndarray:
    """Output-bias start: log frequency of each id as a target (add-one smoothed, mean 0).

    Starting at the unigram solution lets training spend its first steps on context, not on
    learning word frequencies. The counts are the ones the vocabulary was built from.
    """
    counts = np.asarray(counts, dtype=np.float64)
    logp = np.log((counts + 1.0) / (counts + 1.0).sum())
    return logp - logp.mean()


def initial_weights(config: ModelConfig, seed: int = 0, *, embed_init: float = EMBED_INIT,
                    output_prior: np.ndarray | None = None) -> np.ndarray:
    """Deterministic starting weights (numpy, so they do not depend on TF's RNG).

    Uniform(+-embed_init) embedding, Glorot-uniform kernels and projection, orthogonal
    recurrent kernel, zero biases except the input gate; the output bias is
    `output_prior` (see `unigram_log_prior`) when given, else zero.
    """
    rng = np.random.default_rng(seed)
    v, e, u = config.vocab_size, config.embed_dim, config.units

    def glorot(shape: tuple[int, int]) -> np.ndarray:
        limit = np.sqrt(6.0 / (shape[0] + shape[1]))
        return rng.uniform(-limit, limit, size=shape)

    def orthogonal(shape: tuple[int, int]) -> np.ndarray:
        rows, cols = shape
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        return q.T if rows < cols else q

    if output_prior is not None and np.shape(output_prior) != (v,):
        raise ValueError(f"output_prior must have {v} values, got {np.shape(output_prior)}")
    bias = np.zeros(3 * u)
    bias[:u] = INPUT_GATE_BIAS
    parts = {
        "embedding": rng.uniform(-embed_init, embed_init, size=(v, e)),
        "cifg/kernel": glorot((e, 3 * u)),
        "cifg/recurrent_kernel": orthogonal((u, 3 * u)),
        "cifg/bias": bias,
        "projection": glorot((u, e)),
        "output_bias": np.zeros(v) if output_prior is None else np.asarray(output_prior, dtype=np.float64),
    }
    flat = np.concatenate([parts[s.name].reshape(-1) for s in weight_layout(config)])
    return flat.astype(np.float32)


def masked_cross_entropy(logits: tf.Tensor, y: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Mean next-token cross-entropy over targets != PAD.

    Written with one-hot and log-softmax (not the sparse CE op, which is not a
    TFLite builtin); padded rows and positions contribute nothing, so a partial
    batch padded with PAD rows gives exactly the unpadded loss.
    """
    y_flat = tf.reshape(y, [-1])
    mask = tf.cast(tf.not_equal(y_flat, PAD_ID), tf.float32)
    log_probs = tf.nn.log_softmax(tf.reshape(logits, [-1, vocab_size]))
    target = tf.one_hot(y_flat, vocab_size, dtype=tf.float32) * mask[:, None]
    count = tf.maximum(tf.reduce_sum(mask), 1.0)
    return -tf.reduce_sum(target * log_probs) / count


class CIFGModule(tf.Module):
    """Variables, forward pass and the exported signatures of the CIFG model."""

    def __init__(self, config: ModelConfig, weights: np.ndarray, name: str = "cifg") -> None:
        super().__init__(name=name)
        self.config = config
        self.layout: tuple[WeightSpec, ...] = weight_layout(config)
        p = config.param_count
        if weights.shape != (p,):
            raise ValueError(f"weights must be float32[{p}], got shape {weights.shape}")
        self.weights = [
            tf.Variable(weights[s.offset : s.offset + s.size].reshape(s.shape), dtype=tf.float32,
                        name=s.name.replace("/", "_"))
            for s in self.layout
        ]
        # FedProx anchor (the round's global weights), set by `set_anchor`.
        self.anchor = tf.Variable(tf.zeros([p], tf.float32), name="anchor")
        b, t = config.batch_size, config.seq_len
        ids = tf.TensorSpec([b, t], tf.int32)
        scalar = tf.TensorSpec([], tf.float32)
        flat = tf.TensorSpec([p], tf.float32)
        self.train = tf.function(self._train, input_signature=[ids, ids, scalar, scalar, scalar])
        self.infer = tf.function(self._infer, input_signature=[tf.TensorSpec([None, t], tf.int32)])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=[flat])
        self.set_anchor = tf.function(self._set_anchor, input_signature=[flat])

    # ------------------------------------------------------------ the model
    def logits(self, x: tf.Tensor) -> tf.Tensor:
        """Logits [batch, T, V] for input ids [batch, T] (batch may be dynamic)."""
        c = self.config
        v, e, u, t = c.vocab_size, c.embed_dim, c.units, c.seq_len
        emb, kernel, rec, bias, proj, out_bias = self.weights
        embedded = tf.gather(emb, x)  # [B, T, E]
        batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        # One matmul for the input contribution of all time steps.
        z_in = tf.matmul(tf.reshape(embedded, [-1, e]), kernel) + bias
        z_steps = tf.unstack(tf.reshape(z_in, [batch, t, 3 * u]), num=t, axis=1)
        outputs = []
        h = c_state = None
        for z in z_steps:
            if h is not None:  # the state starts at zero: skip the first recurrent matmul
                z = z + tf.matmul(h, rec)
            zi, zg, zo = tf.split(z, 3, axis=1)
            i = tf.sigmoid(zi)
            g = tf.tanh(zg)
            o = tf.sigmoid(zo)
            c_state = i * g if c_state is None else c_state + i * (g - c_state)  # f = 1 - i
            h = o * tf.tanh(c_state)
            outputs.append(h)
        hs = tf.reshape(tf.stack(outputs, axis=1), [-1, u])
        projected = tf.matmul(hs, proj)  # [B*T, E]
        logits = tf.matmul(projected, emb, transpose_b=True) + out_bias  # tied output
        return tf.reshape(logits, [batch, t, v])

    def flat_weights(self) -> tf.Tensor:
        return tf.concat([tf.reshape(w, [-1]) for w in self.weights], axis=0)

    # ----------------------------------------------------------- signatures
    def _train(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, mu: tf.Tensor,
               clip: tf.Tensor) -> dict[str, tf.Tensor]:
        """One SGD step on loss = CE + mu/2 * ||w - anchor||^2; returns the loss before the step.

        The CE gradient is clipped to global L2 norm `clip` (0 = off), as recurrent language
        models need: without it a larger learning rate blows up on a rare long-range gradient.
        """
        with tf.GradientTape() as tape:
            ce = masked_cross_entropy(self.logits(x), y, self.config.vocab_size)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(ce, self.weights)]
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in grads]))
        scale = tf.where(clip > 0.0, clip / tf.maximum(norm, clip), tf.constant(1.0))
        prox = tf.constant(0.0)
        for w, g, spec in zip(self.weights, grads, self.layout):
            # the proximal gradient mu * (w - anchor) is added by hand: no gradient
            # through a concat of all weights, and the same builtin ops either way
            anchor = tf.reshape(tf.slice(self.anchor, [spec.offset], [spec.size]), spec.shape)
            diff = w - anchor
            prox += tf.reduce_sum(diff * diff)
            w.assign_sub(lr * (g * scale + mu * diff))
        return {"loss": ce + 0.5 * mu * prox}

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"logits": self.logits(x)}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"weights": self.flat_weights()}

    def _set_weights(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        for w, spec in zip(self.weights, self.layout):
            w.assign(tf.reshape(tf.slice(weights, [spec.offset], [spec.size]), spec.shape))
        return {"count": tf.constant(self.config.param_count, tf.int32)}

    def _set_anchor(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        self.anchor.assign(weights)
        return {"count": tf.constant(self.config.param_count, tf.int32)}

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {
            "train": self.train.get_concrete_function(),
            "infer": self.infer.get_concrete_function(),
            "get_weights": self.get_weights.get_concrete_function(),
            "set_weights": self.set_weights.get_concrete_function(),
            "set_anchor": self.set_anchor.get_concrete_function(),
        }


def build_training_module(config: ModelConfig, seed: int = 0) -> CIFGModule:
    """A CIFG module with deterministic initial weights from `seed`."""
    return CIFGModule(config, initial_weights(config, seed))
