"""Secure aggregation over MQTT against the plain round: bytes and seconds per round, measured.

Where bench/secagg_cost.py times the protocol in memory, this runs `fedboard simulate` twice
(the same fleet, seed and settings; the second with `--secure-aggregation`): real devices
train, the real aggregator runs the four phases through the embedded broker, and each
round's report row holds what it cost. The table compares per round: uplink and downlink
bytes, round wall seconds, and for the secure run the wall seconds of each phase, the
server's compute seconds, and the bytes a device sends and receives in each phase.

    python bench/secagg_round.py [--rounds 3] [--devices 40] [--clients-per-round 20] [--out runs/secagg-round]
    python bench/secagg_round.py --reports runs/plain/report.json runs/secagg-bench/report.json   # no new run

Seconds include the wait for the slowest device's training, which dominates on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("advertise", "share", "mask", "unmask")


def run_pair(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plain and the secure simulation with the same settings; their reports."""
    from device_sim.simulate import SimConfig, run_simulation

    common = dict(corpus=args.corpus, format=args.format, devices=args.devices, rounds=args.rounds,
                  clients_per_round=args.clients_per_round, over_selection=1.0, seed=args.seed, progress=False,
                  eval_every=args.rounds)
    out = Path(args.out)
    plain = run_simulation(SimConfig(out=str(out / "plain"), **common))
    secure = run_simulation(SimConfig(out=str(out / "secure"), secure_aggregation=True, secagg_bits=args.bits,
                                      **common))
    return plain, secure


def summarize(plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, Any]:
    """Means over the committed rounds of each run, and the secure run's per-phase figures."""
    def mean(rows: list[dict], key: str) -> float:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(values) if values else float("nan")

    p_rows = [r for r in plain["per_round"] if r.get("committed")]
    s_rows = [r for r in secure["per_round"] if r.get("committed")]
    out: dict[str, Any] = {
        "params": secure["params"], "clients_per_round": secure["clients_per_round"],
        "plain": {"uplink_bytes_per_round": mean(p_rows, "uplink_bytes"),
                  "downlink_bytes_per_round": mean(p_rows, "downlink_bytes"),
                  "round_wall_s": mean(p_rows, "round_wall_s") if p_rows and "round_wall_s" in p_rows[0]
                  else mean(p_rows, "wall_s"),
                  "uplink_bytes_per_update": plain["uplink_bytes_per_update"], "codec": plain["codec"],
                  "rounds_committed": len(p_rows)},
        "secure": {"uplink_bytes_per_round": mean(s_rows, "uplink_bytes"),
                   "downlink_bytes_per_round": mean(s_rows, "downlink_bytes"),
                   "round_wall_s": mean(s_rows, "round_wall_s") if s_rows and "round_wall_s" in s_rows[0]
                   else mean(s_rows, "wall_s"),
                   "uplink_bytes_per_update": secure["uplink_bytes_per_update"], "rounds_committed": len(s_rows)},
    }
    sa_rows = [r["secagg"] for r in s_rows if "secagg" in r]
    if sa_rows:
        out["secure"]["phase_wall_s"] = {p: statistics.fmean(s["phase_s"].get(p, 0.0) for s in sa_rows) for p in PHASES}
        out["secure"]["server_compute_s"] = {p: statistics.fmean(s["server_compute_s"].get(p, 0.0) for s in sa_rows)
                                             for p in PHASES}
        out["secure"]["device_up_bytes"] = {p: statistics.fmean(v for s in sa_rows for v in s["up_bytes"][p].values())
                                            for p in PHASES if any(s["up_bytes"][p] for s in sa_rows)}
        out["secure"]["device_down_bytes"] = {
            p: statistics.fmean(v for s in sa_rows for v in s["down_bytes"][p].values())
            for p in PHASES if any(s["down_bytes"][p] for s in sa_rows)}
        out["secure"]["grid"] = sa_rows[0].get("params", {})
        out["secure"]["survivors_mean"] = statistics.fmean(len(s["survivors"]) for s in sa_rows)
    return out


def print_table(summary: dict[str, Any]) -> None:
    p, s = summary["plain"], summary["secure"]
    print(f"P = {summary['params']:,} parameters, {summary['clients_per_round']} devices a round "
          f"(plain: {p['rounds_committed']} committed rounds, codec {p['codec']}; secure: {s['rounds_committed']})")
    print(f"{'':28} {'plain':>14} {'secure':>14} {'ratio':>7}")
    for key in ("uplink_bytes_per_round", "downlink_bytes_per_round", "uplink_bytes_per_update", "round_wall_s"):
        ratio = s[key] / p[key] if p[key] else float("nan")
        print(f"{key:28} {p[key]:>14,.2f} {s[key]:>14,.2f} {ratio:>7.2f}")
    if "phase_wall_s" in s:
        print(f"{'secure phase':14} {'wall s':>8} {'server s':>9} {'up B/device':>13} {'down B/device':>14}")
        for phase in PHASES:
            print(f"{phase:14} {s['phase_wall_s'][phase]:>8.3f} {s['server_compute_s'][phase]:>9.4f} "
                  f"{s['device_up_bytes'].get(phase, 0):>13,.0f} {s['device_down_bytes'].get(phase, 0):>14,.0f}")
        print(f"grid: {s['grid']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", nargs=2, metavar=("PLAIN", "SECURE"), help="compare two report.json files")
    parser.add_argument("--corpus", default=None, help="default: the built-in synthetic corpus")
    parser.add_argument("--format", default=None)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, default=20)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/secagg-round")
    args = parser.parse_args(argv)
    if args.reports:
        plain, secure = (json.loads(Path(p).read_text()) for p in args.reports)
    else:
        plain, secure = run_pair(args)
    summary = summarize(plain, secure)
    print_table(summary)
    if not args.reports:
        (Path(args.out) / "secagg_round.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
