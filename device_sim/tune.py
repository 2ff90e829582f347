"""`fedboard tune`: sweep codec specs (and round settings) and find the cheapest one that keeps accuracy.

Each point of the sweep is one whole `fedboard simulate` run (same corpus, round budget and
seed; only the uplink codec, clients per round and local epochs change), so the numbers are
the ones a user would see, bytes counted on the wire. Every run keeps its own report under
`OUT/runs/<slug>/`; a point whose report exists is read back instead of run again, so a
sweep of hours survives an interruption. The pure parts (grid expansion, baseline deltas, the
Pareto frontier, the recommendation) are plain functions over rows, tested without a run.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from device_sim.tune_report import write_all
from protocol.cli_entry import RunInterrupted
from protocol.codec import parse_codec
from protocol.errors import CodecError, Reason

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)

DEFAULT_CODECS = ("f32", "q8", "q4|zstd", "ef|q2|zstd", "ef|sign|zstd", "ef|topk:0.05|q4|zstd",
                  "ef|topk:0.01|q4|zstd")
GRID_KEYS = ("codecs", "clients_per_round", "local_epochs")
# SimConfig fields that change how a run executes but not what it computes: a report made
# with other values of these is still a valid result for the point.
EXECUTION_ONLY = frozenset({"out", "progress", "broker", "mqtt_version", "pool_size", "report_deadline_s", "timelines"})
_SLUG_CHARS = str.maketrans({"|": "+", ":": "-"})


# -- the grid ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TunePoint:
    """One run of the sweep: an uplink codec with a cohort size and a number of local epochs."""

    spec: str                 # canonical (`Codec.spec`)
    clients_per_round: int
    local_epochs: int

    @property
    def group(self) -> tuple[int, int]:
        """Points of one group share everything but the codec, so they are compared."""
        return (self.clients_per_round, self.local_epochs)

    @property
    def slug(self) -> str:
        """A directory name for the run, readable and safe in a shell."""
        name = re.sub(r"[^A-Za-z0-9.,=+_-]", "_", self.spec.translate(_SLUG_CHARS))
        return f"{name}__c{self.clients_per_round}_e{self.local_epochs}"


@dataclass(frozen=True)
class TuneGrid:
    """What a grid file (or the command line) asks to sweep; empty = not given."""

    codecs: tuple[str, ...] = ()
    clients_per_round: tuple[int, ...] = ()
    local_epochs: tuple[int, ...] = ()


def canonical_spec(spec: str) -> str:
    """The canonical spelling of `spec`, or the CodecError that says what is wrong with it."""
    return parse_codec(spec.strip()).spec


def split_codec_list(text: str) -> list[str]:
    """Specs from one command-line string: separated by whitespace, ';' or ','.

    A comma also separates options inside a stage (`randk:0.1,unbiased`, `q:bits=4,block=64`),
    so a comma-separated piece that is not a spec by itself is glued back to the one before.
    """
    specs: list[str] = []
    for chunk in re.split(r"[\s;]+", text.strip()):
        in_chunk: list[str] = []
        for piece in chunk.split(","):
            if not piece:
                continue
            if in_chunk and not _parses(piece):
                in_chunk[-1] = f"{in_chunk[-1]},{piece}"
            else:
                in_chunk.append(piece)
        specs += in_chunk
    return specs


def _parses(spec: str) -> bool:
    try:
        parse_codec(spec)
    except CodecError:
        return False
    return True


def read_codecs_file(path: str | Path) -> list[str]:
    """One spec per line; blank lines and `#` comments are skipped."""
    specs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append(line)
    return specs


def load_grid(path: str | Path) -> TuneGrid:
    """A TOML grid file: `codecs = [...]`, `clients_per_round = [...]`, `local_epochs = [...]`."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"grid file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(GRID_KEYS)}")

    def strings(key: str) -> tuple[str, ...]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f'grid file {path}: {key} must be a list of spec strings, e.g. {key} = ["f32", "q8"]')
        return tuple(value)

    def integers(key: str) -> tuple[int, ...]:
        value = doc.get(key, [])
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"grid file {path}: {key} must be a list of integers, e.g. {key} = [10, 20]")
        return tuple(value)

    return TuneGrid(strings("codecs"), integers("clients_per_round"), integers("local_epochs"))


