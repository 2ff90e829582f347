"""The `fedboard` command. Subcommands import their modules lazily, so `fedboard client` on a
device never pulls in TensorFlow, and `fedboard --help` is instant."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from protocol.cli_entry import (HelpFormatter, RunInterrupted, add_log_level, attach_log_file, check_out_dir,
                                run_parsed)

log = logging.getLogger("fedboard")

CORPUS_FORMATS = ("speakers", "tsv", "jsonl", "dir", "builtin")


TOP_EXAMPLES = """examples:
  fedboard simulate --rounds 5 --devices 50        # a quick simulated run
  fedboard COMMAND --help                          # each command's options and examples
"""
SIMULATE_EXAMPLES = """examples:
  fedboard simulate --rounds 5 --devices 50 --out runs/quick
  fedboard simulate --scenario phones-overnight --rounds 10
  fedboard simulate --corpus data/speakers --format speakers --codec 'ef|topk:0.01|q4|zstd'
"""
CENTRAL_EXAMPLES = """examples:
  fedboard train-central --epochs 5 --out runs/central
  fedboard train-central --corpus data/chat.jsonl --format jsonl --epochs 20
"""


def _name_fallback_defaults(parser: argparse.ArgumentParser, defaults: dict[str, object]) -> None:
    """Options left unset (None) fall back to the scenario's value or to `defaults`: --help says both."""
    for action in parser._actions:
        if action.dest in defaults and action.default is None and "default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: {defaults[action.dest]}, or the scenario's)".strip()


