"""Aggregator intake speed: updates ingested per second at the reference model size.

"Ingested" is what the aggregator does with every update message it receives, through its
own code path (`Aggregator._handle_update`): parse and CRC-check the envelope, check the round
rules, decode the payload into a reused scratch buffer, check size, finiteness and the norm
bound, and add it to the running float64 sum. It is compared, in the same run, with a bare
numpy ``acc += w * v`` over the same vectors already decoded to float32 (the floor any
aggregator pays). A third figure adds the checkpoint writes (a batch of 16 per fsync) that
make the intake durable.

Run: ``python bench/aggregator_ingest.py [--updates 200] [--repeat 3] [--out FILE.json]``; one BLAS
thread; each figure is the best of the interleaved repeats (the machine is shared).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aggregator.intake import RoundState  # noqa: E402
from aggregator.server import Aggregator, AggregatorConfig, _OpenRound, _Pending  # noqa: E402
from models.bundle import Bundle  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from protocol.codec import parse_codec  # noqa: E402
from protocol.envelope import Envelope, Kind  # noqa: E402
from protocol.messages import RoundPlan  # noqa: E402
from protocol.signing import generate_keypair  # noqa: E402
from protocol.transport import MqttSettings  # noqa: E402

SPECS = ("q8", "ef|topk:0.01|q4|zstd")
POOL = 8
FAKE_TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(4096)


def reference_bundle() -> Bundle:
    config = ModelConfig()  # 781,068 parameters
    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(config.vocab_size - 4)]
    weights = np.random.default_rng(0).standard_normal(config.param_count).astype(np.float32) * 0.05
    return Bundle.create(config, {"format": "fedboard-vocab/1", "words": words}, FAKE_TFLITE, weights)


def private_key():
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(generate_keypair()[0], None)


def make_aggregator(bundle: Bundle, spec: str, n: int, checkpoint_dir: str | None) -> Aggregator:
    cfg = AggregatorConfig(fleet="bench", clients_per_round=n, over_selection=1.0, codec=spec,
                           max_update_norm=1e6, checkpoint_dir=checkpoint_dir, checkpoint_batch=16)
    agg = Aggregator(cfg, bundle, MqttSettings(), private_key())  # never connected: intake only
    plan = RoundPlan(1, 0, bundle.model_id, parse_codec(spec).spec, n, 1.0, 60.0)
    devices = [f"dev-{i:05d}" for i in range(n)]
    agg._round = _OpenRound(plan, "reporting", time.time(), time.time(), cohort=devices, goal=n)
    agg._state = RoundState(1, 0, plan.codec, set(devices))
    agg._aggregate.reset(agg.dim)
    agg._client.ack = lambda mid, qos: 0  # nothing to acknowledge to: no broker in this bench
    agg._client.publish = lambda *a, **k: None
    return agg


def messages(spec: str, vectors: list[np.ndarray], n: int) -> tuple[list[bytes], list[np.ndarray]]:
    codec = parse_codec(spec)
    payloads, decoded = [], []
    for i, v in enumerate(vectors):
        payload = codec.encode(v, rng=np.random.default_rng(i)).payload
        payloads.append(payload)
        decoded.append(codec.decode(payload, v.size))
    data = [Envelope(Kind.UPDATE, "bench", f"dev-{i:05d}", 1, 0, 50, codec.spec, {"train_loss": 3.0},
                     payloads[i % POOL]).encode() for i in range(n)]
    return data, decoded


def ingest(bundle: Bundle, spec: str, data: list[bytes], checkpoint_dir: str | None) -> tuple[float, int]:
    agg = make_aggregator(bundle, spec, len(data), checkpoint_dir)
    try:
        start = time.perf_counter()
        for i, message in enumerate(data):
            agg._handle_update(f"dev-{i:05d}", message, _Pending(0, 0))
            if checkpoint_dir and (i + 1) % 16 == 0:
                agg.flush()
        if checkpoint_dir:
            agg.flush()
        elapsed = time.perf_counter() - start
        assert len(agg._state.accepted) == len(data), f"only {len(agg._state.accepted)} accepted: {agg.rejections}"
        return elapsed, agg._store.bytes_written if agg._store else 0
    finally:
        agg.stop()


def raw_numpy(decoded: list[np.ndarray], n: int) -> float:
    acc = np.zeros(decoded[0].size, np.float64)
    w = np.float32(50.0)
    for v in decoded:  # warm up: page in the buffers, as the aggregator's are after its first update
        acc += w * v
    acc.fill(0.0)
    start = time.perf_counter()
    for i in range(n):
        acc += w * decoded[i % POOL]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="best of N interleaved runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle = reference_bundle()
    dim = bundle.param_count
    rng = np.random.default_rng(1)
    vectors = [(rng.standard_normal(dim) * 0.01).astype(np.float32) for _ in range(POOL)]
    mb_per_update = dim * 4 / 1e6
    rows = []
    for spec in SPECS:
        data, decoded = messages(spec, vectors, args.updates)
        raw_s = ingest_s = durable_s = float("inf")
        for _ in range(args.repeat):  # interleaved, best of: the machine is shared
            raw_s = min(raw_s, raw_numpy(decoded, args.updates))
            ingest_s = min(ingest_s, ingest(bundle, spec, data, None)[0])
            with tempfile.TemporaryDirectory(prefix="fedboard-bench-ckpt-") as tmp:
                elapsed, written = ingest(bundle, spec, data, tmp)
                durable_s = min(durable_s, elapsed)
        n = args.updates
        row = {
            "codec": parse_codec(spec).spec, "updates": n, "message_bytes": len(data[0]),
            "bits_per_parameter": round(8 * len(data[0]) / dim, 3),
            "ingest_updates_per_s": round(n / ingest_s, 1),
            "ingest_f32_mb_per_s": round(n * mb_per_update / ingest_s, 1),
            "durable_ingest_updates_per_s": round(n / durable_s, 1),
            "checkpoint_mb_written": round(written / 1e6, 1),
            "raw_numpy_updates_per_s": round(n / raw_s, 1),
            "raw_numpy_f32_mb_per_s": round(n * mb_per_update / raw_s, 1),
            "ingest_vs_raw_numpy": round(raw_s / ingest_s, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"bench": "aggregator_ingest", "params": dim, "rows": rows, "threads": 1,
              "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
