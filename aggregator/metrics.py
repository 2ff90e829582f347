"""What the aggregator reports: Prometheus metrics and one JSON line per round.

The metrics live in their own `CollectorRegistry`, so several aggregators (tests, scale-out
workers in one process) never collide in prometheus-client's global registry; the HTTP
endpoint is started only when a port is given and is shut down with the aggregator.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


class AggregatorMetrics:
    """Counters and gauges of one aggregator; `serve(port)` exposes them on /metrics."""

    def __init__(self, fleet: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry, "labelnames": ("fleet",)}
        self.fleet = fleet
        self.updates_accepted = Counter("fedboard_updates_accepted_total", "Updates folded into a round", **labels)
        self.updates_rejected = Counter("fedboard_updates_rejected_total", "Updates refused by intake, by reason",
                                        registry=self.registry, labelnames=("fleet", "reason"))
        self.duplicates = Counter("fedboard_updates_duplicate_total", "Redelivered updates counted once", **labels)
        self.uplink_bytes = Counter("fedboard_uplink_bytes_total", "Bytes of accepted update messages", **labels)
        self.checkins = Counter("fedboard_checkins_total", "Check-ins received in an open window", **labels)
        self.rounds = Counter("fedboard_rounds_total", "Rounds ended, by outcome", registry=self.registry,
                              labelnames=("fleet", "outcome"))
        self.checkpoint_bytes = Counter("fedboard_checkpoint_bytes_total", "Bytes written to checkpoints", **labels)
        self.version = Gauge("fedboard_model_version", "Version of the published global model", **labels)
        self.round_id = Gauge("fedboard_round", "Id of the current round", **labels)
        self.participants = Gauge("fedboard_round_participants", "Reports accepted in the last round", **labels)
        self.cohort = Gauge("fedboard_round_cohort", "Devices selected in the last round", **labels)
        self.round_seconds = Gauge("fedboard_round_seconds", "Wall time of the last round", **labels)
        self.online = Gauge("fedboard_devices_online", "Devices whose status is online", **labels)
        self.eval = Gauge("fedboard_eval", "Last evaluation of the global model", registry=self.registry,
                          labelnames=("fleet", "source", "metric"))
        self.intake_seconds = Histogram("fedboard_update_intake_seconds", "Decode + validate + accumulate time",
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), **labels)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- recording ----------------------------------------------------------------------------
    def rejected(self, reason: str) -> None:
        self.updates_rejected.labels(self.fleet, reason).inc()

    def round_ended(self, result: dict[str, Any]) -> None:
        f = self.fleet
        self.rounds.labels(f, "committed" if result["committed"] else "abandoned").inc()
        self.version.labels(f).set(result["version"])
        self.round_id.labels(f).set(result["round"])
        self.participants.labels(f).set(result["participants"])
        self.cohort.labels(f).set(result["cohort"])
        self.round_seconds.labels(f).set(result["wall_s"])
        for source in ("eval", "fed_eval"):
            for metric, value in (result.get(source) or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.eval.labels(f, source, metric).set(value)

    def c(self, counter: Counter) -> Any:
        return counter.labels(self.fleet)

    # -- the endpoint ---------------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class JsonLines:
    """Appends one JSON object per line (the per-round log); flushed after every line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_clean(record), sort_keys=True, allow_nan=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN), numpy scalars plain numbers."""
    if hasattr(value, "item") and not isinstance(value, (dict, list, tuple, str)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