def expand_grid(codecs: Sequence[str], clients_per_round: Sequence[int], local_epochs: Sequence[int],
                baseline: str = "f32") -> list[TunePoint]:
    """Every (codec, clients per round, local epochs), baseline first in each group, duplicates dropped.

    All specs are parsed here, before anything runs, so a typo fails in a second rather than
    after an hour of sweeping.
    """
    if not clients_per_round or not local_epochs:
        raise ValueError("give at least one value of clients per round and of local epochs")
    for name, values in (("clients per round", clients_per_round), ("local epochs", local_epochs)):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"{name} must be >= 1, got {bad[0]}")
    base = _canonical(baseline, "baseline")
    specs = _unique([base] + [_canonical(s, "codec") for s in codecs])
    points = [TunePoint(spec, c, e) for c, e in itertools.product(_unique(clients_per_round), _unique(local_epochs))
              for spec in specs]
    slugs: dict[str, TunePoint] = {}
    for point in points:
        other = slugs.setdefault(point.slug, point)
        if other != point:
            raise ValueError(f"specs {other.spec!r} and {point.spec!r} map to the same run directory {point.slug!r}")
    return points


def _canonical(spec: str, what: str) -> str:
    try:
        return canonical_spec(spec)
    except CodecError as exc:
        raise CodecError(Reason.BAD_CODEC, f"{what} {spec!r}: {exc.detail}") from None


def _unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))


# -- rows ----------------------------------------------------------------------------------------
@dataclass
class TuneRow:
    """One line of the table: what a point cost on the wire and what accuracy it reached."""

    spec: str
    clients_per_round: int
    local_epochs: int
    bits_per_parameter: float
    uplink_bytes_per_update: float
    compression_ratio: float            # float32 bytes per update / bytes per update
    uplink_bytes_total: int
    downlink_bytes_total: int
    top1: float
    top3: float
    top3_last5: float | None = None      # mean top-3 of the last 5 evaluated rounds: less noisy than the final one
    initial_top3: float | None = None    # the initial model's top-3 (round 0): what "nothing learned yet" scores
    delta_top3_vs_baseline: float | None = None  # top3 - baseline top3 (same clients per round and epochs)
    delta_top3_vs_baseline_rel: float | None = None  # (top3 - baseline top3) / baseline top3
    wall_s: float = 0.0
    run_dir: str = ""
    pareto: bool = False
    within_tolerance: bool = False

    @property
    def group(self) -> tuple[int, int]:
        return (self.clients_per_round, self.local_epochs)


def row_from_report(point: TunePoint, report: dict[str, Any], run_dir: str = "") -> TuneRow:
    """The table row of one run's report.json."""
    per_update = float(report["uplink_bytes_per_update"])
    f32 = float(report["float32_bytes_per_update"])
    ratio = report.get("compression_ratio") or (f32 / per_update if per_update else 0.0)
    bits = report.get("bits_per_parameter")
    if bits is None:
        bits = 8.0 * per_update / report["params"] if report.get("params") else 0.0
    return TuneRow(
        spec=point.spec, clients_per_round=point.clients_per_round, local_epochs=point.local_epochs,
        bits_per_parameter=float(bits), uplink_bytes_per_update=per_update, compression_ratio=float(ratio),
        uplink_bytes_total=int(report["uplink_bytes_total"]), downlink_bytes_total=int(report["downlink_bytes_total"]),
        top1=float(report["top1"]), top3=float(report["top3"]), top3_last5=last_rounds_top3(report),
        initial_top3=report.get("initial_top3"),
        wall_s=float(report.get("wall_s", 0.0)), run_dir=run_dir,
    )


def last_rounds_top3(report: dict[str, Any], rounds: int = 5) -> float | None:
    """Mean top-3 of the last `rounds` evaluated rounds (None without per-round figures).

    Round-to-round top-3 moves by a few percent in a short federated run, so this says
    whether a final-round difference to the baseline is a trend or noise.
    """
    values = [r["top3"] for r in report.get("per_round", []) if r.get("top3") is not None][-rounds:]
    return sum(values) / len(values) if values else None


def within(top3: float, baseline_top3: float, tolerance: float) -> bool:
    """Top-3 no worse than the baseline by more than `tolerance` (relative)."""
    return top3 >= baseline_top3 * (1.0 - tolerance) - 1e-12


