"""What the device client costs a Raspberry Pi-class device, with the reference model.

The real `fedboard client` (ClientApp from a generated client.toml) runs in its own process,
in which TensorFlow cannot be imported (a meta-path blocker, as in tests/test_no_tensorflow.py),
against a private Mosquitto and an aggregator in this process, on the benchmark's reference
model (CIFG-LSTM, vocabulary 5,004, 781,068 parameters) and the texts of one Shakespeare
speaker stored in its TextStore. Each repeat is a first boot (empty state directory: the
training bundle is fetched from the broker) followed by a restart (bundle cached); each runs
one full round, up to the aggregator's acknowledgement of the update. Measured:

- peak RSS of the client process through the round (its own VmHWM; psutil sampling from
  outside as a cross-check; NOT getrusage's ru_maxrss, which for a vfork+exec child also
  holds the parent's high-water mark)                                       target <= 150 MB
- cold start: process spawn to the first training step, with the phases in between (Python
  start-up, imports, bootstrap, round protocol and model download)          target < 2 s
- installed size of the `edge` extra against the `server` extra (bench/edge_install_size.py)
- training steps per second of the reference model in ai-edge-litert against TensorFlow, same
  process, same batches, one thread each, alternating blocks (bench/train_step_speed.py)

The machine may be shared: every figure is the median of the repeats, with the runs listed.

    python bench/client_footprint.py [--repeats 3] [--speaker NAME] [--steps 60] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BLOCKED = ("tensorflow", "keras", "tf_keras", "tensorboard", "jax", "torch")
FLEET = "bench"
TARGET_RSS_MB = 150.0
TARGET_COLD_START_S = 2.0
# The client as started by hand, and with the malloc environment of edge_client/deploy/
# fedboard-client.service (the client sets the same glibc knobs itself, edge_client.app.tune_malloc,
# unless the environment does: both variants should measure alike).
VARIANTS = {
    "default": {},
    "malloc_tuned": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
}
# Where the memory goes, in the order a round passes them (RSS at each and the peak so far).
PHASES = ("main", "imported", "bootstrapped", "selected", "interpreter_created", "first_step_start",
          "first_step_end", "trained", "interpreter_freed", "encoded", "sent", "ack", "stopped")


# =========================================================================== the device process
def _block_tensorflow() -> None:
    import importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked on the device: {name}")
            return None

    sys.meta_path.insert(0, Block())


def _memory_mb() -> dict[str, float]:
    """This process's memory now (Linux /proc/self/status): VmRSS, VmHWM (peak), RssAnon, RssFile.

    RssFile is mostly the shared libraries' code (numpy, LiteRT, OpenSSL), which is shared
    with other processes and can be paged out; RssAnon is what the client itself allocated.
    """
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


class _Marks(dict):
    """Wall-clock time of each phase (first occurrence) and the RSS at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.rss_mb: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if name not in self:
            self[name] = time.time()
            memory = _memory_mb()
            self.rss_mb[name] = memory.get("VmRSS", float("nan"))
            self.peak_mb[name] = memory.get("VmHWM", float("nan"))


def _marked(function, marks: _Marks, name: str, after: str = "selected"):
    """`function`, marking `name` when it returns (the first time once `after` is marked: the
    round's calls, not the start-up check that loads the bundle into an interpreter once)."""
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        if after in marks:
            marks.mark(name)
        return result

    return wrapper


