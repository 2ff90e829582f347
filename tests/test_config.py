"""ModelConfig: the reference sizes, the parameter count, strict (de)serialization."""

import dataclasses

import pytest

from models.config import ModelConfig


def test_reference_param_count_is_the_benchmark_figure():
    config = ModelConfig()
    assert (config.vocab_size, config.embed_dim, config.units, config.seq_len) == (5004, 96, 256, 20)
    assert config.param_count == 781_068
    assert config.param_count * 4 == 3_124_272  # BENCHMARK.md: bytes as float32


def test_param_count_formula_for_a_small_model():
    c = ModelConfig(vocab_size=50, embed_dim=8, units=16, seq_len=5, batch_size=2)
    embedding = 50 * 8
    cifg = (8 + 16) * 3 * 16 + 3 * 16  # i, g, o gates; f = 1 - i; no peepholes
    projection = 16 * 8
    assert c.param_count == embedding + cifg + projection + 50


def test_dict_round_trip():
    c = ModelConfig(vocab_size=100, embed_dim=16, units=32, seq_len=7, batch_size=3)
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert c.to_dict() == {"vocab_size": 100, "embed_dim": 16, "units": 32, "seq_len": 7, "batch_size": 3}


def test_from_dict_names_unknown_key():
    d = ModelConfig().to_dict() | {"dropout": 0.1}
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig.from_dict(d)


def test_from_dict_names_missing_key():
    d = ModelConfig().to_dict()
    del d["units"]
    with pytest.raises(ValueError, match="units"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("bad", [{"units": 0}, {"embed_dim": -3}, {"seq_len": 2.5}, {"batch_size": True}, {"vocab_size": 4}])
def test_rejects_nonsense_sizes(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().units = 3  # type: ignore[misc]
