"""Cost of secure aggregation against the plain round: bytes and seconds, per device and server.

For cohorts of n devices (default 10, 20, 50) and updates of P values (default the
reference model, 781,068), runs one in-process round of protocol/secagg (every message
serialised and parsed, real X25519 / AES-GCM / AES-CTR / Shamir) with no dropout, with a
third of the cohort dropping after sharing keys (the server rebuilds their s_sk and removes
|dropped| x |survivors| pairwise masks: its expensive case) and with a third dropping after
sending their masked input (only their self-mask seeds are rebuilt). The plain round beside
it: each device encodes its update with the codec (f32 and q8), the server runs
decode_accumulate into a float64 sum, as the aggregator's intake does.

Seconds are one core (thread env vars set to 1 before numpy loads); the device figures are
the mean over the cohort of each device's compute for all four phases (quantize + mask
included), the server figure is everything the server computes in the round. Network time
is not modelled: bytes are reported instead. Envelope and MQTT headers (about 80 bytes a
message; secure aggregation adds 3 messages up and 3 down per device) are not counted.

    python bench/secagg_cost.py [--clients 10 20 50] [--dim 781068] [--bits 32 16] [--out secagg_cost.json]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protocol.codec import parse_codec  # noqa: E402
from protocol.secagg.driver import PHASES, simulate_secagg_round  # noqa: E402
from protocol.secagg.quantize import sum_error_bound  # noqa: E402

N_PARAMS = 781_068
VALUE_RANGE = 0.01  # per-coordinate clip; the updates below are N(0, 1e-3^2), so nothing is clipped


def make_updates(n: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev-{i:03d}": (rng.standard_normal(dim, dtype=np.float32) * np.float32(1e-3)) for i in range(n)}


def plain_round(updates: dict[str, np.ndarray], spec: str) -> dict:
    codec = parse_codec(spec)
    rng = np.random.default_rng(1)
    enc_s, payloads = [], []
    for u in updates.values():
        start = time.perf_counter()
        payloads.append(codec.encode(u, rng=rng).payload)
        enc_s.append(time.perf_counter() - start)
    dim = next(iter(updates.values())).size
    acc = np.zeros(dim, dtype=np.float64)
    start = time.perf_counter()
    for p in payloads:
        codec.decode_accumulate(p, acc, 1.0)
    server_s = time.perf_counter() - start
    return {"codec": codec.spec, "device_up_bytes": int(np.mean([len(p) for p in payloads])),
            "device_down_bytes": 0, "device_s": float(np.mean(enc_s)), "server_s": server_s}


def secagg_round(updates: dict[str, np.ndarray], bits: int, dropout: str) -> dict:
    devices = sorted(updates)
    n = len(devices)
    gone = set(devices[1::3][: n // 3]) if dropout != "none" else set()
    threshold = n - len(gone) if gone else max(2, (2 * n) // 3)
    kwargs = {"dropouts_after_masking": gone} if dropout == "after_masking" else {"dropouts_before_masking": gone}
    start = time.perf_counter()
    t = simulate_secagg_round(updates, threshold, bits=bits, value_range=VALUE_RANGE, keep_views=False, **kwargs)
    wall = time.perf_counter() - start
    survivors = t.result.survivors
    plain = np.zeros(t.params.dim, dtype=np.float64)
    for d in survivors:
        plain += updates[d]
    err = float(np.abs(t.float_sum - plain).max())
    bound = sum_error_bound(len(survivors), t.params)
    assert err <= bound, (err, bound)

    def mean_over_devices(table: dict[str, dict[str, float]], phases=PHASES) -> float:
        return float(np.mean([sum(table[p].get(d, 0) for p in phases) for d in devices if d not in gone]))

    return {
        "bits": bits, "dropout": dropout, "dropped": len(gone), "threshold": threshold,
        "survivors": len(survivors), "step": t.params.step, "max_abs_error": err, "error_bound": bound,
        "device_up_bytes": int(mean_over_devices(t.up_bytes)),
        "device_up_bytes_by_phase": {p: int(np.mean(list(t.up_bytes[p].values()) or [0])) for p in PHASES},
        "device_down_bytes": int(mean_over_devices(t.down_bytes)),
        "device_s": mean_over_devices(t.client_s),
        "device_s_by_phase": {p: float(np.mean(list(t.client_s[p].values()) or [0])) for p in PHASES},
        "server_s": float(sum(t.server_s.values())),
        "server_s_by_phase": dict(t.server_s),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--dim", type=int, default=N_PARAMS)
    parser.add_argument("--bits", type=int, nargs="+", default=[32])
    parser.add_argument("--dropouts", nargs="+", default=["none", "before_masking", "after_masking"],
                        choices=["none", "before_masking", "after_masking"])
    parser.add_argument("--plain", nargs="+", default=["f32", "q8"], help="codec specs of the plain baseline")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    warm = make_updates(3, args.dim)  # first calls pay for OpenSSL and numpy set-up: not the round's cost
    plain_round(warm, args.plain[0])
    secagg_round(warm, args.bits[0], "none")
    del warm
    rows = []
    for n in args.clients:
        updates = make_updates(n, args.dim)
        for spec in args.plain:
            rows.append({"n": n, "kind": "plain", **plain_round(updates, spec)})
            _print(rows[-1])
        for bits in args.bits:
            for dropout in args.dropouts:
                rows.append({"n": n, "kind": "secagg", **secagg_round(updates, bits, dropout)})
                _print(rows[-1])
        del updates
    report = {"bench": "secagg_cost", "dim": args.dim, "value_range": VALUE_RANGE, "rows": rows,
              "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


def _print(row: dict) -> None:
    label = row.get("codec") or f"secagg{row['bits']} {row['dropout']}"
    print(f"n={row['n']:3d} {label:28s} up {row['device_up_bytes']:>10,d} B  down {row['device_down_bytes']:>8,d} B  "
          f"device {row['device_s']:7.3f} s  server {row['server_s']:7.3f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
