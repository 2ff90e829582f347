"""The run report of BENCHMARK.md (report.json) and its accuracy plots."""
from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Top-1/top-3 against round and against cumulative uplink bytes, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["per_round"] if r.get("top3") is not None]
    rounds = [r["round"] for r in rows]
    cumulative, total = [], 0
    for r in report["per_round"]:
        total += r["uplink_bytes"]
        if r.get("top3") is not None:
            cumulative.append(total / 1e6)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, xs, label in ((left, rounds, "round"), (right, cumulative, "cumulative uplink (MB)")):
        axis.plot(xs, [r["top3"] for r in rows], marker="o", ms=3, label="top-3")
        axis.plot(xs, [r["top1"] for r in rows], marker="s", ms=3, label="top-1")
        axis.set_xlabel(label)
        axis.set_ylabel("next-word accuracy (test)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"{report['task']} · {report['codec']} · {report['clients_per_round']} clients/round")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
