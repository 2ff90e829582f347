"""Memory and speed of the streaming aggregators at the reference model size.

Shows two things and prints them as JSON:
1. memory: the peak RSS growth of a process that adds N updates of 781,068 float32 values
   (the reference CIFG-LSTM) to an aggregator, for N = 100 and N = 1,000. For the streaming
   `WeightedMean` it must not grow with N; the buffering `CoordinateMedian` is measured beside
   it for contrast (it grows by 4 x 781,068 bytes per update, by design). Each case runs in a
   fresh subprocess so that one case's allocations cannot hide another's.
2. speed: updates per second of `WeightedMean.add` against a bare numpy ``acc += w * v`` loop
   over the same vectors, in the same process, with the ratio.

Run: ``python bench/aggregation_memory.py [--out FILE.json]``. Pinned to one BLAS thread.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aggregator.aggregation import make_aggregator  # noqa: E402

PARAMS = 781_068  # reference model (BENCHMARK.md)
POOL = 4  # distinct update vectors cycled through; a fixed cost shared by every case
MB = 1024 * 1024

MEMORY_CASES = [
    ("mean", "add", 100),
    ("mean", "add", 1000),
    ("mean", "decode_into", 100),
    ("mean", "decode_into", 1000),
    ("clip:10|mean", "add", 1000),
    ("mean:float32", "add", 1000),
    ("median:100", "add", 25),
    ("median:100", "add", 50),
]


def _pool(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(PARAMS, dtype=np.float32) * 0.01 for _ in range(POOL)]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_memory_case(spec: str, path: str, updates: int) -> dict:
    """One case, meant to run alone in a fresh process."""
    proc = psutil.Process()
    pool = _pool()
    rss_baseline = proc.memory_info().rss
    peak_before = _peak_rss_bytes()
    agg = make_aggregator(spec)
    agg.reset(PARAMS)
    trace = []
    t0 = time.perf_counter()
    for i in range(updates):
        v = pool[i % POOL]
        weight = float(1 + i % 97)
        if path == "add":
            agg.add(v, weight, client_id=f"dev{i}")
        else:
            def decode_into(acc: np.ndarray, w: float, v: np.ndarray = v) -> None:
                acc += np.float32(w) * v  # stands in for codec.decode_accumulate

            agg.add_decoded_into(decode_into, weight, client_id=f"dev{i}")
        if (i + 1) % max(1, updates // 5) == 0:
            trace.append({"updates": i + 1, "rss_mb": round(proc.memory_info().rss / MB, 1)})
    result = agg.result()
    elapsed = time.perf_counter() - t0
    peak_after = _peak_rss_bytes()
    assert result.shape == (PARAMS,) and np.isfinite(result).all()
    return {
        "spec": spec,
        "path": path,
        "updates": updates,
        "rss_baseline_mb": round(rss_baseline / MB, 1),
        "peak_rss_before_adds_mb": round(peak_before / MB, 1),
        "peak_rss_mb": round(peak_after / MB, 1),
        "peak_growth_mb": round((peak_after - rss_baseline) / MB, 1),
        "rss_trace": trace,
        "seconds": round(elapsed, 3),
    }


def _run_in_subprocess(spec: str, path: str, updates: int) -> dict:
    cmd = [sys.executable, __file__, "--case", spec, path, str(updates)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout)


def _best_rates(fns: list, n: int, repeats: int) -> list[float]:
    """Best-of-``repeats`` rate of each function, run interleaved so that load from other
    processes on this shared machine hits all of them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return [n / b for b in best]


def run_speed(updates: int = 300, repeats: int = 7) -> list[dict]:
    pool = _pool(1)
    weights = [float(1 + i % 97) for i in range(updates)]
    rows = []
    for spec, acc_dtype in (("mean", np.float64), ("mean:float32", np.float32), ("clip:10|mean", np.float64)):
        def raw() -> None:
            acc = np.zeros(PARAMS, dtype=acc_dtype)
            for i in range(updates):
                acc += weights[i] * pool[i % POOL]

        def aggregated() -> None:
            agg = make_aggregator(spec)
            agg.reset(PARAMS)
            for i in range(updates):
                agg.add(pool[i % POOL], weights[i])
            agg.result()

        raw_rate, agg_rate = _best_rates([raw, aggregated], updates, repeats)
        rows.append({
            "spec": spec,
            "raw_loop": f"acc({np.dtype(acc_dtype).name}) += w * v",
            "aggregator_updates_per_s": round(agg_rate, 1),
            "raw_updates_per_s": round(raw_rate, 1),
            "ratio_aggregator_over_raw": round(agg_rate / raw_rate, 3),
            "aggregator_ms_per_update": round(1000 / agg_rate, 3),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, metavar=("SPEC", "PATH", "UPDATES"),
                        help="internal: run one memory case in this process")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    if args.case:
        spec, path, updates = args.case
        print(json.dumps(run_memory_case(spec, path, int(updates))))
        return

    memory = [_run_in_subprocess(*case) for case in MEMORY_CASES]
    by = {(m["spec"], m["path"], m["updates"]): m["peak_growth_mb"] for m in memory}
    report = {
        "params": PARAMS,
        "update_mb": round(PARAMS * 4 / MB, 2),
        "memory": memory,
        "mean_growth_1000_minus_100_mb": round(by[("mean", "add", 1000)] - by[("mean", "add", 100)], 1),
        "mean_decode_growth_1000_minus_100_mb": round(
            by[("mean", "decode_into", 1000)] - by[("mean", "decode_into", 100)], 1),
        "median_growth_per_update_mb": round(
            (by[("median:100", "add", 50)] - by[("median:100", "add", 25)]) / 25, 2),
        "speed": run_speed(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
