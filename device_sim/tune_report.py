"""The outputs of `fedboard tune`: tune.csv, tune.md, tune.json and the Pareto plot pareto.png.

CSV and JSON keep raw numbers for scripts; the Markdown table is for people (and for pasting
into a README or a pull request), with ratios, percentages and the frontier marked.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from device_sim.tune import TuneResult, TuneRow

COLUMNS = ("spec", "clients_per_round", "local_epochs", "bits_per_parameter", "uplink_bytes_per_update",
           "compression_ratio", "uplink_bytes_total", "downlink_bytes_total", "top1", "top3", "top3_last5",
           "delta_top3_vs_baseline", "delta_top3_vs_baseline_rel", "wall_s", "pareto", "within_tolerance", "run_dir")
MD_HEADER = ("spec", "clients/round", "local epochs", "bits/param", "uplink B/update", "vs float32",
             "uplink total", "downlink total", "top-1", "top-3", "top-3 last 5", "Δ top-3", "Δ top-3 rel", "wall s",
             "frontier")


def ordered(rows: Sequence["TuneRow"]) -> list["TuneRow"]:
    """Table order: by group, then most bytes per update first (the baseline at the top)."""
    return sorted(rows, key=lambda r: (r.clients_per_round, r.local_epochs, -r.uplink_bytes_per_update))


def write_csv(rows: Sequence["TuneRow"], path: Path) -> Path:
    """One row per point, raw numbers, columns in COLUMNS order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in ordered(rows):
            values = asdict(row)
            writer.writerow({k: "" if values[k] is None else values[k] for k in COLUMNS})
    os.replace(tmp, path)
    return path


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _signed(value: float | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    return "—" if value is None else f"{value * scale:{fmt}}{suffix}"


def markdown_table(rows: Sequence["TuneRow"]) -> str:
    """The table as GitHub Markdown: `yes` marks the frontier, ✓ a point within tolerance."""
    lines = ["| " + " | ".join(MD_HEADER) + " |", "|" + "---|" * len(MD_HEADER)]
    for r in ordered(rows):
        cells = [
            "`" + r.spec.replace("|", "\\|") + "`", str(r.clients_per_round), str(r.local_epochs),
            f"{r.bits_per_parameter:.3f}",
            f"{r.uplink_bytes_per_update:,.0f}", f"{r.compression_ratio:.1f}x", _bytes(r.uplink_bytes_total),
            _bytes(r.downlink_bytes_total), f"{r.top1:.4f}", f"{r.top3:.4f}", _signed(r.top3_last5, ".4f"),
            _signed(r.delta_top3_vs_baseline, "+.4f"), _signed(r.delta_top3_vs_baseline_rel, "+.2f", 100.0, " %"),
            f"{r.wall_s:.0f}",
            ("yes" if r.pareto else "") + (" ✓" if r.within_tolerance else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: "TuneResult") -> str:
    """tune.md: settings, the table, and the recommendation to paste."""
    from device_sim.tune import recommendation_snippet

    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items())
    parts = [
        "# Compression sweep (`fedboard tune`)",
        "",
        f"Shared settings: {settings}.",
        f"Baseline `{result.baseline}`; tolerance {result.tolerance * 100:g} % relative top-3 "
        "(✓ = within it, against the baseline with the same clients per round and local epochs); "
        "frontier = no other point has both fewer uplink bytes per update and a higher top-3.",
        "",
        markdown_table(result.rows),
        "",
    ]
    if result.recommendation is not None:
        parts += ["## Recommendation", "", "```", recommendation_snippet(result.recommendation), "```", ""]
    else:
        parts += [f"No recommendation: {result.warning or 'no point has a baseline run to be compared with.'}", ""]
    return "\n".join(parts)


def write_markdown(result: "TuneResult", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_report(result), encoding="utf-8")
    return path


def write_json(result: "TuneResult", path: Path) -> Path:
    """Everything in one file: settings, rows, frontier specs and the recommendation."""
    doc: dict[str, Any] = {
        "baseline": result.baseline, "tolerance": result.tolerance, "settings": result.settings,
        "rows": [asdict(r) for r in ordered(result.rows)],
        "frontier": [{"spec": r.spec, "clients_per_round": r.clients_per_round, "local_epochs": r.local_epochs}
                     for r in result.frontier],
        "recommendation": asdict(result.recommendation) if result.recommendation else None,
        "warning": result.warning,
        "partial": result.stopped_by is not None,
    }
    if result.stopped_by:  # Ctrl-C: only the points done are in rows
        doc.update(stopped_by=result.stopped_by, points_done=len(result.rows), points_requested=result.points_requested)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def plot_pareto(result: "TuneResult", path: Path) -> Path:
    """Top-3 against uplink bytes per update (log x): every point labelled, the frontier joined.

    The dashed line of each group is its tolerance floor: points above it are acceptable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r.group for r in result.rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axis = plt.subplots(figsize=(10, 6))
    for i, group in enumerate(groups):
        colour = colours[i % len(colours)]
        members = [r for r in result.rows if r.group == group]
        label = f"{group[0]} clients/round, {group[1]} epoch(s)"
        axis.scatter([r.uplink_bytes_per_update for r in members], [r.top3 for r in members], color=colour,
                     s=28, zorder=3, label=label if len(groups) > 1 else "runs")
        base = next((r for r in members if r.spec == result.baseline), None)
        if base is not None:
            axis.axhline(base.top3 * (1 - result.tolerance), color=colour, ls="--", lw=0.9, alpha=0.7,
                         label=f"baseline {result.baseline} - {result.tolerance * 100:g} %"
                         + (f" ({label})" if len(groups) > 1 else ""))
    frontier = sorted(result.frontier, key=lambda r: r.uplink_bytes_per_update)
    axis.plot([r.uplink_bytes_per_update for r in frontier], [r.top3 for r in frontier], color="crimson", lw=1.6,
              marker="o", ms=9, mfc="none", mew=1.6, zorder=4, label="Pareto frontier")
    if result.recommendation is not None:
        rec = result.recommendation
        axis.scatter([rec.uplink_bytes_per_update], [rec.top3], marker="*", s=260, color="gold", edgecolor="black",
                     zorder=5, label=f"recommended: {rec.spec}")
    axis.set_xscale("log")
    labels = []
    for r in result.rows:
        text = f"{r.spec} ({r.compression_ratio:.0f}x)"
        text += "" if len(groups) == 1 else f" c{r.clients_per_round} e{r.local_epochs}"
        labels.append(((r.uplink_bytes_per_update, r.top3), text))
    _place_labels(fig, axis, labels)
    axis.set_xlabel("uplink bytes per update (log scale)")
    axis.set_ylabel("top-3 next-word accuracy (test)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title("Accuracy against uplink bytes: codec sweep")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# offsets (points) tried in turn for a label: above right, below right, further up/down, then to the left
_LABEL_OFFSETS = [(6, 7), (6, -13), (6, 19), (6, -25), (6, 31), (6, -37), (-6, 7), (-6, -13), (-6, 19), (-6, -25)]


def _place_labels(fig, axis, labels: list[tuple[tuple[float, float], str]], fontsize: float = 7.5) -> None:
    """Label each point at the first offset where its text overlaps no label placed before it."""
    fig.canvas.draw()  # fixes the axis limits, so data -> pixel positions are final
    to_pixels = axis.transData.transform
    scale = fig.dpi / 72.0
    placed: list[tuple[float, float, float, float]] = []
    for (x, y), text in sorted(labels, key=lambda item: item[0]):
        px, py = to_pixels((x, y))
        width, height = 0.6 * fontsize * len(text) * scale, 1.3 * fontsize * scale
        box, offset = None, _LABEL_OFFSETS[0]
        for dx, dy in _LABEL_OFFSETS:
            left = px + dx * scale - (width if dx < 0 else 0)
            candidate = (left, py + dy * scale, left + width, py + dy * scale + height)
            if not any(candidate[0] < b[2] and b[0] < candidate[2] and candidate[1] < b[3] and b[1] < candidate[3]
                       for b in placed):
                box, offset = candidate, (dx, dy)
                break
        if box is None:
            left = px + 6 * scale
            box = (left, py + 7 * scale, left + width, py + 7 * scale + height)
        placed.append(box)
        axis.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=fontsize,
                      ha="right" if offset[0] < 0 else "left")


def write_all(result: "TuneResult", out: Path) -> dict[str, str]:
    """tune.csv, tune.md, tune.json and pareto.png in `out`; returns their paths by kind."""
    out = Path(out)
    return {
        "csv": str(write_csv(result.rows, out / "tune.csv")),
        "markdown": str(write_markdown(result, out / "tune.md")),
        "json": str(write_json(result, out / "tune.json")),
        "plot": str(plot_pareto(result, out / "pareto.png")),
    }
