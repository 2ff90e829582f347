"""`fedboard tune`: the command-line face of `device_sim.tune`.

`register(subparsers)` adds the subcommand; its handler returns the exit code. Simulator
options default to None here and are passed on only when given, so every point runs with
exactly the defaults of `fedboard simulate` (`SimConfig`), whatever they are at the time.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from protocol.cli_entry import HelpFormatter

# the options shared with `fedboard simulate`: argparse dest -> SimConfig field
SIM_OPTIONS = {name: name for name in (
    "corpus", "format", "rounds", "vocab_size", "seq_len", "seed", "embed_dim", "units", "devices", "batch_size",
    "client_lr", "client_clip", "mu", "downlink", "downlink_delta", "server_optimizer", "server_lr", "aggregation",
    "over_selection", "broker", "mqtt_version", "pool_size", "eval_every")} | {"deadline_s": "report_deadline_s"}

TUNE_EXAMPLES = """examples:
  fedboard tune --rounds 10 --out runs/tune                  # the built-in sweep
  fedboard tune --codecs 'q8 q4|zstd ef|topk:0.01|q4|zstd' --clients-per-round 10 20 --rounds 10
  fedboard tune --grid grid.toml --out runs/tune             # run again after Ctrl-C: it resumes
"""

CODEC_HELP = ("Specs contain '|' and ',', so quote them: --codec 'ef|topk:0.01|q4|zstd'. --codecs takes a list "
              "separated by spaces, ';' or ',' (a ',' inside a stage, as in 'randk:0.1,unbiased', is kept).")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tune` to the `fedboard` parser's subcommands."""
    from device_sim.cli import CORPUS_FORMATS
    from device_sim.tune import DEFAULT_CODECS

    tune = subparsers.add_parser(
        "tune", help="sweep uplink codec specs (and cohort size, local epochs): accuracy against bytes",
        description="Runs `fedboard simulate` once per codec spec (times each clients-per-round and local-epochs "
                    "value) with the same corpus, round budget and seed; writes OUT/tune.csv, tune.md, tune.json, "
                    "pareto.png and OUT/runs/<point>/report.json, and prints the cheapest spec whose top-3 is "
                    "within --tolerance of the baseline. Points whose report exists are not run again, so an "
                    f"interrupted sweep resumes. {CODEC_HELP} Without any spec it sweeps: {' '.join(DEFAULT_CODECS)}.",
        formatter_class=HelpFormatter, epilog=TUNE_EXAMPLES)
    what = tune.add_argument_group("what to sweep")
    what.add_argument("--codec", action="append", default=[], metavar="SPEC",
                      help="a codec spec (repeatable; default: the built-in sweep above when no spec is given)")
    what.add_argument("--codecs", action="append", default=[], metavar="LIST", help="several specs in one string")
    what.add_argument("--codecs-file", type=Path, metavar="FILE", help="one spec per line, '#' comments")
    what.add_argument("--grid", type=Path, metavar="TOML",
                      help="grid file: codecs = [...], clients_per_round = [...], local_epochs = [...] "
                           "(command-line --clients-per-round / --local-epochs replace its values)")
    what.add_argument("--clients-per-round", type=int, nargs="+", metavar="N", help="one or more (default 20)")
    what.add_argument("--local-epochs", type=int, nargs="+", metavar="N", help="one or more (default 1)")
    what.add_argument("--baseline", default="f32", help="the reference spec, always run (default f32)")
    what.add_argument("--tolerance", type=float, default=0.01,
                      help="accepted top-3 loss relative to the baseline (default 0.01 = 1 %%)")
    what.add_argument("--out", type=Path, default=Path("runs/tune"), help="output directory (default runs/tune; "
                      "checked before the sweep starts)")
    what.add_argument("--no-progress", action="store_true", help="no progress bar")

    sim = tune.add_argument_group("simulator settings shared by every point (defaults: those of fedboard simulate)")
    sim.add_argument("--corpus", help="corpus file or directory (default: the built-in synthetic keyboard corpus)")
    sim.add_argument("--format", choices=CORPUS_FORMATS, help="corpus format (default: guessed from the path)")
    sim.add_argument("--rounds", type=int, help="round budget of every point")
    sim.add_argument("--devices", type=int, help="cap the fleet at N devices")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--vocab-size", type=int)
    sim.add_argument("--seq-len", type=int)
    sim.add_argument("--embed-dim", type=int)
    sim.add_argument("--units", type=int)
    sim.add_argument("--batch-size", type=int)
    sim.add_argument("--client-lr", type=float)
    sim.add_argument("--client-clip", type=float, help="per-step gradient clipping on devices (0 = off)")
    sim.add_argument("--mu", type=float, help="FedProx proximal term")
    sim.add_argument("--downlink", help="downlink codec of the global model")
    sim.add_argument("--downlink-delta", help="also publish a delta downlink with this codec")
    sim.add_argument("--server-optimizer")
    sim.add_argument("--server-lr", type=float)
    sim.add_argument("--aggregation")
    sim.add_argument("--over-selection", type=float, help="cohort = clients per round x this")
    sim.add_argument("--deadline-s", type=float, help="report deadline of a round, wall seconds")
    sim.add_argument("--broker", help="HOST:PORT of an external MQTT broker (default: embedded amqtt)")
    sim.add_argument("--mqtt-version", type=int, choices=(3, 5))
    sim.add_argument("--pool-size", type=int)
    sim.add_argument("--eval-every", type=int)
    tune.set_defaults(handler=tune_command, quiet_log_level="WARNING")