def device_process(config_path: str, out_path: str, timeout_s: float) -> int:
    """The client, timed: runs until its update of one round is acknowledged, then reports."""
    marks = _Marks()
    marks.mark("main")
    _block_tensorflow()
    started = time.perf_counter()
    from edge_client.app import ClientApp
    from edge_client.client_config import load_client_config
    from edge_client.linux_platform import LinuxPlatform
    from edge_client.platform import StaticPlatform
    from models.runtime import LiteRTModel
    import_s = time.perf_counter() - started
    marks.mark("imported")

    from protocol.codec import Codec

    original_step = LiteRTModel.train_step

    def timed_step(self, *args, **kwargs):
        marks.mark("first_step_start")
        loss = original_step(self, *args, **kwargs)
        marks.mark("first_step_end")
        return loss

    LiteRTModel.train_step = timed_step
    # phase marks after the steps of a round that move memory (each records VmRSS and VmHWM)
    for cls, method, name in ((LiteRTModel, "__init__", "interpreter_created"),
                              (LiteRTModel, "get_weights", "trained"),
                              (LiteRTModel, "close", "interpreter_freed"),
                              (Codec, "encode", "encoded")):
        setattr(cls, method, _marked(getattr(cls, method), marks, name))
    done = threading.Event()
    outcome: dict = {}

    class TimedApp(ClientApp):
        def _on_event(self, name: str, fields: dict) -> None:
            marks.mark(name)
            super()._on_event(name, fields)
            if name == "ack":
                outcome["accepted"] = bool(fields.get("accepted"))
                done.set()

    config = load_client_config(Path(config_path))
    # The real Linux sensors, unless this machine has no network link (then an ideal device).
    platform = None if LinuxPlatform(idle_after_s=0).read().link_up else StaticPlatform()
    app = TimedApp(config, platform=platform)
    app.start()
    marks.mark("bootstrapped")
    finished = done.wait(timeout_s)
    marks.mark("done")
    stats = app.device.stats if app.device is not None else None
    app.stop()
    marks.mark("stopped")
    memory = _memory_mb()
    report = {
        "finished": finished, **outcome, "import_s": import_s, "marks": marks, "rss_mb_at": marks.rss_mb,
        "peak_rss_mb_by": marks.peak_mb,
        # VmHWM, not getrusage's ru_maxrss: a child started by vfork+exec inherits the PARENT's
        # high-water mark in ru_maxrss (Linux keeps the larger of the old and the new mm's).
        "peak_rss_mb": memory.get("VmHWM", float("nan")),
        "memory_at_end_mb": memory,
        "linux_platform": platform is None,
        "tensorflow_loaded": any(m.split(".")[0] in BLOCKED for m in sys.modules),
        "stats": vars(stats) if stats is not None else None,
    }
    Path(out_path).write_text(json.dumps(report))
    return 0 if finished and outcome.get("accepted") else 1


# =========================================================================== the bench process
def client_toml(directory: Path, port: int, public_key: Path, device: str) -> Path:
    path = directory / "client.toml"
    path.write_text(f"""
[device]
id = "{device}"
fleet = "{FLEET}"
state_dir = "state"
data = "state/texts.db"

[broker]
host = "127.0.0.1"
port = {port}
keepalive_s = 30
bootstrap_timeout_s = 60

[trust]
aggregator_public_key = "{public_key}"

[policy]
require_idle = false       # the bench machine is busy by definition
require_unmetered = false
max_cpu_temp_c = 200
min_free_memory_mb = 0

[training]
threads = 1
""")
    return path


class RssSampler(threading.Thread):
    """Samples a process's RSS from outside every `interval_s` (cross-check of VmHWM)."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval_s)

    def stop(self) -> float:
        self._halt.set()
        self.join(2)
        return self.peak / 2**20


def run_client_round(agg, directory: Path, toml: Path, timeout_s: float, env: dict[str, str]) -> dict:
    """One round with a fresh client process; returns the client's report plus outside figures."""
    from concurrent.futures import ThreadPoolExecutor

    out = directory / f"client-{time.time_ns()}.json"
    with ThreadPoolExecutor(1) as pool:
        round_future = pool.submit(agg.run_round)
        time.sleep(0.3)  # the plan is retained before the client starts: what a waking device finds
        spawned = time.time()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--device", str(toml), str(out),
                                 str(timeout_s)], cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, **env})
        sampler = RssSampler(proc.pid)
        sampler.start()
        output, _ = proc.communicate(timeout=timeout_s + 60)
        sampled_mb = sampler.stop()
        result = round_future.result(timeout=timeout_s)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"client process failed ({proc.returncode}):\n{output[-4000:]}")
    report = json.loads(out.read_text())
    m = report["marks"]
    report["phases_s"] = {
        "python_startup": m["main"] - spawned,
        "imports": m["imported"] - m["main"],
        "bootstrap": m["bootstrapped"] - m["imported"],  # retained model + bundle, trust, interpreter
        "to_selected": m["selected"] - m["bootstrapped"],  # connect, plan, check-in, cohort
        "model_download_to_first_step": m["first_step_start"] - m["selected"],
        "first_step": m["first_step_end"] - m["first_step_start"],
    }
    report["cold_start_s"] = m["first_step_start"] - spawned
    report["round_s"] = m["ack"] - spawned
    report["sampled_peak_rss_mb"] = sampled_mb
    report["aggregator"] = {"committed": result.committed, "participants": result.participants,
                            "uplink_bytes": result.uplink_bytes}
    return report