def compare_to_baseline(rows: list[TuneRow], baseline: str, tolerance: float) -> list[TuneRow]:
    """Fill each row's deltas and tolerance flag against the baseline row of its group (in place)."""
    base = canonical_spec(baseline)
    baselines = {r.group: r for r in rows if r.spec == base}
    for row in rows:
        ref = baselines.get(row.group)
        if ref is None:
            row.delta_top3_vs_baseline = row.delta_top3_vs_baseline_rel = None
            row.within_tolerance = False
            continue
        delta = row.top3 - ref.top3
        row.delta_top3_vs_baseline = delta
        row.delta_top3_vs_baseline_rel = delta / ref.top3 if ref.top3 else (0.0 if delta == 0 else None)
        row.within_tolerance = within(row.top3, ref.top3, tolerance)
    return rows


def pareto_frontier(rows: Sequence[TuneRow]) -> list[TuneRow]:
    """The rows no other row beats on both uplink bytes per update (fewer) and top-3 (higher).

    Returned cheapest first; along it, top-3 rises strictly with bytes. Marks `row.pareto`.
    """
    ordered = sorted(rows, key=lambda r: (r.uplink_bytes_per_update, -r.top3))
    frontier: list[TuneRow] = []
    best = float("-inf")
    for row in ordered:
        row.pareto = row.top3 > best
        if row.pareto:
            frontier.append(row)
            best = row.top3
    return frontier


def recommend(rows: Sequence[TuneRow]) -> TuneRow | None:
    """The cheapest row (fewest uplink bytes per update) within tolerance of its baseline.

    Needs `compare_to_baseline` first. Ties go to the higher top-3. None when no row has a
    baseline to be compared with.
    """
    candidates = [r for r in rows if r.within_tolerance]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.uplink_bytes_per_update, -r.top3))


def recommendation_snippet(row: TuneRow) -> str:
    """What to paste: the `fedboard simulate` flags and the aggregator.toml lines of the chosen point."""
    flags = f"--codec {shlex.quote(row.spec)} --clients-per-round {row.clients_per_round} " \
            f"--local-epochs {row.local_epochs}"
    rel = row.delta_top3_vs_baseline_rel
    rel_text = "" if rel is None else f", top-3 {rel * 100:+.2f} % vs baseline"
    return "\n".join([
        f"# {row.compression_ratio:.1f}x fewer uplink bytes than float32 "
        f"({row.uplink_bytes_per_update:,.0f} B per update, {row.bits_per_parameter:.3f} bits/parameter{rel_text})",
        f"fedboard simulate {flags}",
        f"# a real fleet: fedboard aggregator {flags}, or in aggregator.toml:",
        "[aggregator]",
        f"codec = {json.dumps(row.spec)}",
        f"clients_per_round = {row.clients_per_round}",
        f"local_epochs = {row.local_epochs}",
    ])


# -- running -------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """The finished sweep: every row, the frontier, the recommendation and where files went."""

    rows: list[TuneRow]
    frontier: list[TuneRow]
    recommendation: TuneRow | None
    baseline: str
    tolerance: float
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    ran: int = 0          # points simulated in this call
    reused: int = 0       # points read back from an earlier (interrupted) call
    stopped_by: str | None = None   # "SIGINT": Ctrl-C ended the sweep early; rows hold the points done
    points_requested: int = 0
    warning: str | None = None      # why there is no recommendation although baselines ran


def sweep_settings(base) -> dict[str, Any]:
    """The simulator settings every point shares (codec and group fields are per point)."""
    settings = {k: v for k, v in asdict(base).items() if k not in EXECUTION_ONLY}
    for key in ("codec", "clients_per_round", "local_epochs"):
        settings.pop(key, None)
    return settings


def point_config(base, point: TunePoint, run_dir: Path):
    """The SimConfig of one point: the shared settings with the point's codec, cohort and epochs."""
    return replace(base, codec=point.spec, clients_per_round=point.clients_per_round,
                   local_epochs=point.local_epochs, out=str(run_dir), progress=False)


def existing_report(run_dir: Path, cfg) -> dict[str, Any] | None:
    """The report of an earlier run of exactly this point, None if there is none.

    A report made with other settings (another round budget, seed, corpus...) is an error,
    not silently reused: mixing settings would make the table compare unlike runs.
    """
    path = run_dir / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("partial"):  # that run was interrupted: run the point again
        log.info("tune: %s holds a partial run (%s): running the point again", path, report.get("stopped_by"))
        return None
    old = report.get("config", {})
    new = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in EXECUTION_ONLY}))  # as stored
    differ = sorted(k for k in new if k in old and old[k] != new[k])
    if differ:
        detail = ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} now" for k in differ)
        raise ValueError(f"{run_dir} holds a run with other settings ({detail}); "
                         "choose another --out or delete that directory")
    return report


