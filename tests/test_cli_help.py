"""`fedboard --help` answers a newcomer: every option has help and shows its default, every command
has examples, and refusals speak of command-line flags, not Python arguments."""
from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sim.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("fedboard",)
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree with its command path: fedboard, fedboard client, fedboard client add-text..."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


TREE = list(commands(build_parser()))


def test_the_tree_has_every_command():
    names = {" ".join(path) for path, _ in TREE}
    assert names >= {"fedboard", "fedboard simulate", "fedboard train-central", "fedboard tune", "fedboard client",
                     "fedboard client add-text", "fedboard predict", "fedboard keygen", "fedboard aggregator",
                     "fedboard export-bundle", "fedboard broker-config"}


@pytest.mark.parametrize("path,parser", TREE, ids=[" ".join(p) for p, _ in TREE])
def test_every_option_has_help_and_shows_its_default(path, parser):
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        name = "/".join(action.option_strings)
        if not text.strip() or text.strip().startswith("("):
            problems.append(f"{name}: no help text")
        elif not (isinstance(action, FLAGS) or action.required or action.default is argparse.SUPPRESS
                  or "default" in text):
            problems.append(f"{name}: no default shown in {text!r}")
    assert not problems, f"{' '.join(path)}: " + "; ".join(problems)


@pytest.mark.parametrize("path,parser", TREE, ids=[" ".join(p) for p, _ in TREE])
def test_every_command_has_examples_that_parse(path, parser):
    help_text = parser.format_help()
    assert "examples:" in help_text, f"{' '.join(path)} has no examples"
    lines = help_text[help_text.index("examples:"):].splitlines()[1:]
    examples = [line.split("#")[0].strip() for line in lines if line.startswith("  fedboard ")]
    assert examples, f"{' '.join(path)}: no example lines"
    if path == ("fedboard",):
        return
    own = [e for e in examples if e.startswith(" ".join(path) + " ")]
    assert own, f"{' '.join(path)}: no example of this command itself"
    import shlex

    for example in own:  # each example is a valid command line (it parses; nothing runs)
        build_parser().parse_args(shlex.split(example)[1:])


def test_the_defaults_the_issue_found_missing_are_shown():
    by_path = {" ".join(path): parser for path, parser in TREE}
    sim = by_path["fedboard simulate"].format_help()
    for option, default in (("--seed", "0"), ("--codec", "q8"), ("--client-lr", "5.0"),
                            ("--clients-per-round", "20"), ("--local-epochs", "1")):
        block = sim[sim.index(f"  {option} "):]
        block = block[: block.index("\n  --", 1)]
        assert f"default: {default}" in " ".join(block.split()), block
    central = by_path["fedboard train-central"].format_help()
    block = central[central.index("  --epochs "):]
    assert "(default: 20)" in block[: block.index("\n  --", 1)]
    assert "--no-progress" in sim and "no progress bar" in sim


def test_help_is_instant_and_keeps_examples_as_written():
    done = subprocess.run([sys.executable, "-m", "device_sim.cli", "simulate", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "\n  fedboard simulate --scenario phones-overnight --rounds 10\n" in done.stdout
    assert "tensorflow" not in done.stderr.lower()


def test_keygen_refusal_names_the_command_line_flag(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["keygen", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedboard keygen: error: a key pair aggregator.key/aggregator.pub already exists in {tmp_path}; "
                   "pass --force to replace it (every device must then be given the new .pub)")
    assert "overwrite" not in err


def test_the_simulate_flags_fall_back_to_the_one_set_of_defaults():
    """The CLI keeps its fallbacks literal (a device's `fedboard client` must not import the aggregator
    to build the parser); they must be the defaults of SimConfig, which takes them from AggregatorConfig."""
    from aggregator.config import AggregatorConfig
    from device_sim.cli import _SIM_DEFAULTS
    from device_sim.simulate import SimConfig

    sim, agg = SimConfig(), AggregatorConfig()
    assert {k: getattr(sim, k) for k in _SIM_DEFAULTS} == _SIM_DEFAULTS
    for name in ("client_lr", "server_optimizer", "server_lr", "codec", "clients_per_round", "over_selection",
                 "client_clip", "local_epochs", "batch_size"):
        assert getattr(sim, name) == getattr(agg, name), name
    assert (agg.server_optimizer, agg.server_lr, agg.client_lr) == ("fedadam", 0.01, 5.0)  # the measured ones