def summarize(by_kind: dict[str, list[dict]]) -> dict:
    """Medians (and the runs) of one variant's first boots and restarts."""
    runs = by_kind["first_boot"] + by_kind["restart"]
    peak = _median([r["peak_rss_mb"] for r in runs])
    return {
        "peak_rss_mb": {"median": peak, "max": round(max(r["peak_rss_mb"] for r in runs), 1),
                        "sampled_from_outside_median": _median([r["sampled_peak_rss_mb"] for r in runs]),
                        "file_backed_at_end_median": _median([r["memory_at_end_mb"].get("RssFile", 0.0) for r in runs]),
                        "runs": [round(r["peak_rss_mb"], 1) for r in runs]},
        "cold_start_s": {kind: _median([r["cold_start_s"] for r in rs]) for kind, rs in by_kind.items()},
        "cold_start_runs_s": {kind: [round(r["cold_start_s"], 3) for r in rs] for kind, rs in by_kind.items()},
        "import_s": _median([r["import_s"] for r in runs]),
        "phases_s_median": {name: _median([r["phases_s"][name] for r in runs]) for name in runs[0]["phases_s"]},
        "rss_mb_at_phase_median": {name: _median([r["rss_mb_at"][name] for r in runs if name in r["rss_mb_at"]])
                                   for name in runs[0]["rss_mb_at"]},
        "peak_rss_mb_by_phase_median": {name: _median([r["peak_rss_mb_by"][name] for r in runs
                                                       if name in r["peak_rss_mb_by"]])
                                        for name in runs[0]["peak_rss_mb_by"]},
        "round_s_median": _median([r["round_s"] for r in runs]),
        "train_steps_per_round": runs[0]["stats"]["train_steps"],
        "uplink_bytes_per_update": runs[0]["aggregator"]["uplink_bytes"],
    }