def _borrow_defaults(tune: argparse.ArgumentParser, sim: argparse.ArgumentParser) -> None:
    """`fedboard tune` hands its unset simulator options to `fedboard simulate`'s defaults: its --help says
    which (with simulate's help text where tune has none)."""
    fmt = sim._get_formatter()
    sim_actions = {a.dest: a for a in sim._actions}
    for action in tune._actions:
        src = sim_actions.get(action.dest)
        if action.default is not None or "default" in (action.help or "") or not action.option_strings:
            continue
        rendered = fmt._expand_help(src).replace("%", "%%") if src is not None and src.help else ""
        rendered = rendered.replace(", or the scenario's at its speedup", "").replace(", or the scenario's", "")
        if "default" not in rendered:
            rendered = f"{rendered} (default: as in fedboard simulate)".strip()
        action.help = f"{action.help} {rendered[rendered.index('(default'):]}" if action.help else rendered


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", help="corpus file or directory (default: the built-in synthetic keyboard corpus)")
    p.add_argument("--format", choices=CORPUS_FORMATS, help="corpus format (default: guessed from the path)")
    p.add_argument("--vocab-size", type=int, default=5000, help="most frequent words kept")
    p.add_argument("--seq-len", type=int, default=20, help="words of context per training window")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus split, the initial model and sampling")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed-dim", type=int, default=96, help="word embedding size of the CIFG-LSTM")
    p.add_argument("--units", type=int, default=256, help="LSTM units")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedboard", description="Federated next-word prediction over MQTT.",
                                     formatter_class=HelpFormatter, epilog=TOP_EXAMPLES)
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from edge_client.commands import register as register_device_commands

    register_device_commands(sub)
    from aggregator.commands import register as register_aggregator_commands

    register_aggregator_commands(sub)
    from device_sim.tune_commands import register as register_tune_command

    register_tune_command(sub)

    sim = sub.add_parser("simulate", help="run a simulated fleet, aggregator and broker in one process",
                         formatter_class=HelpFormatter, epilog=SIMULATE_EXAMPLES,
                         description="Runs a simulated fleet of devices, the aggregator and an MQTT broker in one "
                                     "process and writes OUT/report.json and OUT/accuracy.png. Ctrl-C stops it "
                                     "cleanly and keeps the report of the rounds done (marked partial).")
    _add_corpus_args(sim)
    _add_model_args(sim)
    sim.add_argument("--devices", type=int, default=0, help="cap the fleet at N devices (default: one per user)")
    sim.add_argument("--rounds", type=int, default=None, help="rounds (default: 30, or the scenario's)")
    sim.add_argument("--clients-per-round", type=int, default=20,
                     help="reports a round waits for (more than the fleet has: the fleet's size, with a warning)")
    sim.add_argument("--local-epochs", type=int, default=1, help="passes over its own data a device makes per round")
    sim.add_argument("--batch-size", type=int, default=16, help="device training batch size")
    sim.add_argument("--client-lr", type=float, default=5.0, help="client SGD learning rate (gradients clipped at 5)")
    sim.add_argument("--codec", default="q8", help="uplink codec spec, e.g. f32, q8, 'ef|topk:0.01|q4|zstd' "
                     "(see README)")
    sim.add_argument("--downlink", default="f32", help="downlink codec spec for the global model")
    sim.add_argument("--server-optimizer", default="fedadam", help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad")
    sim.add_argument("--server-lr", type=float, default=0.01, help="server learning rate (FedAdam: 0.01)")
    sim.add_argument("--aggregation", default="mean", help="mean, clip:C|mean, normclip:median*2|krum:f=2,cosine|mean (robust), trimmed:F, median, "
                          "dp:clip=C,noise=Z,expected=M|mean")
    sim.add_argument("--weight-cap", type=float, default=10.0,
                     help="an update weighs at most K x the cohort's median declared example count (default 10; "
                          "0 = off); never more than its own check-in declared (aggregator/PRIVACY.md)")
    sim.add_argument("--byzantine", default="",
                     help="share of devices that corrupt their updates (attack tests): 0.1:mixed, 0.1:scale=-20, "
                          "0.1:signflip, 0.05:nan")
    sim.add_argument("--dp-delta", type=float, default=0.0, help="delta at which DP-FedAvg's epsilon is reported (default 1 / (10 x devices))")
    sim.add_argument("--secure-aggregation", action="store_true",
                     help="secure aggregation (aggregator/PRIVACY.md): the aggregator learns only the cohort's sum")
    sim.add_argument("--secagg-bits", type=int, default=32, help="ring of the secure sum: 32, or 16 for half the bytes")
    sim.add_argument("--update-clip", type=float, default=0.0,
                     help="with --secure-aggregation: devices clip their update to this L2 norm (0 = none)")
    sim.add_argument("--over-selection", type=float, default=1.3, help="cohort = clients-per-round x this")
    sim.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term (0 = off)")
    sim.add_argument("--client-clip", type=float, default=5.0, help="per-step gradient clipping on devices (0 = off)")
    sim.add_argument("--downlink-delta", default="", help="also publish a delta downlink with this codec (e.g. q8)")
    sim.add_argument("--broker", help="HOST:PORT of an external MQTT broker (default: embedded amqtt)")
    sim.add_argument("--mqtt-version", type=int, choices=(3, 5), default=None,
                     help="MQTT protocol version (default: 3 with the embedded broker, 5 with --broker)")
    sim.add_argument("--pool-size", type=int, default=0, help="TFLite interpreters (default: one per core)")
    sim.add_argument("--eval-every", type=int, default=1, help="evaluate the global model every N rounds")
    sim.add_argument("--out", default="runs/latest", help="directory for report.json and accuracy.png (checked "
                     "before the run starts)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. when stderr is a log file)")
    fleet = sim.add_argument_group(
        "realistic fleets", "a scenario gives every device a simulated battery, charger, link, user and failures "
        "(see device_sim/SCENARIOS.md); its rounds, cohort and training settings apply unless given as flags")
    fleet.add_argument("--scenario", help="built-in scenario name (phones-overnight, iot-pis, flaky-network) or a TOML path")
    fleet.add_argument("--speedup", type=float, default=0.0, help="sim seconds per wall second (default: the scenario's)")
    fleet.add_argument("--min-reports", type=int, default=None,
                       help="the report floor: no round commits with fewer (default: all of --clients-per-round "
                            "at the deadline, never below half of it and 2, or the scenario's)")
    fleet.add_argument("--checkin-window-s", type=float, default=0.0,
                       help="wall seconds of the check-in window (default 30, or the scenario's at its speedup)")
    fleet.add_argument("--deadline-s", type=float, default=0.0,
                       help="wall seconds devices have to report (default 600, or the scenario's at its speedup)")
    fleet.add_argument("--shard", help="i/n: run only the devices with index %% n == i (needs --broker); "
                       "the aggregator runs in shard 0's process")
    side = fleet.add_mutually_exclusive_group()
    side.add_argument("--no-aggregator", action="store_true", help="run devices only (e.g. shard 0 next to "
                      "a separate --aggregator-only process)")
    side.add_argument("--aggregator-only", action="store_true", help="run the aggregator and evaluation only; "
                      "device processes (--shard i/n --no-aggregator) stop when it is done")
    # unset flags fall back to the scenario's values (or the old defaults without a scenario)
    sim.set_defaults(vocab_size=None, seq_len=None, seed=None, clients_per_round=None, local_epochs=None,
                     batch_size=None, client_lr=None, codec=None, over_selection=None, quiet_log_level="WARNING")
    _name_fallback_defaults(sim, _SIM_DEFAULTS)
    _borrow_defaults(sub.choices["tune"], sim)

    central = sub.add_parser("train-central", help="train the same model on all training data pooled (upper bound)",
                             formatter_class=HelpFormatter, epilog=CENTRAL_EXAMPLES,
                             description="Trains the federated runs' model centrally with Adam on all training "
                                         "windows pooled and writes OUT/central.json. Ctrl-C stops it after "
                                         "writing the epochs done (marked partial).")
    _add_corpus_args(central)
    _add_model_args(central)
    central.add_argument("--epochs", type=int, default=20, help="passes over the pooled training windows")
    central.add_argument("--batch-size", type=int, default=64, help="training batch size")
    central.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    central.add_argument("--out", default="runs/central", help="directory for central.json (checked before "
                         "training starts)")
    central.add_argument("--no-progress", action="store_true", help="no progress bar")
    central.set_defaults(quiet_log_level="WARNING")
    return parser


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Accept `--log-level X` anywhere on the line, not only before the subcommand."""
    out, hoisted, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--log-level" and i + 1 < len(argv):
            hoisted += argv[i:i + 2]
            i += 2
            continue
        if argv[i].startswith("--log-level="):
            hoisted.append(argv[i])
        else:
            out.append(argv[i])
        i += 1
    return hoisted + out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_hoist_global_options(list(sys.argv[1:] if argv is None else argv)))
    return run_parsed(args, getattr(args, "handler", None) or _BUILTIN_COMMANDS[args.command])


_SIM_DEFAULTS = dict(vocab_size=5000, seq_len=20, seed=0, clients_per_round=20, local_epochs=1, batch_size=16,
                     client_lr=5.0, codec="q8", over_selection=1.3, min_reports=0)


def _simulate(args: argparse.Namespace) -> int:
    check_out_dir(args.out)  # before the heavy imports: a bad --out fails in a second, not after the run
    from device_sim.simulate import SimConfig, config_from_scenario, parse_shard, run_simulation

    given = {k: getattr(args, k) for k in _SIM_DEFAULTS if getattr(args, k) is not None}
    common = dict(
        corpus=args.corpus, format=args.format, devices=args.devices, downlink=args.downlink,
        server_optimizer=args.server_optimizer, server_lr=args.server_lr, aggregation=args.aggregation, mu=args.mu,
        weight_cap=args.weight_cap,
        client_clip=args.client_clip, downlink_delta=args.downlink_delta, dp_delta=args.dp_delta, byzantine=args.byzantine, embed_dim=args.embed_dim, units=args.units,
        broker=args.broker, mqtt_version=args.mqtt_version or 0, pool_size=args.pool_size, eval_every=args.eval_every,
        out=args.out, progress=not args.no_progress, speedup=args.speedup, checkin_window_s=args.checkin_window_s,
        report_deadline_s=args.deadline_s, secure_aggregation=args.secure_aggregation, secagg_bits=args.secagg_bits,
        update_clip=args.update_clip,
        shard=parse_shard(args.shard) if args.shard else None,
        aggregator="none" if args.no_aggregator else "only" if args.aggregator_only else "auto",
    )
    if args.rounds is not None:
        common["rounds"] = args.rounds
    if args.scenario:
        if args.corpus:
            raise ValueError("--corpus and --scenario both name a corpus: put it in the scenario's [corpus] table")
        cfg = config_from_scenario(args.scenario, **common, **given)
    else:
        common.setdefault("rounds", 30)
        cfg = SimConfig(**common, **{**_SIM_DEFAULTS, **given})
    log_file = attach_log_file(Path(cfg.out) / "simulate.log", args)
    try:
        report = run_simulation(cfg)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:  # before the rounds began (run_simulation keeps the rounds done)
        raise RunInterrupted(f"no round had finished: no results written to {cfg.out}") from None
    keys = ("task", "rounds", "top1", "top3", "uplink_bytes_per_update", "float32_bytes_per_update", "wall_s",
            "peak_rss_mb")
    summary = {k: report[k] for k in keys if k in report}
    if "fleet" in report:
        part = report["fleet"]["participation"]
        summary["fleet"] = {"devices": report["fleet"]["devices"], **{k: part[k] for k in (
            "mean_eligible", "reported_total", "dropout_rate", "committed_rounds")},
            "dropouts_by_cause": report["fleet"]["dropouts_by_cause"]}
    print(json.dumps(summary, indent=2))
    plots = ["accuracy.png"] if "top1" in report else []
    plots += report.get("fleet_plots", [])
    print(f"report: {Path(args.out) / 'report.json'}  plots: {', '.join(str(Path(args.out) / p) for p in plots)}"
          f"  log: {log_file}")
    return 0


def _train_central(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)  # before TensorFlow loads and the epochs run
    from models.central import train_central
    from models.config import ModelConfig
    from models.corpus import read_corpus
    from models.task import build_task

    attach_log_file(Path(args.out) / "train-central.log", args)
    corpus = read_corpus(args.corpus, args.format, seed=args.seed)
    task = build_task(corpus, vocab_size=args.vocab_size, seq_len=args.seq_len)
    config = ModelConfig(vocab_size=task.vocab.size, embed_dim=args.embed_dim, units=args.units, seq_len=args.seq_len)
    train_x, train_y = task.pooled_train()
    test_x, test_y = task.pooled_test()
    from models.cifg import unigram_log_prior

    result = train_central(train_x, train_y, test_x, test_y, config, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, seed=args.seed, output_prior=unigram_log_prior(task.target_counts()),
                           progress=not args.no_progress)
    if result.stopped_by and not result.per_epoch:
        raise RunInterrupted(f"no epoch had finished: no results written to {out}")
    from device_sim.report import machine

    report = {"task": corpus.name, "model": f"cifg-lstm e{args.embed_dim} u{args.units} v{task.vocab.size}",
              "params": config.param_count, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "optimizer": "adam", "best_top3": result.best_top3, "per_epoch": result.per_epoch,
              "wall_s": result.wall_s, "partial": result.stopped_by is not None, **machine()}
    if result.stopped_by:
        report.update(stopped_by=result.stopped_by, epochs=len(result.per_epoch), epochs_requested=args.epochs)
    (out / "central.json").write_text(json.dumps(report, indent=2) + "\n")
    if result.stopped_by:
        raise RunInterrupted(f"kept the partial report of {len(result.per_epoch)} of {args.epochs} epochs: "
                             f"{out / 'central.json'}")
    print(json.dumps({k: report[k] for k in ("task", "epochs", "best_top3", "wall_s")}, indent=2))
    return 0


_BUILTIN_COMMANDS = {"simulate": _simulate, "train-central": _train_central}


if __name__ == "__main__":
    sys.exit(main())
