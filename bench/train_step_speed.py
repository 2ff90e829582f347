"""Training steps per second of the reference model: ai-edge-litert against TensorFlow.

Both run the same tf.Module in the same process on the same batches (batch 16,
one thread each by default), timed in alternating blocks (median reported), so
the ratio is what a device gives up by training without TensorFlow. Prints one
JSON object to stdout.

    python bench/train_step_speed.py [--steps 100] [--rounds 5] [--warmup 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def time_blocks(steps: dict, batches, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each runtime, timed in alternating blocks.

    Alternating (A, B, A, B, ...) spreads the noise of a shared machine over both
    runtimes instead of charging it to whichever happened to run during a burst.
    """
    for step in steps.values():
        for x, y in batches[:warmup]:
            step(x, y)
    timed = batches[warmup:]
    per_round = max(1, len(timed) // rounds)
    results: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        block = timed[r * per_round : (r + 1) * per_round] or timed[:per_round]
        for name, step in steps.items():
            start = time.perf_counter()
            for x, y in block:
                step(x, y)
            results[name].append((time.perf_counter() - start) / len(block))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per runtime")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing blocks (median reported)")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import ai_edge_litert

    from models.bundle import read_bundle
    from models.cifg import build_training_module
    from models.config import ModelConfig
    from models.export import export_bundle
    from models.runtime import LiteRTModel

    config = ModelConfig()
    vocab = {"format": "fedboard-vocab/1", "words": ["<pad>", "<oov>", "<bos>", "<eos>"]
             + [f"w{i}" for i in range(config.vocab_size - 4)]}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_bundle(config, vocab, Path(tmp) / "reference.fbz", seed=0)
        export_s = time.perf_counter() - start
        bundle_bytes = path.stat().st_size
        bundle = read_bundle(path)

    rng = np.random.default_rng(0)
    n = args.warmup + args.steps
    ids = rng.integers(4, config.vocab_size, size=(n, config.batch_size, config.seq_len + 1), dtype=np.int32)
    batches = [(w[:, :-1].copy(), w[:, 1:].copy()) for w in ids]

    model = LiteRTModel(bundle, num_threads=args.threads)
    module = build_training_module(config, seed=0)
    lr, mu = tf.constant(args.lr, tf.float32), tf.constant(0.0, tf.float32)
    clip = tf.constant(5.0, tf.float32)  # the default device setting, on both sides
    per_step = time_blocks(
        {
            "litert": lambda x, y: model.train_step(x, y, args.lr, 0.0, 5.0),
            "tensorflow": lambda x, y: float(module.train(tf.constant(x), tf.constant(y), lr, mu, clip)["loss"]),
        },
        batches, args.warmup, args.rounds,
    )
    litert_s = float(np.median(per_step["litert"]))
    tf_s = float(np.median(per_step["tensorflow"]))

    print(json.dumps({
        "model": "cifg",
        "params": config.param_count,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "threads": args.threads,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "litert_steps_per_s": round(1 / litert_s, 3),
        "litert_s_per_step": round(litert_s, 5),
        "tensorflow_steps_per_s": round(1 / tf_s, 3),
        "tensorflow_s_per_step": round(tf_s, 5),
        "litert_over_tensorflow_time": round(litert_s / tf_s, 3),
        "litert_s_per_step_by_round": [round(v, 5) for v in per_step["litert"]],
        "tensorflow_s_per_step_by_round": [round(v, 5) for v in per_step["tensorflow"]],
        "bundle_bytes": bundle_bytes,
        "tflite_bytes": len(bundle.tflite),
        "float32_weight_bytes": 4 * config.param_count,
        "export_s": round(export_s, 2),
        "versions": {"tensorflow": tf.__version__, "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
                     "python": platform.python_version()},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }, indent=1))


if __name__ == "__main__":
    main()
