"""The device subcommands: client (run, add-text), keygen, predict."""
import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.app import PersistentTrust
from edge_client.at_rest import device_keyring
from edge_client.client_config import load_client_config
from edge_client.commands import main, register
from edge_client.textstore import TextStore
from models.bundle_cache import get_or_export_bundle
from models.config import ModelConfig
from models.tokenizer import build_vocabulary
from protocol.codec import parse_codec
from protocol.signing import ModelManifest, load_private_key, load_public_key, sign_manifest, write_keypair

ROOT = Path(__file__).resolve().parents[1]
KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]


@pytest.fixture(scope="module")
def bundle(cache_dir):
    vocab = build_vocabulary(KEYBOARD, size=100)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


@pytest.fixture
def config_file(tmp_path):
    _, public = write_keypair(tmp_path / "keys")
    path = tmp_path / "client.toml"
    path.write_text(f"""
[device]
id = "pi-1"
fleet = "home"
state_dir = "state"

[broker]
host = "127.0.0.1"
port = 1883
bootstrap_timeout_s = 15

[trust]
aggregator_public_key = "{public}"

[policy]
require_idle = false
require_unmetered = false
max_cpu_temp_c = 200
min_free_memory_mb = 0
""")
    return path


def parse(argv):
    parser = argparse.ArgumentParser(prog="fedboard")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_parser_wires_every_subcommand_to_its_handler():
    assert parse(["client", "--config", "c.toml"]).handler.__name__ == "run_client"
    args = parse(["client", "add-text", "--config", "c.toml", "hello there", "second"])
    assert args.handler.__name__ == "add_text" and args.text == ["hello there", "second"]
    assert args.config == Path("c.toml")
    assert parse(["client", "--config", "c.toml", "add-text", "x"]).config == Path("c.toml")  # either position
    assert parse(["keygen", "--out", "k"]).handler.__name__ == "keygen_command"
    args = parse(["predict", "i am going to", "--bundle", "b.fbz"])
    assert args.handler.__name__ == "predict_command" and args.k == 3
    with pytest.raises(SystemExit):
        parse(["predict", "x", "--bundle", "b", "--config", "c"])  # one source only


