"""Plan (and optionally run) the BENCHMARK accuracy runs with DP-FedAvg beside the plain run.

The runs themselves are `fedboard simulate` on the shakespeare-speakers task (CPU-heavy:
5-10 minutes per 30-round run on 2 cores), so by default this script only PLANS them:

1. for each cohort size m it calibrates the noise multiplier z that reaches the target
   (epsilon, delta) after the given rounds (dp-accounting RDP, Poisson sampling with
   q = m / population), and prints the noise that lands on the averaged update: std
   z_upd * C / m per coordinate, norm about that times sqrt(P) against a signal <= C;
2. it prints the `fedboard simulate` command lines: the plain run, DP at the target, and
   DP with adaptive clipping, each writing its own report directory.

With --run it executes those commands one after the other. The DP aggregator is chosen
with ``--aggregation "dp:clip=C,noise=Z,expected=M[,adaptive]|mean"`` and ``--dp-delta``;
epsilon per round appears in each run's report.json (per_round[i].privacy).

    python bench/dp_accuracy.py --epsilon 8 --delta 1e-4 --rounds 30 [--cohorts 20 50 100] [--run]

Measured (30 rounds x 20 devices, over-selection 1.0, clip 1, z = 0.627, epsilon 7.99 at delta 1e-4,
runs/dp/eps8): top-1 0.0363 / top-3 0.0817 at round 30, against 0.0751 / 0.1673 for the plain run.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aggregator.dp import DPConfig, make_dp_aggregator  # noqa: E402
from aggregator.privacy_accounting import epsilon_for, noise_multiplier_for  # noqa: E402

P = 781_068
POPULATION = 309  # speakers of shakespeare-speakers: one device each
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def plan(epsilon: float, delta: float, rounds: int, cohorts: list[int], population: int, clip: float) -> list[dict]:
    rows = []
    for m in cohorts:
        q = m / population
        z = math.ceil(noise_multiplier_for(epsilon, delta, rounds, q) * 1e4) / 1e4  # rounded up: stays in budget
        adaptive = DPConfig(clip, z, m, adaptive=True) if 2 * (m / 20) > z else None
        spec = make_dp_aggregator(clip=clip, noise_multiplier=z, expected_clients=m).spec
        rows.append({
            "clients_per_round": m, "sampling_probability": q, "noise_multiplier": z,
            "epsilon": epsilon_for(rounds, z, q, delta), "delta": delta, "rounds": rounds,
            "noise_std_over_clip": z / m, "noise_norm_over_clip": z / m * math.sqrt(P),
            "spec": spec,
            "adaptive_spec": (make_dp_aggregator(clip=clip, noise_multiplier=z, expected_clients=m,
                                                 adaptive=True).spec if adaptive else None),
        })
    return rows


def commands(rows: list[dict], rounds: int, out_root: str) -> list[list[str]]:
    base = ["fedboard", "simulate", "--corpus", str(DATA), "--format", "speakers", "--rounds", str(rounds),
            "--over-selection", "1.0", "--no-progress"]
    cmds = [base + ["--clients-per-round", "20", "--out", f"{out_root}/plain"]]
    for row in rows:
        m = str(row["clients_per_round"])
        # same server optimizer as the plain run: it only post-processes the noised average
        dp = ["--clients-per-round", m, "--dp-delta", repr(row["delta"])]
        cmds.append(base + dp + ["--aggregation", row["spec"], "--out", f"{out_root}/dp-m{m}"])
        if row["adaptive_spec"]:
            cmds.append(base + dp + ["--aggregation", row["adaptive_spec"],
                                "--out", f"{out_root}/dp-adaptive-m{m}"])
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-4, help="well below 1 / population (309 devices)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohorts", type=int, nargs="+", default=[20])
    parser.add_argument("--population", type=int, default=POPULATION)
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clip (initial clip with adaptive)")
    parser.add_argument("--out-root", default="runs/dp")
    parser.add_argument("--run", action="store_true", help="execute the simulate commands (hours of CPU)")
    args = parser.parse_args(argv)
    rows = plan(args.epsilon, args.delta, args.rounds, args.cohorts, args.population, args.clip)
    cmds = commands(rows, args.rounds, args.out_root)
    print(json.dumps({"plan": rows, "commands": [shlex.join(c) for c in cmds]}, indent=2))
    if args.run:
        for cmd in cmds:
            print("running:", shlex.join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
