"""Byzantine devices on the BENCHMARK task: does robust aggregation keep top-3 within 1 %?

Runs `fedboard simulate` (through `run_simulation`) on shakespeare-speakers, 30 rounds x 20
clients, over-selection 1.0, seed 0, one run at a time, and prints one table:
top-1/top-3 at rounds 10/20/30, what became of the Byzantine updates (rejected with reason,
clipped), and the updates lost (goal minus accepted, summed over rounds).

    nice -n 10 python bench/byzantine_accuracy.py                     # the default runs
    nice -n 10 python bench/byzantine_accuracy.py --runs clean-mean   # one run
    python bench/byzantine_accuracy.py --table-only                   # reprint from the reports

Why a 30 s report deadline and min_reports 16: with over-selection 1.0 the cohort is exactly
the goal (20), so a rejected (NaN) update means the goal is never reached and the round waits
for its deadline; 600 s (the default) would make a run last hours, and without min_reports
below 20 the round would be abandoned. Clean rounds end as soon as all 20 reported, long
before 30 s, so these settings change nothing for them.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
ROBUST = "normclip:median*2|mean"
TRIMMED = "trimmed:0.1"
KRUM = "krum:f=2|mean"
KRUM4 = "krum:f=4|mean"  # a cohort of 20 with 10 % attackers holds more than 2 in about a third of rounds
NORMCLIP_KRUM = "normclip:median*2|krum:f=2|mean"
# Krum by direction only (sign flips of small updates are caught), the norm bounded in front of it.
NORMCLIP_KRUM_COS = "normclip:median*2|krum:f=2,cosine|mean"
NORMCLIP_KRUM4_COS = "normclip:median*2|krum:f=4,cosine|mean"


@dataclass(frozen=True)
class Run:
    name: str
    byzantine: str
    aggregation: str
    what: str


RUNS = {r.name: r for r in (
    Run("clean-mean", "", "mean", "clean, plain mean (the reference)"),
    Run("mixed-mean", "0.1:mixed", "mean", "10 % mixed Byzantine, plain mean (no defence)"),
    Run("mixed-robust", "0.1:mixed", ROBUST, "10 % mixed Byzantine, robust aggregation"),
    Run("clean-robust", "", ROBUST, "clean, robust aggregation (the defence's own cost)"),
    Run("scale20-mean", "0.1:scale=-20", "mean", "10 % scale x -20, plain mean (no defence)"),
    Run("scale20-robust", "0.1:scale=-20", ROBUST, "10 % scale x -20, robust aggregation"),
    Run("scale20-trimmed", "0.1:scale=-20", TRIMMED, "10 % scale x -20, coordinate-wise trimmed mean"),
    Run("clean-trimmed", "", TRIMMED, "clean, coordinate-wise trimmed mean (its own cost)"),
    Run("mixed-krum", "0.1:mixed", KRUM, "10 % mixed Byzantine, multi-Krum (f=2, keep n - f)"),
    Run("clean-krum", "", KRUM, "clean, multi-Krum (the defence's own cost)"),
    Run("mixed-krum4", "0.1:mixed", KRUM4, "10 % mixed Byzantine, multi-Krum (f=4, keep n - f)"),
    Run("clean-krum4", "", KRUM4, "clean, multi-Krum f=4 (the defence's own cost)"),
    Run("mixed-normclip-krum", "0.1:mixed", NORMCLIP_KRUM, "10 % mixed Byzantine, median norm clip then multi-Krum"),
    Run("clean-normclip-krum", "", NORMCLIP_KRUM, "clean, median norm clip then multi-Krum (its own cost)"),
    Run("mixed-normclip-krumcos", "0.1:mixed", NORMCLIP_KRUM_COS,
        "10 % mixed Byzantine, median norm clip then multi-Krum on directions"),
    Run("clean-normclip-krumcos", "", NORMCLIP_KRUM_COS, "clean, median norm clip then multi-Krum on directions"),
    Run("mixed-normclip-krum4cos", "0.1:mixed", NORMCLIP_KRUM4_COS,
        "10 % mixed Byzantine, median norm clip then multi-Krum f=4 on directions"),
    Run("clean-normclip-krum4cos", "", NORMCLIP_KRUM4_COS, "clean, median norm clip then multi-Krum f=4 on directions"),
)}
DEFAULT_RUNS = ("mixed-mean", "mixed-robust", "clean-robust")


def sim_config(run: Run, out: Path, seed: int = 0):
    from device_sim.simulate import SimConfig

    return SimConfig(corpus=str(CORPUS), format="speakers", rounds=30, clients_per_round=20, over_selection=1.0,
                     report_deadline_s=30.0, min_reports=16, seed=seed, byzantine=run.byzantine,
                     aggregation=run.aggregation, out=str(out), progress=False)


def command(run: Run, out: Path) -> str:
    """The equivalent `fedboard simulate` command line (needs the --byzantine flag in the CLI)."""
    parts = [f"fedboard simulate --corpus {CORPUS} --format speakers --rounds 30 --clients-per-round 20",
             "--over-selection 1.0 --deadline-s 30 --min-reports 16", f"--aggregation '{run.aggregation}'"]
    if run.byzantine:
        parts.append(f"--byzantine {run.byzantine}")
    parts.append(f"--out {out}")
    return " ".join(parts)


KRUM_LOG = "krum_dropped.log"  # in the run's directory: the aggregator's "krum: dropped" debug lines


def krum_dropped(run_dir: Path, report: dict) -> tuple[int, int] | None:
    """(Byzantine, honest) updates multi-Krum dropped over the run, from the debug lines the bench
    captured (the report itself counts only what a clipping stage did); None if not captured."""
    path = run_dir / KRUM_LOG
    if not path.exists():
        return None
    attackers = set(report.get("byzantine", {}).get("devices", {}))
    byz = honest = 0
    for line in path.read_text().splitlines():
        _, found, ids = line.partition(" updates: ")
        if found and line.startswith("krum: dropped"):
            for device in ast.literal_eval(ids):
                byz, honest = (byz + 1, honest) if device in attackers else (byz, honest + 1)
    return byz, honest


def capture_krum_drops(run_dir: Path) -> logging.Handler:
    """Write the aggregation module's debug lines (which updates Krum dropped) to the run's directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / KRUM_LOG, mode="w")
    handler.setLevel(logging.DEBUG)
    handler.addFilter(lambda record: record.getMessage().startswith("krum: dropped"))
    agg_logger = logging.getLogger("aggregator.aggregation")
    agg_logger.setLevel(logging.DEBUG)
    agg_logger.addHandler(handler)
    return handler