def run_tune(base, points: Sequence[TunePoint], out: str | Path, *, baseline: str = "f32",
             tolerance: float = 0.01, progress: bool = True,
             simulate: Callable[[Any], dict[str, Any]] | None = None) -> TuneResult:
    """Run (or read back) every point with the simulator, then write the table, plot and JSON.

    `base` is a `SimConfig` holding the settings every point shares. `simulate` defaults to
    `device_sim.simulate.run_simulation`.
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance is relative (0.01 = 1 %) and must be in [0, 1), got {tolerance}")
    if simulate is None:
        from device_sim.simulate import run_simulation as simulate
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    base_spec = canonical_spec(baseline)
    if not any(p.spec == base_spec for p in points):
        raise ValueError(f"the baseline {base_spec!r} is not among the points; expand_grid adds it")
    configs = [(p, point_config(base, p, out / "runs" / p.slug)) for p in points]
    reports = {p: existing_report(Path(c.out), c) for p, c in configs}  # fail on mismatches before running
    ran = 0
    bar = _progress(len(points), progress)
    rows = []
    stopped_by = None
    try:
        for point, cfg in configs:
            bar.set_postfix_str(f"{point.spec} c{point.clients_per_round} e{point.local_epochs}")
            report = reports[point]
            if report is None:
                started = time.monotonic()
                report = simulate(cfg)
                ran += 1
                log.info("tune: %s (c%d e%d): top-3 %.4f, %.0f B/update, %.0f s", point.spec,
                         point.clients_per_round, point.local_epochs, report["top3"],
                         report["uplink_bytes_per_update"], time.monotonic() - started)
            else:
                log.info("tune: %s (c%d e%d): reusing %s", point.spec, point.clients_per_round, point.local_epochs,
                         Path(cfg.out) / "report.json")
            rows.append(row_from_report(point, report, run_dir=str(Path("runs") / point.slug)))
            bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C: the points done are written (marked partial); a rerun resumes
        stopped_by = "SIGINT"
    finally:
        bar.close()
    if stopped_by and not rows:
        raise RunInterrupted(f"no point had finished: no results written to {out}; the same command starts the sweep")
    result = summarize(rows, baseline=base_spec, tolerance=tolerance, settings=sweep_settings(base))
    result.ran, result.reused = ran, len(rows) - ran
    result.stopped_by, result.points_requested = stopped_by, len(points)
    result.files = write_all(result, out)
    if stopped_by:
        raise RunInterrupted(f"kept the partial sweep of {len(rows)} of {len(points)} points: {out / 'tune.json'} "
                             "(and tune.csv, tune.md, pareto.png); the same command resumes it")
    return result


def summarize(rows: list[TuneRow], *, baseline: str, tolerance: float, settings: dict[str, Any]) -> TuneResult:
    """Deltas, frontier and recommendation of finished rows; no recommendation from a sweep too
    short for its baseline to have learned anything (every spec then ties at the initial model)."""
    compare_to_baseline(rows, baseline, tolerance)
    frontier = pareto_frontier(rows)
    warning = untrained_baseline_warning(rows, canonical_spec(baseline))
    return TuneResult(rows=rows, frontier=frontier, recommendation=None if warning else recommend(rows),
                      baseline=canonical_spec(baseline), tolerance=tolerance, settings=settings, warning=warning)


# Top-3 a baseline must gain over the initial model (same test positions, so paired) to count as
# trained: half a point. Below it every spec ties with the initial model and a recommendation
# would pick the most aggressive one for nothing.
LEARNED_MARGIN = 0.005


def untrained_baseline_warning(rows: Sequence[TuneRow], baseline: str) -> str | None:
    """A warning when a baseline run ended within LEARNED_MARGIN of its initial model's top-3."""
    for row in rows:
        if row.spec != baseline or row.initial_top3 is None:
            continue
        if row.top3 - row.initial_top3 < LEARNED_MARGIN:
            return (f"the baseline {baseline} (clients per round {row.clients_per_round}, local epochs "
                    f"{row.local_epochs}) ended at top-3 {row.top3:.4f}, no better than its initial model "
                    f"({row.initial_top3:.4f}) by more than {LEARNED_MARGIN}: "
                    "nothing had learned yet, so every spec looks equally good. Run more rounds (--rounds) "
                    "or a larger cohort; no recommendation from this sweep")
    return None


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tune", unit="run", disable=not enabled, dynamic_ncols=True)
