"""Speed and size of the update codec on one core, against a plain numpy copy as the baseline.

For a 781,068-value float32 update (the reference CIFG-LSTM; values normal * 1e-3, like a
weight delta) and each common spec, measures encode, decode and decode_accumulate in MB/s of
float32 input (n * 4 bytes per second), payload bytes, bits per parameter, and the ratio of
each speed to `np.copyto` of the same vector measured in the same run. Prints a table and
writes JSON (--out FILE, default stdout).

    python bench/codec_speed.py [--repeat 7] [--out codec_speed.json] [--specs q8 'ef|sign|zstd']
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one core, as on a device or one server worker

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protocol.codec import parse_codec  # noqa: E402

N_PARAMS = 781_068
DEFAULT_SPECS = [
    "f32", "f16", "q8", "q8:det", "q4", "q2", "q1", "sign", "f32|zstd", "q8|zstd", "q4|zstd",
    "topk:0.01", "topk:0.01|q8|zstd", "topk:0.1|q4", "randk:0.1,unbiased|q8",
    "ef|topk:0.01|q4|zstd", "clip:5|ef|topk:0.02|q4|zstd", "ef|sign|zstd", "ef|q2|zstd",
]


def best_seconds(fn, repeat: int) -> float:
    """Fastest of `repeat` timed calls after one warm-up (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(spec: str, vec: np.ndarray, repeat: int, copy_mbps: float) -> dict:
    codec = parse_codec(spec)
    rng = np.random.default_rng(1)
    mb = vec.nbytes / 1e6
    residual = np.zeros_like(vec) if codec.uses_error_feedback else None
    result = codec.encode(vec, residual=residual, rng=rng)
    acc = np.zeros(vec.size, dtype=np.float64)
    enc_s = best_seconds(lambda: codec.encode(vec, residual=residual, rng=rng), repeat)
    dec_s = best_seconds(lambda: codec.decode(result.payload, vec.size), repeat)
    acc_s = best_seconds(lambda: codec.decode_accumulate(result.payload, acc, 0.5), repeat)
    decoded = codec.decode(result.payload, vec.size)
    rel_err = float(np.linalg.norm(decoded - vec) / np.linalg.norm(vec))
    row = {
        "spec": codec.spec, "bytes": len(result.payload),
        "bits_per_param": round(codec.bits_per_parameter(len(result.payload), vec.size), 4),
        "ratio_vs_f32": round(vec.nbytes / len(result.payload), 2),
        "rel_l2_error": round(rel_err, 5),
        "encode_mbps": round(mb / enc_s, 1), "decode_mbps": round(mb / dec_s, 1),
        "accumulate_mbps": round(mb / acc_s, 1),
    }
    for key in ("encode", "decode", "accumulate"):
        row[f"{key}_vs_copy"] = round(row[f"{key}_mbps"] / copy_mbps, 4)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default="-", help="JSON output file, '-' for stdout")
    parser.add_argument("--specs", nargs="*", default=DEFAULT_SPECS)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):  # Linux: stay on one core for the whole run
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    vec = (np.random.default_rng(0).standard_normal(N_PARAMS) * 1e-3).astype(np.float32)
    target = np.empty_like(vec)
    copy_s = best_seconds(lambda: np.copyto(target, vec), max(args.repeat, 20))
    copy_mbps = vec.nbytes / 1e6 / copy_s
    rows = [measure(spec, vec, args.repeat, copy_mbps) for spec in args.specs]

    head = f"{'spec':32s} {'bytes':>9s} {'bits/p':>7s} {'x f32':>7s} {'relerr':>8s} " \
           f"{'enc MB/s':>9s} {'dec MB/s':>9s} {'acc MB/s':>9s} {'dec/copy':>8s} {'acc/copy':>8s}"
    print(f"np.copyto baseline: {copy_mbps:.0f} MB/s ({copy_s * 1e3:.3f} ms for {vec.nbytes} bytes)", file=sys.stderr)
    print(head, file=sys.stderr)
    for r in rows:
        print(f"{r['spec']:32s} {r['bytes']:9d} {r['bits_per_param']:7.3f} {r['ratio_vs_f32']:7.1f} "
              f"{r['rel_l2_error']:8.4f} {r['encode_mbps']:9.1f} {r['decode_mbps']:9.1f} "
              f"{r['accumulate_mbps']:9.1f} {r['decode_vs_copy']:8.3f} {r['accumulate_vs_copy']:8.3f}", file=sys.stderr)
    report = {
        "n_params": N_PARAMS, "values": "normal * 1e-3, float32", "repeat": args.repeat,
        "accumulator_dtype": "float64", "weight": 0.5,
        "copy_baseline_mbps": round(copy_mbps, 1), "rows": rows,
        "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "pinned_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    text = json.dumps(report, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
