"""How large a fleet `fedboard simulate` holds on this machine, through a real Mosquitto.

Two measurements, each in its own process (so its peak RSS is its own), against a private
Mosquitto started here with our raised open-file limit (it inherits it):

- `train`: the `iot-pis` scenario grown to N connected devices (default 1,000), G reporting
  per round (default 50; the scenario over-selects 1.2x), R rounds (default 10), real TFLite
  training on the shared interpreter pool (one per core). Per round:

      overhead = 1 - pool_busy_s / (pool_size x round_wall_s)

  where round_wall_s runs from just before the round is opened (the simulator counting the
  eligible devices, the plan, every check-in, cohort selection, assignments, model download,
  uploads, the commit and the publication of the new model) to the aggregator's return, and
  pool_busy_s is the time interpreters were leased inside that interval (set_weights, the
  training steps, get_weights of each device's run). Between rounds the simulator evaluates
  the global model on the pooled test set; that is not part of any round and not counted.
  `overhead_by_phase` splits the idle interpreter-seconds over the round's phases (prepare,
  checkin, assign, first_model, training, commit: device_sim/round_profile.py); the shares add
  up to `overhead_overall`.
  Also: the simulator's peak RSS (VmHWM) and Mosquitto's RSS after the last round.
- `idle`: the same scenario with N devices (default 10,000) all connected, through one round
  in which one device trains (clients_per_round = 1; check-in window 60 wall s, closed as soon
  as every eligible device checked in): simulator RSS (VmHWM and current), Mosquitto RSS
  (psutil on its pid), how long connecting took and how many devices checked in.

The bundle is exported once beforehand in a separate process, so TensorFlow is never imported
by the measured processes (check `tensorflow_imported`). The model has the reference
dimensions (embedding 96, 256 units, vocabulary up to 5,000: the scenario's 300-user built-in
corpus has 1,147 words, so 406,939 parameters); ten rounds take about 1.5 minutes on 2 cores.
A smaller model (e.g. --embed-dim 64 --units 128) trains less per round, so the fixed
per-round cost of 1,000 devices weighs more in the overhead.

    python bench/fleet_scale.py [train|idle|all] [--devices N] [--idle-devices N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCENARIO = "iot-pis"


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _sim_config(args: argparse.Namespace, *, devices: int, goal: int, rounds: int, broker: str, out: str):
    from device_sim.simulate import config_from_scenario

    return config_from_scenario(
        SCENARIO, devices=devices, clients_per_round=goal, rounds=rounds, broker=broker, mqtt_version=5,
        vocab_size=args.vocab_size, embed_dim=args.embed_dim, units=args.units, progress=False, out=out,
        timelines=4, speedup=args.speedup, checkin_window_s=args.checkin_window_s,
        report_deadline_s=args.deadline_s, **({"over_selection": 1.0} if goal == 1 else {}),
    )


def warm_bundle(args: argparse.Namespace) -> None:
    """Export (or find in the cache) the bundle the measured runs will use; this process may import TF."""
    from device_sim.scenario import load_scenario
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.task import build_task

    sc = load_scenario(SCENARIO)
    cfg = _sim_config(args, devices=1, goal=1, rounds=1, broker="127.0.0.1:1", out="/dev/null")
    task = build_task(sc.corpus.read(seed=cfg.seed), vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    config = ModelConfig(vocab_size=task.vocab.size, embed_dim=cfg.embed_dim, units=cfg.units, seq_len=cfg.seq_len,
                         batch_size=cfg.batch_size)
    bundle = get_or_export_bundle(config, task.vocab.to_json(), seed=cfg.seed, target_counts=task.target_counts())
    print(json.dumps({"model_id": bundle.model_id, "params": bundle.param_count}))


def measure(args: argparse.Namespace) -> None:
    """One measurement (`args.kind`), run in a child process; prints one JSON object."""
    import psutil

    from device_sim.simulate import run_simulation

    broker = psutil.Process(args.broker_pid)
    samples: dict[str, float] = {}
    connect: dict[str, float] = {}
    started = time.monotonic()

    def on_start(devices) -> None:
        connect["connect_s"] = time.monotonic() - started
        samples["broker_rss_connected_mb"] = broker.memory_info().rss / 2**20
        samples["sim_rss_connected_mb"] = psutil.Process().memory_info().rss / 2**20

    def on_round(row) -> None:
        samples["broker_rss_mb"] = broker.memory_info().rss / 2**20
        samples["sim_rss_mb"] = psutil.Process().memory_info().rss / 2**20

    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as out:
        if args.kind == "train":
            cfg = _sim_config(args, devices=args.devices, goal=args.clients_per_round, rounds=args.rounds,
                              broker=args.broker, out=out)
        else:
            # 10,000 plans and check-ins go through one hub thread: give the window time (it closes
            # as soon as every eligible device checked in)
            if not args.checkin_window_s:
                args.checkin_window_s = 60.0
            cfg = _sim_config(args, devices=args.idle_devices, goal=1, rounds=1, broker=args.broker, out=out)
        report = run_simulation(cfg, on_start=on_start, on_round=on_round)
    from device_sim.round_profile import overhead_table

    rows = report["per_round"]
    overheads = [1.0 - r["pool_busy_s"] / (r["pool_size"] * r["round_wall_s"]) for r in rows]
    result = {
        "kind": args.kind, "scenario": SCENARIO, "devices_connected": report["fleet"]["devices"],
        "rounds": len(rows), "clients_per_round": cfg.clients_per_round, "over_selection": cfg.over_selection,
        "model": report["model"], "params": report["params"], "pool_size": rows[0]["pool_size"],
        **{k: round(v, 2) for k, v in connect.items()},
        "sim_peak_rss_mb": round(_vm_kib("VmHWM") / 1024, 1),
        **{k: round(v, 1) for k, v in samples.items()},
        "tensorflow_imported": "tensorflow" in sys.modules,
        "per_round": [{"round": r["round"], "committed": r["committed"], "checkins": r["checkins"],
                       "cohort": r["cohort"], "participants": r["participants"],
                       "round_wall_s": round(r["round_wall_s"], 3), "pool_busy_s": round(r["pool_busy_s"], 3),
                       "overhead": round(o, 4),
                       "idle_by_phase": {k: round(v, 3) for k, v in r.get("idle_by_phase", {}).items()}}
                      for r, o in zip(rows, overheads)],
        "participation": report["fleet"]["participation"],
        "dropouts_by_cause": report["fleet"]["dropouts_by_cause"],
        "top3": report["top3"], "wall_s": round(report["wall_s"], 1),
    }
    if args.kind == "train":
        total_busy = sum(r["pool_busy_s"] for r in rows)
        total_wall = sum(r["round_wall_s"] * r["pool_size"] for r in rows)
        result["overhead_overall"] = round(1.0 - total_busy / total_wall, 4)
        result["overhead_median_round"] = round(sorted(overheads)[len(overheads) // 2], 4)
        result["round_wall_s_median"] = round(sorted(r["round_wall_s"] for r in rows)[len(rows) // 2], 3)
        result["overhead_by_phase"] = overhead_table(rows)
    print("RESULT " + json.dumps(result))


def _child(args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "_child", *extra, "--vocab-size", str(args.vocab_size), "--embed-dim",
           str(args.embed_dim), "--units", str(args.units), "--speedup", str(args.speedup), "--checkin-window-s",
           str(args.checkin_window_s), "--deadline-s", str(args.deadline_s)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="all", choices=("all", "train", "idle", "_child", "_warm"))
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--idle-devices", type=int, default=10000)
    parser.add_argument("--vocab-size", type=int, default=5000)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--speedup", type=float, default=0.0, help="sim s per wall s (default: the scenario's, 60)")
    parser.add_argument("--checkin-window-s", type=float, default=0.0, help="wall s (default: the scenario's)")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="wall s (default: the scenario's)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--kind", choices=("train", "idle"), help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.what == "_child":
        measure(args)
        return
    if args.what == "_warm":
        warm_bundle(args)
        return

    from device_sim.mosquitto import MosquittoBroker
    from device_sim.report import machine
    from edge_client.mqtt_hub import raise_fd_limit

    subprocess.run([sys.executable, __file__, "_warm", "--vocab-size", str(args.vocab_size), "--embed-dim",
                    str(args.embed_dim), "--units", str(args.units)], cwd=ROOT, check=True, capture_output=True)
    fd_limit = raise_fd_limit(4 * max(args.devices, args.idle_devices) + 1024)  # Mosquitto inherits it
    results: dict = {"machine": machine(), "load_average_before": list(os.getloadavg()), "fd_limit": fd_limit}
    for kind in (("train", "idle") if args.what == "all" else (args.what,)):
        with MosquittoBroker("max_connections -1\n") as broker:
            extra = ["--kind", kind, "--broker", str(broker.address), "--broker-pid", str(broker.proc.pid),
                     "--devices", str(args.devices), "--clients-per-round", str(args.clients_per_round),
                     "--rounds", str(args.rounds), "--idle-devices", str(args.idle_devices)]
            results[kind] = _child(args, extra)
        results[f"load_average_after_{kind}"] = list(os.getloadavg())
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