def test_importing_the_commands_is_light():
    code = ("import sys; import edge_client.commands as c, argparse; p = argparse.ArgumentParser(); "
            "c.register(p.add_subparsers()); "
            "heavy = sorted(m for m in ('numpy', 'paho', 'tensorflow', 'ai_edge_litert') if m in sys.modules); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_add_text_appends_to_the_store(config_file, tmp_path, capsys):
    assert main(["client", "add-text", "--config", str(config_file), "i am going to the park", "see you"]) == 0
    assert "added 2 text(s)" in capsys.readouterr().out
    export = tmp_path / "export.jsonl"
    recent, ancient = int(time.time()) - 3600, 1_000_000_000  # the ancient one is past [store] max_age_days
    export.write_text(f'{{"text": "from a file", "app": "chat"}}\n\n{{"text": "another", "ts": {recent}}}\n'
                      f'{{"text": "too old to keep", "ts": {ancient}}}\n')
    assert main(["client", "add-text", "--config", str(config_file), "--file", str(export), "--format", "jsonl"]) == 0
    config = load_client_config(config_file)
    with pytest.raises(ValueError, match="encrypted"):  # the typed text is sealed: no key, no text
        TextStore(config.device.data)
    with TextStore(config.device.data, max_age_days=None, keyring=device_keyring(config)) as store:
        assert sorted(store.texts()) == sorted(["i am going to the park", "see you", "from a file", "another"])
    assert main(["client", "add-text", "--config", str(config_file)]) == 2  # neither texts nor --file
    assert "either texts to add or --file" in capsys.readouterr().err
    assert main(["client", "add-text", "--config", str(tmp_path / "missing.toml"), "x"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_keygen_writes_a_pair_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "aggregator.pub" in out and "fingerprint" in out
    assert (tmp_path / "k" / "aggregator.key").stat().st_mode & 0o777 == 0o600
    before = (tmp_path / "k" / "aggregator.pub").read_bytes()
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keygen", "--out", str(tmp_path / "k"), "--force", "--name", "aggregator"]) == 0
    assert (tmp_path / "k" / "aggregator.pub").read_bytes() != before
    load_private_key(tmp_path / "k" / "aggregator.key")
    assert main(["keygen", "--out", str(tmp_path / "k"), "--name", "fleet2"]) == 0


def test_predict_from_a_bundle_and_weights(bundle, tmp_path, capsys):
    path = bundle.write(tmp_path / "b.fbz")
    assert main(["predict", "i am going to", "--bundle", str(path)]) == 0
    out = capsys.readouterr().out
    words = out.splitlines()[0].split(" -> ")[1].split(", ")
    assert len(words) == 3 and "latency:" in out and "ms" in out
    np.save(tmp_path / "w.npy", bundle.initial_weights)
    weights = str(tmp_path / "w.npy")
    assert main(["predict", "i am going to", "--bundle", str(path), "--weights", weights, "-k", "5"]) == 0
    assert len(capsys.readouterr().out.splitlines()[0].split(" -> ")[1].split(", ")) == 5
    (tmp_path / "short.f32").write_bytes(b"\0" * 16)
    assert main(["predict", "x", "--bundle", str(path), "--weights", str(tmp_path / "short.f32")]) == 2
    assert "holds 4 values" in capsys.readouterr().err


def test_predict_with_the_devices_saved_model(bundle, config_file, capsys):
    config = load_client_config(config_file)
    assert main(["predict", "i am", "--config", str(config_file)]) == 2
    assert "no training bundle" in capsys.readouterr().err
    config.device.state_dir.mkdir(parents=True)
    bundle.write(config.device.state_dir / "bundle.fbz")
    assert main(["predict", "i am", "--config", str(config_file)]) == 0
    assert "initial weights" in capsys.readouterr().out
    # a global model the device accepted (as PersistentTrust saves it)
    private = load_private_key(config.trust.aggregator_public_key.with_suffix(".key"))
    weights = bundle.initial_weights * 2
    payload = parse_codec("f32").encode(weights).payload
    manifest = ModelManifest(fleet="home", model_id=bundle.model_id, version=5,
                             weights_sha256=hashlib.sha256(payload).hexdigest(), codec="f32",
                             payload_len=len(payload),
                             extra={"bundle_sha256": bundle.sha256,
                                    "weights_f32_sha256": hashlib.sha256(weights.astype("<f4").tobytes()).hexdigest()})
    trust = PersistentTrust(load_public_key(config.trust.aggregator_public_key), "home", bundle.model_id,
                            config.device.state_dir)
    trust.accept(sign_manifest(private, manifest), payload)
    assert main(["predict", "i am", "--config", str(config_file)]) == 0
    assert "latest global model" in capsys.readouterr().out


@pytest.mark.mosquitto
def test_client_runs_without_tensorflow_and_stops_on_sigterm(bundle, config_file, mosquitto, tmp_path):
    from aggregator.server import Aggregator, AggregatorConfig
    from protocol.transport import MqttSettings

    config_file.write_text(config_file.read_text().replace("port = 1883", f"port = {mosquitto.port}"))
    private = load_private_key(config_file.parent / "keys" / "aggregator.key")
    agg = Aggregator(AggregatorConfig(fleet="home"), bundle, MqttSettings(port=mosquitto.port), private)
    agg.start()  # publishes the retained bundle and model
    try:
        code = (
            "import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):\n"
            "            raise ImportError('TensorFlow is blocked on the device: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from edge_client.commands import main\n"
            f"sys.exit(main(['client', '--config', {str(config_file)!r}]))\n"
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
        lines = []
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line)
                if "running with model" in line:
                    break
            assert any("running with model" in line for line in lines), "".join(lines)
            proc.send_signal(signal.SIGTERM)
            rest = proc.communicate(timeout=30)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "received SIGTERM" in rest and "stopped" in rest
    finally:
        agg.stop()


def test_predict_without_a_config_names_the_default_path_it_looked_for(tmp_path, monkeypatch, capsys):
    from device_sim.cli import main

    missing = tmp_path / "nowhere" / "client.toml"
    monkeypatch.setenv("FEDBOARD_CLIENT_CONFIG", str(missing))
    assert main(["predict", "i am going to"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--config" in err and "Traceback" not in err
