"""`fedboard tune` on the command line: options, spec sources, defaults, a real run, bad specs."""
import argparse
import json

import pytest

from device_sim.simulate import SimConfig
from device_sim.tune_commands import base_config, gather_codecs, register
from protocol.errors import CodecError

TINY = ["--devices", "6", "--rounds", "2", "--clients-per-round", "3", "--vocab-size", "300", "--embed-dim", "16",
        "--units", "32", "--seed", "3", "--no-progress"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="fedboard")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["tune", *argv])


def test_specs_come_from_every_source_in_order(tmp_path):
    specs_file = tmp_path / "specs.txt"
    specs_file.write_text("f16\n# comment\nef|q2|zstd\n")
    args = parse(["--codec", "ef|topk:0.01|q4|zstd", "--codec", "q8", "--codecs", "q4|zstd,randk:0.1,unbiased|q8",
                  "--codecs-file", str(specs_file)])
    assert gather_codecs(args, ("ef|sign|zstd",)) == [
        "ef|topk:0.01|q4|zstd", "q8", "q4|zstd", "randk:0.1,unbiased|q8", "f16", "ef|q2|zstd", "ef|sign|zstd"]
    assert args.handler.__name__ == "tune_command"


def test_unset_simulator_options_keep_the_simulate_defaults():
    args = parse(["--codec", "q8"])
    cfg = base_config(args)
    defaults = SimConfig()
    assert (cfg.client_lr, cfg.server_optimizer, cfg.batch_size, cfg.vocab_size) == (
        defaults.client_lr, defaults.server_optimizer, defaults.batch_size, defaults.vocab_size)
    assert cfg.rounds == defaults.rounds and cfg.codec == "f32"
    cfg = base_config(parse(["--corpus", "x.txt", "--format", "speakers", "--client-lr", "0.5", "--seed", "7",
                             "--rounds", "12", "--deadline-s", "90"]))
    assert (cfg.rounds, cfg.client_lr, cfg.seed, cfg.format) == (12, 0.5, 7, "speakers")
    assert cfg.report_deadline_s == 90.0


def test_several_cohort_sizes_and_epochs():
    args = parse(["--clients-per-round", "10", "20", "--local-epochs", "1", "2"])
    assert args.clients_per_round == [10, 20] and args.local_epochs == [1, 2]


def test_bad_spec_fails_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    args = parse(["--codec", "q8", "--codec", "ef|topk:0.01|q5", "--out", str(out), *TINY])
    with pytest.raises(CodecError, match="unknown stage 'q5'"):
        args.handler(args)
    assert not out.exists()


def test_a_real_tune_from_a_grid_file(tmp_path, cache_dir, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text('codecs = ["ef|topk:0.1|q4|zstd"]\nclients_per_round = [3]\n')
    out = tmp_path / "out"
    args = parse(["--grid", str(grid), "--tolerance", "0.5", "--out", str(out), *TINY])
    # two rounds of a tiny model leave top-3 at the initial model's: no recommendation (it used to
    # print the most aggressive spec's snippet at +0.00 %; issue 19); the sweep itself succeeded
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "| `ef\\|topk:0.1\\|q4\\|zstd` | 3 | 1 |" in printed
    assert "no recommendation: the baseline f32" in printed and "nothing had learned yet" in printed
    assert "fedboard simulate --codec" not in printed
    doc = json.loads((out / "tune.json").read_text())
    assert {r["spec"] for r in doc["rows"]} == {"f32", "ef|topk:0.1|q4|zstd"}
    assert doc["settings"]["rounds"] == 2 and doc["settings"]["devices"] == 6
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["ef+topk-0.1+q4+zstd__c3_e1", "f32__c3_e1"]
