"""Export a training bundle once per (model config, vocabulary, seed) and reuse it.

Exporting needs TensorFlow and takes tens of seconds; a simulation or an aggregator restart
should not pay it again. The cache key hashes everything that determines the bundle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from models.bundle import Bundle, BundleError, read_bundle
from models.config import GRAPH_VERSION, ModelConfig

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDBOARD_CACHE", Path.home() / ".cache" / "fedboard")) / "bundles"


def bundle_key(config: ModelConfig, vocab_json: dict, seed: int, target_counts: np.ndarray | None = None) -> str:
    counts = None if target_counts is None else hashlib.sha256(np.asarray(target_counts, "<i8").tobytes()).hexdigest()
    blob = json.dumps({"config": config.to_dict(), "vocab": vocab_json, "seed": seed, "graph": GRAPH_VERSION,
                       "counts": counts}, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def get_or_export_bundle(config: ModelConfig, vocab_json: dict, *, seed: int = 0,
                         target_counts: np.ndarray | None = None, cache_dir: Path | None = None,
                         in_subprocess: bool = False) -> Bundle:
    """The cached bundle for these inputs, exporting it (TensorFlow needed) on a miss.

    `target_counts` (how often each id is a target; `Task.target_counts()`) starts the output
    bias at the unigram log-prior, which spares federated training its slowest phase.
    `in_subprocess` exports in a child process: TensorFlow (about 600 MB) then never enters
    the caller, whose memory stays that of the simulation; `last_export_peak_rss_mb()` says
    what the child took.
    """
    directory = cache_dir or default_cache_dir()
    path = directory / f"cifg-{bundle_key(config, vocab_json, seed, target_counts)}.fbz"
    if path.exists():
        try:
            return read_bundle(path)
        except BundleError as exc:
            log.warning("cached bundle %s is unusable (%s); exporting again", path, exc)
    directory.mkdir(parents=True, exist_ok=True)
    log.info("exporting the TFLite training bundle (%d parameters); cached at %s", config.param_count, path)
    if in_subprocess:
        _export_in_child(config, vocab_json, seed, target_counts, path)
    else:
        _export(config, vocab_json, seed, target_counts, path)
    return read_bundle(path)


_last_export_peak_rss_mb: float | None = None


def last_export_peak_rss_mb() -> float | None:
    """Peak RSS (MB) of the last export child of this process, None when none ran."""
    return _last_export_peak_rss_mb


def _export(config: ModelConfig, vocab_json: dict, seed: int, target_counts: np.ndarray | None, path: Path) -> None:
    from models.cifg import initial_weights, unigram_log_prior  # TensorFlow: server side only
    from models.export import export_bundle

    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.fbz")
    prior = None if target_counts is None else unigram_log_prior(target_counts)
    export_bundle(config, vocab_json, tmp, seed=seed, initial_weights=initial_weights(config, seed, output_prior=prior))
    os.replace(tmp, path)


def _export_in_child(config: ModelConfig, vocab_json: dict, seed: int, target_counts: np.ndarray | None,
                     path: Path) -> None:
    global _last_export_peak_rss_mb
    import subprocess
    import sys
    import tempfile

    import psutil

    with tempfile.TemporaryDirectory(prefix="fedboard-export-") as tmp:
        request = Path(tmp) / "request.npz"
        np.savez(request, config=json.dumps(config.to_dict()), vocab=json.dumps(vocab_json), seed=seed,
                 counts=np.asarray([] if target_counts is None else target_counts, "<i8"),
                 has_counts=target_counts is not None, out=str(path))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        log_path = Path(tmp) / "export.log"  # a file, not a pipe: TensorFlow's chatter can outgrow a pipe's buffer
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "models.bundle_cache", str(request)], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        peak = 0.0
        watcher = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                try:
                    peak = max(peak, watcher.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
                try:
                    proc.wait(0.2)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:  # Ctrl-C: stop the child too, leave no half-written bundle behind
            proc.kill()
            proc.wait()
            raise
        output = log_path.read_bytes()[-200_000:].decode(errors="replace")
        _last_export_peak_rss_mb = peak
        if proc.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise RuntimeError(f"exporting the training bundle failed (exit {proc.returncode}):\n{tail}")
        log.debug("bundle export output:\n%s", output)


def _child_main(request_path: str) -> int:
    """`python -m models.bundle_cache REQUEST.npz`: the export half of `_export_in_child`."""
    req = np.load(request_path)
    config = ModelConfig.from_dict(json.loads(str(req["config"])))
    counts = req["counts"] if bool(req["has_counts"]) else None
    _export(config, json.loads(str(req["vocab"])), int(req["seed"]), counts, Path(str(req["out"])))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_child_main(sys.argv[1]))