def gather_codecs(args: argparse.Namespace, grid_codecs: tuple[str, ...] = ()) -> list[str]:
    """All specs from --codec, --codecs, --codecs-file and the grid file, in that order."""
    from device_sim.tune import read_codecs_file, split_codec_list

    specs = list(args.codec)
    for text in args.codecs:
        specs += split_codec_list(text)
    if args.codecs_file is not None:
        specs += read_codecs_file(args.codecs_file)
    return specs + list(grid_codecs)


def base_config(args: argparse.Namespace):
    """The SimConfig every point starts from: the given options over SimConfig's defaults."""
    from device_sim.simulate import SimConfig

    fields = {f.name for f in dataclasses.fields(SimConfig)}
    given: dict[str, Any] = {field: getattr(args, dest) for dest, field in SIM_OPTIONS.items()
                             if getattr(args, dest) is not None}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"this simulator has no setting {', '.join(unknown)}")
    return SimConfig(codec=args.baseline, **given)


def tune_command(args: argparse.Namespace) -> int:
    from device_sim.tune import DEFAULT_CODECS, TuneGrid, expand_grid, load_grid, recommendation_snippet, run_tune
    from device_sim.tune_report import markdown_table

    grid = load_grid(args.grid) if args.grid is not None else TuneGrid()
    codecs = gather_codecs(args, grid.codecs) or list(DEFAULT_CODECS)
    base = base_config(args)
    points = expand_grid(codecs, args.clients_per_round or grid.clients_per_round or (base.clients_per_round,),
                         args.local_epochs or grid.local_epochs or (base.local_epochs,), baseline=args.baseline)
    from protocol.cli_entry import check_out_dir

    check_out_dir(args.out)  # after the specs parse (a typo leaves nothing behind), before any point runs
    from protocol.cli_entry import attach_log_file

    log_file = attach_log_file(Path(args.out) / "tune.log", args)
    print(f"fedboard tune: {len(points)} runs of {base.rounds} rounds -> {args.out} (log: {log_file})", file=sys.stderr)
    result = run_tune(base, points, args.out, baseline=args.baseline, tolerance=args.tolerance,
                      progress=not args.no_progress)
    print(markdown_table(result.rows))
    print()
    if result.reused:
        print(f"({result.reused} of {len(points)} points read back from earlier runs in {args.out / 'runs'})")
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    if result.warning:  # the sweep itself succeeded: its table stands, it just cannot tell specs apart
        print(f"no recommendation: {result.warning}")
        return 0
    if result.recommendation is None:
        print("no recommendation: no point could be compared with a baseline run")
        return 1
    print(f"\nrecommended (cheapest within {args.tolerance * 100:g} % of {result.baseline} top-3):")
    print(recommendation_snippet(result.recommendation))
    return 0