def row_of(run: Run, report: dict, run_dir: Path | None = None) -> dict:
    by_round = {r["round"]: r for r in report["per_round"]}
    acc = {f"top{k}@{n}": by_round[n][f"top{k}"] for n in (10, 20, 30) if n in by_round for k in (1, 3)}
    byz = report.get("byzantine", {}).get("totals", {})
    lost = sum(r.get("dropped", 0) for r in report["per_round"])
    rejected_all: dict[str, int] = {}
    for r in report["per_round"]:
        for reason, n in (r.get("rejected") or {}).items():
            rejected_all[reason] = rejected_all.get(reason, 0) + n
    return {"run": run.name, "what": run.what, "byzantine": run.byzantine or "-", "aggregation": run.aggregation,
            **acc, "top3": report["top3"], "byz_selected": byz.get("selected", 0),
            "byz_accepted": byz.get("accepted", 0), "byz_rejected": byz.get("rejected", {}),
            "byz_clipped": byz.get("clipped", 0),
            "honest_clipped": byz.get("honest_clipped") if "clip" in run.aggregation else None,
            "krum_dropped": krum_dropped(run_dir, report) if run_dir is not None and "krum" in run.aggregation
            else None,
            "rejected_all": rejected_all, "updates_lost": lost,
            "honest_lost": lost - sum(byz.get("rejected", {}).values()),
            "committed": sum(1 for r in report["per_round"] if r.get("committed", True)),
            "rounds": len(report["per_round"]), "wall_s": round(report["wall_s"], 1)}


