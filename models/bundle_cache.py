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
                         target_counts: np.ndarray | None = None, cache_dir: Path | None = None) -> Bundle:
    """The cached bundle for these inputs, exporting it (TensorFlow needed) on a miss.

    `target_counts` (how often each id is a target; `Task.target_counts()`) starts the output
    bias at the unigram log-prior, which spares federated training its slowest phase.
    """
    directory = cache_dir or default_cache_dir()
    path = directory / f"cifg-{bundle_key(config, vocab_json, seed, target_counts)}.fbz"
    if path.exists():
        try:
            return read_bundle(path)
        except BundleError as exc:
            log.warning("cached bundle %s is unusable (%s); exporting again", path, exc)
    from models.cifg import initial_weights, unigram_log_prior  # TensorFlow: server side only
    from models.export import export_bundle

    directory.mkdir(parents=True, exist_ok=True)
    log.info("exporting the TFLite training bundle (%d parameters); cached at %s", config.param_count, path)
    tmp = path.with_suffix(".tmp.fbz")
    prior = None if target_counts is None else unigram_log_prior(target_counts)
    export_bundle(config, vocab_json, tmp, seed=seed, initial_weights=initial_weights(config, seed, output_prior=prior))
    os.replace(tmp, path)
    return read_bundle(path)