def pick_speaker(task, name: str | None) -> str:
    if name:
        if name not in task.devices:
            raise SystemExit(f"--speaker {name!r} is not a speaker of the corpus")
        return name
    return max(task.devices, key=lambda user: task.devices[user].n_train)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure_train_speed(bundle, task, steps: int, warmup: int, rounds: int) -> dict:
    """Reference model, litert vs TensorFlow, one thread each, the same real batches."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sys.path.insert(0, str(BENCH))
    from train_step_speed import time_blocks  # noqa: E402  (bench/ sibling)

    from models.cifg import build_training_module
    from models.runtime import LiteRTModel

    config = bundle.config
    x_all, y_all = task.pooled_train()
    rng = np.random.default_rng(0)
    n = warmup + steps
    idx = rng.choice(len(x_all), size=(n, config.batch_size), replace=len(x_all) < n * config.batch_size)
    batches = [(x_all[i], y_all[i]) for i in idx]
    lr, clip = 1.0, 5.0  # what a round asks for (client_lr, RoundPlan.clip_norm)
    litert = LiteRTModel(bundle, num_threads=1)
    module = build_training_module(config, seed=0)
    module.set_weights(tf.constant(bundle.initial_weights))
    tf_lr, tf_mu, tf_clip = tf.constant(lr, tf.float32), tf.constant(0.0, tf.float32), tf.constant(clip, tf.float32)
    per_step = time_blocks(
        {
            "litert": lambda x, y: litert.train_step(x, y, lr, 0.0, clip),
            "tensorflow": lambda x, y: float(module.train(tf.constant(x), tf.constant(y), tf_lr, tf_mu, tf_clip)["loss"]),
        },
        batches, warmup, rounds,
    )
    litert_s, tf_s = statistics.median(per_step["litert"]), statistics.median(per_step["tensorflow"])
    return {
        "litert_steps_per_s": round(1 / litert_s, 2), "tensorflow_steps_per_s": round(1 / tf_s, 2),
        "litert_over_tensorflow_time": round(litert_s / tf_s, 2),
        "litert_s_per_step_by_block": [round(v, 4) for v in per_step["litert"]],
        "tensorflow_s_per_step_by_block": [round(v, 4) for v in per_step["tensorflow"]],
        "timed_steps": steps, "blocks": rounds, "batch_size": config.batch_size, "threads": 1, "clip": clip,
        "tensorflow": tf.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="first boot + restart pairs (medians reported)")
    parser.add_argument("--speaker", help="whose texts the device holds (default: the speaker with most windows)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per runtime for the speed figure")
    parser.add_argument("--blocks", type=int, default=5, help="alternating timing blocks for the speed figure")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a client round may take")
    parser.add_argument("--no-speed", action="store_true", help="skip the litert vs TensorFlow speed figure")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from aggregator.server import Aggregator, AggregatorConfig
    from device_sim.mosquitto import MosquittoBroker
    from edge_client.textstore import TextStore
    from edge_install_size import size_report
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.corpus import read_corpus
    from models.partition import split_blocks
    from models.task import build_task
    from protocol.signing import write_keypair
    from protocol.topics import slugify
    from protocol.transport import MqttSettings

    corpus = read_corpus(DATA, "speakers")
    task = build_task(corpus, vocab_size=5000, seq_len=20)
    config = ModelConfig()
    assert task.vocab.size == config.vocab_size, (task.vocab.size, config.vocab_size)
    bundle = get_or_export_bundle(config, task.vocab.to_json(), target_counts=task.target_counts())
    speaker = pick_speaker(task, args.speaker)
    # the speaker's training blocks, as typed messages (a block with no words is no message)
    texts = [block for block in split_blocks(corpus.users[speaker])[0] if block.strip()]
    device_id = slugify(speaker, set())
    print(f"reference model {bundle.model_id}: {bundle.param_count:,} parameters; device {device_id} holds "
          f"{len(texts)} texts ({task.devices[speaker].n_train} windows)", file=sys.stderr)

    runs: dict[str, dict[str, list[dict]]] = {v: {"first_boot": [], "restart": []} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="fedboard-footprint-") as tmp, MosquittoBroker() as broker:
        tmp = Path(tmp)
        private_path, public_path = write_keypair(tmp / "keys")
        settings = MqttSettings(host="127.0.0.1", port=broker.port, keepalive_s=30)
        agg = Aggregator(AggregatorConfig(fleet=FLEET, clients_per_round=1, expected_checkins=1,
                                          checkin_window_s=args.timeout, report_deadline_s=args.timeout, codec="q8",
                                          downlink="f32", local_epochs=1, client_lr=1.0),
                         bundle, settings, load_pem_private_key(private_path.read_bytes(), None))
        agg.start()
        try:
            for repeat in range(args.repeats):
                for variant, env in VARIANTS.items():
                    directory = tmp / f"device-{repeat}-{variant}"
                    directory.mkdir()
                    toml = client_toml(directory, broker.port, public_path, device_id)
                    with TextStore(directory / "state" / "texts.db") as store:
                        store.add_many(texts)
                    for kind in ("first_boot", "restart"):
                        report = run_client_round(agg, directory, toml, args.timeout, env)
                        runs[variant][kind].append(report)
                        print(f"repeat {repeat + 1} {variant} {kind}: cold start {report['cold_start_s']:.2f} s, "
                              f"peak RSS {report['peak_rss_mb']:.1f} MB, round {report['round_s']:.1f} s "
                              f"({report['stats']['train_steps']} steps)", file=sys.stderr)
        finally:
            agg.stop()

    every = [r for by_kind in runs.values() for rs in by_kind.values() for r in rs]
    assert all(r["aggregator"]["committed"] and r["aggregator"]["participants"] == 1 for r in every)
    assert not any(r["tensorflow_loaded"] for r in every)
    summaries = {variant: summarize(by_kind) for variant, by_kind in runs.items()}
    install = size_report()
    speed = None
    if not args.no_speed:
        print("measuring training speed (litert vs TensorFlow)...", file=sys.stderr)
        speed = measure_train_speed(bundle, task, args.steps, 5, args.blocks)

    default = summaries["default"]
    peak, cold = default["peak_rss_mb"]["median"], default["cold_start_s"]
    report = {
        "model": {"model_id": bundle.model_id, "params": bundle.param_count, "vocab_size": config.vocab_size,
                  "embed_dim": config.embed_dim, "units": config.units, "batch_size": config.batch_size},
        "device": {"speaker": speaker, "texts": len(texts), "train_windows": task.devices[speaker].n_train,
                   "linux_platform": every[0]["linux_platform"], "threads": 1, "broker": "mosquitto (plain TCP)",
                   "local_epochs": 1, "codec": "q8"},
        "repeats": args.repeats,
        "targets": {"peak_rss_mb": TARGET_RSS_MB, "cold_start_s": TARGET_COLD_START_S},
        "peak_rss_mb": peak,
        "peak_rss_meets_target": peak <= TARGET_RSS_MB,
        "cold_start_s": cold["restart"],
        "cold_start_first_boot_s": cold["first_boot"],
        "cold_start_meets_target": cold["restart"] < TARGET_COLD_START_S,
        "import_s": default["import_s"],
        "variants": {name: {"env": VARIANTS[name], **summary} for name, summary in summaries.items()},
        "install_mb": {"edge": install["extras"]["edge"]["installed_mb"],
                       "server": install["extras"]["server"]["installed_mb"],
                       "server_over_edge": install.get("server_over_edge"),
                       "edge_distributions": install["extras"]["edge"]["by_distribution_mb"]},
        "train_speed": speed,
        "platform": __import__("platform").platform(), "cpu_count": os.cpu_count(),
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    tuned = summaries["malloc_tuned"]["peak_rss_mb"]["median"]
    rows = [
        ("peak RSS, client process, full round", f"{peak:.1f} MB", f"<= {TARGET_RSS_MB:.0f} MB"),
        ("  same, with the systemd unit's malloc env", f"{tuned:.1f} MB", ""),
        ("cold start to 1st training step (restart)", f"{cold['restart']:.2f} s", f"< {TARGET_COLD_START_S:.0f} s"),
        ("cold start to 1st training step (first boot)", f"{cold['first_boot']:.2f} s", "(fetches the bundle)"),
        ("  of which imports", f"{default['import_s']:.2f} s", ""),
        ("installed: edge extra / server extra", f"{install['extras']['edge']['installed_mb']:.0f} / "
         f"{install['extras']['server']['installed_mb']:.0f} MB", f"{install.get('server_over_edge')}x"),
    ]
    if speed is not None:
        rows.append(("train steps/s: litert / TensorFlow", f"{speed['litert_steps_per_s']} / "
                     f"{speed['tensorflow_steps_per_s']}", f"litert time {speed['litert_over_tensorflow_time']}x"))
    for name, value, note in rows:
        print(f"{name:<46} {value:>16}  {note}", file=sys.stderr)
    at, hwm = default["rss_mb_at_phase_median"], default["peak_rss_mb_by_phase_median"]
    print(f"{'phase (default variant, medians)':<32} {'RSS MB':>8} {'peak so far':>12}", file=sys.stderr)
    for phase in PHASES:
        if phase in at:
            print(f"{phase:<32} {at[phase]:>8.1f} {hwm[phase]:>12.1f}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--device":
        sys.exit(device_process(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    main()