def print_table(rows: list[dict]) -> None:
    print("| run | byzantine | aggregation | top-1 @10/20/30 | top-3 @10/20/30 | Byzantine selected / accepted "
          "/ rejected / clipped | honest clipped | Krum dropped Byzantine / honest | updates lost (honest) "
          "| rounds committed | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t1 = " / ".join(f"{r.get(f'top1@{n}', float('nan')):.4f}" for n in (10, 20, 30))
        t3 = " / ".join(f"{r.get(f'top3@{n}', float('nan')):.4f}" for n in (10, 20, 30))
        rej = ", ".join(f"{k} {v}" for k, v in r["byz_rejected"].items()) or "0"
        hc = "-" if r["honest_clipped"] is None else r["honest_clipped"]
        kd = r.get("krum_dropped")
        kd = "-" if kd is None else f"{kd[0]} / {kd[1]}"
        aggregation = r["aggregation"].replace("|", "\\|")  # a bare | would split the markdown cell
        print(f"| {r['run']} | {r['byzantine']} | `{aggregation}` | {t1} | {t3} | {r['byz_selected']} / "
              f"{r['byz_accepted']} / {rej} / {r['byz_clipped']} | {hc} | {kd} | "
              f"{r['updates_lost']} ({r['honest_lost']}) | {r['committed']}/{r['rounds']} | {r['wall_s']} |")
    by_name = {r["run"]: r for r in rows}
    clean = by_name.get("clean-mean")
    if clean is None:
        print("\n(no clean-mean report: run it with --runs clean-mean to get the within-1 % comparison)")
        return
    base = clean["top3"]
    print(f"\nagainst clean-mean top-3 {base:.4f} at round 30:")
    for r in rows:
        if r is clean:
            continue
        diff = r["top3"] - base
        rel = diff / base
        verdict = "within 1 %" if abs(rel) <= 0.01 else "NOT within 1 %"
        print(f"  {r['run']:<15} top-3 {r['top3']:.4f}: {100 * diff:+.2f} points, {100 * rel:+.2f} % relative "
              f"({verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help=f"comma-separated, from: {', '.join(RUNS)} (default: {','.join(DEFAULT_RUNS)})")
    parser.add_argument("--out-root", default="runs/byz",
                        help="each run writes <out-root>-<run>[-seed<N>]/report.json (the suffix for seed != 0)")
    parser.add_argument("--table-only", action="store_true", help="do not run; print the table of existing reports")
    parser.add_argument("--rerun", action="store_true", help="run again even if the run's report exists")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    suffix = f"-seed{args.seed}" if args.seed else ""
    if not args.table_only:
        from device_sim.simulate import run_simulation

        for name in names:
            out = Path(f"{args.out_root}-{name}{suffix}")
            if (out / "report.json").exists() and not args.rerun:
                print(f"{name}: report exists in {out} (--rerun to run it again)", flush=True)
                continue
            print(f"{name}: {command(RUNS[name], out)}", flush=True)
            handler = capture_krum_drops(out)
            try:
                report = run_simulation(sim_config(RUNS[name], out, args.seed))
            finally:
                logging.getLogger("aggregator.aggregation").removeHandler(handler)
                handler.close()
            print(f"{name}: top-3 {report['top3']:.4f}, {report['wall_s']:.0f} s", flush=True)
    rows = []
    for name in RUNS:
        run_dir = Path(f"{args.out_root}-{name}{suffix}")
        if (run_dir / "report.json").exists():
            rows.append(row_of(RUNS[name], json.loads((run_dir / "report.json").read_text()), run_dir))
    print(f"seed {args.seed}")
    print_table(rows)
    Path(f"{args.out_root}-table{suffix}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
